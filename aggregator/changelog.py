"""A task's changelog: its LMDB state mirrored to a compacted Kafka topic (cluster mode), and
the restore that rebuilds the state on the instance that gains the task.

A task is a partition of the internal tasks topic (cluster.py); it owns the slots
`slot % tasks == task`. Every batch of a worker writes, per task it touched, the LMDB
changes of that task to the task's changelog partition:

    key   = db code (1 byte) + LMDB key          value = the LMDB value, or None (tombstone)
    header "b" = msgpack [epoch, batch seq]

and then, once all of them (and the batch's forwarded updates and change events) are
delivered, one *marker* per task (no Kafka transaction: see ChangelogWriter):

    key   = b"\\0m" + epoch (8) + (batch seq - 1) // 256 (8)   value = msgpack [epoch, batch seq]

The markers make a batch atomic: the restore applies a record only when a marker of its
epoch with a batch seq >= its own follows it, so the tail of a batch that was cut short is
never applied. The marker key keeps one marker per 256 batches after
compaction, so the restore holds at most ~256 batches of records before they are confirmed.

Epochs fence zombies: an instance that gains a task reads its changelog to the end, writes a
*claim* (a marker with a new epoch, higher than any it read, and batch seq 0), and reads on
up to its claim. From the claim on, records and markers of older epochs are ignored, so a
previous owner that was cut off (stalled, or partitioned away) and still writes cannot
change the task's state. Between the end it read and its claim, a complete batch of the
previous owner is applied, with its through-offset: nothing is applied twice.

The local LMDB is a cache of the changelog: meta `task.<t>` = [changelog offset applied
through, epoch, batch seq]. The worker commits the Kafka transaction before its LMDB
transaction, so a crash in between leaves the cache behind, never ahead; the next restore
(after every assignment and every worker restart) reads from the cached offset on.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Callable

import msgpack
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from .doc_codec import json_body, pack_record
from .kafka_clients import quiet
from .routing import SLOTS, slot_prefix
from .store import (
    HOT,
    SEALED,
    Batch,
    RawWrite,
    Shard,
    offset_key,
    offset_value,
    parked_key,
    parse_offset_key,
)

log = logging.getLogger(__name__)

VIEWS, DEDUP, SEQ, PARKED, OFFSETS = 1, 2, 3, 4, 5
_DB_OF = {VIEWS: "views", DEDUP: "dedup", SEQ: "seq", PARKED: "parked", OFFSETS: "offsets"}
MARKER = 0
MARKER_GROUP = 256  # batch seqs per marker key (see the module docstring)
_U64 = struct.Struct(">Q")
_pack = msgpack.Packer(use_bin_type=True).pack
_unpack = msgpack.unpackb

CHUNK_RECORDS = 50_000  # restore: records applied per LMDB transaction (at a marker)


def meta_name(task: int) -> str:
    return f"task.{task}"


def marker_key(epoch: int, seq: int) -> bytes:
    """A claim (seq 0) has a key of its own, so compaction never removes it."""
    if seq == 0:
        return b"\0c" + _U64.pack(epoch)
    return b"\0m" + _U64.pack(epoch) + _U64.pack((seq - 1) // MARKER_GROUP)


def task_of(code: int, key: bytes, tasks: int) -> int:
    """The task an LMDB entry belongs to."""
    if code == OFFSETS:
        return parse_offset_key(key)[1]
    return ((key[0] << 8) | key[1]) % tasks


class CapturingBatch(Batch):
    """A shard transaction that also logs every change of a task's state, for the changelog:
    documents, dedup ids, sequences, parked events and through-offsets."""

    __slots__ = ("log",)

    def __init__(self, shard: Shard):
        super().__init__(shard)
        self.log: list[tuple[int, bytes, bytes | None]] = []

    # cluster mode writes documents straight into ``views`` (`Batch.write_doc`), not through
    # the document log: the restore and the task drop write that table as it is
    def put_doc(self, dkey: bytes, record: dict, body: bytes | None | bool = True) -> int:
        v = pack_record(record, json_body(record["d"]) if body is True else body)
        self.write_doc(dkey, v)
        self.log.append((VIEWS, dkey, v))
        return len(v)

    def delete_doc(self, dkey: bytes) -> None:
        self.write_doc(dkey, None)
        self.log.append((VIEWS, dkey, None))

    def mark_seen(self, skey: bytes, generation: int) -> None:
        super().mark_seen(skey, generation)
        self.log.append((DEDUP, skey, b""))

    def mark_seen_many(self, skeys: list[bytes], generation: int,
                       hashes: bytes | None = None) -> None:
        super().mark_seen_many(skeys, generation, hashes)
        self.log.extend((DEDUP, skey, b"") for skey in skeys)

    def _dropping(self, generation: int, db) -> None:
        """The ids of a dropped generation leave the changelog as tombstones."""
        cur = self.txn.cursor(db=db)
        for key in (HOT, SEALED):
            if cur.set_key(key):
                for skey in cur.iternext_dup():
                    self.log.append((DEDUP, bytes(skey), None))

    # cluster mode writes seq rows straight into ``seq`` (`Batch.write_seqs`), not through
    # the sequence log: the restore and the task drop write that table as it is (RawWrite)
    def put_seq(self, gkey: bytes, last: int, topic: str, partition: int) -> None:
        # the changelog keeps format 1's portable row (topic by name): shards number their
        # topics each their own way (store.py, meta seq_topics)
        self.write_seqs([(gkey, last, topic, partition)])
        self.log.append((SEQ, gkey, _pack([last, topic, partition])))

    def put_seqs(self, rows: list[tuple[bytes, int, str, int]]) -> None:
        self.write_seqs(rows)
        self.log.extend((SEQ, gkey, _pack([last, topic, partition]))
                        for gkey, last, topic, partition in rows)

    def park(self, gkey: bytes, seq: int, parked_at: float, record: list) -> None:
        k, v = parked_key(gkey, seq), _pack([parked_at, record])
        self.put_raw("parked", k, v)
        self.log.append((PARKED, k, v))

    def unpark(self, gkey: bytes, seq: int) -> list | None:
        rec = super().unpark(gkey, seq)
        if rec is not None:
            self.log.append((PARKED, parked_key(gkey, seq), None))
        return rec

    def put_offset(self, topic: str, partition: int, through: int) -> None:
        k, v = offset_key(topic, partition), offset_value(through)
        self.put_raw("offsets", k, v)
        self.log.append((OFFSETS, k, v))

    def by_task(self, tasks: int) -> dict[int, list[tuple[int, bytes, bytes | None]]]:
        out: dict[int, list] = {}
        for entry in self.log:
            out.setdefault(task_of(entry[0], entry[1], tasks), []).append(entry)
        return out


class ChangelogError(RuntimeError):
    """The changelog could not be written or read (the worker exits and is restarted)."""


class Restore:
    """Replays one task's changelog records into the shard (see the module docstring).

    `feed` takes the records in offset order; confirmed batches are written to LMDB in
    chunks, each chunk committed at a marker together with the offset it reached, so an
    interrupted restore resumes where it stopped.
    """

    def __init__(self, shard: Shard, task: int, generation: int):
        self.shard, self.task, self.generation = shard, task, generation
        saved = shard.get_meta(meta_name(task))
        self.pos, self.epoch, self.seq = saved if saved else (-1, 0, 0)
        self.max_epoch = self.epoch
        self.pending: list[tuple[int, int, int, bytes, bytes | None]] = []
        self.records = self.bytes = self.applied = 0
        self.dedup_hashes: list[bytes] = []
        self._chunk: RawWrite | None = None  # the open LMDB transaction of this chunk
        self._in_chunk = 0

    @property
    def start(self) -> int:
        return self.pos + 1 if self.pos >= 0 else OFFSET_BEGINNING

    def feed(self, offset: int, key: bytes, value: bytes | None, headers) -> None:
        self.records += 1
        self.bytes += len(key) + (len(value) if value else 0)
        if key[0] == MARKER:
            epoch, seq = _unpack(value)
            self.max_epoch = max(self.max_epoch, epoch)
            if epoch < self.epoch:
                return  # a superseded owner's marker
            if epoch > self.epoch:
                self.pending = [p for p in self.pending if p[0] >= epoch]
                self.epoch = epoch
            keep = []
            for p in self.pending:
                if p[0] == epoch and p[1] <= seq:
                    self._apply(p[2], p[3], p[4])
                else:
                    keep.append(p)
            self.pending = keep
            self.seq, self.pos = seq, offset
            if self._in_chunk >= CHUNK_RECORDS:
                self._commit_chunk()
            return
        epoch, seq = _batch_id(headers)
        self.max_epoch = max(self.max_epoch, epoch)
        if epoch < self.epoch:
            return  # written by a superseded owner
        self.pending.append((epoch, seq, key[0], bytes(key[1:]), value))

    def _apply(self, code: int, key: bytes, value: bytes | None) -> None:
        if self._chunk is None:
            self._chunk = self.shard.raw_write()
        chunk = self._chunk
        self._in_chunk += 1
        self.applied += 1
        if code == DEDUP:
            chunk.set_seen(key, None if value is None else self.generation)
            if value is not None:
                self.dedup_hashes.append(key[2:])
            return
        if code == SEQ and value is not None:
            last, topic, part = _unpack(value)
            chunk.put_seq(key, last, topic, part)
            return
        name = _DB_OF.get(code)
        if name is None:
            raise ChangelogError(f"task {self.task}: unknown changelog record type {code}")
        if value is None:
            chunk.delete(name, key)
        else:
            chunk.put(name, key, value)

    def _commit_chunk(self) -> None:
        if self._chunk is None:
            self._chunk = self.shard.raw_write()
        self._chunk.put("meta", meta_name(self.task).encode(),
                        _pack([self.pos, self.epoch, self.seq]))
        self._chunk.commit()
        self._chunk = None
        self._in_chunk = 0

    def finish(self) -> None:
        """Commit what was confirmed; the unconfirmed tail (a cut-short batch) is dropped."""
        if self.pending:
            log.info("task %d: %d changelog records of an unfinished batch ignored",
                     self.task, len(self.pending))
            self.pending = []
        self._commit_chunk()

    def abort(self) -> None:
        if self._chunk is not None:
            self._chunk.abort()
            self._chunk = None


def _batch_id(headers) -> tuple[int, int]:
    for k, v in headers or ():
        if k == "b":
            return tuple(_unpack(v))
    raise ChangelogError("changelog record without its batch id header")


def drop_task(shard: Shard, task: int, tasks: int, tasks_topic: str) -> int:
    """Delete a task's state from the shard (it moved to another instance). Returns the
    number of entries deleted."""
    n = 0
    with shard.raw_write() as w:
        for slot in range(task, SLOTS, tasks):
            prefix = slot_prefix(slot)
            for name in ("views", "seq", "parked", "dedup"):
                n += w.delete_prefix(name, prefix)
        w.delete("offsets", offset_key(tasks_topic, task))
        w.delete("meta", meta_name(task).encode())
    return n


def reader_conf(conf: dict) -> dict:
    """A restore consumer's settings from the service's consumer settings."""
    conf = {**conf, "enable.partition.eof": True,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            # a fetch at the end of a partition must not wait for more (the default
            # waits 500 ms for data that will not come)
            "fetch.wait.max.ms": 10}
    conf.pop("partition.assignment.strategy", None)
    return conf


def writer_conf(conf: dict) -> dict:
    """The changelog producer's settings from the service's producer settings."""
    conf = {**conf, "enable.idempotence": True, "acks": "all"}
    conf.pop("delivery.report.only.error", None)
    return conf


class ChangelogReader:
    """Reads changelog partitions for restores (one consumer per worker, assign only)."""

    def __init__(self, conf: dict, topic: str):
        self.consumer = Consumer(quiet(reader_conf(conf), "changelog reader")[0])
        self.topic = topic

    def read(self, task: int, start: int, sink: Callable[[int, bytes, bytes | None, list], None],
             *, until: int | None = None, heartbeat: Callable[[], None],
             timeout: float) -> None:
        """Feed `sink` the records of partition `task` from `start`: to the end of the
        partition (until=None), or up to and including offset `until`."""
        tp = TopicPartition(self.topic, task, start)
        self.consumer.assign([tp])
        deadline = time.monotonic() + timeout
        try:
            while True:
                heartbeat()
                if time.monotonic() > deadline:
                    raise ChangelogError(f"restore of task {task} timed out after {timeout:.0f} "
                                         "s (cluster.restore_timeout_ms)")
                for m in self.consumer.consume(10_000, 0.02):
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if until is None or m.offset() > until:
                                return
                            continue
                        if err.retriable() or err.code() in (
                                KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
                            continue
                        raise ChangelogError(f"reading the changelog of task {task}: {err}")
                    off = m.offset()
                    sink(off, m.key(), m.value(), m.headers())
                    if until is not None and off >= until:
                        return
        finally:
            self.consumer.unassign()

    def close(self) -> None:
        self.consumer.close()


class ChangelogWriter:
    """The worker's producer for its batches: the changelog records of every task a batch
    touched, the forwarded updates and the change events, all delivered; then, last, one
    marker per task.

    Not a Kafka transaction, on purpose. The markers make a batch atomic for restores; a
    cut-short batch's forwarded updates and change events that got out are sent again,
    identical, when the task's next owner replays the batch (updates are deduplicated by
    their receiver). And a member killed inside a transaction would hold back the
    read_committed end of every partition it wrote to until the broker aborts it (Apache
    Kafka after transaction.timeout.ms, the test broker never), and with several writers
    per partition the test broker was seen to drop committed records for read_committed
    consumers.
    """

    def __init__(self, conf: dict, topic: str, heartbeat: Callable[[], None]):
        self.topic = topic
        self.heartbeat = heartbeat
        self.error: KafkaError | None = None
        conf, _ = quiet(writer_conf(conf), "changelog producer")
        self.producer = Producer({**conf, "on_delivery": self._delivered})
        self._marker_offsets: dict[int, int] = {}

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.error = err
        elif msg.topic() == self.topic and msg.key()[:1] == b"\0":
            self._marker_offsets[msg.partition()] = msg.offset()

    def begin(self) -> None:
        self.error = None
        self._marker_offsets = {}

    def produce(self, topic: str, partition: int | None, key: bytes | None, value: bytes | None,
                headers: list | None = None) -> None:
        kw = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, **kw)
                return
            except BufferError:
                self.heartbeat()
                self.producer.poll(0.05)

    def put_state(self, task: int, epoch: int, seq: int, entries: list) -> None:
        headers = [("b", _pack([epoch, seq]))]
        for code, key, value in entries:
            self.produce(self.topic, task, bytes((code,)) + key, value, headers)

    def flush(self) -> None:
        while True:
            self.heartbeat()
            left = self.producer.flush(0.5)
            if self.error is not None:
                raise ChangelogError(f"changelog delivery failed: {self.error}")
            if not left:
                return

    def commit(self, markers: dict[int, tuple[int, int]]) -> dict[int, int]:
        """Deliver everything produced, then the markers {task: (epoch, seq)}. Returns each
        marker's offset."""
        self.flush()
        for task, (epoch, seq) in markers.items():
            self.produce(self.topic, task, marker_key(epoch, seq), _pack([epoch, seq]))
        self.flush()
        missing = set(markers) - set(self._marker_offsets)
        if missing:
            raise ChangelogError(f"no delivery report for the markers of tasks {missing}")
        return dict(self._marker_offsets)

    def abort(self) -> None:
        """A failed batch: what was delivered stays (no marker: ignored by restores)."""
        self.producer.purge(in_queue=True, in_flight=False)
