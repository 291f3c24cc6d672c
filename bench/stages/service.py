"""The aggregator in a child process, timed from outside, then checked against the oracle.

The Supervisor runs in its own process ('spawn'), so the harness' CPU (sampling, polling,
a paced producer) does not run inside it. In the child, the Kafka consumer is wrapped to note
the time (CLOCK_MONOTONIC, shared by all processes) when the first non-empty batch was
fetched: the throughput window starts there, after the group join and the worker boot.

The window ends when every shard has durably committed (LMDB) the last offset of every
partition (`DurablePoller`, 20 ms polls): the state the Kafka commit would then publish. The
child stops once the supervisor's Kafka commit covers every partition too (checked every
0.5 s by `stop_when`, commits every `commit_interval_ms`), and that time is reported
separately as `kafka_committed_s`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
import types
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import workload as wl
from bench.metrics import DurablePoller, ProcessSampler

log = logging.getLogger(__name__)


@contextlib.contextmanager
def lean_main():
    """Hide the main module while a process is spawned.

    A 'spawn' child imports its parent's ``__main__`` module again (as ``__mp_main__``), and
    so do its own children: every process of the measured service would carry the bench
    harness (``python -m bench``: rich, the workload generator, the report; 5-8 MiB of RSS
    each). `aggregator run` starts them from the CLI module, which imports little, so the
    harness hides its main module from the processes it measures."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def serve(overrides: dict, targets: dict, conn, stop, log_level: int) -> None:
    """Child process: run the Supervisor until every target offset is committed to Kafka
    (or `stop` is set); send timings and stats through `conn`."""
    sys.modules["__main__"] = types.ModuleType("__main__")  # lean_main: for its children
    logging.basicConfig(level=log_level,
                        format="%(asctime)s supervisor %(levelname)s %(name)s: %(message)s")
    import aggregator.supervisor as sup_mod
    from aggregator.config import load_config

    t_first = [0.0]
    base = sup_mod.Consumer

    class TimedConsumer(base):  # type: ignore[misc, valid-type]
        def consume(self, *args, **kwargs):
            msgs = super().consume(*args, **kwargs)
            if msgs and not t_first[0]:
                t_first[0] = time.monotonic()
            return msgs

    sup_mod.Consumer = TimedConsumer
    cfg = load_config(wl.CONFIG_PATH, overrides, env={})
    topics = cfg.topics()
    want = {(topics.index(t), p): off + 1 for (t, p), off in targets.items()}
    t_kafka = [0.0]

    def stop_when(stats) -> bool:
        if stop.is_set():
            return True
        if want and all(stats.committed.get(tp, 0) >= o for tp, o in want.items()):
            t_kafka[0] = time.monotonic()
            return True
        return False

    sup = sup_mod.Supervisor(cfg, log_level=log_level, stop_when=stop_when)
    t0 = time.monotonic()
    code = sup.run()
    conn.send({"code": code, "t_start": t0, "t_first": t_first[0], "t_kafka": t_kafka[0],
               "t_end": time.monotonic(), "stats": asdict(sup.stats) | {"committed": None}})
    conn.close()


@dataclass
class AggRun:
    """The outcome of one aggregator run."""

    workers: int
    ok: bool = False
    error: str = ""
    records: int = 0
    window_s: float = 0.0
    events_per_s: float = 0.0
    kafka_committed_s: float = 0.0
    startup_s: float = 0.0  # child start -> first record fetched (boot + group join)
    window_start: str = "first record fetched"
    cpu_s: dict = field(default_factory=dict)  # within the window, by process label
    # within the window, by process label: user/system, main thread/other threads (seconds)
    cpu_split: dict = field(default_factory=dict)
    cpu_s_per_million: float = 0.0
    # bytes the service's processes caused to be written to storage per record consumed,
    # whole run (boot to exit; /proc/<pid>/io write_bytes): issue 14's disk-writes figure
    disk_bytes_per_record: float = 0.0
    memory: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    poller: dict = field(default_factory=dict)
    verified: str = "not checked"

    def to_json(self) -> dict:
        return asdict(self)


