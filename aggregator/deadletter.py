"""Dead-letter output: malformed or unappliable records, with the reason in headers.

A record is dead-lettered with its original key, value and headers plus
`aggregator-dlq-reason`, `aggregator-dlq-error`, `aggregator-dlq-topic`,
`aggregator-dlq-partition` and `aggregator-dlq-offset`. The producer is flushed before the
transaction that consumed the record commits, so a crash re-delivers rather than loses it
(a dead-letter record may then appear twice; it is never missing).
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException, Producer

from .config import Config

log = logging.getLogger(__name__)

REASON_HEADER = "aggregator-dlq-reason"


class DeadLetters:
    def __init__(self, config: Config, topics: list[str]):
        self.topic = config.service.dead_letter_topic
        self.topics = topics
        self._conf = config.kafka.producer_conf()
        self._producer: Producer | None = None
        self._errors: list[str] = []
        self._pending = 0

    def send(self, rec: list, reason: str, message: str) -> None:
        """Queue one record for the dead-letter topic. rec = ring record layout."""
        ti, part, off, key, value, headers = rec[:6]
        topic = self.topics[ti]
        log.warning("dead-letter %s[%d]@%d: %s: %s", topic, part, off, reason, message)
        extra = [
            (REASON_HEADER, reason.encode()),
            ("aggregator-dlq-error", message.encode("utf-8", "replace")[:1024]),
            ("aggregator-dlq-topic", topic.encode()),
            ("aggregator-dlq-partition", str(part).encode()),
            ("aggregator-dlq-offset", str(off).encode()),
        ]
        if self._producer is None:
            self._producer = Producer(self._conf)
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key,
                                       headers=[(k, v) for k, v in headers or ()] + extra,
                                       on_delivery=self._delivered)
                break
            except BufferError:
                self._producer.poll(0.1)
        self._pending += 1

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self._errors.append(str(err))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued record is acknowledged; raise if any failed."""
        if not self._pending:
            return
        left = self._producer.flush(timeout)
        if left or self._errors:
            errors, self._errors = self._errors, []
            raise KafkaException(
                f"dead-letter topic {self.topic!r}: {left} undelivered, errors: {errors[:3]}")
        self._pending = 0

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
