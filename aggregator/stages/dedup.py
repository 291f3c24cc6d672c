"""Dedup stage of a worker's batch: every event is applied at most once per shard.

The bloom filter answers "definitely new" for most events; a "maybe" is confirmed against
the exact LMDB index (store.Batch.seen), so a false positive never drops a new event. An id
marked seen goes into the batch's transaction (appended to dedup_live while its generation is
not sealed: store.py, format 4), and with it into the dedup log
(bloom_snapshot.py): a boot restores the saved filter plus the log after it, or rebuilds the
filter from the whole index. After a rollback the filter keeps what the failed attempt added;
the retry only looks those up (`_bloom_again`) and lets the exact index decide.
"""

from __future__ import annotations

import logging
import os
import re
import time

from .. import bloom_snapshot, core
from ..faults import fault_point
from ..protocol import (
    REC_SLOT,
)
from ..store import Batch

log = logging.getLogger("aggregator.worker")  # the worker's log lines, as before the split

SEAL_MIN = 2048  # ids sealed per batch at least (whole slots: a few more)
_MAYBE = re.compile(b"[^\x00]")  # a "maybe" in the bloom filter's flags



class AlwaysMaybe:
    """A bloom filter that answers "maybe" for every id (fault injection: `bloom-maybe`)."""

    def __init__(self, bloom):
        self._bloom = bloom

    def check_and_add(self, hashes: bytes) -> bytes:
        flags = self._bloom.check_and_add(hashes)
        return b"\x01" * len(flags)

    def __getattr__(self, name):
        return getattr(self._bloom, name)


