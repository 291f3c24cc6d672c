"""The compiled frame router reads consumed confluent-kafka Messages at their fields and their
headers where librdkafka holds them (aggregator/_frames.pyx, `agg_cfl_message`): against a
real broker, the frames it writes for every kind of record (CloudEvents headers, a partition
key header with no value, duplicate and empty headers, structured events, no headers, null
keys and values, a header name outside ASCII, oversized values, a mapped topic) are the bytes
the reference router writes from the accessors, and the in-place read is in use."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from aggregator import _frames
from aggregator.frames import FrameRouterRef
from aggregator.kafka_clients import consume_ready

pytestmark = pytest.mark.integration

MAX_BYTES = 4096


def _records(topic: str) -> list[tuple]:
    """(topic, key, value, headers) of every kind the router tells apart."""
    ce = [("ce_specversion", b"1.0"), ("ce_id", b"a-1"), ("ce_source", b"/s"),
          ("ce_type", b"t.v"), ("content-type", b"application/json")]
    structured = json.dumps({"specversion": "1.0", "id": "s-1", "source": "/s", "type": "t",
                             "partitionkey": "pk-structured", "data": {"a": 1}}).encode()
    out = [
        (topic, b"k1", b'{"a":1}', ce + [("ce_partitionkey", b"pk-1")]),
        (topic, b"k2", b'{"a":2}', [("ce_partitionkey", None), *ce,
                                    ("ce_partitionkey", b"second")]),
        (topic, b"k3", b'{"a":3}', [("content-type", None), ("ce_partitionkey", b""),
                                    ("content-type", b"application/json"), ("x-empty", b""),
                                    ("ce_id", b"dup"), ("ce_id", b"dup")]),
        (topic, b"k4", structured,
         [("content-type", b"application/cloudevents+json; charset=utf-8")]),
        (topic, b"k5", structured, [("content-type", b"text/plain")]),
        (topic, None, b'{"a":6}', ce),
        (topic, b"k7", None, ce + [("ce_partitionkey", b"tomb")]),
        (topic, b"k8", b"plain", None),
        (topic, None, None, None),
        (topic, b"k9", b'{"a":9}', [("caf\u00e9", b"x"), *ce]),  # a name outside ASCII
        (topic, b"k10", b"x" * (MAX_BYTES + 1), ce),  # oversized
        (topic, b"k11", b'{"a":11}', [("ce_partitionkey", b"p" * 300), *ce]),
    ]
    for i in range(40):  # enough to span both workers
        out.append((topic, b"key-%d" % i, b'{"i":%d}' % i,
                    ce + [("ce_partitionkey", b"pk-%d" % (i * 7))]))
    return out


def _consume(bootstrap: str, topic: str, n: int, consumer_config: dict) -> list:
    c = Consumer(consumer_config)
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(2)])
        got: list = []
        for _ in range(200):
            got += consume_ready(c, 1000, 0.1)
            if len(got) >= n:
                break
        assert len(got) == n
        return got
    finally:
        c.close()


def _produce_and_consume(bootstrap, create_topic, consumer_config) -> tuple[dict, list]:
    topic = create_topic("inplace", partitions=2)
    mapped = create_topic("inplace-mapped", partitions=2)
    records = _records(topic) + [(mapped, b"m1", b'{"a":1}', [("ce_id", b"m")])]
    p = Producer({"bootstrap.servers": bootstrap})
    for i, (t, k, v, h) in enumerate(records):
        p.produce(t, key=k, value=v, headers=h, partition=i % 2)
    assert p.flush(10) == 0
    msgs = _consume(bootstrap, topic, len(records) - 1, consumer_config)
    msgs += _consume(bootstrap, mapped, 1, consumer_config)
    return {topic: 0, mapped: 1}, msgs


def _both_ways(tindex: dict, msgs: list, detect: bool, state: int):
    """Route `msgs` in place (the router ends in `state`), then with the accessors (which
    take the headers): the same frames. Returns the in-place routing."""
    route_fns = [None, lambda value, headers, key: b"mapped-" + bytes(len(headers or ()))]
    fast = _frames.FrameRouter(2, tindex, [detect, False], route_fns, MAX_BYTES)
    ref = FrameRouterRef(2, tindex, [detect, False], route_fns, MAX_BYTES)
    assert fast.reads_messages_in_place == -1
    a = fast.route(msgs, [1, 1], 1 << 20)
    assert fast.reads_messages_in_place == state
    b = ref.route(msgs, [1, 1], 1 << 20)
    assert a.messages == b.messages
    assert list(a.through.items()) == list(b.through.items())
    assert a.counts == b.counts
    assert a.oversized == b.oversized
    assert a.errors == b.errors == []
    return a


@pytest.mark.parametrize("detect", [False, True])
def test_consumed_messages_read_in_place_frame_as_the_accessors(bootstrap, create_topic,
                                                                consumer_config, detect):
    tindex, msgs = _produce_and_consume(bootstrap, create_topic, consumer_config)
    assert len(_both_ways(tindex, msgs, detect, 1).oversized) == 1  # the oversized value


def test_messages_without_headers_first(bootstrap, create_topic, consumer_config):
    """Messages without headers prove the fields but not the headers: read at their fields
    (state 2) until one with headers was checked (state 1)."""
    tindex, msgs = _produce_and_consume(bootstrap, create_topic, consumer_config)
    bare = [m for m in msgs if m.headers() is None]
    assert len(bare) == 2
    _both_ways(tindex, bare, False, 2)
    tindex, msgs = _produce_and_consume(bootstrap, create_topic, consumer_config)
    bare = {id(m) for m in msgs if m.key() == b"k8" or (m.key() is None and m.value() is None)}
    first = [m for m in msgs if id(m) in bare]  # the two without headers (not asked)
    rest = [m for m in msgs if id(m) not in bare]
    assert len(first) == 2
    _both_ways(tindex, first + rest, False, 1)
