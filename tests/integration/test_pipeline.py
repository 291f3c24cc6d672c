"""The whole service against a real broker, real worker processes and real LMDB files.

Each test publishes the seeded 7-source workload (>= 100k events, >= 5% duplicates, >= 2%
reordered, plus malformed records interleaved), runs `aggregator run` as a child process and
compares the views in LMDB with the simulator's independent oracle. Sums and counts (`add`
ops) in the views make any double or lost apply visible.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from aggregator.devtools import simulate
from tests.support.service import produce_prefixed, read_topic

EVENTS = int(os.environ.get("AGGREGATOR_TEST_EVENTS", "100000"))


@pytest.fixture(scope="module")
def workload():
    w = simulate.generate(7, EVENTS)
    assert w.stats["duplicates"] >= 0.05 * len(w.events)
    assert w.stats["reordered"] >= 0.02 * len(w.events)
    return w


@pytest.fixture(scope="module")
def expected(workload):
    return simulate.expected_views(workload)


def finish(svc, produced):
    svc.wait_committed(produced.ends)
    assert svc.stop() == 0, svc.log()[-5000:]
    assert svc.shm_segments() == [], "shared-memory segments leaked"


def assert_views(svc, expected):
    actual = svc.views()
    for view, docs in expected.items():
        got = actual[view]
        assert set(got) == set(docs), f"{view}: keys differ"
        wrong = [k for k in docs if got[k] != docs[k]]
        assert not wrong, f"{view}: {len(wrong)} documents differ, e.g. {wrong[0]}: " \
                          f"{got[wrong[0]]} != {docs[wrong[0]]}"


@pytest.mark.parametrize("workers", [1, 2])
def test_views_equal_oracle(workers, workload, expected, shop_prefix, bootstrap,
                            service_factory):
    produced = produce_prefixed(bootstrap, shop_prefix, workload)
    bad = produced.bad
    svc = service_factory(shop_prefix, workers).start()
    finish(svc, produced)
    assert_views(svc, expected)
    assert "core implementation: cython" in svc.log()

    # malformed records: dead-lettered with their reason, original bytes kept
    dlq = read_topic(bootstrap, svc.config.service.dead_letter_topic)
    reasons = sorted(dict(m.headers())["aggregator-dlq-reason"].decode() for m in dlq)
    assert reasons == sorted(b.reason for b in bad)
    by_key = {m.key(): m for m in dlq}
    for b in bad:
        if b.key is not None:
            m = by_key[b.key]
            assert m.value() == b.value
            h = dict(m.headers())
            assert h["aggregator-dlq-topic"].decode() == b.topic
            assert int(h["aggregator-dlq-offset"]) >= 0


def test_sigkill_worker_mid_run(workload, expected, shop_prefix, bootstrap, service_factory,
                                tmp_path):
    """A worker SIGKILLed between applying its third transaction and committing it (the
    supervisor rewinds what it had dispatched to it), then another one from outside. The
    first kill comes from the worker itself: an outside kill at 30 % of the group's
    committed offsets found the workers done with the whole 100k run (~3 s) in CI, with
    nothing to rewind."""
    produced = produce_prefixed(bootstrap, shop_prefix, workload, with_bad=False)
    svc = service_factory(shop_prefix, 2).start(env={
        "AGGREGATOR_FAULTS": "worker_before_commit=3",
        "AGGREGATOR_FAULTS_ONCE": str(tmp_path / "fault-fired")})
    svc.wait_workers(2)
    targets = produced.ends
    svc.wait_committed(targets, fraction=0.6)
    os.kill(svc.worker_pids()[-1], signal.SIGKILL)
    finish(svc, produced)
    log = svc.log()
    assert log.count("exited with code -9") == 2, log[-3000:]
    assert "rewound" in log
    assert_views(svc, expected)


def test_sigkill_supervisor_then_restart(workload, expected, shop_prefix, bootstrap,
                                        service_factory):
    produced = produce_prefixed(bootstrap, shop_prefix, workload, with_bad=False)
    first = service_factory(shop_prefix, 2, name="first").start()
    pids = first.wait_workers(2)
    targets = produced.ends
    first.wait_committed(targets, fraction=0.4)
    first.kill()  # SIGKILL: no drain, no commit, shared memory left behind
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # workers follow their parent (PR_SET_PDEATHSIG)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids), "orphaned workers"
    assert first.shm_segments(), "expected the killed run's segments to be left behind"

    second = service_factory(shop_prefix, 2, name="second").start()
    finish(second, produced)
    assert "removed" in second.log() and "shared-memory segments" in second.log()
    assert_views(second, expected)


def test_worker_count_change_reshards(tmp_path, shop_prefix, bootstrap, service_factory):
    """A data dir written by 2 workers, restarted with 1: resharded at start, views kept
    (the full 4 → 7 → 2 run with a SIGKILL is tests/chaos/test_reshard.py)."""
    small = simulate.generate(3, 2000)
    produced = produce_prefixed(bootstrap, shop_prefix, small, with_bad=False)
    expected = simulate.expected_views(small)
    svc = service_factory(shop_prefix, 2).start()
    finish(svc, produced)
    assert_views(svc, expected)
    other = service_factory(shop_prefix, 1, name="one").start()
    deadline = time.monotonic() + 60
    while "worker 0 booted" not in other.log():  # resharded before the worker boots
        assert other.proc.poll() is None and time.monotonic() < deadline, other.log()[-3000:]
        time.sleep(0.05)
    finish(other, produced)
    assert "resharded 2 → 1 workers" in other.log(), other.log()[-3000:]
    assert_views(other, expected)
    data = other.config.service.data_dir
    assert sorted(p.name for p in data.iterdir() if p.name.startswith("shard-")) == ["shard-0"]
