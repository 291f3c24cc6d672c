"""Views against the oracle (`simulate.expected_views`): a wrong answer fails the run."""

from __future__ import annotations

from pathlib import Path

from aggregator.store import read_views

VIEWS = ["customer", "order", "product"]


def compare(actual: dict, expected: dict) -> list[str]:
    """Human-readable differences; empty when every view document matches."""
    problems = []
    for view in sorted(set(actual) | set(expected)):
        a, e = actual.get(view, {}), expected.get(view, {})
        missing = sorted(set(e) - set(a))
        extra = sorted(set(a) - set(e))
        wrong = sorted(k for k in set(a) & set(e) if a[k] != e[k])
        for label, keys in (("missing", missing), ("unexpected", extra), ("different", wrong)):
            if keys:
                k = keys[0]
                detail = ""
                if label == "different":
                    detail = f": got {a[k]!r:.200}, expected {e[k]!r:.200}"
                problems.append(f"{view}: {len(keys)} {label} documents (e.g. {k!r}{detail})")
    return problems


def check_views(data_dir: str | Path, expected: dict) -> list[str]:
    """Read every shard of `data_dir` and compare with `expected`."""
    return compare(read_views(data_dir, list(expected) or VIEWS), expected)
