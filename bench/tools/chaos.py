"""The chaos suite's long mode: every fault of tests/chaos at full size, one table.

    python -m bench.tools.chaos                      # 1M events, a worker SIGKILLed every 2 s, ...
    python -m bench.tools.chaos --events 200000 -k kill

Runs the same tests as CI (tests/chaos, against the embedded broker or --bootstrap) with the
sizes raised through the environment, collects each run's verified report (events, faults
injected, lost, double-applied, out-of-order, time to recover) and writes
bench/results/chaos.json and chaos.md. Exits non-zero when any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tools.chaos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000,
                    help="unique events per run (default 1,000,000)")
    ap.add_argument("--hot-events", type=int, default=1_000_000,
                    help="out-of-order events for the single hot key (default 1,000,000)")
    ap.add_argument("--kill-every", type=float, default=2.0,
                    help="seconds between worker SIGKILLs (default 2)")
    ap.add_argument("--freeze", type=float, default=20.0, help="broker freeze, s (default 20)")
    ap.add_argument("--storage-events", type=int, default=200_000,
                    help="events of the disk-full/read-only/map-full runs (default 200,000: "
                         "their tmpfs takes ~2 KiB of RAM per event)")
    ap.add_argument("--reshard-events", type=int, default=None,
                    help="events of the 4 -> 7 -> 2 reshard run (default: --events)")
    ap.add_argument("-k", default=None, help="pytest -k expression to pick tests")
    ap.add_argument("--bootstrap", default=None, help="an external Kafka instead of Tansu")
    ap.add_argument("--out", type=Path, default=RESULTS / "chaos",
                    help="output path without suffix (default bench/results/chaos)")
    args = ap.parse_args(argv)

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        rows_path = Path(f.name)
    env = dict(os.environ, AGGREGATOR_CHAOS_EVENTS=str(args.events), AGGREGATOR_LONG_TESTS="1",
               AGGREGATOR_CHAOS_HOT_EVENTS=str(args.hot_events),
               AGGREGATOR_CHAOS_KILL_EVERY=str(args.kill_every),
               AGGREGATOR_CHAOS_FREEZE_S=str(args.freeze),
               AGGREGATOR_CHAOS_STORAGE_EVENTS=str(args.storage_events),
               AGGREGATOR_CHAOS_RESHARD_EVENTS=str(args.reshard_events or args.events),
               AGGREGATOR_CHAOS_REPORT=str(rows_path))
    if args.bootstrap:
        env["AGGREGATOR_TEST_BOOTSTRAP"] = args.bootstrap
    cmd = [sys.executable, "-m", "pytest", "tests/chaos", "-p", "no:cacheprovider", "-q",
           "-s", "-o", "timeout=3600"]
    if args.k:
        cmd += ["-k", args.k]
    t0 = time.monotonic()
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    rows_path.unlink()
    md = table(rows, args, time.monotonic() - t0, code)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"events": args.events, "hot_events": args.hot_events, "kill_every": args.kill_every,
         "pytest_exit": code, "runs": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return code


def table(rows: list[dict], args, seconds: float, code: int) -> str:
    lines = [
        f"Chaos suite, long mode: `python -m bench.tools.chaos --events {args.events}` "
        f"({len(rows)} verified runs, {seconds / 60:.0f} min, pytest exit {code})",
        "",
        "| run | events | faults injected | lost | double-applied | out-of-order | "
        "docs wrong | time to recover (max) | run time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rec = r.get("max_recover_s")
        lines.append(
            f"| {r['run']} | {r['events']:,} | {r['faults']} | {r['lost']} | "
            f"{r['double_applied']} | {r['out_of_order']} | {r['docs_wrong']} | "
            f"{'-' if rec is None else f'{rec:.1f} s'} | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
