"""kafka_clients.consume_ready against a real broker: it returns the records that are there
without waiting for `n` of them, never more than `n`, and an empty list once the timeout
runs out with nothing to read."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from aggregator.kafka_clients import consume_ready

pytestmark = pytest.mark.integration

LONG = 30.0  # a timeout consume(n, LONG) would sit out in full with fewer than n records


def _produce(bootstrap: str, topic: str, values: range) -> None:
    p = Producer({"bootstrap.servers": bootstrap})
    for i in values:
        p.produce(topic, value=b"%d" % i, partition=0)
    assert p.flush(10) == 0


def _read(c: Consumer, n: int, want: int) -> tuple[list[int], float]:
    """consume_ready(c, n, LONG) until `want` records: (their values, seconds taken)."""
    got: list[int] = []
    t0 = time.monotonic()
    while len(got) < want and time.monotonic() - t0 < 2 * LONG:
        msgs = consume_ready(c, n, LONG)
        assert len(msgs) <= n
        for m in msgs:
            assert m.error() is None
            got.append(int(m.value()))
    return got, time.monotonic() - t0


def test_consume_ready_returns_what_arrived_without_waiting_for_n(bootstrap, create_topic,
                                                                  consumer_config):
    topic = create_topic("ready", partitions=1)
    c = Consumer({**consumer_config, "fetch.wait.max.ms": 100})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        assert consume_ready(c, 1000, 0.3) == []  # nothing there: the timeout runs out
        _produce(bootstrap, topic, range(5))
        got, took = _read(c, 1000, 5)
        assert got == [0, 1, 2, 3, 4]
        # consume(1000, LONG) would have returned after LONG seconds, with these 5
        assert took < LONG / 2, took
        _produce(bootstrap, topic, range(5, 12))
        got, _ = _read(c, 3, 7)  # at most n a call
        assert got == list(range(5, 12))
        assert consume_ready(c, 1000, 0) == []
    finally:
        c.close()
