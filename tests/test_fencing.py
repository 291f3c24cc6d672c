"""Fencing: a worker that was replaced (stopped past its heartbeat timeout, then resumed) must
not write to its shard, take messages from its rings or touch shared state.

Real LMDB files; worker A runs in this process (the `Cluster` harness of test_worker.py) or as
a real worker process, its replacement B boots in another process on the same shard index
(LMDB must not be opened twice in one process).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import msgpack
import pytest

from aggregator.control import Slot
from aggregator.devtools import simulate
from aggregator.protocol import FENCED_EXIT, MSG_RECORDS
from aggregator.store import WRITER_EPOCH, Fenced, Shard
from aggregator.worker import Worker
from aggregator.worker_process import worker_main
from tests.test_worker import Cluster

SPAWN = multiprocessing.get_context("spawn")


def _boot_and_close(cfg, index: int, prefix: str, out: str) -> None:
    """Worker B, in a process of its own: boot on the shard (claiming it), then stop."""
    w = Worker(cfg, index, prefix)
    w.boot()
    Path(out).write_text(json.dumps({"epoch": w.epoch, "probe": w.shard.get_meta("probe")}))
    w.close()


def boot_elsewhere(c: Cluster, index: int, tmp_path: Path, wait: bool = True):
    out = tmp_path / f"boot-{time.monotonic_ns()}.json"
    p = SPAWN.Process(target=_boot_and_close, args=(c.cfg, index, c.prefix, str(out)))
    p.start()
    if not wait:
        return p, out
    p.join(120)
    assert p.exitcode == 0
    return json.loads(out.read_text())


def dump(shard: Shard) -> dict:
    """Every key and value of every database of the shard."""
    with shard.env.begin() as txn:
        return {name: {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
                for name, db in shard.db.items()}


def message_for(c: Cluster, index: int, recs: list[list]) -> bytes:
    """One ring message for worker `index`, as Supervisor._dispatch encodes it."""
    mine = [r for r in recs if r[7] % c.n == index]
    through: dict = {}
    for r in recs:
        through[(r[0], r[1])] = max(through.get((r[0], r[1]), -1), r[2])
    bid = c.next_batch[index]
    c.next_batch[index] += 1
    return msgpack.packb([MSG_RECORDS, bid, [[t, p, o] for (t, p), o in through.items()], mine],
                         use_bin_type=True)


def unpack(m: bytes):
    return msgpack.unpackb(m, raw=False, strict_map_key=False, use_list=True)


@pytest.fixture
def cluster(tmp_path):
    made: list[Cluster] = []

    def make(n: int) -> Cluster:
        c = Cluster(tmp_path / "data", n)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="module")
def workload() -> simulate.Workload:
    return simulate.generate(5, 1500)


def test_replaced_worker_writes_nothing_and_takes_no_messages(cluster, workload, tmp_path):
    c = cluster(2)
    c.boot()
    bad = simulate.bad_records()
    recs = c.ring_records(list(workload.records) + [tuple(b[:4]) for b in bad])
    first, rest = recs[:800], recs[800:]
    bad_of_a = sorted(b.reason for b, r in zip(bad, recs[-len(bad):]) if r[7] % 2 == 0)
    assert bad_of_a  # A's batch holds records it would dead-letter
    c.feed(first, random.Random(1))
    a = c.workers[0]
    assert a.epoch == c.ctl.get(0, Slot.EPOCH) == 1

    b = boot_elsewhere(c, 0, tmp_path)  # the replacement claims shard 0
    assert b["epoch"] == c.ctl.get(0, Slot.EPOCH) == 2
    before = dump(a.shard)
    assert before["meta"][WRITER_EPOCH] == msgpack.packb(2)
    ack, beat = c.ctl.get(0, Slot.ACK_BATCH), c.ctl.get(0, Slot.HEARTBEAT)

    # A applies a batch (malformed records in it would be dead-lettered): fenced, nothing
    # written, nothing dead-lettered, nothing acknowledged
    msg = message_for(c, 0, rest)
    with pytest.raises(Fenced) as e:
        a.process([unpack(msg)], [])
    assert (e.value.mine, e.value.epoch) == (1, 2)
    assert dump(a.shard) == before
    assert c.dlqs[0].sent == []
    assert c.ctl.get(0, Slot.ACK_BATCH) == ack

    # A's main loop does not take the message from its ring (nor heartbeat for B)
    ring = c.rings[0]
    assert ring.try_put(msg)
    used = ring.used_bytes
    with pytest.raises(Fenced):
        a.run()
    assert ring.used_bytes == used
    assert c.ctl.get(0, Slot.HEARTBEAT) == beat
    assert dump(a.shard) == before

    # the next worker of shard 0 (here, in this process) applies it
    w = c.restart(0)
    assert w.epoch == 3
    w.process([unpack(m) for m in ring.get_many(10)], [])
    assert c.ctl.get(0, Slot.ACK_BATCH) == c.next_batch[0] - 1
    assert sorted(c.dlqs[0].reasons) == bad_of_a
    assert w.through[(rest[-1][0], rest[-1][1])] >= rest[-1][2]


def test_a_batch_running_during_the_claim_commits_before_it(cluster, workload, tmp_path):
    """LMDB's writer lock orders the claim after a transaction that had begun: the new
    worker reads the shard with that transaction in it, and the old one's next is fenced."""
    c = cluster(1)
    c.boot()
    c.feed(c.ring_records(workload.records[:300]), random.Random(2))
    a = c.workers[0]
    batch = a.shard.begin()  # holds the writer lock
    proc, out = boot_elsewhere(c, 0, tmp_path, wait=False)
    time.sleep(3)  # B is waiting for the lock by now (or still importing: the same to us)
    assert c.ctl.get(0, Slot.EPOCH) == 1
    batch.put_meta("probe", 1)
    batch.commit()
    proc.join(120)
    assert proc.exitcode == 0
    assert json.loads(out.read_text()) == {"epoch": 2, "probe": 1}
    with pytest.raises(Fenced):
        a.shard.begin()


