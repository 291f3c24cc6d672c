"""The cluster-mode worker: it applies the tasks it owns and keeps the changelog.

In cluster mode (README "Cluster mode") the supervisor feeds a worker the records of the
tasks-topic partitions (tasks) it placed on this worker (placement.py). Per batch, on top of
`Worker`'s dedup, sequence gate and merge:

- records and view updates forwarded from other tasks are applied in partition order, and
  only for the tasks the supervisor still wants this worker to act on (the shared "wanted"
  word: a task revoked or lost meanwhile is another instance's now);
- a view key of another task is forwarded through the tasks topic, not a peer ring;
- before the LMDB commit, every touched task's changes, the forwards and the change events go
  to Kafka, then a marker per task (changelog.py): the local shard is a cache of the
  changelog.

Ring control messages restore a task from the changelog and claim it (MSG_RESTORE), or forget
it (MSG_DROP): a task gained by the instance, or moved here from another local worker (which
drained, committed and dropped it first), is restored; one revoked, lost or moved away is
dropped.
"""

from __future__ import annotations

import logging
import time

import lmdb

from . import bloom_snapshot
from .batch_state import TaskBatchState
from .changelog import (
    DEDUP,
    CapturingBatch,
    ChangelogError,
    ChangelogReader,
    ChangelogWriter,
    Restore,
    drop_task,
    meta_name,
)
from .changes import ChangeMessages
from .cluster import FORWARD_HEADER, wanted_segment_name
from .control import Slot
from .faults import fault_point
from .protocol import (
    MSG_DROP,
    MSG_RESTORE,
    REC_TASK,
    REC_TASK_OFFSET,
    REC_TOPIC,
    REC_VALUE,
    UPD_FEED,
    UPD_ID,
    UPD_KEY,
    UPD_SLOT,
    UPD_SOURCE,
    Forwarded,
    pack,
    unpack,
)
from .ring import SharedCounters
from .routing import identity_hash, slot_prefix
from .store import Batch, ShardError
from .worker import Worker

log = logging.getLogger(__name__)

_CONTROL = (MSG_RESTORE, MSG_DROP)


