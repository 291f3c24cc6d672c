"""Forwarded view updates between workers: the outbox row, which is also the peer ring message.

A worker writes the view updates of a transaction for a peer as outbox rows (stages/links.py,
one per link seq) and, after the commit, puts the same bytes into the peer ring; the peer
(and a reshard, for what its peer had not applied) reads them with `decode`, which returns
``[MSG_FORWARD, from worker, link seq, [(feed id, view key, slot, Forwarded), ...]]``
(protocol.Forwarded: what the merge reads of the event), whatever format the row was
written in. `encode` takes the updates as `stages/route.py` makes them: lists of the 14
``UPD_*`` fields (protocol.py).

Format 1 (written before format 2; still read): msgpack
``[MSG_FORWARD, from worker, link seq, [update, ...]]``.

Format 2 (written now), little-endian:
- message head (`HEAD`, 24 bytes): magic u8 (`MAGIC`; a format 1 message starts with 0x94),
  version u8 (`VERSION`), 0 u16, from worker u32, link seq i64, update count u32, 0 u32;
- per update a fixed part (`UPDATE`, 36 bytes): feed id u32, slot u16, flags u16
  (`NO_SEQUENCE`: the sequence is None), topic index i32, partition i32, offset i64,
  sequence i64 (0 when None), 0 i32; then seven strings, each a length i32 (-1: None) and
  its UTF-8 bytes: view key, id, source, type, time, subject, partitionkey;
- then the updates' data, all of them in one msgpack array (as format 1 packs them: packed
  and unpacked with the same options, so the values read back are the same).
An update that does not fit format 2 (a field of another type, a number out of range, a
string that is not valid UTF-8) makes `encode` write that call's messages in format 1.

``aggregator._forwards`` is the compiled encoder and decoder; `encode_ref`/`decode_ref`
here are the reference, run when ``AGGREGATOR_PURE_CORE=1`` selects the pure-Python core
(core.py); the tests compare the two byte for byte.

Reading only what the merge reads: the worker passes `decode` the top-level data fields
each feed's merge ops read (`data_keys`, from the config). The compiled reader then walks a
format 2 update's data map in C and makes Python objects of those fields only (a dict in
the map's order), keeping the data's bytes in ``Forwarded.raw`` so that a dead letter still
carries the whole event; a feed that reads the data whole, data that is not a map, and
format 1 rows are read whole. The merge reads event data only through its ``from``/``id``
paths (merge.py), so the documents are the same as with the whole data, which the
reference reader always gives (the tests compare them).
"""

from __future__ import annotations

import struct

from . import core
from .protocol import (
    FORWARD_HEAD,
    FORWARD_MAGIC,
    FORWARD_NO_SEQUENCE,
    FORWARD_UPDATE,
    FORWARD_VERSION,
    MSG_FORWARD,
    UPD_DATA,
    UPD_FEED,
    UPD_ID,
    UPD_KEY,
    UPD_ORIGIN,
    UPD_PARTITIONKEY,
    UPD_SEQUENCE,
    UPD_SLOT,
    UPD_SOURCE,
    UPD_SUBJECT,
    UPD_TIME,
    UPD_TYPE,
    Forwarded,
    pack,
    unpack,
)

__all__ = ["IMPLEMENTATION", "MAGIC", "VERSION", "data_keys", "decode", "decode_ref",
           "encode", "encode_fast", "encode_ref", "encode_v1"]

MAGIC = FORWARD_MAGIC  # a format 1 message starts with 0x94 (a msgpack array of 4)
VERSION = FORWARD_VERSION
HEAD = FORWARD_HEAD
UPDATE = FORWARD_UPDATE
NO_SEQUENCE = FORWARD_NO_SEQUENCE
_LEN = struct.Struct("<i")
_STR_FIELDS = (UPD_KEY, UPD_ID, UPD_SOURCE, UPD_TYPE, UPD_TIME, UPD_SUBJECT, UPD_PARTITIONKEY)
# feed id, slot, and the event's record: topic index, partition, offset
_INTS = (UPD_FEED, UPD_SLOT, UPD_ORIGIN, UPD_ORIGIN + 1, UPD_ORIGIN + 2)
_DATA = UPD_DATA
_SEQUENCE = UPD_SEQUENCE
_ENVELOPE = 64  # room for a format 1 envelope [2, from, seq, [...]] (as before)
_I64 = 1 << 63

