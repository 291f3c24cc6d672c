"""A worker process: owns one LMDB shard and applies every event routed to it exactly once.

Per batch (one LMDB write transaction):

1. skip records at or below this shard's through-offset of their partition (redelivery);
2. parse the CloudEvent (or map a record of an outbox/JSON source, mapping.py);
   malformed → dead-letter;
3. dedup (stages/dedup.py): the bloom filter answers "definitely new" for most events; a
   "maybe" is confirmed against the exact LMDB index, so a false positive never drops a new
   event;
4. sequence gate (stages/gate.py) per (source, partition key): apply / stale / park, then
   drain parked successors; gap policy for overflowing or timed-out gaps;
5. merge into view documents owned by this shard, or route the update to the shard that owns
   the view key (stages/route.py): written to the outbox, forwarded after commit, applied
   there exactly once by link sequence number (stages/links.py);
6. store through-offsets, link sequences, sequence state and the shard's totals (what the
   batch counted added to meta ``totals``: exact through any crash), then commit;
   acknowledge the batch and publish the totals to the supervisor through the control block.

Commit window: a transaction takes ring messages for up to ``service.commit_window_ms`` after
its first one, or until ``service.commit_max_bytes`` of them (`_take`); the rings empty for
``service.commit_idle_ms`` or a stop message end the window. The first transaction after a
boot takes FIRST_TXN_BYTES, doubling per commit up to commit_max_bytes: a replacement
commits soon after it booted. Nothing is acknowledged, forwarded or published before the
commit, so the window moves only latency.

Documents: with ``service.doc_cache_bytes`` set (off by default), the committed documents of
recent transactions stay unpacked in `doc_cache` (doc_cache.py); a transaction takes a
document from the cache or else reads it from the shard, and the documents it stored go back
into the cache after its commit, so a rolled-back attempt leaves nothing in it.

A transaction that fails keeps nothing (the attempt's state is dropped with it,
batch_state.py), and the same messages are applied again from step 1
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

from . import core, forwards, memory, merger, parser
from .batch_state import BatchState
from .changes import ChangeEncoder, make_publisher
from .config import Config
from .control import TOTAL_SLOTS, ControlBlock, Slot
from .deadletter import DeadLetters
from .devtools.latency_trace import open_trace
from .doc_cache import DocCache
from .doc_codec import json_body
from .envelope import EnvelopeError
from .faults import fault_flag, fault_point
from .frames import decode_lazy
from .mapping import apply as apply_mapping
from .mapping import plans_by_topic
from .metrics import record_commit
from .parser import parse
from .plan import ViewPlan, assign_view_ids
from .protocol import (
    MSG_STOP,
    REC_HEADERS,
    REC_KEY,
    REC_OFFSET,
    REC_PARTITION,
    REC_TIMESTAMP,
    REC_TOPIC,
    REC_VALUE,
    hist_segment_name,
    ring_names,
)
from .ring import Ring, SharedCounters
from .routing import SLOTS
from .runtime import collect_between_batches
from .stages.dedup import AlwaysMaybe, DedupStage
from .stages.gate import GateStage
from .stages.links import LinksStage
from .stages.route import RouteStage
from .store import (
    TOTALS,
    Batch,
    Fenced,
    Shard,
    ShardError,
    shard_path,
    storage_errno,
    storage_message,
)

log = logging.getLogger(__name__)

APPLY, STALE, PARK, FULL = core.APPLY, core.STALE, core.PARK, core.FULL
# after a boot the first transaction takes this many ring bytes, doubling per commit up to
# service.commit_max_bytes: a replacement commits (acknowledges, moves the Kafka commit) soon
# after it booted
FIRST_TXN_BYTES = 128 << 10
# records read, deduplicated, gated and merged per pass (`_apply`): each stage walks the
# objects the one before made while they are still in the CPU caches, instead of the
# whole transaction's (thousands of records, tens of MiB) once per stage. One transaction
# still commits them all, with what one pass would give: an id seen earlier in it is a
# duplicate (store.Batch.seen sees the transaction's own ids), a sequence parked by an
# earlier pass is found in the gate, and the gap policy of the parks that were full runs
# after the last pass (BatchState.full). bench.tools.cache_profile: last-level misses per
# record 440 -> 411 (256) / 403 (128) against one pass; tests/test_loops.py compares them.
# The records themselves are made a pass at a time too (frames.decode_lazy in `_take`).
APPLY_CHUNK = 256
WINDOW_POLL_S = 0.002  # within a commit window: longest sleep between looks at the rings
STORAGE_RETRY_S = (0.5, 5.0)  # pause before retrying a batch the data disk refused: min, max
STORAGE_LOG_EVERY_S = 60.0  # while blocked, how often the error is logged again


class Worker(DedupStage, GateStage, RouteStage, LinksStage):
    """One shard's worker in normal mode: the shard is this worker's alone, and view updates
    for keys of other shards go to their workers through the peer rings.
    `task_worker.TaskWorker` is the cluster-mode variant (the hooks below).

    This class keeps the orchestration: boot, the loop, one batch's attempts and their commit
    order, fault points; the stages of a batch are its mixins (stages/). What one attempt at
    a batch has done is `self.attempt` (batch_state.py), built fresh per attempt."""

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
        self.txn_max_bytes = max(svc.commit_max_bytes, FIRST_TXN_BYTES)
        self.apply_chunk = APPLY_CHUNK  # records per pass of `_apply`
        self.commit_window = svc.commit_window_ms / 1000.0
        self.commit_idle = svc.commit_idle_ms / 1000.0  # rings empty this long: window ends
        # committed documents kept across transactions; None: every one read from the shard
        self.doc_cache = DocCache(svc.doc_cache_bytes) if svc.doc_cache_bytes else None
        self.trimmer = memory.Trimmer(svc.malloc_trim_interval_ms)  # after commits
        # new dedup ids after which the bloom filter is saved again: a boot reads at most
        # these from the dedup log (bloom_snapshot.py)
        self.save_bloom_every = max(config.dedup.bloom_capacity // 8, 10_000)
        self.retrying = False  # applying again a batch whose transaction was rolled back
        self.shard_broken = False  # MDB_PANIC: the environment must be reopened
        self.dlq_delivered: set[tuple] = set()  # dead letters of the batch already delivered
        self.attempt: BatchState | None = None  # the current attempt at a batch (process)
        self.blocked_since = self.blocked_log_at = 0.0
        self.blocked_code = 0
        self.trace = open_trace(f"worker{index}")  # bench only (devtools/latency_trace.py)

    # ---- boot ---------------------------------------------------------------------------
    def boot(self) -> None:
        cfg, svc = self.cfg, self.cfg.service
        self.shard = Shard(shard_path(svc.data_dir, self.index), map_size=svc.lmdb_map_size,
                           max_map_size=svc.lmdb_max_map_size, sync=svc.lmdb_sync,
                           writemap=svc.lmdb_writemap,
                           resident_bytes=svc.lmdb_resident_bytes)
        self.shard.check_layout(shard=self.index, workers=self.workers, slots=SLOTS)
        self.epoch = self.shard.claim_writer()  # fences a previous worker; read state after
        views = assign_view_ids(self.shard.get_meta("views"), list(cfg.views))
        self._check_fingerprint(cfg.fingerprint())
        self.shard.put_meta(views=views, fingerprint=cfg.fingerprint())
        self.plan = ViewPlan(cfg, {v: i for i, v in enumerate(views)})
        # per feed: the data fields its merge reads (a forwarded update's data is read as
        # those alone, forwards.data_keys)
        self.fwd_keys = forwards.data_keys(cfg)
        assert len(self.fwd_keys) == len(self.plan.feeds)
        self.changes = ChangeEncoder(cfg, views)
        self.change_seq = max(self.shard.last_change_seq(), self.shard.get_meta("change_seq", 0))
        self.changes_pruned = self.shard.get_meta("changes_published", 0)
        self.publisher = None
        if self.changes.enabled:
            self.publisher = make_publisher(cfg, self.changes, self.shard.changes_after,
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
        self.booted_at = time.time()  # gap clocks of events parked before start from here
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
        log.info("worker %d booted: core=%s, parser=%s, merge=%s, forwards=%s, bloom filter %s "
                 "(%d ids read, %.3f s), %d bloom generations, %d partitions, change events %s",
                 me, core.IMPLEMENTATION, parser.IMPLEMENTATION, merger.IMPLEMENTATION,
                 forwards.IMPLEMENTATION,
                 self._bloom_how,
                 self._bloom_loaded, self._bloom_s, len(self.bloom.live_generations),
                 len(self.through),
                 self.publisher.implementation if self.publisher is not None else "off")

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
        """An empty bloom filter of the configured size (stages/dedup.py fills it)."""
        d = self.cfg.dedup
        return core.BloomFilter(d.bloom_capacity, d.bloom_fp_rate, d.bloom_generations)

    # ---- what cluster mode changes (task_worker.TaskWorker) --------------------------------
    def _boot_tasks(self) -> None:
        """Boot: set up what the variant needs before the shard's state is loaded."""

    def _stream_here(self, g: bytes, in_batch: bool = False) -> bool:
        """Is the sequence stream `g` (gate key) this worker's to load and expire?"""
        return True

    def _parked_since(self, g: bytes) -> float:
        """When the gap clocks of `g`'s events parked before it start (stages/gate.py)."""
        return self.booted_at

    def _process_ring(self, msgs: list, peers: list) -> bool:
        """Apply messages taken from the rings (peers still packed); True when told to stop."""
        return self.process(msgs, [self._decode_peer(m) for m in peers])

    def _decode_peer(self, msg: bytes) -> list:
        """A peer ring message: ``[MSG_FORWARD, from, link seq, updates]``, each update
        ``(feed id, view key, slot, Forwarded)`` (forwards.py)."""
        return forwards.decode(msg, self.fwd_keys)

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
            sup, peers, taken = self._take_once(self.txn_bytes)
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
            stop = self._process_ring(*self._take(sup, peers, taken))
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

    def _take_once(self, budget: int) -> tuple[list, list, int]:
        """Messages from the supervisor's ring and the peer rings, up to about `budget`
        bytes from each (at least one message of each that has one): (supervisor messages,
        peer messages, still packed, bytes taken)."""
        sup = self.inbound.get_many(1024, budget)
        taken = sum(len(m) for m in sup)
        peers = []
        for r in self.peer_in.values():
            if r.used_bytes:
                got = r.get_many(1024, budget)
                taken += sum(len(m) for m in got)
                peers.extend(got)
        return sup, peers, taken

    def _take(self, sup: list, peers: list, taken: int) -> tuple[list, list]:
        """The ring messages of one transaction, starting with a first take: more are taken
        until the commit window (`commit_window`, from now) closes, the rings stayed empty
        for `commit_idle`, `txn_bytes` are taken or a stop message arrives. Returns
        (supervisor messages unpacked, peer messages)."""
        msgs = [decode_lazy(m) for m in sup]
        if self.trace is not None:
            self.trace.took(msgs)
        window = self.commit_window
        if window <= 0 or taken >= self.txn_bytes or any(m[0] == MSG_STOP for m in msgs):
            return msgs, peers
        ctl, me = self.ctl, self.index
        now = time.monotonic()
        deadline, idle = now + window, self.commit_idle
        quiet_until = now + idle  # the rings empty until then: the window closes
        while taken < self.txn_bytes:
            ctl.heartbeat(me)
            self._check_fence()  # right before taking messages from the rings
            more, more_peers, n = self._take_once(self.txn_bytes - taken)
            if more or more_peers:
                taken += n
                peers.extend(more_peers)
                more = [decode_lazy(m) for m in more]
                if self.trace is not None:
                    self.trace.took(more)
                msgs.extend(more)
                fault_point("worker_commit_window")  # messages taken, nothing committed
                if any(m[0] == MSG_STOP for m in more):
                    break
                quiet_until = time.monotonic() + idle
                continue
            left = min(deadline, quiet_until) - time.monotonic()
            if left <= 0:
                break
            self.inbound.wait(min(left, WINDOW_POLL_S))
        return msgs, peers

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
        t_close = time.time() if self.trace is not None else 0.0
        while True:
            self.attempt = self._new_attempt()  # nothing of a failed attempt is kept
            if not self.retrying:  # the collector's work, between transactions
                collect_between_batches()
            batch = None
            try:
                if self.retrying:
                    self._reload_after_rollback()
                self.shard.grow_ahead()  # with WRITEMAP: allocates (a full disk: OSError)
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
                try:
                    grown = self.shard.grow()
                except OSError as e:  # WRITEMAP: the disk refused the grown map's blocks
                    code = storage_errno(e)
                    if code is None:
                        raise
                    self._wait_for_storage(code, failures)
                    failures += 1
                    continue
                if not grown:
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
            if self.attempt.stats["forwarded"]:  # ... and its forwarded updates not yet sent
                fault_point("worker_after_forwarding_commit")
            txn_bytes = self.txn_bytes
            self._post_commit()
            if self.trace is not None:
                self.trace.transaction(t_close, t0, dt, txn_bytes)
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
        """The forwarded updates, then the records: read, deduplicated, gated and merged
        APPLY_CHUNK records at a time (see there)."""
        at = self.attempt
        if peer_msgs:
            self._apply_forwarded(batch, peer_msgs)
        events: list = []
        step = self.apply_chunk
        at.full = []
        for records, thr in self._rounds(sup_msgs):
            for i in range(0, len(records), step):
                # (a frames message's records are made here, a pass at a time: frames.py)
                self._read_records(records if len(records) <= step and type(records) is list
                                   else records[i:i + step], events)
                if len(events) >= step:
                    self._apply_events(batch, events)
                    events = []
            self._advance_through(thr)
        if events:
            self._apply_events(batch, events)
        full, at.full = at.full, None
        for g, ev, rec in full:  # the gap policy, once every event was decided
            self._on_full(batch, g, ev, rec)
        return at.stop

    def _read_records(self, records: list, events: list) -> None:
        """The records of one supervisor message not applied before a rewind, parsed: the
        (event, record) pairs appended to `events`, a malformed record dead-lettered.
        (_loops.read_records is the compiled twin.)"""
        at = self.attempt
        through, stats = at.through, at.stats
        for rec in records:
            tp = (rec[REC_TOPIC], rec[REC_PARTITION])
            if rec[REC_OFFSET] <= through.get(tp, self.through.get(tp, -1)):
                continue  # already applied before a rewind
            stats["records"] += 1
            ev = self._parse(rec)
            if ev is not None:
                events.append((ev, rec))

    def _apply_events(self, batch: Batch, events: list) -> None:
        """Parsed events of the batch: dedup (dedup.py), then the sequence gate and the
        merge (gate.py, route.py)."""
        self._gate_apply(batch, self._dedup(batch, events))

    def _apply_forwarded(self, batch: Batch, peer_msgs: list) -> None:
        """The peers' forwarded view updates, each link seq once (in order: a duplicate or
        a gap after our restart is skipped, the sender resends from its outbox)."""
        at = self.attempt
        for m in peer_msgs:
            _, src, seq, updates = m
            last = at.link_in.get(src, self.link_in.get(src, 0))
            if seq != last + 1:
                continue  # duplicate (<=) or gap after our restart (the sender resends)
            at.link_in[src] = seq
            self._apply_updates(batch, updates)

    def _apply_updates(self, batch: Batch, updates: list) -> None:
        """The forwarded view updates of one link message, each merged into its document; a
        merge error dead-letters the event's record. (_loops.apply_updates is the compiled
        twin.)"""
        feeds = self.plan.feeds
        for feed_id, key, slot, fwd in updates:
            feed = feeds[feed_id]
            if self._apply_local(batch, feed, key, slot, fwd) is None:
                self._dead_letter(fwd.record(), "merge_error",
                                  f"view {feed.view}: merge failed")

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

    # ---- end of transaction ----------------------------------------------------------------
    def _finish(self, batch: Batch) -> None:
        self._expire_gaps(batch)
        self._store_docs(batch)
        batch.put_seqs(self._seq_rows(batch))  # one appended seq_log record (store.py)
        if batch.seq_log_rows >= self.cfg.gate.seq_checkpoint_rows:
            batch.checkpoint_seqs()  # the logged rows into seq, the log emptied
            fault_point("seq_checkpoint")  # checkpoint written, not committed
        if batch.doc_log_bytes >= self.cfg.service.doc_checkpoint_bytes:
            batch.checkpoint_docs()  # the logged documents into views, the log emptied
            fault_point("doc_checkpoint")  # checkpoint written, not committed
        for (ti, part), off in self.attempt.through.items():
            batch.put_offset(self.topics[ti], part, off)
        if self.publisher is not None:
            self._write_changes(batch)
        self._write_links(batch)
        self._store_dedup(batch)
        self._count(batch)

    def _store_docs(self, batch: Batch) -> None:
        """The attempt's documents into the batch, with their sizes. One encoding
        (doc_codec.py): the JSON body of the last change event, if it was of this version;
        else encoded here (and used by a coalesced change event). (_loops.store_docs is the
        compiled twin.)"""
        sizes, bodies = self.attempt.doc_bytes, self.attempt.bodies
        for dkey, stored in self.attempt.docs.items():
            known = bodies.get(dkey)
            if known is None or known[0] != stored["v"]:
                known = bodies[dkey] = (stored["v"], json_body(stored["d"]))
            sizes[dkey] = batch.put_doc(dkey, stored, known[1])

    def _seq_rows(self, batch: Batch) -> list:
        """The sequence rows (gate key, last applied, topic, partition) of the gate's
        dirty keys. (_loops.seq_rows is the compiled twin.)"""
        seqpart = self.attempt.seqpart
        rows = []
        for g, last in self.gate.dirty():
            tp = seqpart.get(g)
            if tp is None:  # a gap expired on a key without events in this batch
                row = batch.get_seq(g)
                tp = (row[1], row[2]) if row is not None else ("", -1)
            rows.append((g, last, tp[0], tp[1]))
        return rows

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
                self.change_seq = self.attempt.chg_out[-1][1]
                self.publisher.committed(self.attempt.chg_out)
            self.changes_pruned = max(self.changes_pruned, self.attempt.pruned)
            self.publisher.pump()
            ctl.set(me, Slot.CHANGES_BACKLOG, self.publisher.backlog)
        self.through.update(self.attempt.through)
        self.link_in.update(self.attempt.link_in)
        if self.doc_cache is not None:  # the documents as committed (doc_cache.py)
            put, sizes = self.doc_cache.put, self.attempt.doc_bytes
            for dkey, stored in self.attempt.docs.items():
                put(dkey, stored, sizes[dkey])
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
        self.txn_bytes = min(self.txn_bytes * 2, self.txn_max_bytes)
        if self.ids_unsaved >= self.save_bloom_every:
            self.save_bloom()
        self._pump_outbox()
        self.trimmer.maybe()  # the pages the transaction's objects freed (memory.py)

    def _publish_totals(self) -> None:
        """The shard's committed totals into the control block (set, not added: the block
        mirrors the shard, so a batch a killed predecessor committed shows at the boot)."""
        ctl, me = self.ctl, self.index
        for name, slot in zip(TOTALS, TOTAL_SLOTS):
            ctl.set(me, slot, self.totals[name])

    def close(self) -> None:
        self.dlq.close()
        if self.publisher is not None:
            self.publisher.close()
        self.shard.close()


# The compiled twins of the per-record loops (_loops.pyx), as core.py chooses (stages/gate.py
# installs its own); tests/test_loops.py compares both.
REFERENCE_LOOPS = {name: getattr(Worker, name)
                   for name in ("_read_records", "_store_docs", "_seq_rows", "_apply_updates")}
if core.IMPLEMENTATION == "cython":
    _loops = core.compiled("_loops", "the compiled worker loops")
    _loops.set_reference(Worker._parse, parse)
    for _name in REFERENCE_LOOPS:
        setattr(Worker, _name, getattr(_loops, _name.lstrip("_")))
