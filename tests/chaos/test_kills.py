"""Processes killed with -9: workers at random, the supervisor at every step of a commit,
workers at every point around their own commit (the totals against the oracle).

Sizes are short for CI; `AGGREGATOR_CHAOS_EVENTS` raises them (the long mode, bench/tools/chaos.py,
runs 1M events).
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from aggregator.devtools import simulate
from tests.support.chaos import Fault, shard_totals

# CI size: with fewer events the run can end before the random-kill test's three kills
EVENTS = int(os.environ.get("AGGREGATOR_CHAOS_EVENTS", "100000"))
JOIN_S = 120  # a join takes ~3 s, ~11 s after a SIGKILLed member (evicted after the
# session timeout); wait_group_settled keeps Tansu's ghost leader out (service.py)
KILL_EVERY = float(os.environ.get("AGGREGATOR_CHAOS_KILL_EVERY", "1.0"))  # s; long mode: 2


# the random-kill test's workload: it must outlast three kill-and-recover rounds, and format 5
# processes 100k events in about that (one CI run ended after two kills)
RANDOM_KILL_EVENTS = max(EVENTS, 200_000)


@pytest.fixture(scope="module")
def workload():
    return simulate.generate(21, RANDOM_KILL_EVENTS)


def test_sigkill_a_random_worker_every_2s(workload, chaos):
    """Fault 1: SIGKILL a random worker every KILL_EVERY s (after it recovered from the
    previous kill) until everything is committed."""
    run = chaos(workload, name=f"kill a worker every {KILL_EVERY:g} s").produce()
    svc = run.start()
    svc.wait_workers(2)
    run.wait_fraction(0.02)
    rng = random.Random(1)
    while run.committed_total() < run.total():
        run._check_alive()
        t0 = time.monotonic()
        victim = rng.choice(svc.wait_workers(2))
        run.fault("sigkill worker", lambda v=victim: os.kill(v, signal.SIGKILL),
                  detail=str(victim))  # returns once the committed offsets moved again
        time.sleep(max(0.0, KILL_EVERY - (time.monotonic() - t0)))
    report = run.finish()
    assert len(report.faults) >= 3, "the run ended before three kills: raise the events"
    log = svc.log()
    reaped = [f for f in report.faults if f"(pid {f.detail}) exited with code -9" in log]
    assert len(reaped) >= len(report.faults) - 1, log[-3000:]  # the last may hit the stop
    report.assert_ok()


# Where the supervisor dies: a worker kills its parent just before / just after its LMDB
# commit; the supervisor kills itself just before / just after its Kafka commit.
COMMIT_STEPS = [
    ("before the LMDB commit", "worker_before_commit=3:kill-parent"),
    ("after the LMDB commit", "worker_after_commit=3:kill-parent"),
    ("before the Kafka commit", "supervisor_before_kafka_commit=1"),
    ("after the Kafka commit", "supervisor_after_kafka_commit=1"),
]


# CI: 60k events (AGGREGATOR_CHAOS_EVENTS raises it): a fifth of them per step is enough work
SUPERVISOR_EVENTS = int(os.environ.get("AGGREGATOR_CHAOS_EVENTS", "60000"))


def test_sigkill_supervisor_at_every_commit_step(chaos, tmp_path):
    """Fault 2: the supervisor SIGKILLed at each step of a commit, then restarted. A fifth
    of the workload arrives before each step, so that each faulty run has work to do."""
    workload = simulate.generate(21, SUPERVISOR_EVENTS)
    run = chaos(workload, name="kill the supervisor at each commit step")
    parts = len(COMMIT_STEPS) + 1
    run.produce(0, 1 / parts)
    for i, (step, spec) in enumerate(COMMIT_STEPS):
        run.produce((i + 1) / parts, (i + 2) / parts)
        once = tmp_path / f"fired-{len(run.report.faults)}"
        svc = run.start(env={"AGGREGATOR_FAULTS": spec, "AGGREGATOR_FAULTS_ONCE": str(once)})
        before = run.committed_total()
        t0 = time.monotonic()
        pids: list[int] = []
        while svc.proc.poll() is None:
            pids = svc.worker_pids() or pids
            assert time.monotonic() - t0 < JOIN_S, f"{spec} never fired\n{svc.log()[-3000:]}"
            assert run.committed_total() < run.total(), f"run ended before {spec} fired"
            time.sleep(0.05)
        assert svc.proc.returncode == -signal.SIGKILL, svc.log()[-3000:]
        assert once.exists()
        fault = run.fault("sigkill supervisor " + step, lambda: None, detail=spec,
                          measure=False)
        _wait_gone(pids)
        fault.at = time.monotonic()
        run.start()  # no faults: it must recover from whatever the kill left
        run.measure_recovery(fault, before)
        run.svc.stop()
    run.start()
    report = run.finish()
    assert "removed" in run.svc.log() or "shared-memory" not in run.svc.log()
    report.assert_ok()


def _wait_gone(pids: list[int], timeout: float = 10) -> None:
    """The workers follow their supervisor (PR_SET_PDEATHSIG)."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{p}") for p in pids):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.05)


