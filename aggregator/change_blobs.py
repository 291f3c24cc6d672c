"""The change outbox blob: one commit's change events as one value of the ``changes`` table.

A blob is a head, then per change event a record head, its key and its data (none: a
tombstone); little-endian, no padding (`pack_blob`, read by `blob_records` and by
_publish.pyx). The outbox stores it compressed (`compress_blob`) and, with format 6 shards,
without the data the commit's ``doc_log`` record also holds (`stored_blob`); `open_blob`
and `resolve_stored` give it back. changes.py writes and publishes blobs; store.py reads
the outbox and makes logged blobs whole (this module imports neither).
"""

from __future__ import annotations

import struct
from typing import Iterable

import lz4.block

from . import core
from .doc_codec import unpack_stored

__all__ = ["BLOB_FORMAT", "BLOB_JSON", "BLOB_LOGGED", "BLOB_LZ4", "COMPRESS_MIN", "DLEN_LOGGED",
           "blob_records", "compress_blob", "logged_key", "open_blob", "pack_blob",
           "pack_blob_ref", "resolve_stored", "stored_blob", "stored_blob_ref"]

# A blob: a head, then per change event a record head, its key and its data (none: a
# tombstone). Little-endian, no padding; read by `blob_records` and by _publish.pyx.
# A compressed blob (flag BLOB_LZ4, format 5 shards) keeps the head as it is, then holds
# the length of the body (u32) and the body (everything after the head) as one LZ4 block.
BLOB_FORMAT = 1
_BLOB_HEAD = struct.Struct("<BBHIq")  # format, flags (1: data is JSON), 0, count, unix ms
_BLOB_REC = struct.Struct("<HIiQ")  # view id, key length, data length (-1: null), version
_BODY_LEN = struct.Struct("<I")  # a compressed blob's body length, after the head
BLOB_JSON = 1
BLOB_LZ4 = 2
# A logged blob (flag BLOB_LOGGED, format 6 shards; `stored_blob`): its body starts with the
# key (u64) of its commit's ``doc_log`` record, and a record whose data length is
# DLEN_LOGGED holds no data but the 2-byte slot prefix of its document (after its key): its
# data is the JSON body of that document's record in that ``doc_log`` record (the version
# the same). The shard's readers put the data back (`resolve_stored`, store.py) before
# anything else reads the blob.
BLOB_LOGGED = 4
DLEN_LOGGED = -2
_LOG_KEY = struct.Struct("<Q")
COMPRESS_MIN = 256  # bytes of body below which a blob is stored as it is
_LZ4_MAX = 0x7E000000  # LZ4_MAX_INPUT_SIZE: a larger body is stored as it is


def pack_blob_ref(rows: Iterable[tuple], ms: int, is_json: bool, first: int = 0) -> bytes:
    """One commit's change events (view id, key, version, data) as one outbox value; `ms`
    (their `ce_time`) and the data's encoding are the commit's. Each row holds those four
    fields from index `first` on. The reference of the compiled `pack_blob` (_publish.pyx),
    which ``AGGREGATOR_PURE_CORE=1`` replaces with this one."""
    parts = [b""]
    rec = _BLOB_REC.pack
    n = 0
    end = first + 4
    for row in rows:
        if len(row) < end:
            raise ValueError(f"change row of {len(row)} fields, {end} needed")
        vid, key, version, data = row[first:end]
        kb = key.encode()
        if data is None:
            parts += (rec(vid, len(kb), -1, version), kb)
        else:
            parts += (rec(vid, len(kb), len(data), version), kb, data)
        n += 1
    parts[0] = _BLOB_HEAD.pack(BLOB_FORMAT, BLOB_JSON if is_json else 0, 0, n, ms)
    return b"".join(parts)


if core.IMPLEMENTATION == "python":  # AGGREGATOR_PURE_CORE=1
    pack_blob = pack_blob_ref
else:
    from ._publish import pack_blob  # noqa: E402 - the compiled twin, chosen as core.py does


