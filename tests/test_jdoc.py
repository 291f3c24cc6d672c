"""The JSON-bytes merge engine (_jdoc.pyx) against the reference: for generated documents,
plans over every op and events, `_jdoc.apply(plan, json_body(doc), event)` gives
``json_body(<merge.py's apply on the document>)`` byte for byte, or the same MergeError
(type and message), or refuses (counted) an update the reference's result shows it must not
take (a value that is not JSON-exact). Plus targeted cases: escapes, int64 edges, nesting."""

from __future__ import annotations

import copy
import math
from functools import partial

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import merge as ref
from aggregator.doc_codec import json_body
from aggregator.envelope import Event
from aggregator.merge import MergeConfigError, MergeError

from .support import merge_ops as shared

_merge = pytest.importorskip("aggregator._merge")
_jdoc = pytest.importorskip("aggregator._jdoc")

# keys that orjson escapes (quote, backslash, control characters) or writes as UTF-8
SEGMENTS = ["a", "b", "n", "id", 'q"t', "b\\s", "\n", "\x01", "é", "日本", "\u2028", "\x7f"]
I64 = 2**63

ints = st.one_of(
    st.integers(-1000, 1000),
    st.integers(-I64, 2**64 - 1),
    st.sampled_from([I64 - 1, -I64, I64, 2**64 - 1, -I64 + 1, 10**18, -(10**18), 10**17]),
)
strings = st.one_of(st.sampled_from(["", "x", "7", 'q"t', "b\\s", "\n\t", "é", "😀"]),
                    st.text(st.characters(blacklist_categories=("Cs",)), max_size=6))
scalars = st.one_of(st.none(), st.booleans(), ints,
                    st.floats(allow_nan=False, allow_infinity=False), strings)
keys = st.one_of(st.sampled_from(SEGMENTS), strings)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
objects = st.dictionaries(keys, json_values, max_size=5)
# event values: also what is not JSON-exact (the engine refuses those updates)
odd = st.sampled_from([math.nan, math.inf, 2**70, -(2**70), b"raw", "\ud800", (1, 2)])
event_values = st.one_of(
    json_values, json_values, json_values, json_values, json_values, json_values, odd,
    st.recursive(st.one_of(scalars, odd),
                 lambda inner: st.one_of(st.lists(inner, max_size=3),
                                         st.dictionaries(keys, inner, max_size=4)),
                 max_leaves=6),
)
event_objects = st.dictionaries(st.sampled_from(SEGMENTS), event_values, max_size=5)
path_segments = st.sampled_from(SEGMENTS * 3 + ["\ud800"])  # a path orjson cannot write
doc_paths = st.lists(path_segments, min_size=1, max_size=3).map(".".join)
event_paths = st.one_of(
    st.sampled_from(["data", "id", "time", "source", "sequence", "subject"]),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(
        lambda p: "data." + ".".join(p)),
)


op_specs = partial(
    shared.op_specs, doc_paths=doc_paths, event_paths=event_paths, objects=objects,
    json_values=json_values, fields=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3),
    add_values=st.one_of(ints.filter(lambda i: -I64 <= i < I64),
                         st.floats(-1e9, 1e9, allow_nan=False)))
events = shared.events(st.one_of(event_objects, event_values),
                       st.sampled_from(["e1", "7", 'q"t', "é"]))
documents = st.one_of(st.none(), objects)


def reference(plan, doc, event):
    """("ok", json_body of the result, the result) or ("error", type, message)."""
    try:
        out = plan.apply(copy.deepcopy(doc), event)
    except MergeError as e:
        return ("error", type(e), str(e))
    return ("ok", json_body(out), out)


