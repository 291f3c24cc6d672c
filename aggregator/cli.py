"""Command line: `aggregator run`, `aggregator demo`."""

from __future__ import annotations

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
    """Run the service against a Kafka cluster until SIGTERM/SIGINT."""
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
@click.option("--keep", is_flag=True, help="keep the data dir (service.data_dir) afterwards")
def demo(config_path, workers, data_dir, bootstrap, log_level, events, seed, keep):
    """Embedded broker + 7 simulated services + the aggregator, checked against an oracle."""
    from .demo import run_demo

    logging.basicConfig(level=log_level.upper() if log_level != "INFO" else "WARNING",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _load(config_path or default_config_path(), workers, data_dir, bootstrap)
    sys.exit(run_demo(cfg, events=events, seed=seed, keep=keep or data_dir is not None))


if __name__ == "__main__":
    main()
