"""The document log of format 5 (store.py): each commit's documents appended as one
``doc_log`` record, checkpointed into ``views`` (sorted putmulti and deletes, the log
dropped) in the transaction of a batch; every reader sees ``views`` with the log overlaid:
the worker (`Batch.get_doc`), `Shard.documents`/`stat`, `read_views`, `Snapshot` (the
reshard) and query.py (its own index of the log, read incrementally)."""

from __future__ import annotations

import multiprocessing
import random

import lmdb
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.changelog import CapturingBatch
from aggregator.doc_codec import pack_record, unpack_record
from aggregator.query import Views
from aggregator.routing import SLOTS
from aggregator.store import (
    DOC_LOG_EPOCH,
    Shard,
    ShardError,
    doc_log_rows,
    pack_doc_log,
    read_views,
    shard_path,
    view_key,
)
from tests import test_store

from .support.viewdata import VIEWS, lmdb_key, shard_of

_commit, _table = test_store.commit, test_store.table
shard = test_store.shard  # the same fixture: a shard in each LMDB mode (pwrite, writemap)


def dk(slot: int, n: int, vid: int = 0) -> bytes:
    return view_key(slot.to_bytes(2, "big"), vid, f"k{n}")


def rec(n: int, doc=True) -> dict:
    return {"v": n, "d": {"n": n} if doc else None, "s": {"src": [n, None]}}


def _overlaid(shard: Shard) -> dict[bytes, dict]:
    """Every stored record through the snapshot (what the reshard reads), in key order."""
    snap = shard.snapshot()
    try:
        out = {bytes(k): unpack_record(v) for k, v in snap.rows("views")}
        assert list(out) == sorted(out)
        assert snap.entries("views") == len(out) == snap.entries_of()["views"]
        for k, r in out.items():
            assert unpack_record(snap.get("views", k)) == r
        return out
    finally:
        snap.close()


def test_a_commit_logs_one_record_and_a_checkpoint_moves_the_documents(shard):
    _commit(shard, lambda b: (b.put_doc(dk(3, 1), rec(1)), b.put_doc(dk(1, 2), rec(2))))
    log = _table(shard, "doc_log")
    assert list(log) == [(1).to_bytes(8, "big")]  # one record per commit, sequential key
    assert _table(shard, "views") == {}
    assert set(shard.doc_pending) == {dk(3, 1), dk(1, 2)}
    assert shard.doc_logged == len(log[(1).to_bytes(8, "big")])
    _commit(shard, lambda b: (b.put_doc(dk(3, 1), rec(3)), b.delete_doc(dk(1, 2))))
    assert list(_table(shard, "doc_log")) == [(1).to_bytes(8, "big"), (2).to_bytes(8, "big")]
    b = shard.begin()
    assert b.get_doc(dk(3, 1)) == rec(3) and b.get_doc(dk(1, 2)) is None
    assert b.doc_log_bytes == sum(map(len, _table(shard, "doc_log").values()))
    b.abort()
    assert _overlaid(shard) == {dk(3, 1): rec(3)}
    assert shard.stat()["views"] == 1
    assert _commit(shard, lambda b: b.checkpoint_docs()) == 2
    assert _table(shard, "doc_log") == {} and shard.doc_pending == {}
    assert {k: unpack_record(v) for k, v in _table(shard, "views").items()} == \
        {dk(3, 1): rec(3)}
    assert shard.get_meta(DOC_LOG_EPOCH.decode()) == 1
    _commit(shard, lambda b: b.put_doc(dk(1, 2), rec(4)))  # the log starts again
    assert list(_table(shard, "doc_log")) == [(1).to_bytes(8, "big")]
    assert _overlaid(shard) == {dk(1, 2): rec(4), dk(3, 1): rec(3)}
    shard.reopen()  # the log read back from the file
    assert shard.doc_log_last == 1 and set(shard.doc_pending) == {dk(1, 2)}
    b = shard.begin()
    assert b.get_doc(dk(1, 2)) == rec(4) and b.get_doc(dk(3, 1)) == rec(3)
    b.abort()


