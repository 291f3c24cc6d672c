"""CloudEvents over Kafka: round trips, every rejection reason, routing keys.

Every test runs over both parsers: the reference ``aggregator.envelope.parse`` and its
compiled twin ``aggregator._envelope.parse`` (when built). The module-scoped fixture
`_parser` rebinds this module's `parse` to each in turn; `routing_key` has one
implementation. tests/test_envelope_compiled.py compares the two on generated records.
"""

from __future__ import annotations

import base64
import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import envelope
from aggregator.devtools.encoder import to_binary, to_structured
from aggregator.envelope import (
    MAX_DEPTH,
    REASONS,
    EnvelopeError,
    Event,
    _decode_json,
    routing_key,
)

try:
    from aggregator import _envelope
except ImportError:  # only acceptable when the pure core is forced
    _envelope = None

PARSERS = [pytest.param(envelope.parse, id="reference")]
if _envelope is not None:
    PARSERS.append(pytest.param(_envelope.parse, id="compiled"))

parse = envelope.parse  # rebound by _parser


@pytest.fixture(scope="module", params=PARSERS, autouse=True)
def _parser(request):
    global parse
    parse = request.param
    yield request.param
    parse = envelope.parse

SECRET = "SECRET-PAYLOAD-7f3a"  # planted in every malformed payload; must never leak

ATTRS = {
    "id": "evt-1",
    "source": "/shop/orders",
    "type": "shop.order.placed",
    "time": "2024-05-01T12:00:00Z",
    "subject": "order-1",
    "partitionkey": "order-1",
    "sequence": 42,
}
DATA = {
    "order_id": "order-1",
    "customer_id": "cust-9",
    "amount_cents": 1234,
    "items": [{"sku": "A", "qty": 2}],
    "note": "héllo ✓ 😀",
}


def binary_headers(**over: object) -> list[tuple[str, bytes]]:
    attrs = {"specversion": "1.0", "id": "e1", "source": "/s", "type": "t"}
    attrs.update(over)
    return [(f"ce_{k}", v if isinstance(v, bytes) else str(v).encode()) for k, v in attrs.items()]


def structured(obj: dict) -> tuple[list[tuple[str, bytes]], bytes]:
    return [("content-type", b"application/cloudevents+json; charset=utf-8")], json.dumps(
        obj
    ).encode()


def base_obj(**over: object) -> dict:
    obj = {"specversion": "1.0", "id": "e1", "source": "/s", "type": "t", "partitionkey": "k"}
    obj.update(over)
    return obj


def reason_of(value, headers, key=b"k", **kw) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as ei:
        parse(value, headers, key, **kw)
    err = ei.value
    assert err.reason in REASONS
    # never the payload, never a chained exception holding it
    assert SECRET not in str(err) and SECRET not in repr(err)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return err


# ---------------------------------------------------------------------------------------
# round trips


def check_event(ev: Event, data=DATA) -> None:
    assert isinstance(ev, Event)
    assert (ev.id, ev.source, ev.type, ev.specversion) == (
        "evt-1",
        "/shop/orders",
        "shop.order.placed",
        "1.0",
    )
    assert ev.time == ATTRS["time"] and ev.subject == "order-1"
    assert ev.partitionkey == "order-1" and ev.sequence == 42
    assert ev.data == data


def test_binary_json_round_trip():
    headers, value = to_binary({**ATTRS, "traceparent": "00-abc"}, DATA)
    assert dict(headers)["ce_sequence"] == b"42"
    assert dict(headers)["content-type"] == b"application/json"
    ev = parse(value, headers, b"kafka-key")
    check_event(ev)
    assert ev.datacontenttype == "application/json"
    assert ev.extensions == {"traceparent": "00-abc"}


def test_binary_msgpack_round_trip_with_non_str_keys_and_bytes():
    data = {**DATA, 7: "seven", "blob": b"\x00\xff"}
    headers, value = to_binary(ATTRS, data, content_type="application/msgpack")
    ev = parse(value, headers, None)
    check_event(ev, data)
    for ct in ("application/x-msgpack", "application/vnd.msgpack"):
        headers, value = to_binary(ATTRS, data, content_type=ct)
        assert parse(value, headers, None).data == data


