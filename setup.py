"""Build the compiled extensions ``aggregator._core``, ``aggregator._envelope``,
``aggregator._frames``, ``aggregator._merge``, ``aggregator._jdoc``, ``aggregator._route``,
``aggregator._loops``, ``aggregator._forwards``, ``aggregator._publish``,
``aggregator._fresh`` and ``aggregator._idtable`` (Cython); metadata lives in pyproject.toml.

The extensions are mandatory: a Cython or C compile error fails the build (no optional
extension, no silent pure-Python install). ``AGGREGATOR_CYTHON_TRACE=1`` makes a debug
build: line tracing and profiling hooks (for coverage and cProfile), an annotated HTML
report next to each .pyx (``aggregator/_core.html``, ...), and no optimisation.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

TRACE = os.environ.get("AGGREGATOR_CYTHON_TRACE", "") == "1"

directives = {
    "language_level": 3,
    "embedsignature": True,
    # Per-function boundscheck/wraparound choices are made in the .pyx itself.
}
macros = []
if sys.platform == "win32":
    compile_args = []
elif TRACE:
    compile_args = ["-O0", "-g"]
else:
    compile_args = ["-O3"]
if TRACE:
    directives.update(linetrace=True, profile=True)
    macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]

extensions = [
    Extension(
        "aggregator._core",
        ["aggregator/_core.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    # the compiled twin of envelope.parse
    Extension(
        "aggregator._envelope",
        ["aggregator/_envelope.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    Extension(
        "aggregator._frames",
        ["aggregator/_frames.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    # the compiled twin of merge.compile_ops (merger.py chooses)
    Extension(
        "aggregator._merge",
        ["aggregator/_merge.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    # a compiled plan's ops applied to a document's canonical JSON bytes (_route.pyx)
    Extension(
        "aggregator._jdoc",
        ["aggregator/_jdoc.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    # the compiled twin of the common path of stages/route.py
    Extension(
        "aggregator._route",
        ["aggregator/_route.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    # the worker's per-record loops (worker.py, stages/gate.py)
    Extension(
        "aggregator._loops",
        ["aggregator/_loops.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    # forwarded view updates between workers (forwards.py: format 2)
    Extension(
        "aggregator._forwards",
        ["aggregator/_forwards.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    # change events produced through confluent-kafka's librdkafka (dlopen'ed at run time)
    Extension(
        "aggregator._publish",
        ["aggregator/_publish.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
        libraries=["dl"],
    ),
    # a stored document's freshness map kept as its msgpack bytes (_route.pyx, _loops.pyx)
    Extension(
        "aggregator._fresh",
        ["aggregator/_fresh.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    # the unsealed dedup ids of a worker (idtable.py chooses between it and idtable_ref)
    Extension(
        "aggregator._idtable",
        ["aggregator/_idtable.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
]

# every core: Cython translates the modules in parallel, and the C compiler builds the
# extensions in parallel (build_ext --parallel), which halves a fresh build on 2 cores
JOBS = os.cpu_count() or 1

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=TRACE,
        # A trace build must not reuse a C file generated without tracing (and back).
        force=True,
        nthreads=JOBS if JOBS > 1 else 0,
    ),
    options={"build_ext": {"parallel": JOBS}},
)
