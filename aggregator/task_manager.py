"""Cluster mode on the supervisor side: which local worker runs which task, and how a task
gets there (Kafka Streams' TaskManager is the model).

In cluster mode (README "Cluster mode") the consumer reads the internal tasks topic; its
partitions are tasks (cluster.py). `ClusterSupervisor` is the `Supervisor` of that mode: it
overrides the supervisor's named hooks, the way `TaskWorker` overrides `Worker`'s, and leaves
the rest to `TaskManager`, which owns the tasks of this instance:

- placement (placement.py): the local worker of each task, balanced by count, and the local
  moves that keep it balanced (`TaskManager.balance`);
- restore and drop requests (ring control messages, one sequence of request ids for all
  workers) and the shared "wanted" word per task that names the one request whose worker may
  act on the task (cluster.wanted_segment_name);
- the task lifecycle below, and what a gained, revoked, lost or moved task goes through;
- the ingest stage (cluster.Ingest: source records to the tasks topic) and the ownership
  gauge (ownership.py: the group's tasks no live instance serves).

Why a subclass holding a TaskManager, not composition in `Supervisor`: the cluster-mode parts
touch a dozen places of the supervisor's lifecycle (topics, layout check, segments, respawn,
subscription, every round, progress, dispatch, rebalance callbacks, status, stop). As
overrides of named hooks whose defaults do nothing (or the normal-mode thing), supervisor.py
keeps no `if cluster` branch at all, and the worker side reads the same way
(`Worker`/`TaskWorker`). The hooks, in supervisor.py's order: `_consumed_topics`,
`_checkpoint_owner`, `_ensure_topics`, `_before_reshard`, `_segments_created`,
`_rewind_worker`, `_respawned`, `_group_conf`, `_subscriptions`, `_round`, `_dispatch`,
`_progress`, `_on_assign`, `_released`, `_close_intake`, `_add_status`, `_release`.

Task lifecycle (per task this instance owns or is taking over; `TaskState`)::

    assigned, or moved here ──▶ RESTORING ──restore done──▶ RUNNING ◀──restore done──┐
                                   ▲                           │                      │
                                   └──moved to another worker──┤                      │
                                                               └─worker restarted─▶ CATCHING_UP

    revoked or lost: from any state, the task leaves the table and is dropped (not while
    the service stops: then the state stays as it was).

RESTORING: placed on a worker, paused, waiting for its restore (not served, not ready).
RUNNING: restored; its partition is consumed (served by the HTTP API). CATCHING_UP: running,
but its worker restarted and restores it again (served; not ready until done). A revoked or
lost task leaves the table; its drop requests (per task and worker) are tracked apart, since
a task moved between workers is dropped on one while it restores on the other.

Invariants (kept from the supervisor): a task is placed on at most one worker
(placement.py); a task's partition is consumed only once a restore on its worker finished;
the old worker of a moved task drains, commits and stops acting on it ("wanted" = 0) before
the new one is asked to restore it.
"""

from __future__ import annotations

import enum
import logging
import shutil
import time
from collections.abc import Callable

import msgpack
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from . import reshard
from .cluster import (
    FORWARD_HEADER,
    ORIGIN_HEADER,
    ClusterError,
    Ingest,
    ensure_topics,
    owners_topic_of,
    wanted_segment_name,
)
from .config import Config
from .control import Slot
from .faults import fault_flag
from .kafka_clients import quiet
from .ownership import Ownership
from .placement import Placement
from .protocol import MSG_DROP, MSG_RESTORE
from .ring import SharedCounters
from .supervisor import FatalError, Supervisor, WorkerHandle

log = logging.getLogger(__name__)


class TaskState(enum.Enum):
    """A task's place in its lifecycle (see the module docstring); each member lists the
    states it may go to next (leaving the table — revoked or lost — is always legal)."""

    RESTORING = "restoring"
    RUNNING = "running"
    CATCHING_UP = "catching_up"

    @property
    def next(self) -> frozenset[TaskState]:
        return _NEXT[self]

    @property
    def served(self) -> bool:
        """Its partition is consumed and its keys are served here."""
        return self is not TaskState.RESTORING


_NEXT = {
    TaskState.RESTORING: frozenset({TaskState.RESTORING, TaskState.RUNNING}),
    TaskState.RUNNING: frozenset({TaskState.RESTORING, TaskState.CATCHING_UP}),
    # RESTORING: gained again after a revoke that came while stopping (no release then)
    TaskState.CATCHING_UP: frozenset({TaskState.CATCHING_UP, TaskState.RUNNING,
                                      TaskState.RESTORING}),
}


