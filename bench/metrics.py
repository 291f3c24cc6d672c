"""What the harness samples while a measured process tree runs.

- `ProcessSampler`: every 100 ms, RSS and CPU time (user + system) of a root process and
  all its descendants (psutil), plus named extra processes (the broker). Every 10th sample
  also reads PSS (proportional set size: shared pages such as the /dev/shm rings and the
  LMDB map are split between the processes that map them, so the PSS sum is the real
  footprint; the RSS sum counts a shared page once per process).
- `DurablePoller`: every 20 ms, the through-offsets each LMDB shard has durably committed
  (``Shard(path, readonly=True).offsets()``), with the wall-clock and monotonic time each
  value was first seen. The resolution of "state committed" is therefore the poll interval
  (20 ms, plus the cost of one poll).
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from aggregator.store import Shard, shard_path

log = logging.getLogger(__name__)
MiB = 1 << 20


_INBOUND_RING = re.compile(r"/dev/shm/\S+-s(\d+)$", re.M)


def _label(proc: psutil.Process) -> tuple[str, bool]:
    """(label, final). A spawned child is a worker once it has mapped its inbound ring
    (``<prefix>-s<i>`` in /dev/shm); until then its label is provisional."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "child", True
    if "resource_tracker" in cmd:
        return "resource_tracker", True
    if "multiprocessing" not in cmd:
        return proc.name(), True
    try:
        with open(f"/proc/{proc.pid}/maps") as f:
            m = _INBOUND_RING.search(f.read())
    except OSError:
        m = None
    if m:
        return f"worker-{m.group(1)}", True
    return "other child (e.g. http)", False


@dataclass
class ProcStats:
    label: str
    final: bool = True  # False: relabel at the next sample (a worker not yet attached)
    seen: int = 0
    peak_rss: int = 0
    peak_pss: int = 0
    cpu_first: float | None = None  # cpu seconds when first seen
    cpu_last: float = 0.0
    breakdown: dict | None = None  # smaps_breakdown() near the peak RSS
    breakdown_rss: int = 0  # the RSS when it was read
    written: int = 0  # write_bytes of /proc/<pid>/io (since it started; + reaped children)


@dataclass
class Sample:
    t: float  # time.monotonic()
    cpu: dict[int, float]  # pid -> user + system seconds
    rss_total: int
    # pid -> (user, system, main thread user + system) seconds; counted processes only
    split: dict[int, tuple[float, float, float]] = field(default_factory=dict)


