"""Sequence-gate stage of a worker's batch: per (source, partition key), events in order.

core.SequenceGate decides per event: apply, stale (at or below the last applied), park (ahead
of a gap; parked events are stored in the shard) or full (the park bounds are reached). An
applied event that fills a gap makes its parked successors ready; they are applied right after
it. A gap that overflows or times out is handled by ``gate.gap_policy``: skip it (apply what
is parked) or dead-letter. The gate is a cache of the shard's sequence rows: it is reloaded
after a rollback (`_load_parked`) and rows missing from it are read in the batch.
"""

from __future__ import annotations

import logging
import time

from .. import core
from ..protocol import (
    REC_PARTITION,
    REC_SLOT,
    REC_TOPIC,
)
from ..store import Batch

log = logging.getLogger("aggregator.worker")  # the worker's log lines, as before the split

APPLY, STALE, PARK, FULL = core.APPLY, core.STALE, core.PARK, core.FULL


class GateStage:
    """Worker methods of the sequence-gate stage (the state: `gate`)."""

    def _load_parked(self) -> None:
        """Load every key with parked events into the gate (at boot and after the gate was
        cleared), so that their gaps expire even if the key never sees another event.

        A gap's clock runs only while a worker that could fill it runs: an event parked
        before `_parked_since(g)` (this worker's boot; cluster mode: when it took the
        stream's task) counts as parked then. Otherwise a stop longer than
        `gate.gap_timeout_ms` would skip (or dead-letter) every parked stream at boot,
        before the backlog that may hold the missing events was read."""
        for g, (row, parked, ti) in self.shard.parked_streams().items():
            if not self._stream_here(g):
                continue  # state of a task this instance does not own (now)
            if row is not None:
                last = row[0]
            else:
                last = (self.plan.initial[ti] if ti < len(self.plan.initial) else 1) - 1
            since = self._parked_since(g)
            self.gate.load(g, last, [(seq, max(at, since)) for seq, at in parked])

    def _gate_apply(self, batch: Batch, kept: list) -> None:
        """Pass new events through the sequence gate and apply them (route.py) in their
        order: apply, park or drop (stale); parked successors a gap-filler makes ready
        right after it; an overflowing park by the gap policy (`_on_full`), last: after
        these events, or after the last pass of the transaction when the worker collects
        them (`BatchState.full`, worker.py `_apply`), as one pass over it would."""
        at, gkeys, seqs, tix, modes, streams = core.gate_batch(
            kept, REC_SLOT, REC_TOPIC, REC_PARTITION, self.topics, self.plan.strict)
        ready: list = []
        gk_of: list | dict = gkeys  # position in `kept` -> gate key
        if not at:
            codes = bytearray(len(kept))  # APPLY (no sequence: dedup only)
        else:
            self.attempt.seqpart.update(zip(gkeys, streams))
            self._load_gate(batch, gkeys, tix)
            codes, gready = self.gate.decide(gkeys, seqs, modes, time.time())
            if len(at) < len(kept):  # some without a sequence: APPLY for them
                gcodes, codes = codes, bytearray(len(kept))
                for j, i in enumerate(at):
                    codes[i] = gcodes[j]
                gk_of = dict(zip(at, gkeys))
            ready = [(at[j], g, s) for j, g, s in gready]
        full = self.attempt.full  # the worker's passes over one transaction: after the last
        for i in self._apply_gated(batch, kept, codes, gk_of, ready):
            if full is not None:
                full.append((gk_of[i], *kept[i]))
            else:
                self._on_full(batch, gk_of[i], *kept[i])

    def _apply_gated(self, batch: Batch, kept: list, codes, gk_of, ready: list) -> list:
        """The events of `kept` as the gate decided (`codes`), in their order: applied,
        parked or counted stale; after each, the parked successors it made ready (`ready`:
        (position, gate key, sequence)). Returns the positions whose park was full.
        (_loops.apply_gated is the compiled twin.)"""
        rp = 0
        full = []
        now = time.time()
        for i, (ev, rec) in enumerate(kept):
            code = codes[i]
            if code == APPLY:
                self._apply_event(batch, ev, rec)
            elif code == PARK:
                g = gk_of[i]
                batch.park(g, ev.sequence, now, rec)
                self.attempt.parked[(g, ev.sequence)] = (ev, rec)
            elif code == STALE:
                self.attempt.stats["stale"] += 1
            else:
                full.append(i)
            while rp < len(ready) and ready[rp][0] == i:
                self._apply_parked(batch, ready[rp][1], ready[rp][2])
                rp += 1
        return full

    def _load_gate(self, batch: Batch, gkeys: list[bytes], topic_idx: list[int]) -> None:
        missing = self.gate.missing(gkeys)
        if not missing:
            return
        first_ti = dict(zip(reversed(gkeys), reversed(topic_idx)))  # a key's first topic
        parked = batch.has_parked()  # none stored: no key has parked events to read
        for g in missing:
            row = batch.get_seq(g)
            last = row[0] if row is not None else self.plan.initial[first_ti[g]] - 1
            self.gate.load(g, last, batch.parked_of(g) if parked else ())

    def _apply_parked(self, batch: Batch, g: bytes, seq: int) -> None:
        hit = self.attempt.parked.pop((g, seq), None)
        rec = batch.unpark(g, seq)
        if hit is not None:
            ev, rec = hit
        else:
            if rec is None:
                log.error("worker %d: parked event missing for seq %d", self.index, seq)
                return
            ev = self._parse(rec)
            if ev is None:
                return
        self._apply_event(batch, ev, rec)

    def _on_full(self, batch: Batch, g: bytes, ev, rec) -> None:
        """A sequence ahead of the gap that can no longer be parked: apply the gap policy."""
        if self.gap_policy == "dead-letter":
            self._dead_letter(rec, "sequence_gap_overflow",
                              f"parked-event bound reached; sequence {ev.sequence} not applied")
            return
        self._skip_gap(batch, g)
        codes, ready = self.gate.decide([g], [ev.sequence], b"\x01", time.time())
        if codes[0] == APPLY:
            self._apply_event(batch, ev, rec)
        elif codes[0] == PARK:
            batch.park(g, ev.sequence, time.time(), rec)
            self.attempt.parked[(g, ev.sequence)] = (ev, rec)
        elif codes[0] == FULL:
            self._dead_letter(rec, "sequence_gap_overflow", "parked-event bound reached")
        else:  # older than what the skip applied
            self.attempt.stats["stale"] += 1
        for _, g2, s in ready:
            self._apply_parked(batch, g2, s)

    def _skip_gap(self, batch: Batch, g: bytes) -> None:
        last = self.gate.last(g)
        seqs = self.gate.skip_gap(g)
        if seqs:
            self.attempt.stats["gaps_skipped"] += 1
            log.warning("worker %d: sequence gap skipped for stream %s: last applied %d, "
                        "resuming at %d", self.index, g.hex(), last, seqs[0])
        for s in seqs:
            self._apply_parked(batch, g, s)

    def _expire_gaps_if_due(self) -> None:
        if not self.gate.parked_total:
            return
        expired = self.gate.expired(time.time(), self.gap_timeout)
        if expired:
            self.process([], [])  # the batch path runs _finish, which expires gaps

    def _expire_gaps(self, batch: Batch) -> None:
        if not self.gate.parked_total:
            return
        for g in self.gate.expired(time.time(), self.gap_timeout):
            if not self._stream_here(g, in_batch=True):
                continue  # its task is being handed over: the next owner expires it
            if self.gap_policy == "skip":
                self._skip_gap(batch, g)
            else:
                for s in self.gate.drop_parked(g):
                    rec = batch.unpark(g, s)
                    self.attempt.parked.pop((g, s), None)
                    if rec is not None:
                        self._dead_letter(rec, "sequence_gap_timeout",
                                          f"gap not filled within {self.gap_timeout}s")


# The compiled twin of the loop over the gate's decisions (_loops.pyx), as core.py chooses;
# tests/test_loops.py compares both.
REFERENCE_APPLY_GATED = GateStage._apply_gated
if core.IMPLEMENTATION == "cython":
    GateStage._apply_gated = core.compiled("_loops", "the compiled worker loops").apply_gated