def compress_blob(blob: bytes) -> bytes:
    """A blob with its body as one LZ4 block (lz4.block, default mode) and BLOB_LZ4 set in
    its flags, or the blob as it is when its body is under COMPRESS_MIN bytes or would not
    get smaller. Deterministic: the same blob gives the same bytes (the compiled and the pure
    pipeline both write through here, after their `pack_blob`)."""
    size = len(blob) - _BLOB_HEAD.size
    if size < COMPRESS_MIN or size > _LZ4_MAX:
        return blob
    block = lz4.block.compress(memoryview(blob)[_BLOB_HEAD.size:], store_size=False)
    if len(block) + _BODY_LEN.size >= size:
        return blob
    head = bytearray(blob[:_BLOB_HEAD.size])
    head[1] |= BLOB_LZ4
    return b"".join((head, _BODY_LEN.pack(size), block))


def open_blob(blob: bytes) -> bytes:
    """The blob as `pack_blob` wrote it: a compressed one decompressed (the head's flag
    BLOB_LZ4 cleared), any other as it is. What _publish.BlobProducer.produce takes (a
    logged blob, BLOB_LOGGED, stays one: `resolve_stored` puts its data back)."""
    if len(blob) < _BLOB_HEAD.size or not blob[1] & BLOB_LZ4:
        return blob
    if blob[0] != BLOB_FORMAT:
        raise ValueError(f"change outbox blob of format {blob[0]} (this build reads "
                         f"{BLOB_FORMAT})")
    (size,) = _BODY_LEN.unpack_from(blob, _BLOB_HEAD.size)
    try:
        body = lz4.block.decompress(memoryview(blob)[_BLOB_HEAD.size + _BODY_LEN.size:],
                                    uncompressed_size=size)
    except lz4.block.LZ4BlockError as e:
        raise ValueError(f"change outbox blob: corrupt LZ4 body ({e})") from e
    if len(body) != size:
        raise ValueError("change outbox blob: LZ4 body of the wrong length")
    head = bytearray(blob[:_BLOB_HEAD.size])
    head[1] &= ~BLOB_LZ4 & 0xFF
    return b"".join((head, body))


def blob_records(blob: bytes) -> tuple[int, bool, list[tuple[int, bytes, int, bytes | None]]]:
    """(ms, data is JSON, [(view id, key, version, data)]) of a blob, compressed or not."""
    blob = open_blob(blob)
    fmt, flags, _, n, ms = _BLOB_HEAD.unpack_from(blob)
    if fmt != BLOB_FORMAT:
        raise ValueError(f"change outbox blob of format {fmt} (this build reads {BLOB_FORMAT})")
    if flags & BLOB_LOGGED:
        raise ValueError("a logged change outbox blob: its shard's reader puts its data back "
                         "first (change_blobs.resolve_stored)")
    pos = _BLOB_HEAD.size
    out = []
    for _ in range(n):
        vid, klen, dlen, version = _BLOB_REC.unpack_from(blob, pos)
        pos += _BLOB_REC.size
        key = blob[pos:pos + klen]
        pos += klen
        if dlen < 0:
            data = None
        else:
            data = blob[pos:pos + dlen]
            pos += dlen
        out.append((vid, key, version, data))
    if pos != len(blob):
        raise ValueError("change outbox blob: trailing bytes")
    return ms, bool(flags & BLOB_JSON), out


