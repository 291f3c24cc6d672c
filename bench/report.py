"""Results: the machine, the bars of the issue, JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

GiB = 1 << 30

# The bars set by the benchmark issue (reported against, never adjusted).
BAR_VS_BASELINE = 3.0  # issue 13
BAR_VS_FLOOR = 0.6  # issue 13: the 50-line loop (bench/stages/floor.py)
BAR_CPU_US_PER_EVENT = 15.0  # issue 13: service CPU (broker excluded), one change per version
BAR_VS_RAW = 0.35
BAR_STAGE_SCALING = 1.8
BAR_RSS_MIB = 900  # issue 14
BAR_DISK_BYTES_PER_EVENT = 2000  # issue 14: /proc/<pid>/io write_bytes of the service
BAR_RING_RECORDS_PER_S = 1_000_000
BAR_BLOOM_CONTAINS_PER_S = 10_000_000


def machine() -> dict:
    import confluent_kafka

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    from aggregator import core

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem / GiB, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "core": core.IMPLEMENTATION,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def source() -> dict:
    """Which code was measured: the aggregator package imported, its git commit, and the
    files under aggregator/ and examples/ that differ from that commit."""
    import subprocess

    import aggregator

    root = Path(aggregator.__file__).resolve().parents[1]
    out: dict = {"aggregator_path": str(root / "aggregator")}
    snapshot = root / "SNAPSHOT"  # a `git archive` copy says which commit it holds
    if snapshot.is_file():
        out["commit"] = snapshot.read_text().strip()
        out["uncommitted"] = []
        return out
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                       capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "aggregator",
                                "examples"], cwd=root, capture_output=True, text=True).stdout
        out["uncommitted"] = [line[3:] for line in dirty.splitlines()]
    except OSError:
        pass
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def bars(results: dict) -> list[dict]:
    """Each bar of the issue: the figure, the threshold, met or not (None: not measured)."""
    out = []
    sweep = {r["workers"]: r for r in results.get("aggregator", []) if r.get("ok")}
    agg2 = sweep.get(2) or (sweep[max(sweep)] if sweep else None)
    agg_rate = agg2["events_per_s"] if agg2 else None
    label = f"aggregator workers={agg2['workers']}" if agg2 else "aggregator"
    base = results.get("baseline") or {}
    raw = results.get("raw") or {}
    r_base = _ratio(agg_rate, base.get("events_per_s") if base.get("ok") else None)
    r_raw = _ratio(agg_rate, raw.get("events_per_s") if raw.get("ok") else None)
    out.append(_bar(f"{label} / hand-written baseline", r_base, BAR_VS_BASELINE, "x"))
    out.append(_bar(f"{label} / raw consume ceiling", r_raw, BAR_VS_RAW, "x"))
    floor = results.get("floor") or {}
    r_floor = _ratio(agg_rate, floor.get("events_per_s") if floor.get("ok") else None)
    out.append(_bar(f"{label} / 50-line floor loop", r_floor, BAR_VS_FLOOR, "x"))
    cpu = agg2["cpu_s_per_million"] if agg2 else None
    out.append(_bar(f"{label}: service CPU µs per record", cpu and round(cpu, 1),
                    BAR_CPU_US_PER_EVENT, " µs", below=True))
    stage = {r["workers"]: r for r in results.get("worker_stage", []) if r.get("ok")}
    scaling = _ratio(stage[2]["records_per_s"], stage[1]["records_per_s"]) \
        if 1 in stage and 2 in stage else None
    out.append(_bar("worker stage scaling 1 → 2 workers", scaling, BAR_STAGE_SCALING, "x"))
    runs = [r for r in results.get("aggregator", []) if r.get("memory")]
    rss = max((r["memory"]["peak_rss_total_mib"] for r in runs), default=None)
    pss = max((r["memory"]["peak_pss_total_mib"] for r in runs), default=None)
    out.append(_bar("peak RSS, all aggregator processes (sum)", rss, BAR_RSS_MIB, "MiB",
                    below=True))
    out.append(_bar("peak PSS, all aggregator processes (sum)", pss, BAR_RSS_MIB, "MiB",
                    below=True))
    disk = agg2.get("disk_bytes_per_record") if agg2 else None
    out.append(_bar(f"{label}: disk writes, bytes per event", disk and round(disk),
                    BAR_DISK_BYTES_PER_EVENT, " B", below=True))
    ring = (results.get("ring") or {}).get("raw-300B/get_many", {}).get("records_per_s")
    out.append(_bar("ring, 300 B records between two processes", ring,
                    BAR_RING_RECORDS_PER_S, "/s"))
    packed = (results.get("ring") or {}).get("batch/pack+unpack", {}).get("records_per_s")
    out.append(_bar("ring, msgpack batches of records between two processes", packed,
                    BAR_RING_RECORDS_PER_S, "/s"))
    bloom = (results.get("micro") or {}).get("test_bloom_contains[cython]")
    out.append(_bar("bloom contains (cython, batches of 10k)", bloom,
                    BAR_BLOOM_CONTAINS_PER_S, "/s"))
    return out


def _bar(name: str, value, threshold, unit: str, below: bool = False) -> dict:
    met = None if value is None else (value < threshold if below else value >= threshold)
    return {"bar": name, "value": value, "threshold": ("< " if below else ">= ")
            + f"{threshold:,}{unit}", "met": met}


def write(results: dict, out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md",
             "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(results, paths["png"].name))
    if results.get("aggregator"):
        chart(results, paths["png"])
    else:
        paths.pop("png")
    return paths


def _f(x, fmt: str = ",.0f") -> str:
    return "–" if x is None or x == "" else format(x, fmt)


def markdown(results: dict, png: str | None = None) -> str:
    m, w = results["machine"], results.get("workload") or {}
    lines = [f"# aggregator benchmark ({results['mode']})", "",
             f"`{results['command']}` — {results['started']}, took {results['took_s']:.0f} s",
             "",
             f"Machine: {m['nproc']} × {m['cpu_model']}, {m['ram_gib']} GiB RAM, Python "
             f"{m['python']}, confluent-kafka {m['confluent_kafka']} / librdkafka "
             f"{m['librdkafka']}, core {m['core']}; broker: {results.get('broker', '–')}. "
             f"Load average (1/5/15 min) at start {m.get('loadavg_at_start', '–')}, at the end "
             f"{results.get('loadavg_at_end', '–')}: other work on the machine skews figures.",
             ""]
    src = results.get("source") or {}
    if src:
        dirty = src.get("uncommitted") or []
        lines += [f"Code: {src.get('aggregator_path')} at commit {src.get('commit') or '?'}"
                  + (f", with uncommitted changes in {', '.join(dirty)}" if dirty else
                     " (no uncommitted changes in aggregator/ or examples/)") + ".", ""]
    if w:
        lines += [f"Workload: seed {w['seed']}, {w['unique_events']:,} distinct events in "
                  f"{w['records']:,} records ({w['duplicates']:,} duplicates, "
                  f"{w['reordered']:,} reordered), {w['keys']:,} keys, {w['streams']:,} "
                  f"streams; values p5/p50/p95 {'/'.join(map(str, w['value_bytes_p5_p50_p95']))}"
                  f" bytes; {w['structured']:,} structured, {w['binary_json']:,} binary JSON, "
                  f"{w['binary_msgpack']:,} binary msgpack.", ""]
    raw, base = results.get("raw") or {}, results.get("baseline") or {}
    if results.get("aggregator") or raw or base:
        lines += ["## End to end (cold start, pre-loaded topics)", "",
                  "| run | events/s | window s | × baseline | × raw | CPU s / M events "
                  "| peak RSS sum MiB | peak PSS sum MiB | disk KB / event | verified |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        b_rate = base.get("events_per_s") if base.get("ok") else None
        r_rate = raw.get("events_per_s") if raw.get("ok") else None
        for r in results.get("aggregator", []):
            mem = r.get("memory") or {}
            # a wrong answer is a failure, not a speed
            rate = _f(r["events_per_s"]) if r.get("ok") else "FAILED"
            ok_rate = r["events_per_s"] if r.get("ok") else None
            lines.append(
                f"| aggregator, {r['workers']} worker{'s' if r['workers'] > 1 else ''} | "
                f"{rate} | {_f(r['window_s'], '.2f')} | "
                f"{_f(_ratio(ok_rate, b_rate), '.2f')} | "
                f"{_f(_ratio(ok_rate, r_rate), '.2f')} | "
                f"{_f(r['cpu_s_per_million'], '.1f')} | {_f(mem.get('peak_rss_total_mib'))} | "
                f"{_f(mem.get('peak_pss_total_mib'))} | "
                f"{_f((r.get('disk_bytes_per_record') or 0) / 1000 or None, '.2f')} | "
                f"{r['verified']} |")
        for label, r in (("hand-written in-memory baseline", base),
                         ("50-line floor loop (no gate, no merge ops, nothing durable)",
                          results.get("floor") or {}),
                         ("raw consume (ceiling)", raw)):
            if r:
                mem = r.get("memory") or {}
                rate = _f(r.get("events_per_s")) if r.get("ok") else "FAILED"
                lines.append(
                    f"| {label} | {rate} | {_f(r.get('window_s'), '.2f')}"
                    f" | | | {_f(r.get('cpu_s_per_million'), '.1f')} | "
                    f"{_f(mem.get('peak_rss_total_mib'))} | {_f(mem.get('peak_pss_total_mib'))}"
                    f" | | {r.get('verified', '–')} |")
        lines += ["", "Window: first record fetched → last offset of every partition durable "
                  "in every LMDB shard (polled every 20 ms); group join and worker boot "
                  "excluded. CPU: all processes of the run within the window (broker "
                  "excluded). RSS counts shared pages (rings, LMDB map) once per process; "
                  "PSS splits them.", ""]
        for r in results.get("aggregator", []):
            if r.get("cpu_s"):
                cpu = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["cpu_s"].items()))
                procs = (r.get("memory") or {}).get("processes", {})
                rss = ", ".join(f"{k} {v['peak_rss_mib']:,.0f}/{v['peak_pss_mib']:,.0f}"
                                for k, v in procs.items() if k != "broker")
                lines.append(f"- workers={r['workers']}: CPU s in the window: {cpu}; peak "
                             f"RSS/PSS MiB: {rss}; startup (spawn + boot + group join) "
                             f"{r['startup_s']:.1f} s; the Kafka commit covered everything "
                             f"{r['kafka_committed_s']:.1f} s after the first fetch")
                split = r.get("cpu_split") or {}
                if split:
                    lines.append("  - CPU s by kind: " + "; ".join(
                        f"{k} user {v['user']:.1f} / system {v['system']:.1f}, main thread "
                        f"{v['main']:.1f} / other threads {v['threads']:.1f}"
                        for k, v in sorted(split.items())))
                st = r.get("stats") or {}
                if st.get("commits"):
                    lines.append(
                        f"  - {st['commits']:,} LMDB commits, {st['records'] / st['commits']:,.0f} "
                        f"records and {st['commit_ms'] / st['commits']:.1f} ms each; "
                        f"{st.get('forwarded', 0):,} view updates forwarded between workers")
                for k, v in procs.items():  # bench.metrics.smaps_breakdown near its peak
                    b = v.get("breakdown")
                    if k != "broker" and b:
                        parts = ", ".join(f"{c} {m:,.0f}" for c, m in b["rss_mib"].items())
                        lines.append(f"  - {k} at {b['at_rss_mib']:,.0f} MiB RSS: {parts}")
        lines.append("")
    if png and results.get("aggregator"):
        lines += [f"![throughput against workers]({png})", ""]
    lat = results.get("latency") or []
    floor = results.get("latency_floor") or []
    if lat or floor:
        lines += ["## Latency under paced load", "",
                  "| measured | client settings | target/s | achieved/s | records | p50 ms "
                  "| p90 ms | p99 ms | max ms | verified |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

        def settings(r: dict) -> str:
            c = ", ".join(f"{k}={v}" for k, v in r.get("consumer", {}).items()) or "defaults"
            p = ", ".join(f"{k}={v}" for k, v in (r.get("producer") or {}).items())
            return f"consumer {c}; paced producer {p}" if p else c

        for f in floor:
            lines.append(f"| produce → fetched, bare consumer | {settings(f)} | "
                         f"{_f(f['target_rate'])} | {_f(f['achieved_rate'])} | "
                         f"{_f(f['measured'])} | {f['p50_ms']} | {f['p90_ms']} | "
                         f"{f['p99_ms']} | {f['max_ms']} | {'ok' if f['ok'] else f['error']} |")
        for r in lat:
            lines.append(f"| produce → state committed, aggregator {r['workers']} workers | "
                         f"{settings(r)} | {_f(r['target_rate'])} | {_f(r['achieved_rate'])}"
                         f" | {_f(r['measured'])} | {r['p50_ms']} | {r['p90_ms']} | "
                         f"{r['p99_ms']} | {r['max_ms']} | {r['verified']} |")
        lines += ["", "State committed: the first 20 ms poll at which the shard owning the "
                  "record's key has its offset durable in LMDB (late by up to one poll). "
                  "Fetched: the bare consumer's clock minus the record's CreateTime (1 ms). "
                  "The paced rate is a fraction of the measured maximum (see the command). "
                  "The paced producer (bench/stages/latency.py) runs on the same cores as the "
                  "broker and the service: its linger.ms sets how many produce requests the "
                  "broker serves per event.",
                  ""]
    stage = results.get("worker_stage") or []
    if stage:
        lines += ["## Worker stage alone (replayed ring messages: no supervisor, no Kafka "
                  "consumer)", "",
                  "| workers | records/s | window s | worker CPU s | feeder CPU s "
                  "| peak PSS sum MiB | verified |", "|---:|---:|---:|---|---:|---:|---|"]
        for r in stage:
            cpu = ", ".join(f"{v:.1f}" for _, v in sorted(r.get("cpu_s", {}).items()))
            lines.append(f"| {r['workers']} | {_f(r['records_per_s'])} | "
                         f"{_f(r['window_s'], '.2f')} | {cpu} | {r['feeder_cpu_s']} | "
                         f"{_f((r.get('memory') or {}).get('peak_pss_total_mib'))} | "
                         f"{r['verified']} |")
        lines.append("")
    ring = results.get("ring") or {}
    if ring:
        lines += ["## Ring between two processes (bench/micro/bench_ring.py scenarios)", "",
                  "| scenario | messages/s | records/s | MB/s |", "|---|---:|---:|---:|"]
        for k, r in ring.items():
            lines.append(f"| {k} | {_f(r['msgs_per_s'])} | {_f(r['records_per_s'])} | "
                         f"{_f(r['mb_per_s'])} |")
        lines.append("")
    micro = results.get("micro") or {}
    if micro:
        lines += ["## Micro-benchmarks (pytest-benchmark, items/s from the mean)", "",
                  "| benchmark | items/s |", "|---|---:|"]
        lines += [f"| {k} | {_f(v)} |" for k, v in micro.items()]
        lines.append("")
    lines += ["## Against the bars of the issue", "", "| bar | measured | wanted | met |",
              "|---|---:|---:|---|"]
    for b in results.get("bars", []):
        v = b["value"]
        shown = "not measured" if v is None else (f"{v:,.2f}" if isinstance(v, float) and v < 100
                                                  else f"{v:,.0f}")
        met = {True: "yes", False: "**no**", None: "–"}[b["met"]]
        lines.append(f"| {b['bar']} | {shown} | {b['threshold']} | {met} |")
    failed = results.get("failures") or []
    verdict = "FAILED: " + "; ".join(failed) if failed else "every run PASSED"
    lines += ["", f"Verification: {verdict}", ""]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used through matplotlib.ticker

    runs = sorted(results["aggregator"], key=lambda r: r["workers"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs = [r["workers"] for r in runs]
    ys = [r["events_per_s"] if r.get("ok") else 0 for r in runs]
    ax.plot(xs, ys, "o-", label="aggregator end to end (durable, verified)")
    stage = sorted(results.get("worker_stage") or [], key=lambda r: r["workers"])
    if stage:
        ax.plot([r["workers"] for r in stage],
                [r["records_per_s"] if r.get("ok") else 0 for r in stage], "s--",
                label="worker stage alone (replayed rings)")
    top = max(ys + [r["records_per_s"] for r in stage if r.get("ok")] + [1])
    for key, style, label in (("baseline", ":", "hand-written in-memory baseline"),
                              ("raw", "-.", "raw consume ceiling")):
        r = results.get(key) or {}
        if not r.get("ok"):
            continue
        rate = r["events_per_s"]
        if rate > 3 * top:  # far above: name it instead of flattening the chart
            ax.plot([], [], style, color="grey", label=f"{label}: {rate:,.0f}/s (off the chart)")
            continue
        top = max(top, rate)
        ax.axhline(rate, linestyle=style, color="grey" if key == "raw" else "tab:red",
                   label=f"{label} ({rate:,.0f}/s)")
    ax.set_ylim(0, top * 1.25)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("worker processes")
    ax.set_ylabel("events / s")
    ax.set_xticks(sorted(set(xs + [r["workers"] for r in stage])))
    w = results.get("workload") or {}
    ax.set_title(f"aggregator throughput — {w.get('records', 0):,} records, "
                 f"{results['machine']['nproc']} cores", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.report results/full.json`: rewrite the .md and .png of a JSON."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("json", type=Path)
    args = ap.parse_args(argv)
    results = json.loads(args.json.read_text())
    results["bars"] = bars(results)
    for p in write(results, args.json.parent, args.json.stem).values():
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
