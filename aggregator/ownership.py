"""The group's task ownership as last seen (cluster mode): which tasks no live instance
serves right now (dead owner not yet detected by the group, rebalance, restore under way).

Why not DescribeGroups: Apache Kafka's DescribeGroups gives each member's assignment, but
Tansu (the embedded test broker, 0.6) answers with no members at all (measured: state Stable,
0 members, while two consumers held 4 partitions each); and a member SIGKILLed still holds
its assignment there until its session times out, which is the gap to make visible.

So the instances tell each other. Every instance produces, every `INTERVAL_S`, the tasks it
owns *and has restored* to the owners topic (`cluster.owners_topic_of`: one partition,
compacted; key = the instance's id, value = msgpack [tasks, interval ms]; a clean stop
writes a tombstone), and reads everyone's records (`OwnersBoard`). An instance whose last
record is older than `STALE_INTERVALS` of its interval, by the record's timestamp against
this host's clock, counts as gone. Unowned = every task minus the tasks of the live
instances (this one's own taken from the supervisor directly).

Informational only: nothing is decided on it (the group's protocol owns the assignment).
Clocks more than ~2 s apart between hosts make a live instance look gone to the others.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import msgpack
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
STALE_INTERVALS = 3.0
READ_BACK = 1000  # records read back from the end at start: the latest of every instance


class OwnersBoard:
    """The latest record of every instance: {id: (tasks, interval s, timestamp s)}."""

    def __init__(self, tasks: int):
        self.tasks = tasks
        self.latest: dict[bytes, tuple[frozenset[int], float, float]] = {}

    def update(self, key: bytes, value: bytes | None, ts: float) -> None:
        if value is None:
            self.latest.pop(key, None)  # a clean stop
            return
        try:
            tasks, interval_ms = msgpack.unpackb(value)
            self.latest[key] = (frozenset(int(t) for t in tasks), interval_ms / 1000, ts)
        except (ValueError, TypeError):
            log.warning("owners topic: a record of %r that is not ours (ignored)", key)

    def live_tasks(self, now: float, skip: bytes = b"") -> set[int]:
        out: set[int] = set()
        for key, (tasks, interval, ts) in self.latest.items():
            if key != skip and now - ts <= STALE_INTERVALS * interval:
                out |= tasks
        return out

    def unowned(self, now: float, mine: set[int], me: bytes = b"") -> list[int]:
        """Tasks neither this instance (`mine`) nor a live other instance serves."""
        served = self.live_tasks(now, skip=me) | mine
        return [t for t in range(self.tasks) if t not in served]


class Ownership:
    """Publishes this instance's tasks and reads everyone's (see the module docstring)."""

    def __init__(self, consumer_conf: dict, producer_conf: dict, topic: str, tasks: int):
        self.topic = topic
        self.me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}".encode()
        self.board = OwnersBoard(tasks)
        self.producer = Producer({**producer_conf, "linger.ms": 0})
        conf = {**consumer_conf, "enable.auto.commit": False,
                "group.id": f"{consumer_conf.get('group.id', 'aggregator')}.owners"}
        self.consumer = Consumer(conf)
        tp = TopicPartition(topic, 0)
        try:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
            tp.offset = max(low, high - READ_BACK)
        except KafkaException as e:
            log.warning("owners topic %s: watermarks unknown (%s): reading from the start",
                        topic, e)
            tp.offset = 0
        self.consumer.assign([tp])
        self.next_publish = 0.0

    def tick(self, mine: set[int]) -> list[int]:
        """Publish (once per interval), read what arrived; the tasks unowned as last seen."""
        now = time.monotonic()
        if now >= self.next_publish:
            self.next_publish = now + INTERVAL_S
            try:
                self.producer.produce(self.topic, key=self.me, partition=0,
                                      value=msgpack.packb([sorted(mine),
                                                           int(INTERVAL_S * 1000)]))
            except (BufferError, KafkaException) as e:
                log.debug("owners topic: produce failed: %s", e)
        self.producer.poll(0)
        for m in self.consumer.consume(1000, 0):
            if m.error() is None:
                self.board.update(m.key(), m.value(), m.timestamp()[1] / 1000)
        return self.board.unowned(time.time(), mine, self.me)

    def close(self, clean: bool) -> None:
        """Stop; after a clean stop, a tombstone says at once that this instance is gone."""
        try:
            if clean:
                self.producer.produce(self.topic, key=self.me, partition=0, value=None)
            self.producer.flush(5)
        except (BufferError, KafkaException):
            pass
        self.consumer.close()
