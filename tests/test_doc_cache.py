"""The worker's document cache (doc_cache.py) and commit window (worker.py `_take`).

Real `Worker` objects on real LMDB shards, driven in-process by tests/test_worker.py's
harness; the window's loop runs in real worker processes (`worker_main`) on real rings.
The differential test: the same deliveries with the cache off and on (and a cache so small it
evicts all the time) give identical stored documents (versions and freshness included),
change events, dead letters and counters, with either core.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
import time
import uuid
from pathlib import Path

import msgpack
import pytest

import aggregator.store as store_mod
import aggregator.worker as worker_mod
from aggregator.config import load_config
from aggregator.control import Slot
from aggregator.devtools import simulate
from aggregator.doc_cache import DocCache, cost
from aggregator.doc_codec import record_doc, unpack_record
from aggregator.envelope import routing_key
from aggregator.protocol import (
    MSG_STOP,
    create_segments,
    frame_records,
    peer_ring_bytes,
    through_list,
)
from aggregator.ring import cleanup_stale
from aggregator.routing import slot_of
from aggregator.store import Shard
from aggregator.worker_process import worker_main
from tests import test_worker
from tests.test_worker import CORES, DISK_ERRORS, PACKER, Cluster, _event, assert_views

make_cluster = test_worker.make_cluster  # the harness's fixtures
flaky_commits = test_worker.flaky_commits

MiB = 1 << 20
NO_CACHE = {"service.doc_cache_bytes": 0}  # the default
CACHE = {"service.doc_cache_bytes": 32 * MiB}


@pytest.fixture(scope="module")
def workload() -> simulate.Workload:
    return simulate.generate(17, 2500)


@pytest.fixture(scope="module")
def oracle(workload) -> dict:
    return simulate.expected_views(workload)


def stored_documents(c: Cluster) -> dict[bytes, dict]:
    """Every stored document of every shard, as stored ({"v", "d", "s"}), by document key
    (the workers are closed first)."""
    for i, w in enumerate(c.workers):
        if w is not None:
            c.stop(i)
    out = {}
    for path in sorted(c.data_dir.glob("shard-*")):
        shard = Shard(path, readonly=True)
        try:
            snap = shard.snapshot()
            for k, v in snap.rows("views"):
                out[bytes(k)] = unpack_record(v)
            snap.close()
        finally:
            shard.close()
    return out


def committed_doc(w, dkey: bytes) -> dict | None:
    snap = w.shard.snapshot()
    try:
        raw = snap.get("views", dkey)
    finally:
        snap.close()
    return None if raw is None else unpack_record(raw)


def decoded(stored: dict) -> dict:
    """A cached record in unpack_record's form (the compiled route stage caches the record
    as stored: its JSON bytes under "j")."""
    rec = {k: v for k, v in stored.items() if k != "j"}
    rec["d"] = record_doc(stored)
    return rec


def assert_cache_is_committed(w) -> int:
    """Every cached document equals the shard's committed one; returns how many."""
    cache = w.doc_cache
    for dkey, (stored, _) in cache._docs.items():
        assert decoded(stored) == committed_doc(w, dkey), dkey
    return len(cache)


# ---- the cache itself ----------------------------------------------------------------------------


def test_take_removes_and_put_evicts_the_least_recently_put():
    c = DocCache(3 * cost(100))
    for k in (b"a", b"b", b"c"):
        c.put(k, {"v": 1}, 100)
    assert len(c) == 3 and c.used == 3 * cost(100)
    assert c.take(b"a") == {"v": 1} and b"a" not in c  # the caller owns it now
    assert c.take(b"a") is None and (c.hits, c.misses) == (1, 1)
    c.put(b"a", {"v": 2}, 100)  # a is the newest now
    c.put(b"d", {"v": 1}, 100)  # evicts b, the oldest
    assert b"b" not in c and [k for k in c._docs] == [b"c", b"a", b"d"]
    c.put(b"c", {"v": 2}, 200)  # bigger: evicts a
    assert [k for k in c._docs] == [b"d", b"c"] and c.used == cost(100) + cost(200)
    c.put(b"x", {}, 10_000)  # larger than the whole budget: not kept
    assert b"x" not in c and len(c) == 2
    c.discard(b"d")
    c.clear()
    assert len(c) == 0 and c.used == 0