WRITE_FORMAT = 2  # what `encode` writes (1: format 1, for benches and tests of old rows)


class _Unfit(ValueError):
    """An update that format 2 cannot carry."""


def _update_ref(u: list) -> bytes:
    """The fixed part and the strings of one update (format 2), or _Unfit."""
    try:
        if len(u) != 14 or any(type(u[i]) is not int for i in _INTS):
            raise _Unfit
        seq = u[_SEQUENCE]
        if seq is None:
            flags, seq = NO_SEQUENCE, 0
        elif type(seq) is not int or not -_I64 <= seq < _I64:
            raise _Unfit
        else:
            flags = 0
        parts = [UPDATE.pack(u[0], u[2], flags, u[11], u[12], u[13], seq, 0)]
        for i in _STR_FIELDS:
            s = u[i]
            if s is None and i != 1:
                parts.append(_LEN.pack(-1))
            elif type(s) is str:
                b = s.encode("utf-8")
                parts.append(_LEN.pack(len(b)))
                parts.append(b)
            else:
                raise _Unfit
    except (struct.error, UnicodeEncodeError):
        raise _Unfit from None
    return b"".join(parts)


def _message_ref(src: int, seq: int, frames: list, datas: bytes) -> bytes:
    return b"".join([HEAD.pack(MAGIC, VERSION, 0, src, seq, len(frames), 0), *frames, datas])


def encode_ref(src: int, first_seq: int, updates: list, limit: int) -> list[bytes]:
    """The messages (link seqs first_seq, first_seq+1, ...) carrying `updates` from worker
    `src`: as many as it takes for each to fit `limit` bytes (a peer ring's largest); a
    single update larger than that travels alone (as in format 1)."""
    if WRITE_FORMAT == 1:
        return encode_v1(src, first_seq, updates, limit)
    try:
        frames = [_update_ref(u) for u in updates]
    except _Unfit:
        return encode_v1(src, first_seq, updates, limit)
    return _cut(src, first_seq, updates, frames, limit)


def _cut(src: int, first_seq: int, updates: list, frames: list, limit: int) -> list[bytes]:
    """Format 2 messages of the updates (their frames made): one, or as many as fit."""
    msg = _message_ref(src, first_seq, frames, pack([u[_DATA] for u in updates]))
    if len(msg) <= limit:
        return [msg]
    chunks: list[list[int]] = [[]]
    size = HEAD.size + 5  # 5: the largest msgpack array head
    for k, u in enumerate(updates):
        n = len(frames[k]) + len(pack(u[_DATA]))
        if chunks[-1] and size + n > limit:
            chunks.append([])
            size = HEAD.size + 5
        chunks[-1].append(k)
        size += n
    return [_message_ref(src, first_seq + c, [frames[k] for k in ks],
                         pack([updates[k][_DATA] for k in ks]))
            for c, ks in enumerate(chunks)]


def encode_v1(src: int, first_seq: int, updates: list, limit: int) -> list[bytes]:
    """Format 1 (msgpack lists): the messages as `encode_ref` cuts them."""
    msg = pack([MSG_FORWARD, src, first_seq, updates])
    if len(msg) <= limit:
        return [msg]
    chunks: list[list] = [[]]
    size = 0
    for u in updates:
        n = len(pack(u))
        if chunks[-1] and size + n > limit - _ENVELOPE:
            chunks.append([])
            size = 0
        chunks[-1].append(u)
        size += n
    return [pack([MSG_FORWARD, src, first_seq + k, c]) for k, c in enumerate(chunks)]


