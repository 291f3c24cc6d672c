"""Process-level settings for the long-running service processes (supervisor, workers)."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (owned by anyone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tune_gc(between_batches: bool = False) -> None:
    """Make the cyclic garbage collector cheap on the hot path.

    Each batch allocates hundreds of thousands of short-lived, acyclic containers (records,
    headers, decoded events). With the default gen-0 threshold (700) the collector runs
    thousands of times per second and, through the older generations, keeps re-scanning the
    long-lived state (sequence-gate cache, plan): measured here, msgpack-decoding a batch
    took 22 µs/record with the defaults and 6.8 µs with this setting. Objects that exist
    after boot are moved out of the collector's view (`gc.freeze`).

    ``between_batches`` (the workers): no automatic collection; the worker calls
    `collect_between_batches` once per transaction instead (see there).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    if between_batches:
        gc.disable()


_batches = 0
FULL_EVERY = 256  # batches between full collections


def collect_between_batches() -> int:
    """The collector's work at a batch boundary, for a process whose automatic collection
    is off (`tune_gc(between_batches=True)`): every FULL_EVERY batches a full collection,
    otherwise only `gc.freeze()` (constant time) so that no later collection traverses what
    exists now. Does nothing while automatic collection is on. Returns the objects
    collected.

    Why: inside a batch every container is alive until the batch ends (its records,
    headers, events, documents), so each automatic collection traversed them all and freed
    nothing — 20 generation-0 collections of ~60 ms each per worker in the 2-worker
    benchmark at 400k events, 11 % of its CPU; collecting generation 0 at each boundary
    instead still traversed the next batch's decoded records (~20 ms each). A frozen object
    that is no longer referenced is still freed at once by reference counting; only
    reference cycles (rare here: an exception's traceback) wait for the next full
    collection, which unfreezes everything first."""
    global _batches
    if gc.isenabled():
        return 0
    _batches += 1
    if _batches % FULL_EVERY:
        gc.freeze()
        return 0
    gc.unfreeze()
    n = gc.collect()
    gc.freeze()
    return n


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (PR_SET_PDEATHSIG).

    In a process started by multiprocessing, a parent that died before the signal was armed
    (during the child's start-up imports) makes the child exit at once: it would otherwise
    run on as an orphan of init that no signal ever reaches."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig)
    except OSError:  # pragma: no cover - not Linux
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)