# ---- differential: cache off / on ----------------------------------------------------------------


def _deliver(c: Cluster, records: list, seed: int) -> tuple:
    recs = c.ring_records(records)
    c.feed(recs, random.Random(seed), max_batch=120)
    hits = sum(w.doc_cache.hits for w in c.workers if w.doc_cache is not None)
    counts = {s.name: c.total(s) for s in (Slot.RECORDS, Slot.APPLIED, Slot.DUPLICATES,
                                           Slot.STALE, Slot.DEADLETTERED, Slot.COMMITS)}
    dlq = sorted((r[0], r[2], reason, msg) for q in c.dlqs for r, reason, msg in q.sent)
    return stored_documents(c), list(c.published), dlq, counts, hits


@pytest.mark.parametrize("impl", sorted(CORES))
@pytest.mark.parametrize("n", [1, 2])
def test_cache_on_and_off_give_identical_results(make_cluster, workload, oracle, monkeypatch,
                                                 impl, n):
    """Malformed records and merge errors mixed in; many small transactions, so documents
    come back from the cache most of the time (and, with a 64 KiB cache, after evictions)."""
    monkeypatch.setattr(worker_mod, "core", CORES[impl])
    records = list(workload.records)
    rng = random.Random(5)
    bad = [tuple(b[:4]) for b in simulate.bad_records()]
    bad.append(_event("reviews", "shop.review.posted", "r-bad", 1,  # a merge error
                      {"review_id": "r-bad", "product_id": "p-000001",
                       "customer_id": "c-000001", "rating": "four"}, "bad-rating"))
    for b in bad:
        records.insert(rng.randrange(len(records) + 1), b)
    off = _deliver(make_cluster(n, sub="off", overrides=NO_CACHE), records, 3)
    on = _deliver(make_cluster(n, sub="on", overrides=CACHE), records, 3)
    tiny = _deliver(make_cluster(n, sub="tiny", overrides={"service.doc_cache_bytes": 65536}),
                    records, 3)
    assert off[4] == 0 and on[4] > len(records) // 4 and 0 < tiny[4] < on[4]
    for got in (on, tiny):
        assert got[0] == off[0]  # documents with their versions and freshness
        assert got[1] == off[1]  # change events, in order
        assert got[2] == off[2]  # dead letters
        assert got[3] == off[3]  # counters
    assert "merge_error" in {d[2] for d in off[2]}


# ---- rollbacks leave nothing in the cache --------------------------------------------------------


def test_a_rolled_back_transaction_leaves_no_uncommitted_document_in_the_cache(
        make_cluster, flaky_commits, monkeypatch):
    """A document is committed (and cached), then changed by a transaction whose commit
    fails (data disk error): while it is rolled back the cache holds only committed states,
    and the retry applies the change once (version 2, not 3)."""
    c = make_cluster(1, overrides=CACHE)
    w = c.workers[0]
    rolled_back = []
    real = worker_mod.Worker._roll_back

    def roll_back(self, batch):
        real(self, batch)
        rolled_back.append(assert_cache_is_committed(self))

    monkeypatch.setattr(worker_mod.Worker, "_roll_back", roll_back)
    calls = flaky_commits(lambda k: DISK_ERRORS[0]() if k == 2 else None)
    first = _event("inventory", "shop.inventory.adjusted", "p-1", 1,
                   {"product_id": "p-1", "delta": 5}, "i-1")
    second = _event("inventory", "shop.inventory.adjusted", "p-1", 2,
                    {"product_id": "p-1", "delta": 3}, "i-2")
    c.dispatch(c.ring_records([first]))
    (dkey,) = list(w.doc_cache._docs)
    assert w.doc_cache._docs[dkey][0]["v"] == 1
    c.dispatch(c.ring_records([second]))  # commit 2 fails; its retry commits
    assert [f for _, f, _ in calls] == [False, True, False] and rolled_back == [0]
    assert w.doc_cache.hits == 1  # the first attempt took it; the retry read the shard
    cached = w.doc_cache._docs[dkey][0]
    assert decoded(cached) == committed_doc(w, dkey)
    assert cached["v"] == 2 and record_doc(cached) == {"stock": 8, "adjustments": 2}


