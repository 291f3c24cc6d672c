"""Change events: every change of a view document, published through a transactional outbox.

A worker writes the changes of a transaction into its shard's `changes` table in that same
LMDB transaction, as one blob (`pack_blob`; stored without the data that the transaction's
``doc_log`` record also holds, `stored_blob`, then as an LZ4 block when that pays,
`compress_blob`) keyed by the range of per-shard change sequence
numbers they take. After the commit, a publisher produces the changes in sequence order
with an idempotent producer and learns which were delivered; the worker prunes a blob in a
later transaction once all of it was delivered. Two publishers, with the same records on the
wire:
`NativeChangePublisher` (the default) hands a whole blob to librdkafka in one compiled loop
(aggregator/_publish.pyx) and tallies the delivery reports in C; `ChangePublisher`, in plain
Python over confluent-kafka, is the reference (``AGGREGATOR_PURE_CORE=1`` selects it).
Hence:

- nothing that was not committed is ever published (produce happens after the commit);
- after any crash every change is published at least once (the outbox survives; unpruned
  entries are produced again at boot, with identical ids);
- per-key order holds: one key's changes all come from its owner shard, in sequence order,
  and the idempotent producer keeps order per partition across retries.

A change event is a CloudEvent in binary mode, keyed by the view key:
`ce_id` = "<view>:<version>:<key>" (deterministic), `ce_sequence` = the document version,
`ce_partitionkey` = `ce_subject` = the key, `ce_type` = `aggregator.view.changed` or
`aggregator.view.deleted` (tombstone: the Kafka value is null), data = the document.
A consumer can dedup by id and gate by sequence exactly as this service does.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import time
from collections import deque
from typing import Iterable, Iterator

import lz4.block
import msgpack
import orjson
from confluent_kafka import KafkaException, Producer

from . import core
from .config import CHANGES_PRODUCER_DEFAULTS, Config
from .doc_codec import json_body, unpack_stored
from .kafka_clients import quiet, redact_text
from .store import doc_log_entries, parse_change_key

log = logging.getLogger(__name__)

CHANGED = "aggregator.view.changed"
DELETED = "aggregator.view.deleted"

_pack = msgpack.Packer(use_bin_type=True).pack
_CHANGED_B = CHANGED.encode()
_DELETED_B = DELETED.encode()
_JSON_B = b"application/json"
_MSGPACK_B = b"application/msgpack"


def _jsonable(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class ChangeEncoder:
    """Document → change-event data, and the outbox entry layout."""

    def __init__(self, config: Config, view_names: list[str]):
        topics = config.changes_topics()
        self.topics: list[str | None] = [topics.get(v) for v in view_names]
        self.views = view_names
        self.enabled = any(self.topics)
        self.coalesce = config.changes.coalesce
        self.json = config.changes.format == "json"
        self.content_type = b"application/json" if self.json else b"application/msgpack"
        self.source = config.changes.source
        self.compress = config.changes.compress_blobs

    def publishes(self, view_id: int) -> bool:
        return self.topics[view_id] is not None

    def encode(self, doc) -> bytes | None:
        """The change event's data of a document (None: a tombstone)."""
        if doc is None:
            return None
        if self.json:
            return self.encode_json(doc)[0]
        return _pack(doc)

    def encode_json(self, doc) -> tuple[bytes | None, bytes | None]:
        """(data, stored body) of a document for JSON change events: a JSON-exact document's
        data is its stored body (doc_codec.json_body: one encoding for both), any other's
        body is None and its data as before this form existed — the same bytes either way."""
        body = json_body(doc)
        if body is not None:
            return body, body
        if doc is None:
            return None, None
        try:  # orjson: ~10x json.dumps, byte-identical for the compact UTF-8 form
            return orjson.dumps(doc, default=_jsonable, option=orjson.OPT_NON_STR_KEYS), None
        except TypeError:  # an integer beyond 64 bits, a lone surrogate from a JSON
            # escape ("\\ud800"): the standard library copes, escaping non-ASCII
            return json.dumps(doc, separators=(",", ":"), default=_jsonable).encode(), None

    def entry(self, view_id: int, key: str, version: int, data: bytes | None) -> bytes:
        """Outbox entry of format 1: [view id, key, version, data, ms, json?] — the encoding
        travels with the entry, so a changed `changes.format` never mislabels pending
        events (the reshard writes these)."""
        return _pack([view_id, key, version, data, int(time.time() * 1000), self.json])

    def blob(self, rows: Iterable[tuple], first: int = 0) -> bytes:
        """A commit's change events (view id, key, version, data; from index `first` of
        each row on) as one outbox blob."""
        return pack_blob(rows, int(time.time() * 1000), self.json, first)

    def stored(self, blob: bytes, rows: list | None = None, bodies: dict | None = None,
               logged: dict | None = None, log_key: int = 0) -> bytes:
        """The outbox value of a blob: with `rows` (the blob's (doc key, view id, key,
        version, data) rows), the transaction's `bodies` (doc key -> (version, JSON body),
        Worker._store_docs) and `logged` (doc key -> record, what the transaction's
        ``doc_log`` record `log_key` holds: store.Batch.logged_docs), without the data that
        record also holds (`stored_blob`); then compressed (`compress_blob`) unless
        ``changes.compress_blobs`` is off."""
        if rows is not None:
            blob = stored_blob(blob, rows, bodies or {}, logged or {}, log_key) or blob
        return compress_blob(blob) if self.compress else blob


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
                         "first (changes.resolve_stored)")
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


