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
import time
from collections import deque
from typing import Iterable, Iterator

import msgpack
import orjson
from confluent_kafka import KafkaException, Producer

from .change_blobs import (  # noqa: F401 - the blob codec, also read from here
    _BLOB_HEAD,
    _BLOB_REC,
    BLOB_FORMAT,
    BLOB_JSON,
    BLOB_LOGGED,
    BLOB_LZ4,
    COMPRESS_MIN,
    DLEN_LOGGED,
    blob_records,
    compress_blob,
    logged_key,
    open_blob,
    pack_blob,
    pack_blob_ref,
    resolve_stored,
    stored_blob,
    stored_blob_ref,
)
from .config import CHANGES_PRODUCER_DEFAULTS, Config
from .doc_codec import json_body
from .kafka_clients import quiet, redact_text
from .store import parse_change_key

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
