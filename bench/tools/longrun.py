"""Memory over a long run: is the service's RSS flat from the 5M-th to the 10M-th event id?

    python -m bench.tools.longrun                      # 10 cycles of 1M events, 2 workers
    python -m bench.tools.longrun --cycles 4 --events 250000

The seeded 1M-event workload is replayed `--cycles` times, each cycle with new event ids and
with every stream's sequences continuing where the previous cycle ended (so every cycle is
new, in-order data for the same 340k keys, with the workload's duplicates and reordering).
The service (`aggregator run`, the shipped config) runs throughout; the producer stays at
most two cycles ahead of what the service has committed. Every second the harness samples
the RSS, PSS and anonymous memory of all the service's processes and the group's committed
offsets; at the end of each cycle (every offset of the cycle committed) it notes the
memory. Writes bench/results/longrun.{json,md,png}: per cycle the memory at its end, its
peak and its mean over the samples, and the last cycle over the middle one by each measure
(the bar: RSS at 10M ids <= 1.10x RSS at 5M). With a resident budget for the LMDB maps
(`service.lmdb_resident_bytes`) the RSS is a sawtooth, so the end-of-cycle sample alone
says little. `--report JSON` writes the .md and .png of an earlier run again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from aggregator.devtools import simulate
from aggregator.devtools.broker import EmbeddedBroker
from bench import workload as wl

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def cycle_records(w: simulate.Workload, cycle: int, prefix: str) -> list[tuple]:
    """The workload's records with ids suffixed by the cycle and sequences shifted by the
    cycle times the stream's length (strict streams stay gap-free across cycles)."""
    if cycle == 0:
        return [(prefix + t, k, v, h) for t, k, v, h in w.records]
    length: dict[tuple[str, str], int] = {}
    for ev in w.events:
        length[ev.stream] = length.get(ev.stream, 0) + 1
    out = []
    for (topic, key, value, headers), i in zip(w.records, w.record_events, strict=True):
        ev = w.events[i]
        new_id = f"{ev.id}-c{cycle}"
        seq = ev.sequence + cycle * length[ev.stream]
        hd = dict(headers)
        if hd.get("content-type") == simulate.STRUCTURED.encode():
            body = json.loads(value)
            body["id"] = new_id
            body["sequence"] = seq if isinstance(body.get("sequence"), int) else str(seq)
            value = json.dumps(body, separators=(",", ":")).encode()
        else:
            headers = [(k, new_id.encode() if k == "ce_id" else
                        str(seq).encode() if k == "ce_sequence" else v) for k, v in headers]
        out.append((prefix + topic, key, value, headers))
    return out


