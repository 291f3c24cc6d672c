"""The worker count changes between runs of one data dir (4 → 7 → 2): the views stay exact.

The real service (`aggregator run`, real worker processes, real LMDB files, the real broker)
runs the seeded workload with 4 workers until a third is committed and stops cleanly
(SIGTERM); restarts on the same data dir with 7 workers (it reshards at start) until two
thirds are committed and is SIGKILLed, so that forwarded updates, unpublished change events
and uneven through-offsets are left in the shards; then finishes with 2 workers. The views
must equal the oracle, every document's version the oracle's count of its updates, and the
change events must be complete and in order per key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

from aggregator import simulate
from aggregator.store import Shard
from tests.integration.service import read_topic

EVENTS = int(os.environ.get("AGGREGATOR_CHAOS_RESHARD_EVENTS", "30000"))
KILL_AT_COMMIT = 8  # of one worker, in the 7-worker run
VIEWS = ("customer", "order", "product")


def pending_state(data_dir) -> dict:
    """What a SIGKILL left in the shards for the reshard to carry over."""
    shards = [Shard(p, readonly=True) for p in sorted(data_dir.glob("shard-*"))]
    try:
        links = [s.links() for s in shards]
        out = {"forwarded": 0, "changes": 0, "parked": 0, "uneven_offsets": 0}
        for i, s in enumerate(shards):
            for t in range(len(shards)):
                if t != i:
                    out["forwarded"] += sum(1 for _ in s.outbox_after(t, links[t].get(i, 0)))
            out["changes"] += sum(1 for _ in s.changes_after(s.get_meta("changes_published", 0)))
            out["parked"] += s.stat()["parked"]
        offsets = [s.offsets() for s in shards]
        out["uneven_offsets"] = sum(1 for tp in offsets[0]
                                    if len({o.get(tp) for o in offsets}) > 1)
        return out
    finally:
        for s in shards:
            s.close()


def stored_documents(data_dir) -> dict:
    """{view: {key: stored record}} with versions, tombstones included."""
    out: dict = {v: {} for v in VIEWS}
    for p in sorted(data_dir.glob("shard-*")):
        s = Shard(p, readonly=True)
        try:
            for view, key, rec in s.documents(s.get_meta("views")):
                out[view][key] = rec
        finally:
            s.close()
    return out


def check_change_events(bootstrap: str, prefix: str, docs: dict) -> None:
    """Per key: the first copy of every change id in version order, versions 1..v all there,
    re-publications identical, the last one equal to the document."""
    for view in VIEWS:
        first: dict = {}
        versions: dict = {}
        last: dict = {}
        for m in read_topic(bootstrap, f"{prefix}shop.{view}.changes", quiet=1.0):
            h = dict(m.headers())
            cid, seq, key = h["ce_id"].decode(), int(h["ce_sequence"]), m.key().decode()
            if cid in first:
                assert first[cid] == m.value(), f"{cid} re-published with other data"
                continue
            first[cid] = m.value()
            seen = versions.setdefault(key, [])
            assert not seen or seq > seen[-1], f"{view}/{key}: {seq} after {seen[-1]}"
            seen.append(seq)
            last[key] = m.value()
        for key, rec in docs[view].items():
            assert versions.get(key) == list(range(1, rec["v"] + 1)), f"{view}/{key}"
            final = last[key]
            assert (None if final is None else json.loads(final)) == rec["d"], f"{view}/{key}"


def wait_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # workers follow their supervisor (PR_SET_PDEATHSIG)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids), "orphaned workers"


def reshard_line(log: str, old: int, new: int) -> str:
    m = re.search(rf"resharded {old} → {new} workers: .*", log)
    assert m, f"no reshard {old} → {new} in the log:\n{log[-3000:]}"
    return m.group(0)


def wait_booted(svc, n: int, timeout: float = 60) -> None:
    """Until n workers logged their boot (then a SIGKILL of the supervisor reaches them)."""
    deadline = time.monotonic() + timeout
    while svc.log().count(" booted: core=") < n:
        assert svc.proc.poll() is None and time.monotonic() < deadline, svc.log()[-3000:]
        time.sleep(0.05)


def wait_consumed(svc, count: int, timeout: float = 120) -> None:
    """Until the group's committed offsets cover `count` records (offsets are dense from 0,
    so their sum over partitions counts the records; the test broker's high watermarks lag
    far behind after a produce, so they can't be the target)."""
    deadline = time.monotonic() + timeout
    while True:
        assert svc.proc.poll() is None, f"service exited early:\n{svc.log()[-3000:]}"
        done = sum(max(o, 0) for o in svc.committed().values())
        if done >= count:
            return
        assert time.monotonic() < deadline, f"{done} of {count} committed\n{svc.log()[-3000:]}"
        time.sleep(0.1)


