"""Prometheus metrics, read at scrape time from what the service already shares.

Nothing is counted in the HTTP process itself, so no prometheus multiprocess mode is needed:
every scrape attaches the shared-memory segments of the running service, reads them and
detaches again (a restarted service creates new segments under the same names).

Sources, per metric family:

- **Control block** (``control.py``, one row per worker): records in, events applied,
  duplicates, stale, parked, gaps skipped, dead-lettered, forwarded, LMDB commits and the
  time spent in them, heartbeat age, whether the data disk refuses the worker's commits
  (full, read-only, failing: the worker retries the batch) and how often it did. Records in
  … forwarded are the shard's totals (store.py, meta ``totals``), which the worker stores
  with each batch and mirrors into the block after the commit and at boot: exact through
  crashes, and they go on across restarts (no counter reset); rates are ``rate()`` of them.
  The other counters count since the service started.
- **Rings** (``ring.py``): fill ratio of each supervisor→worker ring and worker→worker ring.
- **Commit histogram** (``{prefix}-hist``, optional): batch commit latency per worker, see
  :func:`record_commit` for the layout. Skipped when the segment does not exist.
- **Status file** (``data_dir/status.json``, written by the supervisor, format below):
  consumer lag per partition, records in per source, assigned partitions.
- **Shard files**: size of each ``data.mdb``; with a :class:`~aggregator.query.Views`, also the
  map size and the entries per named database.
- **Core**: ``aggregator_core_info{implementation="cython"|"python"}``.

Status file format (``STATUS_FILE`` in the data dir; JSON object; written about twice a second
by the supervisor with :func:`write_status`, which replaces the file atomically)::

    {
      "version": 1,
      "time": 1760000000.25,                 # unix seconds when written (added if absent)
      "pid": 4242,                           # supervisor pid
      "workers": 2,                          # service.workers
      "ready": true,                         # workers booted, consuming, not draining
      "assigned": ["shop.orders[0]", ...],   # partitions assigned to this instance
      "lag": {"shop.orders[0]": 17, ...},    # per assigned partition: high watermark minus
                                             # the first offset not yet durably applied by
                                             # every worker; null while unknown
      "events_in": {"orders": 123456, ...},  # records consumed per source (config name),
                                             # since the supervisor started
    }

The supervisor writes ``"ready": false`` once it starts draining and removes the file
(:func:`remove_status`) when it exits, so a stopped service is never reported ready.

``/readyz`` (server.py) is ready when the file is younger than ``STATUS_MAX_AGE_S``,
``ready`` is true, at least one partition is assigned, every assigned partition has a
known lag of at most ``service.ready_max_lag`` and no worker is blocked by its data disk
(read from the control block: a full disk cannot take a fresh status file either).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .control import ControlBlock, Slot
from .protocol import COMMIT_BUCKETS_MS, HIST_SLOTS, hist_segment_name, ring_names
from .ring import Ring, SharedCounters, segment_prefix
from .runtime import pid_alive

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATUS_VERSION = 1
STATUS_MAX_AGE_S = 5.0

# Commit histogram row (protocol.COMMIT_BUCKETS_MS: upper bounds in ms, exported in seconds)
_HIST_INF = len(COMMIT_BUCKETS_MS)
_HIST_SUM = len(COMMIT_BUCKETS_MS) + 1

_SHARD = "; the shard's total, stored with each batch (exact through crashes and restarts)"
# (control-block slot, metric name without _total, help); all counters, labelled by worker.
_COUNTERS = (
    (Slot.RECORDS, "aggregator_records_in", "Kafka records received by the worker" + _SHARD),
    (Slot.APPLIED, "aggregator_events_applied",
     "Events applied to the views (each once)" + _SHARD),
    (Slot.DUPLICATES, "aggregator_duplicates_dropped", "Events dropped as duplicates" + _SHARD),
    (Slot.STALE, "aggregator_stale_dropped",
     "Events dropped by the sequence gate (at or below the last applied sequence)" + _SHARD),
    (Slot.GAPS_SKIPPED, "aggregator_gaps_skipped",
     "Sequence gaps given up on (gap_policy)" + _SHARD),
    (Slot.DEADLETTERED, "aggregator_deadlettered",
     "Records sent to the dead-letter topic" + _SHARD),
    (Slot.FORWARDED, "aggregator_forwarded",
     "View updates forwarded to another shard" + _SHARD),
    (Slot.COMMITS, "aggregator_lmdb_commits", "LMDB write transactions committed"),
    (Slot.RESTORE_RECORDS, "aggregator_restore_records",
     "Changelog records read to restore tasks (cluster mode)"),
    (Slot.RESTORE_BYTES, "aggregator_restore_bytes",
     "Changelog bytes (keys and values) read to restore tasks (cluster mode)"),
)
_PARTITION_RE = re.compile(r"^(?P<topic>.+)\[(?P<partition>\d+)\]$")


# ---- names of the shared segments ------------------------------------------------------


def prefix_of(data_dir: str | os.PathLike) -> str:
    """Shared-memory name prefix of the service that owns ``data_dir``."""
    return segment_prefix(str(Path(data_dir).resolve()))


def _segment_names(prefix: str, workers: int) -> dict:
    return ring_names(prefix, workers)


# ---- the commit histogram (worker side) -------------------------------------------------


def record_commit(hist: SharedCounters, worker: int, ms: float) -> None:
    """Count one batch commit of ``ms`` milliseconds in ``worker``'s row.

    Row layout (``HIST_SLOTS`` counters from ``worker * HIST_SLOTS``): the cumulative count
    of commits ``<= COMMIT_BUCKETS_MS[i]`` for each bucket, then the count of all commits
    (+Inf), then the sum of all durations in µs. The worker is the row's only writer.
    """
    base = worker * HIST_SLOTS
    hist.add(base + _HIST_INF, 1)
    for i in range(_HIST_INF - 1, -1, -1):
        if ms > COMMIT_BUCKETS_MS[i]:
            break
        hist.add(base + i, 1)
    hist.add(base + _HIST_SUM, max(int(ms * 1000), 0))


def read_commit_histogram(hist: SharedCounters, worker: int) -> tuple[list[int], int, int]:
    """(cumulative bucket counts, count, sum in µs) of one worker's row.

    Counters are read one by one while the worker may add to them, so the buckets are
    clamped to be non-decreasing and at most the count.
    """
    base = worker * HIST_SLOTS
    row = [hist.get(base + i) for i in range(HIST_SLOTS)]
    count, total = row[_HIST_INF], row[_HIST_SUM]
    buckets = row[:_HIST_INF]
    ceiling = count
    for i in range(len(buckets) - 1, -1, -1):
        ceiling = buckets[i] = min(buckets[i], ceiling)
    return buckets, count, total


# ---- the status file (supervisor side) --------------------------------------------------


def write_status(data_dir: str | os.PathLike, status: dict) -> None:
    """Write ``data_dir/status.json`` atomically (temporary file + ``os.replace``).

    ``status`` follows the format in the module docstring; ``time`` and ``version`` are
    added when absent. Not fsynced: the file describes the running process only. Raises
    OSError (a full or read-only disk), leaving the previous file as it was.
    """
    doc = {"version": STATUS_VERSION, "time": time.time(), **status}
    path = Path(data_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)  # a full disk must not keep a partial file
        except OSError:
            pass
        raise


def partition_label(topic: str, partition: int) -> str:
    """``"topic[partition]"``: how the status file names a partition."""
    return f"{topic}[{partition}]"


def remove_status(data_dir: str | os.PathLike) -> None:
    """Remove the status file (supervisor, at exit); missing is not an error, nor a disk
    that refuses (read-only): the file's age tells readers the service is gone."""
    try:
        os.unlink(Path(data_dir) / STATUS_FILE)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove the status file in %s: %s", data_dir, e.strerror or e)


