"""Configuration: a TOML file, environment overrides and CLI overrides, validated by pydantic.

Precedence, lowest to highest: model defaults < TOML file < environment < CLI ``overrides``.

Environment variables (``env`` defaults to ``os.environ``):

- ``AGGREGATOR_WORKERS``, ``AGGREGATOR_DATA_DIR``, ``AGGREGATOR_BOOTSTRAP_SERVERS``,
  ``AGGREGATOR_GROUP_ID``: the common settings. Other ``AGGREGATOR_X`` names are not config
  (``AGGREGATOR_PURE_CORE`` belongs to the core) and are ignored.
- ``AGGREGATOR__SECTION__FIELD`` (double underscores, any depth): any field, e.g.
  ``AGGREGATOR__SERVICE__LMDB_SYNC=false`` or ``AGGREGATOR__SOURCES__ORDERS__TOPIC=x``.
  Below ``kafka.common|consumer|producer`` the rest is one librdkafka key with ``_`` read
  as ``.``: ``AGGREGATOR__KAFKA__COMMON__SASL_PASSWORD`` sets ``sasl.password``.

Every problem becomes one :class:`ConfigError` whose message has one line per problem,
each naming the field path: ``config error: service.workers: must be >= 1 (got 0)``.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import logging
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from . import mapping
from .merge import OP_GRAMMAR, OPS, MergeConfigError, compile_ops

log = logging.getLogger(__name__)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
ENV_PREFIX = "AGGREGATOR_"
ENV_GENERIC_PREFIX = "AGGREGATOR__"
ENV_SHORTCUTS = {
    "AGGREGATOR_WORKERS": "service.workers",
    "AGGREGATOR_DATA_DIR": "service.data_dir",
    "AGGREGATOR_BOOTSTRAP_SERVERS": "kafka.bootstrap_servers",
    "AGGREGATOR_GROUP_ID": "kafka.group_id",
}
KAFKA_DICTS = ("common", "consumer", "producer")
# Secret librdkafka keys, by a conservative pattern (a misspelt key is still a secret): any
# word like "password" (pasword, passwd, pwd...), "secret", "token", "credential", "jaas",
# "private"; every ``ssl.key.*`` and ``ssl.keystore.*``; every ``sasl.*`` key except the
# ones below, which librdkafka documents as names, paths or choices, not credentials.
SECRET_WORD_RE = re.compile(r"pa+s+w|pa+s+s|pwd|passph|secret|token|cred|jaas|private")
SECRET_PREFIXES = ("ssl.key.", "ssl.keystore.", "ssl_key", "sasl.")
SASL_PLAIN_KEYS = frozenset({
    "sasl.mechanism", "sasl.mechanisms", "sasl.kerberos.service.name",
    "sasl.kerberos.principal", "sasl.kerberos.kinit.cmd", "sasl.kerberos.keytab",
    "sasl.kerberos.min.time.before.relogin", "sasl.oauthbearer.method",
    "sasl.oauthbearer.client.id", "sasl.oauthbearer.scope",
    "sasl.oauthbearer.token.endpoint.url",
})
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,  # the supervisor commits the workers' watermark itself
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "fetch.queue.backoff.ms": 20,
    # a fetch the broker holds for want of data ends after this (librdkafka: 500 ms). A
    # Kafka broker answers as soon as data arrives, so this only bounds the idle fetches (10
    # a second per broker instead of 2); a broker that answers only when the wait runs out
    # (the embedded Tansu) held records up to 500 ms: at 4,500 events/s produce ->
    # dispatched p50 ~140 -> ~63 ms, p99 ~445 -> ~200 ms (bench/results/latency.md)
    "fetch.wait.max.ms": 100,
    "enable.partition.eof": False,
    # prefetch at most 2 MiB (librdkafka's default is 64 MiB): the rings buffer the rest.
    # 16 MiB held ~40 MiB more supervisor RSS at the same rate (bench/results/ring-variants.md)
    "queued.max.messages.kbytes": 2048,
}
# lz4 is in the bundled librdkafka's builtin.features (checked with confluent-kafka 2.16.1).
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "linger.ms": 5,
    "compression.type": "lz4",
    # librdkafka buffers up to 1 GiB by default: a worker whose change events outrun the
    # broker would hold it all. 16 MiB is ~30k change events; a full buffer only waits.
    "queue.buffering.max.kbytes": 16384,
}
# The change-event producer on top of PRODUCER_DEFAULTS. Measured with
# bench/micro/bench_publish.py (commits of 200 change events paced at 20k/s, real view
# documents, lz4): linger.ms=100 cuts the broker's CPU per change event 6.3 -> 1.5 µs at
# the same producer CPU; lz4 costs the producer ~0.6 µs and saves the broker ~1.8 µs.
# bench/results/publish.md
CHANGES_PRODUCER_DEFAULTS: dict[str, Any] = {"linger.ms": 100}
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
DOC_PATH_RE = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")
DATA_PATH_RE = re.compile(r"^data(\.[^.\s]+)+$")
EVENT_ATTRS = ("id", "time", "source", "type", "subject", "partitionkey", "sequence")


class ConfigError(Exception):
    """An invalid or unreadable configuration; ``errors`` holds (field path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        lines = [f"config error: {p}: {m}" if p else f"config error: {m}" for p, m in errors]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling between processes
        return (self.__class__, (self.errors, self.source))


class _FieldErrors(ValueError):
    """Raised inside validators: problems located relative to the value being validated."""

    def __init__(self, items: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.items = items
        super().__init__("; ".join(f"{_fmt_loc(loc)}: {msg}" for loc, msg in items))


def _check(items: list[tuple[tuple[str | int, ...], str]]) -> None:
    if items:
        raise _FieldErrors(items)


# ---- small value types --------------------------------------------------------------------


def is_secret_key(key: str) -> bool:
    """True for librdkafka keys whose values must never be logged.

    Conservative: every key librdkafka marks sensitive (``sasl.username``,
    ``sasl.password``, ``ssl.key.*``, ``ssl.keystore.password``,
    ``sasl.oauthbearer.client.secret``...) and anything that looks like one, misspelt or
    not (``sasl.pasword``, ``my.secret``). A false positive only hides a value."""
    k = key.lower()
    if k in SASL_PLAIN_KEYS:
        return False
    return k.startswith(SECRET_PREFIXES) or SECRET_WORD_RE.search(k) is not None


def redact(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A loggable copy of a librdkafka dict (e.g. ``consumer_conf()``): secrets become ``***``."""
    return {k: "***" if is_secret_key(k) else v for k, v in conf.items()}


def parse_size(value: Any) -> Any:
    """Bytes as an int, or a string like ``"64MiB"``, ``"1.5 GiB"``, ``"512KiB"``, ``"4096"``."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size in bytes (got {value!r})")  # noqa: TRY004 (pydantic)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]iB|B)?\s*", value, re.IGNORECASE)
    mult = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}
    try:
        n = Decimal(m.group(1)) * mult[(m.group(2) or "").lower()] if m else None
    except InvalidOperation:
        n = None
    if n is None or n != n.to_integral_value():
        raise ValueError(
            f"bad size {value!r}: use a number of bytes or a number with B, KiB, MiB, GiB or TiB"
        )
    return int(n)


def _reject_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be an integer (got {value!r})")  # noqa: TRY004 (pydantic)
    return value


def _fmt_size(n: int) -> str:
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def parse_umask(value: Any) -> Any:
    """A umask as an octal string ("0077", "027"), as systemd's ``UMask=`` writes it.

    TOML integers are refused: ``umask = 027`` is not valid TOML and ``umask = 27`` would be
    decimal, so only a string says unambiguously which bits are meant.
    """
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{1,3}", value.strip()):
        return int(value.strip(), 8)
    raise ValueError(f'must be an octal string such as "0077" or "0027" (got {value!r})')


Int = Annotated[int, BeforeValidator(_reject_bool)]
Size = Annotated[int, BeforeValidator(parse_size)]
Umask = Annotated[int, BeforeValidator(parse_umask)]
KafkaValue = StrictBool | StrictInt | StrictFloat | StrictStr | SecretStr
_FROZEN = ConfigDict(frozen=True, extra="forbid")


# ---- sections -----------------------------------------------------------------------------


class KafkaConfig(BaseModel):
    """Connection settings; dicts hold librdkafka keys, secrets are kept as SecretStr."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    bootstrap_servers: str = ""
    group_id: str = Field("aggregator", min_length=1)
    # at start-up, stop (exit 2) if no broker answered within this many seconds
    startup_timeout_s: float = Field(60.0, gt=0, le=86_400)
    common: dict[str, KafkaValue] = Field(default_factory=dict)
    consumer: dict[str, KafkaValue] = Field(default_factory=dict)
    producer: dict[str, KafkaValue] = Field(default_factory=dict)

    @field_validator("common", "consumer", "producer", mode="before")
    @classmethod
    def _librdkafka_dict(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        flat: dict[str, Any] = {}
        _flatten(value, "", flat)  # unquoted dotted TOML keys arrive as nested tables
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for key, v in flat.items():
            if key in ("bootstrap.servers", "group.id"):
                field = key.replace(".", "_")
                problems.append(((key,), f"set kafka.{field} instead"))
            elif not isinstance(v, (bool, int, float, str, SecretStr)):
                got = type(v).__name__
                problems.append(((key,), f"must be a string, number or boolean (got {got})"))
            elif key == "enable.auto.commit" and info.field_name != "producer" and _truthy(v):
                why = "the supervisor commits offsets after the workers have stored them"
                problems.append(((key,), f"must stay false: {why}"))
            elif is_secret_key(key) and not isinstance(v, SecretStr):
                flat[key] = SecretStr(str(v))
        _check(problems)
        return flat

    def _plain(self, d: dict[str, Any]) -> dict[str, Any]:
        return {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in d.items()}

    def consumer_conf(self) -> dict[str, Any]:
        """librdkafka consumer settings: our defaults < common < consumer, plus servers, group."""
        conf = {**CONSUMER_DEFAULTS, **self._plain(self.common), **self._plain(self.consumer)}
        conf["bootstrap.servers"] = self.bootstrap_servers
        conf["group.id"] = self.group_id
        return conf

    def producer_conf(self, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """librdkafka producer settings: our defaults (PRODUCER_DEFAULTS, then a role's
        `defaults`) < common < producer, plus servers."""
        conf = {**PRODUCER_DEFAULTS, **(defaults or {}), **self._plain(self.common),
                **self._plain(self.producer)}
        conf["bootstrap.servers"] = self.bootstrap_servers
        return conf

    def admin_conf(self) -> dict[str, Any]:
        """librdkafka admin-client settings: common plus servers."""
        return {**self._plain(self.common), "bootstrap.servers": self.bootstrap_servers}

    def redacted(self) -> dict[str, Any]:
        """A loggable copy of this section with every secret as ``***``."""
        out: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                               "group_id": self.group_id,
                               "startup_timeout_s": self.startup_timeout_s}
        for name in KAFKA_DICTS:
            out[name] = {k: "***" if isinstance(v, SecretStr) or is_secret_key(k) else v
                         for k, v in getattr(self, name).items()}
        return out


class ServiceConfig(BaseModel):
    """Process layout, limits and storage of one aggregator instance."""

    model_config = _FROZEN

    workers: Int = Field(2, ge=1, le=256)
    data_dir: Path = Path("./data")
    dead_letter_topic: str = "aggregator.deadletter"
    max_record_bytes: Size = Field(MiB, ge=1)
    max_key_bytes: Size = Field(400, ge=1, le=480)  # + our prefixes <= LMDB's 511-byte keys
    batch_max_records: Int = Field(5000, ge=1)
    commit_interval_ms: Int = Field(1000, ge=1)
    # 8 transactions' worth (commit_max_bytes): the supervisor keeps filling it while the
    # worker applies and commits (fsync). Every page ends up resident in the supervisor AND
    # the worker, but at 1M events, 2 workers, 4 MiB rings ran 18.6k events/s against 25.5k
    # with 16 MiB for ~45 MiB less RSS (bench/results/ring-variants.md)
    ring_bytes: Size = Field(16 * MiB, ge=1)
    # the initial map; with lmdb_writemap also the disk it takes (allocated) until it grows
    lmdb_map_size: Size = Field(64 * MiB, ge=MiB)
    lmdb_max_map_size: Size = Field(64 * GiB, ge=MiB)
    lmdb_sync: bool = True
    # MDB_WRITEMAP: a transaction's pages are written in the map (no malloc'd copy, no
    # sorted dirty list, no pwrite); the data file's blocks are allocated up to the map size
    # (store._allocate_map). One worker, 210k records (bench.tools.write_path): commit CPU
    # 5-7 -> 0.6-2.4 µs/record, commit wall 67 -> 23 ms at 2 MiB, disk writes 14.9 -> 4.4
    # KB/record (docs/configuration.md)
    lmdb_writemap: bool = True
    # per worker: the data.mdb pages kept mapped (resident) in the worker; past it, after a
    # commit, the map's pages are unmapped (madvise DONTNEED: they stay in the page cache,
    # the next touch is a minor fault). 0: unbounded (store.py, residency.py)
    lmdb_resident_bytes: Size = Field(64 * MiB, ge=0)
    # a worker's transaction (worker.py): ring messages are taken into it for up to
    # commit_window_ms after its first one, or until commit_max_bytes of them (0: one take)
    commit_window_ms: Int = Field(50, ge=0, le=10_000)
    # the window closes early once the rings stayed empty this long: under a light load
    # nothing more is coming, and waiting only adds latency; under load the rings are not
    # empty and transactions still grow to commit_max_bytes (>= commit_window_ms: off).
    # At 4,500 events/s a record's wait in the window ~50 -> ~8 ms at p50, for 2.3-2.9x the
    # transactions (bench/results/latency.md); at the max rate as many commits as without
    commit_idle_ms: Int = Field(5, ge=0, le=10_000)
    # 2 MiB: a transaction's Python objects (and without lmdb_writemap its malloc'd dirty
    # LMDB pages, kept after the commit) grow with it. With WRITEMAP, one worker, 210k
    # records (bench.tools.write_path): 2/4/8/16 MiB take disk writes 4.4/3.1/2.2/1.7
    # KB/record and commit CPU 2.4/1.3/0.7/0.5 µs/record, but the heap +0/+40/+120/+275 MiB
    # and total CPU within the noise (docs/configuration.md)
    commit_max_bytes: Size = Field(2 * MiB, ge=64 * KiB)
    # committed documents a worker keeps unpacked across transactions (doc_cache.py); 0: none.
    # Off by default: as Python objects a hit (cold in the CPU caches) costs about what the
    # LMDB read and unpack it saves (bench/micro/bench_batch.py, bench.tools.commit_window)
    doc_cache_bytes: Size = Field(0, ge=0)
    # bytes in a worker's document log (store.py, format 5) after which a batch checkpoints
    # the logged documents into views: it bounds the log on disk and the worker's map of
    # logged documents (at most this plus ~150 B per document). Larger: fewer views page
    # rewrites per record (bench/results/doc-log.md), more memory and longer boots
    doc_checkpoint_bytes: Size = Field(32 * MiB, ge=1)
    # malloc_trim(0) at most this often, after a worker's commit and in the supervisor's
    # loop (memory.py): the pages a transaction freed go back to the kernel; 0: never
    malloc_trim_interval_ms: Int = Field(1000, ge=0)
    heartbeat_timeout_ms: Int = Field(10_000, ge=1)
    max_boot_failures: Int = Field(5, ge=1)
    # a worker that crashes this many times in a row after booting, with the same error and
    # no batch committed in between, stops the service (exit 2) instead of a respawn loop
    max_worker_crashes: Int = Field(5, ge=1)
    shutdown_timeout_ms: Int = Field(30_000, ge=1)
    ready_max_lag: Int = Field(1000, ge=0)  # /readyz: max records behind, per partition
    # the process umask of `aggregator run`/`demo` (datadir.py): "0077" makes the data dir
    # 0700 and its files 0600; "0027" lets the owner's group read them
    umask: Umask = 0o077

    @field_validator("dead_letter_topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        return _valid_topic(value)

    @model_validator(mode="after")
    def _sizes(self) -> ServiceConfig:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        need = 2 * self.max_record_bytes + MiB
        if self.ring_bytes < need:
            got = _fmt_size(self.ring_bytes)
            msg = f"must be >= 2*max_record_bytes + 1 MiB = {_fmt_size(need)} (got {got})"
            problems.append((("ring_bytes",), msg))
        if self.lmdb_max_map_size < self.lmdb_map_size:
            want, got = _fmt_size(self.lmdb_map_size), _fmt_size(self.lmdb_max_map_size)
            msg = f"must be >= lmdb_map_size = {want} (got {got})"
            problems.append((("lmdb_max_map_size",), msg))
        _check(problems)
        return self


class HttpConfig(BaseModel):
    """The read-only HTTP API (server.py): where it listens and who may call it.

    ``token_file`` is read here, once: afterwards ``token`` holds its content (one trailing
    newline stripped) and is the only token the server sees.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Int = Field(8080, ge=0, le=65535)  # 0: any free port (logged at start)
    token: SecretStr = SecretStr("")  # bearer token; empty: no authentication
    token_file: Path | None = None  # the token from a file (systemd credential, k8s secret)
    max_request_bytes: Size = Field(64 * KiB, ge=0)
    head_timeout_ms: Int = Field(10_000, ge=1)  # a request must arrive within this
    max_connections: Int = Field(1024, ge=1)  # beyond: /healthz only, 503 for the rest
    max_connections_per_client: Int = Field(128, ge=1)  # per client address; beyond: 503

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("token_file") in (None, ""):
            return data
        path = data["token_file"]
        if data.get("token") not in (None, ""):
            _check([(("token_file",), "set http.token or http.token_file, not both")])
        if not isinstance(path, (str, Path)):
            return data  # the field's own type error
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            _check([(("token_file",), f"cannot read {str(path)!r}: {e.strerror or e}")])
        except UnicodeDecodeError:
            _check([(("token_file",), f"{str(path)!r} is not UTF-8 text")])
        token = text[:-1] if text.endswith("\n") else text
        token = token[:-1] if token.endswith("\r") else token
        if not token:
            _check([(("token_file",), f"{str(path)!r} is empty")])
        if any(c.isspace() or not c.isprintable() for c in token):
            _check([(("token_file",), f"{str(path)!r} holds spaces or control characters "
                     "besides one trailing newline: a bearer token is one word")])
        return {**data, "token": token}

    @model_validator(mode="after")
    def _exposed_needs_token(self) -> HttpConfig:
        if self.enabled and not is_loopback(self.host) and not self.token.get_secret_value():
            msg = (f"{self.host!r} is not a loopback address: set http.token (a bearer token) "
                   "to expose the API beyond this host, or bind 127.0.0.1")
            _check([(("host",), msg)])
        return self


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class ClusterConfig(BaseModel):
    """Several instances in one consumer group (cluster.py): the work is split into `tasks`,
    the partitions of an internal topic that every source record is re-keyed to, and each
    task's state travels between instances through a compacted changelog topic."""

    model_config = _FROZEN

    enabled: bool = False
    tasks: Int = Field(12, ge=1, le=4096)  # partitions of the tasks and changelog topics
    tasks_topic: str = ""  # default: "<kafka.group_id>.tasks"
    changelog_topic: str = ""  # default: "<kafka.group_id>.changelog"
    replication_factor: Int = Field(1, ge=1, le=32)  # of the topics the service creates
    restore_timeout_ms: Int = Field(600_000, ge=1)  # a restore slower than this is fatal

    @field_validator("tasks_topic", "changelog_topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        return _valid_topic(value) if value else value


class DedupConfig(BaseModel):
    """The generational bloom filter that drops redelivered events."""

    model_config = _FROZEN

    bloom_capacity: Int = Field(1_000_000, ge=1)
    bloom_fp_rate: float = Field(0.01, gt=0.0, lt=0.5)
    bloom_generations: Int = Field(4, ge=2, le=64)


class GateConfig(BaseModel):
    """The per-key sequence gate: how many early events may wait, and for how long."""

    model_config = _FROZEN

    max_parked_per_key: Int = Field(1000, ge=1)
    max_parked_total: Int = Field(100_000, ge=1)
    gap_timeout_ms: Int = Field(30_000, ge=1)
    gap_policy: Literal["skip", "dead-letter"] = "skip"
    max_cached_keys: Int = Field(200_000, ge=1)  # sequence states kept in memory per worker
    # rows in the sequence log after which a commit checkpoints them into seq (store.py)
    seq_checkpoint_rows: Int = Field(32_768, ge=1)

    @model_validator(mode="after")
    def _totals(self) -> GateConfig:
        if self.max_parked_total < self.max_parked_per_key:
            want, got = self.max_parked_per_key, self.max_parked_total
            _check([(("max_parked_total",), f"must be >= max_parked_per_key = {want} (got {got})")])
        return self


class MappingConfig(BaseModel):
    """Where a non-CloudEvents source's attributes come from (see aggregator/mapping.py):
    each a spec string such as "header:id", "data.order.id", "kafka:offset",
    "literal:/shop/orders"; unset ones take the format's defaults."""

    model_config = _FROZEN

    id: str | None = None
    source: str | None = None
    type: str | None = None
    time: str | None = None
    subject: str | None = None
    partitionkey: str | None = None
    sequence: str | None = None
    # where the payload (the event's data) is: the whole value, or a member of it
    payload: str = "value"
    # "json": the Kafka key is JSON-encoded (Kafka Connect's JsonConverter)
    key_format: Literal["string", "json"] = "string"

    @model_validator(mode="after")
    def _specs(self) -> MappingConfig:
        p: list[tuple[tuple[str | int, ...], str]] = []
        for attr, spec in self.attrs().items():
            why = mapping.spec_problem(attr, spec)
            if why:
                p.append(((attr,), why))
        if self.payload != "value" and (not self.payload.startswith("value.")
                                        or mapping.spec_problem("id", self.payload)):
            p.append((("payload",), f"must be 'value' or 'value.<path>' (got {self.payload!r})"))
        _check(p)
        return self

    def attrs(self) -> dict[str, str]:
        """The attribute specs given in the config (unset ones left out)."""
        return {a: getattr(self, a) for a in mapping.ATTRS if getattr(self, a) is not None}


class SourceConfig(BaseModel):
    """One input topic and how its sequence numbers are ordered."""

    model_config = _FROZEN

    topic: str
    ordering: Literal["latest", "strict"] = "latest"
    initial_sequence: Int = Field(1, ge=0)
    # "binding": the Kafka binding decides the content mode (structured needs the
    # content-type application/cloudevents+json); "detect": a record without ce_ headers,
    # whose content-type is absent or JSON, whose value is a JSON object with
    # "specversion", is read as a structured-mode event (the CloudEvents Python SDK 1.x)
    structured: Literal["binding", "detect"] = "binding"
    # "cloudevents": the CloudEvents Kafka binding (envelope.py); "outbox" (the outbox
    # event router's records) and "json" (a plain JSON value): attributes by `mapping`
    format: Literal["cloudevents", "outbox", "json"] = "cloudevents"
    mapping: MappingConfig | None = None

    @field_validator("topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        return _valid_topic(value)

    @model_validator(mode="after")
    def _mapping(self) -> SourceConfig:
        p: list[tuple[tuple[str | int, ...], str]] = []
        if self.format == "cloudevents":
            if self.mapping is not None:
                p.append((("mapping",), 'only for format = "outbox" or "json" (this source '
                          'reads CloudEvents)'))
        else:
            if self.structured != "binding":
                p.append((("structured",), f"only for format = \"cloudevents\" (this source "
                          f"has format = \"{self.format}\")"))
            given = self.mapping.attrs() if self.mapping is not None else {}
            specs = mapping.resolved_specs(self.format, "x", given)
            if self.ordering == "strict" and specs.get("sequence") == "kafka:offset":
                p.append((("ordering",), 'must be "latest" with sequence = "kafka:offset" (the '
                          "offsets of one key have gaps: strict would wait for them)"))
            for attr in ("id", "type"):
                if attr not in specs:
                    p.append((("mapping", attr), f"required for format = \"{self.format}\" "
                              "(e.g. \"data.id\", \"header:id\" or \"literal:...\")"))
        _check(p)
        return self

    def plan(self, name: str) -> mapping.Plan | None:
        """This source's compiled input mapping (None for format = "cloudevents")."""
        if self.format == "cloudevents":
            return None
        m = self.mapping or MappingConfig()
        specs = mapping.resolved_specs(self.format, name, m.attrs())
        return mapping.compile_plan(self.format, name, specs, m.payload, m.key_format)


class OpSpec(BaseModel):
    """One merge operation, checked against the op grammar (``merge.OP_GRAMMAR``) with a
    message per field; `Config` then compiles the ops (``merge.compile_ops``), which checks
    the rest (literal values, event paths)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    op: Literal[OPS]  # type: ignore[valid-type]
    path: str | None = None
    from_: str | None = Field(None, alias="from")
    value: Any = None
    id: str | None = None
    fields: list[StrictStr] | None = None
    negate: StrictBool | None = None

    @model_validator(mode="before")
    @classmethod
    def _root_path(cls, data: Any) -> Any:
        # merge.compile_ops spells "merge into the root" as path = ""; delete has no path
        if isinstance(data, dict) and data.get("op") == "merge" and data.get("path") is None:
            return {**data, "path": ""}
        if isinstance(data, dict) and data.get("op") == "delete" and data.get("path") == "":
            return {k: v for k, v in data.items() if k != "path"}
        return data

    @model_validator(mode="after")
    def _structure(self) -> OpSpec:
        need_path, takes_input, extras = OP_GRAMMAR[self.op]
        p: list[tuple[tuple[str | int, ...], str]] = []
        op = f"op '{self.op}'"
        if self.path is None:
            if need_path:
                p.append((("path",), f"required for {op}"))
        elif self.op == "delete":
            p.append((("path",), "not allowed: delete removes the whole document"))
        elif not DOC_PATH_RE.match(self.path) and not (self.op == "merge" and not self.path):
            p.append((("path",), f"bad path {self.path!r}: use dotted names like 'a.b'"))
        has_from, has_value = self.from_ is not None, self.value is not None
        if takes_input and has_from == has_value:
            got = "both" if has_from else "neither"
            p.append(((), f"{op} needs exactly one of 'from' or 'value' (got {got})"))
        elif not takes_input:
            given = (("from", self.from_), ("value", self.value))
            p += [((k,), f"not allowed for {op}") for k, v in given if v is not None]
        if has_from and not _is_selector(self.from_):
            p.append((("from",), _selector_help(self.from_)))
        if has_value and self.op == "add" and (isinstance(self.value, bool)
                                               or not isinstance(self.value, (int, float))):
            p.append((("value",), f"must be a number for op 'add' (got {self.value!r})"))
        if has_value and self.op == "merge" and not isinstance(self.value, dict):
            p.append((("value",), f"must be a table for {op}"))
        for name in ("id", "fields", "negate"):
            if getattr(self, name) is not None and name not in extras:
                p.append(((name,), f"not allowed for {op}"))
        if "id" in extras and self.id is None:
            p.append((("id",), f"required for {op} (e.g. id = \"data.item_id\")"))
        elif self.id is not None and "id" in extras and not _is_selector(self.id):
            p.append((("id",), _selector_help(self.id)))
        if self.fields is not None and "fields" in extras:
            if not self.fields:
                p.append((("fields",), "must not be empty (omit it to take every field)"))
            p += [(("fields", i), "must be a non-empty string") for i, f in enumerate(self.fields)
                  if not f]
        _check(p)
        return self

    def to_spec(self) -> dict[str, Any]:
        """The op as its TOML table (``from`` spelt as in the file, absent keys left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class FeedConfig(BaseModel):
    """Which events of one source update a view, under which key, with which ops."""

    model_config = _FROZEN

    source: str
    types: list[StrictStr] = Field(min_length=1)
    key: str
    ops: list[OpSpec] = Field(min_length=1)

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        p: list[tuple[tuple[str | int, ...], str]] = []
        seen: set[str] = set()
        for i, t in enumerate(value):
            if not t.strip():
                p.append(((i,), "must be a non-empty event type"))
            elif t in seen:
                p.append(((i,), f"duplicate type {t!r}"))
            seen.add(t)
        if "*" in seen and len(value) > 1:
            p.append(((), "'*' (every type) must be the only entry"))
        _check(p)
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if value != "partitionkey" and not DATA_PATH_RE.match(value):
            raise ValueError(f"must be 'partitionkey' or 'data.<field>' (got {value!r})")
        return value


class ViewConfig(BaseModel):
    """A materialised view: one document per key, built by its feeds."""

    model_config = _FROZEN

    feeds: list[FeedConfig] = Field(min_length=1)
    # Publish every change of a document of this view to this topic (change events).
    changes_topic: str | None = Field(None, min_length=1)

    @field_validator("changes_topic")
    @classmethod
    def _topic_name(cls, value: str | None) -> str | None:
        return None if value is None else _valid_topic(value)


class ChangesConfig(BaseModel):
    """Change events: how document changes are published (views opt in by changes_topic)."""

    model_config = _FROZEN

    coalesce: bool = False  # one event per key and transaction (its last version) instead of
    #                         one per change
    format: Literal["json", "msgpack"] = "json"  # data encoding of the change events
    source: str = Field("/aggregator", min_length=1)  # CloudEvents `source` prefix
    compress_blobs: bool = True  # LZ4 of the change outbox blobs (changes.compress_blob)


class Config(BaseModel):
    """The whole configuration. Build it with :func:`load_config`."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    changes: ChangesConfig = Field(default_factory=ChangesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sources: dict[str, SourceConfig] = Field(min_length=1)
    views: dict[str, ViewConfig] = Field(min_length=1)
    _by_topic: dict[str, tuple[str, SourceConfig]] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._by_topic = {s.topic: (n, s) for n, s in self.sources.items()}

    @field_validator("sources", "views")
    @classmethod
    def _names(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        kind = info.field_name[:-1]
        rule = f"must match {NAME_RE.pattern} (lowercase letters, digits, _)"
        _check([((n,), f"bad {kind} name {n!r}: {rule}") for n in value if not NAME_RE.match(n)])
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        p: list[tuple[tuple[str | int, ...], str]] = []
        owner: dict[str, str] = {}
        for name, src in self.sources.items():
            if src.topic in owner:
                p.append((("sources", name, "topic"),
                          f"topic {src.topic!r} is already read by source '{owner[src.topic]}'"))
            owner.setdefault(src.topic, name)
        dlq = self.service.dead_letter_topic
        if dlq in owner:
            msg = f"{dlq!r} is also the topic of source '{owner[dlq]}'"
            p.append((("service", "dead_letter_topic"), msg))
        used: set[str] = set()
        for vname, view in self.views.items():
            t = view.changes_topic
            if t is not None and (t in owner or t == dlq):
                what = f"source '{owner[t]}'" if t in owner else "service.dead_letter_topic"
                p.append((("views", vname, "changes_topic"), f"{t!r} is also the topic of {what}"))
            for i, feed in enumerate(view.feeds):
                used.add(feed.source)
                if feed.source not in self.sources:
                    hint = difflib.get_close_matches(feed.source, list(self.sources), 1)
                    mean = f"did you mean '{hint[0]}'? " if hint else ""
                    known = ", ".join(self.sources)
                    msg = f"unknown source {feed.source!r} ({mean}known: {known})"
                    p.append((("views", vname, "feeds", i, "source"), msg))
        p += [(("sources", n), f"source '{n}' feeds no view") for n in self.sources
              if n not in used]
        if self.cluster.enabled:
            for t in (self.tasks_topic(), self.changelog_topic()):
                if t in owner or t == dlq or t in self.changes_topics().values():
                    p.append((("cluster",), f"{t!r} is also a source, dead-letter or change "
                              "topic"))
        _check(p)
        return self

    @model_validator(mode="after")
    def _merge_plans(self) -> Config:
        # Compile every feed's ops as each worker's boot and reshard will
        # (merge.compile_ops, with the view's ops as context): an op the compiler rejects
        # (e.g. value = nan, a TOML date) is a config error here, not a failed boot.
        p: list[tuple[tuple[str | int, ...], str]] = []
        for vname, view in self.views.items():
            view_specs = [op.to_spec() for feed in view.feeds for op in feed.ops]
            for i, feed in enumerate(view.feeds):
                try:
                    compile_ops([op.to_spec() for op in feed.ops], view_specs)
                except MergeConfigError as e:
                    loc: tuple[str | int, ...] = ("views", vname, "feeds", i, "ops")
                    p.append((loc if e.index is None else (*loc, e.index), str(e)))
        _check(p)
        return self

    def changes_topics(self) -> dict[str, str]:
        """view name → its change-event topic, for views that publish changes."""
        return {n: v.changes_topic for n, v in self.views.items() if v.changes_topic}

    def tasks_topic(self) -> str:
        """The internal topic every source record is re-keyed to (cluster mode)."""
        return self.cluster.tasks_topic or f"{self.kafka.group_id}.tasks"

    def changelog_topic(self) -> str:
        """The compacted topic each task's state is mirrored to (cluster mode)."""
        return self.cluster.changelog_topic or f"{self.kafka.group_id}.changelog"

    def topics(self) -> list[str]:
        """Source topics sorted by name: the stable ``topic_idx`` order of ring messages."""
        return sorted(s.topic for s in self.sources.values())

    def source_by_topic(self, topic: str) -> tuple[str, SourceConfig]:
        """(source name, its config) for a source topic; KeyError for any other topic."""
        try:
            return self._by_topic[topic]
        except KeyError:
            raise KeyError(f"no source reads topic {topic!r}") from None

    def fingerprint(self) -> str:
        """Hash of what decides the stored documents: sources, views and the gap policy.

        Kafka settings, worker count, limits and timeouts are left out, so a data dir can
        tell a changed meaning from a retuned deployment.
        """
        views = {n: v.model_dump(mode="json", by_alias=True, exclude_none=True)
                 for n, v in self.views.items()}
        for v in views.values():
            for feed in v["feeds"]:
                feed["types"] = sorted(feed["types"])
        canon = {
            "format": 1,
            "sources": {n: _source_canon(s) for n, s in self.sources.items()},
            "views": views,
            "gap_policy": self.gate.gap_policy,
        }
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        """The whole configuration as plain data, fit to log or print (secrets as ``***``)."""
        out = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"kafka"})
        return {"kafka": self.kafka.redacted(), **out}


def _source_canon(source: SourceConfig) -> dict[str, Any]:
    """A source for the fingerprint: ``structured`` only when not the default, ``format``
    and its resolved ``mapping`` only when not CloudEvents, so that the fingerprints of
    configs written before these settings existed stay the same."""
    out = source.model_dump(mode="json")
    if out["structured"] == "binding":
        del out["structured"]
    del out["format"], out["mapping"]
    if source.format != "cloudevents":  # the mapping decides event identity and order
        m = source.mapping or MappingConfig()
        out["format"] = source.format
        out["mapping"] = {**mapping.resolved_specs(source.format, "", m.attrs()),
                          "payload": m.payload, "key_format": m.key_format}
    return out


# ---- loading ------------------------------------------------------------------------------


def default_config_path() -> Path:
    """The example config ``shop.toml`` (the demo's default): ``aggregator/examples/`` in an
    installed package (pyproject.toml maps the repository's ``examples/`` there), else the
    repository's ``examples/`` next to the package (a source checkout or editable install)."""
    here = Path(__file__).resolve().parent
    candidates = (here / "examples" / "shop.toml", here.parent / "examples" / "shop.toml")
    for path in candidates:
        if path.is_file():
            return path
    msg = (f"no config file given and the example config is missing (looked at "
           f"{', '.join(map(str, candidates))}); pass a config path")
    raise ConfigError([("", msg)])


def load_config(
    path: str | Path | None,
    overrides: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read ``path`` (None: :func:`default_config_path`), apply env then ``overrides``, validate.

    ``overrides`` keys are dotted field paths (``{"service.workers": 4}``); None values are
    skipped so CLI options that were not given can be passed straight through.
    Raises :class:`ConfigError`.
    """
    path = Path(path) if path is not None else default_config_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([(str(path), "file not found")], str(path)) from None
    except OSError as e:
        raise ConfigError([(str(path), f"cannot read: {e.strerror or e}")], str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([(str(path), f"not valid UTF-8 ({e.reason})")], str(path)) from None
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\s*\(at (line \d+, column \d+|end of document)\)$", msg)
        where = f" at {m.group(1)}" if m else ""
        msg = msg[: m.start()] if m else msg
        raise ConfigError([(str(path), f"TOML syntax error{where}: {msg}")], str(path)) from None
    return config_from_dict(data, overrides, env, source=str(path))


def config_from_dict(
    data: Mapping[str, Any],
    overrides: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    source: str | None = None,
) -> Config:
    """Like :func:`load_config` for already-parsed TOML data (``data`` is not modified)."""
    raw = _deepcopy(data)
    origins: dict[str, str] = {}
    env = os.environ if env is None else env
    for name in sorted(env):
        if name.startswith(ENV_GENERIC_PREFIX):
            _set(raw, _env_parts(name), env[name], f"env {name}", origins)
    for name, dotted in ENV_SHORTCUTS.items():
        if name in env:
            long = ENV_GENERIC_PREFIX + dotted.upper().replace(".", "__")
            if long in env and env[long] != env[name]:
                raise ConfigError([(dotted, f"env {name} and {long} disagree")], source)
            _set(raw, dotted.split("."), env[name], f"env {name}", origins)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(raw, _dotted_parts(key), value, f"override {key!r}", origins)
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, origins), source) from None
    log.debug("config loaded from %s (fingerprint %s)", source or "data", config.fingerprint())
    return config


def _deepcopy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def _env_parts(name: str) -> list[str]:
    parts = [p.lower() for p in name[len(ENV_GENERIC_PREFIX):].split("__")]
    if not all(parts):
        raise ConfigError([("", f"env {name}: empty name part (use AGGREGATOR__SECTION__FIELD)")])
    if len(parts) >= 3 and parts[0] == "kafka" and parts[1] in KAFKA_DICTS:
        parts = parts[:2] + [".".join(parts[2:]).replace("_", ".")]  # one librdkafka key
    return parts


def _dotted_parts(key: str) -> list[str]:
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "kafka" and parts[1] in KAFKA_DICTS:
        parts = parts[:2] + [".".join(parts[2:])]  # librdkafka keys contain dots
    if not all(parts):
        raise ConfigError([("", f"override {key!r}: bad dotted key")])
    return parts


def _set(raw: dict[str, Any], parts: list[str], value: Any, origin: str,
         origins: dict[str, str]) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = _fmt_loc(tuple(parts[: i + 1]))
            msg = f"{origin}: cannot set inside {where}, a {type(child).__name__}"
            raise ConfigError([(_fmt_loc(tuple(parts)), msg)])
        node = child
    if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
        for k, v in value.items():
            _set(raw, [*parts, str(k)], v, origin, origins)
        return
    node[parts[-1]] = _deepcopy(value)
    origins[_fmt_loc(tuple(parts))] = origin
    log.debug("config: %s set by %s", ".".join(parts), origin)


# ---- error messages -----------------------------------------------------------------------


def _fmt_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
            out += f".{text}" if out else text
    return out


def _explain(exc: ValidationError, origins: dict[str, str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for e in exc.errors(include_url=False):
        loc = tuple(e["loc"])
        err = (e.get("ctx") or {}).get("error")
        items = err.items if isinstance(err, _FieldErrors) else [((), _message(e, loc))]
        for sub, msg in items:
            path = _fmt_loc(loc + sub)
            origin = next((o for p, o in origins.items()
                           if path == p or path.startswith((p + ".", p + "["))), None)
            found.append((path, f"{msg} [from {origin}]" if origin else msg))
    return found


def _message(e: Mapping[str, Any], loc: tuple[str | int, ...]) -> str:
    kind, ctx = e["type"], e.get("ctx") or {}
    secret = any(isinstance(p, str) and is_secret_key(p) for p in loc)
    got = "***" if secret else _short(e.get("input"))
    if kind == "extra_forbidden":
        known = _known_fields(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, 1)
        return "unknown key " + (f"(did you mean '{hint[0]}'?)" if hint
                                 else f"(known: {', '.join(known)})")
    if kind == "missing":
        return "required field missing"
    if kind == "value_error":
        return str(ctx.get("error", e["msg"]))
    ops = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
           "less_than": "<"}
    if kind in ops:
        bound = next(iter(ctx.values()))
        return f"must be {ops[kind]} {bound} (got {got})"
    if kind == "literal_error":
        return f"must be {ctx['expected']} (got {got})"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"needs at least {n} entries"
    simple = {"int": "an integer", "bool": "true or false", "float": "a number",
              "string": "a string", "list": "a list", "dict": "a table", "model": "a table"}
    for prefix, what in simple.items():
        if kind.startswith(prefix):
            return f"must be {what} (got {got})"
    return f"{e['msg']} (got {got})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _known_fields(loc: tuple[str | int, ...]) -> list[str]:
    tp: Any = Config
    for part in (*loc, None):
        while typing.get_origin(tp) in (typing.Union, types.UnionType, Annotated):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0]
        if part is None:
            break
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = next((f for n, f in tp.model_fields.items() if part in (n, f.alias)), None)
            tp = field.annotation if field else None
        elif typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]
        else:
            return []
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items()]
    return []


def _valid_topic(value: str) -> str:
    if not TOPIC_RE.match(value) or value in (".", ".."):
        raise ValueError(f"bad topic name {value!r}: use 1-249 of A-Z a-z 0-9 . _ -")
    return value


def _is_selector(value: str) -> bool:
    return value == "data" or value in EVENT_ATTRS or bool(DATA_PATH_RE.match(value))


def _selector_help(value: str) -> str:
    return (f"bad selector {value!r}: use 'data', 'data.<field>' or one of "
            f"{', '.join(EVENT_ATTRS)}")


def _truthy(value: Any) -> bool:
    if isinstance(value, SecretStr):
        return False
    return str(value).strip().lower() in ("true", "t", "1", "yes", "y", "on")


def _flatten(value: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for k, v in value.items():
        if isinstance(v, Mapping):
            _flatten(v, f"{prefix}{k}.", out)
        else:
            out[f"{prefix}{k}"] = v
