"""The chaos harness: run the 7-source workload against the real service, inject faults, then
verify everything against oracles that do not use the service's code.

A `ChaosRun` produces a seeded workload to fresh topics, starts `aggregator run` (a child
process: the supervisor and its workers), lets a test inject faults while it runs (each
fault is timed: "time to recover" is from the fault until the group's committed offsets move
again), waits until every offset is committed, stops the service and checks:

- views: every document equals `simulate.expected_views` (recomputed from the unique events);
- applied exactly once: every document's version (its count of updates) equals
  `simulate.expected_versions`; a lost event shows as a version too low, a double apply as
  one too high, also where the content would not tell;
- change events: per key, the first copy of each change id arrives in version order
  (out-of-order), every version 1..n is there (lost), re-publications carry identical data,
  and the last one equals the document;
- dead letters: every malformed record of the workload is on the dead-letter topic with its
  reason;
- no shared-memory segment is left in /dev/shm.

`Report.table()` prints: events, faults injected, lost, double-applied, out-of-order, time to
recover. The long mode (`python -m bench.tools.chaos`) drives the same class.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from aggregator.admin import create_topics
from aggregator.devtools import simulate
from aggregator.store import Shard
from tests.support.service import Service, produce_tracked, read_topic, write_config

VIEWS = ("customer", "order", "product")


@dataclass
class Fault:
    kind: str
    at: float  # monotonic time of the injection
    detail: str = ""
    recovered_s: float | None = None  # until committed offsets moved again


@dataclass
class Report:
    name: str
    events: int
    records: int
    faults: list[Fault] = field(default_factory=list)
    docs: int = 0
    docs_wrong: int = 0
    lost: int = 0
    double_applied: int = 0
    out_of_order: int = 0
    changes_missing: int = 0
    changes_conflicting: int = 0
    dead_letters_missing: int = 0
    shm_leftovers: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def max_recover_s(self) -> float | None:
        times = [f.recovered_s for f in self.faults if f.recovered_s is not None]
        return max(times) if times else None

    def row(self) -> dict:
        return {"run": self.name, "events": self.events, "faults": len(self.faults),
                "lost": self.lost, "double_applied": self.double_applied,
                "out_of_order": self.out_of_order, "docs_wrong": self.docs_wrong,
                "max_recover_s": self.max_recover_s, "seconds": round(self.seconds, 1),
                "kinds": sorted({f.kind for f in self.faults}),
                "changes_missing": self.changes_missing, "shm_leftovers": self.shm_leftovers,
                "ok": self.ok}

    def table(self) -> str:
        rec = self.max_recover_s
        return "\n".join([
            "| run | events | faults injected | lost | double-applied | out-of-order | "
            "docs wrong | time to recover (max) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| {self.name} | {self.events:,} | {len(self.faults)} | {self.lost} | "
            f"{self.double_applied} | {self.out_of_order} | {self.docs_wrong} | "
            f"{'-' if rec is None else f'{rec:.1f} s'} |",
        ])

    def assert_ok(self) -> None:
        print("\n" + self.table())
        out = os.environ.get("AGGREGATOR_CHAOS_REPORT")  # the long mode collects the rows
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(self.row()) + "\n")
        assert self.ok, "\n".join(self.problems[:20])


# A chaos run produces its workload in parts, with service kills and restarts in between, so
# a pair of records the producer reordered across a part boundary can wait minutes for its
# first half. The oracle assumes no sequence gap is ever skipped: the gate's timeout must not
# expire within a run (gap tests set their own through `extra`).
CHAOS_DEFAULTS = {"gate": {"gap_timeout_ms": 3_600_000}}


class ChaosRun:
    """One run of the real service on its own topics, group and data directory."""

    def __init__(self, broker, workdir: Path, workload: simulate.Workload, *, workers: int = 2,
                 name: str = "chaos", extra_config: str = "", changes: bool = True,
                 with_bad: bool = True, partitions: int = 4, data_dir: Path | None = None):
        self.broker = broker
        self.bootstrap = broker.bootstrap_servers
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workload = workload
        self.workers = workers
        self.name = name
        self.prefix = f"c{uuid.uuid4().hex[:10]}."
        self.group = f"chaos-{uuid.uuid4().hex[:10]}"
        self.data_dir = Path(data_dir) if data_dir is not None else self.workdir / "data"
        self.extra_config = extra_config
        self.changes = changes
        self.with_bad = with_bad
        self.partitions = partitions
        self.bad: list = []
        self.ignore_docs: set[tuple[str, str]] = set()  # (view, key) the oracle does not know
        self.documents: dict = {}  # what `verify` read: {view: {key: {"v", "d", "s"}}}
        self.report = Report(name, workload.unique_events, len(workload.records))
        self.services: list[Service] = []
        self.svc: Service | None = None
        self._probe: Consumer | None = None
        self.t0 = time.monotonic()

    # ---- set-up ---------------------------------------------------------------------------
    def produce(self, start: float = 0.0, end: float = 1.0) -> ChaosRun:
        """Produce the records from fraction `start` to `end` of the workload (malformed
        ones interleaved); the first call creates the topics."""
        if not hasattr(self, "_records"):
            topics = simulate.shop_topics(self.prefix) + [
                self.prefix + simulate.DEAD_LETTER_TOPIC]
            topics += [f"{self.prefix}shop.{v}.changes" for v in VIEWS]
            create_topics(self.bootstrap, topics, self.partitions)
            records = [(self.prefix + t, k, v, h) for t, k, v, h in self.workload.records]
            self.bad = simulate.bad_records(self.prefix) if self.with_bad else []
            step = max(len(records) // (len(self.bad) + 1), 1)
            for i, b in enumerate(self.bad):
                records.insert((i + 1) * step, tuple(b[:4]))
            self._records = records
        n = len(self._records)
        self.produce_records(self._records[round(start * n):round(end * n)])
        return self

    def produce_records(self, records: list, producer_config: dict | None = None) -> None:
        """Produce and note the end offset of every partition (from delivery reports)."""
        ends = getattr(self, "_targets", None)
        if ends is None:
            ends = {(t, p): 0 for t in simulate.shop_topics(self.prefix)
                    for p in range(self.partitions)}
        self._targets = produce_tracked(self.bootstrap, records, ends, producer_config)

    def config_path(self, workers: int | None = None, extra: str = "") -> Path:
        n = self.workers if workers is None else workers
        path = self.workdir / f"{self.name}-{len(self.services)}.toml"
        text_extra = self.extra_config + extra
        cfg = write_config(path, bootstrap=self.bootstrap, prefix=self.prefix, group=self.group,
                           data_dir=self.data_dir, workers=n, extra=text_extra,
                           defaults=CHAOS_DEFAULTS)
        if not self.changes:
            text = cfg.read_text()
            for v in VIEWS:
                text = text.replace(f'changes_topic = "{self.prefix}shop.{v}.changes"\n', "")
                text = text.replace(f'changes_topic = "shop.{v}.changes"', "")
            cfg.write_text(text)
        return cfg

    def start(self, workers: int | None = None, env: dict | None = None,
              extra: str = "") -> Service:
        path = self.config_path(workers, extra)
        svc = Service(path, self.workdir / f"{self.name}-{len(self.services)}.log")
        self.services.append(svc)
        self.svc = svc.start(env=env)
        return svc

    @property
    def targets(self) -> dict[tuple[str, int], int]:
        """End offset of every source partition (what `finish` waits for)."""
        return self._targets

    # ---- progress --------------------------------------------------------------------------
    def committed_total(self) -> int:
        if self._probe is None:
            self._probe = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group,
                                    "enable.auto.commit": False})
        parts = [TopicPartition(t, p) for t, p in self.targets]
        try:
            got = self._probe.committed(parts, timeout=10)
        except Exception:  # noqa: BLE001 - the broker may be frozen by the test
            return -1
        return sum(min(max(tp.offset, 0), self.targets[(tp.topic, tp.partition)])
                   for tp in got)

    def total(self) -> int:
        return sum(self.targets.values())

    def wait_fraction(self, fraction: float, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.committed_total() >= fraction * self.total():
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: {fraction:.0%} not committed within {timeout}s\n"
                             f"{self.svc.log()[-4000:]}")

    def _check_alive(self) -> None:
        if self.svc is not None and self.svc.proc.poll() is not None:
            raise AssertionError(f"{self.name}: service exited with {self.svc.proc.returncode}"
                                 f"\n{self.svc.log()[-5000:]}")

    def fault(self, kind: str, action, detail: str = "", measure: bool = True) -> Fault:
        """Run `action()` (the injection) and, unless `measure` is False, wait until the
        committed offsets move past where they were: the time to recover."""
        before = self.committed_total()
        f = Fault(kind, time.monotonic(), detail)
        action()
        self.report.faults.append(f)
        if measure:
            self.measure_recovery(f, before)
        return f

    def measure_recovery(self, f: Fault, before: int, timeout: float = 400) -> None:
        if before >= self.total():
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.committed_total()
            if now > before:
                f.recovered_s = time.monotonic() - f.at
                return
            time.sleep(0.05)
        self.report.problems.append(f"{f.kind}: no progress within {timeout}s after the fault")

    def worker_pids(self) -> list[int]:
        return self.svc.worker_pids()

    def metrics(self) -> dict[str, float]:
        """The service's /metrics: {sample name: value summed over labels}."""
        from prometheus_client.parser import text_string_to_metric_families

        url = self.svc.http_url() + "/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def kill_worker(self, index: int | None = None, sig: int = signal.SIGKILL) -> int:
        pids = self.svc.wait_workers(self.svc.config.service.workers)
        pid = pids[(index or 0) % len(pids)] if index is not None else pids[0]
        os.kill(pid, sig)
        return pid

    # ---- the end ---------------------------------------------------------------------------
    def finish(self, timeout: float = 300, stop: bool = True) -> Report:
        """Wait until every offset is committed, stop cleanly, then verify."""
        deadline = time.monotonic() + timeout
        while self.committed_total() < self.total():
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: not caught up within {timeout}s "
                                     f"({self.committed_total()}/{self.total()})\n"
                                     f"{self.svc.log()[-5000:]}")
            time.sleep(0.1)
        if stop:
            code = self.svc.stop()
            if code != 0:
                self.report.problems.append(f"service exited with {code} at the clean stop")
        self.report.seconds = time.monotonic() - self.t0
        return self.verify()

    def close(self) -> None:
        for svc in self.services:
            if svc.proc is not None:
                svc.discard()
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def verify(self) -> Report:
        r = self.report
        docs = self.documents = read_documents(self.data_dir)
        docs = {v: {k: d for k, d in got.items() if (v, k) not in self.ignore_docs}
                for v, got in docs.items()}
        check_views(r, docs, simulate.expected_views(self.workload),
                    simulate.expected_versions(self.workload))
        if self.changes:
            check_changes(r, self.bootstrap, self.prefix, docs)
        if self.with_bad:
            check_dead_letters(r, self.bootstrap, self.prefix, self.bad)
        if self.svc is not None and self.svc.proc is not None and self.svc.proc.poll() is not None:
            skipped = shard_totals(self.data_dir).get("gaps_skipped", 0)
            if skipped and not r.ok:  # say why, when the run's own config let gaps expire
                r.problems.append(f"{skipped} sequence gaps skipped (gate.gap_timeout_ms ran "
                                  "out): the oracle assumes none")
        left = self.svc.shm_segments()
        r.shm_leftovers = len(left)
        if left:
            r.problems.append(f"shared-memory segments left behind: {left}")
        return r


