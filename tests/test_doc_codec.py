"""One encoding of a document for storage and change event (doc_codec.py), on real LMDB files:
a document stored as JSON or as msgpack reads back exactly as it was, the form is the expected
one, and a JSON-exact document's stored bytes are its change event body, byte for byte."""

from __future__ import annotations

import base64
import json
import math
import random

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import _core, core_ref
from aggregator.changes import ChangeEncoder
from aggregator.config import load_config
from aggregator.devtools import simulate
from aggregator.devtools.encoder import to_binary
from aggregator.doc_codec import (
    json_body,
    pack_record,
    record_doc,
    record_live,
    unpack_record,
)
from aggregator.store import Shard, read_views, view_key
from tests import test_worker

_I64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # module-scoped shard / encoders: reused
UNSTORABLE = (OverflowError, UnicodeEncodeError)  # msgpack's errors (the "d" form, as before)

# ---- oracles ----------------------------------------------------------------------------------


def exact_oracle(doc, depth: int = 0) -> bool:
    """JSON-exact by definition, written out type by type (the depth bound: orjson's 254)."""
    t = type(doc)
    if doc is None or t is bool:
        return True
    if t is int:
        return _I64_MIN <= doc <= _U64_MAX
    if t is float:
        return math.isfinite(doc)
    if t is str:
        return not any(0xD800 <= ord(c) <= 0xDFFF for c in doc)
    if t is list:
        return depth < 254 and all(exact_oracle(x, depth + 1) for x in doc)
    if t is dict:
        return depth < 254 and all(type(k) is str and exact_oracle(k) and
                                   exact_oracle(v, depth + 1) for k, v in doc.items())
    return False


def fits_msgpack(doc) -> bool:
    """No integer outside msgpack's range (int64 and uint64), no lone surrogate (msgpack
    encodes strings as UTF-8, strictly)."""
    if type(doc) is int:
        return _I64_MIN <= doc <= _U64_MAX
    if type(doc) is str:
        return not any(0xD800 <= ord(c) <= 0xDFFF for c in doc)
    if type(doc) is dict:
        return all(fits_msgpack(k) and fits_msgpack(v) for k, v in doc.items())
    if type(doc) is list:
        return all(fits_msgpack(x) for x in doc)
    return True


