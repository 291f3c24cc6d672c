"""librdkafka clients: their logs and errors made quiet, their secrets redacted; a consume
round that does not wait for more than is there (`consume_ready`).

Invariants:

- `client_check.check_client_settings` builds (and closes) every kind of client the
  configuration will need before anything starts; a refused setting is a
  `KafkaSettingsError` (defined here), naming the key and its config table.
- `quiet(conf, role)` gives a client a `logger` and an `error_cb` that route librdkafka's
  output through Python logging, each distinct line at most once per `REPEAT_S` (with a
  count of what was left out; every line when the settings ask for librdkafka's `debug`
  output), and say once that the brokers are unreachable.
- No value of a secret key (`config.is_secret_key`) appears in anything this module logs
  or raises: `redact_text` replaces every such value of the client's settings.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError

from .config import is_secret_key

log = logging.getLogger(__name__)
rdlog = logging.getLogger("aggregator.librdkafka")

REPEAT_S = 60.0  # the same librdkafka line is logged at most once per this many seconds
UNREACHABLE = (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE)
_DIGITS_RE = re.compile(r"\d+")


class KafkaSettingsError(Exception):
    """librdkafka refused the settings of a client (the message names key and table)."""


def redact_text(text: str, conf: Mapping[str, Any]) -> str:
    """`text` with the value of every secret key of `conf` replaced by ``***``."""
    for key, value in conf.items():
        if isinstance(value, str) and value and is_secret_key(key):
            text = text.replace(value, "***")
    return text


class _Dedup:
    """Logs a line unless the same line (digits ignored) was logged less than REPEAT_S ago;
    says how many were left out when it logs it again. Thread-safe (librdkafka may call
    from its own threads when a client is destroyed)."""

    def __init__(self, repeat_s: float = REPEAT_S) -> None:
        self.repeat_s = repeat_s
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def admit(self, text: str) -> tuple[bool, int]:
        """(log it now?, how many like it were suppressed since it was last logged)."""
        sig = _DIGITS_RE.sub("#", text)
        now = time.monotonic()
        with self._lock:
            last, left_out = self._seen.get(sig, (-self.repeat_s, 0))
            if now - last < self.repeat_s:
                self._seen[sig] = (last, left_out + 1)
                return False, 0
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[sig] = (now, 0)
            return True, left_out


class ClientEvents:
    """The `logger` and `error_cb` of one client (see `quiet`). `unreachable` is true from
    the first connection failure until `reachable()` is called."""

    def __init__(self, conf: Mapping[str, Any], role: str, dedup: _Dedup | None = None) -> None:
        self.conf = dict(conf)
        self.role = role
        self.servers = str(conf.get("bootstrap.servers", ""))
        self.unreachable = False
        self.down_since = 0.0
        self.last_error = ""  # the last connection failure, redacted
        self.verbose = bool(conf.get("debug"))  # librdkafka debug asked for: every line
        self._dedup = dedup or _Dedup()

    # librdkafka's logger protocol: log(level, fmt, *args)
    def log(self, level: int, fmt: str, *args: Any) -> None:
        text = redact_text(fmt % args if args else fmt, self.conf)
        if args and args[0] == "FAIL":
            level = logging.DEBUG  # a broker connection failed: error() says it, once
        admit, left_out = (True, 0) if self.verbose else self._dedup.admit(text)
        if not admit:
            return
        if left_out:
            text += f" ({left_out} more like it in the last {self._dedup.repeat_s:.0f} s)"
        rdlog.log(min(level, logging.WARNING), "%s: %s", self.role, text)

    def error(self, err: KafkaError) -> None:
        text = redact_text(err.str(), self.conf)
        if err.code() in UNREACHABLE:
            self.last_error = text
            if not self.unreachable:
                self.unreachable = True
                self.down_since = time.monotonic()
                log.warning("Kafka unreachable: the %s cannot connect to %s (%s); retrying "
                            "in the background with backoff", self.role, self.servers or
                            "(no bootstrap servers)", text)
            return
        level = logging.ERROR if err.fatal() else logging.WARNING
        admit, left_out = self._dedup.admit(text)
        if admit:
            more = f" ({left_out} more like it)" if left_out else ""
            log.log(level, "%s: Kafka error: %s%s", self.role, text, more)

    def reachable(self) -> None:
        """A broker answered: say so if it had been unreachable."""
        if self.unreachable:
            self.unreachable = False
            log.info("Kafka reachable again (%s, after %.0f s)", self.servers,
                     time.monotonic() - self.down_since)


def consume_ready(consumer, n: int, timeout: float) -> list:
    """Up to `n` records without waiting for `n`: those the client holds now, else the
    first to arrive within `timeout` seconds and every one that came with it.

    ``consume(n, timeout)`` alone returns only once it has `n` records or the timeout ran
    out (librdkafka's rd_kafka_q_serve_rkmessages waits on the queue until then), so under a
    light load every round lasted the whole timeout and each record waited for it too.
    At saturation the client holds `n` records already and this is one ``consume()``."""
    msgs = consumer.consume(n, 0)
    if msgs or timeout <= 0:
        return msgs
    msgs = consumer.consume(1, timeout)
    if msgs and n > 1:
        msgs += consumer.consume(n - 1, 0)
    return msgs


def quiet(conf: Mapping[str, Any], role: str,
          dedup: _Dedup | None = None) -> tuple[dict[str, Any], ClientEvents]:
    """`conf` plus a `logger` and an `error_cb` for a client playing `role` (a name for
    log lines: "consumer", "dead-letter producer"...). Returns (settings, their events)."""
    events = ClientEvents(conf, role, dedup)
    out = {"log.connection.close": False, **conf, "logger": events,
           "error_cb": events.error}
    return out, events
