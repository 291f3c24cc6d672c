"""The supervisor: consumes Kafka, routes records to workers, owns the worker lifecycle.

Routing: the routing key (`partitionkey` extension, else the Kafka key) → slot → worker; one
ring message per worker per consumed round, carrying that worker's records as binary frames
(frames.FrameRouter, compiled; protocol.py has the format) and the round's "through" offsets
(the last offset consumed per partition). A worker that commits a message
has durably handled everything routed to it up to those offsets.

Commit (see checkpoint.py): Kafka offsets are committed only up to the minimum over workers
of their acknowledged through-offsets. LMDB is the source of truth: on assignment the start
offset of a partition is the minimum over shards of their stored through-offset + 1 (the
beginning if a shard has none), and each shard skips records at or below its own.

Lifecycle (in the shape of gunicorn's arbiter): check every Kafka client's settings
(kafka_clients), spawn workers, reap dead ones and respawn them after rewinding the
partitions to the dead shard's durable offsets, kill workers whose heartbeat stops, stop with
a clear error (exit 2) when a worker cannot boot, crashes the same way
`service.max_worker_crashes` times in a row, or no broker answers within
`kafka.startup_timeout_s`, and on SIGTERM/SIGINT drain, commit and exit 0.

Cluster mode is a subclass, `task_manager.ClusterSupervisor`, which overrides the hooks at
the end of `Supervisor` (their defaults are the normal mode's) and leaves the tasks to its
`TaskManager`; the same way `TaskWorker` extends `Worker`. The command line picks the class.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import msgpack
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from . import core, datadir, memory, reshard
from .checkpoint import Checkpoint
from .client_check import check_client_settings
from .config import Config
from .control import Slot
from .deadletter import DeadLetters
from .devtools.latency_trace import open_trace
from .faults import fault_point
from .frames import FrameRouter
from .kafka_clients import KafkaSettingsError, consume_ready, quiet
from .mapping import plans_by_topic, route
from .metrics import partition_label, remove_status, write_status
from .protocol import (
    FATAL_EXIT,
    MSG_STOP,
    create_segments,
    frame_records,
    peer_ring_bytes,
)
from .ring import Ring, cleanup_stale, segment_prefix
from .runtime import tune_gc
from .segments import OWNER_SUFFIX, SegmentOwner, SegmentOwnerError, sweep_orphans
from .server import ServerStartError, start_server_process
from .store import Shard, shard_path
from .worker_process import worker_main

log = logging.getLogger(__name__)


class FatalError(RuntimeError):
    """The service cannot continue (a worker cannot boot, the data dir is locked...)."""


@dataclass
class WorkerHandle:
    index: int
    process: multiprocessing.Process | None = None
    epoch: int = 0  # the EPOCH the running process reached at boot
    started: float = 0.0
    failures: int = 0  # consecutive boot failures
    crashes: int = 0  # consecutive crashes after boot with the same error and no progress
    last_error: str | None = None  # what the last crash after boot said (see worker_main)
    errors: object = None  # the read end of the pipe the running process reports a crash on
    acked_at_spawn: int = 0  # its ACK_BATCH slot when it was spawned
    reaped: int | None = None  # pid of the process `_reap` last handled
    killed_at: float = 0.0  # monotonic time of a SIGKILL the process has not died of yet
    kill_logged: float = 0.0  # when _await_death last said so
    next_batch: int = 1
    pending: list = field(default_factory=list)  # encoded messages the ring had no room for


@dataclass
class Stats:
    """Totals over all workers, for progress output and metrics: records..forwarded are the
    shards' totals (control.TOTAL_SLOTS), the others count since the supervisor started."""

    records: int = 0
    applied: int = 0
    duplicates: int = 0
    stale: int = 0
    parked: int = 0
    gaps_skipped: int = 0
    deadlettered: int = 0
    forwarded: int = 0
    consumed: int = 0
    restarts: int = 0
    pauses: int = 0  # times the partitions were paused because a worker's ring was full
    commits: int = 0  # LMDB write transactions committed by the workers since they started
    commit_ms: float = 0.0  # wall time the workers spent in those commits
    committed: dict = field(default_factory=dict)