def test_binary_text_and_charset():
    headers, value = to_binary(ATTRS, "plain ✓", content_type="text/plain")
    assert parse(value, headers, None).data == "plain ✓"
    headers, value = to_binary(ATTRS, "café", content_type="text/plain; charset=ISO-8859-1")
    assert value == "café".encode("latin-1")
    assert parse(value, headers, None).data == "café"


def test_json_suffix_and_default_content_type():
    headers, value = to_binary(ATTRS, DATA, content_type="application/vnd.shop+json")
    assert parse(value, headers, None).data == DATA
    headers = [h for h in headers if h[0] != "content-type"]
    ev = parse(value, headers, None)  # no content-type: JSON
    assert ev.data == DATA and ev.datacontenttype is None


def test_structured_json_round_trip():
    headers, value = to_structured({**ATTRS, "datacontenttype": "application/json"}, DATA)
    assert json.loads(value)["sequence"] == "42"
    ev = parse(value, headers, b"ignored")
    check_event(ev)
    assert ev.extensions == {}


def test_structured_data_base64_msgpack_and_json_and_text():
    packed = msgpack.packb(DATA)
    headers, value = to_structured({**ATTRS, "datacontenttype": "application/msgpack"}, packed)
    assert "data_base64" in json.loads(value)
    check_event(parse(value, headers, None))
    raw = json.dumps(DATA).encode()
    headers, value = to_structured(ATTRS, raw)  # no datacontenttype: JSON
    check_event(parse(value, headers, None))
    headers, value = to_structured({**ATTRS, "datacontenttype": "text/plain"}, b"hi")
    assert parse(value, headers, None).data == "hi"


def test_structured_extensions_nulls_and_int_sequence():
    obj = base_obj(sequence=7, subject=None, comexample=5, unset=None, data=None)
    ev = parse(*reversed(structured(obj)), None)
    assert ev.sequence == 7 and ev.subject is None and ev.data is None
    assert ev.extensions == {"comexample": 5}


def test_structured_content_type_case_insensitive():
    headers, value = to_structured(ATTRS, DATA)
    headers = [("Content-Type", b"Application/CloudEvents+JSON")]
    check_event(parse(value, headers, None))


def test_header_names_case_insensitive_and_first_wins():
    headers, value = to_binary(ATTRS, DATA)
    headers = [(k.upper(), v) for k, v in headers]
    headers.append(("ce_id", b"second"))
    headers.append(("x-other", b"\xff"))  # non-CloudEvents headers are ignored
    ev = parse(value, headers, None)
    check_event(ev)


def test_null_or_empty_value_is_no_data():
    headers, _ = to_binary(ATTRS, DATA)
    assert parse(None, headers, None).data is None
    assert parse(b"", headers, None).data is None


def test_partition_key_fallbacks():
    h = binary_headers()
    assert parse(b"{}", h, b"kafka-key").partitionkey == "kafka-key"
    assert parse(b"{}", binary_headers(partitionkey="pk"), b"kafka-key").partitionkey == "pk"
    # an empty extension falls back to the key
    assert parse(b"{}", binary_headers(partitionkey=""), b"kk").partitionkey == "kk"
    # structured: the JSON member, else the Kafka key
    headers, value = structured({k: v for k, v in base_obj().items() if k != "partitionkey"})
    assert parse(value, headers, "é".encode()).partitionkey == "é"


@pytest.mark.parametrize(
    "seq, expected",
    [("0", 0), ("42", 42), ("0007", 7), (str(2**63 - 1), 2**63 - 1)],
)
def test_sequence_ok(seq, expected):
    assert parse(None, binary_headers(sequence=seq), b"k").sequence == expected


@pytest.mark.parametrize(
    "seq", ["abc", "-1", "1e3", "", " 1", "+1", "1_000", "٣", "1.0", str(2**63), "9" * 5000]
)
def test_bad_sequence_binary(seq):
    err = reason_of(None, binary_headers(sequence=seq))
    assert err.reason == "bad_sequence"


