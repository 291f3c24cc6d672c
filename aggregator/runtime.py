"""Process-level settings for the long-running service processes (supervisor, workers)."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap on the hot path.

    Each batch allocates hundreds of thousands of short-lived, acyclic containers (records,
    headers, decoded events). With the default gen-0 threshold (700) the collector runs
    thousands of times per second and, through the older generations, keeps re-scanning the
    long-lived state (sequence-gate cache, plan): measured here, msgpack-decoding a batch
    took 22 µs/record with the defaults and 6.8 µs with this setting. Objects that exist
    after boot are moved out of the collector's view (`gc.freeze`).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


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
