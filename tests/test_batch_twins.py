"""The compiled batch calls of the worker's stages against their pure-Python references
(msgpack's test_discrepancy pattern): hypothesis-generated batches through both give the
same bytes, the same lists, the same errors."""

from __future__ import annotations

import struct
import tempfile
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import _core, _publish, changes, core, core_ref
from aggregator.changelog import CapturingBatch
from aggregator.protocol import REC_PARTITION, REC_SLOT, REC_TOPIC
from aggregator.routing import identity_hash, slot_prefix
from aggregator.stages.dedup import AlwaysMaybe, DedupStage
from aggregator.store import Shard

fields = st.tuples(st.integers(0, 65535), st.text(max_size=20), st.integers(0, 2**64 - 1),
                   st.none() | st.binary(max_size=50))


@settings(max_examples=300, deadline=None)
@given(st.lists(fields, max_size=30), st.integers(-(2**63), 2**63 - 1), st.booleans(),
       st.integers(0, 2))
def test_pack_blob_compiled_is_the_reference(rows, ms, is_json, first):
    rows = [(b"dk",) * first + r for r in rows]  # the worker's rows start with the doc key
    want = changes.pack_blob_ref(rows, ms, is_json, first)
    assert _publish.pack_blob(rows, ms, is_json, first) == want
    assert _publish.pack_blob(iter(rows), ms, is_json, first) == want  # any iterable
    got_ms, got_json, recs = changes.blob_records(want)
    assert (got_ms, got_json) == (ms, is_json)
    assert recs == [(r[first], r[first + 1].encode(), r[first + 2], r[first + 3])
                    for r in rows]


compressible = st.tuples(st.integers(0, 65535), st.text(max_size=20),
                         st.integers(0, 2**64 - 1),
                         st.none() | st.binary(max_size=8).map(lambda b: b * 40))


@settings(max_examples=300, deadline=None)
@given(st.lists(fields | compressible, max_size=30), st.integers(-(2**63), 2**63 - 1),
       st.booleans(), st.integers(0, 2))
def test_a_stored_blob_is_the_same_from_both_cores(rows, ms, is_json, first):
    """The outbox value (changes.compress_blob after either core's pack_blob) is the same
    bytes; compressed or not, it reads back as the blob `pack_blob` wrote."""
    rows = [(b"dk",) * first + r for r in rows]
    raw = changes.pack_blob_ref(rows, ms, is_json, first)
    stored = changes.compress_blob(raw)
    assert changes.compress_blob(_publish.pack_blob(rows, ms, is_json, first)) == stored
    assert changes.open_blob(stored) == raw
    assert changes.blob_records(stored) == changes.blob_records(raw)
    body = len(raw) - 16
    if stored != raw:  # flagged, and smaller
        assert stored[1] == raw[1] | changes.BLOB_LZ4 and len(stored) < len(raw)
        assert stored[:1] + stored[2:16] == raw[:1] + raw[2:16]  # the rest of the head
    else:
        assert body < changes.COMPRESS_MIN or len(raw) <= len(stored)


def test_pack_blob_takes_any_buffer_as_data():
    rows = [(1, "a", 2, bytearray(b"xy")), (2, "b", 3, memoryview(b"z")), [3, "c", 4, None]]
    assert _publish.pack_blob(rows, 9, True) == changes.pack_blob_ref(rows, 9, True)


@pytest.mark.parametrize("row, error", [
    ((65536, "k", 1, None), struct.error),
    ((-1, "k", 1, None), struct.error),
    ((0, "k", 2**64, None), struct.error),
    ((0, "k", -1, None), struct.error),
    ((0, b"k", 1, None), (TypeError, AttributeError)),
    ((0, "k", 1, 5), TypeError),
    ((0, "k", 1), ValueError),
])
def test_pack_blob_refuses_what_the_reference_refuses(row, error):
    for impl in (changes.pack_blob_ref, _publish.pack_blob):
        with pytest.raises(error):
            impl([(0, "ok", 1, b"")] + [row], 0, True)


# ---- dedup: core.dedup_keys, and the stage's batch marking against per-id marking -----------

class Ev:
    __slots__ = ("source", "id")

    def __init__(self, source, event_id):
        self.source, self.id = source, event_id


def ref_keys(events, slot_index):
    return [slot_prefix(rec[slot_index]) + identity_hash(ev.source, ev.id) for ev, rec in events]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12), st.integers(0, 65535)),
                max_size=40))
