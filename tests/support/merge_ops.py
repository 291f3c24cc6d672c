"""Hypothesis strategies of merge-op specs and events, shared by the differential tests of
the merge engines (tests/test_merge_twins.py: compiled plans against merge.py;
tests/test_jdoc.py: the JSON-bytes engine against merge.py), each with its own values."""

from __future__ import annotations

from hypothesis import strategies as st

from aggregator import merge as ref
from aggregator.envelope import Event


def op_specs(*, doc_paths, event_paths, objects, json_values, fields, add_values):
    """A strategy of one op spec (every op of merge.OPS) drawn from these strategies:
    `add_values` for an `add`'s literal, `fields` for a projection."""

    @st.composite
    def spec(draw):
        op = draw(st.sampled_from(ref.OPS))
        out = {"op": op}
        if op == "delete":
            return out
        out["path"] = (draw(doc_paths) if op != "merge"
                       else draw(st.one_of(st.just(""), doc_paths)))
        if op in ("set", "merge", "upsert", "add"):
            if draw(st.booleans()):
                out["from"] = draw(event_paths)
            elif op == "add":
                out["value"] = draw(add_values)
            elif op == "merge":
                out["value"] = draw(objects)
            else:
                out["value"] = draw(json_values)
            if op != "add" and draw(st.integers(0, 3)) == 0:
                out["fields"] = draw(fields)
        if op in ("upsert", "remove"):
            out["id"] = draw(event_paths)
        if op == "add" and draw(st.booleans()):
            out["negate"] = True
        return out

    return spec()


def events(data, ids):
    """Events with `data` and an id of `ids`; time, subject and sequence sometimes set."""
    return st.builds(
        lambda d, attrs: Event(data=d, **attrs),
        data,
        st.fixed_dictionaries(
            {"id": ids, "source": st.just("/s"), "type": st.just("t"),
             "partitionkey": st.just("k")},
            optional={"time": st.just("2024-01-01T00:00:00Z"), "subject": st.just("sub"),
                      "sequence": st.integers(0, 2**63 - 1)},
        ),
    )
