"""The compiled parse (``aggregator._envelope``) against the reference (``aggregator.envelope``).

Differential tests in the manner of msgpack's ``test_discrepancy.py``: generated records,
valid and malformed, go through both parsers, which must agree exactly: every `Event` slot
(compared by ``repr``, so types, dict order and float signs count) or the same
`EnvelopeError` (reason, message, no chained cause), or the same other exception.
Since the compiled parse hands every record it would reject to the reference, agreement
alone would not show that it parses anything itself: `_envelope.deferred()` counts those
hand-overs, and valid records of every kind must not be among them.
tests/test_envelope.py runs its own cases over both parsers as well.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import msgpack
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from aggregator import envelope
from aggregator.devtools import simulate
from aggregator.devtools.encoder import to_binary, to_structured
from aggregator.envelope import MAX_DEPTH, EnvelopeError, Event

try:
    from aggregator import _envelope
except ImportError:  # only acceptable when the pure core is forced
    _envelope = None

pytestmark = pytest.mark.skipif(_envelope is None, reason="compiled parser not built")

PURE = os.environ.get("AGGREGATOR_PURE_CORE", "").strip().lower() in ("1", "true", "yes", "on")
SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- comparison
def outcome(parse, value, headers, key, max_bytes=1 << 20, max_key=400, detect=False):
    """What one parser makes of a record, in a comparable form."""
    try:
        ev = parse(value, headers, key, max_bytes, max_key, detect)
    except EnvelopeError as e:
        chained = e.__cause__ is not None or (e.__context__ is not None
                                              and not e.__suppress_context__)
        return ("error", e.reason, str(e), chained)
    except Exception as e:  # the same non-envelope failure (e.g. a header name not a str)
        return ("exception", type(e).__name__, str(e))
    assert type(ev) is Event
    return ("event",) + tuple((s, repr(getattr(ev, s))) for s in Event.__slots__)


def check(value, headers, key, max_bytes=1 << 20, max_key=400, detect=False,
          compiled=None):
    """Both parsers agree on the record; returns the outcome."""
    ref = outcome(envelope.parse, value, headers, key, max_bytes, max_key, detect)
    got = outcome(compiled or _envelope.parse, value, headers, key, max_bytes, max_key,
                  detect)
    assert got == ref, (value, headers, key, max_bytes, max_key, detect)
    assert ref[0] != "error" or not ref[3], "an EnvelopeError with a chained cause"
    return ref


def test_a_disagreement_fails_the_comparison():
    """The harness itself: a twin that differs in one slot, or in a message, is caught."""
    headers, value = to_binary({"id": "e", "source": "/s", "type": "t", "sequence": 3}, {"a": 1})

    def off_by_one(*args):
        ev = _envelope.parse(*args)
        ev.sequence += 1
        return ev

    def other_message(*args):
        try:
            return _envelope.parse(*args)
        except EnvelopeError as e:
            raise EnvelopeError(e.reason, str(e) + ".") from None

    def float_data(*args):
        ev = _envelope.parse(*args)
        ev.data = {"a": 1.0}  # == {"a": 1}, but not the same
        return ev

    with pytest.raises(AssertionError):
        check(value, headers, b"k", compiled=off_by_one)
    with pytest.raises(AssertionError):
        check(value, headers, b"k", compiled=float_data)
    with pytest.raises(AssertionError):
        check(value, headers[1:], b"k", compiled=other_message)
    assert check(value, headers, b"k")[0] == "event"


# ----------------------------------------------------------------------------- selection
def test_parser_selects_the_implementation():
    from aggregator import parser

    if PURE:
        assert parser.IMPLEMENTATION == "python" and parser.parse is envelope.parse
    else:
        assert parser.IMPLEMENTATION == "cython" and parser.parse is _envelope.parse


def _import_parser_without_extension(pure: str) -> subprocess.CompletedProcess:
    code = ("import sys; sys.modules['aggregator._envelope'] = None\n"
            "import aggregator.parser as p; print(p.IMPLEMENTATION)\n")
    env = dict(os.environ, AGGREGATOR_PURE_CORE=pure)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)


def test_parser_import_fails_loudly_without_extension():
    res = _import_parser_without_extension("")
    assert res.returncode != 0
    assert "ImportError" in res.stderr and "AGGREGATOR_PURE_CORE=1" in res.stderr


def test_parser_pure_env_needs_no_extension():
    res = _import_parser_without_extension("1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "python"


# ----------------------------------------------------------------------------- strategies
# Each generated record draws a `noise` level: 0 gives a valid record (most draws), higher
# levels break more of its parts (a value, a header, the key, a limit), so that both
# accepted events and every rejection are well represented.
ATTRS = ("id", "source", "type", "specversion", "time", "subject", "dataschema",
         "datacontenttype", "partitionkey", "sequence")
BAD_UTF8 = [b"\xff", b"a\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]
GOOD_CONTENT_TYPES = [
    b"application/json", b"application/json; charset=utf-8", b"application/vnd.shop+json",
    b"APPLICATION/JSON", b"application/msgpack", b"application/x-msgpack",
    b"application/vnd.msgpack", b"text/plain", b"text/plain; charset=ISO-8859-1",
    b"text/csv; charset=\"utf-16\"", b"text/html;charset=UTF-8",
]
STRUCTURED_CONTENT_TYPES = [
    b"application/cloudevents+json", b"application/cloudevents+json; charset=utf-8",
    b"Application/CloudEvents+JSON", b"application/cloudevents+json\t",
]
CONTENT_TYPES = GOOD_CONTENT_TYPES + STRUCTURED_CONTENT_TYPES + [
    b"text/plain; charset=nope", b"application/xml", b"image/png", b"", b" application/json",
    b"application/cloudevents+jsonx", b"application/cloudevents+avro",
    b"application/cloudevents-batch+json", b"application/\xffjson",
]
noise_levels = st.sampled_from([0, 0, 0, 0, 1, 1, 2, 4])


def broken(draw, noise: int) -> bool:
    """Whether to break this part of the record."""
    return noise > 0 and draw(st.integers(0, 11)) < noise


def _case(name: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(name, flips + [False] * len(name)))


@st.composite
def header_name(draw, base: str) -> str:
    """`base` in a random case, often exactly as given."""
    if draw(st.integers(0, 3)):
        return base
    return _case(base, draw(st.lists(st.booleans(), max_size=len(base))))


text_values = st.text(max_size=12)
json_scalars = (st.none() | st.booleans() | st.integers(-(2**64), 2**64)
                | st.integers(-(10**30), 10**30) | st.text(max_size=10)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10)
    | st.binary(max_size=8) | st.floats(allow_nan=False),
    lambda c: st.lists(c, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.integers(0, 9), c, max_size=4),
    max_leaves=12)


def nested(kind: str, depth: int) -> bytes:
    if kind == "json":
        return ("[" * depth + "1" + "]" * depth).encode()
    return b"\x91" * depth + b"\x01"


@st.composite
def json_payload(draw, noise: int) -> bytes:
    if not broken(draw, noise):
        choice = draw(st.integers(0, 9))
        if choice == 0:  # 19+ digit runs, in numbers and in strings
            d = draw(st.text("0123456789", min_size=17, max_size=25))
            return draw(st.sampled_from([f'{{"n": {int(d)}}}', f'{{"s": "{d}"}}',
                                         f'[0.{d}]', f'[-{int(d)}e2]'])).encode()
        if choice == 1:
            return draw(st.sampled_from([b'["\\ud83d\\ude00"]', b" {} ", b'{"a":1,"a":2}',
                                         b"\t[\n]\r", b"1e400", b"-0", b"[1E5, -0.0]"]))
        return json.dumps(draw(json_values), ensure_ascii=draw(st.booleans())).encode()
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return nested("json", draw(st.sampled_from([MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1,
                                                    MAX_DEPTH + 2, 1100])))
    if choice == 1:
        return draw(st.sampled_from([b'{"a": NaN}', b"[Infinity]", b'"\\ud800"',
                                     b"\xef\xbb\xbf{}", b"{} x", b"[1,]", b"01"]))
    if choice == 2:
        return draw(st.binary(max_size=24))
    return draw(st.sampled_from(BAD_UTF8)) + b'"'


@st.composite
def msgpack_payload(draw, noise: int) -> bytes:
    if not broken(draw, noise):
        return msgpack.packb(draw(msgpack_values), use_bin_type=True)
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return nested("msgpack", draw(st.sampled_from([MAX_DEPTH - 1, MAX_DEPTH,
                                                       MAX_DEPTH + 1, 3000])))
    if choice == 1:
        raw = msgpack.packb(draw(msgpack_values), use_bin_type=True)
        return raw[: draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=3))
    return draw(st.sampled_from([b"\xdd\xff\xff\xff\xff\x01", b"\xdf\xff\xff\xff\xff",
                                 b"\xa3ab\xff", b"\x81\x91\x01\x01", b"\xc1", b"\x01\x02"]))


@st.composite
def payload(draw, ct: bytes | None, noise: int) -> bytes | None:
    choice = draw(st.integers(0, 11))
    if choice == 0:
        return None
    if choice == 1:
        return b""
    low = (ct or b"").lower()
    if choice == 2 and noise:  # data of another kind than its content type says
        low = draw(st.sampled_from([b"application/msgpack", b"application/json"]))
    if b"msgpack" in low:
        return draw(msgpack_payload(noise))
    if low.startswith(b"text/"):
        charset = "utf-8" if b"iso" not in low else "latin-1"
        if broken(draw, noise):
            return draw(st.text(max_size=12)).encode("utf-8") + b"\xff"
        return draw(st.text(max_size=12)).encode(charset, errors="replace")
    return draw(json_payload(noise))


@st.composite
def attr_value(draw, attr: str, noise: int):
    """A header value for ``ce_<attr>``: valid unless broken."""
    if broken(draw, noise):
        if attr == "sequence":
            return draw(st.sampled_from([b"-1", b"+1", b"1e3", b" 1", b"1_0", b"\xd9\xa3", b"",
                                         b"9" * 5000, str(2**63).encode(), b"\xff"]))
        if attr == "specversion":
            return draw(st.sampled_from([b"0.3", b"1.0 ", b"1", b"", b"\xff"]))
        if attr == "partitionkey":
            return draw(st.sampled_from([b"k" * 401, "é".encode() * 201, b"p\xff"]))
        if attr == "datacontenttype":
            return draw(st.sampled_from(CONTENT_TYPES))
        return draw(st.sampled_from(BAD_UTF8 + [b"", None, "str-value", 7, bytearray(b"x")]))
    if attr == "specversion":
        return b"1.0"
    if attr == "sequence":
        return draw(st.one_of(
            st.integers(0, 2**63 - 1).map(lambda n: str(n).encode()),
            st.sampled_from([b"0", b"007", b"0" * 19 + b"1", str(2**63 - 1).encode()])))
    if attr == "datacontenttype":
        return draw(st.sampled_from(GOOD_CONTENT_TYPES))
    if attr == "partitionkey":
        return draw(st.sampled_from([b"pk-1", b"", "é".encode() * 7, b"k" * 30]))
    return draw(text_values.filter(bool) if attr in ("id", "source", "type")
                else text_values).encode()


NOISE_NAMES = ["x-trace", "ce_", "CE_", "ce", "traceparent", "content_type", "ce-id",
               "ce_\u00fcber", "CE_\u0130D", "ce_partition\u212aey", "\u212a-key",
               "content-typ\u0435"]


@st.composite
def limits(draw, value, noise: int):
    """(key, max_bytes, max_key, detect)."""
    key = draw(st.sampled_from([b"kafka-key", "é".encode() * 3, b"k" * 12]))
    if broken(draw, noise):
        key = draw(st.sampled_from([None, b"", b"k\xff", b"k" * 401, "str-key"]))
    max_bytes = 1 << 20
    if value and broken(draw, noise):
        max_bytes = max(1, len(value) + draw(st.integers(-1, 1)))
    max_key = 400
    if broken(draw, noise):
        max_key = draw(st.sampled_from([12, 11, 6, 1]))
    return key, max_bytes, max_key, draw(st.booleans())


@st.composite
def binary_record(draw):
    """(value, headers, key, max_bytes, max_key, detect) of a binary-mode record."""
    noise = draw(noise_levels)
    headers = []
    for attr in ATTRS:
        required = attr in ("id", "source", "type", "specversion")
        # a required attribute goes missing less often than a part breaks
        present = (not (broken(draw, noise) and broken(draw, noise))) if required \
            else draw(st.booleans())
        if present:
            headers.append((draw(header_name("ce_" + attr)), draw(attr_value(attr, noise))))
    for _ in range(draw(st.integers(0, 2))):  # extensions
        headers.append(("ce_" + draw(st.from_regex(r"[a-zA-Z0-9_]{1,8}", fullmatch=True)),
                        draw(attr_value("ext", noise))))
    for _ in range(draw(st.integers(0, 2))):
        headers.append((draw(st.sampled_from(NOISE_NAMES)), draw(attr_value("ext", noise))))
    ct = None
    if draw(st.integers(0, 4)):
        ct = draw(st.sampled_from(CONTENT_TYPES if broken(draw, noise)
                                  else GOOD_CONTENT_TYPES))
        headers.append((draw(header_name("content-type")), ct))
    headers = draw(st.permutations(headers))
    for _ in range(draw(st.integers(0, 2))):  # duplicates, before or after the original
        if headers:
            name, _v = headers[draw(st.integers(0, len(headers) - 1))]
            other = (draw(header_name(name.lower())) if name.isascii() else name,
                     draw(attr_value(name.lower()[3:], noise)))
            headers.insert(draw(st.integers(0, len(headers))), other)
    shape = draw(st.sampled_from(["tuple", "list", "tuple", "list", "none", "outer-tuple"]))
    if shape == "list":  # as the worker gets them from the ring
        headers = [list(h) for h in headers]
    elif shape == "outer-tuple":
        headers = tuple(headers)
    elif shape == "none" and not headers:
        headers = None
    value = draw(payload(ct, noise))
    return (value, headers) + draw(limits(value, noise))


@st.composite
def structured_value(draw, attr: str, noise: int):
    if broken(draw, noise):
        if attr == "sequence":
            return draw(st.sampled_from([2**63, -1, True, 1.0, "-1", "1e3", "", "٣",
                                         "9" * 5000, [1]]))
        if attr == "partitionkey":
            return draw(st.sampled_from(["k" * 401, "😀" * 101, 5, ["k"]]))
        if attr == "datacontenttype":
            return draw(st.sampled_from(CONTENT_TYPES)).decode("utf-8", "replace")
        return draw(st.sampled_from([None, 5, True, 1.0, [], {}, "", "0.3"]))
    if attr == "specversion":
        return "1.0"
    if attr == "sequence":
        return draw(st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1).map(str),
                              st.sampled_from(["007", "0" * 20 + "5", None])))
    if attr == "datacontenttype":
        return draw(st.sampled_from(GOOD_CONTENT_TYPES)).decode()
    if attr == "partitionkey":
        return draw(st.sampled_from(["pk-1", "é" * 7, "k" * 30, "😀" * 4, "", None]))
    return draw(text_values.filter(bool) if attr in ("id", "source", "type") else text_values)


@st.composite
def structured_record(draw):
    """(value, headers, key, max_bytes, max_key, detect) of a structured-mode record (or one
    detect mode reads as structured)."""
    noise = draw(noise_levels)
    obj: dict = {}
    for attr in ATTRS:
        required = attr in ("id", "source", "type", "specversion")
        # a required attribute goes missing less often than a part breaks
        present = (not (broken(draw, noise) and broken(draw, noise))) if required \
            else draw(st.booleans())
        if present:
            obj[attr] = draw(structured_value(attr, noise))
    dct = obj.get("datacontenttype") if type(obj.get("datacontenttype")) is str else None
    kind = _envelope_kind(dct)
    data_kind = draw(st.integers(0, 4))
    if data_kind == 1:
        obj["data"] = draw(st.text(max_size=8)) if kind == "text" else draw(json_values)
    elif data_kind == 2 or (data_kind == 3 and kind == "msgpack"):
        raw = draw(payload(dct.encode() if dct else None, noise)) or b""
        obj["data_base64"] = base64.b64encode(raw).decode()
    elif data_kind == 3 and noise:
        obj["data_base64"] = draw(st.sampled_from(["!!", "AAA", "", 5, "AAAA"]))
        if draw(st.booleans()):
            obj["data"] = draw(json_values)
    for _ in range(draw(st.integers(0, 2))):
        obj[draw(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True))] = draw(json_values)
    items = draw(st.permutations(list(obj.items())))
    text = json.dumps(dict(items), ensure_ascii=draw(st.booleans()))
    mutation = draw(st.integers(0, 9)) if noise else draw(st.integers(0, 3)) + 20
    if mutation == 0:
        text = text[: draw(st.integers(0, len(text)))]
    elif mutation == 1:
        text = "[" + text + "]"
    elif mutation == 2 and text.endswith("}") and len(text) > 2:
        text = text[:-1] + ', "x": "\\ud800"}'
    elif mutation == 3 and text.endswith("}") and len(text) > 2:
        depth = draw(st.sampled_from([MAX_DEPTH, MAX_DEPTH + 1, 950, 1100]))
        text = text[:-1] + ', "deep": ' + nested("json", depth).decode() + "}"
    elif mutation == 20 and text.endswith("}") and len(text) > 2:  # a member with a big int
        text = text[:-1] + ', "big": ' + str(draw(st.integers(10**18, 10**25))) + "}"
    elif mutation == 21:
        text = " \n" + text + "\t"
    value = text.encode("utf-8", "surrogatepass")
    if mutation == 4:
        value = draw(st.sampled_from(BAD_UTF8)) + value
    elif mutation == 5:
        value = b""
    key, max_bytes, max_key, detect = draw(limits(value, noise))
    if draw(st.integers(0, 3)):
        ct = draw(st.sampled_from(STRUCTURED_CONTENT_TYPES if not broken(draw, noise)
                                  else CONTENT_TYPES[11:]))
        headers = [(draw(header_name("content-type")), ct)]
        if draw(st.integers(0, 5)) == 0:  # ignored in structured mode
            headers.append((draw(header_name("ce_partitionkey")), b"hdr-pk"))
    else:  # no content-type, or a JSON one: a record for detect mode (mostly on)
        headers = draw(st.sampled_from([[], [("content-type", b"application/json")],
                                        [("content-type", b"text/plain")]]))
        detect = draw(st.integers(0, 4)) > 0
    return value, headers, key, max_bytes, max_key, detect


def _envelope_kind(ct: str | None) -> str:
    if ct is None:
        return "json"
    kind = envelope._classify(ct)[0]
    return {envelope._JSON: "json", envelope._MSGPACK: "msgpack",
            envelope._TEXT: "text"}.get(kind, "other")

# ----------------------------------------------------------------------------- properties
@SETTINGS
@given(binary_record())
def test_binary_records_agree(rec):
    res = check(*rec)
    event(res[0] if res[0] != "error" else res[1])


@SETTINGS
@given(structured_record())
def test_structured_records_agree(rec):
    res = check(*rec)
    event(res[0] if res[0] != "error" else res[1])


@settings(max_examples=150, deadline=None)
@given(value=st.none() | st.binary(max_size=40),
       headers=st.lists(st.tuples(st.sampled_from(NOISE_NAMES + ["ce_id", "ce_specversion",
                                                                 "content-type", "CE_Type"]),
                                  st.binary(max_size=8) | st.none()), max_size=6),
       key=st.none() | st.binary(max_size=6), detect=st.booleans())
def test_random_bytes_agree(value, headers, key, detect):
    check(value, headers, key, detect=detect)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"0", b"1", b"9", b"5", b"a", b"-", b".", b"\xff", b" "]),
                max_size=80).map(b"".join))
def test_long_digit_scan_equals_the_regex(raw):
    assert _envelope._has_long_digits(raw) == bool(re.search(rb"[0-9]{19}", raw))


def _long_number_ref(raw: bytes) -> bool:
    """A 19-digit run outside the strings of valid JSON `raw`."""
    text = re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', raw)
    return re.search(rb"[0-9]{19}", text) is not None


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.integers(-(10**25), 10**25) | st.text("0123456789\\\"x", max_size=30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text("0123456789", min_size=18, max_size=22).map(lambda d: float("0." + d)),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text("0123456789\"", max_size=22), c,
                                                          max_size=3),
    max_leaves=10))
def test_long_number_scan_tells_numbers_from_strings(doc):
    raw = json.dumps(doc).encode()
    assert _envelope._has_long_number(raw) == _long_number_ref(raw), raw


@pytest.mark.parametrize("n", list(range(15, 45)))
def test_long_digit_scan_every_position(n):
    for start in range(0, 45):
        raw = b"x" * start + b"7" * n + b"y" * 3
        assert _envelope._has_long_digits(raw) == (n >= 19), (start, n)


# ----------------------------------------------------------------------------- fixed cases
ATTRS_OK = {"id": "evt-1", "source": "/shop/orders", "type": "shop.order.placed",
            "time": "2024-05-01T12:00:00Z", "subject": "o-1", "partitionkey": "o-1",
            "sequence": 42, "traceparent": "00-abc", "dataschema": "urn:x"}
DATA = {"order_id": "o-1", "amount": 12.5, "items": [{"sku": "A", "qty": 2}], "note": "✓"}


@pytest.mark.parametrize("ct", ["application/json", "application/msgpack", "text/plain",
                                "application/vnd.x+json", "text/plain; charset=latin-1"])
def test_binary_round_trips_agree(ct):
    data = "plain café" if ct.startswith("text/") else DATA
    headers, value = to_binary(ATTRS_OK, data, content_type=ct)
    assert check(value, headers, b"k")[0] == "event"
    assert check(value, [list(h) for h in headers], None)[0] == "event"


@pytest.mark.parametrize("dct", [None, "application/json", "application/msgpack",
                                 "text/plain"])
def test_structured_round_trips_agree(dct):
    attrs = dict(ATTRS_OK, datacontenttype=dct) if dct else ATTRS_OK
    data = (msgpack.packb(DATA) if dct == "application/msgpack"
            else "hi" if dct == "text/plain" else DATA)
    headers, value = to_structured(attrs, data)
    assert check(value, headers, b"k")[0] == "event"
    # without its content-type: detect mode reads it, binary mode explains why not
    assert check(value, [], b"k", detect=True)[0] == "event"
    assert check(value, [], b"k", detect=False)[0] == "error"


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 2,
                                   500, 900, 990, 1000, 1023, 1024, 1025, 1100, 10_000])
def test_depth_limits_agree(depth):
    base = {"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "partitionkey": "k"}
    headers, _ = to_binary(base, None)
    check(nested("json", depth), headers, b"k")
    check(nested("msgpack", depth), headers + [("content-type", b"application/msgpack")],
          b"k")
    sv = json.dumps(base)[:-1] + ', "data": ' + nested("json", depth).decode() + "}"
    check(sv.encode(), [("content-type", b"application/cloudevents+json")], b"k")
    b64 = base64.b64encode(nested("msgpack", depth)).decode()
    obj = dict(base, datacontenttype="application/msgpack", data_base64=b64)
    check(json.dumps(obj).encode(), [("content-type", b"application/cloudevents+json")], b"k")


@example(n=2**63 - 1)
@example(n=2**64)
@example(n=-(2**64) - 1)
@settings(max_examples=200, deadline=None)
@given(n=st.integers(-(10**25), 10**25))
def test_big_integers_agree(n):
    headers, _ = to_binary({"id": "e", "source": "/s", "type": "t"}, None)
    value = json.dumps({"n": n, "f": n / 7}).encode()
    check(value, headers, b"k")
    check(json.dumps({"specversion": "1.0", "id": "e", "source": "/s", "type": "t",
                      "sequence": n, "data": {"n": n}}).encode(),
          [("content-type", b"application/cloudevents+json")], b"k")


def test_simulated_workload_and_its_malformed_records_agree():
    w = simulate.generate(5, 3000, dup_rate=0.05, reorder_rate=0.02)
    bad = simulate.bad_records()
    before = _envelope.deferred()
    for _topic, key, value, headers in (r[:4] for r in w.records):
        for detect in (False, True):
            assert check(value, headers, key, detect=detect)[0] == "event"
            # as the worker gets them from the ring: [name, value] lists
            check(value, [list(h) for h in headers], key, detect=detect)
    # the compiled parse decided every valid record itself
    assert _envelope.deferred() == before
    for b in bad:
        res = check(b.value, b.headers, b.key)
        assert res[:2] == ("error", b.reason)
    assert _envelope.deferred() == before + len(bad)


@pytest.mark.parametrize("mode", ["binary-json", "binary-msgpack", "binary-text",
                                  "structured", "structured-base64", "detect"])
def test_valid_records_are_not_deferred(mode):
    """Valid records of every kind are decided by the compiled code (a twin that deferred
    everything would pass the comparisons, and be as slow as the reference)."""
    # a sequence of epoch nanoseconds (19 digits), an id of 22 digits in a string
    attrs = dict(ATTRS_OK, sequence=1733461234567890123)
    data = dict(DATA, big_id="1234567890123456789012", n=-(10**18 - 1), f=0.1234567890123456)
    if mode.startswith("binary"):
        ct = {"binary-json": "application/json", "binary-msgpack": "application/msgpack",
              "binary-text": "text/plain; charset=utf-8"}[mode]
        headers, value = to_binary(attrs, "txt" if mode == "binary-text" else data, ct)
        records = [(value, headers), (value, [list(h) for h in headers]), (None, headers)]
    else:
        data = msgpack.packb(data) if mode == "structured-base64" else data
        if mode == "structured-base64":
            attrs["datacontenttype"] = "application/msgpack"
        headers, value = to_structured(attrs, data)
        records = [(value, [] if mode == "detect" else headers)]
    before = _envelope.deferred()
    for value, headers in records:
        assert check(value, headers, b"k", detect=mode == "detect")[0] == "event"
    assert _envelope.deferred() == before
    # a number of 19+ digits: the reference's standard-library path reads the JSON
    headers, value = to_binary(ATTRS_OK, {"n": 10**19})
    assert check(value, headers, b"k")[0] == "event"
    assert _envelope.deferred() == before + 1


def test_headers_first_occurrence_wins_and_extension_order():
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"first"), ("CE_ID", b"second"),
               ("ce_source", b"/s"), ("ce_type", b"t"), ("ce_b", b"1"), ("ce_a", b"2"),
               ("CE_B", b"3"), ("ce_\u00fcber", b"4"), ("ce_partition\u212aey", b"pk"),
               ("ce_partitionkey", b"later")]
    res = check(b"{}", headers, None)
    ev = _envelope.parse(b"{}", headers, None)
    assert ev.id == "first" and ev.partitionkey == "pk"
    assert list(ev.extensions.items()) == list(envelope.parse(b"{}", headers, None)
                                               .extensions.items())
    assert res[0] == "event"


def test_non_bytes_header_values_and_odd_shapes_agree():
    base = [("ce_specversion", b"1.0"), ("ce_id", b"e"), ("ce_source", b"/s"), ("ce_type", b"t")]
    for extra in ([("ce_time", None)], [("ce_time", "str")], [("ce_x", 5)],
                  [("x-other", None)], [("ce_partitionkey", "é" * 201)],
                  [("content-type", None)], [("content-type", "application/json")]):
        check(b"[1]", base + extra, b"k")
    check(b"[1]", [(b"ce_id", b"x")] + base, b"k")  # a bytes header name: TypeError in both
    check(b"[1]", base + [("ce_x", b"1", b"2")], b"k")  # not a pair: ValueError in both
    check(b"[1]", iter(base), b"k")  # not reversible: TypeError in both
    check(bytearray(b"[1]"), base, b"k")
    check(memoryview(b"[1]"), base, b"k")
    check(b"[1]", base, "str-key")


SEQUENCE_EDGES = [0, 1, 7, 10**17, 10**18 - 1, 10**18, 10**19 - 1, 10**19, 2**63 - 2, 2**63 - 1,
                  2**63, 2**63 + 1, 2**64 - 1, 2**64, 10**20, 10**40]


def test_binary_sequences_agree():
    headers, value = to_binary({"id": "e", "source": "/s", "type": "t"}, None)
    texts = [str(n) for n in SEQUENCE_EDGES] + ["0" * k + "5" for k in (17, 18, 19, 30)] + [
        "", "-1", "+1", " 1", "1 ", "1e3", "1_0", "\u0663", "9" * 4300, "9" * 4301, "٣"]
    for t in texts:
        check(None, headers + [("ce_sequence", t.encode())], b"k")


def test_structured_sequence_and_key_kinds_agree():
    for seq in SEQUENCE_EDGES + [str(n) for n in SEQUENCE_EDGES] + [
            "007", -1, -(2**63), True, 1.0, "1e3", None, "", [1], "0" * 30 + "1", "9" * 5000]:
        for pk in [None, "", "k", "é" * 200, "é" * 201, 5, "😀" * 100, "😀" * 101]:
            obj = {"specversion": "1.0", "id": "e", "source": "/s", "type": "t",
                   "sequence": seq, "partitionkey": pk, "ext": None, "other": 1}
            check(json.dumps(obj).encode(), [("content-type", b"application/cloudevents+json")],
                  b"kk")


def test_content_type_cache_keeps_the_first_meaning():
    """Repeated records with the same content-type header (cached) parse the same way as
    the first one, for every content type."""
    headers, value = to_binary({"id": "e", "source": "/s", "type": "t", "partitionkey": "p"},
                               None)
    for _ in range(3):
        for ct in CONTENT_TYPES:
            for v in (b'{"a": 1}', b"\x81\xa1a\x01", b"plain", None):
                check(v, headers + [("content-type", ct)], b"k")
                check(v, headers + [("ce_datacontenttype", ct)], b"k")


def test_max_bytes_and_key_limits_agree():
    headers, value = to_binary({"id": "e", "source": "/s", "type": "t"}, DATA)
    for max_bytes in (len(value) - 1, len(value), len(value) + 1):
        for key in (b"k" * 5, "é".encode() * 3, b"k" * 6, b"k" * 7):
            for max_key in (5, 6, 7):
                check(value, headers, key, max_bytes, max_key)
                pk_headers = headers + [("ce_partitionkey", key)]
                check(value, pk_headers, None, max_bytes, max_key)