def shard_totals(data_dir: Path) -> dict[str, int]:
    """The shards' totals (store.py, meta "totals") summed; the service must be stopped."""
    out: dict[str, int] = {}
    for path in sorted(Path(data_dir).glob("shard-*")):
        s = Shard(path, readonly=True)
        try:
            t = s.totals()
        finally:
            s.close()
        for k, v in t.items():
            if k != "since":
                out[k] = out.get(k, 0) + v
    return out


def read_documents(data_dir: Path) -> dict[str, dict[str, dict]]:
    """{view: {key: {"v": version, "d": document or None}}} from every shard, tombstones too."""
    out: dict[str, dict[str, dict]] = {v: {} for v in VIEWS}
    for path in sorted(Path(data_dir).glob("shard-*")):
        shard = Shard(path, readonly=True)
        try:
            names = shard.get_meta("views") or list(VIEWS)
            for view, key, rec in shard.documents(names):
                if key in out[view]:
                    raise AssertionError(f"{view}/{key} stored in two shards")
                out[view][key] = rec
        finally:
            shard.close()
    return out


def check_views(r: Report, docs: dict, expected: dict, versions: dict) -> None:
    for view in VIEWS:
        got, want, vers = docs[view], expected[view], versions[view]
        r.docs += len(want)
        live = {k for k, rec in got.items() if rec["d"] is not None}
        missing, extra = set(want) - live, live - set(want)
        wrong = [k for k in set(want) & live if got[k]["d"] != want[k]]
        r.docs_wrong += len(missing) + len(extra) + len(wrong)
        for what, keys in (("missing", missing), ("unexpected", extra), ("different", wrong)):
            if keys:
                k = sorted(keys)[0]
                r.problems.append(f"{view}: {len(keys)} documents {what}, e.g. {k}: "
                                  f"{got.get(k, {}).get('d')} != {want.get(k)}")
        for key in set(vers) | set(got):
            have, exp = got.get(key, {}).get("v", 0), vers.get(key, 0)
            if have < exp:
                r.lost += exp - have
            elif have > exp:
                r.double_applied += have - exp
    if r.lost:
        r.problems.append(f"{r.lost} updates lost (document versions below the oracle's)")
    if r.double_applied:
        r.problems.append(f"{r.double_applied} updates applied twice (versions above)")


