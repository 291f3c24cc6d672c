"""The change outbox: one blob per commit (changes.pack_blob / blob_records), its rows in a
real LMDB shard (store: keyed by the seq range, read from the one holding a seq, pruned a
blob at a time) next to rows of format 1, and the change-event producer's settings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.changes import (
    ChangeEncoder,
    blob_records,
    outbox_blobs,
    outbox_records,
    pack_blob,
    publisher_conf,
)
from aggregator.config import config_from_dict
from aggregator.store import Shard


def config(**kafka):
    return config_from_dict({
        "kafka": {"bootstrap_servers": "x", "group_id": "g", **kafka},
        "sources": {"s": {"topic": "src"}},
        "views": {"v": {"changes_topic": "c", "feeds": [
            {"source": "s", "types": ["t"], "key": "partitionkey",
             "ops": [{"op": "set", "path": "x", "from": "data"}]}]}},
    }, env={})


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


def test_the_change_producer_lingers_100_ms_unless_told_otherwise():
    assert publisher_conf(config())["linger.ms"] == 100
    assert publisher_conf(config())["compression.type"] == "lz4"
    assert publisher_conf(config(common={"linger.ms": 7}))["linger.ms"] == 7
    assert publisher_conf(config(producer={"linger.ms": 0}))["linger.ms"] == 0
    assert config().kafka.producer_conf()["linger.ms"] == 5  # the other producers
