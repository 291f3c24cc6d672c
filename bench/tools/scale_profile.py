"""Does a worker's cost per record grow with its state? One in-process `Worker` on a real
LMDB shard is fed the seeded shop workload in 5,000-record batches; CPU per record is printed
for the first fifth, the middle three fifths and the last fifth, and the last fifth is
profiled (cProfile, top functions by own time).

    python -m bench.tools.scale_profile [--events 400000] [--top 22]

Session 6: 36 → 48 → 85 µs/record at 400k events (the last under cProfile); in the last fifth the
LMDB commit, document put/unpack and orjson of whole documents lead — the documents grow
(collections of upserts) and every update re-encodes them whole.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from aggregator.config import load_config
from aggregator.protocol import create_segments
from aggregator.runtime import tune_gc
from aggregator.worker import Worker
from bench import workload as wl
from bench.micro.bench_batch import NoDeadLetters

BATCH = 5000


def batches(events: int) -> list:
    """Decoded supervisor messages of BATCH records each, as `Worker.process` takes them."""
    return wl.ring_messages(wl.generate(11, events), BATCH)


def transactions(msgs: list, max_bytes: int) -> list[list]:
    """Ring messages grouped as a worker's commit window groups them under load: up to
    `max_bytes` (``service.commit_max_bytes``) of messages per transaction."""
    txns, cur, size = [], [], 0
    for m in msgs:
        cur.append(m)
        size += len(m)
        if size >= max_bytes:
            txns.append(cur)
            cur, size = [], 0
    if cur:
        txns.append(cur)
    return txns


@contextmanager
def in_process_worker(tag: str, overrides: dict | None = None, keep: bool = False
                      ) -> Iterator[tuple[Worker, object, str]]:
    """(worker, config, temp dir): one booted `Worker` of shop.toml owning every slot, on a
    fresh shard in a temp dir, dead letters discarded, the collector tuned as in a worker
    process; closed afterwards (the change producer purged) and the temp dir removed (a
    WRITEMAP shard's file takes its whole map on disk) unless `keep`, where the caller
    removes it. `overrides`: more config."""
    tmp = tempfile.mkdtemp(prefix=f"agg-{tag}-")
    cfg = load_config(wl.CONFIG_PATH, {"service.workers": 1, "service.data_dir": tmp + "/data",
                                       "service.ring_bytes": 8 << 20, **(overrides or {})},
                      env={})
    prefix = f"agg-{tag}-{uuid.uuid4().hex[:8]}"
    segments = create_segments(prefix, 1, 8 << 20, 8 << 20)
    worker = Worker(cfg, 0, prefix)
    worker.boot()
    worker.dlq = NoDeadLetters()
    tune_gc()
    try:
        yield worker, cfg, tmp
    finally:
        producer = getattr(getattr(worker, "publisher", None), "producer", None)
        if producer is not None and hasattr(producer, "purge"):
            producer.purge()
        worker.close()
        worker.inbound.close()
        worker.ctl.close()
        segments.close()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args(argv)
    msgs = batches(args.events)
    with in_process_worker("scale") as (worker, _, _tmp):
        return _profile(worker, msgs, args.top)


def _profile(worker: Worker, msgs: list, top: int) -> int:
    def run(part: list) -> float:
        t = time.process_time()
        for m in part:
            worker.process([m], [])
        return (time.process_time() - t) / (len(part) * BATCH) * 1e6

    k = len(msgs)
    first = run(msgs[:k // 5])
    middle = run(msgs[k // 5:4 * k // 5])
    prof = cProfile.Profile()
    prof.enable()
    last = run(msgs[4 * k // 5:])
    prof.disable()
    print(f"CPU µs/record: first fifth {first:.1f}, middle {middle:.1f}, "
          f"last fifth {last:.1f} (profiled: cProfile adds its own cost)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
