"""Cluster mode: several instances in one consumer group share the work.

Why a repartition topic rather than co-partitioned sources: a view keyed by a data field
(`key = "data.customer_id"`) gathers events whose source partition keys differ (every order
of a customer), so no partitioning of the sources puts all updates of one document on one
instance; and librdkafka's cooperative-sticky assignor does not co-locate partition p of
several topics anyway. So every instance runs two stages:

1. **Ingest** (`Ingest`, here): consumes the source topics in the group `kafka.group_id`
   and re-keys each record to the *tasks topic*, partition = task of its routing key's slot
   (`slot % cluster.tasks`), with its origin (topic, partition, offset, slot) in a header.
   The records and the source offsets are committed in one Kafka transaction
   (`send_offsets_to_transaction`).
2. **Processing** (supervisor.py and worker.py): consumes the tasks topic in the group
   `<kafka.group_id>.tasks`; a task is one of its partitions and owns the slots
   `slot % tasks == task`, hence every key of them; one worker of the instance applies it,
   the one the supervisor placed it on (placement.py: balanced by count over what the
   instance owns). A view update for a key of another task is *forwarded* through the
   tasks topic (partition = that task), and applied there exactly once (deduplicated by event
   identity and feed). A task's state follows it from instance to instance through its
   changelog (changelog.py).
"""

from __future__ import annotations

import logging

import msgpack
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from .admin import AdminError, create_topics
from .config import Config
from .deadletter import DeadLetters
from .envelope import routing_key
from .kafka_clients import quiet
from .mapping import plans_by_topic, route
from .routing import slot_of

log = logging.getLogger(__name__)

ORIGIN_HEADER = "aggregator-origin"  # msgpack [topic index, partition, offset, slot]
FORWARD_HEADER = "aggregator-forward"  # a forwarded view update (msgpack, protocol.Forwarded)

_pack = msgpack.Packer(use_bin_type=True).pack


def wanted_segment_name(prefix: str) -> str:
    """Shared counters, one per task: the id of the restore request that made the task
    this instance's, 0 once it was revoked or lost. The supervisor writes them; a worker
    checks them before it claims a task and before it applies or writes a task's batch, so
    that it never acts on a task the group has moved on (a restore or ring batches still in
    flight at a revoke)."""
    return f"{prefix}-tasks"


def owners_topic_of(cfg: Config) -> str:
    """The topic where instances publish the tasks they serve (ownership.py): the tasks
    topic's name + ".owners"."""
    return f"{cfg.tasks_topic()}.owners"


class ClusterError(RuntimeError):
    """Cluster mode cannot start (internal topics unusable)."""


def ensure_topics(cfg: Config) -> None:
    """Create the tasks and changelog topics if missing; refuse ones with another
    partition count (a task is a partition: changing the count would move keys) or another
    cleanup policy (`check_cleanup`)."""
    tasks = cfg.cluster.tasks
    admin = AdminClient(quiet(cfg.kafka.admin_conf(), "admin client")[0])
    wanted = {cfg.tasks_topic(): {"cleanup.policy": "delete"},
              # records stay an hour before compaction may drop older values of their keys:
              # time for a cut-short batch to be replayed by the task's next owner
              cfg.changelog_topic(): {"cleanup.policy": "compact",
                                      "min.compaction.lag.ms": "3600000"}}
    try:
        meta = admin.list_topics(timeout=cfg.kafka.startup_timeout_s)
        owners = owners_topic_of(cfg)
        for topic, conf in [*wanted.items(), (owners, {"cleanup.policy": "compact"})]:
            if topic not in meta.topics:
                n = 1 if topic == owners else tasks
                create_topics(admin, [topic], n, config=conf,
                              replication_factor=cfg.cluster.replication_factor)
                log.info("created topic %s (%d partitions, %s)", topic, n,
                         conf["cleanup.policy"])
        meta = admin.list_topics(timeout=30)
    except (KafkaException, AdminError) as e:
        raise ClusterError(f"cannot set up the cluster topics: {e}") from None
    for topic in wanted:
        have = len(meta.topics[topic].partitions)
        if have != tasks:
            raise ClusterError(
                f"topic {topic} has {have} partitions but cluster.tasks = {tasks}: the task "
                "count is fixed for the life of a deployment (set cluster.tasks to "
                f"{have}, or use new topics: cluster.tasks_topic / cluster.changelog_topic)")
    check_cleanup(admin, cfg)


def check_cleanup(admin: AdminClient, cfg: Config) -> None:
    """Refuse a tasks topic that compaction may thin out or a changelog that retention may
    empty, as the broker reports their ``cleanup.policy``:

    - the tasks topic must not be compacted: a task's records are read by offset, a gap is
      taken for records a fetch left out and read again (task_manager.Holes), and compaction
      would drop forwarded updates and source records that share a key;
    - the changelog must be compacted: it is a task's whole state for the next owner's
      restore, and deleting by time or size would lose documents and dedup ids.

    A broker that does not answer DescribeConfigs, or leaves a policy out (Tansu reports
    only what the topic was created with), is let be with a warning."""
    want = {cfg.tasks_topic(): False, cfg.changelog_topic(): True}  # compacted?
    try:
        res = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t)
                                      for t in want])
        got = {r.name: f.result(timeout=cfg.kafka.startup_timeout_s) for r, f in res.items()}
    except (KafkaException, ValueError, TypeError, TimeoutError) as e:
        log.warning("cannot read the cleanup.policy of the cluster topics (%s): not checked", e)
        return
    for topic, compacted in want.items():
        entry = got.get(topic, {}).get("cleanup.policy")
        if entry is None or entry.value is None:
            log.warning("the broker does not report the cleanup.policy of topic %s: not "
                        "checked (it must be %s)", topic, "compact" if compacted else "delete")
            continue
        policy = {p.strip() for p in entry.value.split(",")}
        if compacted and policy != {"compact"}:
            raise ClusterError(
                f"topic {topic} has cleanup.policy={entry.value}, but the changelog must be "
                "compacted only (cleanup.policy=compact): retention would delete the state a "
                "restore needs. Set cleanup.policy=compact on it, or use a new topic: "
                "cluster.changelog_topic")
        if not compacted and "compact" in policy:
            raise ClusterError(
                f"topic {topic} has cleanup.policy={entry.value}, but the tasks topic must not "
                "be compacted: compaction would drop records that share a key. Set "
                "cleanup.policy=delete on it, or use a new topic: cluster.tasks_topic")