def check(specs, doc, event) -> str:
    """One update through the engine against the reference; returns what happened."""
    try:
        p_ref = ref.compile_ops(specs)
    except MergeConfigError:
        return "config"
    p_c = _merge.compile_ops(specs)
    j = json_body(doc)
    assert j is not None or doc is None  # the documents are JSON-exact
    want = reference(p_ref, doc, event)
    assert reference(p_c, doc, event)[:2] == want[:2]  # (the twins agree)
    before = _jdoc.stats()
    pristine = copy.deepcopy(event.data)
    try:
        got = _jdoc.apply(p_c, j, event)
    except MergeError as e:
        assert want[0] == "error", (want, e)
        assert (type(e), str(e)) == want[1:]
        return "error"
    finally:
        assert repr(event.data) == repr(pristine)  # the event is never mutated
    after = _jdoc.stats()
    if got is _jdoc.REFUSED:
        assert after["refused"] == before["refused"] + 1
        return "refused"
    assert after["applied"] == before["applied"] + 1
    assert want[0] == "ok", want
    if want[2] is None:  # a tombstone
        assert got is None
    else:
        assert got == want[1], (got, want[1])
    return "bytes"


def _updates_agree(max_examples: int):
    @settings(max_examples=max_examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(specs=st.lists(op_specs(), min_size=1, max_size=6), doc=documents,
           events_=st.lists(events, min_size=1, max_size=3))
    def run(specs, doc, events_):
        for event in events_:
            check(specs, doc, event)

    run()


def test_generated_updates_agree():
    _updates_agree(800)  # ~6 s; the long variant below takes ~30 s


@pytest.mark.long
def test_generated_updates_agree_long():
    _updates_agree(5000)


def test_generated_updates_mostly_take_the_byte_path():
    """The refusals are the rare cases, not the rule (a guard against an engine that refuses
    everything and so trivially agrees)."""
    seen = {"bytes": 0, "error": 0, "refused": 0, "config": 0}

    @settings(max_examples=600, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(specs=st.lists(op_specs(), min_size=1, max_size=4), doc=documents, event=events)
    def run(specs, doc, event):
        seen[check(specs, doc, event)] += 1

    run()
    assert seen["bytes"] > 3 * seen["refused"], seen
    assert seen["error"] > 0, seen


# ---------------------------------------------------------------------------------------
# targeted cases


def ev(data, **kw):
    attrs = {"id": "e1", "source": "/s", "type": "t", "partitionkey": "k",
             "time": "2024-01-01T00:00:00Z", "sequence": 5}
    attrs.update(kw)
    return Event(data=data, **attrs)


CASES = [
    ([{"op": "set", "path": "a", "from": "data.x"}], {"b": 1, "a": 2, "c": 3}, {"x": "new"}),
    ([{"op": "set", "path": "z", "from": "data.x"}], {"b": 1}, {"x": [1, {"y": None}]}),
    ([{"op": "set", "path": "z", "from": "data.x"}], {}, {"x": 1}),
    ([{"op": "set", "path": "a.b.c", "from": "data.x"}], {"a": None}, {"x": 1}),
    ([{"op": "set", "path": "a.b.c", "from": "data.x"}], {"a": {"q": 1}}, {"x": 1}),
    ([{"op": "set", "path": "a.b", "from": "data.x"}], {"a": [1]}, {"x": 1}),
    ([{"op": "set", "path": "a.b", "from": "data.x"}], {"a": "s"}, {"x": 1}),
    ([{"op": "unset", "path": "a"}], {"a": 1}, {}),
    ([{"op": "unset", "path": "a"}], {"a": 1, "b": 2}, {}),
    ([{"op": "unset", "path": "b"}], {"a": 1, "b": 2}, {}),
    ([{"op": "unset", "path": "b"}], {"a": 1, "b": {"x": '"}'}, "c": 3}, {}),
    ([{"op": "unset", "path": "a.b"}], {"a": "s"}, {}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": I64 - 2}, {"x": 1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": I64 - 1}, {"x": 1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": 2**64 - 1}, {"x": 1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": -I64}, {"x": -1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": -I64 + 1}, {"x": -1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": 10**17}, {"x": 9 * 10**17}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": -5}, {"x": 2}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": 0}, {"x": -(10**18)}),
    ([{"op": "add", "path": "n", "from": "data.x", "negate": True}], {"n": 1.5}, {"x": 2}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": 1e308}, {"x": 1e308}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": 1}, {"x": 0.1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": True}, {"x": 1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": "1"}, {"x": 1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": [1]}, {"x": 1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": None}, {"x": 1}),
    ([{"op": "add", "path": "n", "from": "data.x"}], {"n": 1}, {"x": True}),
    ([{"op": "add", "path": "n", "value": 3}], {}, {}),
    ([{"op": "upsert", "path": "items", "id": "data.id", "from": "data"}],
     {"items": {"1": {"id": 1}}}, {"id": 2, "s": 'é"\\'}),
    ([{"op": "upsert", "path": "items", "id": "data.id", "from": "data"}],
     {"items": {"1": {"id": 1}}}, {"id": 1, "s": "again"}),
    ([{"op": "upsert", "path": "items", "id": "data.id", "from": "data"}],
     {"items": {}}, {"id": 1.5}),
    ([{"op": "upsert", "path": "items", "id": "data.id", "from": "data"}],
     {"items": 3}, {"id": "q\"\n"}),
    ([{"op": "upsert", "path": "items", "id": "data.id", "from": "data"}], {}, {"id": "\ud800"}),
    ([{"op": "remove", "path": "items", "id": "data.id"}],
     {"items": {"1": 1, "q\"\n": 2, "3": 3}}, {"id": "q\"\n"}),
    ([{"op": "remove", "path": "items", "id": "data.id"}], {"items": {"1": 1}}, {"id": 1}),
    ([{"op": "merge", "path": "", "from": "data"}], {"a": 1, "b": 2}, {"b": 3, "c": {"d": 4}}),
    ([{"op": "merge", "path": "m", "from": "data"}], {"m": {"a": 1}}, {"a": 2, "b": 3}),
    ([{"op": "merge", "path": "m", "from": "data"}], {"m": None}, {"a": 2}),
    ([{"op": "merge", "path": "m", "from": "data"}], {"m": [1]}, {"a": 2}),
    ([{"op": "merge", "path": "m", "from": "data", "fields": ["a", "z"]}], {}, {"a": 2, "b": 1}),
    ([{"op": "delete"}], {"a": 1}, {}),
    ([{"op": "delete"}, {"op": "set", "path": "a", "from": "data.x"}], {"a": 1, "b": 2}, {"x": 5}),
    ([{"op": "delete"}, {"op": "unset", "path": "a"}], {"a": 1}, {}),
    ([{"op": "set", "path": "v", "value": {"k": [1, {"m": "é"}]}}], {"v": 1}, {}),
    ([{"op": "set", "path": "a", "from": "data.x"}], {}, {"x": math.nan}),
    ([{"op": "set", "path": "a", "from": "data.x"}], {}, {"x": 2**64}),
    ([{"op": "set", "path": "a", "from": "data.x"}], {}, {"x": (1, 2)}),
    ([{"op": "set", "path": "a", "from": "data.x"}], {}, {}),
    ([{"op": "set", "path": "a", "from": "sequence"}], {}, {}),
]


