"""Forwarded view updates between workers (forwards.py): format 2 written by the compiled
encoder (aggregator._forwards) and by the pure-Python reference give the same bytes, both
decoders read the updates back (and format 1 rows of an older build), and a data dir whose
outbox holds format 1 rows is carried on by the new build on real LMDB shards: through a
restart of the workers and through a reshard.
"""

from __future__ import annotations

import json
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import _forwards, forwards, protocol, reshard
from aggregator.config import default_config_path, load_config
from aggregator.control import Slot
from aggregator.plan import ViewPlan
from aggregator.protocol import MSG_FORWARD, UPDATE_FIELDS, unpack
from tests import test_worker
from tests.test_worker import assert_views

# the worker tests' fixtures: seed 7, 3,000 events, its oracle, in-process clusters
workload = test_worker.workload
oracle = test_worker.oracle
make_cluster = test_worker.make_cluster

DECODERS = [pytest.param(forwards.decode_ref, id="ref"),
            pytest.param(_forwards.decode, id="compiled")]
ENCODERS = [pytest.param(forwards.encode_ref, id="ref"),
            pytest.param(forwards.encode_fast, id="compiled")]


def as_lists(decoded: list) -> list:
    """A decoded message with its updates as the 14 ``UPD_*`` fields again."""
    kind, src, seq, updates = decoded
    return [kind, src, seq, [[feed, key, slot, f.id, f.source, f.type, f.time, f.subject,
                              f.sequence, f.data, f.partitionkey, *f.origin]
                             for feed, key, slot, f in updates]]


def msgpack_exact(u: list) -> list:
    """`u` as it reads back from msgpack (what format 1 carries)."""
    return unpack(msgpack.packb(u, use_bin_type=True))


# ---- strategies ---------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=12) | st.binary(max_size=8))
data_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), kids, max_size=4),
    max_leaves=12)
opt_text = st.none() | st.text(max_size=30)
updates = st.lists(st.builds(
    lambda feed, key, slot, eid, source, etype, time, subject, seq, data, pk, ti, part, off:
    [feed, key, slot, eid, source, etype, time, subject, seq, data, pk, ti, part, off],
    st.integers(0, 2**32 - 1), st.text(max_size=20), st.integers(0, 4095),
    st.text(max_size=40), st.text(max_size=20), st.text(max_size=20), opt_text, opt_text,
    st.none() | st.integers(0, 2**63 - 1), data_values, opt_text,
    st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1),
    st.integers(-2**63, 2**63 - 1)), max_size=12)


# ---- the codec ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ups=updates, src=st.integers(0, 1000), seq=st.integers(1, 2**62),
       limit=st.sampled_from([1 << 20, 700, 300]))
def test_both_encoders_write_the_same_bytes_and_both_decoders_read_them(ups, src, seq, limit):
    ref = forwards.encode_ref(src, seq, ups, limit)
    assert forwards.encode_fast(src, seq, ups, limit) == ref
    assert all(m[0] == forwards.MAGIC for m in ref)
    # one link seq per message, in order; each fits unless it carries a single update
    want = [msgpack_exact(u) for u in ups]
    got: list = []
    for k, m in enumerate(ref):
        assert len(m) <= limit or len(forwards.decode_ref(m)[3]) == 1
        a = as_lists(forwards.decode_ref(m))
        assert as_lists(_forwards.decode(m)) == a
        assert a[:3] == [MSG_FORWARD, src, seq + k]
        got.extend(a[3])
    assert got == want


WANTED = ("a", "ключ", "z")  # the fields a feed reads, in the test's `keys` below
keyed_data = st.dictionaries(st.sampled_from(WANTED) | st.text(max_size=4)
                             | st.integers(-3, 3), data_values, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datas=st.lists(keyed_data | data_values, min_size=1, max_size=6))
