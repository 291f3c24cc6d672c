"""What reading a full document log costs (format 5): a worker's boot and the HTTP/CLI reader.

    python -m bench.tools.doc_log_read [--commits 20 --docs 3000 --keys 60000]

One shard gets `commits` commits of `docs` documents each (~500-byte records, keys drawn from
`keys`), all left in the document log (no checkpoint). Then: the CPU of opening it again
(`Shard` reads the log into `doc_pending`) and the bytes tracemalloc sees for that map; the
HTTP/CLI reader (query.Views) on it: the first request (builds the reader's index of the
log), the index's size (sys.getsizeof), a get and a page of 100 keys; the same after a
checkpoint (`Shard.fold_doc_log`). The data directory is removed at the end.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import tracemalloc

from aggregator.query import Views
from aggregator.routing import SLOTS, slot_of, slot_prefix
from aggregator.store import Shard, shard_path, view_key

VIEWS = ["customer", "order", "product"]


def _reader(data: str, keys: list[str], rng: random.Random) -> str:
    with Views(data, 1, VIEWS) as v:
        t0 = time.process_time()
        v.get("customer", keys[0])
        first = time.process_time() - t0
        idx = v.shards[0].doc_log
        mem = sys.getsizeof(idx.where) + sys.getsizeof(idx.keys()) + sum(
            sys.getsizeof(k) + sys.getsizeof(w) for k, w in idx.where.items())
        sample = rng.sample(keys, 3000)
        t0 = time.process_time()
        for k in sample:
            v.get("customer", k)
        get = (time.process_time() - t0) / len(sample)
        t0, cursor = time.process_time(), None
        for _ in range(50):
            _, cursor = v.list_keys("customer", 100, cursor)
        page = (time.process_time() - t0) / 50
        n = len(idx.where)
    return (f"first request {first * 1e3:.0f} ms CPU (index of {n:,} documents, "
            f"{mem / max(n, 1):.0f} B each), get {get * 1e6:.1f} µs, page of 100 keys "
            f"{page * 1e3:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=20)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--keys", type=int, default=60_000)
    a = ap.parse_args(argv)
    rng = random.Random(1)
    keys = [f"key-{i}" for i in range(a.keys)]
    data = tempfile.mkdtemp(prefix="agg-doclog-")
    try:
        path = shard_path(data, 0)
        s = Shard(path, map_size=256 << 20, sync=False)
        s.check_layout(shard=0, workers=1, slots=SLOTS)
        s.put_meta(views=VIEWS)
        for t in range(a.commits):
            b = s.begin()
            for i in range(a.docs):
                k = rng.choice(keys)
                b.put_doc(view_key(slot_prefix(slot_of(k.encode())), 0, k),
                          {"v": t, "d": {"name": "x" * 400, "n": i, "tags": ["a", "b"]},
                           "s": {"/shop/x": [i, "2024-01-01T00:00:00Z"]}})
            b.commit()
        logged, docs = s.doc_logged, len(s.doc_pending)
        s.close()
        best = min(_timed_open(path) for _ in range(3))
        tracemalloc.start()
        s = Shard(path, sync=False)
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        s.close()
        print(f"log of {logged / 2**20:.1f} MiB, {docs:,} documents: open (reads the log) "
              f"{best * 1e3:.0f} ms CPU, map {traced / 2**20:.1f} MiB "
              f"({traced / docs:.0f} B per document)")
        print("reader, log pending: " + _reader(data, keys, rng))
        s = Shard(path, sync=False)
        s.fold_doc_log()
        s.close()
        print("reader, after a checkpoint: " + _reader(data, keys, rng))
    finally:
        shutil.rmtree(data, ignore_errors=True)  # a shard's file takes its map
    return 0


def _timed_open(path) -> float:
    t0 = time.process_time()
    s = Shard(path, sync=False)
    t = time.process_time() - t0
    s.close()
    return t


if __name__ == "__main__":
    raise SystemExit(main())
