"""Micro-benchmark of the envelope parse: µs per record, compiled and reference side by side.

Run: ``python -m bench.micro.bench_parse [--records N] [--repeat R] [--json] [--worker B]``
(a table by content mode; ``--worker``: also ``Worker.process()`` per record with each
parser, B batches each, alternating), or ``pytest bench/micro/bench_parse.py
--benchmark-only`` (5,000 records per round, part of ``python -m bench --stage micro``;
``extra_info["items_per_s"]``).

The records are the simulated shop's (``bench.workload.generate``, shop.toml: binary JSON,
binary msgpack, 20 % structured), shaped as the worker receives them from the ring (a
msgpack round trip: headers become ``[name, value]`` lists), and parsed with the worker's
arguments (``max_record_bytes``, ``max_key_bytes`` of the shipped config). Each
implementation parses every record once per repeat, with the worker's garbage-collector
settings (`runtime.tune_gc`); the best repeat counts (process CPU
time, so a busy neighbour on the machine counts little). Both implementations must give
equal events, else the run fails. Also one line per content mode, and the floor: the data
decoder's call alone (``orjson.loads`` or ``msgpack.unpackb`` on the value).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import msgpack
import orjson
import pytest

from aggregator import envelope
from aggregator.config import load_config
from aggregator.runtime import tune_gc
from bench import workload as wl

try:
    from aggregator import _envelope
except ImportError:  # only acceptable when the pure core is forced
    _envelope = None


def records(n: int) -> list[tuple]:
    """(value, headers, key) of n simulated records, as they come out of the ring."""
    w = wl.generate(11, n)
    recs = [[key, value, headers] for _topic, key, value, headers in w.records[:n]]
    recs = msgpack.unpackb(msgpack.packb(recs, use_bin_type=True), raw=False, use_list=True)
    return [(v, h, k) for k, v, h in recs]


def mode_of(rec: tuple) -> str:
    ct = dict(rec[1]).get("content-type", b"")
    return {b"application/json": "binary-json", b"application/msgpack": "binary-msgpack",
            b"application/cloudevents+json": "structured"}.get(ct, "other")


def time_decode_only(recs: list, repeat: int) -> float:
    """The floor, best µs per record: only the data decoder's call on each value
    (``orjson.loads``, or ``msgpack.unpackb`` for msgpack records)."""
    calls = [(msgpack.unpackb if dict(h).get("content-type") == b"application/msgpack"
              else orjson.loads, v) for v, h, _k in recs if v]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for f, v in calls:
            f(v)
        best = min(best, time.process_time() - t0)
    return best / len(recs) * 1e6


def time_parse(parse, recs: list, max_bytes: int, max_key: int, repeat: int) -> float:
    """Best µs per record over `repeat` passes."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for v, h, k in recs:
            parse(v, h, k, max_bytes, max_key, False)
        best = min(best, time.process_time() - t0)
    return best / len(recs) * 1e6


# ---- pytest-benchmark (python -m bench --stage micro)
PARSERS = [pytest.param(envelope.parse, id="reference")]
if _envelope is not None:
    PARSERS.insert(0, pytest.param(_envelope.parse, id="compiled"))
BATCH = 5000


@pytest.fixture(scope="module")
def batch():
    cfg = load_config(wl.CONFIG_PATH, {}, env={})
    recs = records(BATCH)
    tune_gc()
    return recs, cfg.service.max_record_bytes, cfg.service.max_key_bytes


@pytest.mark.benchmark(group="envelope-parse-5000")
@pytest.mark.parametrize("parse", PARSERS)
def test_parse(benchmark, parse, batch):
    recs, max_bytes, max_key = batch

    def run():
        for v, h, k in recs:
            parse(v, h, k, max_bytes, max_key, False)

    benchmark(run)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.mean:
        benchmark.extra_info["items_per_s"] = round(len(recs) / stats.stats.mean)