def resolve_stored(blob: bytes, log_record=None) -> bytes:
    """A stored blob (`stored_blob`; compressed or not) as `pack_blob` wrote it: each
    left-out data put back from `log_record`, the value of its ``doc_log`` record
    (`logged_key`). ValueError when the record does not hold a document at its version as
    JSON."""
    blob = open_blob(blob)
    fmt, flags, _, n, ms = _BLOB_HEAD.unpack_from(blob)
    if not flags & BLOB_LOGGED:
        return blob
    if log_record is None:
        raise ValueError("a logged change outbox blob without its document log record")
    index = {dkey: (off, length) for dkey, off, length in doc_log_entries(log_record)}
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
        dkey = blob[kstart + klen:kstart + klen + 2] + bytes((vid,)) + kb
        at = index.get(dkey)
        body = None
        if at is not None and at[1] >= 0:
            record = unpack_stored(bytes(log_record[at[0]:at[0] + at[1]]))
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


def outbox_blobs(rows: Iterable[tuple[bytes, bytes]]) -> Iterator[tuple[int, int, bytes]]:
    """(first seq, last seq, blob) of change outbox rows (store.Shard.changes_after), each
    blob as `pack_blob` wrote it (a compressed one decompressed: `open_blob`); a row of
    format 1 (one msgpack entry) comes out as a blob of one event."""
    for key, value in rows:
        first, last, is_blob = parse_change_key(key)
        value = bytes(value)
        if is_blob:
            value = open_blob(value)
        else:
            vid, k, version, data, ms, *rest = msgpack.unpackb(value, raw=False)
            value = pack_blob([(vid, k, version, data)], ms, rest[0] if rest else True)
        yield first, last, value


def entry_of(view_id: int, key: str, version: int, data: bytes | None, ms: int,
             is_json: bool) -> bytes:
    """One change event as an outbox row of format 1 (`ChangeEncoder.entry`)."""
    return _pack([view_id, key, version, data, ms, is_json])


def outbox_records(rows: Iterable[tuple[bytes, bytes]], after: int = 0
                   ) -> Iterator[tuple[int, int, str, int, bytes | None, int, bool]]:
    """(seq, view id, key, version, data, ms, JSON?) of the change events in outbox rows
    with seq > after."""
    for first, _, blob in outbox_blobs(rows):
        ms, is_json, recs = blob_records(blob)
        for seq, (vid, key, version, data) in enumerate(recs, first):
            if seq > after:
                yield seq, vid, key.decode(), version, data, ms, is_json