def test_dedup_keys_compiled_is_the_reference(rows):
    events = [(Ev(s, i), [slot]) for s, i, slot in rows]
    want = ref_keys(events, 0)
    for impl in (core_ref.dedup_keys, _core.dedup_keys):
        keys, hashes = impl(events, 0)
        assert keys == want
        assert hashes == b"".join(k[2:] for k in want)


def test_keys_are_hashed_in_the_xxhash_library():
    """_core calls XXH3_128bits of the xxhash package's library (bound and checked at
    import), from a buffer that grows for long sources and ids."""
    assert _core.XXH128_UNBOUND is None
    events = [(Ev("s" * n + "ü", "i" * (5000 - n)), [n]) for n in (0, 1, 300, 4999, 5000)]
    events += [(Ev("", ""), [7]), (Ev("a", "b"), [65535])]
    keys, hashes = _core.dedup_keys(events, 0)
    assert keys == ref_keys(events, 0) and hashes == b"".join(k[2:] for k in keys)
    slots, sources, pks = [r[0] for _, r in events], [e.source for e, _ in events], \
        [e.id for e, _ in events]
    assert _core.gate_keys(slots, sources, pks) == core_ref.gate_keys(slots, sources, pks)


@pytest.mark.parametrize("row, error", [
    ((Ev("s", "i"), [65536]), OverflowError),
    ((Ev("s", "i"), [-1]), OverflowError),
    ((Ev("s", 5), [1]), TypeError),
    ((Ev(None, "i"), [1]), TypeError),
    ((Ev("s", "\ud800"), [1]), UnicodeEncodeError),
])
def test_dedup_keys_refuses_what_the_reference_refuses(row, error):
    for impl in (core_ref.dedup_keys, _core.dedup_keys):
        with pytest.raises(error):
            impl([(Ev("s", "ok"), [0]), row], 0)


class Stage(DedupStage):
    """Just what DedupStage._dedup uses of a worker."""

    def __init__(self, bloom, always_maybe):
        self.bloom = AlwaysMaybe(bloom) if always_maybe else bloom
        self.retrying = False
        self.attempt = types.SimpleNamespace(stats={"duplicates": 0})


def per_id_dedup(stage, batch, events):
    """The stage before batch marking: each id looked up, then marked, in turn."""
    hashes = [identity_hash(ev.source, ev.id) for ev, _ in events]
    flags = stage.bloom.check_and_add(b"".join(hashes))
    kept = []
    for i, (ev, rec) in enumerate(events):
        skey = slot_prefix(rec[REC_SLOT]) + hashes[i]
        if flags[i] and batch.seen(skey):
            stage.attempt.stats["duplicates"] += 1
            continue
        batch.mark_seen(skey, stage.bloom.generation)
        kept.append((ev, rec))
    return kept


def dedup_state(shard):
    return list(shard.dedup_generations()), list(shard.dedup_log_after(0))


ids = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(st.lists(ids, min_size=1, max_size=4), st.booleans(), st.booleans(), st.booleans())
def test_dedup_stage_marks_a_batch_as_id_by_id(batches, always_maybe, sealed, retrying):
    """Batches with duplicates inside and across them (small id and slot pools), through
    the stage and through per-id marking on two real shards: same events kept, same
    duplicate count, same dedup index and dedup log. `sealed`: the generation's slots below
    2 sealed first (ids under the SEALED key); `retrying`: the bloom filter of a rollback."""
    with tempfile.TemporaryDirectory() as tmp:
        out = []
        for run in ("batch", "per-id"):
            shard = Shard(Path(tmp) / run, map_size=16 << 20)
            try:
                stage = Stage(core.BloomFilter(10000, 0.01, 2), always_maybe)
                stage.retrying = retrying
                kept_all = []
                for k, ids_ in enumerate(batches):
                    events = [(Ev("src", f"id-{i}"), rec_of(slot)) for i, slot in ids_]
                    b = shard.begin()
                    if sealed:
                        b._entry(stage.bloom.generation)[1] = 2
                        b._dx = b._index_w()
                        b._dx[:] = [[stage.bloom.generation, 2]]
                    kept = (stage._dedup(b, events) if run == "batch"
                            else per_id_dedup(stage, b, events))
                    kept_all.append([(ev.id, rec[REC_SLOT]) for ev, rec in kept])
                    n = b.seen_count
                    b.log_seen(k)
                    b.commit()
                    kept_all.append(n)
                out.append((kept_all, stage.attempt.stats["duplicates"], dedup_state(shard)))
            finally:
                shard.close()
        assert out[0] == out[1]


