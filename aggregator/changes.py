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
from datetime import datetime, timezone
from functools import partial

import msgpack
from confluent_kafka import KafkaException, Producer

from .config import Config

log = logging.getLogger(__name__)

CHANGED = "aggregator.view.changed"
DELETED = "aggregator.view.deleted"

_pack = msgpack.Packer(use_bin_type=True).pack


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
            return json.dumps(doc, separators=(",", ":"), ensure_ascii=False,
                              default=_jsonable).encode()
        return _pack(doc)

    def entry(self, view_id: int, key: str, version: int, data: bytes | None) -> bytes:
        """Outbox entry: [view id, key, version, data, ms, json?] — the encoding travels with
        the entry, so a changed `changes.format` never mislabels pending events."""
        return _pack([view_id, key, version, data, int(time.time() * 1000), self.json])


class ChangePublisher:
    """Produces a shard's committed changes in order and tracks what was delivered."""

    def __init__(self, config: Config, encoder: ChangeEncoder, read_after, published: int,
                 last_committed: int):
        """`read_after(seq)` yields (seq, entry) of the outbox after `seq` (from LMDB)."""
        self.enc = encoder
        self.read_after = read_after
        self.conf = {**config.kafka.producer_conf(), "enable.idempotence": True, "acks": "all"}
        self.producer: Producer | None = None
        self.published = published  # every change <= this was delivered
        self.sent = published  # every change <= this was handed to the producer
        self.committed_seq = last_committed
        self.queue: deque = deque()  # (seq, entry) committed but not yet sent
        self.delivered: set[int] = set()
        self.failed = False

    @property
    def backlog(self) -> int:
        return self.committed_seq - self.published

    def committed(self, changes: list[tuple[int, bytes]]) -> None:
        """A transaction with these changes was committed."""
        if changes:
            self.queue.extend(changes)
            self.committed_seq = changes[-1][0]

    def pump(self) -> None:
        """Serve delivery reports, then hand over as many committed changes as fit."""
        if self.producer is None:
            if self.committed_seq <= self.sent:
                return
            self.producer = Producer(self.conf)
        self.producer.poll(0)
        if self.failed and len(self.producer) == 0:
            # a delivery failed: send everything after the last contiguous delivery again
            log.warning("change events: resending from sequence %d", self.published + 1)
            self.failed = False
            self.delivered.clear()
            self.sent = self.published
            self.queue.clear()
        if self.sent >= self.committed_seq:
            return
        q = self.queue
        while q and q[0][0] <= self.sent:
            q.popleft()
        if not q or q[0][0] != self.sent + 1:
            q.clear()
            q.extend(self.read_after(self.sent))
        produce = self.producer.produce
        while q:
            seq, raw = q[0]
            view_id, key, version, data, ms, is_json = msgpack.unpackb(raw, raw=False)
            view = self.enc.views[view_id]
            topic = self.enc.topics[view_id]
            if topic is None:  # the view stopped publishing changes (config changed)
                log.warning("change event %s:%d:%s dropped: view %r has no changes_topic",
                            view, version, key, view)
                q.popleft()
                self.sent = seq
                self._delivered(seq, None, None)
                continue
            headers = [
                ("ce_specversion", b"1.0"),
                ("ce_id", f"{view}:{version}:{key}".encode()),
                ("ce_source", f"{self.enc.source}/{view}".encode()),
                ("ce_type", (CHANGED if data is not None else DELETED).encode()),
                ("ce_subject", key.encode()),
                ("ce_partitionkey", key.encode()),
                ("ce_sequence", str(version).encode()),
                ("ce_time", datetime.fromtimestamp(ms / 1000, timezone.utc)
                 .isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()),
            ]
            if data is not None:
                headers.append(("content-type", b"application/json" if is_json
                                else b"application/msgpack"))
            try:
                produce(topic, value=data, key=key.encode(), headers=headers,
                        on_delivery=partial(self._delivered, seq))
            except BufferError:
                break
            q.popleft()
            self.sent = seq

    def _delivered(self, seq: int, err, _msg) -> None:
        if err is not None:
            log.warning("change event %d not delivered: %s", seq, err)
            self.failed = True
            return
        self.delivered.add(seq)
        nxt = self.published + 1
        while nxt in self.delivered:
            self.delivered.discard(nxt)
            nxt += 1
        self.published = nxt - 1

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
