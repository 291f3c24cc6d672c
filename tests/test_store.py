"""The LMDB shard (store.py) on real LMDB files: layout, every named database, MAP_FULL."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap

import lmdb
import msgpack
import pytest

from aggregator.store import (
    DEDUP_POOL,
    FORMAT_VERSION,
    LOCK_FILE_BYTES,
    SEQ_ROW,
    SLOTS_ALL,
    Shard,
    ShardError,
    offset_key,
    parse_offset_key,
    read_views,
    shard_path,
    storage_errno,
    storage_message,
    view_key,
)

KiB = 1 << 10


def sk(slot: int, n: int) -> bytes:
    """A dedup key: 2-byte slot + 16-byte identity hash."""
    return slot.to_bytes(2, "big") + n.to_bytes(16, "big")


def gk(slot: int, n: int) -> bytes:
    """A gate key: 2-byte slot + 16-byte gate hash."""
    return slot.to_bytes(2, "big") + (n + 1000).to_bytes(16, "big")


@pytest.fixture(params=[False, True], ids=["pwrite", "writemap"])
def shard(tmp_path, request):
    s = Shard(tmp_path / "shard-0", map_size=16 << 20, max_map_size=64 << 20, sync=False,
              writemap=request.param)
    yield s
    s.close()


def commit(shard: Shard, fn):
    """`fn(batch)` in one transaction, committed (or aborted if it raises); its result."""
    b = shard.begin()
    try:
        out = fn(b)
        b.commit()
    except BaseException:
        b.abort()
        raise
    return out


def table(shard: Shard, name: str) -> dict[bytes, bytes]:
    """One database's rows as they are in LMDB (no log overlaid)."""
    with shard.env.begin(db=shard.db[name]) as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor()}


# ---- layout -----------------------------------------------------------------------------


def test_check_layout_stamps_a_new_shard(shard):
    assert shard.get_meta("format") is None
    shard.check_layout(shard=0, workers=2, slots=4096)
    assert shard.get_meta("format") == FORMAT_VERSION
    assert (shard.get_meta("shard"), shard.get_meta("workers"), shard.get_meta("slots")) == (
        0, 2, 4096)
    shard.check_layout(shard=0, workers=2, slots=4096)  # same layout: accepted again


@pytest.mark.parametrize(("shard_i", "workers", "slots"), [(0, 3, 4096), (1, 2, 4096),
                                                           (0, 2, 1024)])
def test_check_layout_refuses_another_layout(shard, shard_i, workers, slots):
    shard.check_layout(shard=0, workers=2, slots=4096)
    with pytest.raises(ShardError, match="changing the worker count"):
        shard.check_layout(shard=shard_i, workers=workers, slots=slots)


def test_check_layout_refuses_another_format(shard):
    shard.check_layout(shard=0, workers=1, slots=4096)
    shard.put_meta(format=FORMAT_VERSION + 1)
    with pytest.raises(ShardError, match="data format"):
        shard.check_layout(shard=0, workers=1, slots=4096)


@pytest.mark.parametrize("fmt", [2, 3, 4])
def test_an_older_shard_is_stamped_and_read_as_it_is(tmp_path, fmt):
    """Format 3 only added the "j" form of views records, format 4 the sequence log, format
    5 the document log, format 6 logged change blobs: a format-2, 3 or 4 shard (seq rows
    only in seq, documents only in views, no log database) opens as it is, is stamped 6 (an
    older build then refuses it) and needs no migration."""
    from aggregator.reshard import needs_migration
    from aggregator.store import FORMATS_IN_PLACE, view_key

    assert FORMAT_VERSION == 6 and FORMATS_IN_PLACE == (2, 3, 4, 5)
    s = Shard(tmp_path / "shard-0", sync=False)
    s.check_layout(shard=0, workers=1, slots=4096)
    s.put_meta(format=fmt)
    dkey = view_key(b"\0\1", 0, "k")
    with s.env.begin(write=True) as txn:  # a record and a seq row as format 2/3 wrote them
        txn.put(dkey, msgpack.packb({"v": 3, "d": {"a": [1, 2]}, "s": {"src": [3, None]}}),
                db=s.db["views"])
        txn.put(gk(1, 1), SEQ_ROW.pack(9, 0, 2), db=s.db["seq"])
        txn.put(b"seq_topics", msgpack.packb(["t"]), db=s.db["meta"])
        txn.drop(s.db["seq_log"], delete=True)  # older builds had no such database
        txn.drop(s.db["doc_log"], delete=True)  # (format 4 had seq_log, not doc_log)
    s.close()
    assert not needs_migration(tmp_path)
    s = Shard(tmp_path / "shard-0", sync=False)
    s.check_layout(shard=0, workers=1, slots=4096)
    assert s.get_meta("format") == FORMAT_VERSION
    b = s.begin()
    try:
        assert b.get_doc(dkey) == {"v": 3, "d": {"a": [1, 2]}, "s": {"src": [3, None]}}
        assert b.get_seq(gk(1, 1)) == [9, "t", 2]
    finally:
        b.abort()
    s.close()