class ProcessSampler:
    """Samples a process tree in a background thread; use as a context manager."""

    def __init__(self, roots: dict[str, int], *, interval: float = 0.1,
                 extra: dict[str, int | None] | None = None, pss_every: int = 10,
                 breakdown: bool = True, children: bool = True) -> None:
        """`roots`: {label: pid}, sampled with all their descendants and counted in the
        totals; `extra`: {label: pid} sampled alone and left out of the totals.
        `breakdown`: read /proc/<pid>/smaps of a counted process whenever its RSS has grown
        by 2 % (and 1 MiB) since the last read (`smaps_breakdown`), so the summary shows
        what each process's memory is near its peak (a read costs ~1 ms).
        `children`: False samples the roots alone (finding a root's descendants scans every
        process of the machine, ~2.5 ms per root and sample here)."""
        self.roots = {pid: label for label, pid in roots.items()}
        self.interval = interval
        self.extra = {pid: name for name, pid in (extra or {}).items() if pid}
        self.pss_every = pss_every
        self.breakdown = breakdown
        self.children = children
        self.procs: dict[int, ProcStats] = {}
        self.samples: list[Sample] = []
        self.peak_rss_total = 0
        self.peak_pss_total = 0
        self.peak_written_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._handles: dict[int, psutil.Process] = {}

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _handle(self, pid: int) -> psutil.Process:
        h = self._handles.get(pid)
        if h is None:
            h = self._handles[pid] = psutil.Process(pid)
        return h

    def _tree(self) -> list[psutil.Process]:
        out = []
        for pid in self.roots:
            try:
                root = self._handle(pid)
                out.append(root)
                for child in root.children(recursive=True) if self.children else ():
                    out.append(self._handles.setdefault(child.pid, child))
            except psutil.Error:
                pass
        for pid in self.extra:
            try:
                out.append(self._handle(pid))
            except psutil.Error:
                pass
        return out

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            self.sample(with_pss=n % self.pss_every == 0)
            n += 1
            self._stop.wait(self.interval)
        self.sample(with_pss=False)

    def sample(self, with_pss: bool = False) -> None:
        now = time.monotonic()
        cpu: dict[int, float] = {}
        split: dict[int, tuple[float, float, float]] = {}
        rss_total = pss_total = written_total = 0
        for p in self._tree():
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    ct = p.cpu_times()
                    pss = p.memory_full_info().pss if with_pss else 0
                    written = p.io_counters().write_bytes
            except psutil.Error:
                continue
            st = self.procs.get(p.pid)
            if st is None:
                named = self.extra.get(p.pid) or self.roots.get(p.pid)
                label, final = (named, True) if named else _label(p)
                st = self.procs[p.pid] = ProcStats(label, final)
            elif not st.final and st.seen < 100:
                st.label, st.final = _label(p)
            st.seen += 1
            c = ct.user + ct.system
            if st.cpu_first is None:
                st.cpu_first = c
            st.cpu_last = c
            cpu[p.pid] = c
            st.peak_rss = max(st.peak_rss, rss)
            st.peak_pss = max(st.peak_pss, pss)
            st.written = max(st.written, written)
            if (self.breakdown and p.pid not in self.extra
                    and rss > st.breakdown_rss + max(MiB, st.breakdown_rss // 50)):
                b = smaps_breakdown(p.pid)
                if b is not None and not _shrank_since(p, rss):
                    st.breakdown, st.breakdown_rss = b, rss
            if p.pid not in self.extra:
                split[p.pid] = (ct.user, ct.system, _main_thread_cpu(p))
                rss_total += rss
                pss_total += pss
                written_total += written
        self.samples.append(Sample(now, cpu, rss_total, split))
        self.peak_written_total = max(self.peak_written_total, written_total)
        self.peak_rss_total = max(self.peak_rss_total, rss_total)
        self.peak_pss_total = max(self.peak_pss_total, pss_total)

    def cpu_at(self, pid: int, t: float) -> float:
        """CPU seconds of `pid` at monotonic time `t`, interpolated linearly between the
        samples around it (clamped to the first and last sample of that process)."""
        pts = [(s.t, s.cpu[pid]) for s in self.samples if pid in s.cpu]
        if not pts:
            return 0.0
        if t <= pts[0][0]:
            return pts[0][1]
        if t >= pts[-1][0]:
            return pts[-1][1]
        i = bisect.bisect_left([p[0] for p in pts], t)
        (ta, ca), (tb, cb) = pts[i - 1], pts[i]
        return ca + (cb - ca) * (t - ta) / (tb - ta) if tb > ta else cb

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds spent between two monotonic times, by label (interpolated between the
        100 ms samples, so short windows are approximate)."""
        out: dict[str, float] = {}
        for pid, st in self.procs.items():
            used = max(0.0, self.cpu_at(pid, t1) - self.cpu_at(pid, t0))
            out[st.label] = out.get(st.label, 0.0) + used
        return out

    def cpu_split_between(self, t0: float, t1: float) -> dict[str, dict[str, float]]:
        """Where each counted process's CPU went between two monotonic times, by label:
        ``user`` and ``system`` seconds (all threads), and ``main`` (its main thread) against
        ``threads`` (the others: librdkafka's, a publisher's, ...). From the samples nearest
        inside the window (100 ms apart), so the edges are approximate."""
        out: dict[str, dict[str, float]] = {}
        for pid, st in self.procs.items():
            inside = [s.split[pid] for s in self.samples if t0 <= s.t <= t1 and pid in s.split]
            if len(inside) < 2:
                continue
            (u0, s0, m0), (u1, s1, m1) = inside[0], inside[-1]
            d = out.setdefault(st.label, {"user": 0.0, "system": 0.0, "main": 0.0,
                                          "threads": 0.0})
            d["user"] += u1 - u0
            d["system"] += s1 - s0
            d["main"] += m1 - m0
            d["threads"] += (u1 + s1 - u0 - s0) - (m1 - m0)
        return {k: {n: round(v, 3) for n, v in d.items()} for k, d in out.items()}

    def written_total(self) -> int:
        """Bytes the counted processes caused to be written to storage since they started
        (/proc/<pid>/io ``write_bytes``; a page dirtied through a file mapping counts when
        it is dirtied): the largest sum over one sample. Not a sum of each process's last
        value: a parent that reaps a child adds the child's counts to its own."""
        return self.peak_written_total

    def summary(self) -> dict:
        per: dict[str, dict] = {}
        for pid, st in sorted(self.procs.items()):
            name = st.label
            k = 1
            while name in per:
                k += 1
                name = f"{st.label}#{k}"
            per[name] = {"pid": pid, "peak_rss_mib": _mib(st.peak_rss),
                         "peak_pss_mib": _mib(st.peak_pss),
                         "cpu_s": round(st.cpu_last - (st.cpu_first or 0.0), 3),
                         "written_mib": _mib(st.written)}
            if st.breakdown is not None:
                per[name]["breakdown"] = {
                    "at_rss_mib": _mib(st.breakdown_rss),
                    "rss_mib": {k: _mib(v["rss"]) for k, v in st.breakdown.items()},
                    "pss_mib": {k: _mib(v["pss"]) for k, v in st.breakdown.items()}}
        return {"processes": per, "peak_rss_total_mib": _mib(self.peak_rss_total),
                "written_bytes_total": self.written_total(),
                "peak_pss_total_mib": _mib(self.peak_pss_total),
                "samples": len(self.samples), "interval_s": self.interval}


def _main_thread_cpu(p: psutil.Process) -> float:
    """User + system seconds of a process's main thread (its thread id is its pid)."""
    try:
        with open(f"/proc/{p.pid}/task/{p.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


_TICKS = os.sysconf("SC_CLK_TCK")


def _mib(n: int) -> float:
    return round(n / (1 << 20), 1)


@dataclass
class ShardHistory:
    """When each through-offset of one shard became durable."""

    times: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # wall clock
    offsets: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    latest: dict[tuple[str, int], int] = field(default_factory=dict)

    def record(self, t_wall: float, offs: dict[tuple[str, int], int]) -> None:
        for tp, off in offs.items():
            if self.latest.get(tp, -2) != off:
                self.latest[tp] = off
                self.times.setdefault(tp, []).append(t_wall)
                self.offsets.setdefault(tp, []).append(off)

    def durable_at(self, tp: tuple[str, int], offset: int) -> float | None:
        """Wall-clock time of the first poll that saw `offset` durable (None: never)."""
        offs = self.offsets.get(tp)
        if not offs:
            return None
        i = bisect.bisect_left(offs, offset)
        return self.times[tp][i] if i < len(offs) else None


class DurablePoller:
    """Polls the shards' durable through-offsets in a background thread."""

    def __init__(self, data_dir: str | Path, workers: int, interval: float = 0.02) -> None:
        self.data_dir = Path(data_dir)
        self.workers = workers
        self.interval = interval
        self.history = [ShardHistory() for _ in range(workers)]
        self.targets: dict[tuple[str, int], int] | None = None  # last offset to reach
        self.t_done: float | None = None  # monotonic time all targets were first seen
        self.t_first: float | None = None  # monotonic time any offset was first seen
        self.polls = 0
        self.poll_seconds = 0.0
        self._shards: list[Shard | None] = [None] * workers
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="durable-poller", daemon=True)

    def start(self) -> DurablePoller:
        self._thread.start()
        return self

    def set_targets(self, targets: dict[tuple[str, int], int]) -> None:
        """{(topic, partition): last offset}: `wait()` returns once every shard holds them."""
        self.t_done = None
        self._done.clear()
        self.targets = dict(targets)

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def fraction(self) -> float:
        """Share of the target records durable in every shard (for progress output)."""
        if not self.targets:
            return 0.0
        want = sum(last + 1 for last in self.targets.values())
        have = sum(min(h.latest.get(tp, -1) + 1 for h in self.history)
                   for tp in self.targets)
        return min(1.0, have / want) if want else 1.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for i, s in enumerate(self._shards):
            if s is not None:
                s.close()
                self._shards[i] = None

    def _open(self, i: int) -> Shard | None:
        s = self._shards[i]
        if s is not None:
            return s
        path = shard_path(self.data_dir, i)
        if not (path / "data.mdb").exists():
            return None
        try:
            s = Shard(path, readonly=True)
        except Exception:  # noqa: BLE001 - being created: try again at the next poll
            return None
        if "offsets" not in s.db:
            s.close()
            return None
        self._shards[i] = s
        return s

    def poll(self) -> None:
        t0 = time.monotonic()
        wall = time.time()
        for i in range(self.workers):
            s = self._open(i)
            if s is None:
                continue
            try:
                offs = s.offsets()
            except Exception:  # noqa: BLE001 - e.g. the map was resized: reopen
                s.close()
                self._shards[i] = None
                continue
            self.history[i].record(wall, offs)
            if offs and self.t_first is None:
                self.t_first = t0
        self.polls += 1
        self.poll_seconds += time.monotonic() - t0
        if self.targets is not None and self.t_done is None and self._reached():
            self.t_done = t0
            self._done.set()

    def _reached(self) -> bool:
        for h in self.history:
            for tp, last in self.targets.items():
                if h.latest.get(tp, -1) < last:
                    return False
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)


# ---- what a process's resident memory is (from /proc/<pid>/smaps) -----------------------
BREAKDOWN = ("heap", "thread_arenas", "anon_other", "stacks", "shm", "lmdb", "code_files")
_ARENA_HEAP = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: a non-main arena's heaps, aligned
_GUARD_MAX = 1 << 20  # a thread stack's PROT_NONE guard (one page unless set larger)
_MAP_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)$")


