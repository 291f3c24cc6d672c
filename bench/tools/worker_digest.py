"""One in-process worker over the seeded shop workload: CPU per record and digests of what
it stored, to compare two builds (or the compiled and the pure core) on the same records.

    python -m bench.tools.worker_digest [--events 60000]

Prints the process CPU per record of `Worker.process` (5,000-record frames messages as the
supervisor writes them, each decoded inside the timed region as the worker's `_take` does:
`frames.decode_lazy`; one worker owning every slot, a real LMDB shard, change events on, as
bench.tools.scale_profile) and sha256 prefixes of the views (read_views), every stored
record (version, document, freshness), the seq rows (with the sequence log overlaid: the
same digest whether a row was checkpointed or not) and dedup log, the dedup index (each
generation's ids, sorted) and the change outbox records (seq, view, key, version, data).
Two builds that store the same state print the same digests. Run a build from another tree
with ``PYTHONPATH=<tree>`` from that tree; alternate the two trees a few times for an A/B
of the CPU figure (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time

import orjson

from aggregator.changes import outbox_records
from aggregator.config import load_config
from aggregator.store import read_views
from bench import workload as wl
from bench.stages.worker_stage import encode_rounds
from bench.tools.scale_profile import BATCH, in_process_worker

try:
    from aggregator.frames import decode_lazy as decode  # the worker's own (`_take`)
except ImportError:  # a build from before it (an A/B against an older tree)
    from aggregator.frames import decode


def digests(shard) -> dict[str, str]:
    seq = hashlib.sha256()
    for k, v in shard.seq_rows():  # seq with the sequence log overlaid (format 4)
        seq.update(b"seq" + k + v)
    with shard.env.begin() as txn:
        db = shard.db.get("dedup_log")
        if db is not None:
            for k, v in txn.cursor(db=db):
                seq.update(b"dedup_log" + bytes(k) + bytes(v))
    dedup = hashlib.sha256()
    for gen, hashes in shard.dedup_generations():
        ids = sorted(hashes[i:i + 16] for i in range(0, len(hashes), 16))
        dedup.update(gen.to_bytes(8, "little") + b"".join(ids))
    records = hashlib.sha256()  # every stored record: version, document, freshness
    for view, key, rec in shard.documents(shard.get_meta("views")):
        records.update(repr((view, key, rec["v"], rec["d"], sorted(rec["s"].items())))
                       .encode())
    chg = hashlib.sha256()
    for r in outbox_records(shard.changes_after(0)):
        chg.update(repr(r[:5]).encode())  # not the commit's wall-clock ms
    return {"seq+dedup_log": seq.hexdigest()[:16], "dedup": dedup.hexdigest()[:16],
            "changes": chg.hexdigest()[:16], "records": records.hexdigest()[:16]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--doc-checkpoint-bytes", type=int, default=None,
                    help="service.doc_checkpoint_bytes (default: the config's): a small one "
                         "checkpoints the document log within the run")
    args = ap.parse_args(argv)
    topics = load_config(wl.CONFIG_PATH, {}, env={}).topics()
    records = wl.generate(11, args.events).records
    (msgs,) = encode_rounds(records, 1, topics, BATCH, 1 << 30)  # one message per round
    overrides = None if args.doc_checkpoint_bytes is None else \
        {"service.doc_checkpoint_bytes": args.doc_checkpoint_bytes}
    with in_process_worker("digest", overrides, keep=True) as (worker, cfg, tmp):
        worker.process([decode(msgs[0])], [])  # warms the shard and the caches
        t = time.process_time()
        for m in msgs[1:]:
            worker.process([decode(m)], [])
        cpu = (time.process_time() - t) / max(len(records) - BATCH, 1) * 1e6
        d = digests(worker.shard)
    views = read_views(tmp + "/data", list(cfg.views))
    shutil.rmtree(tmp, ignore_errors=True)  # a WRITEMAP shard's file takes its whole map
    d["views"] = hashlib.sha256(orjson.dumps(views, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    print(f"CPU µs/record {cpu:.2f} (records after the first message); "
          + ", ".join(f"{k} {v}" for k, v in sorted(d.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