@pytest.mark.parametrize("seq", [-1, 2**63, 1.0, True, "1e3", [1]])
def test_bad_sequence_structured(seq):
    headers, value = structured(base_obj(sequence=seq, data=SECRET))
    assert reason_of(value, headers).reason == "bad_sequence"


# ---------------------------------------------------------------------------------------
# every reason code with a real malformed input

MSGPACK = [("content-type", b"application/msgpack")]


def deep_json(n: int) -> bytes:
    return ("[" * n + json.dumps(SECRET) + "]" * n).encode()


def deep_msgpack(n: int) -> bytes:
    return b"\x91" * n + msgpack.packb(SECRET)


def bin_h(*extra: tuple[str, bytes], **attrs: object) -> list[tuple[str, bytes]]:
    return binary_headers(**attrs) + list(extra)


SECRET_JSON = json.dumps({"secret": SECRET}).encode()

CASES = [
    # (reason, value, headers, key)
    ("missing_attribute", SECRET_JSON, [h for h in bin_h() if h[0] != "ce_id"], b"k"),
    ("missing_attribute", SECRET_JSON, [h for h in bin_h() if h[0] != "ce_type"], b"k"),
    ("missing_attribute", SECRET_JSON, bin_h(id=b""), b"k"),
    ("missing_attribute", SECRET_JSON, [h for h in bin_h() if h[0] != "ce_specversion"], b"k"),
    ("missing_attribute", SECRET_JSON, [], b"k"),
    ("bad_specversion", SECRET_JSON, bin_h(specversion="0.3"), b"k"),
    ("bad_json", b'{"secret": "' + SECRET.encode() + b'"', bin_h(), b"k"),
    ("bad_json", b"{'" + SECRET.encode() + b"': NaN}", bin_h(), b"k"),
    ("bad_json", b'{"a": NaN, "s": "' + SECRET.encode() + b'"}', bin_h(), b"k"),
    ("bad_json", b'{"s": "' + SECRET.encode() + b'"} trailing', bin_h(), b"k"),
    ("bad_json", deep_json(10_000), bin_h(), b"k"),
    ("bad_json", deep_json(MAX_DEPTH + 1), bin_h(), b"k"),
    ("bad_json", b"\xef\xbb\xbf" + SECRET_JSON, bin_h(), b"k"),  # BOM
    ("bad_msgpack", msgpack.packb({"secret": SECRET})[:-3], bin_h(*MSGPACK), b"k"),
    ("bad_msgpack", b"\xdf\xff\xff\xff\xff" + msgpack.packb(SECRET), bin_h(*MSGPACK), b"k"),
    ("bad_msgpack", b"\xdd\xff\xff\xff\xff" + msgpack.packb(SECRET), bin_h(*MSGPACK), b"k"),
    ("bad_msgpack", deep_msgpack(10_000), bin_h(*MSGPACK), b"k"),
    ("bad_msgpack", deep_msgpack(MAX_DEPTH + 1), bin_h(*MSGPACK), b"k"),
    ("bad_msgpack", msgpack.packb(SECRET) + b"\x01", bin_h(*MSGPACK), b"k"),
    ("bad_msgpack", b"\x81\x91\x01" + msgpack.packb(SECRET), bin_h(*MSGPACK), b"k"),  # [1]: key
    ("bad_encoding", SECRET_JSON, bin_h(id=b"e\xff1"), b"k"),
    ("bad_encoding", SECRET_JSON, bin_h(comexample=b"\xc3\x28"), b"k"),
    ("bad_encoding", SECRET_JSON, bin_h(("content-type", b"application/\xffjson")), b"k"),
    ("bad_encoding", b'{"s": "' + SECRET.encode() + b'\xff"}', bin_h(), b"k"),
    ("bad_encoding", b'{"s": "' + SECRET.encode() + b'\\ud800"}', bin_h(), b"k"),
    ("bad_encoding", SECRET_JSON, bin_h(), b"\xffkey"),
    ("bad_encoding", b"\xa3ab\xff" + SECRET.encode(), bin_h(*MSGPACK), b"k"),
    ("bad_encoding", SECRET.encode() + b"\xff", bin_h(("content-type", b"text/plain")), b"k"),
    ("too_large", b"[" + SECRET.encode() * (10 * 2**20 // len(SECRET)) + b"]", bin_h(), b"k"),
    ("no_partition_key", SECRET_JSON, bin_h(), None),
    ("no_partition_key", SECRET_JSON, bin_h(), b""),
    ("bad_sequence", SECRET_JSON, bin_h(sequence="1e3"), b"k"),
    ("key_too_long", SECRET_JSON, bin_h(), b"k" * 2**20),
    ("key_too_long", SECRET_JSON, bin_h(partitionkey="p" * 401), b"k"),
    ("key_too_long", SECRET_JSON, bin_h(partitionkey="é" * 201), b"k"),  # 402 bytes
    ("unsupported_content_type", SECRET_JSON, bin_h(("content-type", b"application/xml")), b"k"),
    ("unsupported_content_type", SECRET_JSON, bin_h(("content-type", b"image/png")), b"k"),
    (
        "unsupported_content_type",
        SECRET_JSON,
        bin_h(("content-type", b"text/plain; charset=nope")),
        b"k",
    ),
]


def s_case(reason: str, obj: dict | bytes, key: bytes | None = b"k", ct: bytes | None = None):
    if isinstance(obj, dict):
        headers, value = structured(obj)
    else:
        headers, value = structured({})
        value = obj
    if ct is not None:
        headers = [("content-type", ct)]
    return (reason, value, headers, key)


def _no(name: str) -> dict:
    obj = base_obj(data=SECRET)
    del obj[name]
    return obj


STRUCTURED_CASES = [
    s_case("missing_attribute", _no("id")),
    s_case("missing_attribute", _no("source")),
    s_case("missing_attribute", _no("specversion")),
    s_case("missing_attribute", base_obj(id=5, data=SECRET)),
    s_case("missing_attribute", base_obj(type="", data=SECRET)),
    s_case("missing_attribute", base_obj(time=5, data=SECRET)),
    s_case("bad_specversion", base_obj(specversion="0.3", data=SECRET)),
    s_case("bad_specversion", base_obj(specversion=1.0, data=SECRET)),
    s_case("bad_json", b'{"specversion": "1.0", "data": "' + SECRET.encode() + b'"'),
    s_case("bad_json", json.dumps([SECRET]).encode()),
    s_case("bad_json", b""),
    s_case(
        "bad_json",
        b'{"specversion":"1.0","id":"e","source":"s","type":"t","data":' + deep_json(10_000) + b"}",
    ),
    s_case("bad_json", base_obj(data=SECRET, data_base64="AAAA")),
    s_case("bad_json", base_obj(data_base64=5)),
    s_case("bad_json", base_obj(datacontenttype="text/plain", data={"s": SECRET})),
    s_case(
        "bad_msgpack",
        base_obj(
            datacontenttype="application/msgpack",
            data_base64=base64.b64encode(msgpack.packb(SECRET)[:-2]).decode(),
        ),
    ),
    s_case("bad_msgpack", base_obj(datacontenttype="application/msgpack", data={"s": SECRET})),
    s_case("bad_encoding", b'{"id": "' + SECRET.encode() + b'\xff"}'),
    s_case("bad_encoding", base_obj(data=SECRET + "\ud800")),
    s_case("bad_encoding", base_obj(data_base64=SECRET + "!!")),
    s_case("too_large", base_obj(data=SECRET * (10 * 2**20 // len(SECRET)))),
    s_case("no_partition_key", _no("partitionkey"), key=None),
    s_case("no_partition_key", base_obj(partitionkey=5, data=SECRET)),
    s_case("bad_sequence", base_obj(sequence="abc", data=SECRET)),
    s_case("key_too_long", base_obj(partitionkey="k" * 1000, data=SECRET)),
    s_case("key_too_long", _no("partitionkey"), key=b"k" * 2**20),
    s_case("unsupported_content_type", base_obj(datacontenttype="application/xml", data=SECRET)),
    s_case("unsupported_content_type", base_obj(data=SECRET), ct=b"application/cloudevents+avro"),
    s_case(
        "unsupported_content_type",
        base_obj(data=SECRET),
        ct=b"application/cloudevents-batch+json",
    ),
]


@pytest.mark.parametrize(
    "reason, value, headers, key",
    CASES + STRUCTURED_CASES,
    ids=[f"bin-{c[0]}-{i}" for i, c in enumerate(CASES)]
    + [f"struct-{c[0]}-{i}" for i, c in enumerate(STRUCTURED_CASES)],
)
def test_reasons(reason, value, headers, key):
    err = reason_of(value, headers, key)
    assert err.reason == reason, str(err)
    assert str(err) and err.message == str(err)


def test_every_reason_is_covered():
    assert {c[0] for c in CASES} == REASONS
    assert {c[0] for c in STRUCTURED_CASES} == REASONS


def test_too_large_is_checked_before_anything():
    # garbage headers and an unusable key: size still wins
    err = reason_of(b"\xff" * 101, [("ce_id", b"\xff")], None, max_bytes=100)
    assert err.reason == "too_large"
    assert parse(b"[1]", binary_headers(), b"k", max_bytes=3).data == [1]


def test_key_limit_is_in_utf8_bytes():
    assert parse(None, binary_headers(partitionkey="é" * 200), None).partitionkey == "é" * 200
    assert parse(None, binary_headers(), b"k" * 10, max_key_bytes=10).partitionkey == "k" * 10
    assert reason_of(None, binary_headers(), b"k" * 11, max_key_bytes=10).reason == "key_too_long"
    # str header values (not what confluent-kafka gives, but accepted)
    h = [(n, v.decode()) for n, v in binary_headers(partitionkey="é" * 201)]
    assert reason_of(None, h).reason == "key_too_long"


def test_depth_limit_boundary():
    ok = ("[" * MAX_DEPTH + "]" * MAX_DEPTH).encode()
    assert parse(ok, binary_headers(), b"k").data is not None
    ok_mp = b"\x91" * (MAX_DEPTH - 1) + b"\x90"
    assert parse(ok_mp, binary_headers() + MSGPACK, b"k").data is not None
    obj = base_obj(data=json.loads(ok))
    assert parse(*reversed(structured(obj)), b"k").data == obj["data"]


def test_valid_surrogate_pair_escape_is_fine():
    ev = parse(b'{"e": "\\ud83d\\ude00"}', binary_headers(), b"k")
    assert ev.data == {"e": "😀"}


def test_error_is_exception_with_reason():
    err = EnvelopeError("bad_json", "boom")
    assert isinstance(err, Exception) and err.reason == "bad_json" and str(err) == "boom"


# ---------------------------------------------------------------------------------------
# routing


def test_routing_key_binary():
    headers, value = to_binary(ATTRS, DATA)
    assert routing_key(value, headers, b"kafka") == b"order-1"
    assert routing_key(value, [("CE_PartitionKey", b"x")], b"kafka") == b"x"
    no_pk = [h for h in headers if h[0] != "ce_partitionkey"]
    assert routing_key(value, no_pk, b"kafka") == b"kafka"
    assert routing_key(value, no_pk, None) is None
    assert routing_key(None, None, None) is None
    assert routing_key(None, None, b"") is None


def test_routing_key_structured():
    headers, value = to_structured(ATTRS, DATA)
    assert routing_key(value, headers, b"kafka") == b"order-1"
    attrs = {k: v for k, v in ATTRS.items() if k != "partitionkey"}
    headers, value = to_structured(attrs, DATA)
    assert routing_key(value, headers, b"kafka") == b"kafka"
    # parse errors fall back to the Kafka key
    assert routing_key(b'{"partitionkey": "x"', headers, b"kafka") == b"kafka"
    assert routing_key(b'["partitionkey"]', headers, b"kafka") == b"kafka"
    assert routing_key(b'{"partitionkey": 5}', headers, None) is None
    # escaped member name still found
    assert routing_key(b'{"partitionke\\u0079": "esc"}', headers, b"kafka") == b"esc"
    # binary mode never looks into the value
    assert routing_key(b'{"partitionkey": "x"}', [], b"kafka") == b"kafka"


def test_routing_key_first_header_wins_like_parse():
    h = binary_headers() + [("ce_partitionkey", b""), ("ce_partitionkey", b"second")]
    ev = parse(None, h, b"kafka")
    assert routing_key(None, h, b"kafka") == ev.partitionkey.encode() == b"kafka"


# ---------------------------------------------------------------------------------------
# properties

text = st.text(min_size=1, max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    eid=text,
    pk=st.none() | text,
    key=st.none() | text,
    seq=st.none() | st.integers(0, 2**63 - 1),
    data=json_values,
    mode=st.sampled_from(["json", "msgpack", "structured"]),
)
def test_round_trip_and_routing_agree(eid, pk, key, seq, data, mode):
    attrs = {"id": eid, "source": "/s", "type": "t", "partitionkey": pk, "sequence": seq}
    if mode == "structured":
        headers, value = to_structured(attrs, data)
    else:
        ct = "application/json" if mode == "json" else "application/msgpack"
        headers, value = to_binary(attrs, data, content_type=ct)
    kb = key.encode() if key is not None else None
    rk = routing_key(value, headers, kb)
    try:
        ev = parse(value, headers, kb)
    except EnvelopeError as err:
        assert err.reason in ("no_partition_key", "key_too_long")
        return
    assert ev.id == eid and ev.sequence == seq and ev.data == data
    assert ev.partitionkey == (pk or key)
    assert rk == ev.partitionkey.encode()


@settings(max_examples=300, deadline=None)
@given(
    value=st.none() | st.binary(max_size=64),
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "ce_id",
                    "ce_source",
                    "ce_type",
                    "ce_specversion",
                    "ce_sequence",
                    "ce_partitionkey",
                    "ce_x",
                    "content-type",
                    "Content-Type",
                ]
            ),
            st.binary(max_size=12)
            | st.sampled_from(
                [
                    b"1.0",
                    b"application/msgpack",
                    b"application/cloudevents+json",
                    b"text/plain",
                    b"7",
                ]
            ),
        ),
        max_size=10,
    ),
    key=st.none() | st.binary(max_size=8),
)
def test_fuzz_only_envelope_errors(value, headers, key):
    try:
        parse(value, headers, key)
    except EnvelopeError as err:
        assert err.reason in REASONS
    routing_key(value, headers, key)


# ---- the fast JSON path (orjson) means exactly what the standard library path means ----------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(_json_values)
def test_fast_json_path_equals_the_standard_library(value):
    raw = json.dumps(value, ensure_ascii=False).encode()
    assert _decode_json(raw, "data") == json.loads(raw)


def test_integers_beyond_64_bits_stay_exact():
    raw = b'{"n": 123456789012345678901234567890, "m": -18446744073709551617}'
    assert _decode_json(raw, "data") == {"n": 123456789012345678901234567890,
                                         "m": -18446744073709551617}


# ---- structured mode without its content-type (CloudEvents Python SDK 1.x) ----------------------


def _sdk_structured(attrs: dict, data, datacontenttype: str | None = None, key_mapper=None):
    """(headers, key, value) exactly as `cloudevents.kafka.to_structured` makes them."""
    ce_http = pytest.importorskip("cloudevents.http")
    ce_kafka = pytest.importorskip("cloudevents.kafka")
    attrs = dict(attrs)
    if datacontenttype is not None:
        attrs["datacontenttype"] = datacontenttype
    msg = ce_kafka.to_structured(ce_http.CloudEvent(attrs, data), key_mapper=key_mapper)
    key = msg.key.encode() if isinstance(msg.key, str) else msg.key
    return list(msg.headers.items()), key, msg.value


SDK_ATTRS = {"id": "e-1", "source": "/shop/orders", "type": "shop.order.placed",
             "partitionkey": "order-1", "sequence": "42"}


@pytest.mark.parametrize("dct", [None, "application/json"])
def test_sdk_structured_record_explains_binary_mode_and_detect_reads_it(dct):
    headers, key, value = _sdk_structured(SDK_ATTRS, DATA, dct)
    assert not any(n.startswith("ce_") for n, _ in headers)
    assert headers == ([] if dct is None else [("content-type", b"application/json")])
    with pytest.raises(EnvelopeError) as info:
        parse(value, headers, key)
    why = ("the record has no content-type header" if dct is None
           else "its content-type is 'application/json'")
    assert info.value.reason == "missing_attribute"
    assert str(info.value) == (
        "missing required attribute 'specversion': read in binary mode (no ce_ headers) "
        f"because {why}; structured mode needs content-type 'application/cloudevents+json' "
        "(or set structured = \"detect\" on the source to read a JSON value with specversion "
        "and no ce_ headers as structured)")
    ev = parse(value, headers, key, detect=True)
    assert (ev.id, ev.source, ev.type, ev.partitionkey, ev.sequence, ev.data) == (
        "e-1", "/shop/orders", "shop.order.placed", "order-1", 42, DATA)
    assert ev.datacontenttype == dct


def test_detect_routes_by_the_structured_partitionkey():
    # a key mapper that sets another Kafka key: the JSON partitionkey decides, as in parse
    headers, key, value = _sdk_structured(SDK_ATTRS, DATA, key_mapper=lambda e: "other")
    assert key == b"other"
    assert routing_key(value, headers, key) == b"other"  # the binding: binary mode
    assert routing_key(value, headers, key, detect=True) == b"order-1"
    assert parse(value, headers, key, detect=True).partitionkey == "order-1"
    headers, key, value = _sdk_structured(SDK_ATTRS, DATA, "application/json",
                                          key_mapper=lambda e: None)
    assert key is None and routing_key(value, headers, None, detect=True) == b"order-1"


def test_detect_leaves_binary_records_and_other_content_types_alone():
    headers, value = to_binary(ATTRS, DATA)
    assert parse(value, headers, None, detect=True) == parse(value, headers, None)
    # a ce_ header means binary mode, even with a specversion in the value
    value = json.dumps({"specversion": "1.0", "id": "x", "source": "s", "type": "t"}).encode()
    with pytest.raises(EnvelopeError, match=r"^missing required attribute 'specversion'$"):
        parse(value, [("ce_id", b"x")], b"k", detect=True)
    assert routing_key(value, [("ce_id", b"x")], b"k", detect=True) == b"k"
    # not a JSON content type: not detected, and the message says why
    with pytest.raises(EnvelopeError, match="only with no or a JSON content-type"):
        parse(value, [("content-type", b"text/plain")], b"k", detect=True)
    # a value that does not name specversion: the binding's plain message
    with pytest.raises(EnvelopeError, match=r"^missing required attribute 'specversion'$"):
        parse(b'{"id": "x"}', [], b"k", detect=True)


@settings(max_examples=200, deadline=None)
@given(
    eid=text,
    pk=st.none() | text,
    key=st.none() | text,
    seq=st.none() | st.integers(0, 2**63 - 1),
    data=json_values,
    ct=st.sampled_from([None, "application/json", "application/cloudevents+json"]),
)
def test_detected_round_trip_and_routing_agree(eid, pk, key, seq, data, ct):
    attrs = {"id": eid, "source": "/s", "type": "t", "partitionkey": pk, "sequence": seq}
    headers, value = to_structured(attrs, data)
    headers = [] if ct is None else [("content-type", ct.encode())]
    kb = key.encode() if key is not None else None
    rk = routing_key(value, headers, kb, detect=True)
    try:
        ev = parse(value, headers, kb, detect=True)
    except EnvelopeError as err:
        assert err.reason in ("no_partition_key", "key_too_long")
        return
    assert ev.id == eid and ev.sequence == seq and ev.data == data
    assert ev.partitionkey == (pk or key)
    assert rk == ev.partitionkey.encode()


@settings(max_examples=300, deadline=None)
@given(
    value=st.none() | st.binary(max_size=48).map(lambda b: b'{"specversion": "1.0", ' + b),
    headers=st.lists(st.tuples(st.sampled_from(["ce_id", "content-type", "x"]),
                               st.binary(max_size=12) | st.just(b"application/json")),
                     max_size=3),
    key=st.none() | st.binary(max_size=8),
)
def test_fuzz_detect_only_envelope_errors(value, headers, key):
    try:
        parse(value, headers, key, detect=True)
    except EnvelopeError as err:
        assert err.reason in REASONS
    routing_key(value, headers, key, detect=True)
