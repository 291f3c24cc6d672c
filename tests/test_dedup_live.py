"""Format 4's unsealed dedup ids (store.py: ``dedup_live`` and the in-memory tables), with
real in-process workers and real LMDB shards (tests/test_worker.py's harness).

- a format-3 shard (ids under the generations' hot key, written by the format-3 path) opened
  by this build: stamped 4, its hot ids moved to dedup_live, every replayed record dropped
  as a duplicate, its generations sealed and pruned as the new ones come;
- kills (an exception out of the batch, the shard reopened) before the commit of a seal
  slice, of a drop and of the boot's move leave an exact index;
- the pure-Python table and the compiled one store the same shard.
"""

from __future__ import annotations

import random

import pytest

import aggregator.store as store_mod
from aggregator import worker as worker_mod
from aggregator.store import HOT, SLOTS_ALL, Shard
from tests import test_worker
from tests.test_worker import Cluster, assert_views

# the worker tests' fixtures: seed 7, 3,000 events, its oracle, in-process clusters
workload = test_worker.workload
oracle = test_worker.oracle
make_cluster = test_worker.make_cluster

SMALL = {"dedup.bloom_capacity": 400, "dedup.bloom_generations": 4}


class Format3Worker(worker_mod.Worker):
    """This build's worker writing new ids as format 3 did (under the hot key)."""

    LIVE_DEDUP = False


def _hot_ids(shard: Shard) -> int:
    n = 0
    with shard.env.begin() as txn:
        for gen, _ in shard.dedup_index:
            cur = txn.cursor(db=shard.dedup_db(gen))
            if cur.set_key(HOT):
                n += cur.count()
    return n


