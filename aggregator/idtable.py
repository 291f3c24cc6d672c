"""Choose the unsealed-dedup-id table: compiled ``_idtable`` or the reference ``idtable_ref``
(AGGREGATOR_PURE_CORE=1, as core.py)."""

from __future__ import annotations

import os

from .core import PURE_ENV, compiled

if os.environ.get(PURE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    from .idtable_ref import IdTable
else:
    IdTable = compiled("_idtable", "the compiled dedup id table").IdTable

__all__ = ["IdTable"]