class AggregatorProcess:
    """Start the supervisor child with a sampler and a durable-offset poller around it."""

    def __init__(self, bootstrap: str, prefix: str, workers: int, *, embedded: bool,
                 broker_pid: int | None = None, log_level: int = logging.WARNING,
                 consumer: dict | None = None, overrides: dict | None = None) -> None:
        """`consumer`: extra librdkafka consumer settings; `overrides`: extra config
        overrides (dotted keys, e.g. ``{"service.ring_bytes": 8 << 20}``)."""
        self.workers = workers
        self.tmp = Path(tempfile.mkdtemp(prefix="agg-bench-"))
        self.data_dir = self.tmp / "data"
        self.overrides = wl.overrides(bootstrap, prefix, workers=workers,
                                      data_dir=self.data_dir,
                                      group=f"bench-{uuid.uuid4().hex[:8]}", embedded=embedded)
        for k, v in (consumer or {}).items():  # extra librdkafka consumer settings
            self.overrides[f"kafka.consumer.{k}"] = v
        self.overrides.update(overrides or {})
        self.broker_pid = broker_pid
        self.log_level = log_level
        self.result: dict = {}

    def start(self, targets: dict[tuple[str, int], int] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.stop_event = ctx.Event()
        self.conn, child_conn = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=serve, name="bench-aggregator",
                                args=(self.overrides, targets or {}, child_conn,
                                      self.stop_event, self.log_level))
        with lean_main():
            self.proc.start()
        child_conn.close()
        self.poller = DurablePoller(self.data_dir, self.workers).start()
        if targets:
            self.poller.set_targets(targets)
        self.sampler = ProcessSampler({"supervisor": self.proc.pid},
                                      extra={"broker": self.broker_pid}).__enter__()

    def finish(self, timeout: float, on_tick=None) -> dict:
        """Wait for the child's report (stopping it after `timeout`); `on_tick(fraction
        durable)` is called about every 0.2 s."""
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.2):
            if on_tick is not None:
                on_tick(self.poller.fraction())
            if not self.proc.is_alive():
                break
            if time.monotonic() > deadline and not self.stop_event.is_set():
                log.error("aggregator run timed out: stopping it")
                self.stop_event.set()
                deadline += 60
            elif time.monotonic() > deadline + 120:
                self.proc.kill()
                break
        self.result = self.conn.recv() if self.conn.poll(0) else {"code": self.proc.exitcode}
        self.proc.join(30)
        self.sampler.stop()
        self.poller.close()
        return self.result

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def measure_throughput(loaded: wl.Loaded, bootstrap: str, workers: int, oracle: dict, *,
                       embedded: bool, broker_pid: int | None, timeout: float,
                       on_tick=None, overrides: dict | None = None) -> AggRun:
    """Cold start on the pre-loaded topics; time first fetch → last offset durable."""
    from bench.verify import check_views

    run = AggRun(workers)
    p = AggregatorProcess(bootstrap, loaded.prefix, workers, embedded=embedded,
                          broker_pid=broker_pid, overrides=overrides)
    try:
        p.start(loaded.targets)
        res = p.finish(timeout, on_tick)
        t_done = p.poller.t_done
        run.stats = res.get("stats") or {}
        run.records = run.stats.get("consumed", 0)
        run.poller = {"interval_s": p.poller.interval, "polls": p.poller.polls,
                      "mean_poll_ms": round(1000 * p.poller.poll_seconds
                                            / max(1, p.poller.polls), 3)}
        run.memory = p.sampler.summary()
        if run.records:
            run.disk_bytes_per_record = p.sampler.written_total() / run.records
        if res.get("code") != 0:
            run.error = f"aggregator exited with code {res.get('code')}"
            return run
        if not t_done:
            run.error = "the last offsets never became durable in every shard"
            return run
        t_first = res.get("t_first") or p.poller.t_first
        if not res.get("t_first"):  # the consumer hook missed (the supervisor changed?)
            run.window_start = "first offset durable (the fetch hook did not fire)"
        if not t_first:
            run.error = "no start of the throughput window"
            return run
        run.window_s = t_done - t_first
        run.events_per_s = run.records / run.window_s
        run.kafka_committed_s = (res["t_kafka"] - t_first) if res.get("t_kafka") else 0.0
        run.startup_s = t_first - res["t_start"]
        run.cpu_s = {k: round(v, 3) for k, v in p.sampler.cpu_between(t_first, t_done).items()}
        run.cpu_split = p.sampler.cpu_split_between(t_first, t_done)
        service_cpu = sum(v for k, v in run.cpu_s.items() if k != "broker")
        run.cpu_s_per_million = service_cpu / run.records * 1e6
        expected_records = len(loaded.workload.records)
        problems = check_views(p.data_dir, oracle)
        if run.records != expected_records:
            problems.insert(0, f"consumed {run.records} records, produced {expected_records}")
        if run.stats.get("deadlettered"):
            problems.insert(0, f"{run.stats['deadlettered']} records dead-lettered, expected 0")
        run.verified = "PASSED" if not problems else "FAILED: " + "; ".join(problems[:5])
        run.ok = not problems
        if problems:
            run.error = "wrong answer"
        return run
    finally:
        p.cleanup()
