"""`aggregator demo`: the whole pipeline on an embedded default, checked against an oracle.

1. start a local Kafka-protocol broker (unless kafka.bootstrap_servers is set);
2. create the seven source topics and the dead-letter topic;
3. seven simulated services publish a seeded workload (duplicates and reordering injected,
   plus a few malformed records) while the aggregator runs with the configured workers;
4. stop once every record is durably applied, then print throughput and compare the views
   in LMDB with the expected views computed independently from the simulator's ground truth.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import core, simulate
from .broker import end_offsets
from .config import Config
from .store import read_views
from .supervisor import Stats, Supervisor

log = logging.getLogger(__name__)


def compare_views(actual: dict, expected: dict) -> list[str]:
    """Human-readable differences (empty when the views match)."""
    problems = []
    for view in sorted(set(actual) | set(expected)):
        a, e = actual.get(view, {}), expected.get(view, {})
        missing = sorted(set(e) - set(a))
        extra = sorted(set(a) - set(e))
        wrong = sorted(k for k in set(a) & set(e) if a[k] != e[k])
        for label, keys in (("missing", missing), ("unexpected", extra), ("different", wrong)):
            if keys:
                sample = keys[0]
                detail = ""
                if label == "different":
                    detail = f": got {a[sample]!r:.200}, expected {e[sample]!r:.200}"
                problems.append(f"{view}: {len(keys)} {label} documents (e.g. {sample!r}{detail})")
    return problems


def _table(stats: Stats, produced: int, total: int, elapsed: float) -> Table:
    t = Table(title="aggregator demo", show_header=False)
    t.add_row("published", f"{produced:,} / {total:,}")
    t.add_row("consumed", f"{stats.consumed:,}")
    t.add_row("applied", f"{stats.applied:,}")
    t.add_row("duplicates dropped", f"{stats.duplicates:,}")
    t.add_row("stale dropped", f"{stats.stale:,}")
    t.add_row("parked now", f"{stats.parked:,}")
    t.add_row("dead-lettered", f"{stats.deadlettered:,}")
    t.add_row("forwarded between shards", f"{stats.forwarded:,}")
    t.add_row("events/s", f"{stats.consumed / elapsed:,.0f}" if elapsed > 0 else "-")
    return t


DEMO_DIR = Path("demo-data")
_MARK = ".aggregator-demo"


def _demo_dir(data_dir: str | None, keep: bool) -> tuple[Path, bool]:
    """(data dir, remove afterwards). The demo never reuses state: its broker is new."""
    if data_dir is not None:
        path = Path(data_dir)
        if path.exists() and any(path.iterdir()):
            raise SystemExit(f"demo: refusing to use non-empty data dir {path} "
                             "(the demo starts from nothing; pass an empty or new directory)")
    elif keep:
        path = DEMO_DIR
        if path.exists():
            if any(path.iterdir()) and not (path / _MARK).exists():
                raise SystemExit(f"demo: {path} exists and was not made by the demo; move it")
            shutil.rmtree(path)
    else:
        return Path(tempfile.mkdtemp(prefix="aggregator-demo-")) / "data", True
    path.mkdir(parents=True, exist_ok=True)
    (path / _MARK).touch()
    return path, False


def run_demo(config: Config, *, events: int, seed: int, data_dir: str | None = None,
             keep: bool = False, serve: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    path, remove = _demo_dir(data_dir, keep or serve)
    broker = None
    bootstrap = config.kafka.bootstrap_servers
    if not bootstrap:
        from .broker import EmbeddedBroker

        broker = EmbeddedBroker().start()
        bootstrap = broker.bootstrap_servers
        # a local single-member group: join in ~3 s instead of half of the default 45 s
        consumer = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
                    **config.kafka.consumer}
        config = config.model_copy(update={
            "kafka": config.kafka.model_copy(update={"consumer": consumer})})
        console.print(f"embedded Kafka-protocol broker on {bootstrap}")
    config = config.model_copy(update={
        "kafka": config.kafka.model_copy(update={"bootstrap_servers": bootstrap}),
        "service": config.service.model_copy(update={"data_dir": path}),
    })
    # the pipeline's own HTTP API takes any free port; --serve uses the configured one
    run_cfg = config.model_copy(update={"http": config.http.model_copy(update={"port": 0})})
    try:
        code = _run(run_cfg, bootstrap, events, seed, console)
        if code == 0 and not remove:
            console.print(f"data kept in {path} (try: aggregator get customer c-000001 "
                          f"--data-dir {path} --workers {config.service.workers})")
        if code == 0 and serve:
            from .server import serve as serve_http

            url = f"http://{config.http.host}:{config.http.port}"
            console.print(f"serving the views read-only on {url} (e.g. curl "
                          f"'{url}/views/customer?limit=3'); Ctrl-C to stop")
            return serve_http(config)
        return code
    finally:
        if broker is not None:
            broker.stop()
        if remove:
            shutil.rmtree(path.parent, ignore_errors=True)


def _run(config: Config, bootstrap: str, events: int, seed: int, console: Console) -> int:
    topics = config.topics()
    simulate.ensure_topics(bootstrap, topics + [config.service.dead_letter_topic]
                           + list(config.changes_topics().values()), partitions=4)
    console.print(f"generating {events:,} events from 7 simulated services (seed {seed}) ...")
    workload = simulate.generate(seed, events)
    bad = simulate.bad_records()
    records = list(workload.records) + [tuple(b[:4]) for b in bad]
    console.print(f"{workload!r}; plus {len(bad)} malformed records")

    produced = [0]
    done = threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            step = 20_000
            for i in range(0, len(records), step):
                simulate.produce(records[i:i + step], bootstrap)
                produced[0] = min(i + step, len(records))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            done.set()

    targets: dict = {}
    t_first = [0.0]
    t_done = [0.0]

    def stop_when(stats: Stats) -> bool:
        if stats.consumed and not t_first[0]:
            t_first[0] = time.monotonic()
        if errors:
            return True
        if not done.is_set():
            return False
        if not targets:
            index = {t: i for i, t in enumerate(topics)}
            targets.update(((index[t], p), high)
                           for (t, p), high in end_offsets(bootstrap, topics).items())
        if all(stats.committed.get(tp, 0) >= high for tp, high in targets.items() if high):
            t_done[0] = time.monotonic()
            return True
        return False

    live = Live(console=console, refresh_per_second=4, transient=False)
    started = time.monotonic()

    def progress(stats: Stats) -> None:
        live.update(_table(stats, produced[0], len(records),
                           time.monotonic() - (t_first[0] or started)))

    sup = Supervisor(config, log_level=logging.WARNING, on_progress=progress,
                     stop_when=stop_when)
    threading.Thread(target=publish, name="simulated-services", daemon=True).start()
    with live:
        code = sup.run()
    if errors:
        console.print(f"[red]publishing failed: {errors[0]}[/red]")
        return 1
    if code != 0:
        console.print(f"[red]aggregator exited with code {code}[/red]")
        return code
    elapsed = (t_done[0] or time.monotonic()) - (t_first[0] or started)
    s = sup.stats
    console.print(
        f"\n[bold]{s.consumed:,} records in {elapsed:.2f} s = {s.consumed / elapsed:,.0f} events/s"
        f"[/bold] with {config.service.workers} workers (core: {core.IMPLEMENTATION}); "
        f"applied {s.applied:,}, duplicates dropped {s.duplicates:,}, stale dropped "
        f"{s.stale:,}, dead-lettered {s.deadlettered:,}")
    actual = read_views(config.service.data_dir, list(config.views))
    expected = simulate.expected_views(workload)
    problems = compare_views(actual, expected)
    counts = ", ".join(f"{v}: {len(actual.get(v, {})):,}" for v in expected)
    if problems:
        console.print("[red bold]CHECK FAILED[/red bold]: views differ from the oracle")
        for p in problems:
            console.print(f"  [red]{p}[/red]")
        return 1
    if s.deadlettered != len(bad):
        console.print(f"[red bold]CHECK FAILED[/red bold]: {s.deadlettered} dead-lettered, "
                      f"expected {len(bad)}")
        return 1
    console.print(f"[green bold]CHECK PASSED[/green bold]: every view document equals the "
                  f"independently computed expectation ({counts}); "
                  f"{len(bad)} malformed records dead-lettered")
    return 0
