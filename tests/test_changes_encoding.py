"""Change-event data encoding (changes.ChangeEncoder): orjson, identical to the standard
library's compact UTF-8 JSON, with its fallback for what orjson refuses."""

from __future__ import annotations

import json

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.changes import ChangeEncoder
from aggregator.config import config_from_dict


def encoder(fmt: str) -> ChangeEncoder:
    cfg = config_from_dict({
        "kafka": {"bootstrap_servers": "x", "group_id": "g"},
        "changes": {"format": fmt},
        "sources": {"s": {"topic": "src"}},
        "views": {"v": {"changes_topic": "c", "feeds": [
            {"source": "s", "types": ["t"], "key": "partitionkey",
             "ops": [{"op": "set", "path": "x", "from": "data"}]}]}},
    }, env={})
    return ChangeEncoder(cfg, ["v"])


def stdlib(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


documents = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), documents, max_size=6))
def test_json_means_what_the_standard_library_says(doc):
    got = encoder("json").encode(doc)
    assert json.loads(got) == json.loads(stdlib(doc))
    if not has_float(doc):  # floats may be written differently (1e-05 / 0.00001)
        assert got == stdlib(doc)


def has_float(x) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, dict):
        return any(has_float(v) for v in x.values())
    return isinstance(x, list) and any(has_float(v) for v in x)


def test_what_orjson_refuses_falls_back():
    enc = encoder("json")
    assert enc.encode({"n": 2**70}) == b'{"n":1180591620717411303424}'
    assert enc.encode({"b": b"\x00\x01", 1: "é"}) == '{"b":"AAE=","1":"é"}'.encode()
    assert json.loads(enc.encode({"s": "\ud800é"})) == {"s": "\ud800é"}  # lone surrogate
    assert enc.encode(None) is None  # a tombstone


def test_msgpack_format():
    doc = {"a": [1, "x", {"b": None}]}
    assert msgpack.unpackb(encoder("msgpack").encode(doc)) == doc