def _read_updates(msg: bytes) -> tuple[list, int, int, int]:
    """The updates of a format 2 message without their data: (updates, where the data
    starts, from worker, link seq)."""
    magic, version, _, src, seq, count, _ = HEAD.unpack_from(msg)
    if version != VERSION:
        raise ValueError(f"forwarded updates: format version {version} is not {VERSION}")
    pos = HEAD.size
    mv = memoryview(msg)
    updates = []
    for _ in range(count):
        feed, slot, flags, ti, part, off, sequence, _ = UPDATE.unpack_from(msg, pos)
        pos += UPDATE.size
        s = []
        for _ in _STR_FIELDS:
            n = _LEN.unpack_from(msg, pos)[0]
            pos += 4
            if n < 0:
                s.append(None)
            else:
                s.append(str(mv[pos:pos + n], "utf-8"))
                pos += n
        key, eid, source, etype, time, subject, pk = s
        updates.append([feed, key, slot, eid, source, etype, time, subject,
                        None if flags & NO_SEQUENCE else sequence, None, pk, ti, part, off])
    return updates, pos, src, seq


def decode_ref(msg: bytes, keys: list | None = None) -> list:
    """``[MSG_FORWARD, from worker, link seq, updates]`` of a message of either format, each
    update ``(feed id, view key, slot, Forwarded)`` with its whole data. (`keys`, which the
    compiled reader uses to read only the data fields a feed's ops read, changes nothing the
    merge sees: the reference ignores it.)"""
    if not msg or msg[0] != MAGIC:
        m = unpack(msg)
        m[3] = [(u[0], u[1], u[2], Forwarded(u)) for u in m[3]]
        return m
    try:
        updates, pos, src, seq = _read_updates(msg)
    except struct.error:
        raise ValueError("forwarded updates: truncated message") from None
    datas = unpack(memoryview(msg)[pos:])
    if type(datas) is not list or len(datas) != len(updates):
        raise ValueError("forwarded updates: data count does not match the updates")
    for u, d in zip(updates, datas):
        u[_DATA] = d
    return [MSG_FORWARD, src, seq, [(u[0], u[1], u[2], Forwarded(u)) for u in updates]]


def data_keys(config) -> list:
    """Per feed id (plan.ViewPlan numbers the feeds in this same order): None when its
    merge ops read the event's data whole (``from``/``id`` = ``"data"``), else the top-level
    data fields they read (``from``/``id`` = ``"data.<field>..."``; ``from = "data"`` with
    ``fields``: those fields) as ``((UTF-8 bytes, ...), (str, ...))``. The merge of an update
    reads nothing else of its data (merge.py: event values only through these paths), so a
    data object cut down to these fields merges exactly as the whole."""
    out: list = []
    for view in config.views.values():
        for feed in view.feeds:
            fields: dict[str, None] = {}
            whole = False
            for op in feed.ops:
                spec = op.model_dump(by_alias=True, exclude_none=True)
                for name in ("from", "id"):
                    path = spec.get(name)
                    if isinstance(path, str) and path.split(".")[0] == "data":
                        parts = path.split(".")
                        if len(parts) > 1:
                            fields[parts[1]] = None
                        elif name == "from" and spec.get("fields"):
                            # the data object, then only these fields of it (merge._producer)
                            fields.update(dict.fromkeys(spec["fields"]))
                        else:
                            whole = True
            out.append(None if whole else (tuple(f.encode() for f in fields), tuple(fields)))
    return out


def encode_fast(src: int, first_seq: int, updates: list, limit: int) -> list[bytes]:
    """`encode_ref` with the message (head, the updates' fixed parts and strings, and their
    data, msgpack written in C for the common types: ``_forwards.encode_message``) made by
    ``_forwards``."""
    if WRITE_FORMAT == 1:
        return encode_v1(src, first_seq, updates, limit)
    msg = _forwards.encode_message(src, first_seq, updates)  # head, frames, data in C
    if msg is None:
        return encode_v1(src, first_seq, updates, limit)
    if len(msg) <= limit:
        return [msg]
    return _cut(src, first_seq, updates, _forwards.encode_frames(updates, True), limit)


try:
    from . import _forwards
except ImportError:  # only acceptable when the pure core is forced (core.py)
    if core.IMPLEMENTATION != "python":
        raise
    _forwards = None  # type: ignore[assignment]

if core.IMPLEMENTATION == "python":
    IMPLEMENTATION = "python"
    encode, decode = encode_ref, decode_ref
else:
    IMPLEMENTATION = "cython"
    encode, decode = encode_fast, _forwards.decode
