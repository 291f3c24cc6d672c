"""A worker process: owns one LMDB shard and applies every event routed to it exactly once.

Per batch (one LMDB write transaction):

1. skip records at or below this shard's through-offset of their partition (redelivery);
2. parse the CloudEvent (or map a record of an outbox/JSON source, mapping.py);
   malformed → dead-letter;
3. dedup: the bloom filter answers "definitely new" for most events; a "maybe" is confirmed
   against the exact LMDB index, so a false positive never drops a new event;
4. sequence gate per (source, partition key): apply / stale / park, then drain parked
   successors; gap policy for overflowing or timed-out gaps;
5. merge into view documents owned by this shard, or write the update to the outbox of the
   shard that owns the view key (forwarded after commit, applied there exactly once by link
   sequence number);
6. store through-offsets, link sequences, sequence state and the shard's totals (what the
   batch counted added to meta ``totals``: exact through any crash), then commit;
   acknowledge the batch and publish the totals to the supervisor through the control block.

A transaction that fails keeps nothing, and the same messages are applied again from step 1
(nothing is acknowledged before the commit, so the supervisor's Kafka commit cannot pass it):
after growing the map (MAP_FULL; at service.lmdb_max_map_size the worker stops with a fatal
error), or, when the data disk is full, read-only or failing, after a pause (0.5 s doubling to
5 s) for as long as it takes. Meanwhile the worker heartbeats, shows the errno in the control
block (Slot.STORAGE_BLOCKED: a metric, and /readyz is not ready) and its ring fills up, which
pauses the Kafka partitions.

Fencing: at boot the worker claims its shard (store.Shard.claim_writer, a new writer epoch)
and publishes the epoch in the control block. A worker that finds a newer epoch, in the
shard when it begins a transaction or in the control block (`_check_fence`), raises Fenced
and exits with FENCED_EXIT without writing, reading its rings or publishing anything.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import lmdb

from . import bloom_snapshot, core
from .batch_state import BatchState
from .changes import ChangeEncoder, ChangePublisher
from .config import Config
from .control import TOTAL_SLOTS, ControlBlock, Slot
from .deadletter import DeadLetters
from .envelope import EnvelopeError, parse
from .faults import fault_flag, fault_point
from .mapping import apply as apply_mapping
from .mapping import plans_by_topic
from .merge import MergeError, get_path
from .metrics import record_commit
from .plan import Feed, ViewPlan, assign_view_ids
from .protocol import (
    MSG_FORWARD,
    MSG_STOP,
    REC_HEADERS,
    REC_KEY,
    REC_OFFSET,
    REC_PARTITION,
    REC_SLOT,
    REC_TIMESTAMP,
    REC_TOPIC,
    REC_VALUE,
    UPD_FEED,
    UPD_KEY,
    UPD_SLOT,
    Forwarded,
    hist_segment_name,
    pack,
    ring_names,
    unpack,
)
from .ring import Ring, SharedCounters
from .routing import SLOTS, gate_hash, identity_hash, slot_of, slot_prefix, worker_of
from .store import (
    TOTALS,
    Batch,
    Fenced,
    Shard,
    ShardError,
    shard_path,
    storage_errno,
    storage_message,
    view_key,
)

log = logging.getLogger(__name__)

APPLY, STALE, PARK, FULL = core.APPLY, core.STALE, core.PARK, core.FULL
TXN_MAX_BYTES = 4 << 20  # ring bytes taken into one transaction (bounds its duration)
# after a boot the first transaction takes this much, doubling per commit up to TXN_MAX_BYTES:
# a replacement commits (acknowledges, moves the Kafka commit) soon after it booted
FIRST_TXN_BYTES = 128 << 10
STORAGE_RETRY_S = (0.5, 5.0)  # pause before retrying a batch the data disk refused: min, max
STORAGE_LOG_EVERY_S = 60.0  # while blocked, how often the error is logged again

class AlwaysMaybe:
    """A bloom filter that answers "maybe" for every id (fault injection: `bloom-maybe`)."""

    def __init__(self, bloom):
        self._bloom = bloom

    def check_and_add(self, hashes: bytes) -> bytes:
        flags = self._bloom.check_and_add(hashes)
        return b"\x01" * len(flags)

    def __getattr__(self, name):
        return getattr(self._bloom, name)


class Worker:
    """One shard's worker in normal mode: the shard is this worker's alone, and view updates
    for keys of other shards go to their workers through the peer rings.
    `task_worker.TaskWorker` is the cluster-mode variant (the hooks below)."""

    def __init__(self, config: Config, index: int, prefix: str):
        self.cfg = config
        self.index = index
        self.workers = config.service.workers
        self.prefix = prefix
        svc = config.service
        self.max_bytes = svc.max_record_bytes
        self.max_key = svc.max_key_bytes
        self.stopping = False
        self.txn_bytes = FIRST_TXN_BYTES  # ring bytes of the next transaction (slow start)
        # new dedup ids after which the bloom filter is saved again: a boot reads at most
        # these from the dedup log (bloom_snapshot.py)
        self.save_bloom_every = max(config.dedup.bloom_capacity // 8, 10_000)
        self.retrying = False  # applying again a batch whose transaction was rolled back
        self.shard_broken = False  # MDB_PANIC: the environment must be reopened
        self.dlq_delivered: set[tuple] = set()  # dead letters of the batch already delivered
        self.attempt: BatchState | None = None  # the current attempt at a batch (process)
        self.blocked_since = self.blocked_log_at = 0.0
        self.blocked_code = 0

    # ---- boot ---------------------------------------------------------------------------
    def boot(self) -> None:
        cfg, svc = self.cfg, self.cfg.service
        self.shard = Shard(shard_path(svc.data_dir, self.index), map_size=svc.lmdb_map_size,
                           max_map_size=svc.lmdb_max_map_size, sync=svc.lmdb_sync)
        self.shard.check_layout(shard=self.index, workers=self.workers, slots=SLOTS)
        self.epoch = self.shard.claim_writer()  # fences a previous worker; read state after
        views = assign_view_ids(self.shard.get_meta("views"), list(cfg.views))
        self._check_fingerprint(cfg.fingerprint())
        self.shard.put_meta(views=views, fingerprint=cfg.fingerprint())
        self.plan = ViewPlan(cfg, {v: i for i, v in enumerate(views)})
        self.changes = ChangeEncoder(cfg, views)
        self.change_seq = max(self.shard.last_change_seq(), self.shard.get_meta("change_seq", 0))
        self.changes_pruned = self.shard.get_meta("changes_published", 0)
        self.publisher = None
        if self.changes.enabled:
            self.publisher = ChangePublisher(cfg, self.changes, self.shard.changes_after,
                                             self.changes_pruned, self.change_seq)
        self.totals = self.shard.totals()  # exact: stored with every batch (_finish)
        self.topics = list(self.plan.topics)
        # topic indexes of the sources with structured = "detect" (envelope.parse)
        self.detect = frozenset(i for i, t in enumerate(self.topics)
                                if cfg.source_by_topic(t)[1].structured == "detect")
        # per topic index: the input mapping of a non-CloudEvents source (mapping.py)
        self.maps = plans_by_topic(cfg, self.topics)
        self.key_owners = self.workers  # what owns view keys: worker_of(slot, key_owners)
        self._boot_tasks()
        self.topic_index = {t: i for i, t in enumerate(self.topics)}

        self._load_bloom()
        if fault_flag("bloom-maybe"):  # chaos tests: every id goes to the exact index
            self.bloom = AlwaysMaybe(self.bloom)
        g = cfg.gate
        self.gate = core.SequenceGate(g.max_parked_per_key, g.max_parked_total)
        self.gap_timeout = g.gap_timeout_ms / 1000.0
        self.gap_policy = g.gap_policy
        self._load_parked()

        self.through: dict[tuple[int, int], int] = {}
        for (topic, part), off in self.shard.offsets().items():
            ti = self.topic_index.get(topic)
            if ti is not None:
                self.through[(ti, part)] = off
        self.link_in = self.shard.links()  # source worker -> last applied link seq
        # The outbox is pruned up to what the peer applied, so it may be empty: the last link
        # seq used is also kept in meta "link_out" (a restart must not start again at 1).
        saved = self.shard.get_meta("link_out", {})
        self.link_out = {j: max(self.shard.last_outbox_seq(j), saved.get(j, 0))
                         for j in range(self.workers) if j != self.index}

        names = ring_names(self.prefix, self.workers)
        self.ctl = ControlBlock.attach(names["control"], self.workers)
        self.hist = SharedCounters.attach(hist_segment_name(self.prefix))
        self.inbound = Ring.attach(names["inbound"][self.index])
        self.peer_in = {j: Ring.attach(names["peer"][(j, self.index)])
                        for j in range(self.workers) if j != self.index}
        self.peer_out = {j: Ring.attach(names["peer"][(self.index, j)])
                         for j in range(self.workers) if j != self.index}
        for r in self.peer_in.values():
            r.reset_consumer()
        ctl, me = self.ctl, self.index
        for j in self.peer_in:
            ctl.set_link_applied(me, j, self.link_in.get(j, 0))
        for j, seq in self.link_out.items():
            ctl.set_link_committed(me, j, seq)
        self.peer_epoch = {j: -1 for j in self.peer_out}
        self.sent: dict[int, int] = {j: 0 for j in self.peer_out}
        self.unsent: dict[int, deque] = {j: deque() for j in self.peer_out}
        self.pruned = {j: 0 for j in self.peer_out}
        self.dlq = DeadLetters(cfg, self.topics)
        self.dlq.warm_up()  # a replayed first batch may dead-letter: no connect then
        ctl.set(me, Slot.PID, os.getpid())
        self._publish_totals()  # what a predecessor committed but did not publish, too
        ctl.set(me, Slot.PARKED, self.gate.parked_total)
        ctl.heartbeat(me)
        # the shard's writer epoch (it only grows); a worker that finds another value in its
        # row was replaced (_check_fence)
        self.ctl_epoch = max(self.epoch, ctl.get(me, Slot.EPOCH) + 1)
        ctl.set(me, Slot.EPOCH, self.ctl_epoch)
        log.info("worker %d booted: core=%s, bloom filter %s (%d ids read, %.3f s), %d bloom "
                 "generations, %d partitions", me, core.IMPLEMENTATION, self._bloom_how,
                 self._bloom_loaded, self._bloom_s, len(self.bloom.live_generations),
                 len(self.through))

    def _check_fingerprint(self, fingerprint: str) -> None:
        """Outbox messages name feeds and parked records name topics by their position in the
        config: a changed config must not meet such records (drain with the old one first)."""
        old = self.shard.get_meta("fingerprint")
        if old is None or old == fingerprint:
            return
        pending = self.shard.stat()
        if pending["outbox"] or pending["parked"]:
            raise ShardError(
                f"{self.shard.path}: sources or views changed since the last run while "
                f"{pending['outbox']} forwarded updates and {pending['parked']} parked events "
                "are pending; run once more with the previous config and stop it cleanly "
                "(SIGTERM), or start from a new data_dir")
        log.warning("worker %d: sources or views changed since the last run", self.index)

    def _new_bloom(self):
        d = self.cfg.dedup
        return core.BloomFilter(d.bloom_capacity, d.bloom_fp_rate, d.bloom_generations)

    def _load_bloom(self) -> None:
        """The bloom filter at boot: the saved one plus the dedup log after it, or else
        rebuilt from the whole dedup index (bloom_snapshot.py says when which)."""
        t0 = time.monotonic()
        shard = self.shard
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
        buf: list[bytes] = []
        current = None
        n = 0
        for gen, h in self.shard.dedup_entries():
            if gen != current and buf:
                self.bloom.load(current, b"".join(buf))
                buf.clear()
            current = gen
            buf.append(h)
            n += 1
        if buf:
            self.bloom.load(current, b"".join(buf))
        self._bloom_loaded = n

    def _load_parked(self) -> None:
        """Load every key with parked events into the gate (at boot and after the gate was
        cleared), so that their gaps expire even if the key never sees another event."""
        for g, (row, parked, ti) in self.shard.parked_streams().items():
            if not self._stream_here(g):
                continue  # state of a task this instance does not own (now)
            if row is not None:
                last = row[0]
            else:
                last = (self.plan.initial[ti] if ti < len(self.plan.initial) else 1) - 1
            self.gate.load(g, last, parked)

    # ---- what cluster mode changes (task_worker.TaskWorker) --------------------------------
    def _boot_tasks(self) -> None:
        """Boot: set up what the variant needs before the shard's state is loaded."""

    def _stream_here(self, g: bytes, in_batch: bool = False) -> bool:
        """Is the sequence stream `g` (gate key) this worker's to load and expire?"""
        return True

    def _process_ring(self, msgs: list, peers: list) -> bool:
        """Apply messages taken from the rings (peers still packed); True when told to stop."""
        return self.process(msgs, [unpack(m) for m in peers])

    def _begin(self) -> Batch:
        return self.shard.begin()

    def _before_commit(self, batch: Batch) -> None:
        """The batch is complete and its dead letters delivered; LMDB commits next."""

    def _abandon(self) -> None:
        """The batch failed with an exception that stops the worker."""

    def _check_kafka_committed(self) -> None:
        """The LMDB transaction failed: may the batch be applied again? (It may, here.)"""

    # ---- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        ctl, me = self.ctl, self.index
        ppid = os.getppid()
        ctl.set(me, Slot.STORAGE_BLOCKED, 0)  # a predecessor may have died blocked
        self.txn_bytes = FIRST_TXN_BYTES
        while True:
            self._check_fence()
            ctl.heartbeat(me)
            self._pump_outbox()
            if self.publisher is not None:
                self.publisher.pump()
            self._check_fence()  # right before taking messages from the rings
            sup = self.inbound.get_many(1024, self.txn_bytes)
            peers = []
            for j, r in self.peer_in.items():
                if r.used_bytes:
                    peers.extend(r.get_many(1024, self.txn_bytes))
            if not sup and not peers:
                if self.stopping:
                    return 0
                if os.getppid() != ppid:
                    log.error("worker %d: supervisor gone, exiting", me)
                    return 1
                self._expire_gaps_if_due()
                if self.publisher is not None:
                    ctl.set(me, Slot.CHANGES_BACKLOG, self.publisher.backlog)
                    if self.publisher.published - self.changes_pruned >= 10_000:
                        self.process([], [])  # prune delivered change events
                self.inbound.wait(0.05 if self.publisher is None or
                                  not self.publisher.backlog else 0.005)
                continue
            stop = self._process_ring([unpack(m) for m in sup], peers)
            if stop:
                self.stopping = True
                self._pump_outbox()
                if self.publisher is not None:
                    if not self.publisher.flush(self.cfg.service.shutdown_timeout_ms / 2000):
                        log.warning("worker %d: %d change events not yet delivered; they are "
                                    "published at the next start", me, self.publisher.backlog)
                    self.process([], [])  # prune what was delivered
                self.save_bloom()  # the next start reads no dedup index
                return 0

    # ---- one batch -------------------------------------------------------------------------
    def process(self, sup_msgs: list, peer_msgs: list) -> bool:
        """Apply a group of ring messages in one transaction. True when told to stop.

        Returns once the transaction is committed: a failed one is rolled back and the same
        messages applied again (see the module docstring); a full map at the maximum size
        raises ShardError.
        """
        self.retrying = False
        self.dlq_delivered = set()
        failures = 0  # data-disk errors in a row
        while True:
            self.attempt = self._new_attempt()  # nothing of a failed attempt is kept
            batch = None
            try:
                if self.retrying:
                    self._reload_after_rollback()
                batch = self._begin()
                stop = self._apply(batch, sup_msgs, peer_msgs)
                self._finish(batch)
                self.dlq.deliver(self._heartbeat)  # durable before the commit
                self.dlq_delivered.update(self.attempt.dlq)
                self._before_commit(batch)
                fault_point("worker_before_commit")
                t0 = time.monotonic_ns()
                batch.commit()
                dt = time.monotonic_ns() - t0
                self.ctl.add(self.index, Slot.COMMIT_NS, dt)
                record_commit(self.hist, self.index, dt / 1e6)
            except lmdb.MapFullError:
                self._roll_back(batch)
                self._check_kafka_committed()
                if not self.shard.grow():
                    raise ShardError(
                        f"{self.shard.path}: LMDB map full at service.lmdb_max_map_size "
                        f"({self.shard.max_map_size} bytes): raise service.lmdb_max_map_size "
                        "and restart; nothing of the batch was kept (offsets not advanced)"
                    ) from None
                continue
            except (lmdb.Error, OSError) as e:
                code = storage_errno(e)
                self._roll_back(batch)
                self._check_kafka_committed()
                if code is None:
                    raise
                if isinstance(e, lmdb.PanicError):
                    self.shard_broken = True
                    code = self.blocked_code or code  # the error that broke it, if we saw it
                self._wait_for_storage(code, failures)
                failures += 1
                continue
            except BaseException:
                self._roll_back(batch)
                self._abandon()
                raise
            if failures:
                self._storage_recovered(failures)
            fault_point("worker_after_commit")  # state durable, nothing acked or published
            self._post_commit()
            return stop

    def _roll_back(self, batch: Batch | None) -> None:
        """Abort the transaction; the next attempt reloads what it changed in memory."""
        if batch is not None:
            batch.abort()
        self.retrying = True

    def _reload_after_rollback(self) -> None:
        """Undo in memory what a rolled-back transaction did.

        The sequence gate is reloaded from the shard. The bloom filter keeps the items the
        failed attempt added: the retry asks it without adding them again (see
        `_apply_events`) and confirms its "maybe" against the exact index, which the rollback
        restored. A rotation of the filter is stored by the next commit (`_finish`). Dead
        letters already delivered are not sent again (`dlq_delivered`).
        """
        if self.shard_broken:
            self.shard.reopen()
            self.shard_broken = False
        self.gate.clear()
        self._load_parked()

    def _wait_for_storage(self, code: int, failures: int) -> None:
        """The data disk refused the transaction: say so, then pause before the retry,
        heartbeating (the supervisor must not take a blocked worker for a hung one)."""
        self._check_fence()  # the row is a replacement's: not ours to mark blocked
        ctl, me = self.ctl, self.index
        ctl.add(me, Slot.STORAGE_ERRORS, 1)
        ctl.set(me, Slot.STORAGE_BLOCKED, code)
        lo, hi = STORAGE_RETRY_S
        now = time.monotonic()
        if failures == 0:
            self.blocked_since = now
        if failures == 0 or code != self.blocked_code or now >= self.blocked_log_at:
            since = "" if failures == 0 else \
                f" (blocked for {now - self.blocked_since:.0f} s, {failures} retries)"
            log.error("worker %d: %s; nothing of the batch was kept (offsets not advanced); "
                      "retrying every %g-%g s%s", me, storage_message(code, self.shard.path),
                      lo, hi, since)
            self.blocked_log_at = now + STORAGE_LOG_EVERY_S
        self.blocked_code = code
        deadline = now + min(lo * 2 ** failures, hi)
        while True:
            self._check_fence()
            ctl.heartbeat(me)
            if not self.shard_broken:
                try:  # committed forwards and change events still go out (reads only)
                    self._pump_outbox()
                    if self.publisher is not None:
                        self.publisher.pump()
                except lmdb.Error:
                    pass
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def _storage_recovered(self, failures: int) -> None:
        self.ctl.set(self.index, Slot.STORAGE_BLOCKED, 0)
        log.warning("worker %d: %s is writable again: the batch committed after %d retries "
                    "(blocked for %.1f s)", self.index, self.shard.path, failures,
                    time.monotonic() - self.blocked_since)
        self.blocked_code = 0

    def _heartbeat(self) -> None:
        self.ctl.heartbeat(self.index)

    def _new_attempt(self) -> BatchState:
        """The state of a new attempt at a batch (batch_state.py)."""
        return BatchState()

    def _apply(self, batch: Batch, sup_msgs: list, peer_msgs: list) -> bool:
        at = self.attempt
        for m in peer_msgs:
            _, src, seq, updates = m
            last = at.link_in.get(src, self.link_in.get(src, 0))
            if seq != last + 1:
                continue  # duplicate (<=) or gap after our restart (the sender resends)
            at.link_in[src] = seq
            for u in updates:
                fwd = Forwarded(u)
                feed = self.plan.feeds[u[UPD_FEED]]
                if self._apply_local(batch, feed, u[UPD_KEY], u[UPD_SLOT], fwd) is None:
                    self._dead_letter(fwd.record(), "merge_error",
                                      f"view {feed.view}: merge failed")
        events = []
        through, stats = at.through, at.stats
        for records, thr in self._rounds(sup_msgs):
            for rec in records:
                tp = (rec[REC_TOPIC], rec[REC_PARTITION])
                if rec[REC_OFFSET] <= through.get(tp, self.through.get(tp, -1)):
                    continue  # already applied before a rewind
                stats["records"] += 1
                ev = self._parse(rec)
                if ev is not None:
                    events.append((ev, rec))
            self._advance_through(thr)
        if events:
            self._apply_events(batch, events)
        return at.stop

    def _rounds(self, sup_msgs: list):
        """(records, through-offsets) of each records message from the supervisor; notes
        the highest batch id (acknowledged after the commit) and a stop message."""
        for m in sup_msgs:
            if m[0] == MSG_STOP:
                self.attempt.stop = True
                continue
            _, batch_id, thr, records = m
            self.attempt.ack = max(self.attempt.ack, batch_id)
            yield records, thr

    def _advance_through(self, thr: list, allowed=None) -> None:
        through = self.attempt.through
        for ti, part, off in thr:
            tp = (ti, part)
            if (allowed is None or part in allowed) and \
                    off > through.get(tp, self.through.get(tp, -1)):
                through[tp] = off

    def _parse(self, rec):
        try:
            plan = self.maps[rec[REC_TOPIC]]
            if plan is not None:
                return apply_mapping(plan, rec[REC_VALUE], rec[REC_HEADERS], rec[REC_KEY],
                                     rec[REC_OFFSET], rec[REC_TIMESTAMP], self.max_bytes,
                                     self.max_key)
            return parse(rec[REC_VALUE], rec[REC_HEADERS], rec[REC_KEY], self.max_bytes,
                         self.max_key, rec[REC_TOPIC] in self.detect)
        except EnvelopeError as e:
            self._dead_letter(rec, e.reason, str(e))
            return None

    def _dead_letter(self, rec, reason: str, message: str) -> None:
        self.attempt.stats["deadlettered"] += 1
        key = (rec[REC_TOPIC], rec[REC_PARTITION], rec[REC_OFFSET], reason, message)
        if key in self.dlq_delivered:
            return  # delivered by an attempt of this batch that was rolled back
        self.attempt.dlq.append(key)
        self.dlq.send(rec, reason, message)

    def _apply_events(self, batch: Batch, events: list) -> None:
        # dedup: bloom first, exact index only for "maybe"
        slots = [rec[REC_SLOT] for _, rec in events]
        hashes = [identity_hash(ev.source, ev.id) for ev, _ in events]
        if self.retrying:
            flags = self._bloom_again(hashes)
        else:
            flags = self.bloom.check_and_add(b"".join(hashes))
        gen = self.bloom.generation
        kept = []
        for i, (ev, rec) in enumerate(events):
            skey = slot_prefix(slots[i]) + hashes[i]
            if flags[i] and batch.seen(skey):
                self.attempt.stats["duplicates"] += 1
                continue
            batch.mark_seen(skey, gen)
            kept.append((ev, rec))
        # sequence gate
        gated = [(i, ev, rec) for i, (ev, rec) in enumerate(kept) if ev.sequence is not None]
        codes = bytearray(len(kept))  # APPLY by default (no sequence: dedup only)
        ready: list = []
        gkeys: list[bytes] = []
        if gated:
            gkeys = [slot_prefix(rec[REC_SLOT]) + gate_hash(ev.source, ev.partitionkey)
                     for _, ev, rec in gated]
            for g, (_, ev, rec) in zip(gkeys, gated):
                self.attempt.seqpart[g] = (self.topics[rec[REC_TOPIC]], rec[REC_PARTITION])
            self._load_gate(batch, gkeys, [rec[REC_TOPIC] for _, _, rec in gated])
            strict = bytes(self.plan.strict[rec[REC_TOPIC]] for _, _, rec in gated)
            gcodes, gready = self.gate.decide(gkeys, [ev.sequence for _, ev, _ in gated],
                                              strict, time.time())
            for j, (i, _, _) in enumerate(gated):
                codes[i] = gcodes[j]
            ready = [(gated[j][0], g, s) for j, g, s in gready]
        gk_of = {gated[j][0]: gkeys[j] for j in range(len(gated))}
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
        for i in full:
            self._on_full(batch, gk_of[i], *kept[i])

    def _bloom_again(self, hashes: list[bytes]) -> bytearray:
        """check_and_add for a batch applied again after a rollback: what the failed attempt
        added is only looked up ("maybe": confirmed by the exact index), so that retries do
        not count the batch into the current generation again (and rotate it early)."""
        flags = self.bloom.contains(b"".join(hashes))
        new = [i for i, f in enumerate(flags) if not f]
        if new:
            for i, f in zip(new, self.bloom.check_and_add(b"".join(hashes[i] for i in new))):
                flags[i] = f
        return flags

    def _load_gate(self, batch: Batch, gkeys: list[bytes], topic_idx: list[int]) -> None:
        missing = self.gate.missing(gkeys)
        if not missing:
            return
        first_ti = {}
        for g, ti in zip(gkeys, topic_idx):
            first_ti.setdefault(g, ti)
        for g in missing:
            row = batch.get_seq(g)
            last = row[0] if row is not None else self.plan.initial[first_ti[g]] - 1
            self.gate.load(g, last, batch.parked_of(g))

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

    # ---- merging ---------------------------------------------------------------------------
    def _apply_event(self, batch: Batch, ev, rec) -> None:
        feeds = self.plan.feeds_for(rec[REC_TOPIC], ev.type)
        self.attempt.stats["applied"] += 1
        if not feeds:
            return
        targets = []
        for f in feeds:
            if f.key_path is None:
                key, slot = ev.partitionkey, rec[REC_SLOT]
            else:
                try:
                    key = get_path(ev.data, f.key_path)
                except (KeyError, TypeError, IndexError):
                    self._dead_letter(rec, "merge_error",
                                      f"view {f.view}: key field data.{'.'.join(f.key_path)} "
                                      "missing")
                    return
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    self._dead_letter(rec, "merge_error",
                                      f"view {f.view}: key must be a string or integer")
                    return
                key = str(key)
                kb = key.encode()
                if len(kb) > self.max_key:
                    self._dead_letter(rec, "key_too_long", f"view {f.view}: key too long")
                    return
                slot = slot_of(kb)
            targets.append((f, key, slot))
        self._route(batch, ev, rec, targets)

    def _route(self, batch: Batch, ev, rec, targets: list) -> None:
        """Merge into the view keys this worker owns; the others go to their workers."""
        forwards = self._merge_targets(batch, ev, rec, targets, self.index)
        for owner, update in forwards or ():
            self.attempt.stats["forwarded"] += 1
            self.attempt.out.setdefault(owner, []).append(update)

    def _merge_targets(self, batch: Batch, ev, rec, targets: list, me: int
                       ) -> list[tuple[int, list]] | None:
        """Merge the event into its view keys owned by `me` (a worker; in cluster mode a
        task); returns the updates for the others as (owner, update). All of the event or
        none of it: on a merge error its other views here are undone, it is dead-lettered
        and nothing is forwarded (None)."""
        applied: list[bytes] = []
        forwards = []
        owners = self.key_owners  # workers, or in cluster mode tasks (slot % tasks)
        for f, key, slot in targets:
            owner = worker_of(slot, owners)
            if owner != me:
                # a forwarded update: the UPD_* fields (protocol.py)
                forwards.append((owner, [f.feed_id, key, slot, ev.id, ev.source, ev.type,
                                         ev.time, ev.subject, ev.sequence, ev.data,
                                         ev.partitionkey, rec[REC_TOPIC], rec[REC_PARTITION],
                                         rec[REC_OFFSET]]))
                continue
            dkey = self._apply_local(batch, f, key, slot, ev)
            if dkey is None:
                for d in applied:
                    self.attempt.log[d].pop()
                    self._drop_last_change(d)
                for d in set(applied):
                    self._replay(batch, d)
                self._dead_letter(rec, "merge_error", f"view {f.view}: merge failed")
                return None
            applied.append(dkey)
        return forwards

    def _apply_local(self, batch: Batch, f: Feed, key: str, slot: int, ev) -> bytes | None:
        """Merge one event into a document of this shard: its key, or None (and the document
        as it was before this event) on a merge error.

        Documents live in the attempt's `docs` for the whole transaction and are changed in
        place; the updates applied to each are logged so that a failing merge, which may have
        changed the document before it failed, is undone by replaying them on the stored
        version.
        """
        dkey = view_key(slot_prefix(slot), f.view_id, key)
        at = self.attempt
        stored = at.docs.get(dkey)
        if stored is None:
            stored = batch.get_doc(dkey) or {"v": 0, "d": None, "s": {}}
        try:
            doc = f.merge.apply(stored["d"], ev)
        except MergeError as e:
            log.warning("worker %d: merge error in view %s: %s", self.index, f.view, e)
            self._replay(batch, dkey)
            return None
        stored["d"] = doc
        stored["v"] += 1
        stored["s"][ev.source] = [ev.sequence, ev.time]
        at.docs[dkey] = stored
        at.log.setdefault(dkey, []).append((f, ev))
        chg = self.changes
        if chg.enabled and not chg.coalesce and chg.topics[f.view_id] is not None:
            at.changes.append((dkey, f.view_id, key, stored["v"], chg.encode(doc)))
        return dkey

    def _drop_last_change(self, dkey: bytes) -> None:
        """Forget the change event of an update that was undone."""
        changes = self.attempt.changes
        for i in range(len(changes) - 1, -1, -1):
            if changes[i][0] == dkey:
                del changes[i]
                return

    def _replay(self, batch: Batch, dkey: bytes) -> None:
        """Rebuild a document from its stored version and this transaction's updates."""
        updates = self.attempt.log.get(dkey)
        if not updates:
            self.attempt.docs.pop(dkey, None)
            return
        stored = batch.get_doc(dkey) or {"v": 0, "d": None, "s": {}}
        for f, ev in updates:
            stored["d"] = f.merge.apply(stored["d"], ev)
            stored["v"] += 1
            stored["s"][ev.source] = [ev.sequence, ev.time]
        self.attempt.docs[dkey] = stored

    # ---- end of transaction ----------------------------------------------------------------
    def _finish(self, batch: Batch) -> None:
        self._expire_gaps(batch)
        for dkey, stored in self.attempt.docs.items():
            batch.put_doc(dkey, stored)
        for g, last in self.gate.dirty():
            tp = self.attempt.seqpart.get(g)
            if tp is None:  # a gap expired on a key without events in this batch
                row = batch.get_seq(g)
                tp = (row[1], row[2]) if row is not None else ("", -1)
            batch.put_seq(g, last, *tp)
        for (ti, part), off in self.attempt.through.items():
            batch.put_offset(self.topics[ti], part, off)
        if self.publisher is not None:
            self._write_changes(batch)
        for src, seq in self.attempt.link_in.items():
            batch.put_link(src, seq)
        for owner, updates in self.attempt.out.items():
            seq = self.link_out[owner]
            out = self.attempt.outmsg[owner] = []
            for msg in self._forward_messages(owner, seq, updates):
                seq += 1
                batch.put_outbox(owner, seq, msg)
                out.append((seq, msg))
        if self.attempt.outmsg:
            link_out = dict(self.link_out)
            link_out.update((owner, out[-1][0]) for owner, out in self.attempt.outmsg.items())
            batch.put_meta("link_out", link_out)
        for j in self.peer_out:
            acked = self.ctl.link_applied(j, self.index)
            if acked > self.pruned[j]:
                batch.prune_outbox(j, acked)
                self.attempt.pruned_out[j] = acked
        if self.bloom.full:
            self.bloom_dropped = max(self.bloom_dropped, self.bloom.rotate())
        if self.bloom.generation != self.bloom_saved:  # also a rotation rolled back before
            batch.put_meta("bloom_generation", self.bloom.generation)
            if self.bloom_dropped >= 0:
                batch.prune_generations(self.bloom_dropped, limit=10_000_000)
            self.attempt.bloom_saved = True
        self._log_seen(batch)
        self._count(batch)

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

    def _count(self, batch: Batch) -> None:
        """Add the batch's counts to the shard's totals in its own transaction: a batch is
        counted exactly when it is committed, whatever is killed when (store.py, meta
        ``totals``). Kept in `t_totals` until the commit (a rollback forgets them)."""
        s = self.attempt.stats
        if not any(s.values()):
            return
        totals = {name: self.totals[name] + s[name] for name in TOTALS}
        totals["since"] = self.totals["since"] or int(time.time() * 1000)
        batch.put_totals(totals)
        self.attempt.totals = totals

    def _forward_messages(self, owner: int, last_seq: int, updates: list) -> list[bytes]:
        """The outbox messages (link seqs last_seq+1, ...) carrying `updates`: as many as
        it takes for each to fit the peer ring's largest message."""
        limit = self.peer_out[owner].max_message
        msg = pack([MSG_FORWARD, self.index, last_seq + 1, updates])
        if len(msg) <= limit:
            return [msg]
        chunks: list[list] = [[]]
        size = 0
        for u in updates:
            n = len(pack(u))
            if chunks[-1] and size + n > limit - 64:  # 64: the envelope [2, from, seq, [...]]
                chunks.append([])
                size = 0
            chunks[-1].append(u)
            size += n
        return [pack([MSG_FORWARD, self.index, last_seq + 1 + k, c])
                for k, c in enumerate(chunks)]

    def _change_rows(self) -> list[tuple]:
        """The transaction's change events: (doc key, view id, key, version, data)."""
        chg = self.changes
        if not chg.coalesce:
            return self.attempt.changes
        rows = []
        for dkey, updates in self.attempt.log.items():
            vid = dkey[2]
            if updates and chg.topics[vid] is not None:
                stored = self.attempt.docs[dkey]
                rows.append((dkey, vid, dkey[3:].decode(), stored["v"],
                             chg.encode(stored["d"])))
        return rows

    def _write_changes(self, batch: Batch) -> None:
        """The transaction's change events into the outbox; prune delivered ones."""
        chg, seq, out = self.changes, self.change_seq, self.attempt.chg_out
        rows = self._change_rows()
        for _, vid, key, version, data in rows:
            seq += 1
            entry = chg.entry(vid, key, version, data)
            batch.put_change(seq, entry)
            out.append((seq, entry))
        if out:
            batch.put_meta("change_seq", seq)
        delivered = self.publisher.published
        if delivered > self.changes_pruned:
            batch.prune_changes(delivered)
            batch.put_meta("changes_published", delivered)
            self.attempt.pruned = delivered

    def _check_fence(self) -> None:
        """Raise Fenced if a newer worker of this shard booted (its epoch in our row of the
        control block).

        A fenced worker must not touch shared state: take messages from its rings (they are
        single-consumer), acknowledge, set link counters, feed peer rings (single-producer),
        publish change events. Its LMDB writes are fenced by the shard itself (Batch). Between
        this check and the next step a stopped process may be superseded: the guarantee is
        the supervisor's, which resets the rings and starts a replacement only after the old
        process is reaped (Supervisor._check_workers); this check covers the rest (e.g. a
        worker of a previous supervisor that outlived it).
        """
        epoch = self.ctl.get(self.index, Slot.EPOCH)
        if epoch != self.ctl_epoch:
            raise Fenced(self.shard.path, self.ctl_epoch, epoch)

    def _post_commit(self) -> None:
        self._check_fence()  # a replacement booted during the commit: it takes over from here
        ctl, me = self.ctl, self.index
        if self.publisher is not None:
            if self.attempt.chg_out:
                self.change_seq = self.attempt.chg_out[-1][0]
                self.publisher.committed(self.attempt.chg_out)
            self.changes_pruned = max(self.changes_pruned, self.attempt.pruned)
            self.publisher.pump()
            ctl.set(me, Slot.CHANGES_BACKLOG, self.publisher.backlog)
        self.through.update(self.attempt.through)
        self.link_in.update(self.attempt.link_in)
        self.pruned.update(self.attempt.pruned_out)
        if self.attempt.bloom_saved:
            self.bloom_saved, self.bloom_dropped = self.bloom.generation, -1
        if self.attempt.seen_log is not None:
            self.dedup_log_seq = self.attempt.seen_log[0]
            self.ids_unsaved += self.attempt.seen_log[1]
        if self.attempt.log_pruned:
            self.dedup_log_pruned = self.attempt.log_pruned
        for src, seq in self.attempt.link_in.items():
            ctl.set_link_applied(me, src, seq)
        for owner, out in self.attempt.outmsg.items():
            self.link_out[owner] = out[-1][0]
            self.unsent[owner].extend(out)
            ctl.set_link_committed(me, owner, out[-1][0])
        fault_point("worker_after_publish")  # committed and published, not yet acknowledged
        if self.attempt.totals is not None:
            self.totals = self.attempt.totals
            self._publish_totals()
        ctl.add(me, Slot.COMMITS, 1)
        ctl.set(me, Slot.PARKED, self.gate.parked_total)
        if self.attempt.ack >= 0:
            ctl.set(me, Slot.ACK_BATCH, self.attempt.ack)
        self.gate.evict(self.cfg.gate.max_cached_keys)
        self.txn_bytes = min(self.txn_bytes * 2, TXN_MAX_BYTES)
        if self.ids_unsaved >= self.save_bloom_every:
            self.save_bloom()
        self._pump_outbox()

    def _publish_totals(self) -> None:
        """The shard's committed totals into the control block (set, not added: the block
        mirrors the shard, so a batch a killed predecessor committed shows at the boot)."""
        ctl, me = self.ctl, self.index
        for name, slot in zip(TOTALS, TOTAL_SLOTS):
            ctl.set(me, slot, self.totals[name])

    def _pump_outbox(self) -> None:
        """Send committed outbox messages to their shards, in link-sequence order."""
        self._check_fence()
        ctl, me = self.ctl, self.index
        for j, ring in self.peer_out.items():
            epoch = ctl.get(j, Slot.EPOCH)
            if epoch == 0:
                continue  # not booted yet: it resets its inbound ring at boot
            if epoch != self.peer_epoch[j]:
                self.peer_epoch[j] = epoch
                self.sent[j] = ctl.link_applied(j, me)
                self.unsent[j].clear()
            if self.sent[j] >= self.link_out[j]:
                continue
            queue = self.unsent[j]
            while queue and queue[0][0] <= self.sent[j]:
                queue.popleft()
            if not queue or queue[0][0] != self.sent[j] + 1:
                queue.clear()
                queue.extend(self.shard.outbox_after(j, self.sent[j]))
            while queue:
                seq, msg = queue[0]
                if not ring.try_put(msg):
                    break
                queue.popleft()
                self.sent[j] = seq

    def close(self) -> None:
        self.dlq.close()
        if self.publisher is not None:
            self.publisher.close()
        self.shard.close()
