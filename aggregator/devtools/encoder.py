"""The CloudEvents encoder of the development tools: Kafka records in binary or structured mode.

The one encoder the simulator, the tests and ``bench/`` use; the service only parses
(`aggregator.envelope`). Media types are classified by the parser's own table, so data is
encoded as the parser decodes it: ``*/json`` -> JSON, msgpack types -> msgpack, ``text/*`` ->
str in its charset, bytes as they are.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack

from ..envelope import _JSON, _MSGPACK, _TEXT, _classify  # the parser's media-type table

__all__ = ["STRUCTURED_CT", "to_binary", "to_structured"]

#: The content-type of a structured-mode record (JSON event format).
STRUCTURED_CT = b"application/cloudevents+json; charset=utf-8"


def _attr_str(name: str, v: Any) -> str:
    if type(v) is str:
        return v
    if type(v) is bool:
        return "true" if v else "false"
    if type(v) is int:
        return str(v)
    if type(v) is bytes:
        return base64.b64encode(v).decode("ascii")
    raise TypeError(f"attribute {name!r}: cannot encode {type(v).__name__}")


def _encode_data(data: Any, content_type: str) -> bytes:
    if type(data) is bytes or type(data) is bytearray:
        return bytes(data)
    kind, charset = _classify(content_type)
    if kind == _JSON:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    if kind == _MSGPACK:
        return msgpack.packb(data, use_bin_type=True)
    if kind == _TEXT and type(data) is str:
        return data.encode(charset)  # type: ignore[arg-type]
    raise ValueError(f"cannot encode {type(data).__name__} data as {content_type!r}")


def to_binary(
    event_attrs: dict, data: Any, content_type: str = "application/json"
) -> tuple[list[tuple[str, bytes]], bytes | None]:
    """Binary-mode record: ``(headers, value)``. ``event_attrs`` holds id/source/type/
    specversion (default "1.0") and any extensions (``sequence`` may be an int). A
    ``datacontenttype`` in ``event_attrs`` overrides ``content_type``. ``data=None`` gives
    a null value; bytes data is sent as-is."""
    ct = event_attrs.get("datacontenttype") or content_type
    headers: list[tuple[str, bytes]] = []
    if "specversion" not in event_attrs:
        headers.append(("ce_specversion", b"1.0"))
    for name, v in event_attrs.items():
        if v is None or name == "datacontenttype" or name == "data":
            continue
        headers.append(("ce_" + name, _attr_str(name, v).encode("utf-8")))
    headers.append(("content-type", ct.encode("utf-8")))
    return headers, (None if data is None else _encode_data(data, ct))


def to_structured(
    event_attrs: dict, data: Any, content_type: bytes = STRUCTURED_CT
) -> tuple[list[tuple[str, bytes]], bytes]:
    """Structured-mode record (JSON event format): ``(headers, value)``. ``data`` goes in
    ``data``; bytes data goes base64-encoded in ``data_base64`` (set ``datacontenttype``
    in ``event_attrs`` to say what the bytes are, e.g. msgpack). ``data=None`` omits it.
    ``content_type``: the record's content-type header."""
    obj: dict[str, Any] = {"specversion": "1.0"}
    for name, v in event_attrs.items():
        if v is None:
            continue
        obj[name] = str(v) if name == "sequence" and type(v) is int else v
    if type(data) is bytes or type(data) is bytearray:
        obj["data_base64"] = base64.b64encode(data).decode("ascii")
    elif data is not None:
        obj["data"] = data
    value = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )
    return [("content-type", content_type)], value