def test_documents_logged_after_a_checkpoint_in_the_same_transaction(shard):
    _commit(shard, lambda b: (b.put_doc(dk(1, 1), rec(1)), b.put_doc(dk(1, 2), rec(1))))

    def batch(b):
        b.put_doc(dk(1, 1), rec(2))
        b.delete_doc(dk(1, 3))  # never stored: a no-op delete
        assert b.checkpoint_docs() == 3
        assert b.get_doc(dk(1, 1)) == rec(2)  # from views now
        b.put_doc(dk(1, 2), rec(3))
        assert b.doc_log_bytes > 0
    _commit(shard, batch)
    assert list(shard.doc_pending) == [dk(1, 2)]
    assert _overlaid(shard) == {dk(1, 1): rec(2), dk(1, 2): rec(3)}
    shard.reopen()
    assert shard.doc_log_last == 1 and _overlaid(shard) == {dk(1, 1): rec(2), dk(1, 2): rec(3)}


def test_an_aborted_batch_leaves_log_and_views_as_they_were(shard):
    _commit(shard, lambda b: b.put_doc(dk(1, 1), rec(1)))
    logged = shard.doc_logged
    b = shard.begin()
    b.put_doc(dk(1, 1), rec(9))
    b.put_doc(dk(2, 2), rec(9))
    b.checkpoint_docs()
    b.abort()
    assert shard.doc_logged == logged and list(shard.doc_pending) == [dk(1, 1)]
    assert _table(shard, "views") == {} and len(_table(shard, "doc_log")) == 1
    assert shard.get_meta(DOC_LOG_EPOCH.decode()) is None
    b = shard.begin()
    assert b.get_doc(dk(1, 1)) == rec(1) and b.get_doc(dk(2, 2)) is None
    b.abort()


def test_readers_see_the_log_overlaid(shard, tmp_path):
    shard.put_meta(views=["a", "b"])
    _commit(shard, lambda b: (b.put_doc(dk(2, 1), rec(1)), b.put_doc(dk(2, 2), rec(2)),
                              b.put_doc(dk(5, 3, vid=1), rec(3)), b.checkpoint_docs()))
    # updated, deleted, new, a stored tombstone record ("d": None), a new key between
    _commit(shard, lambda b: (b.put_doc(dk(2, 1), rec(4)), b.delete_doc(dk(2, 2)),
                              b.put_doc(dk(3, 9), rec(5)), b.put_doc(dk(5, 3, vid=1),
                                                                   rec(6, doc=False)),
                              b.put_doc(dk(0, 7), rec(7))))
    want = {dk(0, 7): rec(7), dk(2, 1): rec(4), dk(3, 9): rec(5), dk(5, 3, vid=1): rec(6, False)}
    assert _overlaid(shard) == want
    assert shard.stat()["views"] == 4
    assert {(v, k): r for v, k, r in shard.documents(["a", "b"])} == \
        {("a", "k7"): rec(7), ("a", "k1"): rec(4), ("a", "k9"): rec(5), ("b", "k3"): rec(6, False)}
    snap = shard.snapshot()
    try:
        assert [k[3:] for k in snap.view_keys(0, None, 10)] == [b"k7", b"k1", b"k9"]
        assert [k[3:] for k in snap.view_keys(0, dk(0, 7), 1)] == [b"k1"]
        assert list(snap.view_keys(1, None, 10)) == []  # a tombstone record is not listed
        assert [bytes(k) for k, _ in snap.rows("views", b"\0\2")] == [dk(2, 1)]
        assert snap.get("views", dk(2, 2)) is None
    finally:
        snap.close()


def test_fold_and_the_writers_that_bypass_the_log(shard):
    """Cluster mode writes documents straight into views (CapturingBatch): it refuses a
    shard with a non-empty log, which `fold_doc_log` checkpoints."""
    _commit(shard, lambda b: b.put_doc(dk(1, 1), rec(1)))
    b = CapturingBatch(shard)
    with pytest.raises(ShardError, match="non-empty log"):
        b.put_doc(dk(1, 2), rec(1))
    b.abort()
    assert shard.fold_doc_log() == 1 and shard.fold_doc_log() == 0
    assert _table(shard, "doc_log") == {} and shard.doc_pending == {}
    b = CapturingBatch(shard)
    b.put_doc(dk(1, 2), rec(2))
    b.delete_doc(dk(1, 1))
    assert [(c, k) for c, k, _ in b.log] == [(1, dk(1, 2)), (1, dk(1, 1))]
    b.commit()
    assert _table(shard, "doc_log") == {}
    assert {k: unpack_record(v) for k, v in _table(shard, "views").items()} == {dk(1, 2): rec(2)}


