"""Command line: `aggregator run`, `demo`, `get`, `stats`."""

from __future__ import annotations

import json
import logging
import sys

import click

from .config import ConfigError, default_config_path, load_config


def _load(config_path, workers, data_dir, bootstrap):
    overrides = {}
    if workers is not None:
        overrides["service.workers"] = workers
    if data_dir is not None:
        overrides["service.data_dir"] = data_dir
    if bootstrap is not None:
        overrides["kafka.bootstrap_servers"] = bootstrap
    try:
        return load_config(config_path, overrides)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)


_common = [
    click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                 default=None, help="TOML config (default: the 7-service example)"),
    click.option("--workers", "-w", type=int, default=None, help="worker processes"),
    click.option("--data-dir", type=click.Path(file_okay=False), default=None),
    click.option("--bootstrap", default=None, help="Kafka bootstrap servers"),
    click.option("--log-level", default="INFO", show_default=True),
]


def common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.group()
@click.version_option(package_name="aggregator")
def main() -> None:
    """Merge CloudEvents from many Kafka topics into per-key views, exactly once."""


@main.command()
@common
def run(config_path, workers, data_dir, bootstrap, log_level):
    """Run the service against a Kafka cluster until SIGTERM/SIGINT.

    A data dir written by another worker count is resharded first (offline, crash-safe).
    """
    from .supervisor import Supervisor

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s supervisor %(levelname)s %(name)s: %(message)s")
    cfg = _load(config_path or default_config_path(), workers, data_dir, bootstrap)
    logging.getLogger(__name__).info("config: %s", cfg.kafka.redacted())
    sys.exit(Supervisor(cfg, log_level=logging.getLevelName(log_level.upper())).run())


@main.command()
@common
@click.option("--events", "-n", type=int, default=200_000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--keep", is_flag=True, help="keep the views in ./demo-data (or --data-dir)")
@click.option("--serve", is_flag=True,
              help="afterwards, serve the views over HTTP (http.host/http.port) until Ctrl-C")
def demo(config_path, workers, data_dir, bootstrap, log_level, events, seed, keep, serve):
    """Embedded broker + 7 simulated services + the aggregator, checked against an oracle."""
    from .demo import run_demo

    logging.basicConfig(level=log_level.upper() if log_level != "INFO" else "WARNING",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _load(config_path or default_config_path(), workers, data_dir, bootstrap)
    sys.exit(run_demo(cfg, events=events, seed=seed, data_dir=data_dir, keep=keep,
                      serve=serve))


_read_options = [
    click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                 default=None, help="TOML config (default: the 7-service example)"),
    click.option("--data-dir", type=click.Path(file_okay=False), default=None),
    click.option("--workers", "-w", type=int, default=None,
                 help="worker count the data dir was written with"),
]


def read_options(f):
    for opt in reversed(_read_options):
        f = opt(f)
    return f


def _views(cfg):
    from .query import QueryError, Views

    views = Views.from_config(cfg)
    try:
        views.check_layout()
    except QueryError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    return views


@main.command()
@read_options
@click.option("--full", is_flag=True, help="also print the version and freshness")
@click.argument("view")
@click.argument("key")
def get(config_path, data_dir, workers, full, view, key):
    """Print the document VIEW/KEY as JSON (exit 1 if absent); reads the shards read-only."""
    from .query import UnknownView

    cfg = _load(config_path or default_config_path(), workers, data_dir, None)
    with _views(cfg) as views:
        try:
            doc = views.get(view, key)
        except UnknownView as e:
            click.echo(f"error: {e} (configured: {', '.join(cfg.views)})", err=True)
            sys.exit(2)
    if doc is None:
        click.echo(f"no document {key!r} in view {view!r}", err=True)
        sys.exit(1)
    click.echo(json.dumps(doc if full else doc["document"], indent=2, ensure_ascii=False,
                          default=repr))


@main.command()
@read_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def stats(config_path, data_dir, workers, as_json):
    """Per-shard LMDB statistics and totals and, while the service runs, its live counters."""
    from .metrics import live_counters
    from .store import TOTALS

    cfg = _load(config_path or default_config_path(), workers, data_dir, None)
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