def same(a, b) -> bool:
    """Identical documents: same types everywhere (1 is not 1.0 nor True), NaN equal to NaN,
    -0.0 not 0.0, dict keys in the same order."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (math.isnan(a) and math.isnan(b)) or \
            (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _jsonable(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def body_before(doc) -> bytes:
    """ChangeEncoder.encode of JSON change events as it was before the stored JSON form."""
    try:
        return orjson.dumps(doc, default=_jsonable, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(doc, separators=(",", ":"), default=_jsonable).encode()


# ---- documents --------------------------------------------------------------------------------

_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=8)  # surrogates too
_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=_I64_MIN, max_value=_U64_MAX),
    st.integers(min_value=-(1 << 80), max_value=1 << 80),
    st.sampled_from([_I64_MIN - 1, _U64_MAX + 1, _U64_MAX, _I64_MIN, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]),
    _text, st.text(max_size=12), st.binary(max_size=6),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=6), inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), _text, st.integers(-3, 3)), inner,
                        max_size=3),
    ),
    max_leaves=20,
)
documents = st.one_of(st.dictionaries(st.text(max_size=8), _values, max_size=5), _values)


def deep(n: int, leaf):
    """`leaf` inside n containers (lists and dicts in turn)."""
    doc = leaf
    for i in range(n):
        doc = {"k": doc} if i % 2 else [doc, i]
    return doc


FIXED = [
    {"a": 1, "b": [1.5, -0.0, "x"], "c": {"d": None, "e": True}},
    {"bytes": b"\x00\xff"}, {1: "int key"}, {"big": 1 << 64}, {"neg": -(1 << 63) - 1},
    {"nan": math.nan}, {"inf": [math.inf]}, {"ninf": {"x": -math.inf}},
    {"s": "\ud800"}, {"\udfff": 1}, {"u": "h\u00e9llo \U0001f600 \u2028 \x00"},
    {"nested": deep(100, 1.0)}, {"toodeep": deep(300, 1)}, {"toodeep_nan": deep(300, math.nan)},
    {"t": "null", "n": None}, {"f": 1e16, "g": 1.0, "i": 1}, "just a string", 7, [],
]


# ---- the check of JSON-exact documents ----------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(documents)
def test_json_body_is_given_exactly_for_exact_documents(doc):
    body = json_body(doc)
    assert (body is not None) == (doc is not None and exact_oracle(doc)), doc
    if body is not None:
        assert same(orjson.loads(body), doc)
        assert body == body_before(doc)  # the change event's bytes of today


@pytest.mark.parametrize("doc", FIXED, ids=range(len(FIXED)))
def test_fixed_documents(doc):
    body = json_body(doc)
    assert (body is not None) == exact_oracle(doc)
    if body is not None:
        assert same(orjson.loads(body), doc) and body == body_before(doc)


def test_what_orjson_encodes_but_does_not_give_back_is_not_exact():
    for doc in ({"t": (1, 2)}, [math.nan], {"x": [1, {"y": math.inf}]}, deep(300, 1)):
        assert json_body(doc) is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(documents, st.tuples(_values), st.lists(st.tuples(_scalars), max_size=3)))
def test_compiled_and_reference_json_lossless_agree(doc):
    assert _core.json_lossless(doc) is core_ref.json_lossless(doc)


@pytest.mark.parametrize("n", [254, 255, 256, 257, 300])
def test_json_lossless_depth_bound_is_the_same_in_both(n):
    doc = deep(n, 1)
    assert _core.json_lossless(doc) is core_ref.json_lossless(doc) is (n <= core_ref.JSON_DEPTH)
    assert core_ref.JSON_DEPTH == _core.JSON_DEPTH


# ---- stored and read back on a real shard ------------------------------------------------


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    s = Shard(tmp_path_factory.mktemp("codec") / "shard-0", map_size=64 << 20, sync=False)
    yield s
    s.close()


def _store_and_read(shard: Shard, key: str, doc) -> tuple[dict, dict]:
    rec = {"v": 3, "d": doc, "s": {"src": [7, "2026-01-01T00:00:00Z"]}}
    dkey = view_key(b"\x00\x07", 0, key)
    b = shard.begin()
    try:
        b.put_doc(dkey, rec)
    except BaseException:
        b.abort()
        raise
    b.commit()
    b = shard.begin()
    try:
        back = b.get_doc(dkey)
        raw = bytes(b.doc_raw(dkey))  # the stored form (the document log overlaid)
    finally:
        b.abort()
    return back, msgpack.unpackb(raw, raw=False, strict_map_key=False)


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(documents)
def test_a_document_never_changes_by_being_stored(shard, doc):
    if not fits_msgpack(doc):  # neither form stores it: put_doc raises, as before
        with pytest.raises(UNSTORABLE):
            _store_and_read(shard, "k", doc)
        return
    back, raw = _store_and_read(shard, "k", doc)
    assert same(back["d"], doc) and back["v"] == 3
    assert back["s"] == {"src": [7, "2026-01-01T00:00:00Z"]}
    if doc is not None and exact_oracle(doc):
        assert set(raw) == {"v", "j", "s"} and raw["j"] == body_before(doc)
    else:
        assert set(raw) == {"v", "d", "s"}


@pytest.mark.parametrize("doc", FIXED, ids=range(len(FIXED)))
def test_fixed_documents_stored(shard, doc):
    if not fits_msgpack(doc):
        with pytest.raises(UNSTORABLE):
            _store_and_read(shard, "fixed", doc)
        return
    back, raw = _store_and_read(shard, "fixed", doc)
    assert same(back["d"], doc)
    assert ("j" in raw) == exact_oracle(doc)


def test_records_of_the_previous_build_read_as_before(tmp_path):
    """A "d" record (every record before the JSON form) is read, listed and served as it was;
    a tombstone stays a "d" record."""
    s = Shard(tmp_path / "shard-0", map_size=16 << 20, sync=False)
    try:
        old = msgpack.packb({"v": 2, "d": {"a": [1, 2]}, "s": {}}, use_bin_type=True)
        tomb = {"v": 4, "d": None, "s": {}}
        b = s.begin()
        b.put_raw("views", view_key(b"\x00\x00", 0, "old"), old)
        b.put_doc(view_key(b"\x00\x00", 0, "new"), {"v": 1, "d": {"a": 1}, "s": {}})
        b.put_doc(view_key(b"\x00\x00", 0, "gone"), tomb)
        b.commit()
        b = s.begin()
        assert b.get_doc(view_key(b"\x00\x00", 0, "old")) == {"v": 2, "d": {"a": [1, 2]}, "s": {}}
        raw_tomb = b.doc_raw(view_key(b"\x00\x00", 0, "gone"))
        assert msgpack.unpackb(raw_tomb) == tomb and not record_live(raw_tomb)
        b.abort()
        snap = s.snapshot()
        try:
            assert [k[3:] for k in snap.view_keys(0, None, 10)] == [b"new", b"old"]
        finally:
            snap.close()
        assert {k: r["d"] for _, k, r in s.documents(["v"])} == \
            {"old": {"a": [1, 2]}, "new": {"a": 1}, "gone": None}
    finally:
        s.close()
    assert read_views(tmp_path, ["v"]) == {"v": {"old": {"a": [1, 2]}, "new": {"a": 1}}}


def test_pack_record_forms():
    rec = {"v": 1, "d": {"x": 1}, "s": {"a": [1, "t"]}}
    assert unpack_record(pack_record(rec, json_body(rec["d"]))) == rec
    assert unpack_record(pack_record(rec, None)) == rec
    assert rec == {"v": 1, "d": {"x": 1}, "s": {"a": [1, "t"]}}  # not changed by packing
    assert msgpack.unpackb(pack_record(rec, b'{"x":1}')) == {"v": 1, "j": b'{"x":1}',
                                                             "s": {"a": [1, "t"]}}


# ---- change bodies ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders():
    return {fmt: ChangeEncoder(load_config(None, {"changes.format": fmt}, env={}), ["v"])
            for fmt in ("json", "msgpack")}


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(documents)
def test_change_bodies_are_those_of_before(encoders, doc):
    enc = encoders["json"]
    data, body = enc.encode_json(doc)
    want = None if doc is None else body_before(doc)
    assert data == want and enc.encode(doc) == want
    assert body == json_body(doc)
    if body is not None:
        assert body is data  # the very bytes stored are the change event's body
    if fits_msgpack(doc):  # msgpack change events: unchanged
        assert encoders["msgpack"].encode(doc) == (None if doc is None else
                                                   msgpack.packb(doc, use_bin_type=True))


# ---- in real workers: the stored JSON is the change event's body ------------------------------

workload = test_worker.workload  # the worker tests' module fixtures: seed 7, 3,000 events
oracle = test_worker.oracle


def _odd_events() -> list[tuple]:
    """Customer profiles that are not JSON-exact (msgpack data: bytes, int keys, NaN, inf)
    and back, some within one batch; and a merge error after an update of the same product
    (the document is rebuilt from the stored version)."""
    def cust(pk, seq, data, mp=True):
        attrs = {"id": f"odd-{pk}-{seq}", "source": simulate.SOURCES["customers"].uri,
                 "type": "shop.customer.upserted", "time": f"2025-01-01T00:00:0{seq}.000Z",
                 "partitionkey": pk, "sequence": seq}
        headers, value = to_binary(attrs, data, simulate.MSGPACK if mp else simulate.JSON)
        return (simulate.SOURCES["customers"].topic, pk.encode(), value, headers)

    out = []
    for i, odd in enumerate([{"raw": b"\x00\x01"}, {1: "one"}, {"x": math.nan},
                             {"y": [math.inf, -0.0]}, {"big": (1 << 64) - 1}, {"t": "\u00e9"}]):
        pk = f"odd-{i}"
        out += [cust(pk, 1, {"n": i}, mp=False), cust(pk, 2, odd), cust(pk, 3, {"n": -i})]
        out.append(cust(f"odder-{i}", 1, odd))
    out.append(test_worker._event("inventory", "shop.inventory.adjusted", "p-odd", 1,
                                  {"product_id": "p-odd", "delta": 5}, "odd-m-1"))
    out.append(test_worker._event("inventory", "shop.inventory.adjusted", "p-odd", 2,
                                  {"product_id": "p-odd", "delta": 2.5}, "odd-m-2"))
    out.append(test_worker._event("inventory", "shop.inventory.adjusted", "p-odd", 3,
                                  {"product_id": "p-odd", "delta": "five"}, "odd-m-3"))
    return out


@pytest.mark.parametrize("n,coalesce,cache", [(1, False, True), (2, False, False),
                                              (2, True, True), (1, True, False)])
def test_stored_json_is_the_change_body(tmp_path, workload, oracle, n, coalesce, cache):
    c = test_worker.Cluster(tmp_path / "data", n, {
        "changes.coalesce": coalesce, "service.doc_cache_bytes": (32 << 20) if cache else 0})
    try:
        c.boot()
        odd = _odd_events()
        recs = c.ring_records(list(workload.records[:1500]) + odd[:10]
                              + list(workload.records[1500:]) + odd[10:])
        c.feed(recs, random.Random(5), max_batch=500)
        for w in c.workers:
            w.publisher.pump()
            if cache:  # the cached documents are those stored
                for dkey, (stored, _) in w.doc_cache._docs.items():
                    assert same(record_doc(stored), w.shard.begin().get_doc(dkey)["d"]) or \
                        pytest.fail(dkey)
        assert sorted(r for q in c.dlqs for r in q.reasons) == ["merge_error"]
        last = {}
        for view, key, version, data in c.published:
            last[(view, key)] = (version, data)
        for i in range(n):
            c.stop(i)
        forms = {"j": 0, "d": 0}
        for path in sorted(tmp_path.glob("data/shard-*")):
            shard = Shard(path, readonly=True)
            names = shard.get_meta("views")
            snap = shard.snapshot()
            try:
                for k, raw in snap.rows("views"):
                    view, key = names[k[2]], bytes(k[3:]).decode()
                    rec, doc = msgpack.unpackb(raw, raw=False, strict_map_key=False), \
                        unpack_record(raw)["d"]
                    form = "j" if "j" in rec else "d"
                    forms[form] += 1
                    assert (form == "j") == (json_body(doc) is not None), (view, key, doc)
                    version, data = last[(view, key)]
                    assert version == rec["v"] and data == body_before(doc), (view, key)
                    if form == "j":
                        assert data == rec["j"] == json_body(doc)
            finally:
                snap.close()
                shard.close()
        assert forms["j"] > 400 and forms["d"] == 4, forms  # the odder-* bytes, 1:, NaN, inf
        views = read_views(tmp_path / "data", list(c.cfg.views))
        assert views["customer"]["odd-2"] == {"profile": {"n": -2}}
        assert math.isnan(views["customer"]["odder-2"]["profile"]["x"])
        assert views["customer"]["odder-0"]["profile"] == {"raw": b"\x00\x01"}
        assert views["product"]["p-odd"] == {"stock": 7.5, "adjustments": 2}
        for view in oracle:
            got = {k: v for k, v in views[view].items() if "odd" not in k}
            assert got == oracle[view], view
    finally:
        c.close()
