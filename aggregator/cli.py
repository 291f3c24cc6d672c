"""Command line: `aggregator run`, `demo`, `get`, `stats`, `migrate`.

Every mistake in user input ends in one line on stderr and a documented exit code (see
``EXIT_CODES``), never a traceback: click's parameter types (``Choice``, ``IntRange``,
``Path``) check the options, :class:`~aggregator.config.ConfigError` and
:class:`~aggregator.datadir.DataDirError` become exit 2.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import click

from . import datadir, logs
from .config import ENV_SHORTCUTS, ConfigError, default_config_path, load_config

log = logging.getLogger(__name__)

EXIT_CODES = {
    0: "success (`run`: a clean stop after SIGTERM/SIGINT; `demo`: CHECK PASSED)",
    1: "`get`: no such document; `demo`: CHECK FAILED",
    2: "usage, config or data-dir error; a fatal service error; `demo --serve`: port taken",
}
USAGE_EXIT = 2


def _env_help() -> str:
    from .core import PURE_ENV

    rows = [(name, f"sets {dotted}") for name, dotted in ENV_SHORTCUTS.items()]
    rows += [
        ("AGGREGATOR__SECTION__FIELD", "sets any config field, e.g. "
                                       "AGGREGATOR__SERVICE__UMASK=0027"),
        ("AGGREGATOR_LOG_LEVEL", "--log-level"),
        ("AGGREGATOR_LOG_FORMAT", "--log-format"),
        (PURE_ENV, "=1: the pure-Python core instead of the compiled one"),
        ("AGGREGATOR_FAULTS", "fault injection, for tests only (faults.py)"),
        ("AGGREGATOR_FAULTS_ONCE", "fault injection, for tests only (faults.py)"),
    ]
    width = max(len(n) for n, _ in rows)
    env = "\n".join(f"  {n:<{width}}  {what}" for n, what in rows)
    codes = "\n".join(f"  {c}  {what}" for c, what in EXIT_CODES.items())
    # \b: click keeps the following paragraph's line breaks
    return f"\b\nEnvironment variables:\n{env}\n\n\b\nExit codes:\n{codes}"


_json_errors = False  # --log-format json: errors are log records too


def _fail(message: str, code: int = USAGE_EXIT) -> None:
    """One line (or one line per problem) on stderr, as a log record in JSON mode."""
    if _json_errors:
        log.error("%s", message)
    else:
        click.echo(message, err=True)
    sys.exit(code)


def _load(config_path, workers, data_dir, bootstrap):
    overrides = {}
    if workers is not None:
        overrides["service.workers"] = workers
    if data_dir is not None:
        overrides["service.data_dir"] = data_dir
    if bootstrap is not None:
        overrides["kafka.bootstrap_servers"] = bootstrap
    try:
        return load_config(config_path or default_config_path(), overrides)
    except ConfigError as e:
        _fail(str(e))


def _setup_logging(level: str, fmt: str, role: str = "supervisor") -> int:
    global _json_errors
    logs.setup(level.upper(), fmt, role)
    _json_errors = fmt == "json"
    return logging.getLevelName(level.upper())


class Utf8Text(click.ParamType):
    """A text argument that must be valid UTF-8 (the shell may pass any bytes)."""

    name = "text"

    def convert(self, value, param, ctx):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.fail("is not valid UTF-8 (view names and keys are UTF-8 text)", param, ctx)
        return value


def _config_option(required: bool, default_help: str):
    # no `default=None`: click >= 8.3 counts an explicit None default as a value given
    return click.option("--config", "-c", "config_path", required=required,
                        type=click.Path(dir_okay=False), help=default_help)


_WORKERS = click.IntRange(1, 256)
_DATA_DIR = click.Path(file_okay=False)
_service_options = [
    click.option("--workers", "-w", type=_WORKERS, default=None, help="worker processes"),
    click.option("--data-dir", type=_DATA_DIR, default=None,
                 help="where the shards live (created 0700, see service.umask)"),
    click.option("--bootstrap", default=None, help="Kafka bootstrap servers"),
    click.option("--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False),
                 envvar="AGGREGATOR_LOG_LEVEL", default=None,
                 help="default: INFO for run, WARNING for demo"),
    click.option("--log-format", type=click.Choice(logs.FORMATS), default="text",
                 envvar="AGGREGATOR_LOG_FORMAT", show_default=True,
                 help="json: one JSON object per line (time, level, logger, role, worker, "
                      "message, exception)"),
]


def service_options(f):
    for opt in reversed(_service_options):
        f = opt(f)
    return f


@click.group(epilog=_env_help())
@click.version_option(package_name="aggregator")
def main() -> None:
    """Merge CloudEvents from many Kafka topics into per-key views, exactly once."""


@main.command(epilog=_env_help())
@_config_option(True, "TOML config (required)")
@service_options
def run(config_path, workers, data_dir, bootstrap, log_level, log_format):
    """Run the service against a Kafka cluster until SIGTERM/SIGINT.

    A data dir written by another worker count is resharded first (offline, crash-safe).
    """
    from .supervisor import Supervisor
    from .task_manager import ClusterSupervisor

    level = _setup_logging(log_level or "INFO", log_format)
    cfg = _load(config_path, workers, data_dir, bootstrap)
    datadir.apply_umask(cfg.service.umask)
    try:
        datadir.create(cfg.service.data_dir)
    except datadir.DataDirError as e:
        _fail(str(e))
    mode = datadir.more_open_than(cfg.service.data_dir, cfg.service.umask)
    if mode is not None:
        log.warning("data dir %s has mode %04o, more open than service.umask %04o allows "
                    "(made before, or by hand): new files follow the umask, existing ones "
                    "keep their modes; tighten them with chmod -R", cfg.service.data_dir,
                    mode, cfg.service.umask)
    log.info("config: %s", cfg.kafka.redacted())
    sup_class = ClusterSupervisor if cfg.cluster.enabled else Supervisor
    sys.exit(sup_class(cfg, log_level=level, log_format=log_format).run())


@main.command(epilog=_env_help())
@_config_option(True, "TOML config (required)")
@click.option("--workers", "-w", type=_WORKERS, default=None, help="worker processes")
@click.option("--data-dir", type=_DATA_DIR, default=None, help="the data dir to migrate")
@click.option("--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False),
              envvar="AGGREGATOR_LOG_LEVEL", default="INFO", show_default=True)
def migrate(config_path, workers, data_dir, log_level):
    """Rewrite a data dir in this build's storage format (and worker count), offline.

    Crash-safe like a reshard: killed at any point, the next `migrate` or `run` finishes it
    or starts it again from the untouched old shards. `run` does the same at start; this
    command does it without starting the service. Refused while a service holds the data dir.
    """
    import fcntl
    import os

    from . import reshard

    _setup_logging(log_level, "text")
    cfg = _load(config_path, workers, data_dir, None)
    path = Path(cfg.service.data_dir)
    if not path.is_dir():
        _fail(f"data dir {path} does not exist")
    fd = os.open(path / "LOCK", os.O_RDWR | os.O_CREAT, datadir.FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _fail(f"data dir {path} is in use by a running service")
        try:
            stats = reshard.ensure_layout(cfg, path, cfg.service.workers)
        except reshard.ReshardError as e:
            _fail(f"data dir {path}: {e}")
    finally:
        os.close(fd)
    if stats is None:
        click.echo(f"{path}: already in format {reshard.FORMAT_VERSION} with "
                   f"{cfg.service.workers} workers; nothing to do")
    else:
        click.echo(f"{path}: migrated to format {reshard.FORMAT_VERSION}, "
                   f"{stats.new_workers} workers: {stats.keys} rows in {stats.seconds:.2f} s")


def command_name() -> str:
    """How the user ran this program, for hints they can paste (``.venv/bin/aggregator``,
    ``aggregator`` on PATH, or ``python -m aggregator``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name in ("__main__.py", "-m", "") or argv0.endswith(".py"):
        return f"{shlex.quote(sys.executable)} -m aggregator"
    return shlex.quote(argv0)


@main.command(epilog=_env_help())
@_config_option(False, "TOML config (default: the packaged 7-service example shop.toml)")
@service_options
@click.option("--events", "-n", type=click.IntRange(min=1), default=200_000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--keep", is_flag=True, help="keep the views in ./demo-data (or --data-dir)")
@click.option("--serve", is_flag=True,
              help="afterwards, serve the views over HTTP (http.host/http.port) until Ctrl-C "
                   "(the port is checked first: taken -> exit 2)")
@click.option("--mixed", is_flag=True,
              help="two services don't speak CloudEvents: orders come from an outbox relay, "
                   "payments as plain JSON (their sources get format and mapping)")
def demo(config_path, workers, data_dir, bootstrap, log_level, log_format, events, seed, keep,
         serve, mixed):
    """Embedded broker + 7 simulated services + the aggregator, checked against an oracle."""
    from .devtools.demo import DemoError, run_demo

    level = _setup_logging(log_level or "WARNING", log_format)
    cfg = _load(config_path, workers, data_dir, bootstrap)
    datadir.apply_umask(cfg.service.umask)
    try:
        code = run_demo(cfg, events=events, seed=seed, data_dir=data_dir, keep=keep,
                        serve=serve, log_level=level, log_format=log_format,
                        command=command_name(), mixed=mixed)
    except (DemoError, datadir.DataDirError) as e:
        _fail(str(e))
    sys.exit(code)


_read_options = [
    _config_option(False, "TOML config (default: the packaged example shop.toml); gives the "
                          "view names and service.data_dir"),
    click.option("--data-dir", type=_DATA_DIR, default=None),
    click.option("--workers", "-w", type=_WORKERS, default=None,
                 help="optional: the data dir records its worker count; a mismatch is an error"),
]


def read_options(f):
    for opt in reversed(_read_options):
        f = opt(f)
    return f


def _written_workers(path) -> int:
    """The worker count the shards of ``path`` were written by (datadir.py, "Layout").

    Raises DataDirError when ``path`` is not a directory, holds no stamped shard (a wrong
    path, or a service that never booted there), or holds shards that disagree.
    """
    import lmdb

    from .reshard import ReshardError, current_workers  # heavy imports: only when reading

    path = Path(path)
    if not path.is_dir():
        raise datadir.DataDirError(f"data dir {path}: no such directory")
    try:
        n = current_workers(path)
    except (ReshardError, OSError) as e:
        raise datadir.DataDirError(f"data dir {path}: {e}") from None
    except lmdb.Error as e:
        raise datadir.DataDirError(f"data dir {path}: cannot read its shards: {e}") from None
    if n is None:
        raise datadir.DataDirError(f"data dir {path}: holds no shards (not an aggregator data "
                                   "directory, or no service has started on it yet)")
    return n


def _read_config(config_path, data_dir, workers):
    """The config with ``service.workers`` as the data dir records it (exit 2: no shards,
    or ``--workers`` disagrees)."""
    cfg = _load(config_path, None, data_dir, None)
    path = cfg.service.data_dir
    try:
        n = _written_workers(path)
    except datadir.DataDirError as e:
        _fail(f"error: {e}")
    if workers is not None and workers != n:
        _fail(f"error: data dir {path} was written by {n} workers, not {workers} (--workers); "
              "leave --workers out to use the data dir's count")
    return cfg.model_copy(update={"service": cfg.service.model_copy(update={"workers": n})})


def _views(cfg):
    from .query import QueryError, Views

    views = Views.from_config(cfg)
    try:
        views.check_layout()
    except QueryError as e:
        _fail(f"error: {e}")
    return views


@main.command(epilog=_env_help())
@read_options
@click.option("--full", is_flag=True, help="also print the version and freshness")
@click.argument("view", type=Utf8Text())
@click.argument("key", type=Utf8Text())
def get(config_path, data_dir, workers, full, view, key):
    """Print the document VIEW/KEY as JSON (exit 1 if absent); reads the shards read-only."""
    from .query import UnknownView

    cfg = _read_config(config_path, data_dir, workers)
    with _views(cfg) as views:
        try:
            doc = views.get(view, key)
        except UnknownView as e:
            _fail(f"error: {e} (configured: {', '.join(cfg.views)})")
    if doc is None:
        click.echo(f"no document {key!r} in view {view!r}", err=True)
        sys.exit(1)
    click.echo(json.dumps(doc if full else doc["document"], indent=2, ensure_ascii=False,
                          default=repr))


@main.command(epilog=_env_help())
@read_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def stats(config_path, data_dir, workers, as_json):
    """Per-shard LMDB statistics and totals and, while the service runs, its live counters."""
    from .metrics import live_counters
    from .store import TOTALS

    cfg = _read_config(config_path, data_dir, workers)
    with _views(cfg) as views:
        shards = views.stats()
    live = live_counters(cfg)
    if as_json:
        click.echo(json.dumps({"data_dir": str(cfg.service.data_dir), "shards": shards,
                               "live": live}, indent=2))
        return
    click.echo(f"data_dir {cfg.service.data_dir} ({cfg.service.workers} shards)")
    for st in shards:
        if not st.get("exists"):
            click.echo(f"shard {st['shard']}: no data yet ({st['path']})")
            continue
        entries = ", ".join(f"{k}={v}" for k, v in sorted(st.get("entries", {}).items()))
        click.echo(f"shard {st['shard']}: file {_mib(st['file_bytes'])}, "
                   f"map {_mib(st.get('map_bytes', 0))}, used {_mib(st.get('used_bytes', 0))}; "
                   f"{entries}")
        if "totals" in st:
            click.echo(f"shard {st['shard']} totals: {_totals(st['totals'])}")
    totals = [st["totals"] for st in shards if "totals" in st]
    if totals:  # exact: stored with each batch (store.py, meta "totals")
        click.echo("totals: " + _totals({k: sum(t[k] for t in totals) for k in TOTALS}))
    if live is None:
        click.echo("service: not running (no control block)")
        return
    rows = live["workers"]
    state = "running" if any(r["alive"] for r in rows) else "not running (stale control block)"
    click.echo(f"service: {state}")
    for r in rows:
        counters = ", ".join(f"{k}={v}" for k, v in r.items()
                             if k not in ("worker", "pid", "alive"))
        click.echo(f"worker {r['worker']} pid {r['pid']}{'' if r['alive'] else ' (gone)'}: "
                   f"{counters}")


def _totals(t: dict) -> str:
    """``records=…, applied=…, …`` and since when the shard counts."""
    import time

    from .store import TOTALS

    text = ", ".join(f"{k}={t[k]}" for k in TOTALS)
    if t.get("since"):
        text += time.strftime(" (since %Y-%m-%d %H:%M:%S UTC)", time.gmtime(t["since"] / 1000))
    return text


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


if __name__ == "__main__":
    main()
