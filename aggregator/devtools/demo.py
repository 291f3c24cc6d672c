"""`aggregator demo`: the whole pipeline on an embedded default, checked against an oracle.

1. start a local Kafka-protocol broker (unless kafka.bootstrap_servers is set);
2. create the seven source topics and the dead-letter topic;
3. seven simulated services publish a seeded workload (duplicates and reordering injected,
   plus a few malformed records) while the aggregator runs with the configured workers;
4. stop once every record is durably applied, then print throughput and compare the views
   in LMDB with the expected views computed independently from the simulator's ground truth.

While the live table is drawn, everything written to file descriptor 2 -- log records of
this process and of the workers and HTTP process it spawns, librdkafka's own lines -- is
printed through the table's console (:func:`stderr_to_console`), so it appears above the
table instead of breaking it up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .. import core, datadir
from ..admin import end_offsets
from ..config import Config, SourceConfig
from ..store import read_views
from ..supervisor import Stats, Supervisor
from . import simulate

log = logging.getLogger(__name__)


class DemoError(Exception):
    """The demo cannot run as asked (data dir, port); the message is one line for the user."""


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
        if path.is_dir() and any(path.iterdir()):
            raise DemoError(f"demo: refusing to use non-empty data dir {path} "
                            "(the demo starts from nothing; pass an empty or new directory)")
    elif keep:
        path = DEMO_DIR
        if path.exists():
            if not path.is_dir() or any(path.iterdir()) and not (path / _MARK).exists():
                raise DemoError(f"demo: {path} exists and was not made by the demo; move it")
            shutil.rmtree(path)
    else:
        return Path(tempfile.mkdtemp(prefix="aggregator-demo-")) / "data", True
    datadir.create(path)  # DataDirError: one line
    (path / _MARK).touch()
    return path, False


def check_port(host: str, port: int) -> None:
    """Raise DemoError unless ``host:port`` can be listened on now (for ``--serve``, checked
    before the pipeline runs, and again just before serving)."""
    from ..server import bind

    try:
        bind(host, port).close()
    except OSError as e:
        raise DemoError(f"demo --serve: cannot listen on {host}:{port}: {e.strerror or e} "
                        "(choose another port: http.port in a config, or "
                        "AGGREGATOR__HTTP__PORT)") from None


@contextlib.contextmanager
def stderr_to_console(console: Console):
    """Point file descriptor 2 at a pipe whose lines are printed through ``console``.

    Child processes started inside the block inherit the pipe as their stderr, so their
    log lines (and anything a C library writes) go through the console too; a rich ``Live``
    on that console prints them above its table. Restores fd 2 on exit. Does nothing when
    stderr is not a terminal (then nothing is drawn over)."""
    try:
        is_tty = os.isatty(2)
    except OSError:
        is_tty = False
    if not is_tty or not console.is_terminal:
        yield
        return
    r, w = os.pipe()
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        with os.fdopen(r, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                console.print(Text(line.rstrip("\n")), soft_wrap=True)

    t = threading.Thread(target=pump, name="stderr-to-console", daemon=True)
    t.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # our write end is gone; the pump ends when children's are
        os.close(saved)
        t.join(2.0)


def mixed_config(config: Config) -> Config:
    """`config` with the sources of `simulate.MIXED_SOURCES` reading what those services
    publish in `--mixed` mode (outbox relay, plain JSON); validated like a config file."""
    sources = dict(config.sources)
    for name, settings in simulate.MIXED_SOURCES.items():
        if name not in sources:
            raise DemoError(f"--mixed needs the shop's source {name!r} in the config")
        sources[name] = SourceConfig.model_validate(
            {**sources[name].model_dump(exclude={"format", "mapping"}), **settings})
    out = config.model_copy(update={"sources": sources})
    out.model_post_init(None)  # its topic -> source index (a copy keeps the old one)
    return out


def run_demo(config: Config, *, events: int, seed: int, data_dir: str | None = None,
             keep: bool = False, serve: bool = False, console: Console | None = None,
             log_level: int = logging.WARNING, log_format: str = "text",
             command: str = "aggregator", mixed: bool = False) -> int:
    """Run the demo; 0 when the check passed. ``command``: how the user runs this program,
    for the printed hints. ``mixed``: two services publish in outbox-relay and plain-JSON
    shape (`simulate.MIXED_SOURCES`), and their sources map them. Raises
    DemoError/DataDirError before anything starts when the data dir or (with ``serve``) the
    HTTP port cannot be used."""
    console = console or Console()
    if mixed:
        config = mixed_config(config)
    if serve:
        check_port(config.http.host, config.http.port)
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
        code = _run(run_cfg, bootstrap, events, seed, console, log_level, log_format, mixed)
        if code == 0 and not remove:
            console.print(f"data kept in {path} (try: {command} get customer c-000001 "
                          f"--data-dir {path})", highlight=False, markup=False,
                          soft_wrap=True)  # one line: pasted as one command
        if code == 0 and serve:
            from ..server import BIND_FAILED_EXIT
            from ..server import serve as serve_http

            check_port(config.http.host, config.http.port)  # taken meanwhile?
            url = f"http://{config.http.host}:{config.http.port}"
            console.print(f"serving the views read-only on {url} (e.g. curl "
                          f"'{url}/views/customer?limit=3'); Ctrl-C to stop")
            served = serve_http(config)
            return 2 if served == BIND_FAILED_EXIT else served
        return code
    finally:
        if broker is not None:
            broker.stop()
        if remove:
            shutil.rmtree(path.parent, ignore_errors=True)


def _run(config: Config, bootstrap: str, events: int, seed: int, console: Console,
         log_level: int = logging.WARNING, log_format: str = "text",
         mixed: bool = False) -> int:
    topics = config.topics()
    simulate.ensure_topics(bootstrap, topics + [config.service.dead_letter_topic]
                           + list(config.changes_topics().values()), partitions=4)
    shapes = (" (orders from an outbox relay, payments as plain JSON)" if mixed else "")
    console.print(f"generating {events:,} events from 7 simulated services{shapes} "
                  f"(seed {seed}) ...")
    workload = simulate.generate(seed, events, mixed=mixed)
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

    sup = Supervisor(config, log_level=log_level, log_format=log_format,
                     on_progress=progress, stop_when=stop_when)
    threading.Thread(target=publish, name="simulated-services", daemon=True).start()
    with stderr_to_console(console), live:
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
