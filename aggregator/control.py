"""Layout of the shared control block: one row of 64-bit counters per worker.

Each slot has exactly one writer (the worker of its row), so plain loads and stores suffice.
The supervisor reads acks, heartbeats and statistics from it; workers read each other's link
counters from it to know what their peers have durably applied.
"""

from __future__ import annotations

import time
from enum import IntEnum

from .ring import SharedCounters


class Slot(IntEnum):
    """Per-worker counters (the fixed part of a row)."""

    ACK_BATCH = 0  # highest supervisor batch id durably committed
    HEARTBEAT = 1  # CLOCK_MONOTONIC ns of the last loop iteration
    # raised once the worker has booted and reset its inbound rings: to its shard's writer
    # epoch (store.Shard.claim_writer); a worker finding a newer one here is fenced
    EPOCH = 2
    PID = 3
    # RECORDS..FORWARDED (TOTAL_SLOTS) mirror the shard's committed totals (store.TOTALS)
    RECORDS = 4  # Kafka records received
    APPLIED = 5  # events applied (each once)
    DUPLICATES = 6  # dropped by dedup
    STALE = 7  # dropped by the sequence gate (at or below the last applied)
    PARKED = 8  # currently parked (gauge)
    GAPS_SKIPPED = 9
    DEADLETTERED = 10
    FORWARDED = 11  # view updates sent to another shard
    COMMITS = 12
    COMMIT_NS = 13  # total ns spent in LMDB commits
    CHANGES_BACKLOG = 14  # change events committed but not yet delivered (gauge)
    STORAGE_BLOCKED = 15  # errno the data disk refused the last commit with, 0 once it succeeds
    STORAGE_ERRORS = 16  # transactions the data disk refused (each retried)
    RESTORE_DONE = 17  # cluster mode: the last restore/drop request id handled
    RESTORE_RECORDS = 18  # cluster mode: changelog records read by restores
    RESTORE_BYTES = 19  # cluster mode: changelog bytes (keys + values) read by restores
    _FIXED = 20


# The slots that mirror a shard's totals (store.TOTALS, in that order): the worker sets them
# from the totals it committed, so they count since the data dir began, not since the start.
TOTAL_SLOTS = (Slot.RECORDS, Slot.APPLIED, Slot.DUPLICATES, Slot.STALE, Slot.GAPS_SKIPPED,
               Slot.DEADLETTERED, Slot.FORWARDED)


class ControlBlock:
    """Typed access to the counters of all workers."""

    def __init__(self, counters: SharedCounters, workers: int):
        self.counters = counters
        self.workers = workers
        self.stride = Slot._FIXED + 2 * workers

    @staticmethod
    def size(workers: int) -> int:
        return workers * (Slot._FIXED + 2 * workers)

    @classmethod
    def create(cls, name: str, workers: int) -> ControlBlock:
        return cls(SharedCounters.create(name, cls.size(workers)), workers)

    @classmethod
    def attach(cls, name: str, workers: int) -> ControlBlock:
        return cls(SharedCounters.attach(name), workers)

    def get(self, worker: int, slot: int) -> int:
        return self.counters.get(worker * self.stride + slot)

    def set(self, worker: int, slot: int, value: int) -> None:
        self.counters.set(worker * self.stride + slot, value)

    def add(self, worker: int, slot: int, delta: int) -> None:
        self.counters.add(worker * self.stride + slot, delta)

    # Link counters: worker `src` forwards view updates to worker `dst` with link sequence numbers.
    def link_committed(self, src: int, dst: int) -> int:
        """Highest link seq `src` has durably written to its outbox for `dst` (writer: src)."""
        return self.counters.get(src * self.stride + Slot._FIXED + dst)

    def set_link_committed(self, src: int, dst: int, seq: int) -> None:
        self.counters.set(src * self.stride + Slot._FIXED + dst, seq)

    def link_applied(self, dst: int, src: int) -> int:
        """Highest link seq from `src` that `dst` has durably applied (writer: dst)."""
        return self.counters.get(dst * self.stride + Slot._FIXED + self.workers + src)

    def set_link_applied(self, dst: int, src: int, seq: int) -> None:
        self.counters.set(dst * self.stride + Slot._FIXED + self.workers + src, seq)

    def heartbeat(self, worker: int) -> None:
        self.set(worker, Slot.HEARTBEAT, time.monotonic_ns())

    def close(self) -> None:
        self.counters.close()
