"""Input mapping: a Kafka record that is not a CloudEvent → an `envelope.Event`.

A source with ``format = "outbox"`` or ``format = "json"`` (see `config.MappingConfig`)
gets a `Plan`, compiled once from its config: for each attribute the pipeline reads (id,
source, type, time, subject, partitionkey, sequence) one `Step` that says where its value
comes from. `apply` runs a plan over one record; `route` computes only the partition key,
for the supervisor (and cluster ingest), with the same code, so for every record `apply`
accepts, ``route(...) == event.partitionkey.encode()``.

Where an attribute comes from (the spec strings of the config, parsed by `parse_spec`):

* ``header:<name>``   a Kafka header, exact name, first occurrence wins, UTF-8;
* ``data.<path>``     a member of the payload (dotted names; a digit indexes a list);
* ``value.<path>``    a member of the whole JSON value (an envelope around the payload);
* ``kafka:key``       the record key (``key_format = "json"``: a JSON string or number,
  or a Kafka Connect schema envelope ``{"schema": ..., "payload": ...}`` holding one);
* ``kafka:offset``    the record offset plus one (sequence only: monotonic per key, since
  one key stays in one partition; offset 0 is sequence 1, the first a stream expects);
* ``kafka:timestamp`` the record timestamp, as an RFC 3339 UTC time (time only);
* ``literal:<text>``  a constant.

The payload (the event's ``data``) is the JSON value, or its member at ``payload =
"value.<path>"``; a payload that is a JSON string whose text starts with ``{`` or ``[`` is
decoded once more (the outbox relay's default: the payload column as a string). A
null/empty value is an event without data.

A plan is plain data (tuples of ints and strings), so that a compiled core can run it later.
Errors are `envelope.EnvelopeError` with the envelope's reason codes plus
``invalid_attribute`` (a value of the wrong JSON type); every message names the attribute,
the spec that was tried and the source's mapping (``outbox mapping of source 'orders'``).
"""

from __future__ import annotations

import logging
import time as _time
from typing import Any, NamedTuple

from .envelope import (
    MAX_DEPTH,
    EnvelopeError,
    Event,
    _check_pk,
    _decode_json,
    _decode_json_text,
    _sequence,
)
from .envelope import (
    REASONS as ENVELOPE_REASONS,
)

log = logging.getLogger(__name__)

__all__ = ["ATTRS", "DEFAULTS", "KINDS", "REASONS", "Plan", "Step", "apply", "compile_plan",
           "parse_spec", "route", "spec_problem"]

# attribute source kinds (ints: a compiled core can switch on them)
HEADER, DATA, VALUE, KEY, OFFSET, TIMESTAMP, LITERAL = range(7)
KINDS = {"header": HEADER, "data": DATA, "value": VALUE, "kafka:key": KEY,
         "kafka:offset": OFFSET, "kafka:timestamp": TIMESTAMP, "literal": LITERAL}
ATTRS = ("id", "source", "type", "time", "subject", "partitionkey", "sequence")

# which kinds each attribute may come from
_ALLOWED = {
    "id": {HEADER, DATA, VALUE, KEY},
    "source": {HEADER, DATA, VALUE, KEY, LITERAL},
    "type": {HEADER, DATA, VALUE, KEY, LITERAL},
    "time": {HEADER, DATA, VALUE, TIMESTAMP, LITERAL},
    "subject": {HEADER, DATA, VALUE, KEY, LITERAL},
    "partitionkey": {HEADER, DATA, VALUE, KEY, LITERAL},
    "sequence": {HEADER, DATA, VALUE, OFFSET},
}
_KIND_NAMES = {v: k for k, v in KINDS.items()}

#: Defaults per format; ``source`` defaults to ``literal:/<source name>`` in both.
DEFAULTS: dict[str, dict[str, str]] = {
    # the outbox event router's record: aggregate id as key, event id in header "id"
    "outbox": {"id": "header:id", "type": "header:type", "time": "kafka:timestamp",
               "partitionkey": "kafka:key", "sequence": "kafka:offset"},
    "json": {"time": "kafka:timestamp", "partitionkey": "kafka:key"},
}
REQUIRED = ("id", "source", "type", "partitionkey")  # every plan has these steps
#: The dead-letter reasons a mapping raises: the envelope's plus invalid_attribute.
REASONS = ENVELOPE_REASONS | {"invalid_attribute"}


class Step(NamedTuple):
    """Where one attribute comes from: `kind` (an int above), `arg` (header name, path
    tuple or literal text; None for Kafka fields) and `spec` (the config text, for errors)."""

    attr: str
    kind: int
    arg: Any
    spec: str


class Plan(NamedTuple):
    """A source's compiled mapping. `steps` holds one Step per mapped attribute, in
    `ATTRS` order; `pk` is the partitionkey step; `payload` the path of the payload in the
    value (() = the whole value); `key_json`: the Kafka key is JSON-encoded."""

    format: str
    source_name: str
    steps: tuple[Step, ...]
    pk: Step
    payload: tuple[str, ...]
    key_json: bool

    @property
    def label(self) -> str:
        return f"{self.format} mapping of source {self.source_name!r}"


