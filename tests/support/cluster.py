"""The cluster harness: several `aggregator run` instances in one consumer group, each with
its own config file and data directory, verified through their HTTP APIs.

A `ClusterRun` is a `ChaosRun` (tests/support/chaos.py) whose service is K instances:

- `produce(start, end)` (inherited) writes a fraction of the seeded 7-source workload, with
  the malformed records interleaved, to fresh prefixed topics;
- `start_instance()` starts one more instance (same group id, `[cluster]` enabled, its own
  data dir and log); `kill(inst)` SIGKILLs an instance's supervisor and makes sure none of
  its processes and none of its shared memory is left;
- `converge()` polls every live instance's HTTP API (`/views/{view}` pages of keys, then
  `/views/{view}/{key}`), unions what they serve and waits until the union equals
  `simulate.expected_views` with every document's version equal to
  `simulate.expected_versions` and no key served by two instances;
- `finish()` converges, checks the dead-letter topic, stops the survivors cleanly and checks
  that nothing is left in /dev/shm.

`ClusterReport.table()` prints: events, instances, kills, lost, double-applied, docs wrong,
keys served twice, time to converge (from the last kill or produce, whichever is later).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from aggregator.cluster import FORWARD_HEADER
from aggregator.devtools import simulate
from aggregator.protocol import UPD_ID, UPD_KEY
from aggregator.ring import cleanup_stale, segment_prefix
from aggregator.routing import slot_of
from aggregator.store import SharedReader, offset_key
from tests.support.chaos import (
    VIEWS,
    ChaosRun,
    Fault,
    Report,
    check_changes,
    check_dead_letters,
    check_views,
)
from tests.support.service import Service, read_topic

CLUSTER_TOML = "[cluster]\nenabled = true\ntasks = {tasks}\n"
CONVERGE_S = 400.0  # a group join after a SIGKILLed member can take long on Tansu
PAGE = 1000  # /views/{view}?limit= maximum


# ---- processes --------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(d))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (workers, the HTTP server, the resource tracker...)."""
    children, out, todo = _children_map(), [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ---- HTTP ----------------------------------------------------------------------------------------


class Api:
    """A keep-alive HTTP/1.1 connection to one instance's API (one thread at a time)."""

    def __init__(self, url: str, timeout: float = 10):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self._conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (0, 1):  # the server may have closed an idle keep-alive connection
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.timeout)
            try:
                self._conn.request("GET", path)
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, path: str) -> tuple[int, object]:
        status, body = self.get(path)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def keys(self, view: str) -> list[str]:
        """Every key of `view` this instance serves, following `next_cursor`."""
        out: list[str] = []
        cursor = None
        while True:
            q = f"?limit={PAGE}" + (f"&cursor={urllib.parse.quote(cursor)}" if cursor else "")
            status, page = self.json(f"/views/{view}{q}")
            if status != 200:
                raise OSError(f"GET /views/{view}: {status} {page}")
            out += page["keys"]
            cursor = page["next_cursor"]
            if not cursor:
                return out

    def document(self, view: str, key: str) -> dict | None:
        """{"v": version, "d": document} (the shape `check_views` reads), None on 404."""
        status, doc = self.json(f"/views/{view}/{urllib.parse.quote(key, safe='')}")
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"GET /views/{view}/{key}: {status} {doc}")
        return {"v": doc["version"], "d": doc["document"]}

    def metrics(self) -> dict[str, float]:
        """/metrics: {sample name: value summed over labels}."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics")
        if status != 200:
            raise OSError(f"GET /metrics: {status}")
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(body.decode()):
            for sample in fam.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def labeled(self, name: str) -> dict[tuple, float]:
        """/metrics samples of one name: {label values (sorted by label name): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics")
        if status != 200:
            raise OSError(f"GET /metrics: {status}")
        return {tuple(v for _, v in sorted(s.labels.items())): s.value
                for fam in text_string_to_metric_families(body.decode())
                for s in fam.samples if s.name == name}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Instance:
    index: int
    svc: Service
    data_dir: Path
    killed_at: float | None = None  # monotonic time of the SIGKILL
    pids: set[int] = field(default_factory=set)  # every descendant seen: checked at the end
    _api: Api | None = None

    @property
    def live(self) -> bool:
        return self.killed_at is None

    def api(self, timeout: float = 60) -> Api:
        """The instance's API client, once its URL is in the log (an instance that exits
        before fails at once, not after `timeout`)."""
        deadline = time.monotonic() + timeout
        while self._api is None:
            try:
                self._api = Api(self.svc.http_url(timeout=0.5))
            except AssertionError:
                if self.svc.proc.poll() is not None or time.monotonic() > deadline:
                    raise
        return self._api

    def note_pids(self) -> None:
        if self.svc.proc.poll() is None:
            self.pids.update(descendants(self.svc.proc.pid))


@dataclass
class ClusterReport(Report):
    instances: int = 0
    kills: int = 0
    served_twice: int = 0  # keys that more than one live instance served at the end
    restored: int = 0  # changelog records the live instances read to restore tasks
    converge_s: float | None = None
    tasks_owned: dict[int, float] = field(default_factory=dict)  # instance -> at the end

    def row(self) -> dict:
        return {**super().row(), "instances": self.instances, "kills": self.kills,
                "served_twice": self.served_twice, "restored": self.restored,
                "converge_s": self.converge_s,
                "tasks_owned": self.tasks_owned}

    def table(self) -> str:
        conv = "-" if self.converge_s is None else f"{self.converge_s:.1f} s"
        return "\n".join([
            "| run | events | instances | kills | lost | double-applied | docs wrong | "
            "served twice | restored records | time to converge |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {self.name} | {self.events:,} | {self.instances} | {self.kills} | "
            f"{self.lost} | {self.double_applied} | {self.docs_wrong} | {self.served_twice} | "
            f"{self.restored:,} | {conv} |",
        ])


class ClusterRun(ChaosRun):
    """K instances of the service in one group, on the run's topics; `cluster=False` runs
    them in normal mode (each one serves every key it consumed: use one instance)."""

    def __init__(self, broker, workdir: Path, workload: simulate.Workload, *,
                 cluster: bool = True, tasks: int = 8, workers: int = 2,
                 name: str = "cluster", extra_config: str = "", changes: bool = False,
                 **kw):
        extra = (CLUSTER_TOML.format(tasks=tasks) if cluster else "") + extra_config
        super().__init__(broker, workdir, workload, workers=workers, name=name,
                         extra_config=extra, changes=changes, **kw)
        self.cluster = cluster
        self.tasks = tasks
        self.instances: list[Instance] = []
        self.report = ClusterReport(name, workload.unique_events, len(workload.records))
        self.expected = simulate.expected_views(workload)
        self.versions = simulate.expected_versions(workload)
        self.last_event = time.monotonic()  # the last produce or kill: converge_s from here
        self.served: dict[str, dict[str, list[int]]] = {}  # the last poll: key -> instances
        self.final_metrics: dict[int, dict[str, float] | None] = {}  # before the stop

    # ---- instances ---------------------------------------------------------------------------
    def produce(self, start: float = 0.0, end: float = 1.0) -> ClusterRun:
        super().produce(start, end)
        self.last_event = time.monotonic()
        return self

    def start_instance(self, extra: str = "", env: dict | None = None) -> Instance:
        """One more `aggregator run`: config `<name>-<n>.toml`, data dir `data-<n>`."""
        self.data_dir = self.workdir / f"data-{len(self.instances)}"
        svc = self.start(env=env, extra=extra)
        inst = Instance(len(self.instances), svc, self.data_dir)
        self.instances.append(inst)
        self.report.instances = len(self.instances)
        if len(self.instances) > 1:
            others = _brief_metrics(self.all_metrics(self.live()[:-1]))
            print(f"[{self.name}] +{time.monotonic() - self.t0:.0f}s: instance {inst.index} "
                  f"started; others: {others}", flush=True)
        return inst

    def live(self) -> list[Instance]:
        return [i for i in self.instances if i.live]

    def _check_alive(self) -> None:
        for inst in self.live():
            inst.note_pids()
            if inst.svc.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name}: instance {inst.index} exited with "
                    f"{inst.svc.proc.returncode}\n{inst.svc.log()[-5000:]}")

    def kill(self, inst: Instance) -> Fault:
        """SIGKILL the instance's supervisor; its workers and HTTP server follow it
        (PDEATHSIG), else they are SIGKILLed too; then its shared memory is removed."""
        print(f"[{self.name}] +{time.monotonic() - self.t0:.0f}s: SIGKILL instance "
              f"{inst.index}; before: {_brief_metrics(self.all_metrics())}", flush=True)
        inst.note_pids()
        pids = set(descendants(inst.svc.proc.pid)) | inst.pids
        fault = Fault("sigkill instance", time.monotonic(),
                      f"instance {inst.index} (pid {inst.svc.proc.pid})")
        inst.svc.proc.send_signal(signal.SIGKILL)
        inst.svc.proc.wait(10)
        inst.killed_at = self.last_event = fault.at
        if inst._api is not None:
            inst._api.close()
        left = _wait_gone(pids, 10)
        if left:
            self.report.problems.append(
                f"instance {inst.index}: processes {sorted(left)} outlived the SIGKILLed "
                "supervisor (killed now)")
            _kill_ours(left)
            _wait_gone(left, 10)
        cleanup_stale(segment_prefix(str(inst.data_dir.resolve())))
        self.report.faults.append(fault)
        self.report.kills += 1
        return fault

    def metrics(self, inst: Instance | None = None) -> dict[str, float]:
        return (inst or self.live()[0]).api().metrics()

    def all_metrics(self, instances: list[Instance] | None = None
                    ) -> dict[int, dict[str, float] | None]:
        """{instance: its /metrics, or None when it does not answer}, live instances only."""
        out: dict[int, dict[str, float] | None] = {}
        for inst in self.live() if instances is None else instances:
            try:
                out[inst.index] = inst.api().metrics()
            except (OSError, http.client.HTTPException, AssertionError):
                out[inst.index] = None
        return out

    def busiest(self) -> Instance:
        """The live instance that applied the most events (a kill there loses the most)."""
        m = self.all_metrics()
        return max(self.live(),
                   key=lambda i: (m[i.index] or {}).get("aggregator_events_applied_total", 0))

    def wait_progress(self, applied: int, timeout: float = 180,
                      all_own: bool | None = None) -> dict[int, dict[str, float] | None]:
        """Wait until the live instances applied `applied` events together (their
        `aggregator_events_applied` counters) and, with `all_own` (default: in cluster
        mode), each of them owns at least one task and has applied something."""
        all_own = self.cluster if all_own is None else all_own
        deadline = time.monotonic() + timeout
        m: dict[int, dict[str, float] | None] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            m = self.all_metrics()
            total = sum((x or {}).get("aggregator_events_applied_total", 0) for x in m.values())
            owns = all(x and x.get("aggregator_tasks_owned", 0) > 0
                       and x.get("aggregator_events_applied_total", 0) > 0
                       for x in m.values())
            if total >= applied and (owns or not all_own):
                return m
            time.sleep(0.25)
        raise AssertionError(
            f"{self.name}: no progress to {applied} applied events"
            f"{' with every instance owning tasks' if all_own else ''} within {timeout}s; "
            f"metrics: {_brief_metrics(m)}\n{self.diagnostics()}")

    # ---- convergence -------------------------------------------------------------------------
    def read_served(self) -> tuple[dict[str, dict[str, list[int]]], list[str]]:
        """{view: {key: [instances serving it]}} over the live instances, and the errors of
        the instances that did not answer."""
        live = self.live()
        served: dict[str, dict[str, list[int]]] = {v: {} for v in VIEWS}
        errors: list[str] = []

        def listing(inst: Instance) -> dict[str, list[str]]:
            return {v: inst.api().keys(v) for v in VIEWS}

        with ThreadPoolExecutor(max(len(live), 1)) as pool:
            futures = {i.index: pool.submit(listing, i) for i in live}
            for index, fut in futures.items():
                try:
                    got = fut.result()
                except (OSError, http.client.HTTPException, AssertionError) as exc:
                    errors.append(f"instance {index}: {exc}")
                    continue
                for v, keys in got.items():
                    for k in keys:
                        served[v].setdefault(k, []).append(index)
        return served, errors

    def read_documents(self, wanted: dict[int, list[tuple[str, str]]]
                       ) -> dict[tuple[int, str, str], dict | None]:
        """{(instance, view, key): document or None} for `wanted` {instance: [(view, key)]};
        an instance that fails is left out."""
        by_index = {i.index: i for i in self.live()}

        def fetch(index: int, pairs: list[tuple[str, str]]):
            api = by_index[index].api()
            return {(index, v, k): api.document(v, k) for v, k in pairs}

        out: dict[tuple[int, str, str], dict | None] = {}
        with ThreadPoolExecutor(max(len(wanted), 1)) as pool:
            futures = [pool.submit(fetch, i, p) for i, p in wanted.items() if i in by_index]
            for fut in futures:
                try:
                    out.update(fut.result())
                except (OSError, http.client.HTTPException, AssertionError):
                    pass
        return out

    def _good(self, view: str, key: str, doc: dict | None) -> bool:
        return (doc is not None and doc["d"] == self.expected[view].get(key)
                and doc["v"] == self.versions[view].get(key, 0))

    def converge(self, timeout: float = CONVERGE_S, all_own: bool = False,
                 every: float = 1.0) -> bool:
        """Poll until the live instances together serve exactly the oracle's documents, each
        key from one instance (and, with `all_own`, each instance owns tasks). Documents
        already seen right are not fetched again until a last full read confirms them all.
        Sets report.converge_s; False on timeout."""
        deadline = time.monotonic() + timeout
        confirmed: dict[tuple[str, str], int] = {}  # (view, key) -> instance seen right
        next_note = time.monotonic() + 10
        expected_keys = {v: set(self.expected[v]) for v in VIEWS}
        while time.monotonic() < deadline:
            self._check_alive()
            served, errors = self.read_served()
            self.served = served
            state = "listing failed: " + "; ".join(errors) if errors else ""
            twice = sum(len(ix) > 1 for v in VIEWS for ix in served[v].values())
            keys_ok = all(set(served[v]) == expected_keys[v] for v in VIEWS)
            if not state and keys_ok and not twice:
                wanted: dict[int, list[tuple[str, str]]] = {}
                for v in VIEWS:
                    for k, ix in served[v].items():
                        if confirmed.get((v, k)) != ix[0]:
                            wanted.setdefault(ix[0], []).append((v, k))
                for (i, v, k), doc in self.read_documents(wanted).items():
                    if self._good(v, k, doc):
                        confirmed[(v, k)] = i
                bad = [(v, k) for v in VIEWS for k, ix in served[v].items()
                       if confirmed.get((v, k)) != ix[0]]
                owned = self._owned() if not bad else {}
                if bad:
                    state = f"{len(bad)} documents not right yet"
                elif all_own and not all(n > 0 for n in owned.values()):
                    state = f"documents right, but tasks owned: {owned}"
                elif self._confirm(served, confirmed):
                    self.report.tasks_owned = owned
                    self.report.converge_s = time.monotonic() - self.last_event
                    return True
                else:
                    state = "documents changed between the last two reads"
            elif not state:
                miss = sum(len(expected_keys[v] - set(served[v])) for v in VIEWS)
                extra = sum(len(set(served[v]) - expected_keys[v]) for v in VIEWS)
                state = f"keys missing {miss}, unexpected {extra}, served twice {twice}"
            if time.monotonic() >= next_note:
                print(f"[{self.name}] +{time.monotonic() - self.t0:.0f}s: {state}; "
                      f"tasks owned {self._owned()}", flush=True)
                next_note = time.monotonic() + 10
            time.sleep(every)
        self.report.tasks_owned = self._owned()
        return False

    def _confirm(self, served, confirmed) -> bool:
        """A full read of every key from the instance serving it: still right?"""
        wanted: dict[int, list[tuple[str, str]]] = {}
        for v in VIEWS:
            for k, ix in served[v].items():
                wanted.setdefault(ix[0], []).append((v, k))
        got = self.read_documents(wanted)
        ok = True
        for (v, k), i in list(confirmed.items()):
            if not self._good(v, k, got.get((i, v, k))):
                del confirmed[(v, k)]
                ok = False
        return ok and len(got) == sum(len(p) for p in wanted.values())

    def _owned(self) -> dict[int, float]:
        return {i: (m or {}).get("aggregator_tasks_owned", -1)
                for i, m in self.all_metrics().items()}

    def union(self) -> dict[str, dict[str, dict]]:
        """Every document every live instance serves, {view: {key: {"v", "d"}}}; a key served
        by several instances counts once, with the highest version. Also counts those keys
        (report.served_twice) and notes where their copies differ."""
        served, errors = self.read_served()
        self.served = served
        r = self.report
        r.problems += [f"at the final read, {e}" for e in errors]
        wanted: dict[int, list[tuple[str, str]]] = {}
        for v in VIEWS:
            for k, ix in served[v].items():
                for i in ix:
                    wanted.setdefault(i, []).append((v, k))
        got = self.read_documents(wanted)
        docs: dict[str, dict[str, dict]] = {v: {} for v in VIEWS}
        twice: list[str] = []
        for v in VIEWS:
            for k, ix in served[v].items():
                copies = [got[(i, v, k)] for i in ix if got.get((i, v, k)) is not None]
                if copies:
                    docs[v][k] = max(copies, key=lambda d: d["v"])
                if len(ix) > 1:
                    same = all(c == copies[0] for c in copies)
                    twice.append(f"{v}/{k} on instances {ix}"
                                 f"{'' if same else ' (copies differ)'}")
        r.served_twice = len(twice)
        if twice:
            r.problems.append(f"{len(twice)} keys served by more than one live instance, "
                              f"e.g. {twice[:5]}")
        return docs

    # ---- the end -------------------------------------------------------------------------------
    def finish(self, timeout: float = CONVERGE_S, all_own: bool = False,
               stop: bool = True) -> ClusterReport:
        """Converge (or time out), verify the union of the served documents against the
        oracles, the dead-letter topic, then stop the survivors cleanly and check that no
        process and no shared memory of any instance is left."""
        r = self.report
        converged = self.converge(timeout, all_own)
        if not converged:
            r.problems.append(f"not converged within {timeout:.0f}s (tasks owned: "
                              f"{r.tasks_owned})")
        elif all_own and not all(n > 0 for n in r.tasks_owned.values()):
            r.problems.append(f"an instance owns no task: {r.tasks_owned}")
        self.final_metrics = self.all_metrics()
        r.restored = int(sum((m or {}).get("aggregator_restore_records_total", 0)
                             for m in self.final_metrics.values()))
        docs = self.union()
        check_views(r, docs, self.expected, self.versions)
        r.problems += self.version_examples(docs)
        if self.changes:  # change events: each version once at least, in order, identical
            check_changes(r, self.bootstrap, self.prefix, docs)
        if self.with_bad:
            check_dead_letters(r, self.bootstrap, self.prefix, self.bad)
        if not r.ok:
            print(self.diagnostics(), flush=True)
            if r.lost:  # last: the tail of a CI log shows it
                print("\n".join(self.lost_updates(docs)), flush=True)
        if stop:
            self.stop_all()
        r.seconds = time.monotonic() - self.t0
        return r

    def lost_updates(self, docs: dict, limit: int = 4) -> list[str]:
        """Where the updates of a few documents below the oracle's version went: per
        document its task, the through-offset of the task in each instance's shards, and per
        one of its last events whether it was local to the task or a forward, and the
        forward's offsets in the tasks topic (MISSING: never written). Then each instance's
        warnings and errors, counted."""
        tasks = self.tasks
        topic = f"{self.group}.tasks"
        applied = simulate.applied_events(self.workload)
        parts: dict[int, list] = {}  # task -> its records of the tasks topic, in order
        for m in read_topic(self.bootstrap, topic, timeout=30, quiet=1.0):
            parts.setdefault(m.partition(), []).append(m)
        out = ["lost-update forensics:"]
        lost = [(view, key, want, docs[view].get(key, {}).get("v", 0))
                for view in VIEWS for key, want in sorted(self.versions[view].items())
                if docs[view].get(key, {}).get("v", 0) < want][:limit]
        for view, key, want, got in lost:
            task = slot_of(key.encode()) % tasks
            recs = sorted(parts.get(task, []), key=lambda m: m.offset())
            fwd: dict[str, list[int]] = {}
            for m in recs:
                h = m.headers()
                if h and h[-1][0] == FORWARD_HEADER:
                    u = msgpack.unpackb(m.value(), raw=False)
                    if u[UPD_KEY] == key:
                        fwd.setdefault(u[UPD_ID], []).append(m.offset())
            through = {i.index: _shard_through(i.data_dir, topic, task)
                       for i in self.instances}
            out.append(f"{view}/{key} v{got} want v{want}: task {task}, {len(recs)} records; "
                       f"through per instance/shard {through}")
            offs = [m.offset() for m in recs]
            gaps = [(a, b) for a, b in zip(offs, offs[1:]) if b != a + 1]
            if gaps or (offs and offs[0] != 0):
                out.append(f"  offset gaps in the tasks topic: {gaps[:5]} (first {offs[0]})")
            evs = [e for e in applied if (view, key) in simulate.targets(e)]
            for e in evs[-4:]:
                src = slot_of(e.partitionkey.encode()) % tasks
                where = ("local" if src == task else
                         f"forward at {fwd.get(e.id, 'MISSING')}")
                out.append(f"  {e.type} {e.partitionkey} seq {e.sequence} (task {src}): "
                           f"{where}")
        for inst in self.instances:
            counts: dict[str, int] = {}
            for line in inst.svc.log().splitlines():
                if (" WARNING " in line or " ERROR " in line) and "dead-letter " not in line:
                    msg = line.split(" ", 3)[-1][:150]
                    counts[msg] = counts.get(msg, 0) + 1
            out.append(f"instance {inst.index}: {sum(counts.values())} warnings/errors")
            out += [f"  {c}x {m}" for m, c in sorted(counts.items(), key=lambda x: -x[1])[:8]]
        return out

    def version_examples(self, docs: dict) -> list[str]:
        """A few keys per kind of difference: missing, wrong content, version low/high."""
        out = []
        for v in VIEWS:
            got, want, vers = docs[v], self.expected[v], self.versions[v]
            missing = sorted(set(want) - set(got))
            wrong = sorted(k for k in set(want) & set(got) if got[k]["d"] != want[k])
            low = sorted(k for k in vers if got.get(k, {}).get("v", 0) < vers[k])
            high = sorted(k for k in got if got[k]["v"] > vers.get(k, 0))
            for what, keys in (("missing", missing), ("wrong content", wrong),
                               ("version too low (lost)", low),
                               ("version too high (applied twice)", high)):
                if keys:
                    ex = ", ".join(f"{k} (v{got.get(k, {}).get('v', 0)}, want "
                                   f"v{vers.get(k, 0)}, on {self.served[v].get(k, [])})"
                                   for k in keys[:5])
                    out.append(f"{v}: {len(keys)} {what}, e.g. {ex}")
        return out

    def stop_all(self) -> None:
        """SIGTERM every live instance; then no process and no /dev/shm segment of any
        instance may be left."""
        r = self.report
        for inst in self.live():
            inst.note_pids()
            if inst._api is not None:
                inst._api.close()
            code = inst.svc.stop()
            if code != 0:
                r.problems.append(f"instance {inst.index} exited with {code} at the clean "
                                  f"stop\n{inst.svc.log()[-2000:]}")
        for inst in self.instances:
            left = _wait_gone(inst.pids, 10)
            if left:
                r.problems.append(f"instance {inst.index}: processes {sorted(left)} left")
            segs = inst.svc.shm_segments()
            r.shm_leftovers += len(segs)
            if segs:
                r.problems.append(f"instance {inst.index}: shared-memory segments left "
                                  f"behind: {segs}")

    def diagnostics(self) -> str:
        """Per instance: alive or killed, tasks owned, keys served, the log's tail."""
        out = []
        m = self.all_metrics()
        for inst in self.instances:
            keys = sum(inst.index in ix for v in self.served.values() for ix in v.values())
            state = ("killed" if not inst.live
                     else f"metrics {_brief_metrics({0: m.get(inst.index)})[0]}")
            out.append(f"--- instance {inst.index} ({state}; keys served at the last poll: "
                       f"{keys}) {inst.svc.log_path}\n{inst.svc.log()[-3000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for inst in self.instances:
            inst.note_pids()
            if inst._api is not None:
                inst._api.close()
        super().close()  # SIGKILLs what still runs, removes the shared memory
        for inst in self.instances:
            _kill_ours(_wait_gone(inst.pids, 5))


def _shard_through(data_dir: Path, topic: str, task: int) -> dict[str, int]:
    """The through-offset of a task in each shard of an instance's data dir."""
    out = {}
    for path in sorted(Path(data_dir).glob("shard-*")):
        reader = SharedReader(path)
        snap = reader.snapshot(("offsets",))
        try:
            raw = snap.get("offsets", offset_key(topic, task)) if snap is not None else None
        finally:
            if snap is not None:
                snap.close()
            reader.close()
        if raw is not None:
            out[path.name] = int.from_bytes(raw, "big", signed=True)
    return out


def _wait_gone(pids, timeout: float) -> set[int]:
    """Wait until none of `pids` runs; return those still running after `timeout`."""
    deadline = time.monotonic() + timeout
    left = {p for p in pids if running(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p for p in left if running(p)}
    return left


def _kill_ours(pids) -> None:
    """SIGKILL those of `pids` that are still processes of the service (a pid may have been
    reused by another process since it was noted)."""
    for p in pids:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            if b"multiprocessing" in cmd or b"aggregator" in cmd:
                os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _brief_metrics(m: dict) -> dict:
    names = ("aggregator_events_applied_total", "aggregator_tasks_owned",
             "aggregator_tasks_restoring", "aggregator_restore_records_total",
             "aggregator_partitions_assigned")
    return {i: None if x is None else {n.removeprefix("aggregator_"): x[n] for n in names
                                       if n in x}
            for i, x in m.items()}