def test_worker_count_4_7_2_keeps_the_views_exact(broker, bootstrap, shop_prefix, tmp_path,
                                                 service_factory):
    workload = simulate.generate(7, EVENTS)
    broker.create_topics([f"{shop_prefix}shop.{v}.changes" for v in VIEWS], 4)
    records = [(shop_prefix + t, k, v, h) for t, k, v, h in workload.records]
    bad = simulate.bad_records(shop_prefix)
    for i, b in enumerate(bad):  # malformed records spread over the workload
        records.insert((i + 1) * len(records) // (len(bad) + 1), tuple(b[:4]))
    third = len(records) // 3
    data = tmp_path / "data"

    def produce(start: int, end: int) -> int:
        """Produce records[start:end]; the count of records in the source topics up to end."""
        simulate.produce(records[start:end], bootstrap)
        return sum(1 for r in records[:end] if r[0] in topics)

    # run 1: 4 workers on the first third, stopped cleanly (SIGTERM: nothing left pending)
    run = service_factory(shop_prefix, 4, data_dir=data, name="w4")
    topics = run.config.topics()
    first = produce(0, third)
    wait_consumed(run.start(), first)
    assert run.stop() == 0, run.log()[-3000:]

    # run 2: 7 workers (reshard 4 → 7) on the second third: a worker SIGKILLs the supervisor
    # right after one of its commits, with the other workers mid-batch (the workers die with
    # it: PR_SET_PDEATHSIG), leaving forwarded updates, change events and uneven offsets
    produce(third, 2 * third)
    run = service_factory(shop_prefix, 7, data_dir=data, name="w7").start(env={
        "AGGREGATOR_FAULTS": f"worker_after_commit={KILL_AT_COMMIT}:kill-parent",
        "AGGREGATOR_FAULTS_ONCE": str(tmp_path / "fault-fired")})
    wait_booted(run, 7)
    pids = run.worker_pids()
    try:
        run.proc.wait(60)
    except subprocess.TimeoutExpired:  # too few commits to reach the fault: kill it now
        run.kill()
    assert run.proc.returncode == -9
    wait_gone(pids)
    pending = pending_state(data)
    log7 = run.log()

    # run 3: 2 workers (reshard 7 → 2), to the end
    total = produce(2 * third, len(records))
    run = service_factory(shop_prefix, 2, data_dir=data, name="w2").start()
    wait_consumed(run, total)
    assert run.stop() == 0, run.log()[-3000:]

    lines = [reshard_line(log7, 4, 7), reshard_line(run.log(), 7, 2)]
    print(f"\npending after the SIGKILL: {pending}\n" + "\n".join(lines))
    assert pending["changes"] and pending["forwarded"] + pending["uneven_offsets"], pending
    assert "0 pending forwarded updates applied, 0 unpublished change events" in lines[0]

    assert run.views() == simulate.expected_views(workload)
    docs = stored_documents(data)
    versions = simulate.expected_versions(workload)
    for view in VIEWS:
        got = {k: rec["v"] for k, rec in docs[view].items()}
        assert got == versions[view], f"{view}: document versions differ (lost or doubled)"
    check_change_events(bootstrap, shop_prefix, docs)
