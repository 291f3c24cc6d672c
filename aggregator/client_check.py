"""librdkafka clients checked at start-up.

Invariant: `check_client_settings` builds (and closes) every kind of client the configuration
will need, from the same settings the service builds them with (each role's module builds its
settings: changes.py, changelog.py, cluster.py), before anything starts: librdkafka validates
every key and value at construction, so a misspelt key fails the start (`KafkaSettingsError`,
naming the key and its config table), not the first dead letter of a worker. No value of a
secret key appears in what it raises (`kafka_clients.redact_text`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from .changelog import reader_conf, writer_conf
from .changes import publisher_conf
from .cluster import ingest_producer_conf
from .config import Config, _fmt_loc
from .kafka_clients import KafkaSettingsError, _Dedup, quiet, redact_text

_QUOTED_RE = re.compile(r'"([^"]+)"|`([^`]+)`')


# ---- the start-up check -------------------------------------------------------------------


def client_settings(cfg: Config) -> list[tuple[str, type, dict[str, Any], tuple[str, ...]]]:
    """(role, client class, settings, config tables they come from) of every client the
    service builds with this configuration, built as the service builds them."""
    k = cfg.kafka
    out: list[tuple[str, type, dict[str, Any], tuple[str, ...]]] = [
        ("consumer", Consumer, k.consumer_conf(), ("common", "consumer")),
        ("dead-letter producer", Producer, k.producer_conf(), ("common", "producer")),
    ]
    if cfg.changes_topics():
        out.append(("change-event producer", Producer, publisher_conf(cfg),
                    ("common", "producer")))
    if cfg.cluster.enabled:
        out += [
            ("admin client", AdminClient, k.admin_conf(), ("common",)),
            ("tasks consumer", Consumer,
             {**k.consumer_conf(), "group.id": f"{k.group_id}.tasks"}, ("common", "consumer")),
            ("ingest producer", Producer, ingest_producer_conf(cfg), ("common", "producer")),
            ("changelog producer", Producer, writer_conf(k.producer_conf()),
             ("common", "producer")),
            ("changelog reader", Consumer, reader_conf(k.consumer_conf()),
             ("common", "consumer")),
        ]
    else:
        out.append(("admin client", AdminClient, k.admin_conf(), ("common",)))
    return out


def check_client_settings(cfg: Config) -> None:
    """Build and close every client `client_settings` lists; raise `KafkaSettingsError`
    for the first one librdkafka refuses, naming the key and the table it was set in.
    librdkafka's configuration warnings (CONFWARN) are logged once each."""
    once = _Dedup(float("inf"))  # each warning once, not once per client
    for role, cls, conf, tables in client_settings(cfg):
        settings, _ = quiet(conf, role, once)
        settings["error_cb"] = _ignore  # built only to be checked: its connection is not ours
        try:
            client = cls(settings)
        except (KafkaException, ValueError, TypeError) as e:
            raise KafkaSettingsError(_explain(cfg, role, tables, conf, e)) from None
        if isinstance(client, Consumer):
            client.close()
        elif isinstance(client, Producer):
            client.flush(0)
        del client


def _ignore(_err: KafkaError) -> None:
    pass


def _explain(cfg: Config, role: str, tables: tuple[str, ...], conf: Mapping[str, Any],
             exc: Exception) -> str:
    err = exc.args[0] if exc.args else exc
    text = redact_text(err.str() if isinstance(err, KafkaError) else str(err), conf)
    where = ""
    for m in _QUOTED_RE.finditer(text):  # the first quoted name that the config sets
        key = m.group(1) or m.group(2)
        for table in reversed(tables):  # the later table wins when both set a key
            if key in getattr(cfg.kafka, table):
                where = _fmt_loc(("kafka", table, key)) + ": "
                break
        if where:
            break
    else:
        where = " and ".join(f"[kafka.{t}]" for t in tables) + ": "
    return (f"config error: {where}librdkafka refused the settings of the {role}: {text}")
