"""aggregator.kafka_clients and client_check: every client kind checked at start-up,
librdkafka's output made quiet, and no secret value in what it says. No broker needed
(librdkafka validates settings at construction; connection failures come from a closed
port)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from aggregator.client_check import check_client_settings, client_settings
from aggregator.config import load_config
from aggregator.kafka_clients import KafkaSettingsError, quiet, redact_text

SHOP = Path(__file__).resolve().parent.parent / "examples" / "shop.toml"
SECRET = "hunter2-s3cr3t"


def shop(**overrides):
    return load_config(SHOP, {"kafka.bootstrap_servers": "127.0.0.1:1", **overrides}, env={})


def refused(**overrides) -> str:
    with pytest.raises(KafkaSettingsError) as info:
        check_client_settings(shop(**overrides))
    return str(info.value)


def test_the_example_passes_in_both_modes() -> None:
    check_client_settings(shop())
    cfg = shop(**{"cluster.enabled": True, "cluster.tasks": 4})
    roles = [r for r, *_ in client_settings(cfg)]
    assert roles == ["consumer", "dead-letter producer", "change-event producer",
                     "admin client", "tasks consumer", "ingest producer",
                     "changelog producer", "changelog reader"]
    check_client_settings(cfg)


def test_misspelt_producer_key_names_key_and_table_not_value() -> None:
    msg = refused(**{"kafka.producer.sasl.pasword": SECRET})
    assert msg == ('config error: kafka.producer."sasl.pasword": librdkafka refused the '
                   'settings of the dead-letter producer: No such configuration property: '
                   '"sasl.pasword"')
    assert SECRET not in msg


@pytest.mark.parametrize(("key", "table"), [("consumer", "consumer"), ("common", "common")])
def test_misspelt_key_in_other_tables(key: str, table: str) -> None:
    msg = refused(**{f"kafka.{key}.fetch.wait.max.msec": 5})
    assert msg.startswith(f'config error: kafka.{table}."fetch.wait.max.msec": ')


def test_bad_value_and_conflicting_settings() -> None:
    msg = refused(**{"kafka.consumer.fetch.min.bytes": "lots"})
    assert msg.startswith('config error: kafka.consumer."fetch.min.bytes": librdkafka refused '
                          "the settings of the consumer: Invalid value")
    # idempotence (our default) needs acks=all: librdkafka says so at construction
    msg = refused(**{"kafka.producer.acks": 1})
    assert msg.startswith("config error: kafka.producer.acks: librdkafka refused the settings "
                          "of the dead-letter producer")


def test_redact_text() -> None:
    conf = {"sasl.pasword": SECRET, "client.id": "abc"}
    assert redact_text(f"x {SECRET} abc", conf) == "x *** abc"


def test_unreachable_is_said_once_and_librdkafka_lines_are_deduplicated(
        caplog: pytest.LogCaptureFixture) -> None:
    conf, events = quiet({"bootstrap.servers": "127.0.0.1:1",
                          "sasl.password": SECRET}, "test producer")
    p = Producer(conf)
    with caplog.at_level(logging.DEBUG):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            p.poll(0.1)
        assert events.unreachable
        loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) == 1 and loud[0].startswith(
            "Kafka unreachable: the test producer cannot connect to 127.0.0.1:1 ("), loud
        failures = [r for r in caplog.records if "Connection refused" in r.getMessage()]
        assert len(failures) >= 2  # librdkafka kept trying, at DEBUG
        assert SECRET not in caplog.text
        events.reachable()
        assert not events.unreachable and "Kafka reachable again" in caplog.text
