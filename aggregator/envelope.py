"""CloudEvents 1.0 over Kafka: parse a record into an `Event`, or raise `EnvelopeError`.

Implements the Kafka protocol binding (binary and structured content modes) and the JSON
event format:

* Structured mode: the record's ``content-type`` header starts (case-insensitively) with
  ``application/cloudevents+json``; the whole event is a JSON object in the value. Other
  ``application/cloudevents...`` media types (``+avro``, ``-batch+json``, ...) are
  rejected with ``unsupported_content_type`` (the Kafka binding has no batch mode).
* Binary mode (everything else): attributes are ``ce_<name>`` headers (names matched
  lower-case, values UTF-8), ``content-type`` is ``datacontenttype``, the value is the data.
  A null/empty value is an event without data (``data is None``).
* Detected structured mode (``detect=True``, a source's ``structured = "detect"``): a
  record with no ``ce_`` header, whose ``content-type`` is absent or a JSON type, and whose
  value holds ``"specversion"`` is read as a structured-mode event. That is the record the
  CloudEvents Python SDK 1.x makes (``cloudevents.kafka.to_structured`` sets the
  content-type to the event's ``datacontenttype``, or none). Without ``detect`` such a
  record is dead-lettered ``missing_attribute`` with a message that says it was read in
  binary mode, and why.

Data is decoded by media type: ``*/json``, ``*/*+json`` or absent -> JSON;
``application/msgpack``, ``application/x-msgpack``, ``application/vnd.msgpack`` -> msgpack;
``text/*`` -> str (``charset`` parameter honoured, default UTF-8); anything else ->
``unsupported_content_type``. Decoded data may nest at most `MAX_DEPTH` containers deep
(``bad_json``/``bad_msgpack`` beyond), which keeps later recursive code (copying,
msgpack packing with its 511-level limit) safe.

Error messages name the attribute or the problem, never the payload. When the same header
appears more than once, the first occurrence wins (as in `routing_key`).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import json.scanner
import re
from typing import Any

import msgpack
import orjson

__all__ = [
    "MAX_DEPTH",
    "REASONS",
    "EnvelopeError",
    "Event",
    "parse",
    "routing_key",
]

#: Maximum container nesting of decoded data (and of a structured-mode event minus one).
MAX_DEPTH = 128

REASONS = frozenset(
    {
        "missing_attribute",
        "bad_specversion",
        "bad_json",
        "bad_msgpack",
        "bad_encoding",
        "too_large",
        "no_partition_key",
        "bad_sequence",
        "key_too_long",
        "unsupported_content_type",
    }
)

_SEQ_LIMIT = 1 << 63
# Header name -> attribute name (the _CT sentinel stands for the content-type header);
# exact-case hits skip str.lower().
_CT = 0
_KNOWN_HEADERS: dict[str, Any] = {
    "ce_" + n: n
    for n in (
        "id",
        "source",
        "type",
        "specversion",
        "time",
        "subject",
        "dataschema",
        "datacontenttype",
        "partitionkey",
        "sequence",
    )
}
_KNOWN_HEADERS["content-type"] = _CT
_STRUCTURED_PREFIX = "application/cloudevents"
_STRUCTURED_JSON = "application/cloudevents+json"
_B_STRUCTURED_JSON = b"application/cloudevents+json"
_STRUCTURED_CT = b"application/cloudevents+json; charset=utf-8"

# Attribute names with a dedicated Event slot (everything else is an extension).
_CORE = ("id", "source", "type", "specversion")
_OPTIONAL_STR = ("time", "subject", "dataschema")


class EnvelopeError(Exception):
    """The record is not a usable CloudEvent. `reason` is a short snake_case code."""

    __slots__ = ("reason",)

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    @property
    def message(self) -> str:
        return self.args[0]

    def __repr__(self) -> str:
        return f"EnvelopeError({self.reason!r}, {self.args[0]!r})"


class Event:
    """A parsed CloudEvent. `partitionkey` is always set (falls back to the Kafka key)."""

    __slots__ = (
        "id",
        "source",
        "type",
        "specversion",
        "time",
        "subject",
        "datacontenttype",
        "dataschema",
        "partitionkey",
        "sequence",
        "data",
        "extensions",
    )

    def __init__(
        self,
        id: str,
        source: str,
        type: str,
        specversion: str = "1.0",
        time: str | None = None,
        subject: str | None = None,
        datacontenttype: str | None = None,
        partitionkey: str = "",
        sequence: int | None = None,
        data: Any = None,
        extensions: dict | None = None,
        dataschema: str | None = None,
    ):
        self.id = id
        self.source = source
        self.type = type
        self.specversion = specversion
        self.time = time
        self.subject = subject
        self.datacontenttype = datacontenttype
        self.dataschema = dataschema
        self.partitionkey = partitionkey
        self.sequence = sequence
        self.data = data
        self.extensions = {} if extensions is None else extensions

    def __repr__(self) -> str:  # data left out on purpose (size, privacy)
        return (
            f"Event(id={self.id!r}, source={self.source!r}, type={self.type!r}, "
            f"partitionkey={self.partitionkey!r}, sequence={self.sequence!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in Event.__slots__)

    __hash__ = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------
# helpers


def _short(s: Any, n: int = 40) -> str:
    """A bounded repr for names/content types that go into error messages."""
    r = repr(s)
    return r if len(r) <= n else r[: n - 3] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError("NaN/Infinity are not JSON")


_json_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_json_decode = _json_decoder.decode
_scan_once = json.scanner.make_scanner(_json_decoder)  # no whitespace regex per call

# content kinds
_JSON = 0
_MSGPACK = 1
_TEXT = 2
_UNSUPPORTED = 3
_MSGPACK_TYPES = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)
_kind_cache: dict[str, tuple[int, str | None]] = {}


def _classify(ct: str) -> tuple[int, str | None]:
    """Media type -> (kind, text charset). Cached (bounded) since producers reuse a few."""
    hit = _kind_cache.get(ct)
    if hit is not None:
        return hit
    main, _, params = ct.partition(";")
    mt = main.strip().lower()
    charset = None
    if mt == "" or mt.endswith(("/json", "+json")):
        res: tuple[int, str | None] = (_JSON, None)
    elif mt in _MSGPACK_TYPES:
        res = (_MSGPACK, None)
    elif mt.startswith("text/"):
        charset = "utf-8"
        for p in params.split(";"):
            k, _, v = p.partition("=")
            if k.strip().lower() == "charset":
                charset = v.strip().strip('"').lower() or "utf-8"
        try:
            charset = codecs.lookup(charset).name
            res = (_TEXT, charset)
        except LookupError:
            res = (_UNSUPPORTED, None)
    else:
        res = (_UNSUPPORTED, None)
    if len(_kind_cache) < 256:
        _kind_cache[ct] = res
    return res


_ct_cache: dict[Any, tuple[str, bool]] = {}


def _content_type(raw: Any) -> tuple[str, bool]:
    """The content-type header value -> (str, is structured mode). Cached (bounded)."""
    hit = _ct_cache.get(raw)
    if hit is not None:
        return hit
    ct = _hstr(raw, "content-type")
    if ct is None:
        raise EnvelopeError("bad_encoding", "content-type header has no value")
    res = (ct, ct[:23].lower() == _STRUCTURED_PREFIX)
    if len(_ct_cache) < 256 and type(raw) is bytes:
        _ct_cache[raw] = res
    return res


def _too_deep(obj: Any, limit: int) -> bool:
    """True if `obj` nests more than `limit` dicts/lists (iterative, early exit)."""
    stack = [(obj, 1)]
    pop = stack.pop
    push = stack.append
    while stack:
        o, d = pop()
        if d > limit:
            return True
        d += 1
        if type(o) is dict:
            for v in o.values():
                if type(v) is dict or type(v) is list:
                    push((v, d))
        else:
            for v in o:
                if type(v) is dict or type(v) is list:
                    push((v, d))
    return False


def _decode_json_text(text: str, what: str, limit: int) -> Any:
    try:
        try:
            obj, end = _scan_once(text, 0)
        except StopIteration:  # leading whitespace or invalid: let the full decoder judge
            end = -1
        if end != len(text):
            obj = _json_decode(text)
    except RecursionError:
        raise EnvelopeError("bad_json", f"{what}: JSON nested too deeply") from None
    except ValueError as exc:
        pos = getattr(exc, "pos", None)
        where = f" at offset {pos}" if pos is not None else ""
        raise EnvelopeError("bad_json", f"{what}: invalid JSON{where}") from None
    except Exception:  # defensive: nothing else is expected from the C decoder
        raise EnvelopeError("bad_json", f"{what}: invalid JSON") from None
    if (type(obj) is dict or type(obj) is list) and (
        text.count("[") + text.count("{") > limit and _too_deep(obj, limit)
    ):
        raise EnvelopeError("bad_json", f"{what}: JSON nested deeper than {limit}")
    if "\\ud" in text or "\\uD" in text:
        # \uXXXX escapes can produce lone surrogates, which no later UTF-8 encode accepts.
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise EnvelopeError("bad_encoding", f"{what}: lone UTF-16 surrogate in JSON") from None
        except Exception:
            raise EnvelopeError("bad_json", f"{what}: invalid JSON") from None
    return obj


# A run of 19+ digits may be an integer beyond 64 bits, which orjson turns into a float.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _decode_json(raw: bytes, what: str) -> Any:
    if not _LONG_DIGITS.search(raw):
        try:  # orjson: about twice as fast; it accepts exactly what the path below accepts,
            obj = orjson.loads(raw)  # except NaN/Infinity and what that path reports itself
        except orjson.JSONDecodeError:
            pass  # invalid UTF-8, lone surrogates, syntax, depth: the path below says which
        else:
            if (type(obj) is dict or type(obj) is list) and (
                raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(obj, MAX_DEPTH)
            ):
                raise EnvelopeError("bad_json", f"{what}: JSON nested deeper than {MAX_DEPTH}")
            return obj
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError("bad_encoding", f"{what}: invalid UTF-8 at byte {exc.start}") from None
    return _decode_json_text(text, what, MAX_DEPTH)


# Bytes that cannot start a msgpack map/array (fixmap, fixarray, array16/32, map16/32).
_NOT_CONTAINER_BYTES = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))


def _decode_msgpack(raw: bytes, what: str) -> Any:
    n = len(raw)
    try:
        obj = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=False,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=n,
        )
    except UnicodeDecodeError:
        raise EnvelopeError("bad_encoding", f"{what}: invalid UTF-8 in a msgpack string") from None
    except msgpack.StackError:
        raise EnvelopeError("bad_msgpack", f"{what}: msgpack nested too deeply") from None
    except msgpack.ExtraData:
        raise EnvelopeError("bad_msgpack", f"{what}: trailing bytes after msgpack object") from None
    except Exception as exc:  # ValueError (truncated, limits), TypeError (unhashable key), ...
        raise EnvelopeError(
            "bad_msgpack", f"{what}: invalid msgpack ({type(exc).__name__})"
        ) from None
    if (
        (type(obj) is dict or type(obj) is list)
        and n > MAX_DEPTH
        # every container header is one of these bytes: few of them, no deep nesting
        and len(raw.translate(None, _NOT_CONTAINER_BYTES)) > MAX_DEPTH
        and _too_deep(obj, MAX_DEPTH)
    ):
        raise EnvelopeError("bad_msgpack", f"{what}: msgpack nested deeper than {MAX_DEPTH}")
    return obj


def _decode_data(raw: bytes, ct: str | None, what: str) -> Any:
    if ct is None:
        return _decode_json(raw, what)
    kind, charset = _classify(ct)
    if kind == _JSON:
        return _decode_json(raw, what)
    if kind == _MSGPACK:
        return _decode_msgpack(raw, what)
    if kind == _TEXT:
        try:
            return raw.decode(charset)  # type: ignore[arg-type]
        except UnicodeDecodeError as exc:
            raise EnvelopeError(
                "bad_encoding", f"{what}: invalid {charset} at byte {exc.start}"
            ) from None
    raise EnvelopeError("unsupported_content_type", f"unsupported data content type {_short(ct)}")


def _hstr(v: Any, name: str) -> str | None:
    """A header value (bytes, normally) as str; None stays None."""
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError("bad_encoding", f"header {_short(name)} is not valid UTF-8") from None
    except AttributeError:
        if v is None or type(v) is str:
            return v
        raise EnvelopeError("bad_encoding", f"header {_short(name)} is not bytes") from None


def _sequence(v: Any) -> int:
    if type(v) is str:
        if not (v.isascii() and v.isdigit()):
            raise EnvelopeError("bad_sequence", "sequence is not a non-negative decimal integer")
        try:
            n = int(v)
        except ValueError:  # absurdly long digit strings
            raise EnvelopeError("bad_sequence", "sequence is out of range") from None
    elif type(v) is int:
        n = v
    else:
        raise EnvelopeError("bad_sequence", f"sequence must be a string, not {type(v).__name__}")
    if n < 0 or n >= _SEQ_LIMIT:
        raise EnvelopeError("bad_sequence", "sequence must be >= 0 and < 2**63")
    return n


def _key_from_kafka(key: Any, max_key_bytes: int) -> str:
    if not key:
        raise EnvelopeError("no_partition_key", "no partitionkey attribute and no Kafka record key")
    if len(key) > max_key_bytes:
        raise EnvelopeError(
            "key_too_long", f"Kafka record key is {len(key)} bytes (limit {max_key_bytes})"
        )
    if type(key) is str:
        pk = key
    else:
        try:
            pk = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError("bad_encoding", "Kafka record key is not valid UTF-8") from None
    if len(pk) > max_key_bytes or (not pk.isascii() and len(pk.encode("utf-8")) > max_key_bytes):
        raise EnvelopeError("key_too_long", f"partition key is longer than {max_key_bytes} bytes")
    return pk


def _check_pk(pk: Any, max_key_bytes: int) -> str:
    if type(pk) is not str:
        raise EnvelopeError(
            "no_partition_key", f"partitionkey must be a string, not {type(pk).__name__}"
        )
    if len(pk) > max_key_bytes:
        raise EnvelopeError("key_too_long", f"partitionkey is longer than {max_key_bytes} bytes")
    if not pk.isascii():
        try:
            n = len(pk.encode("utf-8"))
        except UnicodeEncodeError:
            raise EnvelopeError("bad_encoding", "partitionkey is not valid Unicode") from None
        if n > max_key_bytes:
            raise EnvelopeError(
                "key_too_long", f"partitionkey is {n} bytes (limit {max_key_bytes})"
            )
    return pk


# ---------------------------------------------------------------------------------------
# parse


def parse(
    value: bytes | None,
    headers: list[tuple[str, bytes]] | None,
    key: bytes | None,
    max_bytes: int = 1 << 20,
    max_key_bytes: int = 400,
    detect: bool = False,
) -> Event:
    """Parse one Kafka record into an `Event`; raise `EnvelopeError` if it is not usable.

    `detect`: read a record without ``ce_`` headers, with no or a JSON content-type, whose
    value holds ``"specversion"``, as a structured-mode event (see the module docstring)."""
    if value is not None and len(value) > max_bytes:
        raise EnvelopeError("too_large", f"record value is {len(value)} bytes (limit {max_bytes})")
    # One pass over the headers; reversed so that the first occurrence of a name wins.
    ce: dict[Any, Any] = {}
    if headers:
        known = _KNOWN_HEADERS
        for name, hv in reversed(headers):
            k = known.get(name)
            if k is None:
                n = name.lower()
                k = known.get(n)
                if k is None:
                    if not n.startswith("ce_") or len(n) == 3:
                        continue
                    k = n[3:]
            ce[k] = hv
    ct = None
    ct_raw = ce.pop(_CT, None)
    if ct_raw is not None:
        ct, structured = _content_type(ct_raw)
        if structured:
            return _parse_structured(value, ct, key, max_key_bytes)

    # ---- binary mode: attributes from headers
    sv = ce.pop("specversion", None)
    if sv is None:
        if ce or not value or b'"specversion"' not in value:
            raise EnvelopeError("missing_attribute", "missing required attribute 'specversion'")
        # no ce_ header at all and a value that names specversion: a structured-mode event
        # without its content-type
        if detect and (ct is None or _classify(ct)[0] == _JSON):
            return _parse_structured_json(value, key, max_key_bytes)
        raise EnvelopeError("missing_attribute", _binary_read_why(ct, detect))
    if sv != b"1.0":
        sv = _hstr(sv, "ce_specversion")
        if sv != "1.0":
            raise EnvelopeError("bad_specversion", f"specversion {_short(sv, 20)} is not '1.0'")
    eid = ce.pop("id", None)
    source = ce.pop("source", None)
    etype = ce.pop("type", None)
    try:
        eid = eid.decode("utf-8")
        source = source.decode("utf-8")
        etype = etype.decode("utf-8")
        fast = True
    except (AttributeError, UnicodeDecodeError):  # missing, str, or bad UTF-8
        fast = False
    if not fast:  # outside the except block: no chained context on the error
        eid = _required_header(eid, "id")
        source = _required_header(source, "source")
        etype = _required_header(etype, "type")
    if not eid or not source or not etype:
        for n, v in (("id", eid), ("source", source), ("type", etype)):
            if not v:
                raise EnvelopeError("missing_attribute", f"required attribute {n!r} is empty")

    time = subject = dataschema = pk = seq = None
    ext: dict[str, Any] = {}
    if ce:
        time = ce.pop("time", None)
        if time is not None:
            time = _hstr(time, "ce_time")
        subject = ce.pop("subject", None)
        if subject is not None:
            subject = _hstr(subject, "ce_subject")
        dataschema = ce.pop("dataschema", None)
        if dataschema is not None:
            dataschema = _hstr(dataschema, "ce_dataschema")
        pk_raw = ce.pop("partitionkey", None)
        if pk_raw:
            if len(pk_raw) > max_key_bytes:
                raise EnvelopeError(
                    "key_too_long",
                    f"partitionkey is {len(pk_raw)} bytes (limit {max_key_bytes})",
                )
            pk = _hstr(pk_raw, "ce_partitionkey")
        seq_raw = ce.pop("sequence", None)
        if seq_raw is not None:
            seq = _sequence(_hstr(seq_raw, "ce_sequence"))
        dct = ce.pop("datacontenttype", None)
        if ct is None and dct is not None:
            ct = _hstr(dct, "ce_datacontenttype")
        for n, v in ce.items():
            if v is not None:
                ext[n] = _hstr(v, "ce_" + n)
    if pk is None:
        pk = _key_from_kafka(key, max_key_bytes)
    elif not pk.isascii() and len(pk.encode("utf-8")) > max_key_bytes:  # str header values
        raise EnvelopeError("key_too_long", f"partitionkey is longer than {max_key_bytes} bytes")

    data = None if not value else _decode_data(value, ct, "data")
    ev = Event.__new__(Event)
    ev.id = eid
    ev.source = source
    ev.type = etype
    ev.specversion = "1.0"
    ev.time = time
    ev.subject = subject
    ev.datacontenttype = ct
    ev.dataschema = dataschema
    ev.partitionkey = pk
    ev.sequence = seq
    ev.data = data
    ev.extensions = ext
    return ev


def _required_header(v: Any, name: str) -> str:
    if v is None:
        raise EnvelopeError("missing_attribute", f"missing required attribute {name!r}")
    return _hstr(v, "ce_" + name)  # type: ignore[return-value]


def _binary_read_why(ct: str | None, detect: bool) -> str:
    """The message for a record without ce_ headers whose value names specversion."""
    why = ("the record has no content-type header" if ct is None
           else f"its content-type is {_short(ct)}")
    hint = ("structured = \"detect\" reads such a value as structured only with no or a "
            "JSON content-type" if detect else
            "or set structured = \"detect\" on the source to read a JSON value with "
            "specversion and no ce_ headers as structured")
    return (
        "missing required attribute 'specversion': read in binary mode (no ce_ headers) "
        f"because {why}; structured mode needs content-type '{_STRUCTURED_JSON}' ({hint})"
    )


def _parse_structured(value: bytes | None, ct: str, key: Any, max_key_bytes: int) -> Event:
    low = ct.lower()
    if not low.startswith(_STRUCTURED_JSON) or low[28:29] not in ("", ";", " ", "\t"):
        raise EnvelopeError(
            "unsupported_content_type", f"unsupported CloudEvents event format {_short(ct)}"
        )
    return _parse_structured_json(value, key, max_key_bytes)


def _parse_structured_json(value: bytes | None, key: Any, max_key_bytes: int) -> Event:
    """A structured-mode event in the JSON event format (the content type is checked)."""
    if not value:
        raise EnvelopeError("bad_json", "structured-mode record has no value")
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError("bad_encoding", f"event: invalid UTF-8 at byte {exc.start}") from None
    # +1: the event object itself is one level above its data.
    d = _decode_json_text(text, "event", MAX_DEPTH + 1)
    if type(d) is not dict:
        raise EnvelopeError("bad_json", "structured-mode event is not a JSON object")

    sv = d.pop("specversion", None)
    if sv is None:
        raise EnvelopeError("missing_attribute", "missing required attribute 'specversion'")
    if sv != "1.0":
        raise EnvelopeError("bad_specversion", f"specversion {_short(sv, 20)} is not '1.0'")
    core = []
    for n in ("id", "source", "type"):
        v = d.pop(n, None)
        if v is None:
            raise EnvelopeError("missing_attribute", f"missing required attribute {n!r}")
        if type(v) is not str or not v:
            raise EnvelopeError("missing_attribute", f"attribute {n!r} must be a non-empty string")
        core.append(v)
    opt = []
    for n in ("time", "subject", "dataschema", "datacontenttype"):
        v = d.pop(n, None)
        if v is not None and type(v) is not str:
            raise EnvelopeError("missing_attribute", f"attribute {n!r} must be a string")
        opt.append(v)
    time, subject, dataschema, dct = opt

    pk = d.pop("partitionkey", None)
    pk = (
        _key_from_kafka(key, max_key_bytes)
        if pk is None or pk == ""
        else _check_pk(pk, max_key_bytes)
    )
    seq = d.pop("sequence", None)
    if seq is not None:
        seq = _sequence(seq)

    has_data = "data" in d
    data = d.pop("data", None)
    b64 = d.pop("data_base64", None)
    if b64 is not None:
        if has_data:
            raise EnvelopeError("bad_json", "event has both 'data' and 'data_base64'")
        if type(b64) is not str:
            raise EnvelopeError("bad_json", "'data_base64' must be a string")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise EnvelopeError("bad_encoding", "'data_base64' is not valid base64") from None
        data = _decode_data(raw, dct, "data_base64") if raw else None
    elif data is not None and dct is not None:
        kind, _ = _classify(dct)
        if kind == _TEXT:
            if type(data) is not str:
                raise EnvelopeError("bad_json", f"'data' must be a string for {_short(dct)}")
        elif kind == _MSGPACK:
            raise EnvelopeError("bad_msgpack", "msgpack data must be carried in 'data_base64'")
        elif kind == _UNSUPPORTED:
            raise EnvelopeError(
                "unsupported_content_type", f"unsupported data content type {_short(dct)}"
            )

    ext = {k: v for k, v in d.items() if v is not None} if d else {}
    ev = Event.__new__(Event)
    ev.id, ev.source, ev.type = core
    ev.specversion = "1.0"
    ev.time = time
    ev.subject = subject
    ev.datacontenttype = dct
    ev.dataschema = dataschema
    ev.partitionkey = pk
    ev.sequence = seq
    ev.data = data
    ev.extensions = ext
    return ev


# ---------------------------------------------------------------------------------------
# routing


def routing_key(
    value: bytes | None,
    headers: list[tuple[str, bytes]] | None,
    key: bytes | None,
    max_bytes: int = 1 << 20,
    detect: bool = False,
) -> bytes | None:
    """The routing key without a full parse: ``ce_partitionkey`` header, else (structured
    mode, or with `detect` a record `parse(..., detect=True)` reads as structured) the JSON
    ``partitionkey``, else the Kafka key; None if none (or empty).

    For every record that `parse` (with the same `detect`) accepts, this equals
    ``event.partitionkey.encode()`` except when a structured-mode record carries a
    ``ce_partitionkey`` header that disagrees with its JSON ``partitionkey`` (the header
    wins here, the JSON in `parse`).
    """
    ct = None
    pk_seen = False
    has_ce = False
    if headers:
        for name, hv in headers:  # first occurrence of a name wins, as in parse()
            n = name.lower()
            if n == "ce_partitionkey":
                if not pk_seen:
                    pk_seen = True
                    if hv:
                        return hv if type(hv) is bytes else _as_bytes(hv)
            elif n == "content-type":
                if ct is None:
                    ct = hv
            elif n.startswith("ce_") and len(n) > 3:
                has_ce = True
    if ct is not None:
        structured = (ct[:28] if type(ct) is not str else ct[:28].encode()).lower() \
            == _B_STRUCTURED_JSON
        if not structured and detect and not has_ce:
            ct_text = _hstr_or_none(ct)
            structured = ct_text is not None and _classify(ct_text)[0] == _JSON
    else:
        structured = detect and not has_ce
    if (
        structured
        and value
        and len(value) <= max_bytes
        # no such member name (escaped names need "\u"): skip the JSON parse
        and (b'"partitionkey"' in value or b"\\u" in value)
    ):
        try:
            d, _ = _scan_once(bytes(value).decode("utf-8"), 0)
            pk = d.get("partitionkey") if type(d) is dict else None
            if type(pk) is str and pk:
                return pk.encode("utf-8")
        except Exception:  # any parse problem: fall back to the Kafka key
            pass
    if key:
        return key if type(key) is bytes else _as_bytes(key)
    return None


def _hstr_or_none(v: Any) -> str | None:
    try:
        return _hstr(v, "content-type")
    except EnvelopeError:
        return None


def _as_bytes(v: Any) -> bytes:
    return v.encode("utf-8") if type(v) is str else bytes(v)
