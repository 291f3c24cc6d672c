"""The forwarding path between two workers, CPU per forwarded view update.

    python -m bench.micro.bench_forward [--events 100000] [--batch 5000] [--format 1,2]
                                        [--runs 1] [--profile] [--top 25] [--json]

Two real `Worker` objects in this process on real LMDB shards (one data dir, ``workers = 2``,
``lmdb_sync`` off as in tests/test_worker.py), fed the seeded shop workload
(`bench.workload`) split by the real routing (`worker_of(slot, 2)`), in rounds of `--batch`
records: each worker takes its records and the messages its peer left in its inbound peer
ring (raw, as `Worker.run` takes them), applies them in one transaction, commits and pumps
its outbox into the peer ring. The same workload runs once per outbox/ring format of the
forwarded updates (`--format`: 1 = the msgpack lists of format 1, 2 = the binary format, see
aggregator/forwards.py), each on fresh shards, so the figures are before/after in one run.

What is timed (the thread's CPU time, `time.thread_time_ns`, around the worker's own methods;
the run's total process CPU is printed beside):
- sending side: building an update (the list route.py makes, timed alone on the updates of
  a first fifth of the workload), `_write_links` (encoding + outbox put + prune) and
  `_pump_outbox` (ring puts); `_route` less the merges in it is shown beside (it holds
  every event's routing, local or not);
- receiving side: decoding the peer messages (`_decode_peer`) and `_apply_forwarded` minus
  the merges in it (link dedup, per-update objects);
- the merge itself (`_apply_local`), for a local update and for a forwarded one.
Per forwarded update = (sending side + receiving side) / forwarded updates; a local update's
cost is `_apply_local` per local call. What a timed call adds to its caller's bucket is
measured (`wrapper_ns`) and taken off. The machine is shared: `--runs N` runs the formats
interleaved N times and shows each format's best run. Beside it, the codec alone (`codec`:
encode and decode of the update batches the first run forwarded, best of `--repeat`).
`--profile`: cProfile of the last run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import tempfile
import time
import uuid
from collections import defaultdict

from aggregator import forwards
from aggregator.config import load_config
from aggregator.protocol import REC_SLOT, create_segments
from aggregator.routing import worker_of
from aggregator.runtime import tune_gc
from aggregator.worker import Worker
from bench import workload as wl
from bench.micro.bench_batch import NoDeadLetters

WORKERS = 2


def split(msgs: list) -> list[list]:
    """Per round, per worker: the supervisor message with that worker's records."""
    rounds = []
    for _, bid, thr, recs in msgs:
        per: list[list] = [[] for _ in range(WORKERS)]
        for r in recs:
            per[worker_of(r[REC_SLOT], WORKERS)].append(r)
        rounds.append([[1, bid, thr, p] for p in per])
    return rounds