def test_layout_survives_reopen(tmp_path):
    s = Shard(tmp_path / "s", sync=False)
    s.check_layout(shard=0, workers=4, slots=4096)
    s.close()
    s = Shard(tmp_path / "s", sync=False)
    try:
        with pytest.raises(ShardError):
            s.check_layout(shard=0, workers=2, slots=4096)
        s.check_layout(shard=0, workers=4, slots=4096)
    finally:
        s.close()


def test_meta_round_trip_and_default(shard):
    assert shard.get_meta("nope", 7) == 7
    shard.put_meta(a=[1, "x"], b={"k": None})
    assert shard.get_meta("a") == [1, "x"]
    assert shard.get_meta("b") == {"k": None}
    commit(shard, lambda b: b.put_meta("a", 3))
    assert shard.get_meta("a") == 3


# ---- documents ----------------------------------------------------------------------------


def test_documents_put_get_delete(shard):
    k1 = view_key(b"\x00\x05", 0, "c-1")
    k2 = view_key(b"\x0f\xff", 1, "o-1")
    rec1 = {"v": 1, "d": {"name": "Zoë", "n": [1, 2]}, "s": {"/src": [3, "t"]}}
    rec2 = {"v": 2, "d": {"x": b"\x00bytes"}, "s": {}}

    def write(b):
        assert b.get_doc(k1) is None
        b.put_doc(k1, rec1)
        b.put_doc(k2, rec2)
        assert b.get_doc(k1) == rec1  # the transaction sees its own writes

    commit(shard, write)
    b = shard.begin()
    assert b.get_doc(k1) == rec1 and b.get_doc(k2) == rec2
    b.delete_doc(k2)
    assert b.get_doc(k2) is None
    b.commit()
    assert list(shard.documents(["customer", "order"])) == [("customer", "c-1", rec1)]


def test_view_key_layout():
    assert view_key(b"\x01\x02", 3, "ké") == b"\x01\x02\x03" + "ké".encode()


def _stamp_views(shard, views):
    shard.put_meta(views=views)


def test_read_views_skips_tombstones_and_reads_every_shard(tmp_path):
    views = ["customer", "order"]
    for i, (key, doc) in enumerate([("c-1", {"a": 1}), ("c-2", {"b": 2})]):
        s = Shard(shard_path(tmp_path, i), sync=False)
        s.check_layout(shard=i, workers=2, slots=4096)
        _stamp_views(s, views)

        def write(b, key=key, doc=doc, i=i):
            b.put_doc(view_key(b"\x00\x00", 0, key), {"v": 1, "d": doc, "s": {}})
            tomb = {"v": 3, "d": None, "s": {"x": [1, None]}}
            b.put_doc(view_key(b"\x00\x01", 1, f"o-{i}"), tomb)

        commit(s, write)
        s.close()
    got = read_views(tmp_path, views)
    assert got == {"customer": {"c-1": {"a": 1}, "c-2": {"b": 2}}, "order": {}}


def test_read_views_uses_the_stored_view_ids(tmp_path):
    # The shard numbered its views in the order of an earlier config; a caller listing them
    # in another order must still get each document under its own view.
    s = Shard(shard_path(tmp_path, 0), sync=False)
    _stamp_views(s, ["order", "customer"])
    doc = {"v": 1, "d": {"o": 1}, "s": {}}
    commit(s, lambda b: b.put_doc(view_key(b"\x00\x00", 0, "o-1"), doc))
    s.close()
    want = {"customer": {}, "order": {"o-1": {"o": 1}}}
    assert read_views(tmp_path, ["customer", "order"]) == want


