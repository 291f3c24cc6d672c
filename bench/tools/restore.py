"""Restore speed in cluster mode: how fast an instance rebuilds the state of the tasks it
gains from their changelog.

    python -m bench.tools.restore                    # 200k events, 8 tasks, 2 workers
    python -m bench.tools.restore --events 20000     # quick (CI runs this through `bench --quick`)
    python -m bench.tools.restore --compare          # also: apply rates, 1x1 vs 2x2, normal mode
    python -m bench.tools.restore --scale-only       # only the 1x1 vs 2x2 apply rates

1. An instance (cluster mode) applies the seeded 7-source workload and stops cleanly.
2. A new instance with an empty data directory joins the group: it gains every task and
   restores all of them from the changelog (full restore).
3. It stops cleanly and starts again on its own data directory: it catches up from the
   changelog offsets its shard has (catch-up restore: nearly nothing to read).

For each restore: changelog records and bytes read, records applied (LMDB writes), the
restore time (per worker the sum of its tasks' restore times, as a worker restores its tasks
one after the other; the workers run in parallel, so the phase takes the longest worker's
sum), MB/s and records/s over that time; for the full restore also the distinct state
entries (keys: documents, dedup ids, sequences, parked events, offsets) the shards hold
afterwards and entries/s; and the time from the instance's start until it owns
every task and is restored (group join included). The restored views are checked against the
oracle through the new instance's API. Writes bench/results/restore.{json,md}.

`--compare` adds apply rates: one instance in cluster mode, one in normal mode, and the
scale-out (`scale_rates`): 1 instance x 1 worker against 2 instances x 2 workers (issue 17:
≥ 1.8x wanted), the instances started and owning every task before the workload is
produced; the rate is the sum over instances of events applied, from the first applied event
until the count stops moving; with each worker's tasks (status.json `placement`, or `task %
workers` for a version without it) and events applied, and the views checked against the
oracle.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from aggregator.devtools import simulate
from aggregator.devtools.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"

_RESTORED = re.compile(
    r"worker-(\d+) INFO .*restored task (\d+) in ([\d.]+) s: (\d+) changelog records "
    r"\(([\d.]+) MB\), (\d+) applied")


def restore_figures(log_text: str, since: int = 0) -> dict:
    """Sum the worker log lines "restored task ..." after character `since` of a log."""
    per_worker: dict[int, float] = {}
    records = applied = tasks = 0
    mb = 0.0
    for m in _RESTORED.finditer(log_text, since):
        w, _, secs, recs, size, app = m.groups()
        per_worker[int(w)] = per_worker.get(int(w), 0.0) + float(secs)
        records += int(recs)
        mb += float(size)
        applied += int(app)
        tasks += 1
    wall = max(per_worker.values(), default=0.0)
    return {"tasks": tasks, "records": records, "mb": round(mb, 2), "keys": applied,
            "restore_s": round(wall, 3),
            "mb_per_s": round(mb / wall, 2) if wall else None,
            "keys_per_s": round(applied / wall) if wall else None,
            "records_per_s": round(records / wall) if wall else None}


def state_entries(data_dir: Path, workers: int) -> int:
    """Distinct LMDB entries of task state (documents, dedup ids, sequences, parked
    events, offsets) in an instance's shards."""
    from aggregator.store import Shard, shard_path

    total = 0
    for w in range(workers):
        shard = Shard(shard_path(data_dir, w), readonly=True)
        try:
            st = shard.stat()
        finally:
            shard.close()
        total += sum(st[db] for db in ("views", "dedup", "seq", "parked", "offsets"))
    return total