def test_storage_errors_with_the_cache_match_a_clean_run(make_cluster, workload, oracle,
                                                         flaky_commits, monkeypatch):
    """Most commits fail once or twice (full, read-only, quota, I/O) and MAP_FULL grows the
    map: at every rollback the cache holds committed states only, and the stored documents
    (versions included) equal a run without faults and without the cache."""
    clean = make_cluster(2, sub="clean", overrides=NO_CACHE)
    clean.feed(clean.ring_records(workload.records), random.Random(8))
    want = stored_documents(clean)

    c = make_cluster(2, overrides={**CACHE, "service.lmdb_map_size": MiB,
                                   "service.lmdb_max_map_size": 256 * MiB})
    checked = []
    real = worker_mod.Worker._roll_back

    def roll_back(self, batch):
        real(self, batch)
        checked.append(assert_cache_is_committed(self))

    monkeypatch.setattr(worker_mod.Worker, "_roll_back", roll_back)
    calls = flaky_commits(lambda k: DISK_ERRORS[k % 4]() if k % 5 in (1, 2) else None)
    c.feed(c.ring_records(workload.records), random.Random(8))
    assert sum(1 for _, f, _ in calls if f) >= 10 and max(checked) > 0
    assert sum(w.doc_cache.hits for w in c.workers) > 0
    assert stored_documents(c) == want


def test_a_merge_error_on_a_cached_document_is_undone(make_cluster):
    """The reviews feed upserts, then adds: a bad rating fails after the upsert changed the
    document, which came from the cache. The next transaction sees the committed state."""
    c = make_cluster(1, overrides=CACHE)
    w = c.workers[0]

    def review(rid: str, rating) -> tuple:
        return _event("reviews", "shop.review.posted", rid, 1,
                      {"review_id": rid, "product_id": "p-1", "customer_id": "c-1",
                       "rating": rating}, f"v-{rid}")

    c.dispatch(c.ring_records([review("r-1", 4)]))
    assert len(w.doc_cache) == 2  # the product and the customer document
    c.dispatch(c.ring_records([review("r-2", "four")]))
    assert c.dlqs[0].reasons == ["merge_error"]
    assert assert_cache_is_committed(w) == 0  # both taken, neither stored: not cached
    c.dispatch(c.ring_records([review("r-3", 2)]))
    assert assert_cache_is_committed(w) == 2
    views = c.views()
    assert views["product"] == {"p-1": {
        "reviews": {"r-1": {"rating": 4, "customer_id": "c-1"},
                    "r-3": {"rating": 2, "customer_id": "c-1"}},
        "rating_sum": 6, "review_count": 2}}
    assert views["customer"] == {"c-1": {"reviews_written": 2}}


# ---- the commit window in worker processes -------------------------------------------------------


def _window_run(tmp_path: Path, window_ms: int, messages: list[bytes], oracle,
                pause: float = 0.0, stop_at_once: bool = False, idle_ms: int = 10_000) -> dict:
    """A real worker process on real rings: the messages are put one by one (`pause` s
    between them), then (once all are acknowledged, or at once) a stop message. Returns the
    commits and the acknowledged batch id seen after each put; checks the views."""
    cfg = load_config(None, {"service.workers": 1, "service.data_dir": str(tmp_path / "d"),
                             "service.lmdb_sync": False, "service.shutdown_timeout_ms": 1000,
                             "service.commit_window_ms": window_ms,
                             "service.commit_idle_ms": idle_ms}, env={})
    svc = cfg.service
    seg = f"aggtest-win-{uuid.uuid4().hex[:10]}"
    segments = create_segments(seg, 1, svc.ring_bytes,
                               peer_ring_bytes(svc.ring_bytes, svc.max_record_bytes))
    ctl, ring = segments.ctl, segments.inbound[0]
    proc = mp.get_context("spawn").Process(target=worker_main, args=(cfg, 0, seg,
                                                                     logging.WARNING))
    acks = []
    try:
        proc.start()
        deadline = time.monotonic() + 60
        while ctl.get(0, Slot.EPOCH) < 1:
            assert time.monotonic() < deadline and proc.is_alive()
            time.sleep(0.01)
        for m in messages:
            assert ring.put(m, timeout=10)
            acks.append(ctl.get(0, Slot.ACK_BATCH))
            time.sleep(pause)
        if not stop_at_once:
            while ctl.get(0, Slot.ACK_BATCH) < len(messages):
                assert time.monotonic() < deadline + 60 and proc.is_alive()
                time.sleep(0.005)
        assert ring.put(msgpack.packb([MSG_STOP]), timeout=5)
        t_stop = time.monotonic()
        proc.join(30)
        stop_s = time.monotonic() - t_stop
        assert proc.exitcode == 0
        assert ctl.get(0, Slot.ACK_BATCH) == len(messages)
        commits = ctl.get(0, Slot.COMMITS)
        assert_views(store_mod.read_views(tmp_path / "d", list(cfg.views)), oracle)
        return {"commits": commits, "acks": acks, "stop_s": stop_s}
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        segments.close()
        cleanup_stale(seg)


