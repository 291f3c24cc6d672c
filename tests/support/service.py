"""Run the real service (`python -m aggregator run`) as a child process, for integration tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import NamedTuple

import tomli_w
from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, TopicPartition

from aggregator.admin import kafka_admin
from aggregator.config import load_config
from aggregator.devtools import simulate
from aggregator.ring import cleanup_stale, segment_prefix
from aggregator.store import read_views

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop.toml"


def write_config(path: Path, *, bootstrap: str, prefix: str, group: str, data_dir: Path,
                 workers: int, extra: str = "", http_port: int = 0,
                 http_token: str = "", defaults: dict | None = None) -> Path:
    """shop.toml with the test's topics, group, data dir and worker count; the HTTP API on
    `http_port` (0: any free port, so parallel or back-to-back services never collide)."""
    text = SHOP.read_text()
    text = re.sub(r'topic = "shop\.', f'topic = "{prefix}shop.', text)
    text = text.replace('bootstrap_servers = ""', f'bootstrap_servers = "{bootstrap}"')
    text = text.replace('group_id = "aggregator-shop"', f'group_id = "{group}"')
    text = text.replace('data_dir = "./data"', f'data_dir = "{data_dir}"')
    text = text.replace("workers = 2", f"workers = {workers}")
    text = text.replace('dead_letter_topic = "shop.deadletter"',
                        f'dead_letter_topic = "{prefix}shop.deadletter"\n'
                        f"commit_interval_ms = 200")
    # Short session and heartbeat: a Tansu join takes half the session timeout, and a
    # SIGKILLed member holds its partitions for the whole of it. max.poll.interval.ms: a
    # supervisor stuck for longer leaves the group within a test's time (default 5 min).
    text = text.replace('[kafka.consumer]\n',
                        '[kafka.consumer]\n"session.timeout.ms" = 2000\n'
                        '"heartbeat.interval.ms" = 500\n"max.poll.interval.ms" = 45000\n')
    data = tomllib.loads(text)
    merge(data, {"http": {"port": http_port, "token": http_token}})
    merge(data, defaults or {})  # the caller's defaults; `extra` still overrides them
    merge(data, tomllib.loads(extra))  # `extra` may set keys of sections shop.toml has
    path.write_text(tomli_w.dumps(data))
    return path


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge `extra` into `base` (tables merged, other values replaced)."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


class Service:
    """One `aggregator run` process."""

    def __init__(self, config_path: Path, log_path: Path):
        self.config_path = config_path
        self.config = load_config(config_path)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict | None = None, args: tuple[str, ...] = ()) -> Service:
        """Start `aggregator run --config ...` with extra command-line `args`."""
        log = open(self.log_path, "ab")
        self._log_mark = log.tell()  # a restart appends: its URL comes after this
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "run", "--config", str(self.config_path),
             *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()
        return self

    def http_url(self, timeout: float = 30) -> str:
        """The HTTP API's base URL, from the service log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"HTTP API listening on (http://\S+)",
                          self.log()[getattr(self, "_log_mark", 0):])
            if m:
                return m.group(1)
            time.sleep(0.05)
        raise AssertionError(f"no HTTP API in the log:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The live workers' pids, from the control block (each worker writes its own at
        boot): the HTTP process is a multiprocessing child of the supervisor too."""
        from aggregator.metrics import live_counters

        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            live = live_counters(self.config)
        except (OSError, ValueError):
            return []
        if live is None:
            return []
        return [w["pid"] for w in live["workers"] if w["pid"] and w["alive"]
                and not _is_zombie(w["pid"])]

    def wait_workers(self, n: int, timeout: float = 60) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if len(pids) >= n:
                return pids
            assert self.proc.poll() is None, self.log()
            time.sleep(0.05)
        raise AssertionError(f"workers did not start:\n{self.log()}")

    def committed(self) -> dict[tuple[str, int], int]:
        cfg = self.config
        c = Consumer({"bootstrap.servers": cfg.kafka.bootstrap_servers,
                      "group.id": cfg.kafka.group_id})
        try:
            md = c.list_topics(timeout=10)
            parts = [TopicPartition(t, p) for t in cfg.topics() for p in md.topics[t].partitions]
            return {(tp.topic, tp.partition): tp.offset for tp in c.committed(parts, timeout=10)}
        finally:
            c.close()

    def wait_committed(self, targets: dict[tuple[str, int], int], timeout: float = 300,
                       fraction: float = 1.0) -> None:
        """Wait until the group's committed offsets reach `fraction` of `targets`."""
        total = sum(targets.values())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"service exited early:\n{self.log()[-5000:]}"
            got = self.committed()
            done = sum(min(max(got.get(tp, 0), 0), high) for tp, high in targets.items())
            if done >= fraction * total:
                return
            time.sleep(0.2)
        raise AssertionError(f"not caught up within {timeout}s: {got} vs {targets}\n"
                             f"{self.log()[-5000:]}")

    def groups(self) -> list[str]:
        """The consumer groups the service joins: the sources' group, and in cluster mode
        also the tasks' group."""
        g = self.config.kafka.group_id
        return [g, f"{g}.tasks"] if self.config.cluster.enabled else [g]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a clean stop) once the service has started (before its signal handlers
        are installed SIGTERM would just kill it) and its groups are not rebalancing."""
        if self.proc.poll() is None:
            self.http_url(timeout=60)  # logged after the handlers are installed
            if not wait_group_settled(self.config.kafka.bootstrap_servers, self.groups()):
                print(f"warning: groups {self.groups()} still rebalancing after 30 s; "
                      "stopping anyway (a later member may wait for this one, see "
                      "wait_group_settled)", flush=True)
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def discard(self) -> None:
        """Test teardown: SIGKILL the service if it still runs, wait for its workers to
        follow, and remove the shared memory a killed service leaves in /dev/shm (the next
        start on the same data dir would, but a test's data dir is never started again)."""
        pids = self.worker_pids() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.kill()
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        cleanup_stale(segment_prefix(str(Path(self.config.service.data_dir).resolve())))

    def views(self) -> dict:
        return read_views(self.config.service.data_dir, list(self.config.views))

    def shm_segments(self) -> list[str]:
        prefix = segment_prefix(str(Path(self.config.service.data_dir).resolve()))
        return [p for p in os.listdir("/dev/shm") if p.startswith(prefix)]


def wait_group_settled(bootstrap: str, groups: list[str], timeout: float = 30) -> bool:
    """Wait until no group in `groups` is rebalancing (state Stable or Empty in two reads
    in a row); False if one still is after `timeout` s.

    Tansu (0.6.0) keeps a member that leaves a group in the middle of a rebalance as the
    group's leader if it was the leader: every later member then waits for that leader's
    assignment forever (a restarted service never got its partitions, 400 s). A test that
    stops a service and starts another in the same group stops it only once its group
    settled. Apache Kafka re-elects the leader; the service needs nothing of the sort there.
    """
    settled = {ConsumerGroupState.STABLE, ConsumerGroupState.EMPTY}
    admin = kafka_admin(bootstrap)
    deadline = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < deadline:
        try:
            futures = admin.describe_consumer_groups(groups, request_timeout=5)
            states = [f.result(timeout=5).state for f in futures.values()]
        except KafkaException:
            states = []
        calm = calm + 1 if states and all(s in settled for s in states) else 0
        if calm >= 2:
            return True
        time.sleep(0.2)
    return False


def read_topic(bootstrap: str, topic: str, timeout: float = 60, quiet: float = 2.0) -> list:
    """Every record of a topic (all partitions), by assign() from the beginning.

    Reads until the high watermarks are reached AND nothing arrives for `quiet` seconds: the
    test broker (Tansu) under-reports the high watermark of a partition that several
    producers appended to concurrently (the records are there and fetchable past it).
    """
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe-read",
                  "enable.auto.commit": False})
    try:
        md = c.list_topics(timeout=10)
        parts = list(md.topics[topic].partitions)
        highs = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                 for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out, seen = [], {p: 0 for p in parts}
        deadline = time.monotonic() + timeout
        last_msg = time.monotonic()
        while time.monotonic() < deadline:
            msgs = c.consume(1000, 0.2)
            for m in msgs:
                if m.error() is None:
                    out.append(m)
                    seen[m.partition()] = m.offset() + 1
            now = time.monotonic()
            if msgs:
                last_msg = now
            elif now - last_msg >= quiet:
                # the position passes transaction markers, which are not delivered
                pos = {tp.partition: tp.offset for tp in
                       c.position([TopicPartition(topic, p) for p in parts])}
                if all(max(seen[p], pos.get(p, 0)) >= highs[p] for p in parts):
                    break
        return out
    finally:
        c.close()