def test_read_views_of_an_empty_dir(tmp_path):
    assert read_views(tmp_path, ["a"]) == {"a": {}}


# ---- dedup index --------------------------------------------------------------------------


def test_mark_seen_and_seen(shard):
    def write(b):
        assert not b.seen(sk(1, 1))
        b.mark_seen(sk(1, 1), 0)
        assert b.seen(sk(1, 1))
        assert not b.seen(sk(2, 1))  # same hash in another slot is another key

    commit(shard, write)
    b = shard.begin()
    assert b.seen(sk(1, 1))
    b.abort()


def test_dedup_entries_order_oldest_generation_first(shard):
    def write(b):
        b.mark_seen(sk(9, 3), 2)
        b.mark_seen(sk(0, 7), 0)
        b.mark_seen(sk(5, 1), 1)
        b.mark_seen(sk(1, 2), 0)
        b.mark_seen(sk(3, 4), 256)  # generation whose big-endian bytes hold 0x00

    commit(shard, write)
    got = list(shard.dedup_entries())
    assert [g for g, _ in got] == [0, 0, 1, 2, 256]
    assert all(len(h) == 16 for _, h in got)  # the identity hash, without the slot
    assert {h for g, h in got if g == 0} == {sk(0, 7)[2:], sk(1, 2)[2:]}
    assert got[-1] == (256, sk(3, 4)[2:])


def test_drop_generations_removes_only_up_to(shard):
    def write(b):
        for g in range(5):
            for j in range(3):
                b.mark_seen(sk(j, g * 10 + j), g)

    commit(shard, write)
    b = shard.begin()
    assert b.drop_generations(1) == 6
    for g in range(5):
        for j in range(3):
            assert b.seen(sk(j, g * 10 + j)) == (g > 1), (g, j)
    assert b.drop_generations(1) == 0  # nothing left at or below 1
    b.commit()
    assert sorted({g for g, _ in shard.dedup_entries()}) == [2, 3, 4]
    assert shard.stat()["dedup"] == 9
    assert [g for g, _ in shard.dedup_index] == [2, 3, 4]


def test_drop_generations_rolled_back_keeps_them(shard):
    commit(shard, lambda b: [b.mark_seen(sk(0, i), i % 3) for i in range(30)])
    b = shard.begin()
    assert b.drop_generations(10) == 30
    b.abort()
    assert shard.stat()["dedup"] == 30
    assert [g for g, _ in shard.dedup_index] == [0, 1, 2]
    commit(shard, lambda b: b.drop_generations(10))
    assert list(shard.dedup_entries()) == []
    assert shard.stat()["dedup"] == 0
    # the database of a dropped generation is used again by a later one
    commit(shard, lambda b: b.mark_seen(sk(1, 1), DEDUP_POOL))
    b = shard.begin()
    assert b.seen(sk(1, 1)) and not b.seen(sk(0, 0))
    b.abort()


def test_drop_keeps_an_id_marked_again_in_a_newer_generation(shard):
    def write(b):
        b.mark_seen(sk(0, 1), 0)
        b.mark_seen(sk(0, 1), 3)

    commit(shard, write)
    commit(shard, lambda b: b.drop_generations(0))
    b = shard.begin()
    assert b.seen(sk(0, 1))
    b.abort()
    assert list(shard.dedup_entries()) == [(3, sk(0, 1)[2:])]


def test_seal_moves_slices_in_slot_order_and_lookups_follow(shard):
    ids = [sk(s, i) for s in (5, 1, 300, 2, 7) for i in range(40)]
    commit(shard, lambda b: [b.mark_seen(k, 4) for k in ids])
    commit(shard, lambda b: b.mark_seen(sk(9, 9), 5))
    moved = []
    while True:
        b = shard.begin()
        moved.append(b.seal_dedup(5, 50))
        for k in ids:
            assert b.seen(k)
        assert not b.seen(sk(3, 3))
        b.commit()
        if shard.dedup_index[0][1] == SLOTS_ALL:
            break
    assert moved == [80, 40, 40, 40, 0] or sum(moved) == 200, moved
    assert sum(moved) == 200
    assert shard.dedup_index == [[4, SLOTS_ALL], [5, 0]]  # the current one stays hot
    b = shard.begin()
    assert b.seal_dedup(5, 50) == 0
    b.mark_seen(sk(0, 99), 4)  # a late id of a sealed generation: found where it went
    assert b.seen(sk(0, 99))
    b.commit()
    assert sorted(h for g, h in shard.dedup_entries() if g == 4) == \
        sorted([k[2:] for k in ids] + [sk(0, 99)[2:]])


