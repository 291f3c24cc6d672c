"""Dead-letter output: malformed or unappliable records, with the reason in headers.

A record is dead-lettered with its original key, value and headers plus
`aggregator-dlq-reason`, `aggregator-dlq-error`, `aggregator-dlq-topic`,
`aggregator-dlq-partition` and `aggregator-dlq-offset`. The producer is flushed before the
transaction that consumed the record commits, so a crash re-delivers rather than loses it
(a dead-letter record may then appear twice; it is never missing).
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException, Producer

from .config import Config

log = logging.getLogger(__name__)

REASON_HEADER = "aggregator-dlq-reason"


STRIPPED_HEADER = "aggregator-dlq-stripped"
# Room for our own headers and the record framing under the producer's message.max.bytes.
_OVERHEAD = 4096


class DeadLetters:
    """A producer to the dead-letter topic. A record too large for it (a 10 MB value that
    was refused for being too large, a 1 MB key) is dead-lettered without its value, key
    or headers, whichever it takes to fit, with `aggregator-dlq-stripped` saying what was
    left out: the original stays in its topic at the partition and offset the headers
    name. Refusing the dead-letter record instead would stall the partition."""

    def __init__(self, config: Config, topics: list[str]):
        self.topic = config.service.dead_letter_topic
        self.topics = topics
        self._conf = config.kafka.producer_conf()
        self._limit = int(self._conf.get("message.max.bytes", 1_000_000)) - _OVERHEAD
        self._producer: Producer | None = None
        self._errors: list[str] = []
        self._retry: list[tuple] = []
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
        headers = [(k, v) for k, v in headers or ()]
        if _size(key, value, headers) > self._limit:
            key, value, headers = self._strip(key, value, headers)
        self._produce(key, value, headers + extra)

    def _strip(self, key, value, headers) -> tuple:
        """Leave out the value, then the headers, then the key until the record fits."""
        left = []
        if value is not None:
            left.append(f"value={len(value)}")
            value = None
        if headers and _size(key, value, headers) > self._limit:
            left.append(f"headers={sum(len(k) + len(v or b'') for k, v in headers)}")
            headers = []
        if _size(key, value, headers) > self._limit:
            left.append(f"key={len(key)}")
            key = None
        return key, value, [(STRIPPED_HEADER, ",".join(left).encode())] + headers

    def _produce(self, key, value, headers) -> None:
        if self._producer is None:
            self._producer = Producer(self._conf)

        def delivered(err, _msg) -> None:
            if err is None:
                return
            if err.code() in _TOO_LARGE and value is not None:
                self._retry.append((key, value, headers))  # the broker's limit is lower
            else:
                self._errors.append(str(err))

        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, headers=headers,
                                       on_delivery=delivered)
                break
            except BufferError:
                self._producer.poll(0.1)
            except KafkaException as e:
                if e.args[0].code() not in _TOO_LARGE or (value is None and key is None):
                    raise
                key, value, stripped = self._strip(key, value, _own(headers, False))
                headers = stripped + _own(headers, True)
        self._pending += 1

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued record is acknowledged; raise if any failed."""
        while self._pending:
            left = self._producer.flush(timeout)
            if left or self._errors:
                errors, self._errors = self._errors, []
                raise KafkaException(
                    f"dead-letter topic {self.topic!r}: {left} undelivered, errors: {errors[:3]}")
            self._pending = 0
            retry, self._retry = self._retry, []
            for key, value, headers in retry:
                key, value, stripped = self._strip(key, value, _own(headers, False))
                self._produce(key, value, stripped + _own(headers, True))

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)


_TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)


def _own(headers: list, ours: bool) -> list:
    """Our dead-letter headers (ours=True) or the original record's (False)."""
    return [(k, v) for k, v in headers if k.startswith("aggregator-dlq-") == ours]


def _size(key, value, headers) -> int:
    return (len(key or b"") + len(value or b"")
            + sum(len(k) + len(v or b"") for k, v in headers))