def rec_of(slot):
    rec = [None] * (REC_SLOT + 1)
    rec[REC_SLOT] = slot
    return rec


# ---- gate: core.gate_batch against the stage's former per-event bookkeeping ------------------

class SeqEv:
    __slots__ = ("source", "partitionkey", "sequence")

    def __init__(self, source, pk, sequence):
        self.source, self.partitionkey, self.sequence = source, pk, sequence


def per_event_gate_inputs(kept, topics, strict):
    """What GateStage._gate_apply built event by event before core.gate_batch."""
    gated = [(i, ev, rec) for i, (ev, rec) in enumerate(kept) if ev.sequence is not None]
    gkeys = core_ref.gate_keys([rec[REC_SLOT] for _, _, rec in gated],
                               [ev.source for _, ev, _ in gated],
                               [ev.partitionkey for _, ev, _ in gated])
    seqpart = {}
    for g, (_, ev, rec) in zip(gkeys, gated):
        seqpart[g] = (topics[rec[REC_TOPIC]], rec[REC_PARTITION])
    return ([i for i, _, _ in gated], gkeys, [ev.sequence for _, ev, _ in gated],
            [rec[REC_TOPIC] for _, _, rec in gated],
            bytes(strict[rec[REC_TOPIC]] for _, _, rec in gated), seqpart)


def gate_rec(slot, topic, partition):
    rec = [None] * (max(REC_SLOT, REC_TOPIC, REC_PARTITION) + 1)
    rec[REC_SLOT], rec[REC_TOPIC], rec[REC_PARTITION] = slot, topic, partition
    return rec


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["s1", "s2", "é"]), st.text(max_size=6),
                          st.none() | st.integers(-5, 2**63 - 1), st.integers(0, 65535),
                          st.integers(0, 2), st.integers(0, 7)), max_size=40),
       st.lists(st.booleans(), min_size=3, max_size=3))
def test_gate_batch_compiled_is_the_reference(rows, strict):
    topics = ["t0", "t1", "t2"]
    kept = [(SeqEv(src, pk, seq), gate_rec(slot, ti, part))
            for src, pk, seq, slot, ti, part in rows]
    at, gkeys, seqs, tix, modes, seqpart = per_event_gate_inputs(kept, topics, strict)
    for impl in (core_ref.gate_batch, _core.gate_batch):
        got = impl(kept, REC_SLOT, REC_TOPIC, REC_PARTITION, topics, strict)
        assert got[:5] == (at, gkeys, seqs, tix, modes)
        assert dict(zip(got[1], got[5])) == seqpart


def test_gate_batch_refuses_what_the_reference_refuses():
    ok = (SeqEv("s", "k", 1), gate_rec(0, 0, 0))
    for row, strict, error in [((SeqEv("s", "k", 1), gate_rec(0, 5, 0)), [1], IndexError),
                               ((SeqEv("s", "k", 1), gate_rec(70000, 0, 0)), [1], OverflowError),
                               ((SeqEv("s", 3, 1), gate_rec(0, 0, 0)), [1], TypeError),
                               (ok, [300], ValueError)]:
        for impl in (core_ref.gate_batch, _core.gate_batch):
            with pytest.raises(error):
                impl([ok, row], REC_SLOT, REC_TOPIC, REC_PARTITION, ["t"], strict)


def test_changelog_batch_logs_batch_calls_as_single_ones(tmp_path):
    """Cluster mode's CapturingBatch: mark_seen_many and put_seqs leave the same changelog
    entries (and rows) as mark_seen and put_seq one by one."""
    skeys = [bytes([0, i % 3]) + bytes([i]) * 16 for i in range(20)]
    rows = [(bytes([0, i]) + bytes([i]) * 16, 10 + i, f"t{i % 2}", i % 4) for i in range(10)]
    logs = []
    for run in ("batch", "single"):
        shard = Shard(tmp_path / run, map_size=16 << 20)
        try:
            b = CapturingBatch(shard)
            if run == "batch":
                b.mark_seen_many(skeys, 0)
                b.put_seqs(rows)
            else:
                for k in skeys:
                    b.mark_seen(k, 0)
                for row in rows:
                    b.put_seq(*row)
            logs.append((list(b.log), b.seen_count,
                         [b.get_seq(g) for g, *_ in rows], [b.seen(k) for k in skeys]))
            b.commit()
        finally:
            shard.close()
    assert logs[0] == logs[1]
    assert logs[0][1] == 20 and all(logs[0][3])