def test_sealed_ids_take_fewer_bytes(tmp_path):
    s = Shard(tmp_path / "s", sync=False)
    rng = random.Random(3)
    try:
        for _ in range(20):
            commit(s, lambda b: [b.mark_seen(rng.randbytes(18), 0) for _ in range(2000)])
        ids, hot = s.dedup_bytes()
        while True:
            b = s.begin()
            n = b.seal_dedup(1, 10_000)
            b.commit()
            if not n:
                break
        ids2, sealed = s.dedup_bytes()
        assert ids == ids2 == 40_000
        assert sealed / ids <= 19.5 < hot / ids, (hot / ids, sealed / ids)
    finally:
        s.close()


# ---- sequences and parked events ---------------------------------------------------------


def test_seq_round_trip(shard):
    g = gk(7, 1)
    commit(shard, lambda b: b.put_seq(g, 41, "shop.orders", 3))
    b = shard.begin()
    assert b.get_seq(g) == [41, "shop.orders", 3]
    assert b.get_seq(gk(7, 2)) is None
    b.abort()
    commit(shard, lambda b: (b.put_seq(gk(7, 3), -1, "", -1), b.put_seq(gk(7, 4), 2, "t2", 0)))
    assert shard.seq_topics == ["shop.orders", "t2"]
    b = shard.begin()
    assert b.get_seq(gk(7, 3)) == [-1, "", -1]  # no topic known (a gap expired alone)
    assert b.get_seq(gk(7, 4)) == [2, "t2", 0]
    assert b.txn.get(gk(7, 4), db=shard.db["seq"]) is None  # logged, not checkpointed
    b.checkpoint_seqs()
    raw = b.txn.get(gk(7, 4), db=shard.db["seq"])
    assert len(raw) == SEQ_ROW.size == 14
    b.abort()


def test_seq_topic_table_rolled_back_with_the_batch(shard):
    b = shard.begin()
    b.put_seq(gk(1, 1), 5, "new.topic", 0)
    b.abort()
    assert shard.seq_topics == []
    commit(shard, lambda b: b.put_seq(gk(1, 1), 5, "other", 1))
    assert shard.seq_topics == ["other"]


def test_park_unpark_parked_of(shard):
    g1, g2 = gk(1, 1), gk(1, 2)
    rec = [4, 0, 17, b"k", b"value", [["ce_id", b"x"]], 5, 1]

    def write(b):
        b.park(g1, 5, 100.5, rec)
        b.park(g1, 3, 100.0, rec)
        b.park(g1, 256, 101.0, rec)  # 0x00 bytes in the sequence
        b.park(g2, 4, 99.0, rec)

    commit(shard, write)
    b = shard.begin()
    assert b.parked_of(g1) == [(3, 100.0), (5, 100.5), (256, 101.0)]
    assert b.parked_of(g2) == [(4, 99.0)]
    assert b.parked_of(gk(1, 3)) == []
    assert b.unpark(g1, 5) == rec
    assert b.unpark(g1, 5) is None
    assert b.unpark(g2, 3) is None
    assert b.parked_of(g1) == [(3, 100.0), (256, 101.0)]
    b.commit()
    assert shard.stat()["parked"] == 3


def test_parked_of_the_last_key_in_the_database(shard):
    g = b"\xff\xff" + b"\xff" * 16
    commit(shard, lambda b: b.park(g, 2, 1.0, [0]))
    b = shard.begin()
    assert b.parked_of(g) == [(2, 1.0)]
    assert b.parked_of(gk(0, 0)) == []
    b.abort()


# ---- offsets and links -------------------------------------------------------------------


