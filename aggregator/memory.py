"""Giving the C heap's freed pages back to the kernel (glibc's ``malloc_trim``).

Every C library in a service process allocates from glibc's malloc: CPython for objects over
512 bytes, msgpack and orjson buffers, librdkafka's fetch and produce buffers (in its
threads' arenas). free() returns memory to the kernel only from the top of a heap, so the
pages a transaction's objects leave free between chunks that live on stay resident until
malloc reuses them. ``malloc_trim(0)`` releases the free pages inside every arena
(``madvise(MADV_DONTNEED)`` of free chunks, not only the top).

The worker calls `Trimmer.maybe` after a commit and the supervisor in its loop, at most
every `service.malloc_trim_interval_ms` (a call takes ~1 ms). Measured with
bench/tools/memory_map.py (2 workers, 400k events) it takes 10-40 MiB off the RSS sum; it
does not touch what stays allocated (LMDB keeps the dirty pages of its largest
transaction on its own free list, which malloc_trim cannot release). Also tried and not
kept: ``mallopt(M_ARENA_MAX, 2)`` (librdkafka's threads sharing one arena) changed nothing
measurable.

A no-op where glibc's function is missing (another libc, not Linux).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            lib = False
        _libc = lib
    return _libc


def trim() -> bool:
    """Give the free pages of every malloc arena back to the kernel. True when some were."""
    lib = _glibc()
    return bool(lib and lib.malloc_trim(0))


class Trimmer:
    """`maybe()` trims at most once per `interval_ms` (0: never); `trims` counts them."""

    __slots__ = ("interval", "next_at", "trims", "seconds")

    def __init__(self, interval_ms: int) -> None:
        self.interval = interval_ms / 1000.0
        self.next_at = 0.0
        self.trims = 0
        self.seconds = 0.0  # time spent in malloc_trim

    def maybe(self) -> bool:
        if not self.interval:
            return False
        now = time.monotonic()
        if now < self.next_at:
            return False
        trim()
        done = time.monotonic()
        self.trims += 1
        self.seconds += done - now
        self.next_at = done + self.interval
        return True
