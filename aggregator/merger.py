"""Choose the merge-op compiler: compiled ``_merge.compile_ops`` or the reference
``merge.compile_ops``.

The same switch as the core (`aggregator.core`): the compiled twin is the default and is
required, and ``AGGREGATOR_PURE_CORE=1`` selects the reference (``aggregator.merge``, the
specification). Both take the same arguments, raise the same `MergeConfigError`, and their
plans give equal documents and the same `MergeError` (tests/test_merge_twins.py).
``IMPLEMENTATION`` says which one runs ("cython" or "python").
"""

from __future__ import annotations

from . import core

__all__ = ["IMPLEMENTATION", "compile_ops"]

if core.IMPLEMENTATION == "python":
    from .merge import compile_ops

    IMPLEMENTATION = "python"
else:
    try:
        from ._merge import compile_ops
    except ImportError as exc:
        raise ImportError(
            "aggregator: the compiled merge ops (aggregator._merge) cannot be imported "
            f"({exc}). Build it with `pip install .` (or `pip install -e .`), or set "
            f"{core.PURE_ENV}=1 to run the slow pure-Python pipeline on purpose."
        ) from exc

    IMPLEMENTATION = "cython"