def test_log_records_pack_keys_and_records(shard):
    rng = random.Random(3)
    docs = {dk(rng.randrange(9), i): rec(i) for i in range(300)}
    gone = [dk(1, 10_000 + i) for i in range(5)]

    def batch(b):
        for k, r in docs.items():
            b.put_doc(k, r)
        for k in gone:
            b.delete_doc(k)
    _commit(shard, batch)
    (value,) = _table(shard, "doc_log").values()
    packed = {k: pack_record(r, None) for k, r in docs.items()}
    assert value == pack_doc_log({**{k: shard.doc_pending[k] for k in docs},
                                  **dict.fromkeys(gone)})
    assert {k: unpack_record(v) for k, v in shard.doc_pending.items() if v is not None} == \
        {k: unpack_record(v) for k, v in packed.items()}
    with shard.env.begin() as txn:
        logged, last, n = doc_log_rows(txn, shard.db["doc_log"])
    assert logged == shard.doc_pending and last == 1 and n == len(value) == shard.doc_logged


# ---- random operation sequences against a model -----------------------------------------------

_OPS = st.lists(st.tuples(st.sampled_from(["batch", "batch", "batch", "abort", "reopen"]),
                          st.lists(st.tuples(st.integers(0, 4), st.integers(0, 9),
                                             st.integers(-2, 30)), max_size=6),
                          st.sampled_from([None, "before", "after"])),
                max_size=25)


@pytest.mark.parametrize("writemap", [False, True], ids=["pwrite", "writemap"])
@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_random_batches_checkpoints_aborts_and_reopens(tmp_path_factory, writemap, ops):
    """Any sequence of batches of puts and deletes (n < 0: delete; 0: a tombstone record),
    some with a checkpoint before or after more of them, aborted batches and reopens (a
    kill: only the file is left) reads as a model dict of the committed documents, through
    the batch, the snapshot and the documents listing."""
    def open_shard(path):
        return Shard(path, map_size=16 << 20, sync=False, writemap=writemap)
    s = open_shard(tmp_path_factory.mktemp("doclog") / "shard-0")
    s.put_meta(views=["a"])
    model: dict[bytes, dict] = {}
    try:
        for op, docs, ckpt in ops:
            if op == "reopen":
                s.close()
                s = open_shard(s.path)
                continue
            want = dict(model)
            b = s.begin()
            for i, (slot, n, v) in enumerate(docs):
                if i == len(docs) // 2 and ckpt == "before":
                    b.checkpoint_docs()
                key = dk(slot, n)
                if v < 0:
                    b.delete_doc(key)
                    want.pop(key, None)
                else:
                    b.put_doc(key, rec(v, doc=v != 0))
                    want[key] = rec(v, doc=v != 0)
            if ckpt == "after":
                b.checkpoint_docs()
            assert {k: b.get_doc(k) for k in map(lambda d: dk(d[0], d[1]), docs)} == \
                {k: want.get(k) for k in map(lambda d: dk(d[0], d[1]), docs)}
            if op == "abort":
                b.abort()
                continue
            b.commit()
            model = want
            assert _overlaid(s) == dict(sorted(model.items()))
            with s.env.begin() as txn:
                logged, _, n = doc_log_rows(txn, s.db["doc_log"])
            assert logged == s.doc_pending and n == s.doc_logged
        b = s.begin()
        assert {k: b.get_doc(k) for k in model} == model
        b.abort()
        assert [(k, r) for _, k, r in s.documents(["a"])] == \
            [(k[3:].decode(), r) for k, r in sorted(model.items())]
    finally:
        s.close()


