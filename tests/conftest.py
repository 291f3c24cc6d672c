"""Shared pytest setup for every test: markers and the import path. Nothing heavy here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