def parse_spec(spec: str) -> tuple[int, Any]:
    """A spec string → (kind, arg); ValueError with a message for the config on bad syntax."""
    if not isinstance(spec, str):
        raise ValueError(f"must be a string like 'header:id' (got {spec!r})")
    if spec in ("kafka:key", "kafka:offset", "kafka:timestamp"):
        return KINDS[spec], None
    head, sep, rest = spec.partition(":")
    if sep and head == "header":
        if not rest:
            raise ValueError("'header:' needs a header name, e.g. 'header:id'")
        return HEADER, rest
    if sep and head == "literal":
        if not rest:
            raise ValueError("'literal:' needs a value, e.g. 'literal:/shop/orders'")
        return LITERAL, rest
    root, dot, path = spec.partition(".")
    if root in ("data", "value") and dot:
        parts = tuple(path.split("."))
        if any(not p or p != p.strip() for p in parts):
            raise ValueError(f"bad path {spec!r}: use dotted names like '{root}.a.b'")
        return (DATA if root == "data" else VALUE), parts
    raise ValueError(
        f"bad attribute source {spec!r}: use 'header:<name>', 'data.<path>', "
        "'value.<path>', 'kafka:key', 'kafka:offset', 'kafka:timestamp' or 'literal:<text>'")


def spec_problem(attr: str, spec: str) -> str | None:
    """Why `spec` cannot give `attr` (None if it can): syntax and the kinds allowed."""
    try:
        kind, _ = parse_spec(spec)
    except ValueError as exc:
        return str(exc)
    if kind not in _ALLOWED[attr]:
        allowed = ", ".join(sorted(_KIND_NAMES[k] for k in _ALLOWED[attr]))
        return f"{attr} cannot come from {_KIND_NAMES[kind]} (allowed: {allowed})"
    return None


def resolved_specs(fmt: str, source_name: str, given: dict[str, str | None]) -> dict[str, str]:
    """The attribute specs in force: the format's defaults, then what the config gives."""
    out = {"source": f"literal:/{source_name}", **DEFAULTS[fmt]}
    out.update({k: v for k, v in given.items() if v is not None})
    return {a: out[a] for a in ATTRS if a in out}


def compile_plan(fmt: str, source_name: str, specs: dict[str, str],
                 payload: str = "value", key_format: str = "string") -> Plan:
    """A Plan from resolved specs (`resolved_specs`); the config validated them already."""
    steps = []
    for attr in ATTRS:
        if attr in specs:
            kind, arg = parse_spec(specs[attr])
            steps.append(Step(attr, kind, arg, specs[attr]))
    pk = next(s for s in steps if s.attr == "partitionkey")
    ppath = () if payload == "value" else parse_spec(payload)[1]
    return Plan(fmt, source_name, tuple(steps), pk, ppath, key_format == "json")


# ---- applying a plan ------------------------------------------------------------------


def _fail(plan: Plan, step: Step, reason: str, what: str) -> EnvelopeError:
    return EnvelopeError(reason, f"{what} attribute {step.attr!r} ({step.attr} = "
                                 f"\"{step.spec}\", {plan.label})")


def _header(headers: Any, name: str) -> Any:
    if headers:
        for hn, hv in headers:
            if hn == name:
                return hv
    return None


def _walk(obj: Any, path: tuple[str, ...]) -> Any:
    """The member at `path` (None if absent); a digit segment indexes a list."""
    for p in path:
        if type(obj) is dict:
            obj = obj.get(p)
        elif type(obj) is list and p.isdigit():
            i = int(p)
            obj = obj[i] if i < len(obj) else None
        else:
            return None
        if obj is None:
            return None
    return obj


def _kafka_key(plan: Plan, key: Any) -> Any:
    """The record key as text (None if there is none); JSON-decoded with key_format json."""
    if key is None or len(key) == 0:
        return None
    if type(key) is not str:
        try:
            key = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError("bad_encoding", "Kafka record key is not valid UTF-8") from None
    if not plan.key_json:
        return key
    k = _decode_json_text(key, "Kafka record key", 4)
    if type(k) is dict and "payload" in k and "schema" in k:  # Connect schema envelope
        k = k["payload"]
    return k


def _timestamp(ms: Any) -> str | None:
    if type(ms) is not int or ms <= 0:
        return None
    s, frac = divmod(ms, 1000)
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(s)) + f".{frac:03d}Z"


def _decode_value(plan: Plan, value: Any) -> tuple[Any, Any]:
    """(decoded JSON value, payload); both None for a null/empty value."""
    if not value:
        return None, None
    whole = _decode_json(bytes(value), "value")
    payload = whole
    if plan.payload:
        if type(whole) is not dict:
            raise EnvelopeError("bad_json", f"value is not a JSON object, so it has no payload "
                                f"at 'value.{'.'.join(plan.payload)}' ({plan.label})")
        payload = _walk(whole, plan.payload)
    if type(payload) is str and payload.lstrip()[:1] in ("{", "["):
        payload = _decode_json_text(payload, "payload (a JSON string)", MAX_DEPTH)
    return whole, payload


