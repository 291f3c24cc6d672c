"""A view document's stored record, and the JSON that is both its stored form and its change body.

A document is stored in one of two record forms (store.py's layout table, ``views``):

- ``{"v": version, "j": JSON bytes, "s": freshness}`` when the document is JSON-exact:
  orjson's bytes of it decode (``orjson.loads``) to exactly the document. When the view
  publishes JSON change events, the change event's body is these very bytes: an update
  encodes its document once, for the change event and the store alike;
- ``{"v": version, "d": document, "s": freshness}`` (msgpack inside) for any other document
  and for a tombstone (``"d": None``). Every record of earlier builds has this form, and
  reads as before: the format needs no migration.

JSON-exact (`json_body`): ``orjson.dumps`` with no ``default`` hook and its pass-through
options raises on bytes, non-str keys, integers beyond 64 bits, strings with lone
surrogates, subclasses of str/int/float/dict/list, dataclasses, datetimes, and nesting past
its limit; what it accepts but does not give back — NaN and ±inf (written as ``null``),
tuples (read back as lists) — is found by `core.json_lossless` (compiled; the pure twin with
``AGGREGATOR_PURE_CORE=1``). A document must never change by being stored, and the test
suite holds both forms to that (tests/test_doc_codec.py).

Readers get the ``{"v", "d", "s"}`` dict from `unpack_record` whatever the form. The compiled
route stage (_route.pyx) reads the record as stored (_fresh.pyx: ``"j"`` left as bytes, ``"s"``
kept as its msgpack bytes in a `Fresh`; `unpack_stored` for other records) and merges into
the JSON bytes themselves (_jdoc.pyx); `pack_record` takes either dict, and a `Fresh`.
"""

from __future__ import annotations

import msgpack
import orjson

from .core import json_lossless

_dumps = orjson.dumps
_loads = orjson.loads
_STRICT = (orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
           | orjson.OPT_PASSTHROUGH_DATETIME)
_pack = msgpack.Packer(use_bin_type=True).pack


def _unpack(b: bytes):
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


def json_body(doc) -> bytes | None:
    """orjson's bytes of `doc` if it is JSON-exact (see the module docstring), else None
    (a tombstone, None, is not stored as JSON either)."""
    if doc is None:
        return None
    try:
        body = _dumps(doc, option=_STRICT)
    except TypeError:  # orjson.JSONEncodeError
        return None
    # A right-sized copy: orjson's bytes keep the 4 KiB block it wrote them into (orjson
    # 3.13: 4,098 bytes allocated for a 242-byte body), and a transaction keeps about 1.5
    # bodies per record until its commit (change events, stored records): 6 KB of heap per
    # record, most of a transaction's. The copy costs ~0.1 µs.
    return memoryview(body).tobytes() if json_lossless(doc) else None


def pack_record(record: dict, body: bytes | None) -> bytes:
    """The stored bytes of a record ``{"v", "d", "s", ...}`` (or ``{"v", "j", "s", ...}``
    as `unpack_stored` reads it; ``"s"`` a dict, or the compiled route stage's `Fresh`,
    _fresh.pyx): with `body` (`json_body` of its document) the ``"j"`` form, with None the
    ``"d"`` form."""
    fresh = record.get("s")
    if fresh is not None and type(fresh) is not dict:  # a Fresh (_fresh.pyx): as its dict
        record = {**record, "s": fresh.as_dict()}
    if body is None:
        if len(record) == 3 and "d" in record and "v" in record and "s" in record:
            # in this order whatever the dict's (a record read in the "j" form gets its
            # "d" last, a new one has it second): the bytes say the record, not its history
            return _pack({"v": record["v"], "d": record["d"], "s": record["s"]})
        return _pack(record)
    if len(record) == 3:  # {"v", "d", "s"}
        return _pack({"v": record["v"], "j": body, "s": record["s"]})
    rec = record.copy()
    rec.pop("d", None)
    rec["j"] = body
    return _pack(rec)


def unpack_record(raw: bytes) -> dict:
    """The record ``{"v", "d", "s", ...}`` of stored bytes of either form."""
    rec = _unpack(raw)
    body = rec.pop("j", None)
    if body is not None:
        rec["d"] = _loads(body)
    return rec


def unpack_stored(raw: bytes) -> dict:
    """The record of stored bytes as stored: ``{"v", "j": JSON bytes, "s", ...}`` (not
    decoded) or ``{"v", "d", "s", ...}``."""
    return _unpack(raw)


def record_doc(record: dict):
    """The document of a record of either dict form (``"d"``, or ``"j"`` decoded)."""
    body = record.get("j")
    return record["d"] if body is None else _loads(body)


def record_live(raw: bytes) -> bool:
    """True unless the stored record is a tombstone (``"d": None``)."""
    rec = _unpack(raw)
    return "j" in rec or rec.get("d") is not None