@pytest.mark.parametrize("partition", [0, 1, 255, 256, 65536, 1 << 24, 2**31 - 1])
def test_offset_key_round_trip(partition):
    assert parse_offset_key(offset_key("shop.orders", partition)) == ("shop.orders", partition)


def test_offsets_round_trip(shard):
    offs = {("shop.orders", 0): 0, ("shop.orders", 256): 12, ("shop.orders", 1): -1,
            ("a", 0): 2**40, ("a.b-c_d", 65536): 7, ("shop.orders.x", 0): 9}

    def write(b):
        for (t, p), o in offs.items():
            b.put_offset(t, p, o)

    commit(shard, write)
    assert shard.offsets() == offs
    commit(shard, lambda b: b.put_offset("shop.orders", 0, 100))
    assert shard.offsets()[("shop.orders", 0)] == 100


def test_links_round_trip(shard):
    assert shard.links() == {}
    commit(shard, lambda b: (b.put_link(0, 5), b.put_link(256, 1), b.put_link(3, 2**40)))
    commit(shard, lambda b: b.put_link(0, 6))
    assert shard.links() == {0: 6, 256: 1, 3: 2**40}


# ---- outbox ----------------------------------------------------------------------------------


def test_outbox_several_targets(shard):
    assert shard.last_outbox_seq(0) == 0
    assert list(shard.outbox_after(0, 0)) == []

    def write(b):
        for target in (0, 1, 3, 256):
            for seq in range(1, 6):
                b.put_outbox(target, seq, msgpack.packb([target, seq]))

    commit(shard, write)
    for target in (0, 1, 3, 256):
        assert shard.last_outbox_seq(target) == 5
        got = list(shard.outbox_after(target, 2))
        assert got == [(s, msgpack.packb([target, s])) for s in (3, 4, 5)]
        assert list(shard.outbox_after(target, 5)) == []
        assert [s for s, _ in shard.outbox_after(target, 0)] == [1, 2, 3, 4, 5]
    for target in (2, 4, 255, 257):
        assert shard.last_outbox_seq(target) == 0
        assert list(shard.outbox_after(target, 0)) == []

    b = shard.begin()
    assert b.prune_outbox(1, 3) == 3
    assert b.prune_outbox(1, 3) == 0
    assert b.prune_outbox(256, 99) == 5
    assert b.prune_outbox(2, 99) == 0
    b.commit()
    assert [s for s, _ in shard.outbox_after(1, 0)] == [4, 5]
    assert shard.last_outbox_seq(1) == 5
    assert shard.last_outbox_seq(256) == 0
    assert [s for s, _ in shard.outbox_after(0, 0)] == [1, 2, 3, 4, 5]  # neighbours intact
    assert [s for s, _ in shard.outbox_after(3, 0)] == [1, 2, 3, 4, 5]


def test_outbox_seq_order_is_numeric(shard):
    commit(shard, lambda b: [b.put_outbox(1, s, b"m%d" % s) for s in (255, 256, 1, 65536)])
    assert [s for s, _ in shard.outbox_after(1, 0)] == [1, 255, 256, 65536]
    assert shard.last_outbox_seq(1) == 65536
    assert [s for s, _ in shard.outbox_after(1, 255)] == [256, 65536]


# ---- transactions, MAP_FULL and growth ---------------------------------------------------


def test_abort_keeps_nothing(shard):
    b = shard.begin()
    b.put_doc(b"\x00\x00\x00k", {"v": 1, "d": {}, "s": {}})
    b.mark_seen(sk(0, 1), 0)
    b.put_offset("t", 0, 5)
    b.abort()
    b.abort()  # twice is harmless
    assert list(shard.documents(["v"])) == []
    assert shard.offsets() == {}
    assert list(shard.dedup_entries()) == []


