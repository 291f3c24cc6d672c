"""Merge ops: each op, paths, projection, tombstones, errors, config errors, aliasing.

Every test runs against both implementations (the module-scoped `impl` fixture swaps this
module's `compile_ops` and `MergePlan`): the reference merge.py and the compiled _merge.
"""

from __future__ import annotations

import copy
import datetime
import pathlib
import sys
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import merge as merge_ref
from aggregator.envelope import Event
from aggregator.merge import (
    MergeConfigError,
    MergeError,
    MergePlan,
    compile_ops,
    compile_path,
    get_path,
)

try:
    from aggregator import _merge
except ImportError:  # only acceptable when the pure core is forced
    _merge = None

IMPLS = [merge_ref] + ([_merge] if _merge is not None else [])


@pytest.fixture(scope="module", autouse=True, params=IMPLS,
                ids=lambda m: "python" if m is merge_ref else "cython")
def impl(request):
    """Run the module's tests with this implementation's compile_ops and MergePlan."""
    mod = sys.modules[__name__]
    saved = mod.compile_ops, mod.MergePlan
    mod.compile_ops, mod.MergePlan = request.param.compile_ops, request.param.MergePlan
    yield request.param
    mod.compile_ops, mod.MergePlan = saved

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "shop.toml"


def ev(data=None, **attrs) -> Event:
    base = {"id": "e1", "source": "/s", "type": "t", "partitionkey": "k"}
    base.update(attrs)
    return Event(data=data, **base)


def run(specs, doc, event):
    return compile_ops(specs).apply(doc, event)


# ---------------------------------------------------------------------------------------
# ops


def test_set_from_data_and_literal_and_attributes():
    e = ev({"a": {"b": 5}}, time="2024-01-01T00:00:00Z", subject="sub")
    assert run([{"op": "set", "path": "x", "from": "data"}], None, e) == {"x": {"a": {"b": 5}}}
    assert run([{"op": "set", "path": "x.y.z", "from": "data.a.b"}], {}, e) == {
        "x": {"y": {"z": 5}}
    }
    assert run([{"op": "set", "path": "flag", "value": True}], {"k": 1}, e) == {
        "k": 1,
        "flag": True,
    }
    specs = [
        {"op": "set", "path": "m." + f, "from": f}
        for f in ("id", "source", "type", "time", "subject", "partitionkey")
    ]
    assert run(specs, None, e) == {
        "m": {
            "id": "e1",
            "source": "/s",
            "type": "t",
            "time": "2024-01-01T00:00:00Z",
            "subject": "sub",
            "partitionkey": "k",
        }
    }


def test_set_explicit_null_from_data_is_a_value():
    assert run([{"op": "set", "path": "x", "from": "data.a"}], {}, ev({"a": None})) == {"x": None}


def test_set_replaces_null_intermediate_but_not_scalar():
    plan = compile_ops([{"op": "set", "path": "a.b", "value": 1}])
    assert plan.apply({"a": None}, ev()) == {"a": {"b": 1}}
    with pytest.raises(MergeError, match="'a' is not an object"):
        plan.apply({"a": 3}, ev())


def test_fields_projection():
    data = {"status": "paid", "amount_cents": 100, "secret": "x"}
    specs = [
        {"op": "set", "path": "p", "from": "data", "fields": ["status", "amount_cents", "nope"]}
    ]
    assert run(specs, None, ev(data)) == {"p": {"status": "paid", "amount_cents": 100}}
    with pytest.raises(MergeError, match="'fields' needs an object"):
        run([{"op": "set", "path": "p", "from": "data.status", "fields": ["a"]}], None, ev(data))
    specs = [{"op": "set", "path": "p", "value": {"a": 1, "b": 2}, "fields": ["a"]}]
    assert run(specs, None, ev()) == {"p": {"a": 1}}


