"""Views against the oracle (`simulate.expected_views`): a wrong answer fails the run."""

from __future__ import annotations

from pathlib import Path

from aggregator.devtools.demo import compare_views
from aggregator.store import read_views

VIEWS = ["customer", "order", "product"]


# one comparison for the demo and the benchmark
compare = compare_views


def check_views(data_dir: str | Path, expected: dict) -> list[str]:
    """Read every shard of `data_dir` and compare with `expected`."""
    return compare(read_views(data_dir, list(expected) or VIEWS), expected)
