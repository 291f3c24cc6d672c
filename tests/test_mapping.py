"""Input mapping (aggregator/mapping.py): every attribute source kind, every error, the
routing key agreeing with the parsed partition key, and the config checks."""

from __future__ import annotations

import json
import tomllib

import pytest

from aggregator.config import ConfigError, config_from_dict
from aggregator.envelope import EnvelopeError
from aggregator.mapping import REASONS, apply, compile_plan, resolved_specs, route
from tests.support.service import SHOP


def plan(fmt="outbox", name="orders", payload="value", key_format="string", **given):
    return compile_plan(fmt, name, resolved_specs(fmt, name, given), payload, key_format)


def outbox_value(payload, as_string):
    """The value as the outbox relay writes it: the payload column as JSON, or (the
    default, without table.expand.json.payload) a JSON string holding its text."""
    text = json.dumps(payload)
    return json.dumps(text).encode() if as_string else text.encode()


def err(p, value=b"{}", headers=None, key=b"k", offset=1, ts=1, **kw) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as ei:
        apply(p, value, headers, key, offset, ts, **kw)
    assert ei.value.reason in REASONS
    return ei.value


@pytest.mark.parametrize("as_string", [False, True])
def test_outbox_defaults_both_payload_encodings(as_string):
    p = plan(type="header:eventType")
    payload = {"order_id": "o-1", "lines": [{"sku": "a"}]}
    headers = [("id", b"4d47e190"), ("eventType", b"OrderCreated"), ("aggregatetype", b"Order")]
    ev = apply(p, outbox_value(payload, as_string), headers, b"o-1", 42, 1556890294484)
    assert (ev.id, ev.source, ev.type, ev.partitionkey, ev.sequence) == \
        ("4d47e190", "/orders", "OrderCreated", "o-1", 43)
    assert ev.time == "2019-05-03T13:31:34.484Z"
    assert ev.data == payload and ev.datacontenttype == "application/json"
    assert route(p, outbox_value(payload, as_string), headers, b"o-1") == b"o-1"


def test_offset_zero_is_the_first_sequence():
    ev = apply(plan(), b"{}", [("id", b"e"), ("type", b"t")], b"k", 0, 0)
    assert ev.sequence == 1  # initial_sequence = 1: not stale


def test_every_kind():
    p = plan("json", "svc", id="value.meta.id", source="header:src", type="data.kind",
             time="data.at", subject="kafka:key", partitionkey="data.items.1.k",
             sequence="header:ver", payload="value.body")
    value = json.dumps({"meta": {"id": 9}, "body": {"kind": "t", "at": "2020-01-01T00:00:00Z",
                                                      "items": [{"k": "a"}, {"k": "b"}]}})
    ev = apply(p, value.encode(), [("src", b"/s"), ("ver", b"17")], b"subj", 3, 5)
    assert (ev.id, ev.source, ev.type, ev.time, ev.subject, ev.partitionkey, ev.sequence) == \
        ("9", "/s", "t", "2020-01-01T00:00:00Z", "subj", "b", 17)
    assert ev.data["kind"] == "t"
    assert route(p, value.encode(), [], b"subj") == b"b"
    lit = plan("json", "svc", id="data.id", type="literal:x.y", source="literal:/lit",
               partitionkey="literal:one", time="literal:2020-01-01T00:00:00Z")
    ev = apply(lit, b'{"id": "a"}', None, None, 0, 0)
    assert (ev.source, ev.type, ev.partitionkey, ev.time, ev.sequence) == \
        ("/lit", "x.y", "one", "2020-01-01T00:00:00Z", None)
    assert route(lit, b'{"id": "a"}', None, None) == b"one"


def test_first_header_wins_and_json_keys():
    p = plan(key_format="json")
    hs = [("id", b"first"), ("id", b"second"), ("type", b"t")]
    assert apply(p, b"{}", hs, b'"k-1"', 0, 0).partitionkey == "k-1"
    connect = json.dumps({"schema": {"type": "string"}, "payload": "k-2"}).encode()
    assert apply(p, b"{}", hs, connect, 0, 0).id == "first"
    assert apply(p, b"{}", hs, connect, 0, 0).partitionkey == "k-2"
    assert route(p, b"{}", hs, connect) == b"k-2"
    assert apply(p, b"{}", hs, b"12", 0, 0).partitionkey == "12"


def test_null_value_is_an_event_without_data():
    p = plan()
    ev = apply(p, None, [("id", b"e"), ("type", b"t")], b"k", 0, 0)
    assert ev.data is None and ev.time is None  # no timestamp: time is optional


@pytest.mark.parametrize("kw,reason,words", [
    ({"headers": [("type", b"t")]}, "missing_attribute", ["'id'", "header:id", "outbox"]),
    ({"headers": [("id", b"e")]}, "missing_attribute", ["'type'", "header:type"]),
    ({"headers": [("id", b""), ("type", b"t")]}, "missing_attribute", ["empty", "'id'"]),
    ({"headers": [("id", b"\xff"), ("type", b"t")]}, "bad_encoding", ["'id'"]),
    ({"headers": [("id", b"e"), ("type", b"t")], "key": None}, "no_partition_key",
     ["kafka:key"]),
    ({"headers": [("id", b"e"), ("type", b"t")], "key": b"\xff"}, "bad_encoding", ["key"]),
    ({"headers": [("id", b"e"), ("type", b"t")], "key": b"k" * 20, "max_key_bytes": 10},
     "key_too_long", ["partitionkey"]),
    ({"headers": [("id", b"e"), ("type", b"t")], "value": b"{", }, "bad_json", ["value"]),
    ({"headers": [("id", b"e"), ("type", b"t")], "value": b'"{oops"'}, "bad_json",
     ["payload"]),
    ({"headers": [("id", b"e"), ("type", b"t")], "value": b"x" * 11, "max_bytes": 10},
     "too_large", ["11 bytes"]),
])
def test_outbox_errors(kw, reason, words):
    e = err(plan(), **kw)
    assert e.reason == reason
    for w in words:
        assert w in e.message


