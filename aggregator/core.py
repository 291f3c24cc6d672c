"""Choose the core implementation: compiled ``_core`` or the pure-Python twin ``core_ref``.

The compiled extension is the default and is required: if it cannot be imported this
module raises ImportError instead of silently running the slow twin. Set the environment
variable ``AGGREGATOR_PURE_CORE=1`` to force the twin (debugging, platforms without a
compiler). ``IMPLEMENTATION`` says which one is running ("cython" or "python"); the
service logs it at start-up.
"""

from __future__ import annotations

import importlib
import os

__all__ = [
    "APPLY",
    "FULL",
    "GATE_KEY_MAX",
    "IMPLEMENTATION",
    "JSON_DEPTH",
    "PARK",
    "STALE",
    "BloomFilter",
    "SequenceGate",
    "bloom_size",
    "dedup_keys",
    "gate_batch",
    "gate_keys",
    "json_lossless",
]

PURE_ENV = "AGGREGATOR_PURE_CORE"

if os.environ.get(PURE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    from aggregator.core_ref import (
        APPLY,
        FULL,
        GATE_KEY_MAX,
        JSON_DEPTH,
        PARK,
        STALE,
        BloomFilter,
        SequenceGate,
        bloom_size,
        dedup_keys,
        gate_batch,
        gate_keys,
        json_lossless,
    )

    IMPLEMENTATION = "python"
else:
    try:
        from aggregator._core import (
            APPLY,
            FULL,
            GATE_KEY_MAX,
            JSON_DEPTH,
            PARK,
            STALE,
            BloomFilter,
            SequenceGate,
            bloom_size,
            dedup_keys,
            gate_batch,
            gate_keys,
            json_lossless,
        )
    except ImportError as exc:
        raise ImportError(
            "aggregator: the compiled core (aggregator._core) cannot be imported "
            f"({exc}). Build it with `pip install .` (or `pip install -e .`; needs a C "
            f"compiler and Cython >= 3), or set {PURE_ENV}=1 to run the slow pure-Python "
            "core on purpose."
        ) from exc

    IMPLEMENTATION = "cython"


def compiled(module: str, what: str):
    """The compiled twin ``aggregator.<module>`` of a pure-Python reference, imported (the
    modules that choose between twins as this one does call it); an ImportError that says
    how to build it, or how to run the reference on purpose, when it cannot be imported."""
    try:
        return importlib.import_module(f"aggregator.{module}")
    except ImportError as exc:
        raise ImportError(
            f"aggregator: {what} (aggregator.{module}) cannot be imported ({exc}). Build it "
            f"with `pip install .` (or `pip install -e .`), or set {PURE_ENV}=1 to run the "
            "slow pure-Python pipeline on purpose."
        ) from exc
