"""The change outbox: one blob per commit (changes.pack_blob / blob_records; stored as an LZ4
block when it pays, changes.compress_blob), its rows in a
real LMDB shard (store: keyed by the seq range, read from the one holding a seq, pruned a
blob at a time) next to rows of format 1, and the change-event producer's settings."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.changes import (
    BLOB_LZ4,
    COMPRESS_MIN,
    ChangeEncoder,
    blob_records,
    compress_blob,
    open_blob,
    outbox_blobs,
    outbox_records,
    pack_blob,
    publisher_conf,
)
from aggregator.config import config_from_dict
from aggregator.store import FORMAT_VERSION, Shard

_CFG = {
    "kafka": {"bootstrap_servers": "x", "group_id": "g"},
    "sources": {"s": {"topic": "src"}},
    "views": {"v": {"changes_topic": "c", "feeds": [
        {"source": "s", "types": ["t"], "key": "partitionkey",
         "ops": [{"op": "set", "path": "x", "from": "data"}]}]}},
}


def config(**kafka):
    return config_from_dict({**_CFG, "kafka": {**_CFG["kafka"], **kafka}}, env={})


rows = st.lists(st.tuples(st.integers(0, 65535), st.text(max_size=20),
                          st.integers(0, 2**64 - 1), st.none() | st.binary(max_size=50)),
                max_size=30)


@settings(max_examples=200, deadline=None)
@given(rows, st.integers(-(2**63), 2**63 - 1), st.booleans())
def test_a_blob_gives_back_its_rows(rs, ms, is_json):
    got_ms, got_json, recs = blob_records(pack_blob(rs, ms, is_json))
    assert (got_ms, got_json) == (ms, is_json)
    assert recs == [(v, k.encode(), ver, d) for v, k, ver, d in rs]


def test_rows_are_read_from_the_one_holding_a_seq_and_pruned_whole(tmp_path):
    enc = ChangeEncoder(config(), ["v"])
    shard = Shard(tmp_path / "shard-0", map_size=16 << 20)
    try:
        assert shard.last_change_seq() == 0 and list(shard.changes_after(0)) == []
        b = shard.begin()
        b.put_change(1, enc.entry(0, "k1", 1, b"1"))  # format 1
        b.put_change(2, enc.entry(0, "k2", 1, None))
        b.put_changes(3, 5, enc.blob([(0, "a", 1, b"x"), (0, "b", 2, None), (0, "c", 3, b"")]))
        b.put_changes(6, 6, enc.blob([(0, "d", 4, b"y")]))
        b.commit()
        assert shard.last_change_seq() == 6
        for after, want in [(0, 6), (1, 5), (2, 4), (3, 3), (4, 2), (5, 1), (6, 0), (9, 0)]:
            assert shard.count_changes_after(after) == want
            assert [r[0] for r in outbox_records(shard.changes_after(after), after)] == \
                list(range(after + 1, 7))
        assert [(f, la) for f, la, _ in outbox_blobs(shard.changes_after(3))] == [(3, 5), (6, 6)]
        recs = list(outbox_records(shard.changes_after(0)))
        assert [r[1:5] for r in recs] == [(0, "k1", 1, b"1"), (0, "k2", 1, None),
                                         (0, "a", 1, b"x"), (0, "b", 2, None),
                                         (0, "c", 3, b""), (0, "d", 4, b"y")]
        assert all(r[6] is True for r in recs)  # JSON, from the entries and the blobs
        b = shard.begin()
        assert b.prune_changes(4) == 2  # 1 and 2; the blob 3..5 is not all delivered
        b.commit()
        assert shard.count_changes_after(0) == 4
        b = shard.begin()
        assert b.prune_changes(5) == 1
        assert b.prune_changes(9) == 1
        b.commit()
        assert shard.count_changes_after(0) == 0 and shard.last_change_seq() == 0
    finally:
        shard.close()


def doc_rows(n, start=0):
    return [(0, f"customer-{i}", i + 1, b'{"id":"customer-%d","name":"N %d","orders":[]}'
             % (i, i)) for i in range(start, start + n)]


def test_a_blob_is_stored_compressed_when_it_pays():
    enc = ChangeEncoder(config(), ["v"])
    raw = enc.blob(doc_rows(50))
    stored = enc.stored(raw)
    assert stored[1] & BLOB_LZ4 and len(stored) * 3 < len(raw)
    assert open_blob(stored) == raw and blob_records(stored) == blob_records(raw)
    small = enc.blob([(0, "k", 1, b"{}")])  # body under COMPRESS_MIN: as it is
    assert len(small) - 16 < COMPRESS_MIN and enc.stored(small) == small
    noise = enc.blob([(0, "k", 1, os.urandom(600))])
    assert enc.stored(noise) == noise  # would not get smaller
    off = ChangeEncoder(config_from_dict({**_CFG, "changes": {"compress_blobs": False}},
                                         env={}), ["v"])
    assert off.stored(raw) == raw


def test_a_damaged_compressed_blob_is_refused():
    stored = compress_blob(ChangeEncoder(config(), ["v"]).blob(doc_rows(20)))
    for bad in (stored[:-5], stored[:20] + bytes(len(stored) - 20)):
        with pytest.raises(ValueError, match="change outbox blob"):
            blob_records(bad)


def test_a_format_4_outbox_is_read_next_to_compressed_blobs(tmp_path):
    """A format-4 shard (plain blobs) is stamped 6 when opened; its blobs and the
    compressed ones written after are read alike (what the publisher and reshard read)."""
    enc = ChangeEncoder(config(), ["v"])
    path = tmp_path / "shard-0"
    shard = Shard(path, map_size=16 << 20)
    try:
        shard.check_layout(shard=0, workers=1, slots=4096)
        shard.put_meta(format=4)
        b = shard.begin()
        b.put_changes(1, 30, enc.blob(doc_rows(30)))  # as format 4 wrote it
        b.commit()
    finally:
        shard.close()
    shard = Shard(path, map_size=16 << 20)
    try:
        shard.check_layout(shard=0, workers=1, slots=4096)
        assert shard.get_meta("format") == FORMAT_VERSION == 6
        b = shard.begin()
        b.put_changes(31, 60, enc.stored(enc.blob(doc_rows(30, 30))))
        b.commit()
        values = [v for _, v in shard.changes_after(0)]
        assert not values[0][1] & BLOB_LZ4 and values[1][1] & BLOB_LZ4
        recs = list(outbox_records(shard.changes_after(0)))
        assert [r[:5] for r in recs] == [(i + 1, v, k, ver, d) for i, (v, k, ver, d)
                                         in enumerate(doc_rows(60))]
        assert [f for f, _, blob in outbox_blobs(shard.changes_after(40))] == [31]
        assert all(not blob[1] & BLOB_LZ4 for _, _, blob in outbox_blobs(shard.changes_after(0)))
    finally:
        shard.close()


def test_the_change_producer_lingers_100_ms_unless_told_otherwise():
    assert publisher_conf(config())["linger.ms"] == 100
    assert publisher_conf(config())["compression.type"] == "lz4"
    assert publisher_conf(config(common={"linger.ms": 7}))["linger.ms"] == 7
    assert publisher_conf(config(producer={"linger.ms": 0}))["linger.ms"] == 0
    assert config().kafka.producer_conf()["linger.ms"] == 5  # the other producers