def test_json_errors():
    p = plan("json", "svc", id="data.id", type="data.type", sequence="data.version")
    assert err(p, b'{"id": [1], "type": "t"}').reason == "invalid_attribute"
    e = err(p, b'{"id": true, "type": "t"}')
    assert e.reason == "invalid_attribute" and "boolean" in e.message
    e = err(p, b'{"id": "a", "type": "t", "version": -1}')
    assert e.reason == "bad_sequence" and "data.version" in e.message
    assert err(p, b'{"id": "a", "type": "t", "version": "x"}').reason == "bad_sequence"
    e = err(p, b'{"type": "t"}')
    assert e.reason == "missing_attribute" and "json mapping of source 'svc'" in e.message
    t = plan("json", "svc", id="data.id", type="data.type", time="data.at")
    assert err(t, b'{"id": "a", "type": "t", "at": 5}').reason == "invalid_attribute"
    pk = plan("json", "svc", id="data.id", type="data.type", partitionkey="data.k")
    assert err(pk, b'{"id": "a", "type": "t"}').reason == "no_partition_key"
    assert route(pk, b'{"id": "a", "type": "t"}', None, b"kafka") is None
    assert route(pk, b"{", None, b"kafka") is None  # unreadable: routed anywhere, then DLQ
    env = plan("json", "svc", id="data.id", type="data.type", payload="value.payload")
    assert err(env, b"[1]").reason == "bad_json"
    assert apply(env, b'{"payload": "{\\"id\\": \\"i\\", \\"type\\": \\"t\\"}"}', None, b"k",
                 0, 0).id == "i"


def shop(**sources) -> dict:
    data = tomllib.loads(SHOP.read_text())
    for name, extra in sources.items():
        data["sources"][name].update(extra)
    return data


def config_errors(data) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data)
    return ei.value.errors


@pytest.mark.parametrize("extra,path,words", [
    ({"format": "json"}, "sources.orders.mapping.id", "required"),
    ({"format": "xml"}, "sources.orders.format", "cloudevents"),
    ({"mapping": {"id": "data.id"}}, "sources.orders.mapping", "only for format"),
    ({"format": "outbox", "structured": "detect"}, "sources.orders.structured", "only for"),
    ({"format": "outbox", "mapping": {"id": "header:"}}, "sources.orders.mapping.id",
     "header name"),
    ({"format": "outbox", "mapping": {"id": "data..x"}}, "sources.orders.mapping.id",
     "bad path"),
    ({"format": "outbox", "mapping": {"id": "literal:x"}}, "sources.orders.mapping.id",
     "cannot come from literal"),
    ({"format": "outbox", "mapping": {"sequence": "kafka:timestamp"}},
     "sources.orders.mapping.sequence", "cannot come from kafka:timestamp"),
    ({"format": "outbox", "mapping": {"time": "kafka:offset"}},
     "sources.orders.mapping.time", "cannot come from kafka:offset"),
    ({"format": "outbox", "mapping": {"payload": "data.x"}}, "sources.orders.mapping.payload",
     "value.<path>"),
    ({"format": "outbox", "ordering": "strict"}, "sources.orders.ordering", "latest"),
    ({"format": "outbox", "mapping": {"key_format": "avro"}},
     "sources.orders.mapping.key_format", "string"),
])
def test_config_errors_name_the_field(extra, path, words):
    errors = config_errors(shop(orders=extra))
    assert any(p == path and words in m for p, m in errors), errors


def test_fingerprint():
    base = config_from_dict(shop())
    same = config_from_dict(shop(orders={"format": "cloudevents"}))
    assert base.fingerprint() == same.fingerprint()
    outbox = config_from_dict(shop(orders={"format": "outbox"}))
    assert outbox.fingerprint() != base.fingerprint()
    spelt = config_from_dict(shop(orders={"format": "outbox", "mapping": {"id": "header:id"}}))
    assert spelt.fingerprint() == outbox.fingerprint()  # defaults spelt out: same meaning
    other = config_from_dict(shop(orders={"format": "outbox",
                                          "mapping": {"id": "header:event_id"}}))
    assert other.fingerprint() != outbox.fingerprint()


def test_a_bad_mapping_stops_run_with_exit_2(tmp_path):
    from tests.support.cliproc import aggregator, one_error_line

    text = SHOP.read_text().replace('bootstrap_servers = ""', 'bootstrap_servers = "127.0.0.1:1"')
    text += '\n[sources.orders.mapping]\ntype = "kafka:offset"\n'
    text = text.replace('topic = "shop.orders"', 'topic = "shop.orders"\nformat = "outbox"')
    (tmp_path / "bad.toml").write_text(text)
    r = aggregator("run", "--config", tmp_path / "bad.toml", "--data-dir", tmp_path / "d")
    assert r.returncode == 2
    assert one_error_line(r) == (
        "config error: sources.orders.mapping.type: type cannot come from kafka:offset "
        "(allowed: data, header, kafka:key, literal, value)")
