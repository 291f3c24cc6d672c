"""The native change-event publisher (changes.NativeChangePublisher over aggregator._publish)
against the reference (changes.ChangePublisher), on a real broker: the same outbox blobs give
the same records — keys, values, headers, partitions and per-partition order — and both learn
the same delivered sequence; an outbox of format 1 rows and blobs, plain (format 4) and
compressed (format 5), is published whole from LMDB by both.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.changes import (
    ChangeEncoder,
    ChangePublisher,
    NativeChangePublisher,
    blob_records,
    make_publisher,
    pack_blob,
)
from aggregator.config import config_from_dict
from aggregator.store import Shard, change_range_key, parse_change_key
from tests.support.kafka import unique_name
from tests.support.service import read_topic

VIEWS = ["a", "b", "quiet"]  # "quiet" publishes no change events (its events are dropped)
IMPLS = {"python": ChangePublisher, "native": NativeChangePublisher}


def make_config(bootstrap: str, prefix: str, fmt: str = "json", **producer):
    return config_from_dict({
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "g", "producer": producer},
        "changes": {"format": fmt, "source": "/agg-test"},
        "sources": {"s": {"topic": f"{prefix}src"}},
        "views": {v: {**({"changes_topic": f"{prefix}{v}.changes"} if v != "quiet" else {}),
                      "feeds": [{"source": "s", "types": ["t"], "key": "partitionkey",
                                 "ops": [{"op": "set", "path": "x", "from": "data"}]}]}
                  for v in VIEWS}}, env={})


def records(bootstrap: str, prefix: str) -> dict[str, dict[int, list]]:
    """{view: {partition: [(key, value, headers)] in offset order}}."""
    out = {}
    for v in VIEWS[:2]:
        parts: dict[int, list] = {}
        for m in read_topic(bootstrap, f"{prefix}{v}.changes", timeout=60, quiet=0.5):
            parts.setdefault(m.partition(), []).append((m.offset(), m.key(), m.value(),
                                                        m.headers()))
        out[v] = {p: [r[1:] for r in sorted(rs, key=lambda r: r[0])] for p, rs in parts.items()}
    return out


def publish(impl: str, cfg, blobs, published: int = 0, read_after=None, last: int = 0) -> int:
    enc = ChangeEncoder(cfg, VIEWS)
    pub = IMPLS[impl](cfg, enc, read_after or (lambda seq: iter(())), published,
                      max(published, last))
    pub.committed(blobs)
    assert pub.flush(30), f"{impl}: {pub.backlog} change events not delivered"
    pub.close()
    return pub.published


row = st.tuples(
    st.sampled_from([0, 1, 2]),
    st.text(min_size=1, max_size=12),  # an empty key goes to a random partition
    st.integers(1, 2**40),
    st.none() | st.binary(max_size=300),
)
blob_lists = st.lists(
    st.tuples(st.lists(row, min_size=1, max_size=40), st.integers(0, 2**41),
              st.booleans()),
    min_size=1, max_size=6)


@settings(max_examples=6, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batches=blob_lists, skip=st.integers(0, 5))
def test_native_and_reference_publish_the_same_records(broker, bootstrap, batches, skip):
    blobs, seq = [], 0
    for rows, ms, is_json in batches:
        blob = pack_blob(rows, ms, is_json)
        blobs.append((seq + 1, seq + len(rows), blob))
        seq += len(rows)
    published = min(skip, blobs[0][1] - 1)  # a restart in the middle of the first blob
    got = {}
    for impl in IMPLS:
        prefix = unique_name("chg") + "."
        broker.create_topics([f"{prefix}{v}.changes" for v in VIEWS[:2]], 3)
        cfg = make_config(bootstrap, prefix)
        assert publish(impl, cfg, blobs, published) == seq
        got[impl] = records(bootstrap, prefix)
    assert got["native"] == got["python"]
    expected = [(vid, key.encode(), version, data) for _, _, b in blobs
                for vid, key, version, data in
                ((r[0], r[1].decode(), r[2], r[3]) for r in blob_records(b)[2])]
    expected = expected[published:]
    sent = sum(len(rs) for parts in got["native"].values() for rs in parts.values())
    assert sent == sum(1 for e in expected if e[0] != 2)


def test_headers_are_those_of_a_change_event(broker, bootstrap):
    prefix = unique_name("chg") + "."
    broker.create_topics([f"{prefix}{v}.changes" for v in VIEWS[:2]], 2)
    cfg = make_config(bootstrap, prefix)
    blob = pack_blob([(0, "k-é", 7, b'{"x":1}'), (1, "z", 3, None), (2, "q", 1, b"{}")],
                     1_700_000_000_123, True)
    assert publish("native", cfg, [(1, 3, blob)]) == 3
    got = records(bootstrap, prefix)
    (a,), = got["a"].values()
    assert a == ("k-é".encode(), b'{"x":1}', [
        ("ce_specversion", b"1.0"), ("ce_id", "a:7:k-é".encode()),
        ("ce_source", b"/agg-test/a"), ("ce_type", b"aggregator.view.changed"),
        ("ce_subject", "k-é".encode()), ("ce_partitionkey", "k-é".encode()),
        ("ce_sequence", b"7"), ("ce_time", b"2023-11-14T22:13:20.123Z"),
        ("content-type", b"application/json")])
    (b,), = got["b"].values()
    assert b[1] is None and dict(b[2])["ce_type"] == b"aggregator.view.deleted"
    assert "content-type" not in dict(b[2])


def test_a_full_producer_queue_loses_and_repeats_nothing(broker, bootstrap):
    """librdkafka's queue holds 10 messages: most produce calls fail (QUEUE_FULL; the native
    publisher then frees the headers list it built, as the produce did not take it) and are
    made again after a poll. Both publishers put the same 300 records on the wire, once."""
    rows = [(i % 2, f"k{i % 37}", i + 1, b'{"i":%d}' % i if i % 5 else None)
            for i in range(300)]
    blob = pack_blob(rows, 1_700_000_000_000, True)
    got = {}
    for impl in IMPLS:
        prefix = unique_name("chg") + "."
        broker.create_topics([f"{prefix}{v}.changes" for v in VIEWS[:2]], 2)
        cfg = make_config(bootstrap, prefix, **{"queue.buffering.max.messages": 10,
                                                "linger.ms": 0})
        assert publish(impl, cfg, [(1, 300, blob)]) == 300
        got[impl] = records(bootstrap, prefix)
    assert got["native"] == got["python"]
    assert sum(len(rs) for parts in got["native"].values() for rs in parts.values()) == 300


@pytest.mark.parametrize("impl", list(IMPLS))
def test_an_upgraded_outbox_is_published_whole(impl, broker, bootstrap, tmp_path):
    """Format 1 rows (one event each) followed by blobs, read from LMDB after a restart."""
    prefix = unique_name("chg") + "."
    broker.create_topics([f"{prefix}{v}.changes" for v in VIEWS[:2]], 2)
    cfg = make_config(bootstrap, prefix)
    enc = ChangeEncoder(cfg, VIEWS)
    shard = Shard(tmp_path / "shard-0", map_size=16 << 20)
    try:
        b = shard.begin()
        for seq in range(1, 4):  # written by a build before blobs
            b.put_change(seq, enc.entry(0, f"old-{seq}", seq, enc.encode({"n": seq})))
        b.put_changes(4, 5, enc.blob([(0, "new-4", 1, b"4"), (1, "new-5", 1, None)]))
        b.put_changes(6, 6, enc.blob([(0, "new-6", 1, b"6")]))  # format 4: as it is
        big = enc.blob([(0, f"lz-{i}", 1, b'{"n":%d,"pad":"%s"}' % (i, b"x" * 50))
                        for i in range(7, 10)])
        assert len(enc.stored(big)) < len(big)  # format 5: compressed
        b.put_changes(7, 9, enc.stored(big))
        b.commit()
        assert shard.count_changes_after(1) == 8 and shard.last_change_seq() == 9
        assert publish(impl, cfg, [], published=1, read_after=shard.changes_after,
                       last=shard.last_change_seq()) == 9
        b = shard.begin()
        assert b.prune_changes(4) == 3  # rows 1..3; the blob 4..5 is not all delivered
        assert b.prune_changes(9) == 3
        b.commit()
        assert shard.count_changes_after(0) == 0
    finally:
        shard.close()
    got = records(bootstrap, prefix)
    keys = sorted(k for parts in got["a"].values() for k, _, _ in parts)
    assert keys == [b"lz-7", b"lz-8", b"lz-9", b"new-4", b"new-6", b"old-2", b"old-3"]
    lz = sorted((k, v) for parts in got["a"].values() for k, v, _ in parts if k[:3] == b"lz-")
    assert lz[0] == (b"lz-7", b'{"n":7,"pad":"%s"}' % (b"x" * 50))
    assert [k for parts in got["b"].values() for k, _, _ in parts] == [b"new-5"]


def test_the_reference_is_chosen_by_the_pure_core_switch(monkeypatch, bootstrap):
    cfg = make_config(bootstrap, "x.")
    enc = ChangeEncoder(cfg, VIEWS)
    monkeypatch.setenv("AGGREGATOR_PURE_CORE", "1")
    assert isinstance(make_publisher(cfg, enc, None, 0, 0), ChangePublisher)
    monkeypatch.delenv("AGGREGATOR_PURE_CORE")
    assert isinstance(make_publisher(cfg, enc, None, 0, 0), NativeChangePublisher)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_undelivered_events_are_sent_again(impl, broker, bootstrap):
    """Deliveries that time out while the broker is frozen: the delivered watermark stops
    before them, and after the thaw everything from there is sent again (duplicates carry
    the same id and bytes)."""
    prefix = unique_name("chg") + "."
    broker.create_topics([f"{prefix}{v}.changes" for v in VIEWS[:2]], 2)
    cfg = make_config(bootstrap, prefix, **{"message.timeout.ms": 3000})
    enc = ChangeEncoder(cfg, VIEWS)
    outbox = {}  # change_range_key -> blob, as LMDB holds them

    def read_after(seq):
        return ((k, v) for k, v in sorted(outbox.items()) if parse_change_key(k)[1] > seq)

    def commit(first, last, blob):  # as the worker: LMDB's compressed, the publisher's not
        outbox[change_range_key(first, last)] = enc.stored(blob)
        pub.committed([(first, last, blob)])

    pub = IMPLS[impl](cfg, enc, read_after, 0, 0)
    commit(1, 2, pack_blob([(0, "a", 1, b"1"), (1, "b", 1, b"2")], 5, True))
    assert pub.flush(30) and pub.published == 2
    broker.freeze()
    try:
        rows = [(i % 2, f"k{i}", i, b"%d" % i) for i in range(100)]
        commit(3, 102, pack_blob(rows, 6, True))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pub.pump()
            time.sleep(0.05)
        assert pub.published == 2  # nothing of the second blob was delivered
    finally:
        broker.thaw()
    assert pub.flush(30), f"{impl}: {pub.backlog} change events not delivered"
    assert pub.published == 102
    pub.close()
    got = records(bootstrap, prefix)
    seen: dict[bytes, bytes] = {}
    for parts in got.values():
        for rs in parts.values():
            for key, value, headers in rs:
                cid = dict(headers)["ce_id"]
                assert seen.setdefault(cid, value) == value
    assert len(seen) == 102


def test_blobs_are_held_until_their_values_are_delivered(broker, bootstrap):
    """The native producer hands librdkafka a bytes blob's event values where they lie (no
    copy) and holds the blob until they are delivered: the publisher drops its own
    reference as soon as a blob is produced, memory of the same sizes is allocated and
    written meanwhile (linger 200 ms), and every record on the wire still has its value."""
    prefix = unique_name("chg") + "."
    broker.create_topics([f"{prefix}{v}.changes" for v in VIEWS[:2]], 2)
    cfg = make_config(bootstrap, prefix, **{"linger.ms": 200})
    blobs, seq, want = [], 0, {}
    for b in range(12):
        rows = [(i % 2, f"k{b}-{i}", seq + i + 1, b'{"v":"%s"}' % (b"%d-%d " % (b, i) * 40))
                for i in range(60)]
        blobs.append((seq + 1, seq + len(rows), pack_blob(rows, 1_700_000_000_000, True)))
        want.update({(VIEWS[r[0]], r[1].encode()): r[3] for r in rows})
        seq += len(rows)
    enc = ChangeEncoder(cfg, VIEWS)
    pub = NativeChangePublisher(cfg, enc, lambda s: iter(()), 0, 0)
    sizes = [len(b[2]) for b in blobs]
    pub.committed(blobs)
    del blobs  # the publisher's queue held the only other reference
    pub.pump()
    assert pub.producer.held_blobs > 0  # nothing delivered yet: linger
    junk = [bytes([i % 251]) * n for i in range(50) for n in sizes]  # reuse freed memory
    assert pub.flush(30)
    assert pub.producer.held_blobs == 0  # released once delivered
    pub.close()
    del junk
    got = {}
    for view, parts in records(bootstrap, prefix).items():
        for key, value, _ in (r for rs in parts.values() for r in rs):
            got[(view, key)] = value
    assert got == want


def test_a_produce_that_fails_midway_holds_the_events_it_handed_over(broker, bootstrap):
    """librdkafka refuses an event mid-blob (larger than message.max.bytes): the produce
    raises, and the blob stays held for the events it had handed over without a copy until
    they are delivered."""
    prefix = unique_name("chg") + "."
    broker.create_topics([f"{prefix}{v}.changes" for v in VIEWS[:2]], 2)
    cfg = make_config(bootstrap, prefix, **{"message.max.bytes": 2000, "linger.ms": 200})
    rows = [(0, "a", 1, b'{"x":1}'), (1, "b", 2, b'{"y":2}'),
            (0, "c", 3, b"[" + b"0," * 1500 + b"0]")]
    blob = pack_blob(rows, 1_700_000_000_000, True)
    enc = ChangeEncoder(cfg, VIEWS)
    pub = NativeChangePublisher(cfg, enc, lambda s: iter(()), 0, 0)
    pub.committed([(1, 3, blob)])
    del blob
    with pytest.raises(KafkaException, match="(?i)too large|size"):
        pub.pump()
    assert pub.producer.sent == 2 and pub.producer.held_blobs == 1
    pub.producer.flush(10_000)
    assert pub.producer.delivered == 2 and pub.producer.held_blobs == 0
    pub.close()
    got = records(bootstrap, prefix)
    assert [r[:2] for rs in got["a"].values() for r in rs] == [(b"a", b'{"x":1}')]
    assert [r[:2] for rs in got["b"].values() for r in rs] == [(b"b", b'{"y":2}')]