def test_the_compiled_reader_projects_the_data_a_feed_reads(datas):
    """Feed 1 reads the fields WANTED (forwards.data_keys), feed 0 the whole data: with
    `keys` the compiled reader gives feed 1 the map cut down to those fields, in the map's
    order (anything else whole), and the whole data in `raw` for a dead letter."""
    ups = [[k % 2, "k", 1, "id", "/s", "t", None, None, None, d, "pk", 0, 0, k]
           for k, d in enumerate(datas)]
    keys = [None, (tuple(w.encode() for w in WANTED), WANTED)]
    (msg,) = forwards.encode_ref(0, 1, ups, 1 << 30)
    whole = [msgpack_exact(u)[9] for u in ups]
    for (feed, _, _, f), d in zip(_forwards.decode(msg, keys)[3], whole):
        if feed == 1 and isinstance(d, dict):
            assert list(f.data.items()) == [(k, v) for k, v in d.items() if k in WANTED]
            assert unpack(f.raw) == d
        else:
            assert f.data == d and f.raw is None
    assert [f.data for *_, f in forwards.decode_ref(msg, keys)[3]] == whole


def test_data_keys_of_the_shop():
    """What each shop feed reads of the data: whole for `from = "data"` without fields."""
    cfg = load_config(default_config_path(), {}, env={})
    got = {(f.view, i): (None if k is None else set(k[1]))
           for i, (f, k) in enumerate(zip(ViewPlan(cfg, {v: i for i, v in enumerate(
               cfg.views)}).feeds, forwards.data_keys(cfg)))}
    assert got[("customer", 0)] is None  # set profile from data
    assert got[("customer", 2)] == {"order_id", "status", "amount_cents"}  # upsert orders
    assert got[("customer", 5)] == set()  # reviews_written: a literal
    assert got[("product", 12)] == {"review_id", "rating"}  # remove + add


@settings(max_examples=100, deadline=None)
@given(ups=updates.filter(bool), seq=st.integers(1, 2**40))
def test_format_1_rows_of_an_older_build_are_read_by_both_decoders(ups, seq):
    (old,) = forwards.encode_v1(3, seq, ups, 1 << 30)
    assert old == msgpack.packb([MSG_FORWARD, 3, seq, ups], use_bin_type=True)
    want = [MSG_FORWARD, 3, seq, [msgpack_exact(u) for u in ups]]
    assert as_lists(forwards.decode_ref(old)) == want
    assert as_lists(_forwards.decode(old)) == want


@pytest.mark.parametrize("encode", ENCODERS)
@pytest.mark.parametrize("field, value", [
    (8, 2**63),  # a sequence beyond i64 (msgpack carries it)
    (7, 5),  # a subject that is not a string
    (1, "key\udc80"),  # a lone surrogate: not UTF-8 (format 1 cannot carry it either)
    (12, 2**31),  # a partition beyond i32
])
def test_an_update_format_2_cannot_carry_makes_the_call_write_format_1(encode, field, value):
    good = [1, "k", 2, "id", "/s", "t", None, None, 4, {"a": 1}, "pk", 0, 1, 2]
    bad = list(good)
    bad[field] = value
    if field == 1:
        with pytest.raises(UnicodeEncodeError):  # as before format 2
            encode(0, 1, [good, bad], 1 << 20)
        return
    msgs = encode(0, 1, [good, bad], 1 << 20)
    assert msgs == forwards.encode_v1(0, 1, [good, bad], 1 << 20)
    assert as_lists(forwards.decode(msgs[0]))[3] == [good, bad]


# ---- the data's msgpack, written in C (_forwards.pack_data / encode_message) ---------------


class _Str(str):
    pass


class _Int(int):
    pass


class _Dict(dict):
    pass


def _outcome(fn, value):
    """fn(value)'s bytes, or its error's type and text."""
    try:
        return fn(value)
    except Exception as e:  # noqa: BLE001 - the error is what is compared
        return (type(e), str(e))


odd_values = st.recursive(
    scalars | st.integers() | st.text(alphabet=st.characters(), max_size=4)
    | st.builds(_Str, st.text(max_size=4)) | st.builds(_Int, st.integers(-300, 300))
    | st.just(object()) | st.just("\ud800"),
    lambda kids: st.lists(kids, max_size=4) | st.tuples(kids, kids)
    | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), kids, max_size=4)
    | st.builds(_Dict, st.dictionaries(st.text(max_size=3), kids, max_size=3)),
    max_leaves=12)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=odd_values)