class TaskManager:
    """The tasks of this instance: their states, placement, restore and drop requests (see
    the module docstring). Works on its supervisor's consumer, rings and checkpoint."""

    def __init__(self, sup: ClusterSupervisor, config: Config):
        self.sup = sup
        self.cfg = config
        self.tasks = config.cluster.tasks
        self.TT = len(config.topics())  # the tasks topic's index in the consumed topics
        self.state: dict[int, TaskState] = {}
        self.restoring: dict[int, tuple[int, float]] = {}  # task -> (request id, since)
        # restore/drop request ids: one sequence for all workers, so that a task's
        # "wanted" word names one request of one worker
        self.last_request = 0
        # (task, worker) -> drop request id not yet handled
        self.dropping: dict[tuple[int, int], int] = {}
        self.placement = Placement(sup.workers)  # task -> local worker (placement.py)
        self.ownership: Ownership | None = None
        self.ingest: Ingest | None = None
        self.unowned: list[int] = []  # the group's tasks no live instance serves
        self.wanted: SharedCounters | None = None

    # ---- states -----------------------------------------------------------------------------
    def _enter(self, task: int, new: TaskState) -> None:
        old = self.state.get(task)
        if old is not None and new not in old.next:
            raise AssertionError(f"task {task}: {old.name} -> {new.name} is not a transition")
        self.state[task] = new

    def _leave(self, task: int) -> None:
        self.state.pop(task, None)

    def owned(self) -> list[int]:
        """Tasks restored here: consumed and served (RUNNING or CATCHING_UP)."""
        return sorted(t for t, s in self.state.items() if s.served)

    def in_restore(self) -> bool:
        """A restore is under way (readiness is false meanwhile)."""
        return bool(self.restoring) or any(
            s is TaskState.RESTORING for s in self.state.values())

    # ---- start and stop ---------------------------------------------------------------------
    def ensure_topics(self) -> None:
        try:
            ensure_topics(self.cfg)
        except ClusterError as e:
            raise FatalError(str(e)) from None
        log.info("cluster mode: %d tasks (topics %s, %s)", self.tasks,
                 self.cfg.tasks_topic(), self.cfg.changelog_topic())

    def create_segments(self, prefix: str) -> None:
        self.wanted = SharedCounters.create(wanted_segment_name(prefix), self.tasks)

    def release_segments(self) -> None:
        if self.wanted is not None:
            self.wanted.close()
            self.wanted.unlink()
            self.wanted = None

    def start(self, conf: dict, dlq) -> None:
        """The ingest stage and the ownership gauge (after the broker answered)."""
        self.ingest = Ingest(self.cfg, dlq)
        owners_conf, _ = quiet(self.cfg.kafka.producer_conf(), "ownership producer")
        self.ownership = Ownership(conf, owners_conf, owners_topic_of(self.cfg), self.tasks)

    def close(self, clean: bool) -> None:
        """Hand the source partitions over and leave the ownership gauge; on an abort
        (`clean` false) errors are ignored."""
        if self.ingest is not None:
            try:
                self.ingest.close()
            except Exception:  # noqa: BLE001 - stopping anyway
                if clean:
                    raise
            self.ingest = None
        if self.ownership is not None:
            try:
                self.ownership.close(clean=clean)
            except Exception:  # noqa: BLE001 - stopping anyway
                if clean:
                    raise
            self.ownership = None

    # ---- every round, every progress tick ----------------------------------------------------
    def step(self, max_records: int) -> None:
        if self.ingest is not None:
            self.ingest.step(max_records)
            self.check_restores()

    def tick(self) -> None:
        self.balance()
        self.unowned = self.ownership.tick(set(self.owned()))

    # ---- requests to workers ------------------------------------------------------------------
    def _send_control(self, kind: int, by_worker: dict[int, list[int]]) -> dict[int, int]:
        """Send restore or drop requests for tasks to the given workers, in ring order with
        their records. Returns task -> request id. A restore's tasks are "wanted" by its
        request before the worker can see it: a worker that finished reading the changelog
        first would not claim them (it takes them for revoked), yet report the restore
        done."""
        sup = self.sup
        out = {}
        for w, ts in sorted(by_worker.items()):
            self.last_request += 1
            rid = self.last_request
            ts = sorted(ts)
            if kind == MSG_RESTORE:
                for t in ts:
                    self.wanted.set(t, rid)
            h = sup.handles[w]
            msg = sup._packer.pack([kind, rid, ts])
            if h.pending or not sup.inbound[w].try_put(msg):
                h.pending.append(msg)
                sup._set_paused(True)
            out.update((t, rid) for t in ts)
        return out

    def restore(self, tasks: list[int]) -> None:
        """Have the owning workers restore `tasks` from the changelog (readiness is false
        until they are done; `check_restores` resumes them)."""
        now = time.monotonic()
        by_worker: dict[int, list[int]] = {}
        for t in tasks:
            by_worker.setdefault(self.placement.worker_of[t], []).append(t)
        for t, rid in self._send_control(MSG_RESTORE, by_worker).items():
            self.restoring[t] = (rid, now)
        log.info("restoring %d tasks: %s", len(tasks),
                 ", ".join(f"{t} on worker {self.placement.worker_of[t]}" for t in sorted(tasks)))

    def drop_on(self, worker: int, tasks: list[int]) -> None:
        """Have `worker` delete its local state of `tasks` (after a revoke or a move, or a
        cache of a task placed on another worker)."""
        for t, rid in self._send_control(MSG_DROP, {worker: tasks}).items():
            self.dropping[(t, worker)] = rid

    def check_restores(self) -> None:
        """Forget the drop requests the workers handled; resume the tasks whose restore is
        done at their restored offsets (RESTORING or CATCHING_UP -> RUNNING)."""
        sup = self.sup
        for (t, w), rid in list(self.dropping.items()):
            if sup.ctl.get(w, Slot.RESTORE_DONE) >= rid:
                del self.dropping[(t, w)]
        if not self.restoring:
            return
        wof = self.placement.worker_of
        done = [t for t, (rid, _) in self.restoring.items()
                if sup.ctl.get(wof[t], Slot.RESTORE_DONE) >= rid]
        if not done:
            limit = self.cfg.cluster.restore_timeout_ms / 1000 + 60
            for t, (_, since) in self.restoring.items():
                if time.monotonic() - since > limit:
                    raise FatalError(f"task {t} was not restored within {limit:.0f} s")
            return
        durable = {w: sup._shard_offsets(w) for w in {wof[t] for t in done}}
        topic = sup.topics[self.TT]
        for t in done:
            _, since = self.restoring.pop(t)
            tp = (self.TT, t)
            if tp not in sup.assigned and self.state.get(t) is not TaskState.RESTORING:
                continue  # revoked meanwhile
            off = durable[wof[t]].get(tp)
            start = 0 if off is None else off + 1
            part = TopicPartition(topic, t, start)
            if start > sup.next_offset.get(tp, 0):  # after a local move: always (-1)
                sup.consumer.seek(part)
                sup.next_offset[tp] = start
            sup.checkpoint.assign(tp, start, [off if w == wof[t] else None
                                              for w in range(sup.workers)])
            sup.assigned.add(tp)
            self._enter(t, TaskState.RUNNING)
            if not sup.paused:
                sup.consumer.resume([part])
            log.info("task %d restored on worker %d in %.2f s: consuming %s[%d] from %d", t,
                     wof[t], time.monotonic() - since, topic, t, start)

    # ---- rebalance: tasks gained, released, moved ---------------------------------------------
    def assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Tasks gained. Each is placed on a local worker (placement.py: balanced by count,
        preferring the worker whose shard has its state; other workers' copies are dropped),
        starts paused at what that shard has (a lower bound), restores from the changelog,
        then resumes at its restored offset (`check_restores`)."""
        sup, TT = self.sup, self.TT
        durable = {w: sup._shard_offsets(w) for w in range(sup.workers)}
        cached: dict[int, int] = {}
        for tp in partitions:
            offs = {w: d[(TT, tp.partition)] for w, d in durable.items()
                    if (TT, tp.partition) in d}
            if offs:
                cached[tp.partition] = max(offs, key=lambda w: (offs[w], -w))
        placed = self.placement.place([tp.partition for tp in partitions], cached)
        if fault_flag("placement-one-worker"):  # tests: skewed, for balance to fix
            for t in placed:
                self.placement.move(t, 0)
                placed[t] = 0
        stale: dict[int, list[int]] = {}
        tasks = []
        for tp in partitions:
            key = (TT, tp.partition)
            for w in range(sup.workers):
                if w != placed[tp.partition] and key in durable[w]:
                    stale.setdefault(w, []).append(tp.partition)
            off = durable[placed[tp.partition]].get(key)
            tp.offset = OFFSET_BEGINNING if off is None else off + 1
            sup.next_offset[key] = 0 if off is None else off + 1
            self._enter(tp.partition, TaskState.RESTORING)
            tasks.append(tp.partition)
        log.info("assigned tasks %s; tasks per worker now %s", sorted(tasks),
                 self.placement.counts())
        consumer.incremental_assign(partitions)
        consumer.pause(partitions)
        for w, ts in sorted(stale.items()):
            log.info("worker %d drops its copies of tasks %s (placed on other workers)", w, ts)
            self.drop_on(w, ts)
        self.restore(tasks)

    def release(self, keys: set, why: str) -> None:
        """Tasks revoked or lost: their workers delete them."""
        tasks = [p for _, p in keys]
        for t in tasks:
            self._leave(t)
            self.restoring.pop(t, None)
            self.wanted.set(t, 0)  # before anything else: the workers stop acting on it
        by_worker: dict[int, list[int]] = {}
        for t, w in self.placement.remove(tasks).items():
            by_worker.setdefault(w, []).append(t)
        for w, ts in sorted(by_worker.items()):
            self.drop_on(w, ts)
        log.info("%s tasks %s: dropping their local state; tasks per worker now %s", why,
                 sorted(tasks), self.placement.counts())

    def balance(self) -> None:
        """Move tasks between local workers until their counts differ by at most one
        (placement.py), once no restore is under way. A move: the task's partition is
        paused, every worker drains and commits (the old worker's last batch of the task is
        in the changelog), the task's offsets are committed, the old worker stops acting on
        it ("wanted" = 0) and drops it, the new one restores it from the changelog and claims
        it (RUNNING -> RESTORING). One task is on one worker at a time: its keys keep their
        order."""
        sup = self.sup
        if self.in_restore() or sup.stop_requested:
            return
        moves = self.placement.moves()
        if not moves:
            return
        tasks = [t for t, _, _ in moves]
        keys = {(self.TT, t) for t in tasks}
        topic = sup.topics[self.TT]
        sup.consumer.pause([TopicPartition(topic, t) for t in tasks])
        sup._drain(deadline=time.monotonic() + sup.svc.shutdown_timeout_ms / 1000)
        sup._commit(asynchronous=False, only=keys & sup.assigned)
        sup.assigned -= keys
        by_worker: dict[int, list[int]] = {}
        for t, old, new in moves:
            self.wanted.set(t, 0)  # the old worker stops acting on it
            by_worker.setdefault(old, []).append(t)
            self.placement.move(t, new)
            self._enter(t, TaskState.RESTORING)
            sup.next_offset[(self.TT, t)] = -1  # seek to the restored offset
        for w, ts in sorted(by_worker.items()):
            self.drop_on(w, ts)
        log.info("moving tasks between local workers: %s; tasks per worker now %s",
                 ", ".join(f"{t} {a}->{b}" for t, a, b in moves), self.placement.counts())
        self.restore(tasks)

    # ---- a worker restarted -----------------------------------------------------------------
    def partitions_of(self, worker: int) -> set[tuple[int, int]]:
        """The assigned tasks-topic partitions of the tasks placed on `worker`."""
        placed = set(self.placement.tasks_of(worker))
        return {tp for tp in self.sup.assigned if tp[1] in placed}

    def respawned(self, worker: int) -> None:
        """The worker's rings were reset: send again what the dead worker missed (its drops,
        and the restores of its tasks: RUNNING -> CATCHING_UP, RESTORING stays)."""
        drops = sorted(t for t, w in self.dropping if w == worker)
        if drops:
            self.drop_on(worker, drops)
        placed = set(self.placement.tasks_of(worker))
        mine = {p for _, p in self.partitions_of(worker)}
        pending = {t for t in placed if self.state.get(t) is TaskState.RESTORING}
        tasks = sorted(mine | pending)
        for t in tasks:
            self.restoring.pop(t, None)
            if self.state.get(t) is TaskState.RUNNING:
                self._enter(t, TaskState.CATCHING_UP)
        if tasks:
            self.restore(tasks)

    # ---- status -------------------------------------------------------------------------------
    def add_status(self, status: dict, ready: bool) -> None:
        status["tasks"] = self.owned()
        status["placement"] = self.placement.snapshot()
        status["unowned"] = self.unowned
        status["restoring"] = sorted(self.restoring)
        status["ready"] = ready and not self.in_restore()


class Holes:
    """Holes in what the consumer returned of the tasks topic.

    The tasks topic has no transactions and is not compacted, so its offsets have no gaps:
    a record at an offset past the next one expected means the fetch left records out. The
    embedded test broker (Tansu 0.6) does: at the end of a partition that several producers
    write, a fetch response can miss one record batch in the middle, which librdkafka passes
    over as it would a compacted range (a read of the partition later has it). Its records
    would never be applied. `check` says where to read the partition again from; a hole that
    retention also removed from the log (its start moved past it) is let be, with a
    warning; so is one read again `TRIES` times in a row, with an error (offsets that are
    really missing: a compacted or transactional topic given as the tasks topic), rather
    than stall the task."""

    TRIES = 5

    def __init__(self, topic: str, low_watermark: Callable[[int], int]):
        self.topic = topic
        self.low_watermark = low_watermark  # task -> the partition's first offset, -1: unknown
        self.count = 0  # holes read again
        self._logged = 0.0
        self._same: tuple[int, int, int, int] = (-1, -1, -1, 0)  # task, want, off, tries

    def check(self, task: int, want: int, off: int) -> int | None:
        """A record at `off` came where `want` was next (want < off): the offset to read
        partition `task` again from, or None to go on (the hole is gone from the log)."""
        low = self.low_watermark(task)
        if low >= off:
            log.warning("tasks topic %s[%d]: records %d..%d were deleted before they were "
                        "read (the partition starts at %d now)", self.topic, task, want,
                        off - 1, low)
            return None
        t, w, o, tries = self._same
        tries = tries + 1 if (t, w, o) == (task, want, off) else 1
        self._same = (task, want, off, tries)
        if tries > self.TRIES:
            log.error("tasks topic %s[%d]: offsets %d..%d are missing from every read (%d "
                      "tries): going on without them (is the topic compacted, or written "
                      "in transactions?)", self.topic, task, want, off - 1, self.TRIES)
            self._same = (-1, -1, -1, 0)
            return None
        start = max(want, low)
        self.count += 1
        now = time.monotonic()
        if now >= self._logged:
            self._logged = now + 10
            log.warning("tasks topic %s[%d]: a fetch skipped offsets %d..%d: reading again "
                        "from %d (%d such holes so far)", self.topic, task, want, off - 1,
                        start, self.count)
        return start


class ClusterSupervisor(Supervisor):
    """The supervisor in cluster mode: consumes the tasks topic, whose partitions are tasks,
    and leaves the tasks to its `TaskManager` (see the module docstring)."""

    def __init__(self, config: Config, **kwargs):
        super().__init__(config, **kwargs)
        self.tm = TaskManager(self, config)
        self.TT = self.tm.TT
        self.hole_check = Holes(config.tasks_topic(), self._low_watermark)
        # tests: the round leaves out one forward per task, as the test broker's fetch
        # sometimes leaves out a record batch (`Holes`): the tasks it already did
        self.skip_fault: set[int] | None = set() if fault_flag("tasks-fetch-hole") else None

    def _consumed_topics(self, config: Config) -> list[str]:
        return config.topics() + [config.tasks_topic()]

    def _checkpoint_owner(self):
        return lambda tp: self.tm.placement.worker_of.get(tp[1], 0)

    def _ensure_topics(self) -> None:
        self.tm.ensure_topics()

    def _before_reshard(self) -> None:
        old = reshard.current_workers(self.data_dir)
        if old is not None and old != self.workers:
            # the shards are a cache of the tasks' changelogs: start empty, restore
            for path in self.data_dir.glob("shard-*"):
                shutil.rmtree(path)
            log.warning("cluster mode: the data directory was written by %d workers, now "
                        "%d: local state discarded; the tasks are restored from their "
                        "changelogs", old, self.workers)

    def _segments_created(self) -> None:
        self.tm.create_segments(self.prefix)

    def _rewind_worker(self, h: WorkerHandle, durable: dict) -> None:
        # only its own tasks; they are restored again (catch-up, `_respawned`)
        self._rewind(durable, self.tm.partitions_of(h.index))

    def _respawned(self, h: WorkerHandle) -> None:
        self.tm.respawned(h.index)

    def _group_conf(self, conf: dict) -> dict:
        return {**conf, "group.id": f"{self.cfg.kafka.group_id}.tasks"}

    def _subscriptions(self, conf: dict) -> list[str]:
        self.tm.start(conf, self.dlq)
        self.events_in = self.tm.ingest.events_in
        return [self.cfg.tasks_topic()]

    def _round(self) -> None:
        self.tm.step(self.svc.batch_max_records)

    def _progress(self) -> None:
        self.tm.tick()

    def _dispatch(self, msgs: list) -> None:
        """Records of the tasks topic to the worker of their task (see
        worker._apply_tasks for the record layout). Each worker gets the through-offsets of
        its own tasks only (it alone acknowledges them: Checkpoint's owner)."""
        n, TT = self.workers, self.TT
        wof = self.tm.placement.worker_of
        per: list[list] = [[] for _ in range(n)]
        through: dict[tuple[int, int], int] = {}
        holes: set[int] = set()  # tasks read again from before a hole: the rest waits
        unpackb = msgpack.unpackb
        if self.skip_fault is not None:
            msgs = self._skip_a_forward(msgs)
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self._consumer_error(err)
                continue
            task, off = m.partition(), m.offset()
            w = wof.get(task)
            if w is None:  # not ours (any more): not consumed from a revoked partition
                continue
            if task in holes:
                continue
            tp = (TT, task)
            want = through[tp] + 1 if tp in through else self.next_offset.get(tp, -1)
            if 0 <= want < off and self._hole(task, want, off):
                holes.add(task)
                continue
            through[tp] = off
            headers = m.headers()
            name, hv = headers[-1] if headers else ("", b"")
            if name == ORIGIN_HEADER:
                ti, part, src_off, slot = unpackb(hv)
                rec = (ti, part, src_off, m.key(), m.value(), headers[:-1] or None,
                       m.timestamp()[1], slot, task, off)
            elif name == FORWARD_HEADER:
                rec = (-1, task, off, None, m.value(), None, 0, -1, task, off)
            else:
                log.error("tasks topic %s[%d]@%d: a record without our headers (ignored)",
                          self.topics[TT], task, off)
                continue
            per[w].append(rec)
        if not through:
            return
        self.stats.consumed += len(msgs)
        for tp, off in through.items():
            if tp[1] not in holes:  # else where `_hole` sought to
                self.next_offset[tp] = off + 1
        for h in self.handles:
            mine = {tp: o for tp, o in through.items() if wof[tp[1]] == h.index}
            if not mine:
                continue
            thr = [[ti, p, o] for (ti, p), o in mine.items()]
            ring = self.inbound[h.index]
            for bid, msg, last in self._encode(h, per[h.index], thr):
                self.checkpoint.dispatched(h.index, bid, mine if last else None)
                if h.pending or not ring.try_put(msg):
                    h.pending.append(msg)
        if any(h.pending for h in self.handles):
            self._set_paused(True)

    def _skip_a_forward(self, msgs: list) -> list:
        """Fault `tasks-fetch-hole`: leave out the first forward of each task that a later
        record of the same task follows in the round (once per task)."""
        last = {m.partition(): i for i, m in enumerate(msgs) if m.error() is None}
        for i, m in enumerate(msgs):
            task = m.partition()
            if m.error() is None and task not in self.skip_fault and i < last[task]:
                h = m.headers()
                if h and h[-1][0] == FORWARD_HEADER:
                    self.skip_fault.add(task)
                    log.warning("fault tasks-fetch-hole: offset %d of task %d left out",
                                m.offset(), task)
                    return msgs[:i] + msgs[i + 1:]
        return msgs

    def _hole(self, task: int, want: int, off: int) -> bool:
        """A record of the tasks topic at `off` where `want` was next (see `Holes`)."""
        start = self.hole_check.check(task, want, off)
        if start is None:
            return False
        self.consumer.seek(TopicPartition(self.topics[self.TT], task, start))
        self.next_offset[(self.TT, task)] = start
        return True

    def _low_watermark(self, task: int) -> int:
        """The first offset the tasks topic's partition `task` still has (-1: unknown)."""
        try:
            low, _ = self.consumer.get_watermark_offsets(
                TopicPartition(self.topics[self.TT], task), timeout=5, cached=False)
        except KafkaException:
            return -1
        return low

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.tm.assign(consumer, partitions)

    def _released(self, keys: set, why: str) -> None:
        if not self.stop_requested:
            self.tm.release(keys, why)

    def _close_intake(self, clean: bool) -> None:
        self.tm.close(clean)

    def _add_status(self, status: dict, ready: bool) -> None:
        self.tm.add_status(status, ready)

    def _release(self) -> None:
        tm = getattr(self, "tm", None)
        if tm is not None:
            tm.release_segments()
        super()._release()