class DedupStage:
    """Worker methods of the dedup stage (the state: `bloom`, `snap_seq`, `dedup_log_*`).
    The filter itself comes from `Worker._new_bloom` (the core the worker module chose).

    `LIVE_DEDUP`: the ids of the generations not sealed yet are appended to dedup_live and
    confirmed from in-memory tables (store.py, format 4); the cluster mode's task worker
    keeps format 3's HOT inserts (its changelog captures them)."""

    LIVE_DEDUP = True

    def _load_bloom(self) -> None:
        """The bloom filter at boot: the saved one plus the dedup log after it, or else
        rebuilt from the whole dedup index (bloom_snapshot.py says when which)."""
        t0 = time.monotonic()
        shard = self.shard
        live = ""
        if self.LIVE_DEDUP:
            n, moved = shard.open_live_dedup()
            live = f"; {n} unsealed ids in memory" + (f" ({moved} moved from the hot key)"
                                                      if moved else "")
        elif shard.close_live_dedup():
            live = "; the unsealed ids of dedup_live moved to the hot key"
        self.shard_token = shard.get_meta("shard_token")
        if self.shard_token is None:
            self.shard_token = os.urandom(16).hex()
            shard.put_meta(shard_token=self.shard_token)
        self.dedup_log_seq = shard.get_meta("dedup_log_seq", 0)
        self.dedup_log_pruned = shard.get_meta("dedup_log_pruned", 0)
        self.bloom = self._new_bloom()
        self.snap_seq: int | None = None  # log seq of the saved filter, once durable
        try:
            seq = bloom_snapshot.load(shard.path, self.bloom, self.shard_token,
                                      self.dedup_log_pruned, self.dedup_log_seq)
            n = 0
            for _, gen, hashes in shard.dedup_log_after(seq):
                self.bloom.load(gen, hashes)
                n += len(hashes) // 16
            self.snap_seq = seq
            self._bloom_loaded = n
            self._bloom_how = f"restored (dedup log {seq}) + {n} ids logged after it"
        except (bloom_snapshot.SnapshotUnusable, ValueError) as e:
            self.bloom = self._new_bloom()
            self._rebuild_bloom()
            self._bloom_how = f"rebuilt from the dedup index ({e})"
        gen_meta = shard.get_meta("bloom_generation", 0)
        while self.bloom.generation < gen_meta:
            self.bloom.rotate()
        self.bloom_saved = gen_meta  # bloom_generation as stored in meta
        self.bloom_dropped = -1  # newest generation dropped from the filter, not yet pruned
        self.ids_unsaved = self._bloom_loaded if self.snap_seq is None else 0
        self._bloom_how += live
        self._bloom_s = time.monotonic() - t0

    def save_bloom(self) -> None:
        """Save the bloom filter (between batches: it holds every id of the committed
        batches, dedup log seq `dedup_log_seq`); the next batch prunes the log up to it."""
        t0 = time.monotonic()
        try:
            size = bloom_snapshot.save(self.shard.path, self.bloom, self.shard_token,
                                       self.dedup_log_seq)
        except OSError as e:  # the filter is an optimisation: boots rebuild it meanwhile
            log.warning("worker %d: cannot save the bloom filter: %s", self.index, e)
            self.ids_unsaved = 0  # not again before as many new ids
            return
        self.snap_seq = self.dedup_log_seq
        self.ids_unsaved = 0
        log.debug("worker %d: bloom filter saved (%d bytes, dedup log %d) in %.3f s",
                  self.index, size, self.snap_seq, time.monotonic() - t0)

    def _rebuild_bloom(self) -> None:
        n = 0
        for gen, hashes in self.shard.dedup_generations():
            self.bloom.load(gen, hashes)
            n += len(hashes) // 16
        self._bloom_loaded = n

    def _dedup(self, batch: Batch, events: list) -> list:
        """The (event, record) pairs of `events` not applied before: bloom first, the exact
        index only for a "maybe"; the new ids marked seen in the batch, in their order.

        Keys and hashes come from one core call per batch (core.dedup_keys) and the ids go
        into the index in one cursor call (Batch.mark_seen_many). An id is a duplicate when
        the exact index has it or an earlier event of this batch has it (what marking each
        id before looking up the next one found)."""
        skeys, hashes = core.dedup_keys(events, REC_SLOT)
        if self.retrying:
            flags = self._bloom_again(hashes)
        else:
            flags = self.bloom.check_and_add(hashes)
        gen = self.bloom.generation
        n = len(events)
        if flags.count(0) == n:  # every id definitely new (no "maybe")
            batch.mark_seen_many(skeys, gen, hashes)
            return list(events)
        first: dict | None = None  # skey -> its first index in the batch
        dups = []
        for m in _MAYBE.finditer(flags):
            i = m.start()
            skey = skeys[i]
            if first is None:
                first = dict(zip(reversed(skeys), range(n - 1, -1, -1)))
            if first[skey] < i or batch.seen(skey):
                dups.append(i)
        if not dups:
            batch.mark_seen_many(skeys, gen, hashes)
            return list(events)
        self.attempt.stats["duplicates"] += len(dups)
        kept: list = []
        new_keys: list = []
        new_hashes = []
        prev = 0
        for d in dups:  # the runs between duplicates
            kept += events[prev:d]
            new_keys += skeys[prev:d]
            new_hashes.append(hashes[16 * prev:16 * d])
            prev = d + 1
        kept += events[prev:]
        new_keys += skeys[prev:]
        new_hashes.append(hashes[16 * prev:])
        batch.mark_seen_many(new_keys, gen, b"".join(new_hashes))
        return kept

    def _bloom_again(self, hashes: bytes) -> bytearray:
        """check_and_add for a batch applied again after a rollback: what the failed attempt
        added is only looked up ("maybe": confirmed by the exact index), so that retries do
        not count the batch into the current generation again (and rotate it early).
        `hashes`: 16-byte hashes joined."""
        flags = self.bloom.contains(hashes)
        new = [i for i, f in enumerate(flags) if not f]
        if new:
            again = self.bloom.check_and_add(b"".join(hashes[16 * i:16 * i + 16] for i in new))
            for i, f in zip(new, again):
                flags[i] = f
        return flags

    def _store_dedup(self, batch: Batch) -> None:
        """The bloom filter's generation (rotated when full; dropped generations pruned from
        the dedup index) and the batch's new ids into the dedup log."""
        if self.bloom.full:
            self.bloom_dropped = max(self.bloom_dropped, self.bloom.rotate())
        if self.bloom.generation != self.bloom_saved:  # also a rotation rolled back before
            batch.put_meta("bloom_generation", self.bloom.generation)
            if self.bloom_dropped >= 0:
                batch.drop_generations(self.bloom_dropped)
                fault_point("dedup_drop")
            self.attempt.bloom_saved = True
        # seal the older generations' ids (store.py) at twice the rate new ones come, so a
        # generation is sealed long before the next one fills
        batch.seal_dedup(self.bloom.generation, SEAL_MIN + 2 * batch.seen_count)
        self._log_seen(batch)

    def _log_seen(self, batch: Batch) -> None:
        """The batch's new dedup ids into the dedup log; the log pruned up to the saved
        bloom filter (bloom_snapshot.py)."""
        n = batch.seen_count
        if n:
            self.attempt.seen_log = (batch.log_seen(self.dedup_log_seq), n)
            batch.put_meta("dedup_log_seq", self.attempt.seen_log[0])
        if self.snap_seq is not None and self.snap_seq > self.dedup_log_pruned:
            batch.prune_dedup_log(self.snap_seq)
            batch.put_meta("dedup_log_pruned", self.snap_seq)
            self.attempt.log_pruned = self.snap_seq
