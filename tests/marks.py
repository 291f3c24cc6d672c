"""Markers for whole test folders (the chaos and cluster suites)."""

from __future__ import annotations

from pathlib import Path

import pytest


def mark_folder(items, folder: Path, *marks: str) -> None:
    """Add `marks` to every collected test below `folder` (a conftest's collection hook)."""
    for item in items:
        if folder in Path(item.path).resolve().parents:
            for m in marks:
                item.add_marker(getattr(pytest.mark, m))