class Supervisor:
    """The supervisor of normal mode (cluster mode: task_manager.ClusterSupervisor)."""

    def __init__(self, config: Config, *, log_level: int = logging.INFO, log_format: str = "text",
                 on_progress: Callable[[Stats], None] | None = None,
                 stop_when: Callable[[Stats], bool] | None = None):
        if config.cluster.enabled and type(self) is Supervisor:
            raise TypeError("cluster mode runs task_manager.ClusterSupervisor")
        self.cfg = config
        self.svc = config.service
        self.workers = config.service.workers  # the worker count; `handles`: their processes
        self.log_level = log_level
        self.log_format = log_format  # logs.py: handed to every spawned process
        self.on_progress = on_progress
        self.stop_when = stop_when
        self.data_dir = Path(self.svc.data_dir).resolve()
        self.prefix = segment_prefix(str(self.data_dir))
        self.topics = self._consumed_topics(config)
        self.tindex = {t: i for i, t in enumerate(self.topics)}
        # per topic index: the source reads structured = "detect" (envelope.routing_key)
        detect = {s.topic for s in config.sources.values() if s.structured == "detect"}
        self.detect = [t in detect for t in self.topics]
        # per topic index: the input mapping of a non-CloudEvents source (mapping.route)
        self.maps = plans_by_topic(config, self.topics)
        self.source_of = [config.source_by_topic(t)[0] if t in config.topics() else None
                          for t in self.topics]
        self.router = None if config.cluster.enabled else self._new_router()
        self.handles = [WorkerHandle(i) for i in range(self.workers)]
        self.stop_requested = False
        self.aborting = False  # _abort: the revoke of consumer.close() must not drain
        self.missing_topics: list[str] = []  # source topics absent at start-up (named once)
        self.paused = False
        self.assigned: set[tuple[int, int]] = set()
        self.next_offset: dict[tuple[int, int], int] = {}
        self.stats = Stats()
        self.start_stats = Stats()  # the totals when the workers had booted (this run: the rest)
        self.checkpoint = Checkpoint(self.workers, self._checkpoint_owner())
        self._lock_fd: int | None = None
        self._rings: list[Ring] = []
        self.http = None
        self.hist = None
        self.events_in = {config.source_by_topic(t)[0]: 0 for t in config.topics()}
        self._status_failing = False  # the status file could not be written (full disk)
        self.trace = open_trace("supervisor")  # bench only (devtools/latency_trace.py)
        if self.trace is not None:
            self.trace.write("topics", self.topics)

    # ---- lifecycle ------------------------------------------------------------------------
    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or `stop_when`); 0 on a clean stop."""
        self._install_signals()
        try:
            self._consumer_conf()  # kafka.bootstrap_servers is set
            try:
                check_client_settings(self.cfg)
            except KafkaSettingsError as e:
                raise FatalError(str(e)) from None
            self._lock_data_dir()
            self._check_layout()
            self._ensure_topics()
            self._create_segments()
            self._start_workers()
            self._refresh_stats()  # the shards' totals, published by the booted workers
            self.start_stats = replace(self.stats)
            try:
                self.http = start_server_process(self.cfg, log_level=self.log_level,
                                                 log_format=self.log_format)
            except ServerStartError as e:
                raise FatalError(str(e)) from None
            tune_gc()
            self._consume_loop()
            self._shutdown()
            return 0
        except FatalError as e:
            log.error("%s", e)
            self._abort()
            return 2
        except BaseException:
            log.exception("supervisor failed: stopping the workers")
            self._abort()
            raise
        finally:
            self._release()

    def request_stop(self, *_args) -> None:
        if self.stop_requested:
            return
        log.info("stop requested: draining")
        self.stop_requested = True
        if getattr(self, "consumer", None) is not None:
            self._write_status(ready=False)

    def _install_signals(self) -> None:
        try:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        except ValueError:  # not the main thread (tests running the supervisor in a thread)
            pass

    def _lock_data_dir(self) -> None:
        try:
            datadir.create(self.data_dir)
            fd = os.open(self.data_dir / "LOCK", os.O_RDWR | os.O_CREAT, datadir.FILE_MODE)
        except datadir.DataDirError as e:
            raise FatalError(str(e)) from None
        except OSError as e:
            raise FatalError(f"data dir {self.data_dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FatalError(f"data_dir {self.data_dir} is in use by another aggregator") from None
        self._lock_fd = fd

    def _check_layout(self) -> None:
        """Reshard the data dir if it was written for another worker count (reshard.py),
        holding the LOCK, before anything starts."""
        self._before_reshard()
        try:
            reshard.ensure_layout(self.cfg, self.data_dir, self.workers,
                                  dead_letters=lambda: DeadLetters(self.cfg, self.topics))
        except reshard.ReshardError as e:
            raise FatalError(f"data_dir {self.data_dir}: {e}") from None
        core.IMPLEMENTATION  # noqa: B018 - import fails loudly if the compiled core is missing
        log.info("core implementation: %s; %d workers; data_dir %s",
                 core.IMPLEMENTATION, self.workers, self.data_dir)

    def _create_segments(self) -> None:
        """Take the prefix's owner file (segments.py), remove what a previous run on this
        data dir left, and what any instance on this machine that died left, then create."""
        try:
            self.segment_owner = SegmentOwner.acquire(self.prefix, str(self.data_dir))
        except SegmentOwnerError as e:
            raise FatalError(str(e)) from None
        removed = cleanup_stale(self.prefix, keep=(self.prefix + OWNER_SUFFIX,))
        if removed:
            log.warning("removed %d shared-memory segments left by a previous run", len(removed))
        for prefix, rec in sweep_orphans(keep=self.prefix).items():
            log.warning("removed %d shared-memory segments (%s*) of a dead instance (pid %s, "
                        "data_dir %s)", len(rec["removed"]), prefix, rec.get("pid"),
                        rec.get("data_dir"))
        seg = create_segments(self.prefix, self.workers, self.svc.ring_bytes,
                              peer_ring_bytes(self.svc.ring_bytes, self.svc.max_record_bytes))
        self.ctl, self.hist, self.inbound, self._rings = seg.ctl, seg.hist, seg.inbound, seg.rings
        self._segments_created()
        self.max_message = min(r.max_message for r in self.inbound)
        self._packer = msgpack.Packer(use_bin_type=True)

    def _start_workers(self) -> None:
        for h in self.handles:
            self._spawn(h)
        deadline = time.monotonic() + 120
        for h in self.handles:
            while self.ctl.get(h.index, Slot.EPOCH) < h.epoch:
                if not h.process.is_alive():
                    self._reap(h)  # raises FatalError after repeated boot failures
                if time.monotonic() > deadline:
                    raise FatalError(f"worker {h.index} did not boot within 120 s")
                time.sleep(0.01)

    def _spawn(self, h: WorkerHandle) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.inbound[h.index].reset()  # its consumer is dead: safe to reset
        h.pending.clear()
        h.epoch = self.ctl.get(h.index, Slot.EPOCH) + 1
        h.acked_at_spawn = self.ctl.get(h.index, Slot.ACK_BATCH)
        if h.errors is not None:
            h.errors.close()
        h.errors, send_end = ctx.Pipe(duplex=False)
        h.process = ctx.Process(target=worker_main, name=f"aggregator-worker-{h.index}",
                                args=(self.cfg, h.index, self.prefix, self.log_level,
                                      self.log_format, send_end))
        h.process.start()
        send_end.close()
        h.started = time.monotonic()

    def _reap(self, h: WorkerHandle) -> None:
        """A worker died: rewind its partitions to its durable offsets and respawn it.

        Only once the process is gone: never two workers of one index (its rings are
        single-consumer, and `_spawn` resets them)."""
        if h.process.is_alive() or h.reaped == h.process.pid:
            return
        h.reaped = h.process.pid  # once per process, even when this raises FatalError
        h.killed_at = 0.0
        code = h.process.exitcode
        booted = self.ctl.get(h.index, Slot.EPOCH) >= h.epoch
        log.error("worker %d (pid %s) exited with code %s%s", h.index, h.process.pid, code,
                  "" if booted else " before it booted")
        h.process.join(0)
        if code == FATAL_EXIT:
            raise FatalError(f"worker {h.index} stopped with a fatal error (see above)")
        h.failures = 0 if booted else h.failures + 1
        if h.failures >= self.svc.max_boot_failures:
            raise FatalError(f"worker {h.index} failed to boot {h.failures} times in a row")
        if booted:
            self._count_crash(h)
        self.stats.restarts += 1
        durable = self._shard_offsets(h.index)
        self.checkpoint.reset_worker(h.index, durable)
        self._rewind_worker(h, durable)
        time.sleep(min(0.1 * 2 ** max(h.failures, h.crashes), 5.0))
        self._spawn(h)
        self._respawned(h)

    def _count_crash(self, h: WorkerHandle) -> None:
        """A booted worker died: a run of `service.max_worker_crashes` deaths with the same
        error and no batch committed in between is not going to heal by respawning (a bad
        setting, a bug meeting the same record): stop with a fatal error instead."""
        error = None
        try:
            if h.errors is not None and h.errors.poll():
                error = h.errors.recv()
        except (EOFError, OSError):
            pass
        progressed = self.ctl.get(h.index, Slot.ACK_BATCH) > h.acked_at_spawn
        if error is None:
            h.crashes = 0
        elif error == h.last_error and not progressed:
            h.crashes += 1
        else:
            h.crashes = 1
        h.last_error = error
        if h.crashes >= self.svc.max_worker_crashes:
            raise FatalError(
                f"worker {h.index} crashed {h.crashes} times in a row after booting, each "
                f"time with the same error and no batch committed: {error}; stopping "
                f"(service.max_worker_crashes = {self.svc.max_worker_crashes})")
        if h.crashes > 1:
            log.warning("worker %d crashed %d times in a row with the same error (at %d the "
                        "service stops)", h.index, h.crashes, self.svc.max_worker_crashes)

    def _rewind(self, durable: dict[tuple[int, int], int], only: set | None = None) -> None:
        """Seek every assigned partition (or those in `only`) back to what the given shard
        has durably applied."""
        for tp in sorted(self.assigned if only is None else only):
            start = durable.get(tp)
            start = self.checkpoint.assign_start.get(tp, 0) if start is None else start + 1
            if start < self.next_offset.get(tp, 0):
                topic = self.topics[tp[0]]
                self.consumer.seek(TopicPartition(topic, tp[1], max(start, 0)))
                self.next_offset[tp] = start
                log.info("rewound %s[%d] to %d", topic, tp[1], start)

    def _check_workers(self) -> None:
        now = time.monotonic_ns()
        timeout = self.svc.heartbeat_timeout_ms * 1_000_000
        for h in self.handles:
            if not h.process.is_alive():
                self._reap(h)
                continue
            if h.killed_at:
                self._await_death(h)
                continue
            booted = self.ctl.get(h.index, Slot.EPOCH) >= h.epoch
            if booted and now - self.ctl.get(h.index, Slot.HEARTBEAT) > timeout:
                log.error("worker %d missed its heartbeat for %d ms: killing it", h.index,
                          self.svc.heartbeat_timeout_ms)
                h.killed_at = h.kill_logged = time.monotonic()
                os.kill(h.process.pid, signal.SIGKILL)  # also ends a stopped (SIGSTOP) process
                h.process.join(1)
                self._reap(h)  # respawns once it is gone; else _await_death, next rounds

    def _await_death(self, h: WorkerHandle) -> None:
        """A killed worker is still there (e.g. in uninterruptible sleep on a hung disk): its
        replacement waits, whatever it takes (the worker's shard is fenced anyway, see
        store.Shard.claim_writer). The ring fills up and pauses the partitions meanwhile."""
        now = time.monotonic()
        if now - h.kill_logged >= 10:
            h.kill_logged = now
            log.error("worker %d (pid %s) has not died %.0f s after SIGKILL: its replacement "
                      "waits", h.index, h.process.pid, now - h.killed_at)
        try:
            os.kill(h.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _shard_offsets(self, index: int) -> dict[tuple[int, int], int]:
        path = shard_path(self.data_dir, index)
        if not (path / "data.mdb").exists():
            return {}
        shard = Shard(path, readonly=True)
        try:
            out = {}
            for (topic, part), off in shard.offsets().items():
                if topic in self.tindex:
                    out[(self.tindex[topic], part)] = off
            return out
        finally:
            shard.close()

    # ---- consuming -------------------------------------------------------------------------
    def _consumer_conf(self) -> dict:
        conf = self.cfg.kafka.consumer_conf()
        if not conf.get("bootstrap.servers"):
            raise FatalError("kafka.bootstrap_servers is empty (set it, or use `aggregator demo`)")
        return conf

    def _await_broker(self) -> None:
        """Wait until a broker answers a metadata request (librdkafka retries quietly, see
        kafka_clients), at most kafka.startup_timeout_s; then name the source topics that
        do not exist, once."""
        limit = self.cfg.kafka.startup_timeout_s
        t0 = time.monotonic()
        while not self.stop_requested:
            self._check_workers()
            self._write_status(ready=False)  # /readyz: not ready, and why not (lag unknown)
            self.consumer.poll(0)  # serves the error callback: "Kafka unreachable", once
            left = limit - (time.monotonic() - t0)
            try:
                meta = self.consumer.list_topics(timeout=max(min(left, 1.0), 0.05))
                break
            except KafkaException as e:
                if time.monotonic() - t0 >= limit:
                    err = self.kafka_events.last_error or (
                        e.args[0].str() if isinstance(e.args[0], KafkaError) else e)
                    raise FatalError(
                        f"no Kafka broker answered at {self.cfg.kafka.bootstrap_servers} "
                        f"within {limit:g} s (kafka.startup_timeout_s): {err}") from None
        else:
            return
        self.kafka_events.reachable()
        log.info("Kafka broker answered (%s, %d brokers)", self.cfg.kafka.bootstrap_servers,
                 len(meta.brokers))
        self.missing_topics = [t for t in self.cfg.topics() if t not in meta.topics]
        if self.missing_topics:
            names = ", ".join(f"{t} (source {self.cfg.source_by_topic(t)[0]})"
                              for t in self.missing_topics)
            log.warning("source topics missing on the broker: %s; the service runs and waits "
                        "for them: once created they are consumed from their start (librdkafka "
                        "looks every topic.metadata.refresh.interval.ms, default 5 min)", names)

    def _consumer_error(self, err: KafkaError) -> None:
        """An error the consumer returned in place of a record: logged once a minute at
        most; a missing source topic already named at start-up only at debug level."""
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART and any(
                t in err.str() for t in self.missing_topics):
            log.debug("consumer: %s", err.str())
            return
        self.kafka_events.error(err)

    def _consume_loop(self) -> None:
        conf = self._consumer_conf()
        self.cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self.dlq = DeadLetters(self.cfg, self.cfg.topics())
        conf, self.kafka_events = quiet(self._group_conf(conf), "consumer")
        self.consumer = Consumer(conf)
        self._await_broker()
        self.consumer.subscribe(self._subscriptions(conf), on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        batch_max = self.svc.batch_max_records
        commit_every = self.svc.commit_interval_ms / 1000.0
        next_commit = time.monotonic() + commit_every
        next_progress = time.monotonic() + 1.0
        trimmer = memory.Trimmer(self.svc.malloc_trim_interval_ms)
        while not self.stop_requested:
            fault_point("supervisor_loop")
            self._check_workers()
            if self.paused:
                if self._flush_pending():
                    self._set_paused(False)
            self._round()
            t_call = time.time() if self.trace is not None else 0.0
            msgs = consume_ready(self.consumer, batch_max, 0.0 if self.paused else 0.05)
            if msgs:
                if self.trace is not None:
                    self.trace.round(t_call, len(msgs))
                if self.kafka_events.unreachable:
                    self.kafka_events.reachable()
                self._dispatch(msgs)
            self._collect_acks()
            now = time.monotonic()
            if now >= next_commit:
                self._commit(asynchronous=True)
                next_commit = now + commit_every
                trimmer.maybe()  # the pages freed with the consumed batches (memory.py)
            if now >= next_progress:
                self._progress()
                self._refresh_stats()
                self._write_status(ready=True)
                if self.on_progress:
                    self.on_progress(self.stats)
                if self.stop_when and self.stop_when(self.stats):
                    self.request_stop()
                next_progress = now + 0.5
            if self.paused:
                time.sleep(0.002)

    def _dispatch(self, msgs: list) -> None:
        """Route and frame a consumed batch (frames.FrameRouter): one ring message per
        worker (more if it does not fit), every one of the round's through-offsets on the
        last; errors, oversized records and the per-source counts are handled here."""
        max_bytes = self.svc.max_record_bytes
        rnd = self.router.route(msgs, [h.next_batch for h in self.handles], self.max_message)
        for err in rnd.errors:
            if err.code() != KafkaError._PARTITION_EOF:
                self._consumer_error(err)
        for rec in rnd.oversized:
            self.dlq.too_large(rec, max_bytes)
        for ti, c in enumerate(rnd.counts):
            if c:
                self.events_in[self.source_of[ti]] += c
        if rnd.oversized:
            self.dlq.deliver(lambda: None)  # before these offsets can be committed
        through = rnd.through
        if not through:
            return
        self.stats.consumed += len(msgs)
        for tp, off in through.items():
            self.next_offset[tp] = off + 1
        trace = self.trace
        t_dispatched = time.time() if trace is not None else 0.0
        for h in self.handles:
            ring = self.inbound[h.index]
            out = rnd.messages[h.index]
            for i, msg in enumerate(out):
                last = i == len(out) - 1
                self.checkpoint.dispatched(h.index, h.next_batch, through if last else None)
                h.next_batch += 1
                if h.pending or not ring.try_put(msg):
                    h.pending.append(msg)
                    if trace is not None:
                        trace.pending(h.index, h.next_batch - 1, t_dispatched)
                elif trace is not None:
                    trace.put(h.index, h.next_batch - 1, t_dispatched)
        if any(h.pending for h in self.handles):
            self._set_paused(True)

    def _new_router(self):
        """The route-and-frame step of normal mode (frames.py): a source with an input
        mapping routes by its `mapping.route`, the others by envelope.routing_key's rules."""
        max_bytes = self.svc.max_record_bytes

        def mapped(plan):
            return lambda value, headers, key: route(plan, value, headers, key, max_bytes)

        fns = [None if plan is None else mapped(plan) for plan in self.maps]
        return FrameRouter(self.workers, self.tindex, self.detect, fns, max_bytes)

    def _encode(self, h: WorkerHandle, records: list, thr: list):
        """(batch id, message, is last) for one worker's records of a round: one message,
        or halves until each fits the ring. Only the last carries the through-offsets."""
        for bid, msg, last in frame_records(self._packer, records, thr, h.next_batch,
                                            self.max_message):
            h.next_batch = bid + 1
            yield bid, msg, last

    def _flush_pending(self) -> bool:
        """Try to hand buffered messages to their rings. True when nothing is left."""
        for h in self.handles:
            ring = self.inbound[h.index]
            while h.pending and ring.try_put(h.pending[0]):
                if self.trace is not None:
                    self.trace.put(h.index, h.next_batch - len(h.pending))
                h.pending.pop(0)
        return not any(h.pending for h in self.handles)

    def _set_paused(self, paused: bool) -> None:
        if paused == self.paused:
            return
        parts = [TopicPartition(self.topics[ti], p) for ti, p in self.assigned]
        if parts:
            (self.consumer.pause if paused else self.consumer.resume)(parts)
        self.paused = paused
        if paused:
            self.stats.pauses += 1
        log.debug("partitions %s: a worker ring is full", "paused" if paused else "resumed")

    def _collect_acks(self) -> None:
        for h in self.handles:
            self.checkpoint.acked(h.index, self.ctl.get(h.index, Slot.ACK_BATCH))

    def _commit(self, asynchronous: bool, only: set | None = None) -> None:
        offsets = []
        for tp, off in self.checkpoint.committable(self.assigned if only is None else only):
            offsets.append(TopicPartition(self.topics[tp[0]], tp[1], off + 1))
            self.stats.committed[tp] = off + 1
        if offsets:
            fault_point("supervisor_before_kafka_commit")
            try:
                self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
            except Exception as e:  # noqa: BLE001 - a failed commit is retried next interval
                log.warning("offset commit failed: %s", e)
            fault_point("supervisor_after_kafka_commit")

    # ---- rebalance callbacks ----------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        durable = [self._shard_offsets(i) for i in range(self.workers)]
        for tp in partitions:
            key = (self.tindex[tp.topic], tp.partition)
            offs = [d.get(key) for d in durable]
            if any(o is None for o in offs):
                tp.offset = OFFSET_BEGINNING
                start = 0
            else:
                start = min(offs) + 1
                tp.offset = start
            self.checkpoint.assign(key, start, [d.get(key) for d in durable])
            self.assigned.add(key)
            self.next_offset[key] = start
        log.info("assigned %s", ", ".join(f"{t.topic}[{t.partition}]@{t.offset}"
                                          for t in partitions))
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self.paused:
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = {(self.tindex[tp.topic], tp.partition) for tp in partitions}
        if self.aborting:  # stopping on a fatal error: nothing is drained or committed
            self.assigned -= keys
            if self.cooperative:
                consumer.incremental_unassign(partitions)
            else:
                consumer.unassign()
            return
        self._drain(deadline=time.monotonic() + self.svc.shutdown_timeout_ms / 1000)
        self._commit(asynchronous=False, only=keys)
        self.assigned -= keys
        log.info("revoked %d partitions", len(keys))
        self._released(keys, "revoked")
        if self.cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """The group went on without this consumer (max.poll.interval.ms exceeded, or the
        session expired): another member may own the partitions already, so nothing is
        committed for them from now on (`_commit` only commits `assigned`), and nothing is
        drained. Their batches already in the rings still apply; when the partitions come
        back, `_on_assign` starts them at the shards' durable offsets and the workers skip
        what they applied meanwhile (their through-offsets)."""
        keys = {(self.tindex[tp.topic], tp.partition) for tp in partitions}
        self.assigned -= keys
        log.warning("lost %d partitions (the consumer group went on without this consumer): "
                    "no offsets committed for them until they are assigned again", len(keys))
        self._released(keys, "lost")
        if self.cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _drain(self, deadline: float) -> bool:
        """Hand every buffered message over and wait until workers acknowledged all."""
        while time.monotonic() < deadline:
            self._flush_pending()
            self._collect_acks()
            if not any(h.pending for h in self.handles) and self.checkpoint.idle():
                return True
            for h in self.handles:
                if not h.process.is_alive():
                    self._reap(h)
            time.sleep(0.005)
        log.warning("drain timed out with unacknowledged batches")
        return False

    def _links_quiet(self) -> bool:
        ctl = self.ctl
        return all(ctl.link_applied(j, i) >= ctl.link_committed(i, j)
                   for i in range(self.workers) for j in range(self.workers) if i != j)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.svc.shutdown_timeout_ms / 1000
        self._close_intake(clean=True)  # hand the source partitions over first
        self._set_paused(True)
        self._drain(deadline)
        while not self._links_quiet() and time.monotonic() < deadline:
            self._check_workers()
            time.sleep(0.005)
        self._commit(asynchronous=False)
        self._refresh_stats()
        for h in self.handles:
            self.inbound[h.index].put(msgpack.packb([MSG_STOP]), timeout=5)
        for h in self.handles:
            h.process.join(max(deadline - time.monotonic(), 1))
            if h.process.is_alive():
                log.error("worker %d did not stop in time: killing it", h.index)
                h.process.kill()
                h.process.join(5)
        self.consumer.close()
        self.dlq.close()
        self._stop_http()
        s, s0 = self.stats, self.start_stats
        log.info("stopped cleanly: %d records consumed, %d applied in this run; the shards' "
                 "totals: %d records, %d applied, %d duplicates, %d stale, %d dead-lettered",
                 s.consumed, s.applied - s0.applied, s.records, s.applied, s.duplicates,
                 s.stale, s.deadlettered)

    def _stop_http(self) -> None:
        if self.http is not None:
            self.http.terminate()
            self.http.join(10)
            if self.http.is_alive():
                self.http.kill()
                self.http.join(5)
            self.http = None

    def _write_status(self, ready: bool) -> None:
        """The status file the HTTP process reads for readiness and lag (metrics.py)."""
        lag = {}
        for ti, p in sorted(self.assigned):
            topic = self.topics[ti]
            try:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                              cached=True)
            except Exception:  # noqa: BLE001 - not known yet
                high = -1
            wm = self.checkpoint.watermark((ti, p))
            nxt = wm + 1 if wm is not None else self.checkpoint.assign_start.get((ti, p), 0)
            lag[partition_label(topic, p)] = max(high - nxt, 0) if high >= 0 else None
        status = {
            "pid": os.getpid(), "workers": self.workers, "ready": ready,
            "assigned": [partition_label(self.topics[ti], p) for ti, p in sorted(self.assigned)],
            "lag": lag, "events_in": self.events_in, "paused": self.paused,
            "pauses": self.stats.pauses, "restarts": self.stats.restarts}
        self._add_status(status, ready)
        try:
            write_status(self.data_dir, status)
        except OSError as e:  # a full or read-only data disk: /readyz reports the stale file
            if not self._status_failing:
                log.error("cannot write the status file in %s: %s; /readyz is not ready until "
                          "it can", self.data_dir, e.strerror or e)
            self._status_failing = True
            return
        if self._status_failing:
            log.info("status file written again")
            self._status_failing = False

    def _abort(self) -> None:
        self.aborting = True
        self._stop_http()
        self._close_intake(clean=False)
        for h in self.handles:
            if h.process is not None and h.process.is_alive():
                h.process.terminate()
        for h in self.handles:
            if h.process is not None:
                h.process.join(5)
                if h.process.is_alive():
                    h.process.kill()
        consumer = getattr(self, "consumer", None)
        if consumer is not None:
            try:
                consumer.close()
            except Exception:  # noqa: BLE001
                pass

    def _release(self) -> None:
        if self.hist is not None:
            self.hist.close()
            self.hist.unlink()
            self.hist = None
        remove_status(self.data_dir)
        ctl = getattr(self, "ctl", None)
        if ctl is not None:
            ctl.counters.close()
            ctl.counters.unlink()
        for r in self._rings:
            r.close()
            r.unlink()
        self._rings = []
        if getattr(self, "segment_owner", None) is not None:
            self.segment_owner.release()  # after the last segment is gone
            self.segment_owner = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _refresh_stats(self) -> None:
        s, ctl = self.stats, self.ctl
        total = {slot: 0 for slot in Slot if slot < Slot._FIXED}
        for w in range(self.workers):
            for slot in total:
                total[slot] += ctl.get(w, slot)
        s.records, s.applied = total[Slot.RECORDS], total[Slot.APPLIED]
        s.duplicates, s.stale = total[Slot.DUPLICATES], total[Slot.STALE]
        s.parked, s.gaps_skipped = total[Slot.PARKED], total[Slot.GAPS_SKIPPED]
        s.deadlettered, s.forwarded = total[Slot.DEADLETTERED], total[Slot.FORWARDED]
        s.commits, s.commit_ms = total[Slot.COMMITS], total[Slot.COMMIT_NS] / 1e6

    # ---- hooks: normal mode here; cluster mode overrides them (task_manager.py) ---------------
    def _consumed_topics(self, config: Config) -> list[str]:
        """The topics of the consumed partitions, in topic-index order."""
        return config.topics()

    def _checkpoint_owner(self) -> Callable[[tuple[int, int]], int] | None:
        """The one worker that acknowledges a partition (None: every worker does)."""
        return None

    def _ensure_topics(self) -> None:
        """Create or check internal topics, before anything starts."""

    def _before_reshard(self) -> None:
        """Holding the LOCK, before the layout check (`_check_layout`)."""

    def _segments_created(self) -> None:
        """The shared-memory segments exist; add those of the mode."""

    def _rewind_worker(self, h: WorkerHandle, durable: dict[tuple[int, int], int]) -> None:
        """A worker died: seek what it had not applied back to its durable offsets."""
        self._rewind(durable)

    def _respawned(self, h: WorkerHandle) -> None:
        """A dead worker's replacement was spawned (its rings were reset)."""

    def _group_conf(self, conf: dict) -> dict:
        """The consumer settings of the mode (its group)."""
        return conf

    def _subscriptions(self, conf: dict) -> list[str]:
        """The topics to subscribe to, once the broker answered."""
        return self.topics

    def _round(self) -> None:
        """Every round of the consume loop, before consuming."""

    def _progress(self) -> None:
        """Every progress tick (0.5 s), before the stats and the status file."""

    def _released(self, keys: set, why: str) -> None:
        """Partitions revoked or lost (`why`), after their offsets were handled."""

    def _close_intake(self, clean: bool) -> None:
        """Stopping (`clean`) or aborting: close the mode's other Kafka clients."""

    def _add_status(self, status: dict, ready: bool) -> None:
        """Add the mode's fields to the status file's content."""