def change_headers(const: tuple[bytes, str], kb: bytes, version: int, ce_time: bytes,
                   data: bytes | None, is_json: bool) -> list[tuple[str, bytes]]:
    """The CloudEvents headers of a change event; `const` = (ce_source, view name)."""
    ver = str(version).encode()
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"%s:%s:%s" % (const[1].encode(), ver, kb)),
        ("ce_source", const[0]),
        ("ce_type", _CHANGED_B if data is not None else _DELETED_B),
        ("ce_subject", kb),
        ("ce_partitionkey", kb),
        ("ce_sequence", ver),
        ("ce_time", ce_time),
    ]
    if data is not None:
        headers.append(("content-type", _JSON_B if is_json else _MSGPACK_B))
    return headers


def ce_time(ms: int) -> bytes:
    """RFC 3339 UTC time with milliseconds, for the `ce_time` header."""
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))
            + f".{ms % 1000:03d}Z").encode()


class ChangeMessages:
    """Change events as Kafka messages, produced by the caller (cluster mode produces them
    in the worker's changelog transaction instead of through the outbox)."""

    def __init__(self, encoder: ChangeEncoder):
        self.enc = encoder
        self._const = [(f"{encoder.source}/{view}".encode(), view) for view in encoder.views]

    def message(self, view_id: int, key: str, version: int, data: bytes | None
                ) -> tuple[str, bytes, bytes | None, list]:
        """(topic, key, value, headers) of one change event."""
        kb = key.encode()
        headers = change_headers(self._const[view_id], kb, version,
                                 ce_time(int(time.time() * 1000)), data, self.enc.json)
        return self.enc.topics[view_id], kb, data, headers


def publisher_conf(config: Config) -> dict:
    """The change-event producer's librdkafka settings (without its delivery callback)."""
    return {**config.kafka.producer_conf(CHANGES_PRODUCER_DEFAULTS), "enable.idempotence": True,
            "acks": "all", "delivery.report.only.error": True}


class _Publisher:
    """What both publishers share: the queue of committed blobs, the sequence numbers
    (`sent`: handed to the producer; `published`: delivered, every change <= it), reading
    the outbox again after a gap or a failure, and flushing."""

    def __init__(self, encoder: ChangeEncoder, read_after, published: int, last_committed: int):
        """`read_after(seq)` yields the outbox rows (key, value) from the one holding seq + 1
        (store.Shard.changes_after)."""
        self.enc = encoder
        self.read_after = read_after
        self.published = published  # every change <= this was delivered
        self.sent = published  # every change <= this was handed to the producer
        self.committed_seq = last_committed
        self.queue: deque = deque()  # (first seq, last seq, blob) committed, not all sent
        self._const = [(f"{encoder.source}/{view}".encode(), view) for view in encoder.views]

    @property
    def backlog(self) -> int:
        return self.committed_seq - self.published

    def committed(self, blobs: list[tuple[int, int, bytes]]) -> None:
        """A transaction with these blobs (first seq, last seq, blob) was committed."""
        if blobs:
            self.queue.extend(blobs)
            self.committed_seq = blobs[-1][1]

    def _dropped(self, vid: int, key, version: int) -> None:
        view = self._const[vid][1]
        log.warning("change event %s:%d:%s dropped: view %r has no changes_topic", view,
                    version, key.decode() if isinstance(key, bytes) else key, view)

    def pump(self) -> None:
        """Settle what was sent, then hand over as many committed changes as fit."""
        if not self._started():
            if self.committed_seq <= self.sent:
                return
            self._start()
        self._settle()
        if self.sent >= self.committed_seq:
            return
        q = self.queue
        while q and q[0][1] <= self.sent:
            q.popleft()
        if not q or q[0][0] > self.sent + 1:
            q.clear()
            q.extend(outbox_blobs(self.read_after(self.sent)))
        while q:
            first, last, blob = q[0]
            self._produce(first, blob)
            if self.sent < last:
                break  # the producer's queue is full
            q.popleft()

    def flush(self, timeout: float) -> bool:
        """Send and wait for everything committed so far; True when all was delivered."""
        deadline = time.monotonic() + timeout
        while self.published < self.committed_seq and time.monotonic() < deadline:
            self.pump()
            if self._started():
                self._wait(min(0.2, max(deadline - time.monotonic(), 0)))
        self._settle_if_started()
        return self.published >= self.committed_seq

    def _settle_if_started(self) -> None:
        if self._started():
            self._settle()