def _get(plan: Plan, step: Step, headers: Any, key: Any, offset: int, ts: Any,
         whole: Any, payload: Any) -> Any:
    kind = step.kind
    if kind == HEADER:
        v = _header(headers, step.arg)
        if v is not None and type(v) is not str:
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                raise _fail(plan, step, "bad_encoding", "header is not valid UTF-8 for") from None
        return v
    if kind == DATA:
        return _walk(payload, step.arg)
    if kind == VALUE:
        return _walk(whole, step.arg)
    if kind == KEY:
        return _kafka_key(plan, key)
    if kind == OFFSET:
        return offset + 1  # offset 0 is sequence 1: the first a stream expects
    if kind == TIMESTAMP:
        return _timestamp(ts)
    return step.arg  # LITERAL


def _text(plan: Plan, step: Step, v: Any) -> str:
    if type(v) is str:
        if not v:
            raise _fail(plan, step, "missing_attribute", "empty")
        return v
    if type(v) is int:
        return str(v)
    raise _fail(plan, step, "invalid_attribute",
                f"a JSON {_json_type(v)} (not a string or an integer) for")


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", bool: "boolean", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def apply(plan: Plan, value: Any, headers: Any, key: Any, offset: int, timestamp: Any,
          max_bytes: int = 1 << 20, max_key_bytes: int = 400) -> Event:
    """One record → an Event, by `plan`; raise `EnvelopeError` when the record does not
    give what the plan asks for (the message names the attribute and the spec)."""
    if value is not None and len(value) > max_bytes:
        raise EnvelopeError("too_large", f"record value is {len(value)} bytes (limit {max_bytes})")
    whole, payload = _decode_value(plan, value)
    got: dict[str, Any] = {}
    for step in plan.steps:
        v = _get(plan, step, headers, key, offset, timestamp, whole, payload)
        if v is None:
            if step.attr in REQUIRED:
                raise _fail(plan, step, "missing_attribute" if step.attr != "partitionkey"
                            else "no_partition_key", "no value for")
            continue  # optional: time, subject, sequence
        if step.attr == "sequence":
            try:
                v = _sequence(v)
            except EnvelopeError as exc:
                raise EnvelopeError("bad_sequence", f"{exc.message} ({step.attr} = "
                                    f"\"{step.spec}\", {plan.label})") from None
        elif step.attr == "time":
            if type(v) is not str or not v:
                raise _fail(plan, step, "invalid_attribute", "not a non-empty string:")
        else:
            v = _text(plan, step, v)
        got[step.attr] = v
    pk = got["partitionkey"]
    try:
        pk = _check_pk(pk, max_key_bytes)
    except EnvelopeError as exc:
        raise EnvelopeError(exc.reason, f"{exc.message} (partitionkey = \"{plan.pk.spec}\", "
                            f"{plan.label})") from None
    ev = Event.__new__(Event)
    ev.id = got["id"]
    ev.source = got["source"]
    ev.type = got["type"]
    ev.specversion = "1.0"
    ev.time = got.get("time")
    ev.subject = got.get("subject")
    ev.datacontenttype = "application/json"
    ev.dataschema = None
    ev.partitionkey = pk
    ev.sequence = got.get("sequence")
    ev.data = payload
    ev.extensions = {}
    return ev


def route(plan: Plan, value: Any, headers: Any, key: Any, max_bytes: int = 1 << 20) -> bytes | None:
    """The routing key of a record of a mapped source: its partition key as `apply` finds
    it, UTF-8; None when it has none (or the record cannot be read: `apply` dead-letters
    it). Reads and decodes the value only when the partition key comes from it."""
    step = plan.pk
    kind = step.kind
    if kind == KEY and not plan.key_json:
        if not key:
            return None
        return key if type(key) is bytes else (key.encode("utf-8") if type(key) is str
                                               else bytes(key))
    try:
        if kind in (DATA, VALUE):
            if value is None or len(value) > max_bytes:
                return None
            whole, payload = _decode_value(plan, value)
        else:
            whole = payload = None
        v = _get(plan, step, headers, key, 0, None, whole, payload)
    except EnvelopeError:
        return None
    if type(v) is int:
        v = str(v)
    if type(v) is not str or not v:
        return None
    try:
        return v.encode("utf-8")
    except UnicodeEncodeError:
        return None


def plans_by_topic(cfg: Any, topics: list[str]) -> list[Plan | None]:
    """Per topic index: the Plan of its source, or None for a CloudEvents source (and for
    topics that are no source, such as cluster mode's tasks topic)."""
    out: list[Plan | None] = []
    for t in topics:
        try:
            name, src = cfg.source_by_topic(t)
        except KeyError:
            out.append(None)
            continue
        out.append(src.plan(name))
    return out