def wait_restored(run, inst, tasks: int, timeout: float = 600) -> float:
    """Seconds until `inst` owns every task with none restoring."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = run.metrics(inst) or {}
        if m.get("aggregator_tasks_owned") == tasks and not m.get("aggregator_tasks_restoring"):
            return time.monotonic() - t0
        time.sleep(0.2)
    raise SystemExit(f"instance {inst.index} not restored within {timeout} s")


def apply_rate(run, inst, quiet: float = 3.0, timeout: float = 1800) -> dict:
    """Events applied per second by `inst` (aggregator_events_applied_total), from its
    first applied event until the count stops moving for `quiet` seconds."""
    t_first = t_last = None
    last = base = None  # the counter is the shards' total: it need not start at 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        now = time.monotonic()
        n = (run.metrics(inst) or {}).get("aggregator_events_applied_total", 0.0)
        if base is None:
            base = last = n
        elif n > last:
            if t_first is None:
                t_first = now
            last, t_last = n, now
        elif t_last is not None and now - t_last >= quiet:
            break
        time.sleep(0.1)
    secs = (t_last - t_first) if t_first is not None and t_last > t_first else None
    done = (last or 0) - (base or 0)
    return {"applied": int(done), "seconds": round(secs, 2) if secs else None,
            "events_per_s": round(done / secs) if secs else None}


def worker_applied(inst) -> dict[int, int]:
    """{worker: events applied} from the instance's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    _, body = inst.api().get("/metrics")
    return {int(s.labels["worker"]): int(s.value)
            for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples if s.name == "aggregator_events_applied_total"}


def worker_tasks(inst, workers: int) -> dict[int, list[int]]:
    """{worker: its tasks} from the instance's status file."""
    status = json.loads((inst.data_dir / "status.json").read_text())
    placement = status.get("placement")
    out: dict[int, list[int]] = {w: [] for w in range(workers)}
    for t in status.get("tasks") or ():
        out[int(placement[str(t)]) if placement else t % workers].append(t)
    return out