class ChangePublisher(_Publisher):
    """The reference publisher: confluent-kafka's `Producer.produce()` per change event.

    Delivery is tracked without a Python callback per event: the producer reports errors
    only (`delivery.report.only.error`), and whenever nothing is outstanding in it and no
    error was reported, everything handed over so far is delivered (`published`). Under a
    sustained load the producer drains between the worker's batches; if it ever does not,
    a backlog over `FORCE_DRAIN` forces a drain so that the outbox stays bounded.
    """

    FORCE_DRAIN = 200_000
    implementation = "python"

    def __init__(self, config: Config, encoder: ChangeEncoder, read_after, published: int,
                 last_committed: int):
        super().__init__(encoder, read_after, published, last_committed)
        conf, events = quiet(publisher_conf(config), "change-event producer")
        self._client_error = events.error
        self.conf = {**conf, "on_delivery": self._failed, "error_cb": self._error}
        self.producer: Producer | None = None
        self.failed = False
        self.fatal = False
        self._time_ms = -1
        self._time_b = b""

    def _started(self) -> bool:
        return self.producer is not None

    def _start(self) -> None:
        self.producer = Producer(self.conf)

    def _failed(self, err, _msg) -> None:
        log.warning("change event not delivered: %s", err)
        self.failed = True

    def _error(self, err) -> None:
        self._client_error(err)
        if err.fatal():
            self.fatal = True

    def _settle(self) -> None:
        """Serve error reports; when nothing is outstanding, all that was sent is delivered
        (or, after a failure, send everything after the last delivered again)."""
        producer = self.producer
        producer.poll(0)
        if self.fatal:
            self._renew("a fatal error")
            return
        if len(producer):
            if self.sent - self.published > self.FORCE_DRAIN:
                producer.flush(1.0)
                if len(producer):
                    return
            else:
                return
        if self.failed:
            self._renew("a failed delivery")
        else:
            self.published = self.sent

    def _renew(self, why: str) -> None:
        """A new producer sends everything after `published` again. A new one, as the old
        may stay unable to deliver: after timeouts an idempotent producer bumps its epoch,
        and a broker may answer that with PRODUCER_FENCED on every later batch (seen with
        the test broker), which librdkafka does not treat as fatal."""
        log.warning("change events: new producer after %s; resending from sequence %d", why,
                    self.published + 1)
        self.producer.purge()
        self.producer.poll(0)
        self.producer = Producer(self.conf)
        self.fatal = self.failed = False
        self.sent = self.published
        self.queue.clear()

    def _wait(self, timeout: float) -> None:
        self.producer.flush(timeout)

    def _ce_time(self, ms: int) -> bytes:
        if ms != self._time_ms:
            self._time_ms = ms
            self._time_b = ce_time(ms)
        return self._time_b

    def _produce(self, first: int, blob: bytes) -> None:
        """Hand the blob's events after `sent` to the producer, until its queue is full."""
        ms, is_json, recs = blob_records(blob)
        t = self._ce_time(ms)
        produce = self.producer.produce
        topics, const = self.enc.topics, self._const
        sent = self.sent
        try:
            for seq, (vid, kb, version, data) in enumerate(recs, first):
                if seq <= sent:
                    continue
                topic = topics[vid]
                if topic is None:  # the view stopped publishing changes (config changed)
                    self._dropped(vid, kb, version)
                    sent = seq
                    continue
                headers = change_headers(const[vid], kb, version, t, data, is_json)
                try:
                    produce(topic, value=data, key=kb, headers=headers)
                except BufferError:
                    break
                sent = seq
        finally:
            self.sent = sent

    def close(self, timeout: float = 5.0) -> None:
        if self.producer is not None:
            try:
                self.producer.flush(timeout)
            except KafkaException:  # pragma: no cover - shutting down anyway
                pass