def test_merge_into_path_and_root():
    doc = {"p": {"a": 1, "b": 1}, "keep": True}
    out = run([{"op": "merge", "path": "p", "from": "data"}], doc, ev({"b": 2, "c": 3}))
    assert out == {"p": {"a": 1, "b": 2, "c": 3}, "keep": True}
    out = run([{"op": "merge", "path": "", "from": "data"}], {"keep": True}, ev({"x": 1}))
    assert out == {"keep": True, "x": 1}
    out = run([{"op": "merge", "path": "new.p", "value": {"x": 1}}], None, ev())
    assert out == {"new": {"p": {"x": 1}}}
    specs = [{"op": "merge", "path": "p", "from": "data", "fields": ["a"]}]
    assert run(specs, None, ev({"a": 1, "b": 2})) == {"p": {"a": 1}}


def test_merge_errors():
    with pytest.raises(MergeError, match="merge needs an object"):
        run([{"op": "merge", "path": "p", "from": "data.x"}], None, ev({"x": 5}))
    with pytest.raises(MergeError, match="target is not an object"):
        run([{"op": "merge", "path": "p", "from": "data"}], {"p": [1]}, ev({"x": 5}))


def test_unset():
    plan = compile_ops([{"op": "unset", "path": "a.b"}])
    assert plan.apply({"a": {"b": 1, "c": 2}}, ev()) == {"a": {"c": 2}}
    assert plan.apply({"a": {"c": 2}}, ev()) == {"a": {"c": 2}}
    assert plan.apply({"a": 5}, ev()) == {"a": 5}
    assert plan.apply({}, ev()) == {}
    assert plan.apply(None, ev()) == {}  # a None document starts as {}


def test_upsert_and_remove():
    up = compile_ops(
        [{"op": "upsert", "path": "orders", "id": "data.order_id", "from": "data",
          "fields": ["status", "amount_cents"]}]
    )  # fmt: skip
    doc = up.apply(None, ev({"order_id": "o1", "status": "placed", "amount_cents": 5, "x": 1}))
    assert doc == {"orders": {"o1": {"status": "placed", "amount_cents": 5}}}
    doc = up.apply(doc, ev({"order_id": "o1", "status": "paid"}))
    doc = up.apply(doc, ev({"order_id": 2, "status": "placed"}))  # ids become str
    assert doc == {"orders": {"o1": {"status": "paid"}, "2": {"status": "placed"}}}

    rm = compile_ops([{"op": "remove", "path": "orders", "id": "data.order_id"}])
    doc = rm.apply(doc, ev({"order_id": 2}))
    assert doc == {"orders": {"o1": {"status": "paid"}}}
    assert rm.apply(doc, ev({"order_id": "missing"})) == {"orders": {"o1": {"status": "paid"}}}
    assert rm.apply({}, ev({"order_id": "o1"})) == {}
    assert rm.apply({"orders": 5}, ev({"order_id": "o1"})) == {"orders": 5}


def test_upsert_id_from_event_attribute_and_nested_collection():
    specs = [{"op": "upsert", "path": "a.b", "id": "id", "value": 1}]
    assert run(specs, None, ev(id="x1")) == {"a": {"b": {"x1": 1}}}


def test_upsert_remove_errors():
    up = compile_ops([{"op": "upsert", "path": "c", "id": "data.i", "from": "data"}])
    with pytest.raises(MergeError, match="event has no 'data.i'"):
        up.apply({}, ev({"x": 1}))
    for bad in (True, None, [1], {"a": 1}):
        with pytest.raises(MergeError, match="entry id"):
            up.apply({}, ev({"i": bad}))
    with pytest.raises(MergeError, match="collection is not an object"):
        up.apply({"c": [1]}, ev({"i": "a"}))
    rm = compile_ops([{"op": "remove", "path": "c", "id": "data.i"}])
    with pytest.raises(MergeError):
        rm.apply({"c": {}}, ev({}))


def test_add():
    plan = compile_ops([{"op": "add", "path": "s.total", "from": "data.n"}])
    doc = plan.apply(None, ev({"n": 5}))
    assert doc == {"s": {"total": 5}}
    doc = plan.apply(doc, ev({"n": 2.5}))
    assert doc == {"s": {"total": 7.5}}
    assert plan.apply({"s": {"total": None}}, ev({"n": 1})) == {"s": {"total": 1}}
    neg = compile_ops([{"op": "add", "path": "s.total", "from": "data.n", "negate": True}])
    assert neg.apply({"s": {"total": 10}}, ev({"n": 3})) == {"s": {"total": 7}}
    lit = compile_ops([{"op": "add", "path": "c", "value": -1}])
    assert lit.apply({"c": 1}, ev()) == {"c": 0}
    lit_neg = compile_ops([{"op": "add", "path": "c", "value": 2, "negate": True}])
    assert lit_neg.apply(None, ev()) == {"c": -2}