def test_map_full_aborts_the_whole_transaction(tmp_path):
    s = Shard(tmp_path / "tiny", map_size=128 * KiB, max_map_size=128 * KiB, sync=False)
    try:
        commit(s, lambda b: (b.put_offset("t", 0, 1), b.mark_seen(sk(0, 0), 0)))
        before = s.stat()
        b = s.begin()
        with pytest.raises(lmdb.MapFullError):
            b.put_offset("t", 0, 2)
            b.mark_seen(sk(0, 1), 0)
            for i in range(2000):
                b.put_doc(view_key(b"\x00\x01", 0, f"k{i}"), {"v": 1, "d": "x" * 200, "s": {}})
            b.commit()
        b.abort()
        assert s.offsets() == {("t", 0): 1}
        assert list(s.documents(["v"])) == []
        assert [h for _, h in s.dedup_entries()] == [sk(0, 0)[2:]]
        after = s.stat()
        assert {k: after[k] for k in s.db} == {k: before[k] for k in s.db}
        assert s.grow() is False  # already at the maximum
        # still usable for a transaction that fits
        commit(s, lambda b: b.put_offset("t", 0, 3))
        assert s.offsets() == {("t", 0): 3}
    finally:
        s.close()


def test_grow_doubles_up_to_the_maximum(tmp_path):
    s = Shard(tmp_path / "g", map_size=64 * KiB, max_map_size=300 * KiB, sync=False)
    try:
        sizes = [s.env.info()["map_size"]]
        while s.grow():
            sizes.append(s.env.info()["map_size"])
        assert sizes == [64 * KiB, 128 * KiB, 256 * KiB, 300 * KiB]
        assert s.grow() is False
        # the grown map holds what the small one could not
        commit(s, lambda b: [b.put_doc(view_key(b"\x00\x01", 0, f"k{i}"),
                                       {"v": 1, "d": "x" * 200, "s": {}}) for i in range(400)])
        assert len(list(s.documents(["v"]))) == 400
    finally:
        s.close()


def test_map_full_then_grow_then_retry(tmp_path):
    s = Shard(tmp_path / "r", map_size=64 * KiB, max_map_size=1 << 20, sync=False)

    def big(b):
        for i in range(1500):
            b.put_doc(view_key(b"\x00\x01", 0, f"k{i}"), {"v": 1, "d": "x" * 100, "s": {}})

    try:
        assert _commit_growing(s, big) >= 1
        assert len(list(s.documents(["v"]))) == 1500
    finally:
        s.close()


def test_readonly_open_and_stat(tmp_path):
    s = Shard(tmp_path / "ro", sync=False)
    commit(s, lambda b: b.put_offset("t", 256, 5))
    s.close()
    r = Shard(tmp_path / "ro", readonly=True)
    try:
        assert r.offsets() == {("t", 256): 5}
        st = r.stat()
        assert st["offsets"] == 1 and st["views"] == 0
    finally:
        r.close()


# ---- data-disk errors ----------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "code"), [
    (lmdb.DiskError("mdb_txn_commit: No space left on device"), errno.ENOSPC),
    (lmdb.Error("mdb_txn_commit: Read-only file system"), errno.EROFS),
    (lmdb.Error("mdb_txn_commit: Disk quota exceeded"), errno.EDQUOT),
    (lmdb.Error("mdb_txn_commit: Input/output error"), errno.EIO),
    (lmdb.PanicError("mdb_txn_begin: MDB_PANIC: Update of meta page failed"), errno.EIO),
    (lmdb.ReadonlyError("/x: Permission denied"), errno.EACCES),
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EROFS, "Read-only file system"), errno.EROFS),
    (lmdb.MapFullError("mdb_put: MDB_MAP_FULL: Environment mapsize limit reached"), None),
    (lmdb.CorruptedError("mdb_get: MDB_CORRUPTED"), None),
    (lmdb.Error("mdb_txn_commit: Invalid argument"), None),
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (ValueError("no"), None),
])
def test_storage_errno(exc, code):
    assert storage_errno(exc) == code


def test_storage_message():
    assert storage_message(errno.ENOSPC, "/d/shard-0") == \
        "data disk full: /d/shard-0 (No space left on device)"
    assert storage_message(errno.EROFS, "/d/shard-1") == \
        "data disk read-only: /d/shard-1 (Read-only file system)"