def _conf_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class NativeChangePublisher(_Publisher):
    """Publishes through librdkafka driven from compiled code (aggregator._publish): a
    blob's events are produced in one C loop (headers built there), every delivery report
    is tallied in C, and `published` is the highest seq up to which all were delivered.

    The records on the wire are those of `ChangePublisher` (tests/integration/
    test_changes_native.py). librdkafka's log lines are off (their errors reach this
    module's log through the error callback's tally, once per distinct text and minute)."""

    implementation = "native"

    def __init__(self, config: Config, encoder: ChangeEncoder, read_after, published: int,
                 last_committed: int):
        super().__init__(encoder, read_after, published, last_committed)
        conf = {**publisher_conf(config), "delivery.report.only.error": False,
                "log.connection.close": False}
        self.conf = {k: _conf_value(v) for k, v in conf.items() if not callable(v)}
        from ._publish import load

        self.library = load()  # librdkafka, at boot: a failure here stops the worker's start
        self.producer = None
        self._errors = 0
        self._error_logged = ("", 0.0)  # (text, monotonic time) of the last error logged

    def _started(self) -> bool:
        return self.producer is not None

    def _start(self) -> None:
        from ._publish import BlobProducer

        topics = [t.encode() if t is not None else None for t in self.enc.topics]
        self.producer = BlobProducer(self.conf, topics, [c[0] for c in self._const],
                                     [c[1].encode() for c in self._const], self.sent)

    def _settle(self) -> None:
        """Serve delivery reports: `published` = the producer's delivered watermark; after
        a failure, once nothing is outstanding, send everything after it again."""
        p = self.producer
        self.published = p.poll()
        if p.errors != self._errors:  # librdkafka's error_cb: once per text and minute
            self._errors = p.errors
            text, now = redact_text(p.last_error, self.conf), time.monotonic()
            if text != self._error_logged[0] or now - self._error_logged[1] >= 60:
                self._error_logged = (text, now)
                log.warning("change-event producer: Kafka error: %s", text)
        fatal = p.fatal
        if fatal is not None:
            self._renew(f"a fatal error ({fatal})")
        elif p.failed and not p.outstanding:
            self._renew(f"a failed delivery ({p.failed_reason})")

    def _renew(self, why: str) -> None:
        """A new producer sends everything after `published` again (ChangePublisher._renew
        says why a new one)."""
        log.warning("change events: new producer after %s; resending from sequence %d",
                    redact_text(why, self.conf), self.published + 1)
        self.producer.close()
        self.producer = None
        self.sent = self.published
        self._start()
        self.queue.clear()

    def _wait(self, timeout: float) -> None:
        self.producer.flush(int(timeout * 1000))

    def _produce(self, first: int, blob: bytes) -> None:
        self.sent = self.producer.produce(first, blob)
        for vid, kb, version in self.producer.take_dropped():
            self._dropped(vid, kb, version)

    def close(self, timeout: float = 5.0) -> None:
        if self.producer is not None:
            self.producer.flush(int(timeout * 1000))
            self.producer.close()
            self.producer = None


def make_publisher(config: Config, encoder: ChangeEncoder, read_after, published: int,
                   last_committed: int) -> _Publisher:
    """The native publisher, or the reference with ``AGGREGATOR_PURE_CORE=1``."""
    from .core import PURE_ENV

    pure = os.environ.get(PURE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    cls = ChangePublisher if pure else NativeChangePublisher
    return cls(config, encoder, read_after, published, last_committed)