def test_the_compiled_data_packer_writes_msgpacks_bytes_and_raises_its_errors(value):
    """Every exact common type packed in C, anything else (subclasses, other objects, ints
    beyond 64 bits, strings that are not UTF-8) by msgpack: the same bytes, the same errors."""
    assert _outcome(_forwards.pack_data, value) == _outcome(protocol.pack, value)


@pytest.mark.parametrize("value", [
    0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
    2**64, -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63, -2**63 - 1,
    0.0, -0.0, 1.5, float("inf"), float("nan"), "", "a" * 31, "a" * 32, "a" * 255,
    "a" * 256, "a" * 65535, "a" * 65536, "é" * 20, b"", b"x" * 255, b"x" * 256,
    b"x" * 65536, [0] * 15, [0] * 16, [0] * 65536, {str(i): i for i in range(15)},
    {str(i): i for i in range(16)}, {i: None for i in range(65536)}, (1, (2,)),
    [[[]]] * 3])
def test_the_compiled_data_packer_at_every_length_boundary(value):
    """(2**64 and -2**63 - 1: msgpack's OverflowError.)"""
    assert _outcome(_forwards.pack_data, value) == _outcome(protocol.pack, value)


@pytest.mark.parametrize("depth", [62, 63, 64, 65, 200, 509, 510, 511, 512])
def test_deep_data_falls_back_to_msgpack_and_its_nesting_limit(depth):
    """Deeper than the C packer goes: msgpack packs it (data alone, and the message's data
    array whole, where its nesting limit counts the array too)."""
    value: list = []
    for _ in range(depth):
        value = [value]
    assert _outcome(_forwards.pack_data, value) == _outcome(protocol.pack, value)
    ups = [[1, "k", 2, "id", "/s", "t", None, None, 4, value, "pk", 0, 1, 2]]
    assert _outcome(lambda u: forwards.encode_fast(0, 1, u, 1 << 30), ups) == \
        _outcome(lambda u: forwards.encode_ref(0, 1, u, 1 << 30), ups)


@pytest.mark.parametrize("data", [_Str("s"), {"a": _Int(5)}, _Dict(a=1), {"a": object()},
                                  {"a": 2**70}, {"a": "\udc80"}])
def test_data_the_c_packer_leaves_to_msgpack_gives_the_references_message(data):
    good = [1, "k", 2, "id", "/s", "t", None, None, 4, {"a": [1, 2.5, None]}, "pk", 0, 1, 2]
    odd = list(good)
    odd[9] = data
    ups = [good, odd, good]
    assert _outcome(lambda u: forwards.encode_fast(0, 1, u, 1 << 30), ups) == \
        _outcome(lambda u: forwards.encode_ref(0, 1, u, 1 << 30), ups)


@pytest.mark.parametrize("decode", DECODERS)
def test_truncated_or_damaged_messages_are_refused(decode):
    ups = [[1, "k", 2, "id", "/s", "t", "2025", None, 4, {"a": [1, 2]}, "pk", 0, 1, 2]] * 3
    (msg,) = forwards.encode_ref(0, 1, ups, 1 << 20)
    for n in range(1, len(msg)):
        with pytest.raises(ValueError):
            decode(msg[:n])
    with pytest.raises(ValueError):
        decode(msg + b"\x01")  # a fourth data value
    with pytest.raises(ValueError, match="version"):
        decode(msg[:1] + b"\x03" + msg[2:])


def test_updates_built_by_the_route_stage_fit_format_2():
    """The 14 fields as route.py makes them (UPDATE_FIELDS) travel in format 2."""
    assert UPDATE_FIELDS == 14
    u = [0, "c-1", 7, "e-1", "/shop/orders", "shop.order.placed", "2025-01-01T00:00:00Z",
         None, None, {"order_id": "o-1"}, "o-1", 1, 0, 99]
    (m,) = forwards.encode(0, 1, [u], 1 << 20)
    assert m[0] == forwards.MAGIC


# ---- real shards: the worker and the reshard ---------------------------------------------


@pytest.mark.parametrize("sender, receiver", [("ref", "compiled"), ("compiled", "ref"),
                                              ("ref", "ref")])
