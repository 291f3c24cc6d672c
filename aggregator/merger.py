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
    compile_ops = core.compiled("_merge", "the compiled merge ops").compile_ops

    IMPLEMENTATION = "cython"