MODES = ("logged", "equal_copy", "older_version", "no_body", "body_none", "not_logged",
         "logged_delete", "other_dkey")
logged_rows = st.lists(st.tuples(st.integers(0, 300), st.text(max_size=12),
                                 st.integers(0, 2**64 - 1),
                                 st.none() | st.binary(max_size=40),
                                 st.sampled_from(MODES), st.binary(min_size=2, max_size=2)),
                       max_size=25)


def logged_case(spec):
    """(rows, bodies, logged docs, the documents of the doc_log record) of a commit: each
    row a (doc key, view id, key, version, data) change, its `mode` deciding what
    bodies/logged say of it."""
    from aggregator.doc_codec import pack_record
    from aggregator.store import doc_log_docs, pack_doc_log

    rows, bodies, logged = [], {}, {}
    for vid, key, version, data, mode, slot in spec:
        dkey = slot + bytes((vid & 0xFF,)) + key.encode()
        if mode == "other_dkey":
            dkey = dkey + b"x"
        rows.append((dkey, vid, key, version, data))
        if mode == "no_body" or data is None:
            continue
        body = bytes(data) if mode == "equal_copy" else data  # equal, not the same object
        v = version if mode != "older_version" else version ^ 1
        bodies[dkey] = (v, None if mode == "body_none" else body)
        if mode == "logged_delete":
            logged[dkey] = None
        elif mode != "not_logged":
            logged[dkey] = pack_record({"v": v, "d": None, "s": {}}, bodies[dkey][1])
    return rows, bodies, logged, doc_log_docs(pack_doc_log(logged))


@settings(max_examples=400, deadline=None)
@given(logged_rows, st.integers(0, 2**64 - 1), st.booleans())
def test_stored_blob_compiled_is_the_reference_and_resolves(spec, log_key, is_json):
    """The outbox form without the data the commit's doc_log record holds: both builds give
    the same bytes (or both None), and `resolve_stored` with that record's documents gives
    the blob back as pack_blob wrote it."""
    rows, bodies, logged, record = logged_case(spec)
    blob = changes.pack_blob_ref(rows, 1_700_000_000_000, is_json, 1)
    want = changes.stored_blob_ref(blob, rows, bodies, logged, log_key)
    assert _publish.stored_blob(blob, rows, bodies, logged, log_key) == want
    assert _publish.stored_blob(blob, iter(rows), bodies, logged, log_key) == want
    elidable = is_json and any(m in ("logged", "equal_copy") and d is not None and v <= 0xFF
                               for v, _, _, d, m, _ in spec)
    if want is None:  # nothing to leave out: the blob is stored as it is
        assert not elidable
        return
    assert elidable and want[1] == blob[1] | changes.BLOB_LOGGED
    assert want[0] == blob[0] and want[2:16] == blob[2:16]
    assert changes.logged_key(want) == log_key
    stored = changes.compress_blob(want)
    assert changes.logged_key(stored) == log_key
    assert changes.resolve_stored(stored, record) == blob
    assert changes.resolve_stored(want, record) == blob
    with pytest.raises(ValueError, match="logged change outbox blob"):
        changes.blob_records(want)


def test_a_logged_blob_without_its_record_is_refused():
    from aggregator.doc_codec import pack_record
    from aggregator.store import doc_log_docs, pack_doc_log

    spec = [(1, "a", 3, b'{"x":1}', "logged", b"\x00\x07"),
            (1, "b", 1, b'{"y":1}', "no_body", b"\x00\x07")]
    rows, bodies, logged, record = logged_case(spec)
    blob = changes.pack_blob_ref(rows, 5, True, 1)
    stored = changes.stored_blob_ref(blob, rows, bodies, logged, 9)
    assert changes.resolve_stored(stored, record) == blob
    other = doc_log_docs(pack_doc_log({rows[0][0]: pack_record({"v": 4, "d": None, "s": {}},
                                                                 b"{}")}))
    for bad in ({}, other, {rows[0][0]: None}):
        with pytest.raises(ValueError, match="does not hold that version"):
            changes.resolve_stored(stored, bad)
    with pytest.raises(ValueError, match="without its document log record"):
        changes.resolve_stored(stored)
