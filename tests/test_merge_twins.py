"""The compiled merge (_merge) against the reference (merge.py) on generated op lists,
documents and events: the same documents (types included: int vs float, bool vs int), the
same MergeError messages, the same MergeConfigError messages; event.data is never mutated
and a result never shares a mutable object with the plan (mutating a result changes no
later result). tests/test_merge.py runs the hand-written cases against both."""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys
import tomllib
from functools import partial

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import merge as ref
from aggregator.devtools import simulate
from aggregator.envelope import Event
from aggregator.merge import MergeConfigError, MergeError

from .support import merge_ops as shared

_merge = pytest.importorskip("aggregator._merge")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "shop.toml"
SEGMENTS = ["a", "b", "n", "id"]


def typed(x):
    """x as nested tuples that carry each value's type: == on these is type-strict."""
    t = type(x)
    if t is dict:
        return ("dict", tuple(sorted((k, typed(v)) for k, v in x.items())))
    if t is list:
        return ("list", tuple(typed(v) for v in x))
    if t is float:
        return ("float", repr(x))
    return (t.__name__, x)


def outcome(plan, doc, event):
    """The result of one apply on a private deep copy of doc: ("ok", typed doc, the doc) or
    ("error", message)."""
    try:
        out = plan.apply(copy.deepcopy(doc), event)
    except MergeError as e:
        return ("error", str(e), None)
    return ("ok", typed(out), out)


def scramble(x) -> None:
    """Mutate every container of a result (what a careless caller could do)."""
    if type(x) is dict:
        for v in list(x.values()):
            scramble(v)
        x["__scrambled"] = 1
    elif type(x) is list:
        for v in x:
            scramble(v)
        x.append("__scrambled")


# ---------------------------------------------------------------------------------------
# strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["", "x", "id7"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(SEGMENTS), inner, max_size=4),
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.sampled_from(SEGMENTS), json_values, max_size=4)
doc_paths = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(".".join)
event_paths = st.one_of(
    st.sampled_from(["data", "id", "time", "source", "type", "subject", "partitionkey",
                     "sequence"]),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(
        lambda p: "data." + ".".join(p)),
)
fields = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3)


op_specs = partial(
    shared.op_specs, doc_paths=doc_paths, event_paths=event_paths, objects=objects,
    json_values=json_values, fields=fields,
    add_values=st.one_of(st.integers(-(2**40), 2**40), st.floats(-1e9, 1e9, allow_nan=False)))
events = shared.events(st.one_of(objects, json_values), st.sampled_from(["e1", "7"]))
documents = st.one_of(st.none(), objects)


def compile_both(specs, context=None):
    """(reference plan, compiled plan), or None after checking both reject the specs with
    the same message."""
    try:
        p_ref = ref.compile_ops(specs, context)
    except MergeConfigError as e:
        with pytest.raises(MergeConfigError) as got:
            _merge.compile_ops(specs, context)
        assert str(got.value) == str(e) and got.value.index == e.index
        return None
    p_c = _merge.compile_ops(specs, context)
    assert p_c.ops == p_ref.ops and len(p_c) == len(p_ref)
    assert (p_c.writes, p_c.deletes) == (p_ref.writes, p_ref.deletes)
    assert repr(p_c) == repr(p_ref)
    return p_ref, p_c


def atomic(specs) -> bool:
    """The rule `_merge.MergePlan.atomic` follows, spelled out independently."""
    if len(specs) == 1:
        return True
    paths = [tuple(s["path"].split(".")) if s.get("path") else () for s in specs]
    return all(s["op"] != "delete" for s in specs) and not any(
        a[:len(b)] == b or b[:len(a)] == a
        for i, a in enumerate(paths) for b in paths[i + 1:])


def check_twins(specs, doc, events_, context=None):
    plans = compile_both(specs, context)
    if plans is None:
        return
    p_ref, p_c = plans
    assert p_c.atomic == atomic(specs)
    for event in events_:
        pristine = copy.deepcopy(event.data)
        want = outcome(p_ref, doc, event)
        got = outcome(p_c, doc, event)
        assert got[:2] == want[:2]
        if got[0] == "error" and p_c.atomic:  # an atomic plan fails before it changes
            mine = copy.deepcopy(doc)  # anything
            with pytest.raises(MergeError):
                p_c.apply(mine, event)
            assert typed(mine) == typed(doc)
        assert typed(event.data) == typed(pristine)  # never mutated, by either
        if got[0] == "ok":  # a result shares nothing of the plan that a later apply uses
            private = copy.copy(event)  # (it may share the event's data: scramble a copy)
            private.data = copy.deepcopy(event.data)
            scramble(outcome(p_c, doc, private)[2])
            assert outcome(p_c, doc, event)[:2] == want[:2]