class Produced(NamedTuple):
    bad: list  # the malformed records interleaved (simulate.BadRecord)
    ends: dict[tuple[str, int], int]  # end offset of every partition written


def produce_tracked(bootstrap: str, records: list, ends: dict | None = None,
                    producer_config: dict | None = None) -> dict[tuple[str, int], int]:
    """Produce `records` (topic, key, value, headers) in order and return the end offset of
    every partition written, from the delivery reports, merged into `ends` (the test
    broker's high watermark can be under-reported: see `read_topic`)."""
    ends = {} if ends is None else ends
    errors: list = []

    def delivered(err, msg) -> None:
        if err is not None:
            errors.append(err)
            return
        tp = (msg.topic(), msg.partition())
        if msg.offset() + 1 > ends.get(tp, 0):
            ends[tp] = msg.offset() + 1

    simulate.produce(records, bootstrap, config={
        "on_delivery": delivered, "delivery.report.only.error": False,
        **(producer_config or {})})
    assert not errors, errors[:3]
    return ends


def produce_prefixed(bootstrap, prefix, workload, with_bad=True) -> Produced:
    """The workload's records on the `prefix`ed topics, malformed ones interleaved."""
    records = [(prefix + t, k, v, h) for t, k, v, h in workload.records]
    bad = simulate.bad_records(prefix) if with_bad else []
    step = max(len(records) // (len(bad) + 1), 1)
    for i, b in enumerate(bad):
        records.insert((i + 1) * step, tuple(b[:4]))
    ends = {(t, part): 0 for t in simulate.shop_topics(prefix) for part in range(4)}
    return Produced(bad, produce_tracked(bootstrap, records, ends))
