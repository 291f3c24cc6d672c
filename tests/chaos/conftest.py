"""The chaos suite: faults and bad input against a real broker, real processes and real LMDB
files. Every test here is marked ``chaos``, ``slow`` and ``integration``; the Kafka fixtures
come from tests/support/kafka.py, the harness from tests/support/chaos.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.marks import mark_folder
from tests.support.chaos import ChaosRun

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    mark_folder(items, HERE, "chaos", "slow", "integration")


@pytest.fixture
def chaos(broker, tmp_path):
    """Factory: ``chaos(workload, name=..., workers=2, extra_config=...) -> ChaosRun``; every
    service it started is killed at teardown."""
    runs = []

    def make(workload, **kw):
        run = ChaosRun(broker, tmp_path / f"run{len(runs)}", workload, **kw)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()
