"""Dead-letter output: malformed or unappliable records, with the reason in headers.

A record is dead-lettered with its original key, value and headers plus
`aggregator-dlq-reason`, `aggregator-dlq-error`, `aggregator-dlq-topic`,
`aggregator-dlq-partition` and `aggregator-dlq-offset`. The producer is flushed before the
transaction that consumed the record commits, so a crash re-delivers rather than loses it
(a dead-letter record may then appear twice; it is never missing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Producer

from .config import Config
from .kafka_clients import quiet

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
        self._conf, _ = quiet(config.kafka.producer_conf(), "dead-letter producer")
        self._limit = int(self._conf.get("message.max.bytes", 1_000_000)) - _OVERHEAD
        self._producer: Producer | None = None
        self._errors: list[str] = []
        self._retry: list[tuple] = []
        self._pending = 0

    def warm_up(self) -> None:
        """Create the producer now and fetch the topic's metadata in the background: the
        first dead letter of a worker that just booted (after a crash, its first batch is
        a replay) then waits for one round trip, not for a connection first."""
        if self._producer is not None or not self._conf.get("bootstrap.servers"):
            return
        self._producer = Producer(self._conf)  # librdkafka connects to the brokers now
        producer, topic = self._producer, self.topic

        def fetch() -> None:
            try:
                producer.list_topics(topic, timeout=10)
            except Exception:  # noqa: BLE001 - only a warm-up: send() copes without it
                pass

        threading.Thread(target=fetch, name="dlq-warm-up", daemon=True).start()

    def too_large(self, rec: list, max_bytes: int) -> None:
        """Dead-letter a record whose value exceeds service.max_record_bytes."""
        self.send(rec, "too_large", f"value of {len(rec[4])} bytes exceeds "
                  f"service.max_record_bytes ({max_bytes})")

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
                self._pending -= 1
                return
            self._pending -= 1
            if err.code() in _TOO_LARGE and value is not None:
                # the broker's limit is lower than the producer's: send the reference only
                key2, value2, stripped = self._strip(key, value, _own(headers, False))
                self._retry.append((key2, value2, stripped + _own(headers, True)))
            else:  # the broker was unreachable for message.timeout.ms, say: send again
                self._errors.append(str(err))
                self._retry.append((key, value, headers))

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

    def _step(self, timeout: float) -> bool:
        """Re-send failed records, wait up to `timeout`; True when everything is delivered."""
        retry, self._retry = self._retry, []
        for key, value, headers in retry:
            self._produce(key, value, headers)
        if self._pending:
            self._producer.flush(timeout)
        return not self._pending and not self._retry

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued record is acknowledged; KafkaException after `timeout`
        (the records stay queued: a later flush or `deliver` sends them)."""
        deadline = time.monotonic() + timeout
        while not self._step(min(max(deadline - time.monotonic(), 0.0), 0.5)):
            if time.monotonic() >= deadline:
                errors, self._errors = self._errors, []
                raise KafkaException(
                    f"dead-letter topic {self.topic!r}: {self._pending + len(self._retry)} "
                    f"undelivered, errors: {errors[:3]}")
        self._errors.clear()

    def deliver(self, waiting: Callable[[], None]) -> None:
        """Block until every queued record is acknowledged, however long the broker takes
        (the caller's batch is not committed before), calling `waiting()` about every
        0.5 s (heartbeats) and logging a warning every 10 s."""
        t0 = time.monotonic()
        warned = t0
        while not self._step(0.5):
            waiting()
            now = time.monotonic()
            if now - warned >= 10:
                warned = now
                log.warning("dead-letter topic %r unreachable for %.0f s: %d records wait "
                            "(last error: %s); their batch is held until they are delivered",
                            self.topic, now - t0, self._pending + len(self._retry),
                            self._errors[-1] if self._errors else "none, still sending")
        self._errors.clear()

    @property
    def waiting(self) -> int:
        """Records queued and not yet acknowledged."""
        return self._pending + len(self._retry)

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
