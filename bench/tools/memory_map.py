"""What the service's memory is, per process, near its peak: the e2e bench run, variants.

    python -m bench.tools.memory_map                          # 400k events, 2 workers
    python -m bench.tools.memory_map --events 1000000
    python -m bench.tools.memory_map --variants shipped,ring=16+prefetch=16384
    python -m bench.tools.memory_map --json /tmp/mem.json

The bench workload (bench.workload) is loaded once onto an embedded broker; each variant is
one cold run of the whole service on it (bench.stages.service.measure_throughput: the
supervisor, its workers and the HTTP child, checked against the oracle), sampled every
0.1 s. For each process the table shows its peak RSS and PSS and, read from
/proc/<pid>/smaps when the RSS last grew by 2 % (bench.metrics.smaps_breakdown), what the
resident pages are: the brk heap (main-thread malloc), the per-thread malloc arenas
(librdkafka's threads), other anonymous memory (CPython's object arenas, large mallocs),
thread stacks, /dev/shm rings, the LMDB map and code/files. The shm and lmdb columns show
RSS/PSS: a ring page touched by the supervisor and a worker counts twice in an RSS sum.

Variants are config overrides joined with ``+`` (``shipped`` = none; ``before`` = the
settings before issue 14's memory work: 16 MiB rings, 16 MiB consumer prefetch, 4 MiB
transactions, no malloc_trim):
``ring=MIB`` (service.ring_bytes), ``max=MIB`` (service.commit_max_bytes),
``prefetch=KB`` (kafka.consumer queued.max.messages.kbytes),
``kset.NAME=VALUE`` (any librdkafka setting of kafka.common), ``set.PATH=VALUE`` (any
dotted config path, the value parsed as JSON when it parses).
"""

from __future__ import annotations

import argparse
import json
import uuid

from bench import workload as wl
from bench.metrics import BREAKDOWN

MiB = 1 << 20
SETTINGS = {"ring": ("service.ring_bytes", MiB), "max": ("service.commit_max_bytes", MiB),
            "prefetch": ("kafka.consumer.queued.max.messages.kbytes", 1)}


def variant(name: str) -> dict:
    """Config overrides of a variant name (see the module docstring)."""
    out: dict = {}
    if name == "shipped":
        return out
    if name == "before":
        return {"service.ring_bytes": 16 * MiB, "service.malloc_trim_interval_ms": 0,
                "service.commit_max_bytes": 4 * MiB,
                "kafka.consumer.queued.max.messages.kbytes": 16384}
    for item in name.split("+"):
        key, _, value = item.partition("=")
        if key.startswith("kset."):
            out[f"kafka.common.{key[5:]}"] = _value(value)
        elif key.startswith("set."):
            out[key[4:]] = _value(value)
        else:
            setting, unit = SETTINGS[key]
            out[setting] = int(float(value) * unit)
    return out


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def run(events: int, workers: int, names: list[str], seed: int,
        timeout: float = 900) -> list[dict]:
    from aggregator.devtools import simulate
    from aggregator.devtools.broker import EmbeddedBroker
    from bench.stages.service import measure_throughput

    w = wl.generate(seed, events)
    oracle = simulate.expected_views(w)
    out = []
    broker = EmbeddedBroker().start()
    try:
        loaded = wl.load(broker.bootstrap_servers, w, f"mem{uuid.uuid4().hex[:6]}.")
        for name in names:
            r = measure_throughput(loaded, broker.bootstrap_servers, workers, oracle,
                                   embedded=True, broker_pid=broker.pid, timeout=timeout,
                                   overrides=variant(name))
            row = {"variant": name, "ok": r.ok, "error": r.error, "records": r.records,
                   "events_per_s": round(r.events_per_s),
                   "cpu_us_per_event": round(r.cpu_s_per_million, 1),
                   "peak_rss_total_mib": r.memory.get("peak_rss_total_mib"),
                   "peak_pss_total_mib": r.memory.get("peak_pss_total_mib"),
                   "processes": {k: v for k, v in r.memory.get("processes", {}).items()
                                 if k != "broker"},
                   "verified": r.verified}
            print(table(row), flush=True)
            out.append(row)
    finally:
        broker.stop()
    return out


def table(row: dict) -> str:
    """One variant's per-process breakdown as a text table (MiB)."""
    head = (f"== {row['variant']}: {row['events_per_s']:,} events/s, "
            f"{row['cpu_us_per_event']} µs CPU/event, peak RSS sum "
            f"{row['peak_rss_total_mib']} MiB (PSS {row['peak_pss_total_mib']}), "
            f"{row['verified']}")
    cols = ["process", "rss", "pss", "at", *BREAKDOWN]
    lines = [head, "  ".join(f"{c:>13}" for c in cols)]
    for label, p in row["processes"].items():
        b = p.get("breakdown") or {}
        rss, pss = b.get("rss_mib", {}), b.get("pss_mib", {})
        cells = [label[:13], p["peak_rss_mib"], p["peak_pss_mib"], b.get("at_rss_mib", "-")]
        for c in BREAKDOWN:
            if c not in rss:
                cells.append("-")
            elif c in ("shm", "lmdb"):
                cells.append(f"{rss[c]:.0f}/{pss[c]:.0f}")
            else:
                cells.append(f"{rss[c]:.1f}")
        lines.append("  ".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", default="shipped", help="comma-separated, see --help")
    ap.add_argument("--json", help="write the rows to this file")
    a = ap.parse_args(argv)
    rows = run(a.events, a.workers, a.variants.split(","), a.seed)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
