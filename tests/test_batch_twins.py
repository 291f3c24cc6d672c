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
from aggregator.protocol import REC_SLOT
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