def check_changes(r: Report, bootstrap: str, prefix: str, docs: dict) -> None:
    for view in VIEWS:
        msgs = read_topic(bootstrap, f"{prefix}shop.{view}.changes", timeout=120)
        first: dict[str, bytes | None] = {}
        versions: dict[str, list[int]] = {}
        last: dict[str, bytes | None] = {}
        for m in msgs:  # one key lives in one partition: its events arrive in offset order
            h = dict(m.headers())
            cid, seq, key = h["ce_id"].decode(), int(h["ce_sequence"]), m.key().decode()
            if cid in first:
                if first[cid] != m.value():
                    r.changes_conflicting += 1
                continue
            first[cid] = m.value()
            seen = versions.setdefault(key, [])
            if seen and seq <= seen[-1]:
                r.out_of_order += 1
            seen.append(seq)
            last[key] = m.value()
        for key, rec in docs[view].items():
            seen = sorted(set(versions.get(key, [])))
            r.changes_missing += rec["v"] - len([s for s in seen if 1 <= s <= rec["v"]])
            final = last.get(key)
            want = None if rec["d"] is None else rec["d"]
            if (None if final is None else json.loads(final)) != want:
                r.problems.append(f"{view}/{key}: last change event differs from the document")
                break
    if r.out_of_order:
        r.problems.append(f"{r.out_of_order} change events out of per-key version order")
    if r.changes_missing:
        r.problems.append(f"{r.changes_missing} change events missing")
    if r.changes_conflicting:
        r.problems.append(f"{r.changes_conflicting} change ids re-published with other data")