def read_status(data_dir: str | os.PathLike) -> dict | None:
    """The last status written, or None (no file, or not valid JSON)."""
    try:
        with open(Path(data_dir) / STATUS_FILE) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def readiness(status: dict | None, max_lag: int, now: float | None = None,
              max_age: float = STATUS_MAX_AGE_S,
              blocked: dict[int, int] | None = None) -> tuple[bool, list[str]]:
    """(ready, reasons it is not) from a status document (see the module docstring) and
    the workers blocked by their data disk (``{worker: errno}``, see `storage_blocked`)."""
    reasons = [f"worker {w}: the data disk refuses its writes "
               f"({errno.errorcode.get(code, code)}: {os.strerror(code)}); it retries"
               for w, code in sorted((blocked or {}).items())]
    if status is None:
        return False, reasons + ["no status file: the service is not running"]
    now = time.time() if now is None else now
    age = now - float(status.get("time") or 0)
    if age > max_age:
        reasons.append(f"status is {age:.1f} s old (max {max_age:g} s): the service is not "
                       "running, is stuck or cannot write it")
    if status.get("restoring"):
        reasons.append(f"restoring {len(status['restoring'])} tasks from the changelog")
    elif not status.get("ready", False):
        reasons.append("the service is starting or stopping")
    lag = status.get("lag") or {}
    assigned = status.get("assigned", list(lag))
    if not assigned:
        reasons.append("no partitions assigned")
    unknown = [p for p in assigned if lag.get(p) is None]
    if unknown:
        reasons.append(f"lag unknown for {len(unknown)} partitions (e.g. {unknown[0]})")
    behind = {p: n for p, n in lag.items() if n is not None and n > max_lag}
    if behind:
        worst = max(behind, key=behind.get)
        reasons.append(f"{len(behind)} partitions lag more than {max_lag} records "
                       f"(worst {worst}: {behind[worst]})")
    return not reasons, reasons


