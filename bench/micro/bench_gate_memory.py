"""Heap bytes per stream held by the sequence gate, compiled and pure-Python twins.

Run: ``python -m bench.micro.bench_gate_memory [STREAMS]`` (default 1,000,000). Each twin runs
in a child process of its own: STREAMS 18-byte gate keys (slot prefix + 16 random bytes) are
loaded in batches of 10,000, each batch decided once (strict, in order) and its dirty rows
taken, as the gate stage does; the caller keeps no key. Reported: tracemalloc's traced bytes
after minus before, divided by the streams held (the compiled table allocates through
PyMem_Malloc, which tracemalloc traces).
"""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import tracemalloc

BATCH = 10_000


def measure(impl_name: str, streams: int) -> float:
    if impl_name == "cython":
        from aggregator import _core as impl
    else:
        from aggregator import core_ref as impl
    rng = random.Random(1)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    gate = impl.SequenceGate(1000, 100_000)
    for start in range(0, streams, BATCH):
        keys = [(i % 4096).to_bytes(2, "big") + rng.randbytes(16)
                for i in range(start, min(streams, start + BATCH))]
        for k in keys:
            gate.load(k, 0)
        gate.decide(keys, [1] * len(keys), b"\x01" * len(keys), 1.0)
        gate.dirty()
        del keys
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    return used / len(gate)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "--child":
        print(f"{measure(argv[1], int(argv[2])):.1f}")
        return
    streams = int(argv[0]) if argv else 1_000_000
    for name in ("cython", "python"):
        out = subprocess.run([sys.executable, "-m", "bench.micro.bench_gate_memory", "--child",
                              name, str(streams)], check=True, capture_output=True, text=True)
        print(f"{name}: {streams:,} streams, {out.stdout.strip()} heap bytes per stream")


if __name__ == "__main__":
    main(sys.argv[1:])
