"""Summarise a py-spy profile of a benchmark run: the top frames per process role.

    py-spy record --subprocesses --rate 100 --format raw -o prof.txt -- \\
        python -m bench --stage e2e --no-baselines --workers 2 --latency-seconds 0 -n 300000
    python -m bench.tools.profile_top prof.txt [--top 15]

Roles come from the stacks: `worker_main` → worker, `Supervisor.run` → supervisor,
`_server_main` → http, anything else → harness. For each role: samples, the functions with
the most *self* samples (where the time is spent) and the aggregator functions with the most
*inclusive* samples (which step of the pipeline it belongs to). Idle waiting is included.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

_FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^:()]+)(?::\d+)?\)$")


def role(frames: list[str]) -> str:
    for f in frames:
        if f.startswith("worker_main "):
            return "worker"
        if f.startswith("Supervisor.run ") or f.startswith("serve (bench/stages/service.py"):
            return "supervisor"
        if f.startswith("_server_main "):
            return "http"
    return "harness"


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    return f"{m['func']} ({m['file'].split('site-packages/')[-1]})"


def summarise(path: str, top: int) -> str:
    self_: dict[str, Counter] = defaultdict(Counter)
    incl: dict[str, Counter] = defaultdict(Counter)
    total: Counter = Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = [x for x in stack.split(";") if not x.startswith("process ")]
            if not frames:
                continue
            r = role(frames)
            total[r] += n
            self_[r][_name(frames[-1])] += n
            for name in {_name(x) for x in frames if "aggregator/" in x}:
                incl[r][name] += n
    out = []
    for r, n in total.most_common():
        out.append(f"== {r}: {n} samples")
        out.append("  self:")
        out += [f"    {c / n:6.1%}  {name}" for name, c in self_[r].most_common(top)]
        out.append("  inclusive (aggregator frames):")
        out += [f"    {c / n:6.1%}  {name}" for name, c in incl[r].most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", help="py-spy --format raw output")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    print(summarise(args.profile, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