def test_map_full_in_a_checkpoint_keeps_nothing(tmp_path):
    """A checkpoint that does not fit rolls back with its batch: the log, the documents and
    the shard's in-memory state are those of the commit before, also after a reopen."""
    s = Shard(tmp_path / "s", map_size=1 << 20, max_map_size=1 << 20, sync=False)
    big = {"x": "y" * 300}
    try:
        n = 0
        while True:
            n += 1
            assert n < 400
            _commit(s, lambda b: b.put_doc(dk(7, 10 ** 7 + n), rec(n)))  # a non-empty log
            before, pending = _overlaid(s), dict(s.doc_pending)
            try:
                _commit(s, lambda b: ([b.put_doc(dk(n % 50, n * 40 + j),
                                                 {"v": 1, "d": big, "s": {}})
                                       for j in range(40)], b.checkpoint_docs()))
            except lmdb.MapFullError:
                break
        assert s.doc_pending == pending and len(pending) == 1 and _overlaid(s) == before
        s.close()
        s = Shard(tmp_path / "s", map_size=1 << 20, max_map_size=1 << 20, sync=False)
        assert s.doc_pending == pending and _overlaid(s) == before
    finally:
        s.close()


# ---- query.py reads the log next to its writer ------------------------------------------------


def _writer(path, conn) -> None:
    """A worker's shard in another process: ("put", {key: record or None}, checkpoint?)."""
    s = Shard(path, map_size=16 << 20, max_map_size=256 << 20, sync=False)
    s.check_layout(shard=int(str(path).rsplit("-", 1)[1]), workers=2, slots=SLOTS)
    s.put_meta(views=list(VIEWS))
    conn.send("ready")
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            _, docs, ckpt = msg

            def batch(b):
                for k, r in docs.items():
                    if r is None:
                        b.delete_doc(k)
                    else:
                        b.put_doc(k, r)
                if ckpt:
                    b.checkpoint_docs()
            _commit(s, batch)
            conn.send((s.doc_logged, len(s.doc_pending)))
    finally:
        s.close()


def test_query_reads_documents_and_pages_with_a_pending_log(tmp_path):
    """The HTTP/CLI reader (query.py) sees exactly the committed documents, with a pending
    log (updates, deletes, new keys, tombstone records), after checkpoints and across a
    paged walk that checkpoints in the middle; its index reads only new log records."""
    ctx = multiprocessing.get_context("spawn")
    writers = []
    for i in range(2):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_writer, args=(shard_path(tmp_path, i), child), daemon=True)
        p.start()
        assert parent.recv() == "ready"
        writers.append((p, parent))
    model: dict[tuple[str, str], dict] = {}
    rng = random.Random(7)

    def step(n: int, ckpt: bool = False, dels: float = 0.2, tombs: float = 0.05) -> list:
        per: list[dict] = [{}, {}]
        for _ in range(n):
            view, key = rng.choice(VIEWS), f"k{rng.randrange(400)}"
            r = rng.random()
            value = None if r < dels else rec(rng.randrange(1, 99), doc=r >= dels + tombs)
            per[shard_of(key, 2)][lmdb_key(VIEWS.index(view), key)] = value
            if value is None:
                model.pop((view, key), None)
            else:
                model[(view, key)] = value
        for (_, conn), docs in zip(writers, per):
            conn.send(("put", docs, ckpt))
        return [conn.recv() for _, conn in writers]

    def check(views: Views) -> None:
        for view in VIEWS:
            live = {k for (v, k), r in model.items() if v == view and r["d"] is not None}
            for key in [k for (v, k) in model if v == view] + ["k9999"]:
                got = views.get(view, key)
                r = model.get((view, key))
                if r is None or r["d"] is None:
                    assert got is None, (view, key)
                else:
                    assert (got["version"], got["document"]) == (r["v"], r["d"]), (view, key)
            keys, cursor = [], None
            while True:
                page, cursor = views.list_keys(view, 7, cursor)
                keys += page
                if cursor is None:
                    break
            assert len(keys) == len(set(keys)) and set(keys) == live, view
            order = [lmdb_key(VIEWS.index(view), k) for k in keys]
            by_shard = [[k for k in order if shard_of(k[3:].decode(), 2) == i] for i in (0, 1)]
            assert by_shard[0] + by_shard[1] == order and all(s == sorted(s) for s in by_shard)
        # `aggregator stats`: entries of views with the log overlaid (stored records,
        # tombstone records included), from the reader's index
        assert [s["entries"]["views"] for s in views.stats()] == [
            sum(1 for (v, k) in model if shard_of(k, 2) == i) for i in (0, 1)]

    try:
        with Views(tmp_path, 2, VIEWS) as views:
            step(300)  # everything in the log
            check(views)
            idx = views.shards[0].doc_log
            assert idx.where and idx.epoch == 0
            last = idx.last
            step(100)
            check(views)
            assert idx.last == last + 1  # one more record read
            assert step(100, ckpt=True) == [(0, 0), (0, 0)]  # the log emptied
            check(views)
            assert idx.epoch == 1 and not idx.where  # the checkpoint emptied the log
            step(150)
            check(views)
            # a walk that checkpoints half way: every key that lived throughout, once
            page, cursor = views.list_keys("order", 5)
            stable = {k for (v, k), r in model.items() if v == "order" and r["d"] is not None}
            step(200, ckpt=True, dels=0.0, tombs=0.0)
            step(50, dels=0.0, tombs=0.0)  # log key 1 again, in a new epoch
            keys = list(page)
            while cursor is not None:
                page, cursor = views.list_keys("order", 5, cursor)
                keys += page
            assert len(keys) == len(set(keys)) and stable <= set(keys)
            assert (idx.epoch, idx.last) == (2, 1)
            check(views)
    finally:
        for p, conn in writers:
            conn.send(None)
            p.join(30)