@pytest.mark.parametrize("bad", [True, False, "5", None, [1], {"a": 1}])
def test_add_non_numeric_event_value(bad):
    with pytest.raises(MergeError, match="not a number"):
        run([{"op": "add", "path": "c", "from": "data.n"}], {}, ev({"n": bad}))


@pytest.mark.parametrize("cur", [True, "5", [1], {"a": 1}])
def test_add_non_numeric_document_value(cur):
    with pytest.raises(MergeError, match="document value"):
        run([{"op": "add", "path": "c", "from": "data.n"}], {"c": cur}, ev({"n": 1}))
    with pytest.raises(MergeError, match="document value"):
        run([{"op": "add", "path": "c", "value": 1}], {"c": cur}, ev())


def test_delete_and_write_after_delete():
    assert run([{"op": "delete"}], {"a": 1}, ev()) is None
    assert run([{"op": "delete"}], None, ev()) is None
    specs = [{"op": "delete"}, {"op": "set", "path": "a", "value": 1}]
    assert run(specs, {"a": 0, "b": 2}, ev()) == {"a": 1}
    specs = [{"op": "delete"}, {"op": "unset", "path": "a"}]
    assert run(specs, {"a": 0}, ev()) is None
    specs = [{"op": "delete"}, {"op": "remove", "path": "a", "id": "id"}]
    assert run(specs, {"a": {"e1": 1}}, ev()) is None
    specs = [{"op": "delete"}, {"op": "add", "path": "n", "value": 1}]
    assert run(specs, {"n": 5}, ev()) == {"n": 1}
    specs = [{"op": "delete"}, {"op": "merge", "path": "", "from": "data"}]
    assert run(specs, {"n": 5}, ev({"x": 1})) == {"x": 1}
    specs = [{"op": "delete"}, {"op": "upsert", "path": "c", "id": "id", "value": 1}]
    assert run(specs, {"n": 5}, ev()) == {"c": {"e1": 1}}
    # pydantic-style dump: path "" and negate False on a delete are fine
    assert run([{"op": "delete", "path": "", "negate": False}], {"a": 1}, ev()) is None


@pytest.mark.parametrize(
    "source, data, attrs",
    [
        ("data", None, {}),
        ("data.a", None, {}),
        ("data.a", {"b": 1}, {}),
        ("data.a.b", {"a": 5}, {}),
        ("data.a.b", {"a": {"c": 1}}, {}),
        ("data.a", ["a"], {}),
        ("time", {}, {}),
        ("subject", {}, {}),
    ],
)
@pytest.mark.parametrize("op", ["set", "merge", "upsert", "add"])
def test_missing_source_value_raises(source, data, attrs, op):
    spec = {"op": op, "path": "p", "from": source}
    if op == "upsert":
        spec["id"] = "id"
    with pytest.raises(MergeError, match="event has no") as ei:
        run([spec], {}, ev(data, **attrs))
    assert ei.value.reason == "merge_error"
    assert "op #0" in str(ei.value)


def test_dotted_paths_do_not_touch_siblings():
    doc = {"a": {"b": {"c": 1, "d": 2}, "e": 3}}
    out = run([{"op": "set", "path": "a.b.c", "value": 9}], doc, ev())
    assert out == {"a": {"b": {"c": 9, "d": 2}, "e": 3}}


def test_apply_mutates_in_place():
    doc = {"n": 1}
    out = run([{"op": "add", "path": "n", "value": 1}], doc, ev())
    assert out is doc and doc == {"n": 2}


# ---------------------------------------------------------------------------------------
# aliasing: event data and plan literals are never mutated


