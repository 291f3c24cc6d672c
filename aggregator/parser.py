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
    parse = core.compiled("_envelope", "the compiled envelope parser").parse

    IMPLEMENTATION = "cython"