def worker_process(batches: int = 10, batch: int = 5000) -> dict:
    """`Worker.process()` CPU per record with each parser, in the same run: one real worker
    on a temporary LMDB shard (as bench_batch.py), the parser alternating per batch."""
    import tempfile
    import uuid

    import aggregator.worker as worker_mod
    from aggregator.protocol import create_segments
    from aggregator.worker import Worker
    from bench.micro.bench_batch import NoDeadLetters

    n = (2 * batches + 1) * batch
    w = wl.generate(11, n)
    msgs = wl.ring_messages(w, batch, limit=n, packed=True)
    out: dict = {"reference": [], "compiled": []}
    saved = worker_mod.parse
    with tempfile.TemporaryDirectory() as tmp:
        c = load_config(wl.CONFIG_PATH, {"service.workers": 1, "service.data_dir": tmp,
                                         "service.ring_bytes": 8 << 20}, env={})
        prefix = f"agg-bench-parse-{uuid.uuid4().hex[:10]}"
        segments = create_segments(prefix, 1, 8 << 20, 8 << 20)
        wk = Worker(c, 0, prefix)
        try:
            wk.boot()
            wk.dlq = NoDeadLetters()
            unpack = lambda m: msgpack.unpackb(m, raw=False, strict_map_key=False)  # noqa: E731
            wk.process([unpack(msgs[0])], [])  # warm-up: creates the databases
            tune_gc()
            for r, m in enumerate(msgs[1:]):
                name = "compiled" if r % 2 else "reference"
                worker_mod.parse = _envelope.parse if r % 2 else envelope.parse
                m = unpack(m)
                t0 = time.process_time()
                wk.process([m], [])
                out[name].append((time.process_time() - t0) / batch * 1e6)
        finally:
            worker_mod.parse = saved
            producer = getattr(getattr(wk, "publisher", None), "producer", None)
            if producer is not None and hasattr(producer, "purge"):
                producer.purge()  # no broker here: drop queued change events
            wk.close()
            wk.inbound.close()
            wk.ctl.close()
            segments.close()
    return {k: {"median_us": round(sorted(v)[len(v) // 2], 2), "min_us": round(min(v), 2),
                "batches": len(v)} for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--worker", type=int, default=0, metavar="BATCHES",
                    help="also Worker.process() per record, BATCHES batches of 5,000 records "
                         "per parser, alternating (a real worker and LMDB shard)")
    args = ap.parse_args(argv)
    if _envelope is None:
        print("bench_parse: the compiled aggregator._envelope is not built", file=sys.stderr)
        return 2
    cfg = load_config(wl.CONFIG_PATH, {}, env={})
    max_bytes, max_key = cfg.service.max_record_bytes, cfg.service.max_key_bytes
    recs = records(args.records)
    tune_gc()  # as in the worker: the records move out of the collector's view
    for v, h, k in recs:  # a wrong answer is not fast
        a = envelope.parse(v, h, k, max_bytes, max_key)
        b = _envelope.parse(v, h, k, max_bytes, max_key)
        if a != b or list(a.extensions.items()) != list(b.extensions.items()):
            print(f"bench_parse: the implementations disagree on {a!r}", file=sys.stderr)
            return 1
    groups = {"all": recs}
    for r in recs:
        groups.setdefault(mode_of(r), []).append(r)
    out = {}
    for name, rs in groups.items():
        ref = time_parse(envelope.parse, rs, max_bytes, max_key, args.repeat)
        comp = time_parse(_envelope.parse, rs, max_bytes, max_key, args.repeat)
        floor = time_decode_only(rs, args.repeat)
        out[name] = {"records": len(rs), "reference_us": round(ref, 3),
                     "compiled_us": round(comp, 3), "speedup": round(ref / comp, 2),
                     "decode_only_us": round(floor, 3)}
    if args.worker:
        out["worker_process"] = worker_process(args.worker)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'records':<16}{'n':>8}{'reference µs':>15}{'compiled µs':>14}{'speedup':>9}"
              f"{'decode only µs':>17}")
        for name, r in out.items():
            if name == "worker_process":
                continue
            print(f"{name:<16}{r['records']:>8}{r['reference_us']:>15.2f}"
                  f"{r['compiled_us']:>14.2f}{r['speedup']:>8.2f}x{r['decode_only_us']:>17.2f}")
        for name, r in out.get("worker_process", {}).items():
            print(f"Worker.process with the {name} parse: {r['median_us']:.1f} µs/record "
                  f"(median of {r['batches']} batches; min {r['min_us']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
