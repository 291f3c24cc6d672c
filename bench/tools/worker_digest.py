"""One in-process worker over the seeded shop workload: CPU per record and digests of what
it stored, to compare two builds (or the compiled and the pure core) on the same records.

    python -m bench.tools.worker_digest [--events 60000]

Prints the process CPU per record of `Worker.process` (5,000-record batches, one worker, a
real LMDB shard, as bench.tools.scale_profile) and sha256 prefixes of the views (read_views),
the seq rows and dedup log, the dedup index (each generation's ids, sorted) and the change
outbox records (seq, view, key, version, data). Two builds that store the same state print
the same digests. Run a build from another tree with ``PYTHONPATH=<tree>`` from that tree.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import uuid

import orjson

from aggregator.changes import outbox_records
from aggregator.config import load_config
from aggregator.protocol import create_segments
from aggregator.runtime import tune_gc
from aggregator.store import read_views
from aggregator.worker import Worker
from bench import workload as wl
from bench.micro.bench_batch import NoDeadLetters
from bench.tools.scale_profile import BATCH, batches


def digests(shard) -> dict[str, str]:
    seq = hashlib.sha256()
    with shard.env.begin() as txn:
        for name in ("seq", "dedup_log"):
            db = shard.db.get(name)
            if db is not None:
                for k, v in txn.cursor(db=db):
                    seq.update(name.encode() + bytes(k) + bytes(v))
    dedup = hashlib.sha256()
    for gen, hashes in shard.dedup_generations():
        ids = sorted(hashes[i:i + 16] for i in range(0, len(hashes), 16))
        dedup.update(gen.to_bytes(8, "little") + b"".join(ids))
    chg = hashlib.sha256()
    for r in outbox_records(shard.changes_after(0)):
        chg.update(repr(r[:5]).encode())  # not the commit's wall-clock ms
    return {"seq+dedup_log": seq.hexdigest()[:16], "dedup": dedup.hexdigest()[:16],
            "changes": chg.hexdigest()[:16]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=60_000)
    args = ap.parse_args(argv)
    msgs = batches(args.events)
    tmp = tempfile.mkdtemp(prefix="agg-digest-")
    cfg = load_config(wl.CONFIG_PATH, {"service.workers": 1, "service.data_dir": tmp + "/data",
                                       "service.ring_bytes": 8 << 20}, env={})
    prefix = f"agg-digest-{uuid.uuid4().hex[:8]}"
    segments = create_segments(prefix, 1, 8 << 20, 8 << 20)
    worker = Worker(cfg, 0, prefix)
    worker.boot()
    worker.dlq = NoDeadLetters()
    tune_gc()
    try:
        t = time.process_time()
        for m in msgs:
            worker.process([m], [])
        cpu = (time.process_time() - t) / (len(msgs) * BATCH) * 1e6
        d = digests(worker.shard)
    finally:
        producer = getattr(getattr(worker, "publisher", None), "producer", None)
        if producer is not None and hasattr(producer, "purge"):
            producer.purge()
        worker.close()
        worker.inbound.close()
        worker.ctl.close()
        segments.close()
    views = read_views(tmp + "/data", list(cfg.views))
    d["views"] = hashlib.sha256(orjson.dumps(views, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    print(f"CPU µs/record {cpu:.1f}; " + ", ".join(f"{k} {v}" for k, v in sorted(d.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