# ---------------------------------------------------------------------------------------
# generated plans


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(op_specs(), min_size=1, max_size=6), doc=documents,
       events_=st.lists(events, min_size=1, max_size=3))
def test_generated_plans_agree(specs, doc, events_):
    check_twins(specs, doc, events_)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(op_specs(), min_size=1, max_size=4),
       others=st.lists(op_specs(), max_size=4), doc=documents,
       events_=st.lists(events, min_size=1, max_size=2))
def test_generated_plans_with_view_context_agree(specs, others, doc, events_):
    check_twins(specs, doc, events_, context=specs + others)


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(op_specs(), min_size=1, max_size=5), doc=documents, event=events)
def test_apply_update_agrees(specs, doc, event):
    plans = compile_both(specs)
    if plans is None:
        return
    results = []
    for plan in plans:
        stored = {"v": 3, "d": copy.deepcopy(doc), "s": {"/other": [1, None]}}
        try:
            out = plan.apply_update(stored, event)
        except MergeError as e:
            results.append(("error", str(e), stored["v"], typed(stored["s"])))
            continue
        assert out is stored["d"]
        results.append(("ok", typed(stored["d"]), stored["v"], typed(stored["s"])))
    assert results[0] == results[1]
    if results[0][0] == "ok":
        assert results[0][2] == 4 and results[0][3] == typed(
            {"/other": [1, None], "/s": [event.sequence, event.time]})
    else:
        assert results[0][2] == 3


# ---------------------------------------------------------------------------------------
# fixed cases: error order, two phases, the example config


def ev(data=None, **attrs) -> Event:
    base = {"id": "e1", "source": "/s", "type": "t", "partitionkey": "k"}
    base.update(attrs)
    return Event(data=data, **base)


@pytest.mark.parametrize("specs, doc, data", [
    # a document error of op 0 comes before an event error of op 1
    ([{"op": "add", "path": "a", "value": 1}, {"op": "set", "path": "x", "from": "data.q"}],
     {"a": "str"}, {}),
    ([{"op": "set", "path": "a.b", "value": 1}, {"op": "add", "path": "a.b.c", "value": 1},
      {"op": "set", "path": "x", "from": "data.q"}], None, {}),
    # an event error of op 1 after op 0 made op 2's path fine
    ([{"op": "set", "path": "a", "value": {}}, {"op": "set", "path": "x", "from": "data.q"}],
     {"a": 5}, {}),
    # delete before the failing op
    ([{"op": "delete"}, {"op": "upsert", "path": "c", "id": "data.i", "from": "data"}],
     {"c": 1}, {"i": [1]}),
    ([{"op": "merge", "path": "m", "from": "data.x"}], {}, {"x": [1]}),
    ([{"op": "upsert", "path": "c", "id": "data.i", "from": "data", "fields": ["a"]}], {},
     {"i": True}),
    ([{"op": "set", "path": "c", "from": "data", "fields": ["a"]}], {}, [1]),
])
def test_error_order_matches(specs, doc, data):
    check_twins(specs, doc, [ev(data)])


ATOMIC_PLAN = [{"op": "add", "path": "n", "value": 1},
               {"op": "set", "path": "s", "from": "data.s"},
               {"op": "upsert", "path": "c.x", "id": "id", "from": "data"},
               {"op": "add", "path": "a.b", "value": 1}]


@pytest.mark.parametrize("doc", [
    {"a": {"b": "x"}},  # add to a string (the last op)
    {"a": [1]},  # a path through a list
    {"c": {"x": 5}},  # upsert into a number
    {"n": True},  # add to a bool (the first op)
])
def test_atomic_plan_document_error_leaves_document_untouched(doc):
    """An atomic plan checks the document before it changes it: the ops before the failing
    one would apply, and yet nothing changed; the error is the reference's."""
    plan = _merge.compile_ops(ATOMIC_PLAN)
    assert plan.atomic
    check_twins(ATOMIC_PLAN, doc, [ev({"s": 1})])
    before = copy.deepcopy(doc)
    with pytest.raises(MergeError):
        plan.apply(doc, ev({"s": 1}))
    assert typed(doc) == typed(before)