@pytest.mark.parametrize("specs,doc,data", CASES)
def test_targeted(specs, doc, data):
    check(specs, doc, ev(data))


def test_escaped_keys_are_found_as_orjson_writes_them():
    doc = {k: i for i, k in enumerate(SEGMENTS)}
    for k in SEGMENTS:
        specs = [{"op": "set", "path": k.replace(".", ""), "from": "data.x"}]
        assert check(specs, doc, ev({"x": [k]})) == "bytes"
        assert check([{"op": "unset", "path": k}], doc, ev({})) == "bytes"


def test_nesting_beyond_orjson_is_refused():
    deep = cur = {}
    for _ in range(252):
        cur["a"] = {}
        cur = cur["a"]
    # 253 objects nested, in the document's root: 254, orjson still writes it; one level
    # more and it refuses (json_body: None)
    assert json_body(deep) is not None
    assert check([{"op": "set", "path": "a", "from": "data.x"}], {}, ev({"x": deep})) == "bytes"
    assert check([{"op": "set", "path": "b.c", "from": "data.x"}], {}, ev({"x": deep})) \
        == "refused"


def test_strings_with_escaped_quotes_and_brackets_are_skipped():
    doc = {"a": 'x\\"}{[', "b": {"c": "]\\", "d": ['"', "\\\\"]}, "e": 1}
    for path in ("e", "b.d", "b.x", "z"):
        assert check([{"op": "set", "path": path, "from": "data.v"}], doc,
                     ev({"v": "w"})) == "bytes"
    assert check([{"op": "add", "path": "e", "from": "data.v"}], doc, ev({"v": 2})) == "bytes"