def ingest_producer_conf(cfg: Config) -> dict:
    """The settings of the producer that re-keys source records to the tasks topic."""
    return {**cfg.kafka.producer_conf(), "acks": "all", "enable.idempotence": True,
            "delivery.report.only.error": True}


class Ingest:
    """Stage 1: source records → the tasks topic, re-keyed by slot."""

    def __init__(self, cfg: Config, dlq: DeadLetters):
        self.cfg = cfg
        self.tasks = cfg.cluster.tasks
        self.topic = cfg.tasks_topic()
        self.sources = cfg.topics()
        self.tindex = {t: i for i, t in enumerate(self.sources)}
        self.detect = [cfg.source_by_topic(t)[1].structured == "detect" for t in self.sources]
        self.maps = plans_by_topic(cfg, self.sources)  # mapped sources route by mapping.route
        self.max_bytes = cfg.service.max_record_bytes
        self.dlq = dlq
        self.events_in = {cfg.source_by_topic(t)[0]: 0 for t in self.sources}
        self.consumer = Consumer(quiet(cfg.kafka.consumer_conf(), "ingest consumer")[0])
        conf, _ = quiet(ingest_producer_conf(cfg), "ingest producer")
        self.producer = Producer({**conf, "on_delivery": self._failed})
        self.failed = None
        self.assigned: set[tuple[str, int]] = set()
        self.consumer.subscribe(self.sources, on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)
        self.records = 0

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("ingest: assigned %d source partitions", len(partitions))
        consumer.incremental_assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # nothing is pending here: every step commits its transaction before it returns
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        log.info("ingest: revoked %d source partitions", len(partitions))
        consumer.incremental_unassign(partitions)

    def step(self, max_records: int, timeout: float = 0.0) -> int:
        """Move one batch of source records to the tasks topic; returns how many.

        At least once: the records are delivered (idempotent producer), then the source
        offsets committed. A crash in between re-keys the records again, and the copies are
        dropped downstream like any redelivery (dedup by event identity, sequence gate).
        Not a Kafka transaction, on purpose: a member killed inside one would hold the
        tasks partitions' read_committed end back until the broker aborts it.
        """
        msgs = self.consumer.consume(max_records, timeout)
        if not msgs:
            return 0
        first: dict[tuple[str, int], int] = {}
        last: dict[tuple[str, int], int] = {}
        self.failed = None
        oversized = self._produce(msgs, first, last)
        if not last:
            return 0
        if oversized:
            self.dlq.deliver(lambda: None)
        while len(self.producer):
            self.producer.flush(1.0)
        if self.failed is not None:
            log.warning("ingest: delivery failed (%s): consuming the batch again", self.failed)
            for (t, p), off in first.items():
                if (t, p) in self.assigned:
                    try:
                        self.consumer.seek(TopicPartition(t, p, off))
                    except KafkaException:
                        pass
            return 0
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in last.items()
                   if (t, p) in self.assigned]
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as e:  # re-keyed again after a rebalance: dedup drops them
                log.warning("ingest: offset commit failed: %s", e)
        counts: dict[str, int] = {}
        for m in msgs:
            if m.error() is None:
                counts[m.topic()] = counts.get(m.topic(), 0) + 1
        for t, c in counts.items():
            self.events_in[self.cfg.source_by_topic(t)[0]] += c
        n = sum(counts.values())
        self.records += n
        return n

    def _failed(self, err, _msg) -> None:
        self.failed = err

    def _produce(self, msgs: list, first: dict, last: dict) -> bool:
        """Produce the records to the tasks topic; True if any was dead-lettered as too
        large."""
        produce, topic, tasks = self.producer.produce, self.topic, self.tasks
        tindex, max_bytes = self.tindex, self.max_bytes
        oversized = False
        for m in msgs:
            if m.error() is not None:
                continue
            src, part, off = m.topic(), m.partition(), m.offset()
            tp = (src, part)
            first.setdefault(tp, off)
            last[tp] = off
            value, key, headers = m.value(), m.key(), m.headers()
            ti = tindex[src]
            if value is not None and len(value) > max_bytes:
                self.dlq.too_large([ti, part, off, key, value, headers], max_bytes)
                oversized = True
                continue
            plan = self.maps[ti]
            rk = (routing_key(value, headers, key, detect=self.detect[ti]) if plan is None
                  else route(plan, value, headers, key, max_bytes))
            slot = slot_of(rk) if rk is not None else 0
            hdrs = list(headers) if headers else []
            hdrs.append((ORIGIN_HEADER, _pack([ti, part, off, slot])))
            while True:
                try:
                    produce(topic, value=value, key=key, partition=slot % tasks, headers=hdrs,
                            timestamp=max(m.timestamp()[1], 0))  # a mapping's kafka:timestamp
                    break
                except BufferError:
                    self.producer.poll(0.05)
        return oversized

    def close(self) -> None:
        try:
            self.consumer.close()
        finally:
            self.producer.flush(10)