def test_a_new_lock_file_is_allocated_before_lmdb_maps_it(tmp_path):
    """On a full disk LMDB's first write through the mapping of a sparse lock file is a
    SIGBUS; allocated first, the disk's answer is an error at open."""
    s = Shard(tmp_path / "s", map_size=1 << 20, sync=False)
    try:
        st = os.stat(tmp_path / "s" / "lock.mdb")
        assert st.st_size >= LOCK_FILE_BYTES
        assert st.st_blocks * 512 >= LOCK_FILE_BYTES  # not sparse
    finally:
        s.close()
    # an existing lock file is left as it is
    s = Shard(tmp_path / "s", map_size=1 << 20, sync=False)
    try:
        assert os.stat(tmp_path / "s" / "lock.mdb").st_ino == st.st_ino
        assert os.stat(tmp_path / "s" / "lock.mdb").st_size == st.st_size
    finally:
        s.close()


def test_reopen_keeps_the_data_and_the_grown_map(shard):
    commit(shard, lambda b: b.put_offset("t", 0, 7))
    assert shard.grow()
    size = shard.env.info()["map_size"]
    shard.reopen()
    assert shard.env.info()["map_size"] == size
    assert shard.offsets() == {("t", 0): 7}
    commit(shard, lambda b: b.put_offset("t", 0, 8))
    assert shard.offsets() == {("t", 0): 8}


# ---- WRITEMAP (service.lmdb_writemap) --------------------------------------------------------



def _commit_growing(shard, fill) -> int:
    """Apply `fill` in one transaction, growing the map after each MAP_FULL as the worker
    does (rolled back, grown, applied again); returns how many times it grew."""
    grows = 0
    while True:
        b = shard.begin()
        try:
            fill(b)
            b.commit()
            return grows
        except lmdb.MapFullError:
            b.abort()
            assert shard.grow()
            grows += 1

