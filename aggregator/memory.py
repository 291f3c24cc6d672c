"""The C heap of a service process: how many malloc arenas it has, and giving freed memory back.

Both act on glibc's malloc, which every C library in the process uses (CPython for objects
over 512 bytes, LMDB's dirty pages, msgpack buffers, librdkafka):

- `limit_arenas(n)`: glibc gives each thread that contends for the heap its own arena (up
  to 8 per core), each reserving 64 MiB and keeping what its thread freed. librdkafka runs
  several threads per client (per broker connection, its main and background threads), and
  a service process has one to three clients: their arenas held 20-45 MiB per process at
  400k events (bench/tools/memory_map.py, ``thread_arenas``). `service.malloc_arena_max`
  caps them (``mallopt(M_ARENA_MAX)``); it only acts on arenas created afterwards, so each
  process calls it first thing.
- `trim()`: ``malloc_trim(0)`` returns the free pages inside every arena to the kernel
  (``madvise(MADV_DONTNEED)`` of free chunks, not only the top of the heap). The worker calls
  it after a commit at most every `service.malloc_trim_interval_ms`, the supervisor in its
  loop at the same pace: a transaction's objects are freed at its end, and the pages they
  leave free between live chunks would otherwise stay resident until reused.

Both are no-ops where glibc's functions are missing (another libc, not Linux).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

M_ARENA_MAX = -8  # glibc malloc.h

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            lib = False
        _libc = lib
    return _libc


def limit_arenas(n: int) -> bool:
    """At most `n` malloc arenas in this process (0: leave glibc's default). True when set."""
    lib = _glibc()
    if not n or not lib:
        return False
    return bool(lib.mallopt(M_ARENA_MAX, n))


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
