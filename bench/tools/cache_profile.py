"""Memory traffic of one in-process worker, counted: instructions and last-level cache
misses per record under callgrind's cache simulation.

    python -m bench.tools.cache_profile [--events 15000] [--batch 5000] [--top 20]
                                        [--out bench/results] [--name cache-profile]

The worker is memory-bound here (bench/results/route-compiled.md "Session 13"): time goes to
first touches of new objects, copies and frees, which instruction counts do not show and
wall-clock time on this shared 2-core box shows only with ±7 % noise. Callgrind's cache
simulation counts the misses of a model cache, deterministically (the same build and input
give the same counts whatever else runs). The last level is set to 1 MiB, 16-way, 64-byte
lines (the EPYC's L2 per core), not valgrind's guess from the host.

The measured region is `Worker.process` of batches 2 to N of the shop workload's records
(the first batch warms the shard and the caches; the records of batches 2..N are counted),
each batch decoded from a frames ring message inside the region as the worker's `_take` does
(`frames.decode_lazy`: its records made a pass at a time; the messages as the supervisor
frames them: bench.stages.worker_stage's `encode_rounds`): one booted worker owning every
slot, a real LMDB shard, change events on (bench.tools.scale_profile.in_process_worker).
`PYTHONHASHSEED=0` for repeatable dict layouts.

The tool runs itself under valgrind (``--child``) and reads the result with
callgrind_annotate. Prints per record: instructions (Ir), last-level read and write misses
(DLmr, DLmw), and the functions with the most misses (self cost); writes the same to
``<out>/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LL = "1048576,16,64"
EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")


def child(events: int, batch: int, count_file: str) -> None:
    """The measured run (under valgrind): instrumentation on around batches 2..N; the
    number of records measured goes to `count_file`."""
    from aggregator.config import load_config
    from aggregator.frames import decode_lazy as decode  # the worker's own (`_take`)
    from bench import workload as wl
    from bench.stages.worker_stage import encode_rounds
    from bench.tools.scale_profile import in_process_worker

    topics = load_config(wl.CONFIG_PATH, {}, env={}).topics()
    records = wl.generate(11, events).records
    (raw,) = encode_rounds(records, 1, topics, batch, 1 << 30)  # one worker: one per round
    with in_process_worker("cache") as (worker, _cfg, tmp):
        worker.process([decode(raw[0])], [])
        subprocess.run(["callgrind_control", "-i", "on"], check=True, capture_output=True)
        for m in raw[1:]:
            worker.process([decode(m)], [])
        subprocess.run(["callgrind_control", "-i", "off"], check=True, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
    Path(count_file).write_text(str(len(records) - batch))


def _split(line: str) -> tuple[list[int], str]:
    """The event columns of a callgrind_annotate line ("1,234 (5.6%)" or "." each) and the
    rest of the line."""
    tokens = re.sub(r"\([^)]*%\)", " ", line).split()
    vals = []
    for tok in tokens:
        if tok == ".":
            vals.append(0)
        elif re.fullmatch(r"[\d,]+", tok):
            vals.append(int(tok.replace(",", "")))
        else:
            break
    return vals, " ".join(tokens[len(vals):])


def parse_annotate(text: str) -> tuple[dict[str, int], list[tuple[dict[str, int], str]]]:
    """(program totals, [(costs, function)]) of `callgrind_annotate --inclusive=no` output
    with the events of EVENTS (a cache simulation)."""
    totals: dict[str, int] = {}
    funcs: list[tuple[dict[str, int], str]] = []
    in_funcs = False
    for line in text.splitlines():
        vals, rest = _split(line)
        if rest == "PROGRAM TOTALS" and len(vals) == len(EVENTS):
            totals = dict(zip(EVENTS, vals))
        elif "file:function" in line:
            in_funcs = True
        elif in_funcs and funcs and (not line.strip() or line.startswith("-")):
            in_funcs = False  # the end of the table (source annotations may follow)
        elif in_funcs and len(vals) == len(EVENTS) and rest:
            name = re.sub(r"\s*\[[^\]]*\]$", "", rest)  # the object file
            funcs.append((dict(zip(EVENTS, vals)), name.rsplit(":", 1)[-1] or name))
    if not totals:
        raise ValueError("no PROGRAM TOTALS line of the events " + " ".join(EVENTS) +
                         ": not callgrind_annotate output of a cache simulation")
    return totals, funcs


def report(totals: dict[str, int], funcs: list, records: int, top: int) -> dict:
    per = {k: totals.get(k, 0) / records for k in ("Ir", "DLmr", "DLmw")}
    per["LL misses"] = per["DLmr"] + per["DLmw"]
    ranked = sorted(funcs, key=lambda f: -(f[0]["DLmr"] + f[0]["DLmw"]))[:top]
    return {"records": records, "per_record": per,
            "top": [{"function": n, "Ir": c["Ir"] / records, "DLmr": c["DLmr"] / records,
                     "DLmw": c["DLmw"] / records} for c, n in ranked]}


def markdown(r: dict, argv: str) -> str:
    p = r["per_record"]
    lines = [f"`{argv}`", "",
             f"{r['records']:,} records measured: **{p['Ir']:,.0f} Ir, "
             f"{p['DLmr']:.1f} LL read misses and {p['DLmw']:.1f} LL write misses per "
             f"record** ({p['LL misses']:.1f} in all; LL {LL}).", "",
             "| function (self) | LL misses / record | read | write | Ir / record |",
             "|---|---:|---:|---:|---:|"]
    for t in r["top"]:
        lines.append(f"| `{t['function']}` | {t['DLmr'] + t['DLmw']:.1f} | {t['DLmr']:.1f} | "
                     f"{t['DLmw']:.1f} | {t['Ir']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=15000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="cache-profile")
    ap.add_argument("--child", metavar="COUNT_FILE", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.events, a.batch, a.child)
        return 0
    for tool in ("valgrind", "callgrind_annotate", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"cache_profile: {tool} not found (Debian: apt-get install valgrind)",
                  file=sys.stderr)
            return 2
    if a.events <= a.batch:
        print("cache_profile: --events must exceed --batch", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cache-profile-") as tmp:
        out_file = os.path.join(tmp, "callgrind.out")
        count_file = os.path.join(tmp, "records")
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
               f"--LL={LL}", f"--callgrind-out-file={out_file}", sys.executable, "-m",
               "bench.tools.cache_profile", "--child", count_file, "--events", str(a.events),
               "--batch", str(a.batch)]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0 or not os.path.exists(out_file):
            print(f"cache_profile: the run under valgrind failed ({run.returncode}):\n"
                  f"{run.stderr[-2000:]}", file=sys.stderr)
            return 1
        text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", out_file],
                              capture_output=True, text=True, check=True).stdout
        records = int(Path(count_file).read_text())
    totals, funcs = parse_annotate(text)
    r = report(totals, funcs, records, a.top)
    md = markdown(r, " ".join(["python -m bench.tools.cache_profile", *(argv or sys.argv[1:])]))
    print(md, end="")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.md").write_text(md)
    (out / f"{a.name}.json").write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
