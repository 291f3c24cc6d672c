"""The cluster suite: several `aggregator run` instances in one consumer group, killed and
added while they run. Every test here is marked ``chaos``, ``slow`` and ``integration``;
the Kafka fixtures come from tests/support/kafka.py, the harness from
tests/support/cluster.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.marks import mark_folder
from tests.support.cluster import ClusterRun

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    mark_folder(items, HERE, "chaos", "slow", "integration")


@pytest.fixture
def cluster(broker, tmp_path):
    """Factory: ``cluster(workload, name=..., tasks=8, workers=2, cluster=True) ->
    ClusterRun``; every instance it started is killed at teardown, its shared memory
    removed."""
    runs = []

    def make(workload, **kw):
        run = ClusterRun(broker, tmp_path / f"run{len(runs)}", workload, **kw)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()
