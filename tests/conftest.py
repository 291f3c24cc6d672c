"""Shared pytest setup for every test: markers and the import path. Nothing heavy here."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run from a source checkout without installing: make `import aggregator` find the tree.
if importlib.util.find_spec("aggregator") is None:
    sys.path.insert(0, str(ROOT))

# The broker and service fixtures (lazy: only tests that ask for them start a broker).
pytest_plugins = ["tests.support.kafka"]


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated so a bare `pytest tests/...` knows them.
    config.addinivalue_line("markers", "integration: needs a real Kafka-protocol broker")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "chaos: fault injection against the real system")
    config.addinivalue_line("markers", "long: left out of CI (its 25-minute budget) unless "
                            "AGGREGATOR_LONG_TESTS=1; a variant of a test CI runs")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("AGGREGATOR_LONG_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="long mode: set AGGREGATOR_LONG_TESTS=1 to run it")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)