def _shrank_since(p: psutil.Process, rss: int) -> bool:
    """Whether `p`'s RSS has dropped well below `rss` (read just before its smaps) or `p` is
    gone: a process that is exiting unmaps its libraries and arenas while its smaps is being
    read, and that read is a part of the process, not the process (a worker at its exit read
    code_files 20.6 MiB of 30.7 and summed 55 MiB against the 71 MiB RSS read before)."""
    try:
        after = p.memory_info().rss
    except psutil.Error:
        return True
    return after < rss - max(MiB, rss // 50)


def smaps_breakdown(pid: int) -> dict[str, dict[str, int]] | None:
    """{category: {"rss": bytes, "pss": bytes, "anon": bytes}} of one process, by mapping:

    - ``heap``: the brk heap (glibc's main malloc arena: the main thread's malloc, e.g.
      LMDB's dirty pages of a transaction, msgpack buffers);
    - ``thread_arenas``: glibc's per-thread malloc arenas (64 MiB-aligned heaps, reserved
      64 MiB: a PROT_NONE tail after the used part): what non-main threads malloc, i.e.
      librdkafka's threads (fetch buffers, the consumer's prefetch queue, producer
      batches) and Python threads;
    - ``stacks``: thread stacks (an anonymous mapping right after its PROT_NONE guard page);
    - ``anon_other``: the other private anonymous mappings: CPython's 1 MiB object arenas,
      malloc's mmap'd large blocks (>= 128 KiB, e.g. big bytes objects, bloom bit arrays);
    - ``shm``: /dev/shm segments (the rings: mapped by the supervisor and a worker, so an RSS
      sum counts a touched page twice; PSS splits it);
    - ``lmdb``: the LMDB map files (``*.mdb``, file-backed, shared with readers);
    - ``code_files``: every other file mapping (the interpreter, .so libraries, locale).
    None when the process is gone or unreadable, or has no mapping left (a process that is
    exiting: its smaps reads empty while its RSS was still read a moment before)."""
    out = {k: {"rss": 0, "pss": 0, "anon": 0} for k in BREAKDOWN}
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    maps: list[list] = []  # [start, end, perms, inode, path, rss, pss, anon]
    for line in text.splitlines():
        m = _MAP_HEAD.match(line)
        if m:
            maps.append([int(m.group(1), 16), int(m.group(2), 16), m.group(3),
                         int(m.group(4)), m.group(5).strip(), 0, 0, 0])
        elif maps:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Anonymous"):
                i = {"Rss": 5, "Pss": 6, "Anonymous": 7}[key]
                maps[-1][i] = int(rest.split()[0]) * 1024
    if not maps:
        return None
    for n, (start, end, perms, inode, path, rss, pss, anon) in enumerate(maps):
        if not rss:
            continue
        if path == "[heap]":
            cat = "heap"
        elif path in ("[stack]",):
            cat = "stacks"
        elif path.startswith("/dev/shm/") or path.startswith("/SYSV"):
            cat = "shm"
        elif path.endswith(".mdb") or path.endswith(".mdb (deleted)"):
            cat = "lmdb"
        elif inode or path.startswith("/"):
            cat = "code_files"
        elif path.startswith("["):  # [vdso], [vvar] ...
            cat = "code_files"
        else:
            prev = maps[n - 1] if n else None
            nxt = maps[n + 1] if n + 1 < len(maps) else None
            if start % _ARENA_HEAP == 0 and (end - start == _ARENA_HEAP or (
                    nxt and nxt[0] == end and nxt[2].startswith("---") and not nxt[4])):
                cat = "thread_arenas"  # a heap of a glibc arena: 64 MiB aligned and reserved
            elif (prev and prev[1] == start and prev[2].startswith("---") and not prev[4]
                  and prev[1] - prev[0] <= _GUARD_MAX):
                cat = "stacks"  # right after its guard pages
            else:
                cat = "anon_other"
        c = out[cat]
        c["rss"] += rss
        c["pss"] += pss
        c["anon"] += anon
    return out