ALIASING_PLANS = [
    [{"op": "set", "path": "x", "from": "data"}, {"op": "add", "path": "x.nested.n", "value": 1}],
    [{"op": "set", "path": "x", "from": "data"}, {"op": "unset", "path": "x.lst"}],
    [{"op": "merge", "path": "", "from": "data"}, {"op": "add", "path": "nested.n", "value": 5}],
    [{"op": "merge", "path": "p", "from": "data"}, {"op": "set", "path": "p.nested.z", "value": 0}],
    [
        {"op": "upsert", "path": "c", "id": "id", "from": "data"},
        {"op": "merge", "path": "c.e1.nested", "value": {"q": 1}},
    ],
    [{"op": "set", "path": "x", "from": "data.nested"}, {"op": "add", "path": "x.n", "value": 1}],
    [
        {"op": "set", "path": "x", "from": "data", "fields": ["nested"]},
        {"op": "set", "path": "x.nested.q", "value": 1},
    ],
]


@pytest.mark.parametrize("specs", ALIASING_PLANS)
def test_event_data_not_mutated_by_later_ops(specs):
    data = {"nested": {"n": 1}, "lst": [1]}
    pristine = copy.deepcopy(data)
    e = ev(data)
    out = run(specs, None, e)
    assert data == pristine
    out2 = run(specs, None, e)  # and the same result twice
    assert out == out2 and out


def test_values_shared_only_when_safe():
    data = {"nested": {"n": 1}}
    out = run([{"op": "set", "path": "x", "from": "data"}], None, ev(data))
    assert out["x"] is data  # no later op writes inside: no copy needed
    specs = [{"op": "set", "path": "x", "from": "data"}, {"op": "add", "path": "y", "value": 1}]
    assert run(specs, None, ev(data))["x"] is data
    specs = [{"op": "set", "path": "x", "from": "data"}, {"op": "delete"}]
    assert run(specs, None, ev(data)) is None
    out = run(ALIASING_PLANS[0], None, ev(data))
    assert out["x"]["nested"]["n"] == 2 and data["nested"]["n"] == 1


def test_literal_values_not_mutated_across_applies():
    plan = compile_ops(
        [
            {"op": "set", "path": "stats", "value": {"count": 0, "tags": []}},
            {"op": "add", "path": "stats.count", "value": 1},
        ]
    )
    assert plan.apply(None, ev()) == {"stats": {"count": 1, "tags": []}}
    assert plan.apply(None, ev()) == {"stats": {"count": 1, "tags": []}}
    plan = compile_ops([{"op": "merge", "path": "", "value": {"d": {"x": 1}}}])
    first = plan.apply(None, ev())
    first["d"]["x"] = 99  # a caller mutating the result must not change the plan
    assert plan.apply(None, ev()) == {"d": {"x": 1}}


# ---------------------------------------------------------------------------------------
# config errors