class TaskWorker(Worker):
    """A worker in cluster mode (see the module docstring)."""

    LIVE_DEDUP = False  # new dedup ids under the hot key, as the changelog captures them

    def _boot_tasks(self) -> None:
        cfg = self.cfg
        # cluster mode writes seq rows without the sequence log (changelog.CapturingBatch):
        # the rows a non-cluster run left logged go into seq first
        self.shard.fold_seq_log()
        self.shard.fold_doc_log()  # the same for documents (CapturingBatch writes views)
        self.tasks = self.key_owners = cfg.cluster.tasks
        self.TT = len(self.topics)  # the tasks topic's partitions are (topic index TT, task)
        self.topics.append(cfg.tasks_topic())
        self.owned: dict[int, list[int]] = {}  # task -> [epoch, batch seq, request id]
        self.task_since: dict[int, float] = {}  # task -> when restored here (gap clocks)
        self.writer: ChangelogWriter | None = None
        self.reader: ChangelogReader | None = None
        self.change_msgs = None
        if self.publisher is not None:  # change events go out with the changelog
            self.publisher = None
            self.change_msgs = ChangeMessages(self.changes)
        self.wanted = SharedCounters.attach(wanted_segment_name(self.prefix))
        # restores and drops write documents with raw writes, and control messages split a
        # ring take: cluster mode reads every document from the shard and commits per take
        # of at most 4 MiB per ring (each batch is also one Kafka transaction)
        self.doc_cache = None
        self.commit_window = 0.0
        self.txn_max_bytes = min(self.txn_max_bytes, 4 << 20)

    def _stream_here(self, g: bytes, in_batch: bool = False) -> bool:
        task = ((g[0] << 8) | g[1]) % self.tasks
        return task in (self.attempt.allowed if in_batch else self.owned)

    def _parked_since(self, g: bytes) -> float:
        """A restored task's parked events wait a full gap timeout from the restore: the
        handover from their previous owner must not expire them."""
        return max(self.booted_at, self.task_since.get(((g[0] << 8) | g[1]) % self.tasks, 0.0))

    def _process_ring(self, msgs: list, peers: list) -> bool:
        if any(m[0] in _CONTROL for m in msgs):
            return self._process_with_control(msgs)
        return self.process(msgs, [])

    def _begin(self) -> Batch:
        return CapturingBatch(self.shard)

    def _before_commit(self, batch: Batch) -> None:
        self._write_changelog(batch)  # Kafka first: LMDB is the cache

    def _abandon(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def _new_attempt(self) -> TaskBatchState:
        wanted = self.wanted  # owned tasks the supervisor still wants this worker to act on
        return TaskBatchState({t for t, st in self.owned.items() if wanted.get(t) == st[2]})

    def _route(self, batch: Batch, ev, rec, targets: list) -> None:
        # a view key of another task goes through the tasks topic, even if this worker owns
        # that task now: forwards of earlier batches may still be on their way there, and one
        # stream's updates of a key must arrive in order
        forwards = self._merge_targets(batch, ev, rec, targets, rec[REC_TASK])
        if forwards:
            self.attempt.stats["forwarded"] += len(forwards)
            self.attempt.kfwd.extend(forwards)

    def _post_commit(self) -> None:
        for task, (_, seq) in self.attempt.markers.items():
            self.owned[task][1] = seq
        super()._post_commit()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.writer is not None:
            self.writer.producer.flush(5)
        super().close()

    # ---- one batch ---------------------------------------------------------------------
    def _check_kafka_committed(self) -> None:
        """Cluster mode: the batch is in the changelog (its markers delivered) but its LMDB
        transaction failed. The batch must not be applied again (it would be written to the
        changelog twice): the worker exits, and its restart restores its tasks from the
        changelog, which has the batch."""
        if self.attempt.kafka_done:
            raise ChangelogError(f"worker {self.index}: the LMDB commit failed after the "
                                 "changelog write; restarting to restore from the changelog")

    def _apply(self, batch: Batch, sup_msgs: list, peer_msgs: list) -> bool:
        """The records come from the tasks topic. A record is
        [topic index, partition, offset, key, value, headers, timestamp, slot, task,
        task offset] (origin first, for dead letters and the source's ordering mode), or a
        forwarded update [-1, task, task offset, None, update, ...]; each task's records are
        skipped by their tasks-topic offset.

        Events and forwarded updates are applied in partition order, whatever the batch
        boundaries: a batch replayed after a crash then gives every document the same
        versions with the same content (its change events are re-published identical).
        """
        events: list = []
        forwards: list = []
        through = self.attempt.through
        TT = self.TT
        allowed = self.attempt.allowed
        for records, thr in self._rounds(sup_msgs):
            for rec in records:
                if rec[REC_TASK] not in allowed:
                    continue  # revoked or lost meanwhile: another instance applies it
                tp = (TT, rec[REC_TASK])
                if rec[REC_TASK_OFFSET] <= through.get(tp, self.through.get(tp, -1)):
                    continue
                if rec[REC_TOPIC] < 0:
                    if events:
                        self._apply_events(batch, events)
                        events = []
                    forwards.append(unpack(rec[REC_VALUE]))
                    continue
                if forwards:
                    self._apply_forwards(batch, forwards)
                    forwards = []
                self.attempt.stats["records"] += 1
                ev = self._parse(rec)
                if ev is not None:
                    events.append((ev, rec))
            self._advance_through(thr, allowed)
        if forwards:
            self._apply_forwards(batch, forwards)
        if events:
            self._apply_events(batch, events)
        return self.attempt.stop

    def _apply_forwards(self, batch: Batch, updates: list) -> None:
        """View updates forwarded through the tasks topic, each applied once
        (deduplicated by event identity and feed: a forward is sent again when its sending
        task is restored elsewhere and replays the batch that sent it)."""
        gen = self.bloom.generation
        for u in updates:
            h = identity_hash(u[UPD_SOURCE], f"{u[UPD_ID]}\x00feed:{u[UPD_FEED]}")
            flags = self._bloom_again(h) if self.retrying else self.bloom.check_and_add(h)
            skey = slot_prefix(u[UPD_SLOT]) + h
            if flags[0] and batch.seen(skey):
                self.attempt.stats["duplicates"] += 1
                continue
            batch.mark_seen(skey, gen)
            fwd = Forwarded(u)
            feed = self.plan.feeds[u[UPD_FEED]]
            if self._apply_local(batch, feed, u[UPD_KEY], u[UPD_SLOT], fwd) is None:
                self._dead_letter(fwd.record(), "merge_error", f"view {feed.view}: merge failed")

    # ---- the changelog, restores and drops ---------------------------------------------
    def _writer(self) -> ChangelogWriter:
        if self.writer is None:
            self.writer = ChangelogWriter(self.cfg.kafka.producer_conf(),
                                          self.cfg.changelog_topic(), self._heartbeat)
        return self.writer

    def _write_changelog(self, batch: CapturingBatch) -> None:
        """Each touched task's changes, the forwarded updates and the change events, then,
        once all of them are delivered, each task's marker (changelog.py). The marker
        offsets go into the LMDB transaction, committed right after."""
        by_task = batch.by_task(self.tasks)
        for task, entries in list(by_task.items()):
            if task not in self.attempt.allowed:
                if all(e[0] == DEDUP and e[2] is None for e in entries):
                    del by_task[task]  # pruned dedup ids of a task held as a stale cache
                    continue
                raise ChangelogError(f"worker {self.index}: a batch changed task {task}, "
                                     "which this worker does not own (now)")
        changes = self._change_rows() if self.change_msgs is not None else ()
        if not by_task and not self.attempt.kfwd and not changes:
            return
        w = self._writer()
        markers: dict[int, tuple[int, int]] = {}
        w.begin()
        for task, entries in by_task.items():
            state = self.owned[task]
            markers[task] = (state[0], state[1] + 1)
            w.put_state(task, state[0], state[1] + 1, entries)
        topic = self.topics[self.TT]
        fwd = [(FORWARD_HEADER, b"")]
        for task, update in self.attempt.kfwd:
            w.produce(topic, task, None, pack(update), fwd)
        for _, vid, key, version, data in changes:
            ctopic, kb, value, headers = self.change_msgs.message(vid, key, version, data)
            w.produce(ctopic, None, kb, value, headers)
        offsets = w.commit(markers)
        self.attempt.kafka_done = True
        self.attempt.markers = markers
        for task, (epoch, seq) in markers.items():
            batch.put_meta(meta_name(task), [offsets[task], epoch, seq])

    def _process_with_control(self, msgs: list) -> bool:
        """Ring messages with restores or drops among them: each in its place."""
        stop = False
        run: list = []
        for m in msgs:
            if m[0] in _CONTROL:
                if run:
                    stop = self.process(run, []) or stop
                    run = []
                if m[0] == MSG_RESTORE:
                    for task in m[2]:
                        self._restore(task, m[1])
                        self.task_since[task] = time.time()  # its gap clocks restart
                else:
                    for task in m[2]:
                        self._drop(task)
                self.gate.clear()  # reloaded from the shard: streams of the tasks changed
                self._load_parked()
                self.ctl.set(self.index, Slot.RESTORE_DONE, m[1])
            else:
                run.append(m)
        if run:
            stop = self.process(run, []) or stop
        return stop

    def _restore(self, task: int, rid: int) -> None:
        """Bring the task's state up to date from its changelog and claim it (a new epoch):
        from the offset this shard has applied through, or from the start. Request `rid`
        made the task ours; if the supervisor no longer wants it (revoked meanwhile), the
        restore stops before the claim: a claim now could fence the task's next owner."""
        if self.reader is None:
            conf = self.cfg.kafka.consumer_conf()
            conf["group.id"] = f"{self.cfg.kafka.group_id}.restore"
            self.reader = ChangelogReader(conf, self.cfg.changelog_topic())
        t0 = time.monotonic()
        # the restore writes dedup ids the dedup log does not have: a saved bloom filter
        # would miss them at the next boot (bloom_snapshot.py, 5.)
        if bloom_snapshot.discard(self.shard.path):
            self.snap_seq = None
        while True:
            try:
                done = self._restore_once(task, rid, t0)
                break
            except lmdb.MapFullError:
                if not self.shard.grow():
                    raise ShardError(
                        f"{self.shard.path}: LMDB map full at service.lmdb_max_map_size "
                        f"({self.shard.max_map_size} bytes) while restoring task {task}: "
                        "raise service.lmdb_max_map_size and restart") from None
                # the restore goes on from its last committed chunk
        if done is None:
            log.info("worker %d: task %d was revoked during its restore: not claimed",
                     self.index, task)
            return
        r, epoch = done
        if r.dedup_hashes:
            self.bloom.check_and_add(b"".join(r.dedup_hashes))
        self.save_bloom()  # with the restored ids
        self.owned[task] = [epoch, 0, rid]
        off = self.shard.offsets().get((self.topics[self.TT], task))
        if off is None:
            self.through.pop((self.TT, task), None)
        else:
            self.through[(self.TT, task)] = off
        dt = time.monotonic() - t0
        log.info("worker %d: restored task %d in %.2f s: %d changelog records (%.2f MB), %d "
                 "applied (%.1f MB/s, %.0f records/s); epoch %d, tasks topic through %s",
                 self.index, task, dt, r.records, r.bytes / 1e6, r.applied,
                 r.bytes / 1e6 / max(dt, 1e-6), r.records / max(dt, 1e-6), epoch, off)

    def _restore_once(self, task: int, rid: int, t0: float):
        """One attempt of `_restore`: (Restore, epoch), or None when no longer wanted."""
        timeout = self.cfg.cluster.restore_timeout_ms / 1000
        ctl, me, reader = self.ctl, self.index, self.reader
        r = Restore(self.shard, task, self.bloom.generation)
        log.info("worker %d: restoring task %d from changelog offset %s", me, task,
                 r.pos + 1 if r.pos >= 0 else "0 (no local state)")
        state = {"next": r.start, "records": 0, "bytes": 0, "log_at": t0 + 5}

        def sink(offset, key, value, headers):
            state["next"] = offset + 1
            r.feed(offset, key, value, headers)
            if r.records - state["records"] >= 1000:
                report()

        def report():
            ctl.add(me, Slot.RESTORE_RECORDS, r.records - state["records"])
            ctl.add(me, Slot.RESTORE_BYTES, r.bytes - state["bytes"])
            state["records"], state["bytes"] = r.records, r.bytes
            now = time.monotonic()
            if now >= state["log_at"]:
                state["log_at"] = now + 5
                log.info("worker %d: restoring task %d: %d records (%.1f MB) so far", me, task,
                         r.records, r.bytes / 1e6)

        try:
            fault_point("worker_restore")  # the task's restore starts reading
            reader.read(task, r.start, sink, heartbeat=self._heartbeat, timeout=timeout)
            if self.wanted.get(task) != rid:
                r.finish()  # what was read stays as the local cache
                return None
            epoch = r.max_epoch + 1
            w = self._writer()
            w.begin()
            claim = w.commit({task: (epoch, 0)})[task]
            reader.read(task, state["next"], sink, until=claim, heartbeat=self._heartbeat,
                        timeout=timeout)
            if r.epoch != epoch:
                raise ChangelogError(f"task {task}: claimed epoch {epoch}, but the changelog "
                                     f"ends in epoch {r.epoch} (another owner?)")
            r.finish()
        except BaseException:
            r.abort()
            raise
        finally:
            report()
        return r, epoch

    def _drop(self, task: int) -> None:
        """The task moved to another instance: forget it (the changelog has it all)."""
        self.owned.pop(task, None)
        self.through.pop((self.TT, task), None)
        n = drop_task(self.shard, task, self.tasks, self.topics[self.TT])
        log.info("worker %d: dropped task %d (%d entries)", self.index, task, n)