# ---- the collector ----------------------------------------------------------------------


class ServiceCollector(Collector):
    """Reads the live service state at every scrape (see the module docstring)."""

    def __init__(self, config, views=None):
        """``views``: an optional :class:`~aggregator.query.Views` for map sizes and entries."""
        self.data_dir = Path(config.service.data_dir)
        self.workers = config.service.workers
        self.views = views
        self.prefix = prefix_of(self.data_dir)
        self.names = _segment_names(self.prefix, self.workers)

    def collect(self) -> Iterable[Metric]:
        yield from self._core()
        yield from self._control()
        yield from self._rings()
        yield from self._histogram()
        yield from self._status()
        yield from self._shards()

    def _core(self) -> Iterable[Metric]:
        try:
            from . import core
        except ImportError:
            return
        yield InfoMetricFamily("aggregator_core", "Which core implementation runs",
                               value={"implementation": core.IMPLEMENTATION})

    def _control(self) -> Iterable[Metric]:
        ctl = _attach_control(self.names["control"], self.workers)
        if ctl is None:
            return  # the service is not running
        try:
            labels = ["worker"]
            now = time.monotonic_ns()
            fams = [(slot, CounterMetricFamily(name, doc, labels=labels))
                    for slot, name, doc in _COUNTERS]
            parked = GaugeMetricFamily("aggregator_parked",
                                       "Events parked waiting for a sequence gap", labels=labels)
            commit_s = CounterMetricFamily("aggregator_lmdb_commit_seconds",
                                           "Time spent in LMDB commits", labels=labels)
            backlog = GaugeMetricFamily("aggregator_change_events_backlog",
                                        "Change events committed but not yet delivered",
                                        labels=labels)
            beat = GaugeMetricFamily("aggregator_worker_heartbeat_age_seconds",
                                     "Time since the worker's last loop iteration",
                                     labels=labels)
            blocked = GaugeMetricFamily("aggregator_storage_blocked",
                                        "1 while the data disk refuses the worker's commits "
                                        "(full, read-only, I/O error; see /readyz and the "
                                        "log): the worker retries its batch", labels=labels)
            storage_errors = CounterMetricFamily("aggregator_storage_errors",
                                                 "LMDB transactions the data disk refused "
                                                 "(each retried)", labels=labels)
            for w in range(self.workers):
                lw = [str(w)]
                for slot, fam in fams:
                    fam.add_metric(lw, ctl.get(w, slot))
                parked.add_metric(lw, ctl.get(w, Slot.PARKED))
                backlog.add_metric(lw, ctl.get(w, Slot.CHANGES_BACKLOG))
                commit_s.add_metric(lw, ctl.get(w, Slot.COMMIT_NS) / 1e9)
                blocked.add_metric(lw, 1 if ctl.get(w, Slot.STORAGE_BLOCKED) else 0)
                storage_errors.add_metric(lw, ctl.get(w, Slot.STORAGE_ERRORS))
                hb = ctl.get(w, Slot.HEARTBEAT)
                if hb:
                    beat.add_metric(lw, max(now - hb, 0) / 1e9)
        finally:
            ctl.close()
        for _, fam in fams:
            yield fam
        yield parked
        yield backlog
        yield commit_s
        yield beat
        yield blocked
        yield storage_errors

    def _rings(self) -> Iterable[Metric]:
        inbound = GaugeMetricFamily("aggregator_ring_fill_ratio",
                                    "Fill of the supervisor→worker ring (0..1)",
                                    labels=["worker"])
        peer = GaugeMetricFamily("aggregator_peer_ring_fill_ratio",
                                 "Fill of the worker→worker ring (0..1)", labels=["src", "dst"])
        seen = False
        for w, name in enumerate(self.names["inbound"]):
            fill = _ring_fill(name)
            if fill is not None:
                inbound.add_metric([str(w)], fill)
                seen = True
        for (a, b), name in sorted(self.names["peer"].items()):
            fill = _ring_fill(name)
            if fill is not None:
                peer.add_metric([str(a), str(b)], fill)
        if seen:
            yield inbound
            yield peer

    def _histogram(self) -> Iterable[Metric]:
        try:
            hist = SharedCounters.attach(hist_segment_name(self.prefix))
        except (OSError, ValueError):
            return
        try:
            if len(hist) < self.workers * HIST_SLOTS:
                return
            fam = HistogramMetricFamily("aggregator_batch_commit_seconds",
                                        "Duration of a worker's batch commit",
                                        labels=["worker"])
            for w in range(self.workers):
                buckets, count, total_us = read_commit_histogram(hist, w)
                pairs = [(_le(ms), n) for ms, n in zip(COMMIT_BUCKETS_MS, buckets)]
                pairs.append(("+Inf", count))
                fam.add_metric([str(w)], pairs, sum_value=total_us / 1e6)
        finally:
            hist.close()
        yield fam

    def _status(self) -> Iterable[Metric]:
        status = read_status(self.data_dir)
        if status is None:
            return
        age = GaugeMetricFamily("aggregator_status_age_seconds",
                                "Age of the supervisor's status file")
        age.add_metric([], max(time.time() - float(status.get("time") or 0), 0.0))
        yield age
        lag = GaugeMetricFamily("aggregator_consumer_lag",
                                "Records not yet applied by every worker, per partition",
                                labels=["topic", "partition"])
        for tp, n in sorted((status.get("lag") or {}).items()):
            m = _PARTITION_RE.match(tp)
            if m and n is not None:
                lag.add_metric([m["topic"], m["partition"]], n)
        yield lag
        events = CounterMetricFamily("aggregator_source_events_in",
                                     "Records consumed per source since the supervisor started",
                                     labels=["source"])
        for source, n in sorted((status.get("events_in") or {}).items()):
            events.add_metric([source], n)
        yield events
        assigned = GaugeMetricFamily("aggregator_partitions_assigned",
                                     "Partitions assigned to this instance")
        assigned.add_metric([], len(status.get("assigned") or ()))
        yield assigned
        paused = GaugeMetricFamily("aggregator_consumer_paused",
                                   "1 while the source partitions are paused (a worker's ring "
                                   "is full: backpressure)")
        paused.add_metric([], 1 if status.get("paused") else 0)
        yield paused
        if "tasks" in status:
            owned = GaugeMetricFamily("aggregator_tasks_owned",
                                      "Tasks this instance owns and has restored (cluster mode)")
            owned.add_metric([], len(status["tasks"]))
            yield owned
            restoring = GaugeMetricFamily("aggregator_tasks_restoring",
                                          "Tasks being restored from the changelog "
                                          "(cluster mode)")
            restoring.add_metric([], len(status.get("restoring") or ()))
            yield restoring
            per_worker = GaugeMetricFamily("aggregator_worker_tasks",
                                           "Tasks placed on each worker, owned or being "
                                           "restored (cluster mode)", labels=["worker"])
            counts = [0] * int(status.get("workers") or 0)
            for w in (status.get("placement") or {}).values():
                if 0 <= w < len(counts):
                    counts[w] += 1
            for w, n in enumerate(counts):
                per_worker.add_metric([str(w)], n)
            yield per_worker
            if "unowned" in status:
                unowned = GaugeMetricFamily("aggregator_tasks_unowned",
                                            "Tasks of the group that no live instance serves "
                                            "(owns and has restored), as last seen through "
                                            "the owners topic (cluster mode)")
                unowned.add_metric([], len(status["unowned"]))
                yield unowned
        pauses = CounterMetricFamily("aggregator_consumer_pauses",
                                     "Times the source partitions were paused for backpressure")
        pauses.add_metric([], status.get("pauses", 0))
        yield pauses
        restarts = CounterMetricFamily("aggregator_worker_restarts",
                                       "Workers that died and were respawned since the "
                                       "supervisor started")
        restarts.add_metric([], status.get("restarts", 0))
        yield restarts

    def _shards(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("aggregator_lmdb_file_bytes", "Size of the shard's data.mdb",
                                 labels=["shard"])
        for i in range(self.workers):
            try:
                st = os.stat(self.data_dir / f"shard-{i}" / "data.mdb")
            except OSError:
                continue
            size.add_metric([str(i)], st.st_size)
        yield size
        if self.views is None:
            return
        mapb = GaugeMetricFamily("aggregator_lmdb_map_bytes", "LMDB map size of the shard",
                                 labels=["shard"])
        entries = GaugeMetricFamily("aggregator_lmdb_entries",
                                    "Entries per named database of the shard (views count "
                                    "deleted documents too)", labels=["shard", "db"])
        for st in self.views.stats():
            if "map_bytes" not in st:
                continue
            mapb.add_metric([str(st["shard"])], st["map_bytes"])
            for db, n in sorted(st["entries"].items()):
                entries.add_metric([str(st["shard"]), db], n)
        yield mapb
        yield entries


def storage_blocked(config) -> dict[int, int]:
    """``{worker: errno}`` of the workers whose data disk refuses their commits (they
    retry); empty when none is, or no service runs."""
    names = _segment_names(prefix_of(config.service.data_dir), config.service.workers)
    ctl = _attach_control(names["control"], config.service.workers)
    if ctl is None:
        return {}
    try:
        return {w: code for w in range(config.service.workers)
                if (code := ctl.get(w, Slot.STORAGE_BLOCKED))}
    finally:
        ctl.close()


def _attach_control(name: str, workers: int) -> ControlBlock | None:
    """The control block, or None if absent or laid out for another worker count."""
    try:
        ctl = ControlBlock.attach(name, workers)
    except (OSError, ValueError):
        return None
    if len(ctl.counters) != ControlBlock.size(workers):
        ctl.close()
        return None
    return ctl


def _ring_fill(name: str) -> float | None:
    try:
        ring = Ring.attach(name)
    except (OSError, ValueError):
        return None
    try:
        return ring.fill
    finally:
        ring.close()


def _le(ms: float) -> str:
    return repr(ms / 1000.0)


def make_registry(config, views=None) -> CollectorRegistry:
    """A registry with only the service collector (no metrics of the HTTP process itself)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(config, views))
    return registry


def live_counters(config) -> dict[str, Any] | None:
    """The control block's counters per worker, or None when no service runs (CLI stats).

    ``{"workers": [{"worker": i, "pid": .., "alive": bool, "records": .., ...}]}``; ``alive``
    says whether the worker's pid still exists (the block of a killed service lingers
    until the next start).
    """
    names = _segment_names(prefix_of(config.service.data_dir), config.service.workers)
    ctl = _attach_control(names["control"], config.service.workers)
    if ctl is None:
        return None
    try:
        rows = []
        for w in range(config.service.workers):
            pid = ctl.get(w, Slot.PID)
            row: dict[str, Any] = {"worker": w, "pid": pid, "alive": pid_alive(pid)}
            for slot in Slot:
                if slot not in (Slot._FIXED, Slot.PID, Slot.HEARTBEAT):
                    row[slot.name.lower()] = ctl.get(w, slot)
            rows.append(row)
        return {"workers": rows}
    finally:
        ctl.close()