def test_reference_and_compiled_codecs_give_the_same_documents(make_cluster, workload, oracle,
                                                               monkeypatch, sender, receiver):
    """Two workers, every forwarded update written by one implementation and read by the
    other: the views are the oracle's (the compiled pair runs in test_worker.py)."""
    enc = {"ref": forwards.encode_ref, "compiled": forwards.encode_fast}[sender]
    dec = {"ref": forwards.decode_ref, "compiled": _forwards.decode}[receiver]
    monkeypatch.setattr(forwards, "encode", enc)
    monkeypatch.setattr(forwards, "decode", dec)
    c = make_cluster(2)
    c.feed(c.ring_records(workload.records), random.Random(3))
    assert c.total(Slot.FORWARDED) > 0
    assert_views(c.views(), oracle)


def _outbox_formats(c) -> set[int]:
    """First bytes of the outbox rows of every worker of `c` (workers booted)."""
    return {msg[0] for w in c.workers for j in w.peer_out
            for _, msg in w.shard.outbox_after(j, 0)}


def test_an_outbox_written_by_the_old_build_is_carried_on(make_cluster, workload, oracle,
                                                          monkeypatch):
    """Format 1 rows pending in the outbox (the peer never read them: its process died),
    then the new build boots on the same LMDB files: it resends them from the outbox, the
    peer applies them once, and what it forwards from then on is format 2."""
    c = make_cluster(2)
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    monkeypatch.setattr(forwards, "WRITE_FORMAT", 1)
    c.feed(recs[:half // 2], random.Random(8))
    c.dispatch(recs[half // 2:half])  # forwarded, committed to the outbox, never applied
    assert 0x94 in _outbox_formats(c) and forwards.MAGIC not in _outbox_formats(c)
    for i in range(2):
        c.stop(i)  # the rings' content is lost, the outbox rows stay
    monkeypatch.setattr(forwards, "WRITE_FORMAT", 2)
    c.boot()
    c.dispatch(recs[half:half + 300])  # new rows (format 2) behind the old ones
    assert {0x94, forwards.MAGIC} <= _outbox_formats(c)
    c.settle()
    c.feed(recs[half + 300:], random.Random(9))
    assert_views(c.views(), oracle)


def test_a_reshard_applies_pending_format_1_rows(make_cluster, workload, oracle, monkeypatch):
    """The reshard reads format 1 rows its target had not applied (reshard.py)."""
    c = make_cluster(2)
    recs = c.ring_records(workload.records)
    monkeypatch.setattr(forwards, "WRITE_FORMAT", 1)
    c.feed(recs[:1000], random.Random(2))
    c.dispatch(recs[1000:1300])  # pending format 1 rows
    assert _outbox_formats(c) == {0x94}
    cfg = c.cfg
    c.close()
    stats = reshard.ensure_layout(cfg, c.data_dir, 3, dead_letters=None)
    assert stats.forwarded > 0
    monkeypatch.setattr(forwards, "WRITE_FORMAT", 2)
    c3 = make_cluster(3)
    c3.feed(recs[1300:], random.Random(3))
    assert_views(c3.views(), oracle)


@pytest.mark.parametrize("decode", DECODERS)
def test_a_forwarded_update_that_fails_to_merge_is_dead_lettered_whole(make_cluster,
                                                                       monkeypatch, decode):
    """The receiver's merge fails (rating "four": the add fails): the dead letter carries
    the whole event, also when the compiled reader gave the merge only the fields it reads."""
    monkeypatch.setattr(forwards, "decode", decode)
    c = make_cluster(2)
    worker = [lambda k: test_worker.worker_of(test_worker.slot_of(k.encode()), 2)][0]
    review = next(r for r in (f"r-{n}" for n in range(50)) if worker(r) == 0)
    product = next(p for p in (f"p-{n}" for n in range(50)) if worker(p) == 1)
    data = {"review_id": review, "product_id": product, "customer_id": "c-1",
            "rating": "four", "text": "long " * 20, "tags": ["a", {"b": 1.5}]}
    c.feed(c.ring_records([test_worker._event("reviews", "shop.review.posted", review, 1,
                                              data, "v-bad")]), random.Random(1))
    sent = [s for d in c.dlqs for s in d.sent]
    assert [r for _, r, _ in sent] == ["merge_error"]
    assert json.loads(sent[0][0][4])["data"] == data
