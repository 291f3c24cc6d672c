"""The dead-letter producer against a real broker: records too large for it are kept as
references (topic, partition, offset, reason) without the parts that do not fit."""

from __future__ import annotations

from aggregator.config import config_from_dict
from aggregator.deadletter import REASON_HEADER, STRIPPED_HEADER, DeadLetters
from tests.support.service import read_topic


def make(bootstrap, topic, **producer):
    cfg = config_from_dict({
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "g", "producer": producer},
        "service": {"dead_letter_topic": topic},
        "sources": {"s": {"topic": "src"}},
        "views": {"v": {"feeds": [{"source": "s", "types": ["t"], "key": "partitionkey",
                                   "ops": [{"op": "set", "path": "x", "from": "data"}]}]}},
    }, env={})
    return DeadLetters(cfg, ["src"])


def test_oversized_records_are_dead_lettered_without_what_does_not_fit(bootstrap, create_topic):
    topic = create_topic("dlq", partitions=1)
    dlq = make(bootstrap, topic)
    dlq.send([0, 3, 41, b"k1", b"x" * (10 << 20), [("ce_id", b"1")]], "too_large", "10 MB")
    dlq.send([0, 3, 42, b"k" * (1 << 20), b"small", []], "key_too_long", "1 MB key")
    dlq.send([0, 3, 43, b"k3", b"v" * 100, [("ce_id", b"3")]], "bad_json", "fits")
    dlq.flush(30)
    dlq.close()
    msgs = read_topic(bootstrap, topic, timeout=30, quiet=1.0)
    assert len(msgs) == 3
    by_off = {int(dict(m.headers())["aggregator-dlq-offset"]): m for m in msgs}
    big, longkey, ok = by_off[41], by_off[42], by_off[43]
    h = dict(big.headers())
    assert big.value() is None and big.key() == b"k1"
    assert h[STRIPPED_HEADER] == f"value={10 << 20}".encode()
    assert h[REASON_HEADER] == b"too_large" and h["ce_id"] == b"1"
    assert h["aggregator-dlq-topic"] == b"src" and h["aggregator-dlq-partition"] == b"3"
    h = dict(longkey.headers())
    assert longkey.key() is None and longkey.value() is None
    assert h[STRIPPED_HEADER] == f"value=5,key={1 << 20}".encode()
    assert ok.value() == b"v" * 100 and STRIPPED_HEADER not in dict(ok.headers())


def test_a_lower_producer_limit_is_respected(bootstrap, create_topic):
    topic = create_topic("dlq", partitions=1)
    dlq = make(bootstrap, topic, **{"message.max.bytes": 20000})
    dlq.send([0, 0, 7, b"k", b"y" * 50000, []], "too_large", "over the producer's limit")
    dlq.flush(30)
    dlq.close()
    (m,) = read_topic(bootstrap, topic, timeout=30, quiet=1.0)
    assert m.value() is None and dict(m.headers())[STRIPPED_HEADER] == b"value=50000"