def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def _docs(b: object, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        b.put_doc(view_key(b"\x00\x01", 0, f"k{i}"), {"v": 1, "d": "x" * 100, "s": {}})


def test_writemap_allocates_the_map_at_open_and_before_each_grow(tmp_path):
    """With WRITEMAP LMDB ftruncates data.mdb to the map size (sparse) and stores through the
    mapping: the shard allocates the file's blocks up to the map size at open and before the
    map grows; MAP_FULL, grow and retry work as without it, and so does a reopen."""
    path = tmp_path / "w"
    s = Shard(path, map_size=64 * KiB, max_map_size=1 << 20, sync=True, writemap=True)
    try:
        assert s.env.flags()["writemap"]
        assert _allocated(path / "data.mdb") >= 64 * KiB
        grows = _commit_growing(s, lambda b: _docs(b, 1500))
        size = s.env.info()["map_size"]
        assert grows >= 1 and size > 64 * KiB
        assert _allocated(path / "data.mdb") >= size
        s.reopen()  # as after MDB_PANIC
        assert s.env.flags()["writemap"] and s.env.info()["map_size"] == size
        commit(s, lambda b: _docs(b, 10, 1500))
        assert len(list(s.documents(["v"]))) == 1510
    finally:
        s.close()
    # a shard written with WRITEMAP opens without it, and the other way round
    s = Shard(path, map_size=64 * KiB, max_map_size=1 << 20, sync=False)
    try:
        assert not s.env.flags()["writemap"]
        assert len(list(s.documents(["v"]))) == 1510
    finally:
        s.close()


@pytest.mark.parametrize("writemap", [False, True], ids=["pwrite", "writemap"])
def test_grow_ahead_grows_between_transactions_at_three_quarters(tmp_path, writemap):
    s = Shard(tmp_path / "a", map_size=256 * KiB, max_map_size=512 * KiB, sync=False,
              writemap=writemap)
    try:
        assert s.grow_ahead() is False  # nearly empty
        n = 0
        while (s.env.info()["last_pgno"] + 1) * s.psize * 4 < 256 * KiB * 3:
            commit(s, lambda b: _docs(b, 20, n))
            n += 20
        assert s.grow_ahead() is True
        assert s.env.info()["map_size"] == 512 * KiB
        if writemap:
            assert _allocated(tmp_path / "a" / "data.mdb") >= 512 * KiB
        assert s.grow_ahead() is False  # at the maximum: MAP_FULL will say so
    finally:
        s.close()


READER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from aggregator.store import Shard, SharedReader, offset_key, parse_offset_value

    path = Path(sys.argv[1])
    r = Shard(path, readonly=True, writemap=True)  # the flag is the writer's alone
    assert not r.env.flags()["writemap"]
    offsets = r.offsets()
    r.close()
    shared = SharedReader(path)
    snap = shared.snapshot(("offsets", "views", "doc_log"))  # views with the log overlaid
    views = snap.entries("views")
    through = parse_offset_value(snap.get("offsets", offset_key("t", 3)))
    snap.close()
    assert not shared.info()[0].get("writemap", False)
    shared.close()
    print(offsets[("t", 3)], through, views)
""")


def test_readers_of_a_writemap_shard_map_it_read_only(tmp_path):
    """Readers (other processes: the HTTP API, the CLI) open the files of a WRITEMAP writer
    read-only, without the flag, while it writes and after it grew the map."""
    path = tmp_path / "shard-0"

    def read() -> str:
        r = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip()

    w = Shard(path, map_size=64 * KiB, max_map_size=4 << 20, sync=False, writemap=True)
    try:
        commit(w, lambda b: b.put_offset("t", 3, 41))
        assert read() == "41 41 0"
        while w.grow():
            pass
        commit(w, lambda b: (b.put_offset("t", 3, 42), _docs(b, 2000)))
        assert read() == "42 42 2000"
    finally:
        w.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (a full disk is easy to make); skipped without the right to mount."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# Run in a child process: a store through the map into a hole of a full tmpfs is a SIGBUS,
# which must show as the child's exit status rather than kill the test run.
FULL_DISK = textwrap.dedent("""
    import errno, os, sys
    import lmdb
    from aggregator import store
    from aggregator.store import Shard, storage_errno, view_key

    mnt, allocate = sys.argv[1], sys.argv[2] == "allocate"
    if not allocate:
        store._allocate_map = lambda path, size: None
    KiB = 1 << 10

    def docs(b, n, start):
        for i in range(start, start + n):
            b.put_doc(view_key(b"\\x00\\x01", 0, f"k{i}"), {"v": 1, "d": "x" * 100, "s": {}})

    # a shard made while there is space, closed; the disk then fills up
    Shard(mnt + "/old", map_size=64 * KiB, sync=True).close()
    s = Shard(mnt + "/s", map_size=256 * KiB, max_map_size=8 << 20, sync=True,
              writemap=True)
    with open(mnt + "/filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\\0" * 65536):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
    # reopened with WRITEMAP on the full disk: its map cannot be allocated
    try:
        old = Shard(mnt + "/old", map_size=256 * KiB, sync=True, writemap=True)
    except OSError as e:
        assert storage_errno(e) == errno.ENOSPC, e
    else:  # not allocated: its first transaction stores into a hole of the full disk
        b = old.begin()
        docs(b, 200, 0)
        b.commit()
        raise SystemExit("wrote through the map on a full disk")
    # the allocated map is written although the disk is full; then MAP_FULL, and growing
    # it is an ENOSPC that leaves the map as it was
    n = 0
    while True:
        b = s.begin()
        try:
            docs(b, 200, n)
            b.commit()
            n += 200
        except lmdb.MapFullError:
            b.abort()
            break
    assert n > 0
    size = s.env.info()["map_size"]
    try:
        s.grow()
        raise SystemExit("grew on a full disk")
    except OSError as e:
        assert storage_errno(e) == errno.ENOSPC, e
    assert s.env.info()["map_size"] == size == s.map_size
    # space returns: the grow and the retried transaction succeed
    os.unlink(mnt + "/filler")
    assert s.grow()
    b = s.begin()
    docs(b, 200, n)
    b.commit()
    assert len(list(s.documents(["v"]))) == n + 200
    s.close()
    print("OK")
""")


@pytest.mark.parametrize("allocate", [True, False], ids=["allocated", "sparse"])
def test_writemap_on_a_full_disk_is_an_error_not_a_sigbus(small_tmpfs, allocate):
    """On a full disk (a real tmpfs) a WRITEMAP shard answers ENOSPC at open and at grow (a
    storage error the worker retries), writes what it allocated, and carries on once space
    returns. Without the allocation (`sparse`), LMDB's first store into the full disk kills
    the process with SIGBUS: the case the allocation exists for."""
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(small_tmpfs),
                        "allocate" if allocate else "sparse"],
                       capture_output=True, text=True, timeout=120)
    if allocate:
        assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-3000:]
    else:
        assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr[-3000:])