def check_dead_letters(r: Report, bootstrap: str, prefix: str, bad: list) -> None:
    msgs = read_topic(bootstrap, prefix + simulate.DEAD_LETTER_TOPIC, timeout=60)
    got = sorted(dict(m.headers())["aggregator-dlq-reason"].decode() for m in msgs
                 if m.topic().startswith(prefix))
    want = sorted(b.reason for b in bad)
    missing = list(want)
    for reason in got:
        if reason in missing:
            missing.remove(reason)
    r.dead_letters_missing = len(missing)
    if missing:
        r.problems.append(f"dead letters missing: {missing} (got {got})")


class Sampler:
    """Samples the running service's /metrics and memory ("rss_mib", "anon_mib") every
    `every` s in a thread while the `with` block runs; `peak(name)` is the largest value
    seen."""

    def __init__(self, run: ChaosRun, every: float = 0.25):
        self.run, self.every = run, every
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                m = self.run.metrics()
                m["rss_mib"], m["anon_mib"] = service_memory_mib(self.run.svc)
                self.samples.append(m)
            except Exception:  # noqa: BLE001 - not serving yet, or gone
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, name: str) -> float:
        return max((m.get(name, 0.0) for m in self.samples), default=0.0)


def process_memory_mib(pid: int) -> tuple[float, float]:
    """(resident, anonymous resident) memory of one process in MiB; (0, 0) when it is gone.

    Anonymous memory is the heap and buffers; the rest of the resident set is mostly the
    LMDB files mapped into the workers, which grows with the data, not with what is in
    flight."""
    rss = anon = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, anon