@pytest.mark.parametrize(
    "specs, match",
    [
        ([], "non-empty list"),
        ("set", "non-empty list"),
        (["set"], r"op #0: must be a table"),
        ([{"path": "a"}], r"op #0: missing 'op'"),
        ([{"op": "frobnicate", "path": "a"}], r"op #0: unknown op 'frobnicate'"),
        ([{"op": "set", "path": "a", "value": 1}, {"op": "sett"}], r"op #1: unknown op 'sett'"),
        ([{"op": "set", "from": "data"}], r"op #0 .*missing 'path'"),
        ([{"op": "set", "path": "", "from": "data"}], r"op #0 .*'path' must not be empty"),
        ([{"op": "set", "path": 5, "from": "data"}], r"'path' must be a string"),
        ([{"op": "set", "path": "a..b", "from": "data"}], r"empty segment"),
        ([{"op": "set", "path": "a"}], r"op #0 .*exactly one of 'from' or 'value'"),
        ([{"op": "add", "path": "a", "from": "data", "value": 1}], r"exactly one of"),
        ([{"op": "merge", "path": "a"}], r"exactly one of"),
        ([{"op": "unset", "path": "a", "value": 1}], r"'value' is not allowed for unset"),
        ([{"op": "remove", "path": "a", "id": "id", "from": "data"}], r"'from' is not allowed"),
        ([{"op": "upsert", "path": "a", "from": "data"}], r"missing 'id'"),
        ([{"op": "remove", "path": "a"}], r"missing 'id'"),
        ([{"op": "set", "path": "a", "from": "data", "id": "id"}], r"'id' is only allowed"),
        ([{"op": "set", "path": "a", "from": "data", "negate": True}], r"'negate' is only"),
        ([{"op": "add", "path": "a", "from": "data", "negate": "yes"}], r"'negate' must be"),
        ([{"op": "set", "path": "a", "from": "data", "fields": "status"}], r"'fields' must be"),
        ([{"op": "set", "path": "a", "from": "data", "fields": []}], r"'fields' must be"),
        ([{"op": "add", "path": "a", "from": "data", "fields": ["x"]}], r"'fields' is only"),
        ([{"op": "set", "path": "a", "value": 1, "fields": ["x"]}], r"'fields' needs an object"),
        ([{"op": "set", "path": "a", "from": "payload"}], r"'from' must start with one of"),
        ([{"op": "set", "path": "a", "from": ""}], r"'from' must be a non-empty"),
        ([{"op": "set", "path": "a", "from": "id.x"}], r"only 'data' has sub-fields"),
        ([{"op": "set", "path": "a", "from": "data..x"}], r"empty segment"),
        ([{"op": "upsert", "path": "a", "id": "nope", "value": 1}], r"'id' must start with"),
        ([{"op": "set", "path": "a", "form": "data"}], r"unknown field\(s\) form"),
        ([{"op": "add", "path": "a", "value": "1"}], r"'value' must be a number"),
        ([{"op": "add", "path": "a", "value": True}], r"'value' must be a number"),
        ([{"op": "merge", "path": "a", "value": 1}], r"'value' must be a table"),
        (
            [{"op": "set", "path": "a", "value": datetime.date(2024, 1, 1)}],
            r"'value' of type date is not JSON-like",
        ),
        ([{"op": "set", "path": "a", "value": {1: "x"}}], r"keys must be strings"),
        ([{"op": "add", "path": "a", "value": float("nan")}], r"finite number"),
        ([{"op": "set", "path": "a", "value": [float("inf")]}], r"finite number"),
        ([{"op": "delete", "path": "a"}], r"op #0 \(delete\): 'path' is not allowed"),
        ([{"op": "delete", "value": 1}], r"op #0 \(delete\): 'value' is not allowed"),
    ],
)
def test_config_errors(specs, match):
    with pytest.raises(MergeConfigError, match=match):
        compile_ops(specs)


def test_config_error_is_value_error():
    assert issubclass(MergeConfigError, ValueError)


# ---------------------------------------------------------------------------------------
# get_path


def test_get_path():
    e = ev({"customer_id": 7, "a": {"b": "x"}})
    assert get_path(e, "data.customer_id") == 7
    assert get_path(e.data, "a.b") == "x"
    assert get_path(e.data, ("a", "b")) == "x"
    assert get_path(e, "partitionkey") == "k"
    assert str(get_path(e.data, compile_path("customer_id"))) == "7"
    for bad in ("data.missing", "data.a.b.c", "data.a.b.upper", "nope", "_secret", "data.a.x"):
        with pytest.raises(KeyError):
            get_path(e, bad)
    with pytest.raises(KeyError):
        get_path("abc", "upper")
    with pytest.raises(KeyError):
        get_path({"a": 1}, "a.b")


def test_compile_path():
    assert compile_path("a.b") == ("a", "b")
    assert compile_path("") == ()
    assert compile_path(["x"]) == ("x",)


# ---------------------------------------------------------------------------------------
# the example config


def example_feeds():
    cfg = tomllib.loads(EXAMPLE.read_text())
    for view_name, view in cfg["views"].items():
        for feed in view["feeds"]:
            yield view_name, feed


def test_example_config_compiles():
    feeds = list(example_feeds())
    assert feeds
    for _, feed in feeds:
        plan = compile_ops(feed["ops"])
        assert isinstance(plan, MergePlan) and len(plan) == len(feed["ops"])


