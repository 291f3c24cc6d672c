"""Change-event publishing alone: CPU per change event, of this process and of the broker.

    python -m bench.micro.bench_publish [--n N] [--impl native,python] [--linger 5,100]
                                        [--compression lz4,none] [--commit 2000]
                                        [--rate 0,20000] [--repeat R] [--json]

Starts the embedded broker, creates the three change topics of shop.toml (4 partitions) and
builds N change records from real view documents: the final customer, order and product
documents of a seeded shop workload (`simulate.expected_views`), JSON as the worker encodes
them, keyed by their view key. They are committed to a publisher as outbox blobs of
`--commit` records (what one worker transaction writes), pumped after each commit as the
worker does, and flushed at the end; `--rate` paces the commits (one every commit/rate
seconds, as a worker under that load commits) instead of committing all at once. For every
combination of publisher (`native`: aggregator._publish driving librdkafka from C; `python`:
the reference ChangePublisher), `linger.ms` and `compression.type` it prints, per change
event:

- caller µs: CPU of the publishing thread (produce calls, delivery reports, Python);
- process µs: CPU of this whole process (the caller plus librdkafka's threads);
- broker µs: CPU of the broker process (utime + stime from /proc/<pid>/stat), from the first
  produce until the last delivery report, minus its idle rate measured just before.

Each publisher first delivers 200 records untimed (its start: metadata, producer id).

The combinations run in turn on the same broker, each on the same records.

`--outbox` first times the outbox itself on the same records, in a real LMDB shard: per
change event, the CPU of writing a commit's changes (format 1: one msgpack entry and one put
per event; now: one blob and one put per commit), committing, and pruning them in the next
transaction.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from aggregator.changes import ChangeEncoder, ChangePublisher, NativeChangePublisher
from aggregator.config import load_config
from aggregator.devtools import simulate
from aggregator.devtools.broker import EmbeddedBroker
from aggregator.store import Shard

IMPLS = {"native": NativeChangePublisher, "python": ChangePublisher}
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def change_rows(n: int, seed: int = 1) -> list[tuple[int, str, int, bytes]]:
    """n change records (view id, key, version, JSON body) from real view documents."""
    views = simulate.expected_views(simulate.generate(seed, 20_000))
    docs = [(vid, key, orjson.dumps(doc))
            for vid, name in enumerate(("customer", "order", "product"))
            for key, doc in sorted(views[name].items())]
    return [(vid, key, 1 + i // len(docs), body)
            for i, (vid, key, body) in zip(range(n), itertools.cycle(docs))]


def measure_outbox(cfg, rows, commit: int) -> dict:
    """CPU µs per change event of writing, committing and pruning the change outbox."""
    enc = ChangeEncoder(cfg, ["customer", "order", "product"])
    out = {}
    for layout in ("entries", "blobs"):
        with tempfile.TemporaryDirectory() as d:
            shard = Shard(Path(d) / "shard-0", map_size=1 << 30)
            seq = 0
            c0 = time.process_time()
            for k in range(0, len(rows), commit):
                part = rows[k:k + commit]
                b = shard.begin()
                b.prune_changes(seq)  # the previous commit's, delivered by now
                if layout == "entries":
                    for vid, key, version, data in part:
                        seq += 1
                        b.put_change(seq, enc.entry(vid, key, version, data))
                else:
                    b.put_changes(seq + 1, seq + len(part), enc.blob(part))
                    seq += len(part)
                b.commit()
            out[layout] = round((time.process_time() - c0) / len(rows) * 1e6, 2)
            shard.close()
    return out


def measure(impl: str, cfg, rows, commit: int, broker_pid: int, rate: int = 0) -> dict:
    enc = ChangeEncoder(cfg, ["customer", "order", "product"])
    blobs, seq = [], 0
    for k in range(0, len(rows), commit):
        part = rows[k:k + commit]
        blobs.append((seq + 1, seq + len(part), enc.blob(part)))
        seq += len(part)
    pub = IMPLS[impl](cfg, enc, lambda after: iter(()), 0, 0)
    # warm-up: the producer's start (metadata, producer id) is not per event
    warm = rows[:200]
    pub.committed([(1, len(warm), enc.blob(warm))])
    pub.flush(60)
    blobs = [(first + len(warm), last + len(warm), blob) for first, last, blob in blobs]
    seq += len(warm)
    b0 = proc_cpu(broker_pid)
    time.sleep(1.0)
    idle = proc_cpu(broker_pid) - b0  # per second
    t0, c0, p0, b0 = time.perf_counter(), time.thread_time(), time.process_time(), \
        proc_cpu(broker_pid)
    every = commit / rate if rate else 0.0  # paced: a commit every `every` seconds
    for i, blob in enumerate(blobs):
        if every:
            wait = t0 + i * every - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        pub.committed([blob])
        pub.pump()
    ok = pub.flush(120)
    wall = time.perf_counter() - t0
    caller, process = time.thread_time() - c0, time.process_time() - p0
    broker = proc_cpu(broker_pid) - b0 - idle * wall
    pub.close()
    if not ok or pub.published != seq:
        raise RuntimeError(f"{impl}: published {pub.published} of {seq}")
    n = len(rows)
    return {"impl": impl, "rate": rate, "commit": commit,
            "linger_ms": cfg.kafka.producer["linger.ms"],
            "compression": cfg.kafka.producer["compression.type"], "events": n,
            "wall_s": round(wall, 3), "caller_us": round(caller / n * 1e6, 2),
            "process_us": round(process / n * 1e6, 2), "broker_us": round(broker / n * 1e6, 2),
            "events_per_s": round(n / wall)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--impl", default="native,python")
    ap.add_argument("--linger", default="5,100")
    ap.add_argument("--compression", default="lz4,none")
    ap.add_argument("--commit", type=int, default=2000)
    ap.add_argument("--rate", default="0",
                    help="events/s, comma-separated: commits paced at this rate (0: at once)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per combination (median)")
    ap.add_argument("--outbox", action="store_true", help="also time the outbox (LMDB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = change_rows(args.n)
    size = sum(len(r[3]) for r in rows) / len(rows)
    broker = EmbeddedBroker()
    broker.start()
    out = []
    try:
        base = load_config(None, {"kafka.bootstrap_servers": broker.bootstrap_servers,
                                  "kafka.group_id": "bench"}, env={})
        broker_topics = list(base.changes_topics().values())
        from aggregator.admin import create_topics
        create_topics(broker.bootstrap_servers, broker_topics, 4)
        outbox = measure_outbox(base, rows, args.commit) if args.outbox else None
        if outbox and not args.json:
            print(f"outbox write + commit + prune: {outbox['entries']:.2f} µs/event as "
                  f"format 1 entries, {outbox['blobs']:.2f} µs/event as blobs", flush=True)
        for rate, impl, linger, comp in itertools.product(
                [int(r) for r in args.rate.split(",")], args.impl.split(","),
                args.linger.split(","), args.compression.split(",")):
            kafka = base.kafka.model_copy(update={"producer": {
                "linger.ms": int(linger), "compression.type": comp}})
            cfg = base.model_copy(update={"kafka": kafka})
            runs = [measure(impl, cfg, rows, args.commit, broker.pid, rate)
                    for _ in range(args.repeat)]
            r = {**runs[0], **{k: statistics.median(x[k] for x in runs) for k in
                               ("wall_s", "caller_us", "process_us", "broker_us",
                                "events_per_s")}, "repeat": args.repeat}
            out.append(r)
            if not args.json:
                print(f"rate {rate or 'max':>6} {impl:6} linger.ms={linger:>3} {comp:4}: "
                      f"caller {r['caller_us']:5.2f} "
                      f"process {r['process_us']:5.2f} broker {r['broker_us']:5.2f} µs/event "
                      f"({r['events_per_s']:,}/s, {r['wall_s']} s)", flush=True)
    finally:
        broker.stop()
    if args.json:
        print(json.dumps({"events": args.n, "body_bytes": round(size), "commit": args.commit,
                          "outbox_us": outbox, "runs": out}, indent=1))
    else:
        print(f"{args.n:,} change events, JSON bodies of {size:.0f} B on average, "
              f"blobs of {args.commit}")


if __name__ == "__main__":
    main()