def service_memory_mib(svc: Service) -> tuple[float, float]:
    """(resident, anonymous) memory of the supervisor and all its children together."""
    out = subprocess.run(["pgrep", "-P", str(svc.proc.pid)], capture_output=True, text=True)
    pids = [svc.proc.pid] + [int(p) for p in out.stdout.split()]
    mem = [process_memory_mib(p) for p in pids]
    return sum(r for r, _ in mem), sum(a for _, a in mem)


# ---- workloads shaped for a fault ------------------------------------------------------------


def _rebuild(w: simulate.Workload, record_events: list[int],
             keep_events: list[int] | None = None) -> simulate.Workload:
    """A workload with the records carrying `record_events` (indices into w.events), in
    that order; `keep_events` drops every other event from the ground truth."""
    if keep_events is None:
        events, index = w.events, None
    else:
        index = {old: new for new, old in enumerate(keep_events)}
        events = [w.events[i] for i in keep_events]
        record_events = [i for i in record_events if i in index]
    first_record = {}
    for pos, i in enumerate(w.record_events):
        first_record.setdefault(i, pos)
    records = [w.records[first_record[i]] for i in record_events]
    if index is not None:
        record_events = [index[i] for i in record_events]
    return simulate.Workload(w.seed, events, records, record_events,
                             dict(w.stats, records=len(records)))


def with_far_duplicates(w: simulate.Workload, fraction: float, seed: int = 0
                        ) -> simulate.Workload:
    """Append copies of `fraction` of the first quarter's events at the end: duplicates
    far outside a small bloom filter's window."""
    rng = random.Random(f"{seed}:far")
    early = sorted(set(w.record_events[: len(w.record_events) // 4]))
    extra = rng.sample(early, min(len(early), round(fraction * len(w.events))))
    return _rebuild(w, w.record_events + extra)


def reordered_in_windows(w: simulate.Workload, window: int, seed: int = 0
                         ) -> simulate.Workload:
    """Shuffle the records within consecutive windows of `window` records."""
    rng = random.Random(f"{seed}:window")
    order = list(w.record_events)
    for start in range(0, len(order), window):
        block = order[start:start + window]
        rng.shuffle(block)
        order[start:start + window] = block
    return _rebuild(w, order)


def strict_streams(w: simulate.Workload, min_events: int) -> list[list[int]]:
    """Event indices of every "strict" stream with at least `min_events` events."""
    streams: dict[tuple[str, str], list[int]] = {}
    for i, ev in enumerate(w.events):
        if simulate.SOURCES[ev.source_name].ordering == "strict":
            streams.setdefault(ev.stream, []).append(i)
    return [s for _, s in sorted(streams.items()) if len(s) >= min_events]


def with_gaps(w: simulate.Workload, key_fraction: float, seed: int = 0
              ) -> tuple[simulate.Workload, int]:
    """Remove one event (never the last) from `key_fraction` of the strict streams with 3+
    events: gaps that never fill. Returns the workload (whose ground truth no longer has
    those events) and the number of gaps."""
    rng = random.Random(f"{seed}:gaps")
    streams = strict_streams(w, 3)
    chosen = rng.sample(streams, max(1, round(key_fraction * len(streams))))
    drop = {rng.choice(s[:-1]) for s in chosen}
    keep = [i for i in range(len(w.events)) if i not in drop]
    return _rebuild(w, list(w.record_events), keep), len(drop)


def with_held_back(w: simulate.Workload, parked: int, seed: int = 0
                   ) -> tuple[simulate.Workload, int]:
    """Move the first event of strict streams to the very end until at least `parked`
    later events of those streams must wait for it. Returns (workload, events parked)."""
    rng = random.Random(f"{seed}:hold")
    streams = strict_streams(w, 3)
    rng.shuffle(streams)
    held, n = set(), 0
    for s in streams:
        if n >= parked:
            break
        held.add(s[0])
        n += len(s) - 1
    order = [i for i in w.record_events if i not in held]
    order += sorted(held)
    return _rebuild(w, order), n
