"""Storage figures of one worker (issue 14): dedup bytes per id, dedup CPU, disk writes.

Two modes, each one JSON line on stdout; the same script runs against any build (put an
older checkout first on PYTHONPATH to measure it before/after in the same session):

``python -m bench.micro.bench_storage worker --events 200000``
    A real `Worker` (one, owning every slot; shop.toml; LMDB sync as shipped) driven
    in-process with batches of `--batch` records of the simulated shop, as in
    bench_batch.py. Reports the dedup stage's process CPU per record (bloom + exact index
    lookups + marking + rotation/drop/seal + dedup log), all of `process()` per record, the
    bytes this process wrote (``/proc/self/io``: ``write_bytes`` = page-cache bytes dirtied,
    ``wchar`` = bytes passed to write()) per event, and the dedup index's bytes per id
    (its databases' pages x page size / ids).

``python -m bench.micro.bench_storage index --ids 3000000 --capacity 500000``
    The exact index alone at window scale: `--ids` random ids marked in transactions of
    2,500, the generation advancing every `--capacity` ids and the generation 4 back
    leaving the window (format 1: pruned in one transaction, as the worker did; format 2:
    dropped whole, then sealed in slices). Reports µs per id, bytes per id at the end,
    the largest transaction's time, and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
import uuid
from pathlib import Path


def _io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
    return out


def _dedup_bytes(shard) -> tuple[int, int]:
    """(ids, bytes of the pages of the dedup index's databases), any format."""
    with shard.env.begin() as txn:
        names = [bytes(k).decode() for k, _ in txn.cursor()]
        psize = txn.stat(shard.db["meta"])["psize"]
    ids = pages = 0
    for name in names:
        if name in ("dedup", "dedup_gen") or name.startswith("dedup."):
            db = shard.env.open_db(name.encode(), create=False)
            with shard.env.begin() as txn:
                st = txn.stat(db)
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            if name != "dedup_gen":
                ids += st["entries"]
    return ids, pages * psize


def worker_mode(events: int, batch: int, no_gc: bool = False) -> dict:
    import gc

    from aggregator import store
    from aggregator.config import load_config
    from aggregator.protocol import create_segments
    from aggregator.worker import Worker
    from bench import workload as wl
    from bench.micro.bench_batch import NoDeadLetters

    w = wl.generate(11, events)
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    cfg = load_config(wl.CONFIG_PATH, {"service.workers": 1,
                                       "service.data_dir": str(tmp / "data"),
                                       "service.ring_bytes": 8 << 20}, env={})
    msgs = wl.ring_messages(w, batch)
    recs = [r for m in msgs for r in m[3]]
    prefix = f"agg-bench-storage-{uuid.uuid4().hex[:10]}"
    segments = create_segments(prefix, 1, 8 << 20, 8 << 20)
    wk = Worker(cfg, 0, prefix)
    wk.boot()

    wk.dlq = NoDeadLetters()
    spent = {"dedup": 0.0}

    def timed(fn):
        def run(*a, **kw):
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                spent["dedup"] += time.process_time() - t0
        return run

    wk._dedup = timed(wk._dedup)
    wk._store_dedup = timed(wk._store_dedup)
    if no_gc:  # the cyclic GC's pauses land in whichever stage allocates: out of the way
        gc.collect()
        gc.disable()
    io0, c0 = _io(), time.process_time()
    for m in msgs:
        wk.process([m], [])
    cpu = time.process_time() - c0
    gc.enable()
    io1 = _io()
    ids, nbytes = _dedup_bytes(wk.shard)
    out = {
        "mode": "worker", "format": store.FORMAT_VERSION, "records": len(recs),
        "events": events, "batch": batch, "gc": not no_gc,
        "dedup_us_per_record": round(spent["dedup"] / len(recs) * 1e6, 2),
        "process_us_per_record": round(cpu / len(recs) * 1e6, 2),
        "write_bytes_per_event": round((io1["write_bytes"] - io0["write_bytes"]) / events),
        "wchar_per_event": round((io1["wchar"] - io0["wchar"]) / events),
        "dedup_ids": ids, "dedup_bytes_per_id": round(nbytes / max(ids, 1), 1),
        "data_mdb_bytes": (tmp / "data" / "shard-0" / "data.mdb").stat().st_size,
    }
    producer = getattr(getattr(wk, "publisher", None), "producer", None)
    if producer is not None and hasattr(producer, "purge"):
        producer.purge()
    wk.close()
    wk.inbound.close()
    wk.ctl.close()
    segments.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def index_mode(ids: int, capacity: int, generations: int = 4) -> dict:
    from aggregator import store

    tmp = Path(tempfile.mkdtemp(prefix="bench-index-"))
    shard = store.Shard(tmp / "shard-0", map_size=1 << 30, max_map_size=64 << 30, sync=False)
    shard.check_layout(shard=0, workers=1, slots=4096)
    rng = os.urandom
    done = 0
    gen = 0
    worst = 0.0
    t_all = time.process_time()
    io0 = _io()
    while done < ids:
        t0 = time.monotonic()
        while True:
            b = shard.begin()
            try:
                new_gen = done // capacity
                for _ in range(2500):
                    b.mark_seen(rng(18), new_gen)
                if new_gen != gen:
                    gen = new_gen
                    if gen >= generations:
                        if hasattr(b, "drop_generations"):
                            b.drop_generations(gen - generations)
                        else:
                            b.prune_generations(gen - generations, limit=10_000_000)
                if hasattr(b, "seal_dedup"):
                    b.seal_dedup(gen, 2048 + 2 * 2500)
                b.commit()
                break
            except Exception as e:  # noqa: BLE001 - MapFullError: grow and redo
                b.abort()
                if "MDB_MAP_FULL" not in str(e) or not shard.grow():
                    raise
        worst = max(worst, time.monotonic() - t0)
        done += 2500
    cpu = time.process_time() - t_all
    io1 = _io()
    n, nbytes = _dedup_bytes(shard)
    out = {"mode": "index", "format": store.FORMAT_VERSION, "ids_marked": ids,
           "capacity": capacity, "generations": generations,
           "us_per_id": round(cpu / ids * 1e6, 2), "ids_in_window": n,
           "bytes_per_id": round(nbytes / max(n, 1), 1),
           "largest_txn_s": round(worst, 3),
           "write_bytes_per_id": round((io1["write_bytes"] - io0["write_bytes"]) / ids),
           "file_bytes": (tmp / "shard-0" / "data.mdb").stat().st_size,
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    shard.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("worker")
    a.add_argument("--events", type=int, default=200_000)
    a.add_argument("--batch", type=int, default=2500)
    a.add_argument("--no-gc", action="store_true", help="cyclic GC off while processing")
    b = sub.add_parser("index")
    b.add_argument("--ids", type=int, default=3_000_000)
    b.add_argument("--capacity", type=int, default=500_000)
    b.add_argument("--generations", type=int, default=4)
    args = ap.parse_args()
    if args.mode == "worker":
        print(json.dumps(worker_mode(args.events, args.batch, args.no_gc)))
    else:
        print(json.dumps(index_mode(args.ids, args.capacity, args.generations)))


if __name__ == "__main__":
    main()