def memory(pid: int) -> dict[str, float]:
    """RSS, PSS and anonymous memory (MiB) of `pid` and its children together."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    tot = {"rss": 0.0, "pss": 0.0, "anon": 0.0}
    for p in [pid] + [int(x) for x in out.split()]:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                name, _, rest = line.partition(":")
                if name in ("Rss", "Pss", "Anonymous"):
                    key = {"Rss": "rss", "Pss": "pss", "Anonymous": "anon"}[name]
                    tot[key] += int(rest.split()[0]) / 1024
        except OSError:
            pass
    return tot


def env_overrides(overrides: dict) -> dict[str, str]:
    """Dotted config paths as AGGREGATOR__A__B variables (librdkafka keys: '.' → '_')."""
    env = {}
    for path, value in overrides.items():
        env["AGGREGATOR__" + "__".join(p.upper().replace(".", "_") for p in path.split(".", 2)
                                       if p)] = str(value)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tools.longrun", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--events", type=int, default=1_000_000, help="unique events per cycle")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "longrun")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="only write the .md and .png of a run's JSON again (no run)")
    args = ap.parse_args(argv)
    if args.report is not None:
        result = json.loads(args.report.read_text())
        lines = report(result)
        args.report.with_suffix(".md").write_text("\n".join(lines) + "\n")
        chart(result, args.report.with_suffix(".png"))
        print("\n".join(lines))
        return 0

    w = wl.generate(args.seed, args.events)
    broker = EmbeddedBroker()
    broker.start()
    tmp = Path(tempfile.mkdtemp(prefix="agg-longrun-"))
    prefix = f"lr{uuid.uuid4().hex[:8]}."
    group = f"longrun-{uuid.uuid4().hex[:8]}"
    svc = probe = None
    try:
        wl.create(broker.bootstrap_servers, prefix)
        overrides = wl.overrides(broker.bootstrap_servers, prefix, workers=args.workers,
                                 data_dir=tmp / "data", group=group, embedded=True)
        ends: dict[tuple[str, int], int] = {}
        cycle_ends: list[int] = []
        errors: list = []

        def delivered(err, msg) -> None:
            if err is not None:
                errors.append(err)
            elif msg.offset() + 1 > ends.get((msg.topic(), msg.partition()), 0):
                ends[(msg.topic(), msg.partition())] = msg.offset() + 1

        probe = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": group})

        def committed() -> int:
            parts = [TopicPartition(t, p) for t, p in list(ends)]
            try:
                got = probe.committed(parts, timeout=10)
            except Exception:  # noqa: BLE001
                return -1
            return sum(max(tp.offset, 0) for tp in got)

        def producer() -> None:
            for c in range(args.cycles):
                while c >= 2 and committed() < cycle_ends[c - 2]:
                    time.sleep(0.5)
                simulate.produce(cycle_records(w, c, prefix), broker.bootstrap_servers,
                                 config={"on_delivery": delivered,
                                         "delivery.report.only.error": False,
                                         "queue.buffering.max.messages": 500_000},
                                 timeout=1800)
                cycle_ends.append(sum(ends.values()))
                print(f"cycle {c + 1} produced ({cycle_ends[-1]:,} records in all)", flush=True)

        env = dict(os.environ, **env_overrides(overrides), PYTHONUNBUFFERED="1")
        log = open(tmp / "service.log", "wb")
        svc = subprocess.Popen([sys.executable, "-m", "aggregator", "run", "--config",
                                str(wl.CONFIG_PATH), "--log-level", "WARNING"], stdout=log,
                               stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        t_prod = threading.Thread(target=producer, daemon=True)
        t_prod.start()
        t0 = time.monotonic()
        samples, per_cycle = [], []
        while len(per_cycle) < args.cycles:
            if svc.poll() is not None:
                raise SystemExit(f"the service exited: {(tmp / 'service.log').read_text()[-3000:]}")
            done = committed()
            mem = memory(svc.pid)
            samples.append({"t": round(time.monotonic() - t0, 1), "committed": done, **mem})
            k = len(per_cycle)
            if k < len(cycle_ends) and done >= cycle_ends[k]:
                row = {"cycle": k + 1, "unique_events": (k + 1) * len(w.events),
                       "t": round(time.monotonic() - t0, 1),
                       **{m: round(v, 1) for m, v in mem.items()}}
                per_cycle.append(row)
                print(f"cycle {k + 1} committed at {row['t']:.0f} s: RSS {row['rss']:,.0f} "
                      f"PSS {row['pss']:,.0f} anon {row['anon']:,.0f} MiB", flush=True)
            time.sleep(1.0)
        assert not errors, errors[:3]
        mid = per_cycle[len(per_cycle) // 2 - 1]
        last = per_cycle[-1]
        ratio = {m: last[m] / mid[m] for m in ("rss", "pss", "anon")}
        result = {"cycles": args.cycles, "events_per_cycle": len(w.events),
                  "workers": args.workers, "per_cycle": per_cycle, "samples": samples,
                  "ratio_last_to_middle": ratio, "seconds": round(time.monotonic() - t0, 1)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        lines = report(result)
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        chart(result, args.out.with_suffix(".png"))
        print("\n".join(lines))
        return 0
    finally:
        if svc is not None and svc.poll() is None:
            svc.send_signal(signal.SIGTERM)
            try:
                svc.wait(60)
            except subprocess.TimeoutExpired:
                svc.kill()
        if probe is not None:
            probe.close()  # before the broker goes: else librdkafka retries it until exit
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the data dir takes ~1 GB of disk


def cycle_stats(result: dict) -> list[dict]:
    """Per cycle, from the per-second samples taken while it was being committed: the peak
    and the mean of RSS, PSS and anonymous memory. With a resident budget the RSS is a
    sawtooth (the map's pages dropped after a commit past the budget), so the sample at a
    cycle's end alone says little."""
    out, start = [], 0.0
    for row in result["per_cycle"]:
        ss = [s for s in result["samples"] if start < s["t"] <= row["t"]] or [row]
        out.append({"cycle": row["cycle"], **{f"{m}_max": max(s[m] for s in ss)
                                              for m in ("rss", "pss", "anon")},
                    **{f"{m}_mean": sum(s[m] for s in ss) / len(ss)
                       for m in ("rss", "pss", "anon")}})
        start = row["t"]
    return out


def report(result: dict) -> list[str]:
    """The markdown of a run: per cycle the memory at its end, its peak and its mean; the
    ratios of the last cycle to the middle one (the bar: RSS at 10M ids <= 1.10x at 5M)."""
    cycles, per_cycle = result["cycles"], result["per_cycle"]
    stats = cycle_stats(result)
    lines = [f"Long run: `python -m bench.tools.longrun --cycles {cycles} --events "
             f"{result['events_per_cycle']}` ({result['workers']} workers, "
             f"{result['seconds']:.0f} s)", "",
             "| cycle | unique event ids | t s | RSS MiB at the end | PSS | anon | RSS peak | "
             "RSS mean | PSS mean | anon peak |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['cycle']} | {r['unique_events']:,} | {r['t']:.0f} | {r['rss']:,.0f} | "
              f"{r['pss']:,.0f} | {r['anon']:,.0f} | {st['rss_max']:,.0f} | "
              f"{st['rss_mean']:,.0f} | {st['pss_mean']:,.0f} | {st['anon_max']:,.0f} |"
              for r, st in zip(per_cycle, stats)]
    mid, last = len(per_cycle) // 2 - 1, len(per_cycle) - 1
    a, b = per_cycle[mid], per_cycle[last]
    sa, sb = stats[mid], stats[last]
    early = max(st["rss_max"] for st in stats[:mid + 1])
    late = max(st["rss_max"] for st in stats[mid + 1:])
    lines += ["", f"Cycle {b['cycle']} over cycle {a['cycle']} (the bar: RSS at 10M ids <= "
              "1.10x RSS at 5M):", "",
              f"- at the cycle's end: RSS {b['rss'] / a['rss']:.2f}, PSS "
              f"{b['pss'] / a['pss']:.2f}, anon {b['anon'] / a['anon']:.2f}",
              f"- peak within the cycle: RSS {sb['rss_max'] / sa['rss_max']:.2f}, PSS "
              f"{sb['pss_max'] / sa['pss_max']:.2f}, anon {sb['anon_max'] / sa['anon_max']:.2f}",
              f"- mean within the cycle: RSS {sb['rss_mean'] / sa['rss_mean']:.2f}, PSS "
              f"{sb['pss_mean'] / sa['pss_mean']:.2f}, anon "
              f"{sb['anon_mean'] / sa['anon_mean']:.2f}",
              f"- peak of cycles {a['cycle'] + 1}–{b['cycle']} over the peak of cycles "
              f"1–{a['cycle']}: RSS {late / early:.2f}"]
    return lines


def chart(result: dict, path: Path) -> None:
    """RSS, PSS and anonymous memory of the service against millions of event ids: the
    per-second samples (committed records as the x axis) and the end of each cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_event = result["events_per_cycle"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    samples = [s for s in result["samples"] if s.get("committed", -1) > 0]
    ends = result["per_cycle"]
    for m, style in (("rss", "-"), ("pss", "--"), ("anon", ":")):
        ax.plot([s["committed"] / 1e6 for s in samples], [s[m] for s in samples], style,
                label=m.upper() if m != "anon" else "anonymous")
        ax.plot([r["unique_events"] / 1e6 for r in ends], [r[m] for r in ends], "o",
                color=ax.lines[-1].get_color(), markersize=3)
    ax.set_xlabel(f"millions of records committed (cycles of {per_event:,} events)")
    ax.set_ylabel("MiB, all service processes")
    ax.set_title(f"memory over {result['cycles']} cycles, {result['workers']} workers")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