# Every fault point around a worker's commit: each worker process SIGKILLs itself at its 2nd
# visit, so its replacement does too (a crash loop with one commit per life).
WORKER_COMMIT_POINTS = ["worker_before_commit", "worker_after_commit", "worker_after_publish"]
TOTALS_EVENTS = max(EVENTS // 4, 5000)  # CI: 25k; AGGREGATOR_CHAOS_EVENTS raises it


def test_totals_exact_through_worker_kills_at_every_commit_point(chaos):
    """Fault 3: workers SIGKILLed at each point around their LMDB commit, over and over,
    then a supervisor restart: the shards' totals (and the /metrics counters read from
    them) equal the oracle's counts: records, applied, duplicates, stale, dead-lettered."""
    w = simulate.generate(23, TOTALS_EVENTS)
    run = chaos(w, name="kill workers around their commit")
    parts = len(WORKER_COMMIT_POINTS)
    kills = {}
    for i, point in enumerate(WORKER_COMMIT_POINTS):
        run.produce(i / parts, (i + 1) / parts)
        svc = run.start(env={"AGGREGATOR_FAULTS": f"{point}=2"})
        t0 = time.monotonic()
        while run.committed_total() < run.total():
            run._check_alive()
            assert time.monotonic() - t0 < 300, f"{point}: no end\n{svc.log()[-3000:]}"
            time.sleep(0.2)
        kills[point] = svc.log().count("exited with code -9")
        pids = svc.worker_pids()
        svc.kill()  # the faults stay armed until the process ends: no clean stop
        _wait_gone(pids)
        run.report.faults.append(Fault(f"workers SIGKILLed at {point}", t0,
                                       f"{kills[point]} kills"))
    # every point must have fired; how often depends on the machine's load (a loaded machine
    # takes more records per commit, so fewer lives drain a part): at least once each
    assert all(n >= 1 for n in kills.values()), kills
    run.start()  # a supervisor restart: the counters go on from the shards' totals
    run.svc.wait_workers(2)
    m = run.metrics()
    report = run.finish()
    applied = simulate.applied_events(w)
    want = {"records": len(w.records) + len(run.bad), "applied": len(applied),
            "duplicates": w.stats["duplicates"], "stale": len(w.events) - len(applied),
            "gaps_skipped": 0, "deadlettered": len(run.bad)}
    got = shard_totals(run.data_dir)
    assert {k: got[k] for k in want} == want, (kills, got)
    for name, metric in (("records", "aggregator_records_in_total"),
                         ("applied", "aggregator_events_applied_total"),
                         ("duplicates", "aggregator_duplicates_dropped_total"),
                         ("stale", "aggregator_stale_dropped_total"),
                         ("deadlettered", "aggregator_deadlettered_total"),
                         ("forwarded", "aggregator_forwarded_total")):
        assert m[metric] == got[name], (metric, m[metric], got)
    print(f"kills per fault point: {kills}; totals: {got}")
    report.assert_ok()


SMALL_WINDOW = """
[dedup]
bloom_capacity = 2500
bloom_generations = 2
"""


def _kill_at_every_second_visit(chaos, seed: int, extra: str, point: str) -> None:
    """Each worker process SIGKILLs itself at its 2nd visit of fault point `point`, inside
    the batch transaction, so its replacement redoes that batch and dies at the next visit;
    then a restart without faults: the views, the dedup (no double apply) and the totals are
    exact."""
    w = simulate.generate(seed, TOTALS_EVENTS)
    run = chaos(w, name=f"kill workers at {point}").produce()
    svc = run.start(extra=extra, env={"AGGREGATOR_FAULTS": f"{point}=2"})
    t0 = time.monotonic()
    while run.committed_total() < run.total():
        run._check_alive()
        assert time.monotonic() - t0 < 300, f"no end\n{svc.log()[-3000:]}"
        time.sleep(0.2)
    kills = svc.log().count("exited with code -9")
    pids = svc.worker_pids()
    svc.kill()
    _wait_gone(pids)
    run.report.faults.append(Fault(f"workers SIGKILLed at {point}", t0, f"{kills} kills"))
    assert kills >= 2, svc.log()[-3000:]
    run.start(extra=extra)
    run.svc.wait_workers(2)
    report = run.finish()
    applied = simulate.applied_events(w)
    got = shard_totals(run.data_dir)
    assert got["applied"] == len(applied), got  # a duplicate beyond the window: stale
    assert got["duplicates"] + got["stale"] == \
        w.stats["duplicates"] + len(w.events) - len(applied), got
    print(f"kills at {point}: {kills}; totals: {got}")
    report.assert_ok()


def test_workers_killed_in_the_middle_of_a_generation_drop(chaos):
    """Fault 3b: a small dedup window (2 generations of 2,500 ids) makes every worker drop a
    generation every ~2,500 ids; each worker process SIGKILLs itself at its 2nd drop, inside
    the batch transaction that drops it (fault point ``dedup_drop``)."""
    _kill_at_every_second_visit(chaos, 24, SMALL_WINDOW, "dedup_drop")


SMALL_SEQ_LOG = """
[gate]
seq_checkpoint_rows = 300
"""


def test_workers_killed_in_the_middle_of_a_seq_checkpoint(chaos):
    """A small sequence log (a checkpoint every 300 logged rows) makes every worker
    checkpoint its seq rows every few commits; each worker process SIGKILLs itself at its
    2nd checkpoint, inside the batch transaction that writes it (fault point
    ``seq_checkpoint``), so its replacement reads the log back and redoes the batch. The
    views are exact in order per stream (a lost or stale sequence row would apply events
    twice or park them)."""
    _kill_at_every_second_visit(chaos, 25, SMALL_SEQ_LOG, "seq_checkpoint")


SMALL_DOC_LOG = """
[service]
doc_checkpoint_bytes = 200000
"""


def test_workers_killed_in_the_middle_of_a_doc_checkpoint(chaos):
    """A small document log (a checkpoint every 200 kB logged) makes every worker checkpoint
    its documents into views every few commits; each worker process SIGKILLs itself at its
    2nd checkpoint, inside the batch transaction that writes it (fault point
    ``doc_checkpoint``), so its replacement reads the log back and redoes the batch. The
    views are exact (a document lost between log and checkpoint would start again or miss
    updates)."""
    _kill_at_every_second_visit(chaos, 26, SMALL_DOC_LOG, "doc_checkpoint")