class Timers:
    """Accumulated ns per bucket, calls per bucket."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, name: str, bucket, count=None) -> None:
        """Time `obj.name` into `bucket` (a str, or a function of the call's arguments)."""
        fn = getattr(obj, name)
        ns, calls, clock = self.ns, self.calls, time.thread_time_ns

        def timed(*a, **kw):
            t = clock()
            try:
                return fn(*a, **kw)
            finally:
                b = bucket if isinstance(bucket, str) else bucket(a)
                ns[b] += clock() - t
                calls[b] += 1 if count is None else count(a)

        setattr(obj, name, timed)


def wrapper_ns() -> float:
    """What one timed call adds to the bucket of the caller (its clock reads and the
    wrapper), ns: subtracted from `route` and `apply_forwarded` per merge timed inside."""
    class Probe:
        def f(self, *a):
            return None

    p, t = Probe(), Timers()
    t.wrap(p, "f", "x")
    n = 20000
    best = float("inf")
    for _ in range(5):
        t0 = time.thread_time_ns()
        for _ in range(n):
            p.f(1, 2, 3, 4, 5)
        best = min(best, (time.thread_time_ns() - t0) / n - t.ns["x"] / t.calls["x"])
        t.ns.clear()
        t.calls.clear()
    return max(best, 0.0)


def codec(batches: list, repeat: int, keys: list) -> dict:
    """The encoding and decoding alone, per format, on the update batches a run forwarded:
    CPU µs per update (the best of `repeat`), and bytes per update."""
    n = sum(len(b) for b in batches)
    out = {}
    # building the updates as route.py does, from an event object and the record's fields
    evs = [(u[0], u[1], u[2], forwards.Forwarded(u), u[11], u[12], u[13])
           for b in batches for u in b]
    best_b = float("inf")
    for _ in range(repeat):
        t = time.thread_time_ns()
        sink: list = []
        for feed, key, slot, ev, ti, part, off in evs:
            sink.append((1, [feed, key, slot, ev.id, ev.source, ev.type, ev.time, ev.subject,
                             ev.sequence, ev.data, ev.partitionkey, ti, part, off]))
        best_b = min(best_b, time.thread_time_ns() - t)
    out["build_us"] = round(best_b / n / 1e3, 2)
    for fmt in (1, 2):
        forwards.WRITE_FORMAT = fmt
        best_e = best_d = float("inf")
        for _ in range(repeat):
            t = time.thread_time_ns()
            msgs = [m for b in batches for m in forwards.encode(0, 1, b, 8 << 20)]
            best_e = min(best_e, time.thread_time_ns() - t)
            t = time.thread_time_ns()
            for m in msgs:
                forwards.decode(m, keys)  # as the worker reads them (forwards.data_keys)
            best_d = min(best_d, time.thread_time_ns() - t)
        out[fmt] = {"encode_us": round(best_e / n / 1e3, 2),
                    "decode_us": round(best_d / n / 1e3, 2),
                    "bytes": round(sum(len(m) for m in msgs) / n, 1)}
    forwards.WRITE_FORMAT = 2
    return out


def run(fmt: int, rounds: list, profile: cProfile.Profile | None,
        captured: list | None = None, build_ns: float = 0.0) -> dict:
    forwards.WRITE_FORMAT = fmt
    encode = forwards.encode
    if captured is not None:
        def capture(src, first_seq, updates, limit):
            captured.append(list(updates))
            return encode(src, first_seq, updates, limit)
        forwards.encode = capture
    tmp = tempfile.mkdtemp(prefix="agg-fwd-")
    cfg = load_config(wl.CONFIG_PATH, {"service.workers": WORKERS,
                                       "service.data_dir": tmp + "/data",
                                       "service.lmdb_sync": False,
                                       "service.ring_bytes": 32 << 20}, env={})
    prefix = f"agg-fwd-{uuid.uuid4().hex[:8]}"
    segments = create_segments(prefix, WORKERS, 32 << 20, 16 << 20)
    workers = []
    for i in range(WORKERS):
        w = Worker(cfg, i, prefix)
        w.boot()
        w.dlq = NoDeadLetters()
        workers.append(w)
    tune_gc()
    t = Timers()
    kinds = {}
    for w in workers:
        t.wrap(w, "_route", "route")
        t.wrap(w, "_apply_local", lambda a: kinds.setdefault(type(a[4]), (
            "apply_local.fwd" if type(a[4]).__name__ == "Forwarded" or
            type(a[4]).__name__.startswith("Fwd") else "apply_local.local")))
        t.wrap(w, "_write_links", "write_links")
        t.wrap(w, "_pump_outbox", "pump")
        t.wrap(w, "_decode_peer", "decode")
        t.wrap(w, "_apply_forwarded", "apply_forwarded")
    try:
        cpu = time.process_time()
        wall = time.perf_counter()
        if profile is not None:
            profile.enable()
        for per in rounds:
            for i, w in enumerate(workers):
                peers = []
                for r in w.peer_in.values():
                    peers.extend(r.get_many(1 << 20))
                w._process_ring([per[i]], peers)
        for _ in range(3):  # what is still in flight
            for w in workers:
                peers = []
                for r in w.peer_in.values():
                    peers.extend(r.get_many(1 << 20))
                if peers:
                    w._process_ring([], peers)
        if profile is not None:
            profile.disable()
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - wall
        fwd = sum(w.totals["forwarded"] for w in workers)
        recs = sum(w.totals["records"] for w in workers)
        local = t.calls["apply_local.local"]
        ns = t.ns
        wrap = wrapper_ns()
        route = ns["route"] - ns["apply_local.local"] - wrap * local
        send = build_ns * fwd + ns["write_links"] + ns["pump"]
        recv = ns["decode"] + ns["apply_forwarded"] - ns["apply_local.fwd"] - wrap * fwd
        return {
            "format": fmt, "records": recs, "forwarded": fwd, "local_updates": local,
            "cpu_us_per_record": round(cpu / recs * 1e6, 2),
            "wall_s": round(wall, 2),
            "send_us_per_fwd": round(send / fwd / 1e3, 2),
            "recv_us_per_fwd": round(recv / fwd / 1e3, 2),
            "fwd_overhead_us": round((send + recv) / fwd / 1e3, 2),
            "merge_us_per_fwd": round(ns["apply_local.fwd"] / fwd / 1e3, 2),
            "merge_us_per_local": round(ns["apply_local.local"] / max(local, 1) / 1e3, 2),
            "parts_us_per_fwd": {
                "build": round(build_ns / 1e3, 2),
                "route_all_events_less_merges": round(route / fwd / 1e3, 2),
                **{k: round(ns[k] / fwd / 1e3, 2) for k in ("write_links", "pump", "decode")},
                "apply_forwarded_less_merge": round(
                    (ns["apply_forwarded"] - ns["apply_local.fwd"] - wrap * fwd) / fwd / 1e3,
                    2)},
        }
    finally:
        forwards.encode = encode
        for w in workers:
            producer = getattr(getattr(w, "publisher", None), "producer", None)
            if producer is not None and hasattr(producer, "purge"):
                producer.purge()
            w.close()
        segments.close()
        shutil.rmtree(tmp, ignore_errors=True)  # a WRITEMAP shard's file takes its whole map


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--format", default="1,2", help="outbox formats to run, in order")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=5, help="codec timings: best of")
    ap.add_argument("--runs", type=int, default=1,
                    help="runs per format, interleaved; the best (least forwarding CPU) shown")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rounds = split(wl.ring_messages(wl.generate(11, args.events), args.batch))
    prof = None
    fmts = [int(f) for f in args.format.split(",")]
    captured: list = []
    run(fmts[0], rounds[:max(len(rounds) // 5, 1)], None, captured)  # the updates forwarded
    keys = forwards.data_keys(load_config(wl.CONFIG_PATH, {}, env={}))
    codecs = codec(captured, args.repeat, keys)
    build_ns = codecs["build_us"] * 1e3
    best: dict[int, dict] = {}
    for r in range(args.runs):  # the formats interleaved; per format its best run
        for k, fmt in enumerate(fmts):
            last = r == args.runs - 1 and k == len(fmts) - 1
            prof = cProfile.Profile() if args.profile and last else None
            res = run(fmt, rounds, prof, None, build_ns)
            if fmt not in best or res["fwd_overhead_us"] < best[fmt]["fwd_overhead_us"]:
                best[fmt] = res
    results = [best[f] for f in fmts]
    if args.json:
        print(json.dumps({"runs": results, "codec": codecs}, indent=1))
    else:
        print(f"building an update (route.py): {codecs['build_us']} µs")
        for fmt, c in codecs.items():
            if fmt == "build_us":
                continue
            print(f"codec, format {fmt} ({forwards.IMPLEMENTATION}): encode {c['encode_us']} + "
                  f"decode {c['decode_us']} µs per update, {c['bytes']} B per update")
        for r in results:
            print(f"format {r['format']}: {r['records']} records, {r['forwarded']} forwarded "
                  f"updates, {r['local_updates']} local; CPU {r['cpu_us_per_record']} µs/record"
                  f" ({r['wall_s']} s)")
            print(f"  per forwarded update: send {r['send_us_per_fwd']} + receive "
                  f"{r['recv_us_per_fwd']} = {r['fwd_overhead_us']} µs of forwarding, then "
                  f"merge {r['merge_us_per_fwd']} µs (a local update's merge: "
                  f"{r['merge_us_per_local']} µs); parts {r['parts_us_per_fwd']}")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