def test_stopped_worker_resumed_after_its_replacement_exits_fenced(cluster, tmp_path, capfd,
                                                                   workload):
    """The real worker process: SIGSTOP, a replacement boots, SIGCONT: it exits with
    FENCED_EXIT, says so, and leaves its ring alone."""
    c = cluster(1)
    a = SPAWN.Process(target=worker_main, args=(c.cfg, 0, c.prefix, logging.INFO))
    a.start()
    try:
        deadline = time.monotonic() + 120
        while c.ctl.get(0, Slot.EPOCH) < 1:
            assert a.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(a.pid, signal.SIGSTOP)
        assert boot_elsewhere(c, 0, tmp_path)["epoch"] == 2
        ring = c.rings[0]
        assert ring.try_put(message_for(c, 0, c.ring_records(workload.records[:50])))
        used = ring.used_bytes
        os.kill(a.pid, signal.SIGCONT)
        a.join(30)
        assert a.exitcode == FENCED_EXIT
        assert ring.used_bytes == used
        assert "worker 0 fenced: superseded by epoch 2" in capfd.readouterr().err
    finally:
        if a.is_alive():
            a.kill()
            a.join(5)


# ---- the supervisor: never two workers of one index ------------------------------------------


class _Stuck:
    """A worker process that a SIGKILL does not end (yet): e.g. in uninterruptible sleep."""

    pid = 999_999_999

    def __init__(self) -> None:
        self.alive = True
        self.exitcode = None

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout=None) -> None:
        pass


class _Ctl:
    def __init__(self, **slots) -> None:
        self.slots = {Slot[k]: v for k, v in slots.items()}

    def get(self, worker: int, slot: int) -> int:
        return self.slots.get(slot, 0)


def test_a_killed_worker_is_replaced_only_once_it_is_gone(tmp_path, monkeypatch):
    from aggregator import supervisor as sup_mod
    from aggregator.config import load_config

    cfg = load_config(None, {"service.workers": 1, "service.data_dir": str(tmp_path),
                             "service.heartbeat_timeout_ms": 100}, env={})
    sup = sup_mod.Supervisor(cfg)
    sup.ctl = _Ctl(EPOCH=1, HEARTBEAT=1)  # booted, silent since the clock's start
    h = sup.handles[0]
    h.process, h.epoch = _Stuck(), 1
    kills: list = []
    spawned: list = []
    monkeypatch.setattr(sup_mod.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.setattr(sup, "_spawn", spawned.append)

    sup._check_workers()  # heartbeat missed: SIGKILL, but it is still there
    assert kills == [(_Stuck.pid, signal.SIGKILL)]
    assert h.killed_at and not spawned
    for _ in range(3):  # later rounds: kill again, still no replacement
        sup._check_workers()
    assert len(kills) == 4 and not spawned
    assert sup.stats.restarts == 0

    h.process.alive, h.process.exitcode = False, -signal.SIGKILL
    sup._check_workers()  # gone: reaped and replaced, once
    assert spawned == [h] and h.killed_at == 0 and sup.stats.restarts == 1
