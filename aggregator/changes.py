"""Change events: every change of a view document, published through a transactional outbox.

A worker writes each change into its shard's `changes` table in the same LMDB transaction as
the document itself, under a per-shard change sequence number. After the commit, this
module's `ChangePublisher` produces the changes in sequence order with an idempotent
producer and remembers which were delivered; the worker prunes delivered entries in a later
transaction. Hence:

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
import time
from collections import deque

import msgpack
import orjson
from confluent_kafka import KafkaException, Producer

from .config import Config
from .kafka_clients import quiet

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

    def publishes(self, view_id: int) -> bool:
        return self.topics[view_id] is not None

    def encode(self, doc) -> bytes | None:
        if doc is None:
            return None
        if self.json:
            try:  # orjson: ~10x json.dumps, byte-identical for the compact UTF-8 form
                return orjson.dumps(doc, default=_jsonable, option=orjson.OPT_NON_STR_KEYS)
            except TypeError:  # an integer beyond 64 bits, a lone surrogate from a JSON
                # escape ("\\ud800"): the standard library copes, escaping non-ASCII
                return json.dumps(doc, separators=(",", ":"), default=_jsonable).encode()
        return _pack(doc)

    def entry(self, view_id: int, key: str, version: int, data: bytes | None) -> bytes:
        """Outbox entry: [view id, key, version, data, ms, json?] — the encoding travels with
        the entry, so a changed `changes.format` never mislabels pending events."""
        return _pack([view_id, key, version, data, int(time.time() * 1000), self.json])


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
    return {**config.kafka.producer_conf(), "enable.idempotence": True, "acks": "all",
            "delivery.report.only.error": True}


class ChangePublisher:
    """Produces a shard's committed changes in order and tracks what was delivered.

    Delivery is tracked without a Python callback per event: the producer reports errors
    only (`delivery.report.only.error`), and whenever nothing is outstanding in it and no
    error was reported, everything handed over so far is delivered (`published`). Under a
    sustained load the producer drains between the worker's batches; if it ever does not,
    a backlog over `FORCE_DRAIN` forces a drain so that the outbox stays bounded.
    """

    FORCE_DRAIN = 200_000

    def __init__(self, config: Config, encoder: ChangeEncoder, read_after, published: int,
                 last_committed: int):
        """`read_after(seq)` yields (seq, entry) of the outbox after `seq` (from LMDB)."""
        self.enc = encoder
        self.read_after = read_after
        conf, _ = quiet(publisher_conf(config), "change-event producer")
        self.conf = {**conf, "on_delivery": self._failed}
        self.producer: Producer | None = None
        self.published = published  # every change <= this was delivered
        self.sent = published  # every change <= this was handed to the producer
        self.committed_seq = last_committed
        self.queue: deque = deque()  # (seq, entry) committed but not yet sent
        self.failed = False
        # per view: the constant headers (source, both types, content types)
        self._const = [
            (f"{encoder.source}/{view}".encode(), view) for view in encoder.views]
        self._time_ms = -1
        self._time_b = b""

    @property
    def backlog(self) -> int:
        return self.committed_seq - self.published

    def committed(self, changes: list[tuple[int, bytes]]) -> None:
        """A transaction with these changes was committed."""
        if changes:
            self.queue.extend(changes)
            self.committed_seq = changes[-1][0]

    def _failed(self, err, _msg) -> None:
        log.warning("change event not delivered: %s", err)
        self.failed = True

    def _settle(self) -> None:
        """Serve error reports; when nothing is outstanding, all that was sent is delivered
        (or, after a failure, send everything after the last delivered again)."""
        producer = self.producer
        producer.poll(0)
        if len(producer):
            if self.sent - self.published > self.FORCE_DRAIN:
                producer.flush(1.0)
                if len(producer):
                    return
            else:
                return
        if self.failed:
            log.warning("change events: resending from sequence %d", self.published + 1)
            self.failed = False
            self.sent = self.published
            self.queue.clear()
        else:
            self.published = self.sent

    def _ce_time(self, ms: int) -> bytes:
        if ms != self._time_ms:
            self._time_ms = ms
            self._time_b = ce_time(ms)
        return self._time_b

    def pump(self) -> None:
        """Settle what was sent, then hand over as many committed changes as fit."""
        if self.producer is None:
            if self.committed_seq <= self.sent:
                return
            self.producer = Producer(self.conf)
        self._settle()
        if self.sent >= self.committed_seq:
            return
        q = self.queue
        while q and q[0][0] <= self.sent:
            q.popleft()
        if not q or q[0][0] != self.sent + 1:
            q.clear()
            q.extend(self.read_after(self.sent))
        produce = self.producer.produce
        unpack = msgpack.unpackb
        topics, const = self.enc.topics, self._const
        sent = self.sent
        try:
            while q:
                seq, raw = q[0]
                view_id, key, version, data, ms, is_json = unpack(raw, raw=False)
                topic = topics[view_id]
                if topic is None:  # the view stopped publishing changes (config changed)
                    log.warning("change event %s:%d:%s dropped: view %r has no changes_topic",
                                const[view_id][1], version, key, const[view_id][1])
                    q.popleft()
                    sent = seq
                    continue
                kb = key.encode()
                headers = change_headers(const[view_id], kb, version, self._ce_time(ms), data,
                                         is_json)
                try:
                    produce(topic, value=data, key=kb, headers=headers)
                except BufferError:
                    break
                q.popleft()
                sent = seq
        finally:
            self.sent = sent

    def flush(self, timeout: float) -> bool:
        """Send and wait for everything committed so far; True when all was delivered."""
        deadline = time.monotonic() + timeout
        while self.published < self.committed_seq and time.monotonic() < deadline:
            self.pump()
            if self.producer is not None:
                self.producer.flush(min(0.2, max(deadline - time.monotonic(), 0)))
        return self.published >= self.committed_seq

    def close(self, timeout: float = 5.0) -> None:
        if self.producer is not None:
            try:
                self.producer.flush(timeout)
            except KafkaException:  # pragma: no cover - shutting down anyway
                pass