def test_atomic_rule():
    assert _merge.compile_ops([{"op": "delete"}]).atomic
    assert not _merge.compile_ops([{"op": "add", "path": "a", "value": 1},
                                   {"op": "delete"}]).atomic
    assert not _merge.compile_ops([{"op": "set", "path": "a", "value": {}},
                                   {"op": "add", "path": "a.b", "value": 1}]).atomic
    assert not _merge.compile_ops([{"op": "merge", "path": "", "value": {}},
                                   {"op": "add", "path": "b", "value": 1}]).atomic
    assert _merge.compile_ops([{"op": "add", "path": "s.a", "value": 1},
                               {"op": "add", "path": "s.b", "value": 1}]).atomic
    for specs, view_specs in example_feeds():
        assert _merge.compile_ops(specs, view_specs).atomic


def test_event_error_leaves_document_untouched():
    """Phase 1 reads every event value before the document changes."""
    plan = _merge.compile_ops([{"op": "add", "path": "n", "value": 1},
                               {"op": "set", "path": "x", "from": "data.missing"}])
    doc = {"n": 1}
    with pytest.raises(MergeError, match=r"op #1 \(set 'x'\): event has no 'data.missing'"):
        plan.apply(doc, ev({}))
    assert doc == {"n": 1}


def example_feeds():
    cfg = tomllib.loads(EXAMPLE.read_text())
    for view in cfg["views"].values():
        view_specs = [op for f in view["feeds"] for op in f["ops"]]
        for feed in view["feeds"]:
            yield feed["ops"], view_specs


@settings(max_examples=300, deadline=None)
@given(doc=documents, data=objects, attrs=st.fixed_dictionaries({
    "sequence": st.integers(0, 100), "time": st.just("2024-01-01T00:00:00Z")}))
def test_example_feeds_agree(doc, data, attrs):
    for specs, view_specs in example_feeds():
        check_twins(specs, doc, [ev(data, **attrs)], context=view_specs)


def test_simulated_shop_workload_agrees():
    """The shop's feeds over the simulator's events (in order, each to its view key): the
    same documents after every event, from both implementations."""
    cfg = tomllib.loads(EXAMPLE.read_text())
    by_event: dict[tuple[str, str], list] = {}
    for view_name, view in cfg["views"].items():
        view_specs = [op for f in view["feeds"] for op in f["ops"]]
        for feed in view["feeds"]:
            plans = compile_both(feed["ops"], view_specs)
            key = None if feed["key"] == "partitionkey" else feed["key"].split(".")[1:]
            for t in feed["types"]:
                by_event.setdefault((feed["source"], t), []).append((view_name, key, plans))
    docs: dict[tuple, list] = {}
    applied = 0
    for sim in simulate.generate(3, 3000).events:
        event = Event(data=sim.data, **sim.attributes())
        for view_name, key, (p_ref, p_c) in by_event.get((sim.source_name, sim.type), ()):
            k = sim.partitionkey if key is None else str(ref.get_path(sim.data, key))
            pair = docs.setdefault((view_name, k), [None, None])
            pair[0] = p_ref.apply(copy.deepcopy(pair[0]), event)
            pair[1] = p_c.apply(copy.deepcopy(pair[1]), event)
            assert typed(pair[1]) == typed(pair[0])
            applied += 1
    assert applied > 3000 and len(docs) > 100


# ---------------------------------------------------------------------------------------
# selection (merger.py)


def test_merger_selects_the_implementation():
    from aggregator import core, merger

    if core.IMPLEMENTATION == "python":
        assert merger.IMPLEMENTATION == "python" and merger.compile_ops is ref.compile_ops
    else:
        assert merger.IMPLEMENTATION == "cython" and merger.compile_ops is _merge.compile_ops


def _import_merger_without_extension(pure: str) -> subprocess.CompletedProcess:
    code = ("import sys; sys.modules['aggregator._merge'] = None\n"
            "import aggregator.merger as m; print(m.IMPLEMENTATION)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, AGGREGATOR_PURE_CORE=pure))


def test_merger_fails_loudly_without_the_extension():
    res = _import_merger_without_extension("")
    assert res.returncode != 0 and "aggregator._merge" in res.stderr
    assert "AGGREGATOR_PURE_CORE=1" in res.stderr


def test_merger_pure_needs_no_extension():
    res = _import_merger_without_extension("1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "python"