def test_long_strings_are_skipped_at_every_offset_of_a_quote_or_backslash():
    """Strings holding an escaped quote, backslashes or a multi-byte character at every
    offset, and a string ending where the bytes end, are skipped exactly (the members after
    them are found)."""
    plan = _merge.compile_ops([{"op": "add", "path": "k", "from": "data.v"}])
    for n in range(0, 26):
        for mark in ('\\"', "\\\\", "é", '"', "\\"):
            for at in range(0, n + 1):
                s = "x" * at + mark + "y" * (n - at)
                doc = {"a": s, "b": {"c": [s, {s: s}]}, "k": 1}
                assert check([{"op": "add", "path": "k", "from": "data.v"}], doc,
                             ev({"v": 2})) == "bytes"
        # the member found is the last one, its string ending at the bytes' end
        doc = {"k": 1, "z": "q" * n}
        assert orjson.loads(_jdoc.apply(plan, json_body(doc), ev({"v": 1}))) == \
            {"k": 2, "z": "q" * n}


def test_stats_count_applied_and_refused():
    _jdoc.reset_stats()
    plan = _merge.compile_ops([{"op": "set", "path": "a", "from": "data.x"}])
    assert _jdoc.apply(plan, b"{}", ev({"x": 1})) == b'{"a":1}'
    assert _jdoc.apply(plan, b"{}", ev({"x": math.inf})) is _jdoc.REFUSED
    assert _jdoc.stats() == {"applied": 1, "refused": 1}
    assert orjson.loads(_jdoc.apply(plan, None, ev({"x": "é"}))) == {"a": "é"}


def _values_written_as_orjson(max_examples: int):
    plan = _merge.compile_ops([{"op": "set", "path": "a", "from": "data.x"}])

    @settings(max_examples=max_examples, deadline=None)
    @given(v=st.one_of(event_values, st.dictionaries(st.text(max_size=4), event_values)))
    def run(v):
        got = _jdoc.apply(plan, None, ev({"x": v}))
        want = json_body({"a": v})
        if got is _jdoc.REFUSED:
            assert want is None
        else:
            assert got == want

    run()


def test_values_are_written_as_orjson_writes_them():
    """The bytes of a `set` are orjson's, or the update is refused when they are not
    exact."""
    _values_written_as_orjson(800)


@pytest.mark.long
def test_values_are_written_as_orjson_writes_them_long():
    _values_written_as_orjson(5000)


def test_plain_values_edge_cases():
    plan = _merge.compile_ops([{"op": "set", "path": "a", "from": "data.x"}])
    d = {"x": 1, "y": 2}
    del d["x"]  # a dict with a deleted slot before its first entry
    d["z"] = 3
    for v in [d, I64 - 1, -I64, I64, 2**64 - 1, -I64 - 1, "\x7f", "\x1f", 'a"b', "a\\b", "é",
              [[[[]]]], {"": {}}, True, False, None, 0, -0, [1, 2.5], {"k": math.nan}]:
        got = _jdoc.apply(plan, b'{"b":1}', ev({"x": v}))
        want = json_body({"b": 1, "a": v})
        assert got == (want if want is not None else _jdoc.REFUSED), v
