"""Progress under a crash loop: how often can a worker be SIGKILLed and the run still finish
within 2x its fault-free time?

    python -m bench.tools.crashloop                         # 200k events; kill every 2 ... 0.25 s
    python -m bench.tools.crashloop --events 1000000 --intervals 4,2,1,0.5,0.25   # the issue's size

The chaos harness (tests/support/chaos.py) against the embedded broker (or --bootstrap): the
seeded 7-source workload is produced to fresh topics, then `aggregator run` (2 workers) starts;
from its first committed offset on, a random worker is SIGKILLed every `interval` seconds,
without waiting for the previous one to recover (a crash loop), until every offset is
committed. The time counted is from the first committed offset to the last (the group join
before it is the same in every run). Each run is verified as the chaos suite does (views and
versions against the oracle, change events, dead letters) and its shards' totals against the
oracle's counts. Writes bench/results/crashloop.{json,md}; the answer is the shortest
interval whose time is at most 2x the fault-free one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from aggregator.devtools import simulate
from aggregator.devtools.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def one_run(broker, workdir: Path, workload, interval: float | None, seed: int,
            timeout: float) -> dict:
    from tests.support.chaos import ChaosRun, shard_totals

    name = "fault-free" if interval is None else f"kill every {interval:g} s"
    run = ChaosRun(broker, workdir, workload, name=name.replace(" ", "-"))
    try:
        run.produce()
        svc = run.start()
        svc.wait_workers(2)
        while run.committed_total() <= 0:
            run._check_alive()
            time.sleep(0.02)
        t0 = time.monotonic()
        rng = random.Random(seed)
        kills = 0
        next_kill = t0 + (interval or 0)
        while run.committed_total() < run.total():
            run._check_alive()
            now = time.monotonic()
            if now - t0 > timeout:
                raise TimeoutError(f"{name}: {run.committed_total()}/{run.total()} after "
                                   f"{timeout:.0f} s")
            if interval is not None and now >= next_kill:
                pids = svc.worker_pids()
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
                next_kill += interval
            time.sleep(0.01)
        seconds = time.monotonic() - t0
        report = run.finish()
        totals = shard_totals(run.data_dir)
        applied = simulate.applied_events(workload)
        want = {"records": len(workload.records) + len(run.bad), "applied": len(applied),
                "duplicates": workload.stats["duplicates"],
                "stale": len(workload.events) - len(applied), "deadlettered": len(run.bad)}
        log = svc.log()
        return {"run": name, "interval_s": interval, "seconds": round(seconds, 2),
                "kills": kills, "restarts": log.count("exited with code -9"),
                "exact": report.ok and {k: totals[k] for k in want} == want,
                "problems": report.problems[:5], "totals": totals, "oracle": want,
                "boots_restored": log.count("bloom filter restored"),
                "boots_rebuilt": log.count("bloom filter rebuilt")}
    finally:
        run.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tools.crashloop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", "-n", type=int, default=200_000)
    ap.add_argument("--intervals", default="2,1,0.75,0.5,0.25",
                    help="kill intervals in seconds, comma-separated (default 2,1,0.75,0.5,0.25)")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--timeout", type=float, default=None,
                    help="give a run up after this (s; default 3x the fault-free time, at "
                         "least 60: past 2x the answer is known)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (service logs)")
    ap.add_argument("--bootstrap", default=None, help="an external Kafka instead of Tansu")
    ap.add_argument("--out", type=Path, default=RESULTS / "crashloop",
                    help="output path without suffix (default bench/results/crashloop)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    intervals = [float(x) for x in args.intervals.split(",")]

    from aggregator import core

    workload = simulate.generate(args.seed, args.events)
    rows: list[dict] = []
    if args.bootstrap:
        from tests.support.kafka import ExternalBroker

        ctx = contextlib.nullcontext(ExternalBroker(args.bootstrap))
    else:
        ctx = EmbeddedBroker()
    tmp_ctx = (contextlib.nullcontext(tempfile.mkdtemp(prefix="agg-crashloop-")) if args.keep
               else tempfile.TemporaryDirectory(prefix="agg-crashloop-"))
    with ctx as broker, tmp_ctx as tmp:
        print(f"work dir {tmp}", flush=True)
        for i, interval in enumerate([None, *intervals]):
            timeout = args.timeout or (max(60.0, 3 * rows[0]["seconds"]) if rows else 1200.0)
            try:
                row = one_run(broker, Path(tmp) / f"run{i}", workload, interval,
                              args.seed + i, timeout)
            except TimeoutError as e:  # too slow: the shorter intervals are slower still
                print(e, flush=True)
                rows.append({"run": f"kill every {interval:g} s", "interval_s": interval,
                             "seconds": None, "vs_fault_free": None, "kills": None,
                             "restarts": None, "exact": None, "timeout_s": timeout})
                break
            base = rows[0]["seconds"] if rows else row["seconds"]
            # a workload small enough to be committed at once leaves no time to compare
            row["vs_fault_free"] = round(row["seconds"] / base, 2) if base else None
            rows.append(row)
            print(f"{row['run']:>18}: {row['seconds']:7.1f} s ({_ratio(row)}), "
                  f"{row['kills']} kills, exact={row['exact']}", flush=True)
    ok = [r["interval_s"] for r in rows[1:]
          if r["vs_fault_free"] is not None and r["vs_fault_free"] <= 2.0 and r["exact"]]
    meta = {"events": args.events, "records": len(workload.records), "core": core.IMPLEMENTATION,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "argv": sys.argv[1:], "fastest_within_2x": min(ok) if ok else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                        indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(rows, meta))
    print(table(rows, meta))
    return 0 if all(r["exact"] is not False for r in rows) else 1


def _ratio(row: dict) -> str:
    r = row["vs_fault_free"]
    return "-" if r is None else f"{r:.2f}x"


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"# Crash loop: {meta['events']:,} events ({meta['records']:,} records), 2 workers, "
             f"a random worker SIGKILLed every interval", "",
             "| run | seconds | vs fault-free | kills | worker restarts | exact |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["seconds"] is None:
            base = rows[0]["seconds"]
            past = f"> {r['timeout_s'] / base:.1f}x" if base else "-"
            lines.append(f"| {r['run']} | not done in {r['timeout_s']:.0f} | {past} | | | |")
            continue
        lines.append(f"| {r['run']} | {r['seconds']:.1f} | {_ratio(r)} "
                     f"| {r['kills']} | {r['restarts']} | {'yes' if r['exact'] else 'NO'} |")
    fastest = meta["fastest_within_2x"]
    lines += ["", "Fastest kill interval within 2x the fault-free time: "
              + (f"{fastest:g} s" if fastest is not None else "none of those run")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
