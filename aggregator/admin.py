"""Kafka admin calls the service makes: an AdminClient, topic creation, end offsets.

`cluster.py` creates the cluster-mode internal topics with `create_topics`; the development
tools (`aggregator.devtools`) and the tests use the same helpers against the embedded broker
or the user's own Kafka.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

__all__ = ["AdminError", "create_topics", "end_offsets", "kafka_admin"]


class AdminError(RuntimeError):
    """A topic could not be created or did not become visible in the cluster metadata."""


def kafka_admin(bootstrap: str, **conf: object) -> AdminClient:
    """An AdminClient for `bootstrap` that retries connections quickly.

    Extra librdkafka settings in `conf` override the defaults.
    """
    settings: dict[str, object] = {
        "bootstrap.servers": bootstrap,
        # librdkafka backs off up to 10 s between connection attempts by default; a broker
        # that starts in milliseconds should be seen as soon as it listens.
        "reconnect.backoff.ms": 10,
        "reconnect.backoff.max.ms": 200,
    }
    settings.update(conf)
    return AdminClient(settings)


def create_topics(
    admin: AdminClient | str,
    names: Iterable[str],
    partitions: int = 4,
    *,
    config: Mapping[str, str] | None = None,
    exist_ok: bool = True,
    timeout: float = 30.0,
    replication_factor: int = 1,
) -> list[str]:
    """Create `names` and wait until every one is visible in the cluster metadata.

    `admin` is an AdminClient or a bootstrap string. An existing topic is accepted when
    `exist_ok` (its partition count is not changed). Returns the names.

    Waiting uses ``list_topics()`` without a topic name: Tansu auto-creates a topic that a
    metadata request names explicitly, so asking for one topic would hide failures.
    """
    if isinstance(admin, str):
        admin = kafka_admin(admin)
    names = list(dict.fromkeys(names))
    if not names:
        return []
    deadline = time.monotonic() + timeout
    new = [
        NewTopic(n, num_partitions=partitions, replication_factor=replication_factor,
                 config=dict(config or {}))
        for n in names
    ]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            exists = isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS
            if exist_ok and exists:
                continue
            raise AdminError(f"creating topic {name!r} failed: {exc}") from exc
    missing = set(names)
    while True:
        try:
            metadata = admin.list_topics(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            missing = {
                n for n in missing
                if n not in metadata.topics
                or metadata.topics[n].error is not None
                or not metadata.topics[n].partitions
            }
        except KafkaException:
            pass
        if not missing:
            return names
        if time.monotonic() >= deadline:
            raise AdminError(f"topics not visible after {timeout:.0f} s: {sorted(missing)}")
        time.sleep(0.02)


def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """High watermark per (topic, partition) of existing topics."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "aggregator-probe"})
    try:
        md = c.list_topics(timeout=10)
        return {(t, p): c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                for t in topics for p in md.topics[t].partitions}
    finally:
        c.close()