def stored_blob_ref(blob: bytes, rows: Iterable[tuple], bodies: dict, logged: dict,
                    log_key: int, first: int = 1) -> bytes | None:
    """The outbox form of a commit's blob (as `pack_blob` wrote it from `rows`, whose fields
    from index `first` on are (view id, key, version, data) and whose field ``first - 1`` is
    the document's key) without the data that the commit's ``doc_log`` record (key
    `log_key`) also holds (flag BLOB_LOGGED), or None when there is none.

    A record's data is left out when it is JSON, the document's last version in the
    transaction, and stored as that very body: `bodies` (Worker._store_docs: doc key ->
    (version, JSON body or None)) holds the record's version and its data, and `logged`
    (store.Batch.logged_docs: doc key -> record, None for a delete) holds the document. Its
    key must be ``slot(2) + view id + key`` (store.view_key): the reader makes it again from
    the record and the 2 bytes kept. `resolve_stored` gives the blob back. The reference of
    the compiled `stored_blob` (_publish.pyx), which ``AGGREGATOR_PURE_CORE=1`` replaces with
    this one."""
    fmt, flags, _, n, ms = _BLOB_HEAD.unpack_from(blob)
    if fmt != BLOB_FORMAT or flags & (BLOB_LZ4 | BLOB_LOGGED) or not flags & BLOB_JSON:
        return None
    rows = list(rows)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} change rows for a blob of {n}")
    parts = [b"", _LOG_KEY.pack(log_key)]
    pos, rec, elided = _BLOB_HEAD.size, _BLOB_REC.size, 0
    for row in rows:
        vid, klen, dlen, version = _BLOB_REC.unpack_from(blob, pos)
        kb = blob[pos + rec:pos + rec + klen]
        end = pos + rec + klen + max(dlen, 0)
        dkey, data = row[first - 1], row[first + 3]
        known = bodies.get(dkey) if dlen >= 0 else None
        if known is not None and known[1] is not None and known[0] == version and \
                (known[1] is data or known[1] == data) and vid <= 0xFF and \
                type(dkey) is bytes and len(dkey) == klen + 3 and dkey[2] == vid and \
                dkey[3:] == kb and logged.get(dkey) is not None:
            parts += (_BLOB_REC.pack(vid, klen, DLEN_LOGGED, version), kb, dkey[:2])
            elided += 1
        else:
            parts.append(blob[pos:end])
        pos = end
    if pos != len(blob):
        raise ValueError("change outbox blob: trailing bytes")
    if not elided:
        return None
    parts[0] = _BLOB_HEAD.pack(fmt, flags | BLOB_LOGGED, 0, n, ms)
    return b"".join(parts)


if core.IMPLEMENTATION == "python":  # AGGREGATOR_PURE_CORE=1
    stored_blob = stored_blob_ref
else:
    from ._publish import stored_blob  # noqa: E402 - the compiled twin


def logged_key(blob: bytes) -> int | None:
    """The ``doc_log`` key a stored blob's data is in (None: not a logged blob); `blob` as
    stored (compressed or not)."""
    if len(blob) < _BLOB_HEAD.size or blob[0] != BLOB_FORMAT or not blob[1] & BLOB_LOGGED:
        return None
    return _LOG_KEY.unpack_from(open_blob(blob), _BLOB_HEAD.size)[0]


def resolve_stored(blob: bytes, logged: dict | None = None) -> bytes:
    """A stored blob (`stored_blob`; compressed or not) as `pack_blob` wrote it: each
    left-out data put back from `logged`, the documents of its ``doc_log`` record (doc key
    -> record, None for a delete: store.doc_log_docs of the record `logged_key` names).
    ValueError when that does not hold a document at its version as JSON."""
    blob = open_blob(blob)
    fmt, flags, _, n, ms = _BLOB_HEAD.unpack_from(blob)
    if not flags & BLOB_LOGGED:
        return blob
    if logged is None:
        raise ValueError("a logged change outbox blob without its document log record")
    parts = [_BLOB_HEAD.pack(fmt, flags & ~BLOB_LOGGED, 0, n, ms)]
    pos, rec = _BLOB_HEAD.size + _LOG_KEY.size, _BLOB_REC.size
    for _ in range(n):
        vid, klen, dlen, version = _BLOB_REC.unpack_from(blob, pos)
        kstart = pos + rec
        if dlen != DLEN_LOGGED:
            end = kstart + klen + max(dlen, 0)
            parts.append(blob[pos:end])
            pos = end
            continue
        kb = blob[kstart:kstart + klen]
        raw = logged.get(blob[kstart + klen:kstart + klen + 2] + bytes((vid,)) + kb)
        body = None
        if raw is not None:
            record = unpack_stored(bytes(raw))
            if record.get("v") == version:
                body = record.get("j")
        if type(body) is not bytes:
            raise ValueError(f"logged change event {vid}:{version}:{kb!r}: its document "
                             "log record does not hold that version as JSON")
        parts += (_BLOB_REC.pack(vid, klen, len(body), version), kb, body)
        pos = kstart + klen + 2
    if pos != len(blob):
        raise ValueError("change outbox blob: trailing bytes")
    return b"".join(parts)
