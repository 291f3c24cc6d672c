"""Choose the envelope parser: compiled ``_envelope.parse`` or the reference ``envelope.parse``.

The same switch as the core (`aggregator.core`): the compiled twin is the default and is
required, and ``AGGREGATOR_PURE_CORE=1`` selects the reference, plain-Python parse
(``aggregator.envelope``, the specification). Both take the same arguments and give equal
`Event`s or the same `EnvelopeError` (reason and message). ``IMPLEMENTATION`` says which
one runs ("cython" or "python").
"""

from __future__ import annotations

from . import core

__all__ = ["IMPLEMENTATION", "parse"]

if core.IMPLEMENTATION == "python":
    from .envelope import parse

    IMPLEMENTATION = "python"
else:
    try:
        from ._envelope import parse
    except ImportError as exc:
        raise ImportError(
            "aggregator: the compiled envelope parser (aggregator._envelope) cannot be "
            f"imported ({exc}). Build it with `pip install .` (or `pip install -e .`), or "
            f"set {core.PURE_ENV}=1 to run the slow pure-Python pipeline on purpose."
        ) from exc

    IMPLEMENTATION = "cython"