def test_a_format4_shard_without_a_doc_log_reads_as_it_is(tmp_path):
    """A format-4 shard (every document in views, no doc_log database) opens as it is, is
    stamped 5, and its documents read through every reader; the next batch logs."""
    path = shard_path(tmp_path, 0)
    s = Shard(path, sync=False)
    s.check_layout(shard=0, workers=1, slots=SLOTS)
    s.put_meta(views=list(VIEWS), format=4)
    with s.env.begin(write=True) as txn:
        txn.put(lmdb_key(0, "old"), msgpack.packb(rec(3)), db=s.db["views"])
        txn.drop(s.db["doc_log"], delete=True)
    s.close()
    with Views(tmp_path, 1, VIEWS) as views:
        assert views.get("customer", "old")["version"] == 3
        assert views.list_keys("customer") == (["old"], None)
    r = Shard(path, readonly=True)
    assert "doc_log" not in r.db and r.doc_pending == {}
    assert [k for _, k, _ in r.documents(VIEWS)] == ["old"] and r.stat()["views"] == 1
    r.close()
    s = Shard(path, sync=False)
    s.check_layout(shard=0, workers=1, slots=SLOTS)
    assert s.get_meta("format") == 6
    b = s.begin()
    assert b.get_doc(lmdb_key(0, "old")) == rec(3)
    b.put_doc(lmdb_key(0, "new"), rec(4))
    b.commit()
    assert len(_table(s, "doc_log")) == 1
    s.close()
    assert read_views(tmp_path, VIEWS)["customer"] == {"old": {"n": 3}, "new": {"n": 4}}


def test_read_views_overlays_the_log(tmp_path):
    """What the bench's oracle check and the tools read: the log's updates, deletes and
    tombstone records over views."""
    s = Shard(shard_path(tmp_path, 0), sync=False)
    s.put_meta(views=["a", "b"])
    _commit(s, lambda b: (b.put_doc(dk(2, 1), rec(1)), b.put_doc(dk(2, 2), rec(2)),
                          b.put_doc(dk(4, 3, vid=1), rec(3)), b.checkpoint_docs()))
    _commit(s, lambda b: (b.put_doc(dk(2, 1), rec(4)), b.delete_doc(dk(2, 2)),
                          b.put_doc(dk(4, 3, vid=1), rec(5, doc=False)),
                          b.put_doc(dk(1, 6, vid=1), rec(6))))
    s.close()
    assert read_views(tmp_path, ["a", "b"]) == {"a": {"k1": {"n": 4}}, "b": {"k6": {"n": 6}}}
