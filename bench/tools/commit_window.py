"""The commit window and the document cache, before and after, in one run.

    python -m bench.tools.commit_window                       # worker stage, 100k events
    python -m bench.tools.commit_window --events 20000 --workers 1
    python -m bench.tools.commit_window --latency 4000        # + latency at 4,000 events/s
    python -m bench.tools.commit_window --no-stage --latency 4000 --fetch-wait-ms 20 \
        --variants window=0,window=50,window=150

Variants (config overrides; the same pre-encoded workload for each):

- ``before``: one commit per take from the rings, 4 MiB per transaction, no document cache
  (the worker before issue 13's commit window);
- ``cache``: a 32 MiB document cache, one commit per take;
- ``after``: everything as shipped (``commit_window_ms``, ``commit_max_bytes``; no cache);
- ``window=MS``, ``max=MIB``, ``cache=MIB``, joined with ``+``: as shipped with those
  settings (commit_window_ms, commit_max_bytes, doc_cache_bytes).

1. The worker stage (bench/stages/worker_stage.py: real worker processes fed from
   pre-encoded ring messages as fast as they take them, LMDB fsync on), per variant:
   records/s, worker CPU µs per record, commits per 100k records and disk writes per record
   (``write_bytes`` of /proc/<pid>/io of the worker processes), views checked.
2. With ``--latency RATE``: end-to-end latency (bench/stages/latency.py: the whole service
   on the embedded broker, a paced load at RATE events/s) per variant: p50/p99/max, and
   LMDB commits per 100k records (the shards' last transaction ids, warm-up and boot
   included).
"""

from __future__ import annotations

import argparse
import json
import uuid

from aggregator.devtools import simulate
from bench import workload as wl

MiB = 1 << 20
VARIANTS = {
    "before": {"service.doc_cache_bytes": 0, "service.commit_window_ms": 0,
               "service.commit_max_bytes": 4 * MiB},
    "cache": {"service.commit_window_ms": 0, "service.commit_max_bytes": 4 * MiB,
              "service.doc_cache_bytes": 32 * MiB},
    "after": {},
}


SETTINGS = {"window": ("service.commit_window_ms", 1),
            "max": ("service.commit_max_bytes", MiB), "cache": ("service.doc_cache_bytes", MiB)}


def variant(name: str) -> dict:
    """A named variant, or settings on top of the shipped config: ``window=MS``, ``max=MIB``
    (commit_max_bytes), ``cache=MIB`` (doc_cache_bytes), joined with ``+``."""
    if name in VARIANTS:
        return VARIANTS[name]
    out = {}
    for item in name.split("+"):
        key, _, value = item.partition("=")
        setting, unit = SETTINGS[key]
        out[setting] = int(float(value) * unit)
    return out


def stage(events: int, workers: int, names: list[str], seed: int) -> list[dict]:
    from aggregator.devtools.broker import EmbeddedBroker
    from bench.stages.worker_stage import measure_stage

    w = wl.generate(seed, events)
    oracle = simulate.expected_views(w)
    out = []
    broker = EmbeddedBroker().start() if wl.output_topics() else None
    try:
        for name in names:
            bootstrap = prefix = ""
            if broker is not None:  # the workers publish change events: give them a broker
                bootstrap, prefix = broker.bootstrap_servers, f"cw{uuid.uuid4().hex[:6]}."
                wl.create(bootstrap, prefix)
            r = measure_stage(w, oracle, workers, bootstrap=bootstrap, prefix=prefix,
                              overrides=variant(name))
            cpu = sum(v for k, v in r.cpu_s.items() if k.startswith("worker"))
            row = {"variant": name, "ok": r.ok, "records": r.records,
                   "records_per_s": round(r.records_per_s),
                   "worker_cpu_us_per_record": round(cpu / r.records * 1e6, 1),
                   "commits_per_100k": round(r.commits / r.records * 100_000),
                   "disk_write_bytes_per_record": round(r.write_bytes / r.records),
                   "workers_peak_rss_mib": r.memory.get("peak_rss_total_mib"),
                   "verified": r.verified}
            print(json.dumps(row), flush=True)
            out.append(row)
    finally:
        if broker is not None:
            broker.stop()
    return out


def _last_txnid(path) -> int:
    """Write transactions an LMDB environment has committed (boot writes included)."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=32, subdir=True)
    try:
        return env.info()["last_txnid"]
    finally:
        env.close()


def latency(rate: float, seconds: float, workers: int, names: list[str], seed: int,
            consumer: dict | None = None) -> list[dict]:
    from aggregator.devtools.broker import EmbeddedBroker
    from bench.stages import latency as lat

    out = []
    broker = EmbeddedBroker().start()
    real, real_cleanup = wl.overrides, lat.AggregatorProcess.cleanup
    txns = []

    def cleanup(p):  # LMDB write transactions of the run: the shards' last txn ids
        txns.append(sum(_last_txnid(s) for s in sorted(p.data_dir.glob("shard-*"))))
        real_cleanup(p)

    lat.AggregatorProcess.cleanup = cleanup
    try:
        for name in names:
            def overrides(*a, _extra=variant(name), **kw):
                return {**real(*a, **kw), **_extra}

            lat.wl.overrides = overrides  # AggregatorProcess builds its config with it
            r = lat.measure_latency(broker.bootstrap_servers, f"cwl{uuid.uuid4().hex[:6]}.",
                                    workers, rate, seconds, seed, embedded=True,
                                    broker_pid=broker.pid, timeout=600, consumer=consumer)
            row = {"variant": name, "ok": r.ok, "achieved_rate": r.achieved_rate,
                   "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms,
                   "records": r.records,
                   "commits_per_100k": round(txns[-1] / max(r.records, 1) * 100_000),
                   "verified": r.verified, "error": r.error}
            print(json.dumps(row), flush=True)
            out.append(row)
    finally:
        lat.wl.overrides, lat.AggregatorProcess.cleanup = real, real_cleanup
        broker.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", "-n", type=int, default=100_000)
    ap.add_argument("--workers", "-w", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--latency", type=float, default=0.0, metavar="RATE",
                    help="also measure end-to-end latency at RATE events/s")
    ap.add_argument("--latency-seconds", type=float, default=30.0)
    ap.add_argument("--fetch-wait-ms", type=int, default=None,
                    help="the consumer's fetch.wait.max.ms for the latency runs (default: "
                         "librdkafka's 500 ms, which bounds latency on the embedded broker)")
    ap.add_argument("--no-stage", action="store_true", help="only the latency part")
    a = ap.parse_args()
    names = a.variants.split(",")
    if not a.no_stage:
        stage(a.events, a.workers, names, a.seed)
    if a.latency:
        consumer = {} if a.fetch_wait_ms is None else {"fetch.wait.max.ms": a.fetch_wait_ms}
        latency(a.latency, a.latency_seconds, a.workers, names, a.seed, consumer)


if __name__ == "__main__":
    main()