def test_example_product_reviews():
    feeds = {(v, f["source"], f["types"][0]): compile_ops(f["ops"]) for v, f in example_feeds()}
    posted = feeds[("product", "reviews", "shop.review.posted")]
    deleted = feeds[("product", "reviews", "shop.review.deleted")]
    doc = None
    for rid, rating in (("r1", 5), ("r2", 3)):
        data = {"review_id": rid, "rating": rating, "customer_id": "c1", "product_id": "p1"}
        doc = posted.apply(doc, ev(data))
    assert doc == {
        "reviews": {
            "r1": {"rating": 5, "customer_id": "c1"},
            "r2": {"rating": 3, "customer_id": "c1"},
        },
        "rating_sum": 8,
        "review_count": 2,
    }
    doc = deleted.apply(doc, ev({"review_id": "r1", "rating": 5, "product_id": "p1"}))
    assert doc == {
        "reviews": {"r2": {"rating": 3, "customer_id": "c1"}},
        "rating_sum": 3,
        "review_count": 1,
    }

    customer = feeds[("customer", "customers", "shop.customer.upserted")]
    gone = feeds[("customer", "customers", "shop.customer.deleted")]
    doc = customer.apply(None, ev({"name": "Ann"}))
    assert doc == {"profile": {"name": "Ann"}}
    assert gone.apply(doc, ev(None)) == {}


# ---------------------------------------------------------------------------------------
# property: add sums


numbers = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False)
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(numbers, st.booleans(), st.booleans()),  # (amount, negate, literal)
        min_size=1,
        max_size=30,
    ),
    one_plan=st.booleans(),
)
def test_random_adds_sum(steps, one_plan):
    specs = []
    for i, (amount, negate, literal) in enumerate(steps):
        spec = {"op": "add", "path": "stats.total", "negate": negate}
        if literal:
            spec["value"] = amount
        else:
            spec["from"] = f"data.v{i}"
        specs.append(spec)
    data = {f"v{i}": amount for i, (amount, _, _) in enumerate(steps)}
    expected = 0
    for amount, negate, _ in steps:
        expected += -amount if negate else amount
    e = ev(data)
    if one_plan:
        doc = compile_ops(specs).apply(None, e)
    else:
        doc = None
        for spec in specs:
            doc = compile_ops([spec]).apply(doc, e)
    assert doc == {"stats": {"total": expected}}
    assert type(doc["stats"]["total"]) is type(expected)


# property: no random plan ever mutates event.data, and applying is repeatable

DOC_PATHS = ["a", "a.b", "a.b.c", "b", "a.n", "a.b.n"]
op_specs = st.one_of(
    st.builds(
        lambda op, p, src: {"op": op, "path": p, "from": src},
        st.sampled_from(["set", "merge"]),
        st.sampled_from(DOC_PATHS + [""]),
        st.sampled_from(["data", "data.a", "data.a.b"]),
    ).filter(lambda s: s["path"] or s["op"] == "merge"),
    st.builds(
        lambda p, src: {"op": "upsert", "path": p, "id": "data.id", "from": src},
        st.sampled_from(DOC_PATHS),
        st.sampled_from(["data", "data.a"]),
    ),
    st.builds(lambda p: {"op": "add", "path": p, "value": 1}, st.sampled_from(DOC_PATHS)),
    st.builds(lambda p: {"op": "unset", "path": p}, st.sampled_from(DOC_PATHS)),
    st.builds(lambda p: {"op": "remove", "path": p, "id": "data.id"}, st.sampled_from(DOC_PATHS)),
    st.builds(
        lambda p: {"op": "merge", "path": p, "value": {"n": 0, "q": {"r": 1}}},
        st.sampled_from(DOC_PATHS + [""]),
    ),
    st.just({"op": "delete"}),
)


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(op_specs, min_size=1, max_size=6))
def test_random_plans_never_mutate_event_data(specs):
    data = {"id": "b", "n": 1, "a": {"n": 1, "b": {"n": 1, "c": {"n": 1}}}, "b": {"c": 2}}
    pristine = copy.deepcopy(data)
    plan = compile_ops(specs)
    results = []
    for _ in range(2):
        try:
            results.append(plan.apply(None, ev(data)))
        except MergeError as err:
            results.append(str(err))
        assert data == pristine
    assert results[0] == results[1]