def _messages(workload, per_message: int) -> list[bytes]:
    """The workload as supervisor messages of `per_message` records (one worker)."""
    cfg = load_config(None, {}, env={})
    tindex = {t: i for i, t in enumerate(cfg.topics())}
    offsets: dict = {}
    recs = []
    for topic, key, value, headers in workload.records:
        tp = (tindex[topic], slot_of(key) % 3 if key else 0)
        off = offsets[tp] = offsets.get(tp, -1) + 1
        rk = routing_key(value, headers, key)
        recs.append([*tp, off, key, value, [[k, v] for k, v in headers], 1000 + off,
                     slot_of(rk) if rk is not None else 0])
    out = []
    for bid, i in enumerate(range(0, len(recs), per_message), start=1):
        chunk = recs[i:i + per_message]
        thr: dict = {}
        for r in chunk:
            thr[(r[0], r[1])] = max(thr.get((r[0], r[1]), -1), r[2])
        (got, msg, _), = frame_records(PACKER, chunk, through_list(thr), bid, 1 << 22)
        assert got == bid
        out.append(msg)
    return out


def test_the_commit_window_groups_ring_messages_into_one_transaction(tmp_path, workload,
                                                                     oracle):
    """Messages arriving every 2 ms: without a window about one commit per message; with a
    1 s window a few commits in all, each acknowledging only what it committed."""
    msgs = _messages(workload, 25)
    n = len(msgs)
    none = _window_run(tmp_path / "none", 0, msgs, oracle, pause=0.002)
    wide = _window_run(tmp_path / "wide", 1000, msgs, oracle, pause=0.002)
    assert none["commits"] > n // 3, none
    assert wide["commits"] <= 6, wide
    assert max(wide["acks"]) < n  # nothing acknowledged before its commit


def test_rings_empty_for_commit_idle_ms_end_the_window(tmp_path, workload, oracle):
    """A 5 s window, messages 50 ms apart: with ``commit_idle_ms`` 10 a message is committed
    once the ring stayed empty 10 ms (about one commit per message); with it off, the window
    groups them (transactions end only at their size, 128 KiB doubling after a boot)."""
    msgs = _messages(workload, 50)
    n = len(msgs)
    assert n >= 40
    idle = _window_run(tmp_path / "idle", 5000, msgs, oracle, pause=0.05, idle_ms=10)
    off = _window_run(tmp_path / "off", 5000, msgs, oracle, pause=0.05, idle_ms=5000)
    assert idle["commits"] >= n // 2, idle
    assert off["commits"] <= 8, off
    assert idle["acks"][n // 2] > off["acks"][n // 2], (idle, off)  # acknowledged sooner


def test_a_stop_message_ends_the_window(tmp_path, workload, oracle):
    """A window far longer than the test: the stop message ends it, and the worker commits
    everything it took before it exits."""
    run = _window_run(tmp_path, 9_000, _messages(workload, 100), oracle, stop_at_once=True)
    # ~5.5 s here with or without a window (closing the Kafka clients without a broker); a
    # window that the stop did not end would add its 9 s
    assert run["stop_s"] < 9, run