def _live_entries(shard: Shard) -> list[tuple[int, int]]:
    """(generation, ids) of each dedup_live entry."""
    with shard.env.begin() as txn:
        return [(int.from_bytes(v[:8], "big"), (len(v) - 8) // 18)
                for _, v in txn.cursor(db=shard.db["dedup_live"])]


def _index_ids(shard: Shard) -> list[tuple[int, bytes]]:
    return sorted(shard.dedup_entries())


def test_a_format3_shard_is_upgraded_and_dedups_exactly(tmp_path, workload, oracle,
                                                        monkeypatch):
    # 1. the format-3 path: new ids under HOT, generations sealed HOT -> SEALED
    monkeypatch.setattr(worker_mod, "Worker", Format3Worker)
    c = Cluster(tmp_path / "data", 1, overrides=SMALL)
    c.workers[0] = None
    w = Format3Worker(c.cfg, 0, c.prefix)
    w.boot()
    w.dlq = c.dlqs[0]
    c.workers[0] = w
    recs_all = c.ring_records(workload.records)
    half = len(recs_all) // 2
    c.feed(recs_all[:half], random.Random(3), max_batch=60)
    shard = w.shard
    assert shard.live is None and _hot_ids(shard) > 0  # the current generation, unsealed
    assert any(below == SLOTS_ALL for _, below in shard.dedup_index)  # older ones sealed
    before = _index_ids(shard)
    shard.put_meta(format=3)  # as a format-3 build leaves it
    c.stop(0)
    monkeypatch.undo()

    # 2. this build: stamped 4, the hot ids moved (a kill right after the move's commit
    # first: the next boot reads them from dedup_live), the replay all duplicates
    real_open = Shard.open_live_dedup

    def killed(self):
        real_open(self)  # the move committed, then the process ends
        self.close()
        raise Kill()
    monkeypatch.setattr(Shard, "open_live_dedup", killed)
    with pytest.raises(Kill):
        c.boot(0)
    monkeypatch.undo()
    c.boot(0)
    w = c.workers[0]
    shard = w.shard
    assert shard.get_meta("format") == store_mod.FORMAT_VERSION == 6
    assert _hot_ids(shard) == 0
    assert sum(n for _, n in _live_entries(shard)) > 0
    assert _index_ids(shard) == before  # the same ids, each once
    assert shard.stat()["dedup"] == len(before)
    t0 = shard.totals()
    assert sum(len(t) for t in shard.live.values()) > 0
    # the last 800 records again (within the dedup window), at new offsets (past the
    # committed ones): nothing applied again (a few the gate drops as stale, as before)
    c.feed(c.ring_records(workload.records[half - 800:half]), random.Random(4), max_batch=60)
    t1 = c.workers[0].shard.totals()
    assert t1["records"] - t0["records"] == 800
    assert t1["applied"] == t0["applied"]
    assert t1["duplicates"] - t0["duplicates"] >= 790
    assert t1["duplicates"] - t0["duplicates"] + t1["stale"] - t0["stale"] == 800
    # 3. the rest: rotations seal the generations from the tables and prune dedup_live
    c.feed(c.ring_records(workload.records[half:]), random.Random(5), max_batch=60)
    w = c.workers[0]
    shard = w.shard
    unsealed = {g for g, below in shard.dedup_index if below < SLOTS_ALL}
    assert {g for g, _ in _live_entries(shard)} <= unsealed
    assert set(shard.live) <= unsealed
    assert _hot_ids(shard) == 0
    c.feed(c.ring_records(workload.records[-500:]), random.Random(6))  # late redeliveries
    assert_views(c.views(), oracle)
    c.close()


class Kill(BaseException):
    pass


def _die(c: Cluster) -> None:
    """Worker 0 is gone without a clean stop (its uncommitted transaction with it)."""
    w = c.workers[0]
    c.workers[0] = None
    w.shard.close()
    for r in [w.inbound, *w.peer_in.values(), *w.peer_out.values()]:
        r.close()
    w.ctl.close()


@pytest.mark.parametrize("where", ["seal", "drop", "live-write"])
def test_a_kill_before_the_commit_leaves_an_exact_index(make_cluster, workload, oracle,
                                                        monkeypatch, where):
    """The batch that seals a slice, drops a generation or appends to dedup_live dies before
    its commit (the worker process would end: here the exception leaves `process` and the
    worker is booted again on the shard); the redelivery is applied exactly once."""
    c = make_cluster(1, overrides=SMALL)
    recs = c.ring_records(workload.records)
    rng = random.Random(9)
    target = {"seal": "_seal_live", "drop": "drop_generations", "live-write": "_write_live"}
    real = getattr(store_mod.Batch, target[where])
    hits = {"n": 0}

    def dying(self, *a, **k):
        out = real(self, *a, **k)
        if where == "seal" and not out:
            return out
        hits["n"] += 1
        if hits["n"] % 3 == 1:
            raise Kill()
        return out

    monkeypatch.setattr(store_mod.Batch, target[where], dying)
    i = 0
    kills = 0
    while i < len(recs):
        k = rng.randint(20, 80)
        try:
            c.dispatch(recs[i:i + k])
        except Kill:
            kills += 1
            _die(c)
            c.boot(0)
            continue  # the same records again, as the supervisor redelivers them
        i += k
    assert kills >= 2
    monkeypatch.undo()
    c.settle()
    w = c.workers[0]
    ids = _index_ids(w.shard)
    assert len(ids) == len(set(ids))
    c.feed(c.ring_records(workload.records[:600]), random.Random(10))
    assert_views(c.views(), oracle)


def _keys(n: int, rng: random.Random) -> list[bytes]:
    return [rng.randrange(1 << 16).to_bytes(2, "big") + rng.randbytes(16) for _ in range(n)]


def test_store_round_trip_hot_to_live_and_back(tmp_path):
    """Shard level: ids marked seen under HOT (format 3), moved to dedup_live by
    open_live_dedup, new ones appended there (and seen within and after their batch), a
    generation sealed from its table and its entries pruned, then moved back under HOT by
    close_live_dedup (the cluster mode's writer): every id is seen by each, once."""
    rng = random.Random(1)
    path = tmp_path / "shard-0"
    s = Shard(path, sync=False)
    old = _keys(3000, rng)
    b = s.begin()
    b.mark_seen_many(old, 0)
    b.commit()
    assert _hot_ids(s) == 3000
    assert s.open_live_dedup() == (3000, 3000)
    assert _hot_ids(s) == 0
    new = _keys(2000, rng)
    b = s.begin()
    b.mark_seen_many(new[:1000], 1)
    assert b.seen(new[0]) and b.seen(old[0]) and not b.seen(new[1500])
    b.abort()  # nothing of it stays
    b = s.begin()
    assert not b.seen(new[0])
    b.mark_seen_many(new, 1)
    assert b.seal_dedup(1, 500) >= 500  # generation 0 from its table
    b.commit()
    b = s.begin()
    assert all(b.seen(k) for k in old + new)
    assert not any(b.seen(k) for k in _keys(200, rng))
    while b.seal_dedup(1, 500):
        pass
    b.commit()
    assert dict(s.dedup_index)[0] == SLOTS_ALL and 0 not in s.live
    assert {g for g, _ in _live_entries(s)} == {1}  # generation 0's entries pruned
    assert sorted(h for _, h in s.dedup_entries()) == sorted(k[2:] for k in old + new)
    s.close()
    s = Shard(path, sync=False)
    assert s.close_live_dedup() == 2000
    assert _hot_ids(s) == 2000 and not _live_entries(s)
    b = s.begin()
    assert all(b.seen(k) for k in old + new)
    b.abort()
    assert s.open_live_dedup() == (2000, 2000)
    s.close()


def test_the_reference_table_and_the_compiled_one_store_the_same(make_cluster, workload,
                                                                 oracle, monkeypatch):
    """The workload through a small window (rotations, seals, drops) once with the compiled
    table and once with idtable_ref's: the same dedup index, totals and views."""
    from aggregator import _idtable, idtable_ref

    out = []
    for i, impl in enumerate((_idtable.IdTable, idtable_ref.IdTable)):
        monkeypatch.setattr(store_mod, "IdTable", impl)
        c = make_cluster(1, sub=f"d{i}", overrides=SMALL)
        c.feed(c.ring_records(workload.records), random.Random(12), max_batch=70)
        c.feed(c.ring_records(workload.records[-900:]), random.Random(13), max_batch=70)
        w = c.workers[0]
        assert all(type(t) is impl for t in w.shard.live.values())
        out.append((sorted(w.shard.dedup_entries()), w.shard.totals(),
                    [list(e) for e in w.shard.dedup_index]))
        assert_views(c.views(), oracle)
    assert out[0][0] == out[1][0] and out[0][2] == out[1][2]
    assert {k: v for k, v in out[0][1].items() if k != "since"} == \
        {k: v for k, v in out[1][1].items() if k != "since"}
