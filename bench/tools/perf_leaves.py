"""Where the time went, from `perf` time samples: per process, the shared objects, the leaf
symbols and what the kernel was doing.

    perf record -a -e cpu-clock -F 499 -g -o /tmp/e2e.data -- \\
        python -m bench --stage e2e --workers 2 --events 1000000 --no-baselines \\
        --latency-seconds 0
    python -m bench.tools.perf_leaves /tmp/e2e.data [--pid 8036 --pid 8037] [--top 40]

Instruction counts (callgrind) do not predict time here: what the worker spends most of its
time on is memory (allocating, first touches, freeing, copying; bench/results/route-compiled.md
"Session 13"), which `cpu-clock` samples see and instruction counts do not. Samples of all
given pids are summed; without ``--pid`` the busiest processes (by samples, the idle task
left out) are listed and the busiest ``python`` ones other than the first (the harness)
are reported. Leaves only: without frame pointers the user-space call chains are not
reliable, the kernel's are (page faults, system calls).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

_HEAD = re.compile(r"^(?P<comm>\S.*?)\s+(?P<pid>\d+)/(?P<tid>\d+)\s*$")
_FRAME = re.compile(r"^\s*[0-9a-f]+\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)$")
KERNEL = "[kernel.kallsyms]"


@dataclass
class Sample:
    comm: str
    pid: int
    tid: int
    frames: list[tuple[str, str]] = field(default_factory=list)  # (symbol, dso), leaf first

    @property
    def leaf(self) -> tuple[str, str]:
        return self.frames[0] if self.frames else ("[unknown]", "?")


def parse(lines) -> list[Sample]:
    """`perf script -F comm,pid,tid,ip,sym,dso` output into samples."""
    out: list[Sample] = []
    cur: Sample | None = None
    for line in lines:
        if not line.strip():
            if cur is not None:
                out.append(cur)
            cur = None
            continue
        if not line[0].isspace():
            m = _HEAD.match(line.rstrip("\n"))
            if m:
                if cur is not None:
                    out.append(cur)
                cur = Sample(m["comm"], int(m["pid"]), int(m["tid"]))
            continue
        if cur is not None:
            f = _FRAME.match(line.rstrip("\n"))
            if f:
                sym = f["sym"].split("+0x")[0]
                cur.frames.append((sym, f["dso"].rsplit("/", 1)[-1]))
    if cur is not None:
        out.append(cur)
    return out


def kernel_kind(s: Sample) -> str | None:
    """What a kernel-leaf sample was doing (None for a user-space leaf)."""
    if s.leaf[1] != KERNEL:
        return None
    syms = [sym for sym, dso in s.frames if dso == KERNEL]
    if "exc_page_fault" in syms or "asm_exc_page_fault" in syms:
        if "do_anonymous_page" in syms:
            return "page fault: anonymous"
        if "do_page_mkwrite" in syms or "do_wp_page" in syms:
            return "page fault: write to a clean page"
        if "shmem_fault" in syms:
            return "page fault: shared memory"
        if "filemap_fault" in syms or "do_fault" in syms:
            return "page fault: file page"
        return "page fault: other (its entry)"
    for word, kind in (("msync", "msync"), ("madvise", "madvise"), ("munmap", "munmap"),
                       ("mmap", "mmap"), ("futex", "futex"), ("fsync", "fsync"),
                       ("write", "write"), ("read", "read"), ("sendto", "send"),
                       ("recvfrom", "recv"), ("epoll", "epoll"), ("nanosleep", "sleep")):
        if any(word in sym for sym in syms):
            return kind
    return "other"


def report(samples: list[Sample], pids: list[int] | None, top: int) -> str:
    lines = []
    by_pid = Counter(s.pid for s in samples if s.pid != 0)
    comm = {s.pid: s.comm for s in samples if s.pid == s.tid}
    lines.append("busiest processes (samples): " + ", ".join(
        f"{pid} {comm.get(pid, '?')} {n}" for pid, n in by_pid.most_common(8)))
    if not pids:
        pythons = [pid for pid, _ in by_pid.most_common() if comm.get(pid) == "python"]
        pids = pythons[1:3]  # the first is the harness (workload, verification)
    chosen = [s for s in samples if s.pid in pids]
    main = [s for s in chosen if s.tid == s.pid]
    n = len(main)
    if not n:
        return "\n".join(lines + [f"no samples of the main threads of {pids}"])
    threads = Counter(s.comm for s in chosen if s.tid != s.pid)
    lines.append(f"pids {pids}: {n} samples of the main threads; other threads: "
                 + ", ".join(f"{c} {k}" for c, k in threads.most_common(4)))
    lines.append("by shared object:")
    for dso, k in Counter(s.leaf[1] for s in main).most_common(16):
        lines.append(f"  {100 * k / n:5.1f} %  {dso}")
    lines.append("by leaf symbol:")
    for (sym, dso), k in Counter(s.leaf for s in main).most_common(top):
        lines.append(f"  {100 * k / n:5.1f} %  {sym[:70]}  [{dso[:28]}]")
    kinds = Counter(k for k in map(kernel_kind, main) if k is not None)
    lines.append("in the kernel:")
    for kind, k in kinds.most_common(12):
        lines.append(f"  {100 * k / n:5.2f} %  {kind}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="a perf.data file (perf record -e cpu-clock -g)")
    ap.add_argument("--pid", type=int, action="append", default=[],
                    help="a process to report (repeatable; default: the busiest python "
                         "processes after the harness)")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args(argv)
    try:
        done = subprocess.run(["perf", "script", "-i", a.data, "-F", "comm,pid,tid,ip,sym,dso"],
                              capture_output=True, text=True)
    except FileNotFoundError:
        print("perf_leaves: `perf` is not installed (Debian: linux-perf)", file=sys.stderr)
        return 2
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"perf_leaves: perf script could not read {a.data}: {why}", file=sys.stderr)
        return 2
    print(report(parse(done.stdout.splitlines()), a.pid or None, a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