def scale_rates(broker, workdir: Path, workload, tasks: int,
                shapes=((1, 1), (2, 2))) -> dict:
    """Apply rate of `instances x workers` for each shape (see the module docstring)."""
    from tests.support.cluster import ClusterRun

    out = {}
    for n_inst, n_work in shapes:
        name = f"{n_inst}x{n_work}"
        run = ClusterRun(broker, workdir / name, workload, tasks=tasks, workers=n_work,
                         name=name, with_bad=False)
        try:
            run.produce(0.0, 0.0)  # creates the topics: the instances subscribe to them
            insts = [run.start_instance() for _ in range(n_inst)]
            deadline = time.monotonic() + 300
            while True:  # the group settled: every task owned and restored
                m = run.all_metrics()
                if (sum((x or {}).get("aggregator_tasks_owned", 0) for x in m.values()) == tasks
                        and all(x and x.get("aggregator_tasks_owned", 0) > 0
                                and not x.get("aggregator_tasks_restoring")
                                for x in m.values())):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name}: the group did not settle: {m}")
                time.sleep(0.25)
            t_first = t_last = None
            last = 0.0
            run.produce()
            t_produced = time.monotonic()
            while True:
                now = time.monotonic()
                n = sum((x or {}).get("aggregator_events_applied_total", 0)
                        for x in run.all_metrics().values())
                if n > last:
                    t_first = t_first or now
                    last, t_last = n, now
                elif t_last is not None and now - t_last >= 3.0:
                    break
                if t_first is None and now > t_produced + 120:
                    raise SystemExit(f"{name}: nothing applied within 120 s")
                time.sleep(0.1)
            secs = t_last - t_first
            per = {i.index: {"tasks": worker_tasks(i, n_work), "applied": worker_applied(i)}
                   for i in insts}
            if not run.converge(timeout=300):
                raise SystemExit(f"{name}: the views are not the oracle's")
            out[name] = {"instances": n_inst, "workers": n_work, "applied": int(last),
                         "seconds": round(secs, 2), "events_per_s": round(last / secs),
                         "per_instance": per}
            print(name, out[name], flush=True)
            run.stop_all()
        finally:
            run.close()
    if "1x1" in out and "2x2" in out:
        out["2x2 / 1x1"] = round(out["2x2"]["events_per_s"] / out["1x1"]["events_per_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tools.restore", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", "-n", type=int, default=200_000)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--workers", "-w", type=int, default=2)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default="restore", help="bench/results/<out>.{json,md}")
    ap.add_argument("--compare", action="store_true",
                    help="also apply the workload with one instance in normal mode (no "
                         "cluster) and report both apply rates, and 1x1 vs 2x2 in cluster "
                         "mode")
    ap.add_argument("--scale-only", action="store_true",
                    help="only the 1 instance x 1 worker vs 2 instances x 2 workers rates")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from tests.support.cluster import ClusterRun  # the test harness drives the instances

    workload = simulate.generate(args.seed, args.events)
    rows = []
    if args.scale_only:
        with EmbeddedBroker() as broker, \
                tempfile.TemporaryDirectory(prefix="agg-scale-") as tmp:
            scale = scale_rates(broker, Path(tmp), workload, args.tasks)
        doc = {"events": args.events, "tasks": args.tasks, "scale": scale,
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.out}-scale.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(doc, indent=2))
        return 0
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="agg-restore-") as tmp:
        run = ClusterRun(broker, Path(tmp), workload, tasks=args.tasks, workers=args.workers,
                         name="restore", with_bad=False)
        try:
            run.produce()
            first = run.start_instance()
            t0 = time.monotonic()
            rates = {"cluster mode": apply_rate(run, first)}
            if not run.converge(timeout=1200):
                raise SystemExit("the first instance did not converge")
            build_s = time.monotonic() - t0
            print(f"state built in {build_s:.1f} s ({args.events:,} events)", flush=True)
            run.final_metrics = run.all_metrics()
            first.note_pids()
            first.svc.stop()
            first.killed_at = time.monotonic()  # not live: the next instance takes all

            second = run.start_instance()
            ready_s = wait_restored(run, second, args.tasks)
            full = restore_figures(second.svc.log())
            if not run.converge(timeout=300):
                raise SystemExit("the restored instance does not serve the oracle's views")
            rows.append({"restore": "full (empty data dir)", **full,
                         "start_to_restored_s": round(ready_s, 2)})
            print(rows[-1], flush=True)

            mark = len(second.svc.log())
            second.note_pids()
            second.svc.stop()
            rows[-1]["state_entries"] = entries = state_entries(second.data_dir, args.workers)
            rows[-1]["entries_per_s"] = round(entries / full["restore_s"]) \
                if full["restore_s"] else None
            second.svc.start()
            second._api = None
            ready_s = wait_restored(run, second, args.tasks)
            catch = restore_figures(second.svc.log(), mark)
            rows.append({"restore": "catch-up (own data dir)", **catch,
                         "start_to_restored_s": round(ready_s, 2)})
            print(rows[-1], flush=True)
            run.stop_all()
        finally:
            run.close()
        if args.compare:
            normal = ClusterRun(broker, Path(tmp) / "normal", workload, cluster=False,
                                workers=args.workers, name="normal", with_bad=False)
            try:
                normal.produce()
                inst = normal.start_instance()
                rates["normal mode"] = apply_rate(normal, inst)
                if not normal.converge(timeout=600):
                    raise SystemExit("normal mode did not converge")
                normal.stop_all()
            finally:
                normal.close()
            scale = scale_rates(broker, Path(tmp) / "scale", workload, args.tasks)
        print(rates, flush=True)

    doc = {"events": args.events, "tasks": args.tasks, "workers": args.workers,
           "build_s": round(build_s, 1), "rows": rows, "apply_rates": rates,
           "scale": scale if args.compare else None,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Restore speed ({args.events:,} events, {args.tasks} tasks, "
             f"{args.workers} workers)", "",
             "| restore | tasks | changelog records | MB | records applied | restore s | MB/s | "
             "records/s | state entries | entries/s | start → restored s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['restore']} | {r['tasks']} | {r['records']:,} | {r['mb']} | "
                     f"{r['keys']:,} | {r['restore_s']} | {r['mb_per_s']} | "
                     f"{r['records_per_s']} | {r.get('state_entries', '-')} | "
                     f"{r.get('entries_per_s', '-')} | {r['start_to_restored_s']} |")
    lines += ["", "| mode (1 instance) | events applied | seconds | events/s |",
              "|---|---:|---:|---:|"]
    for mode, r in rates.items():
        lines.append(f"| {mode} | {r['applied']:,} | {r['seconds']} | {r['events_per_s']} |")
    if args.compare:
        lines += ["", "| cluster mode | events applied | seconds | events/s | tasks per worker |",
                  "|---|---:|---:|---:|---|"]
        for name, r in scale.items():
            if isinstance(r, dict):
                tpw = "; ".join(f"instance {i}: " + ", ".join(
                    f"w{w} {len(ts)}" for w, ts in p["tasks"].items())
                    for i, p in r["per_instance"].items())
                lines.append(f"| {name} | {r['applied']:,} | {r['seconds']} | "
                             f"{r['events_per_s']} | {tpw} |")
        lines.append(f"\n2x2 / 1x1: {scale.get('2x2 / 1x1')}")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
