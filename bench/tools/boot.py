"""A replacement worker: boot time and time to its first commit, against the dedup window.

    python -m bench.tools.boot                  # windows of 0, 250k, 500k, 1M, 2M ids; 3 boots
    python -m bench.tools.boot --sizes 0,1000000 --repeat 5 --out bench/results/boot-quick

What a worker killed in a crash loop goes through, without a broker: a shard whose dedup
index holds N ids (written as the worker writes them, in generations of
dedup.bloom_capacity; meta ``bloom_generation`` as the worker leaves it), then, as the
supervisor does after a kill, its inbound ring refilled with the records it had not
committed (`--records`, fresh events) and `worker.worker_main` spawned in a new process. The
clock runs from the spawn (`Process.start`) to the boot (the worker's epoch in the control
block: what the supervisor waits for) and to its first commit (its COMMITS counter). Each
boot runs on a fresh copy of the prepared shard. When the worker can save its bloom filter
(`Worker.save_bloom`), the prepared shard gets the file a running worker leaves, and the
first commit after it too ("snapshot" rows); `--no-snapshot` measures the full rebuild.

Writes bench/results/boot.json and boot.md (median and max per size).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def _config(data_dir: Path, capacity: int):
    from aggregator.config import load_config

    return load_config(None, {"service.data_dir": str(data_dir), "service.workers": 1,
                              "dedup.bloom_capacity": capacity}, env={})


def prepare(data_dir: Path, ids: int, capacity: int, generations: int,
            seal: bool = True) -> None:
    """A shard with `ids` dedup ids over consecutive generations (the newest partly full),
    as the worker writes them (store.py: the dedup index of the build that runs this); with
    `seal`, each generation sealed once the next one starts (a running worker seals it long
    before the next one fills), else every id stays where it was first written."""
    from aggregator.store import Shard, shard_path

    cfg = _config(data_dir, capacity)
    shard = Shard(shard_path(data_dir, 0), map_size=cfg.service.lmdb_map_size,
                  max_map_size=cfg.service.lmdb_max_map_size, sync=False)
    try:
        shard.check_layout(shard=0, workers=1, slots=_slots())
        if hasattr(shard, "open_live_dedup"):  # format 4: unsealed ids in dedup_live
            shard.open_live_dedup()
        rng = os.urandom
        gen = 0
        left = ids
        while left > 0:
            n = min(left, capacity)
            done = 0
            while done < n:
                k = min(50_000, n - done)
                while True:
                    b = shard.begin()
                    try:
                        for _ in range(k):
                            b.mark_seen(rng(18), gen)
                        b.commit()
                        break
                    except Exception as e:  # noqa: BLE001 - MapFullError: grow and redo
                        b.abort()
                        if "MDB_MAP_FULL" not in str(e) or not shard.grow():
                            raise
                done += k
            left -= n
            if left > 0 or n == capacity:
                gen += 1
                if seal:  # the generations before the current one sealed, as a worker does
                    _seal(shard, gen)
        shard.put_meta(bloom_generation=gen)
        shard.env.sync(True)
    finally:
        shard.close()


def _seal(shard, current: int) -> None:
    while True:
        b = shard.begin()
        try:
            moved = b.seal_dedup(current, 200_000)
            b.commit()
        except Exception as e:  # noqa: BLE001 - MapFullError: grow and redo
            b.abort()
            if "MDB_MAP_FULL" not in str(e) or not shard.grow():
                raise
            continue
        if not moved and all(e[1] >= 1 << 16 for e in shard.dedup_index if e[0] < current):
            return


def _slots() -> int:
    from aggregator.routing import SLOTS

    return SLOTS


def ring_messages(cfg, records: int, seed: int = 5) -> list[bytes]:
    """`records` fresh records as the supervisor packs them (rounds of 500, each with the
    through-offsets of its partitions)."""
    from aggregator.devtools import simulate
    from aggregator.envelope import routing_key
    from aggregator.routing import slot_of

    w = simulate.generate(seed, records)
    tindex = {t: i for i, t in enumerate(cfg.topics())}
    nxt: dict = {}
    out = []
    recs = []
    for topic, key, value, headers in w.records[:records]:
        ti = tindex[topic]
        part = slot_of(key) % 4 if key else 0
        off = nxt.get((ti, part), 0)
        nxt[(ti, part)] = off + 1
        rk = routing_key(value, headers, key)
        recs.append([ti, part, off, key, value, [[k, v] for k, v in headers], 1000 + off,
                     slot_of(rk) if rk is not None else 0])
    for bid, i in enumerate(range(0, len(recs), 500), 1):
        chunk = recs[i:i + 500]
        thr: dict = {}
        for r in chunk:
            thr[(r[0], r[1])] = max(thr.get((r[0], r[1]), -1), r[2])
        out.append(msgpack.packb([1, bid, [[t, p, o] for (t, p), o in thr.items()], chunk],
                                 use_bin_type=True))
    return out


def leave_snapshot(data_dir: Path, capacity: int) -> bool:
    """Boot a worker in-process and save its bloom filter as a running one would (False if
    this build cannot)."""
    from aggregator import worker as worker_mod

    if not hasattr(worker_mod.Worker, "save_bloom"):
        return False
    cfg = _config(data_dir, capacity)
    with Segments(cfg) as seg:
        w = worker_mod.Worker(cfg, 0, seg.prefix)
        w.boot()
        try:
            w.save_bloom()
        finally:
            w.close()
    return True


class Segments:
    """The control block, histogram and ring a supervisor creates for one worker."""

    def __init__(self, cfg):
        from aggregator.protocol import create_segments

        self.prefix = "aggboot-" + uuid.uuid4().hex[:10]
        self.segments = create_segments(self.prefix, 1, cfg.service.ring_bytes, 0)
        self.ctl = self.segments.ctl
        self.ring = self.segments.inbound[0]

    def __enter__(self) -> Segments:
        return self

    def __exit__(self, *exc) -> None:
        self.segments.close()


def one_boot(prepared: Path, work: Path, capacity: int, msgs: list[bytes]) -> dict:
    """Spawn a worker on a fresh copy of `prepared`: seconds to boot and to first commit."""
    from aggregator.control import Slot
    from aggregator.worker_process import worker_main

    if work.exists():
        shutil.rmtree(work)
    subprocess.run(["cp", "-r", "--reflink=auto", str(prepared), str(work)], check=True)
    for f in (work / "shard-0").iterdir():  # the copy's dirty pages are not the boot's to write
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    cfg = _config(work, capacity)
    with Segments(cfg) as seg:
        for m in msgs:
            if not seg.ring.try_put(m):
                break
        ctx = multiprocessing.get_context("spawn")
        p = ctx.Process(target=worker_main, args=(cfg, 0, seg.prefix, 30))
        t0 = time.monotonic()
        p.start()
        booted = first = None
        try:
            while first is None:
                now = time.monotonic()
                if booted is None and seg.ctl.get(0, Slot.EPOCH) >= 1:
                    booted = now - t0
                if booted is not None and seg.ctl.get(0, Slot.COMMITS) >= 1:
                    first = now - t0
                    records = seg.ctl.get(0, Slot.RECORDS)  # of the first commit
                if not p.is_alive():
                    raise RuntimeError(f"worker exited with {p.exitcode}")
                if now - t0 > 120:
                    raise RuntimeError("no first commit within 120 s")
                time.sleep(0.002)
        finally:
            p.kill()
            p.join(10)
    return {"boot_s": round(booted, 3), "first_commit_s": round(first, 3),
            "first_batch_records": records}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tools.boot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,250000,500000,1000000,2000000",
                    help="dedup ids in the shard, comma-separated")
    ap.add_argument("--capacity", type=int, default=1_000_000,
                    help="dedup.bloom_capacity (ids per generation; default 1M as config)")
    ap.add_argument("--records", type=int, default=20_000,
                    help="records waiting in the ring at the boot (default 20,000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-snapshot", action="store_true",
                    help="do not leave a saved bloom filter in the shard")
    ap.add_argument("--out", type=Path, default=RESULTS / "boot",
                    help="output path without suffix (default bench/results/boot)")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    from aggregator import core

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-boot-"))
    try:
        msgs = ring_messages(_config(tmp / "x", args.capacity), args.records)
        for n in sizes:
            prepared = tmp / f"prepared-{n}"
            t = time.monotonic()
            prepare(prepared, n, args.capacity, 4)
            prep_s = time.monotonic() - t
            snap = False if args.no_snapshot else leave_snapshot(prepared, args.capacity)
            runs = [one_boot(prepared, tmp / "work", args.capacity, msgs)
                    for _ in range(args.repeat)]
            row = {"dedup_ids": n, "snapshot": snap, "runs": runs,
                   "boot_s_median": statistics.median(r["boot_s"] for r in runs),
                   "boot_s_max": max(r["boot_s"] for r in runs),
                   "first_commit_s_median": statistics.median(r["first_commit_s"]
                                                              for r in runs),
                   "first_commit_s_max": max(r["first_commit_s"] for r in runs),
                   "first_batch_records": runs[0]["first_batch_records"],
                   "prepare_s": round(prep_s, 1)}
            rows.append(row)
            print(f"{n:>9,} ids{' (snapshot)' if snap else ''}: boot "
                  f"{row['boot_s_median']:.3f} s (max {row['boot_s_max']:.3f}), first commit "
                  f"{row['first_commit_s_median']:.3f} s (max {row['first_commit_s_max']:.3f}),"
                  f" first batch {row['first_batch_records']} records", flush=True)
            shutil.rmtree(prepared)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"core": core.IMPLEMENTATION, "python": platform.python_version(),
            "cpus": os.cpu_count(), "capacity": args.capacity, "records": args.records,
            "repeat": args.repeat, "commit": _git_head(), "argv": sys.argv[1:]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                        indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(rows, meta))
    print(table(rows, meta))
    return 0


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"# Worker boot and first commit vs dedup window ({meta['commit']}, "
             f"{meta['core']} core, {meta['records']:,} records waiting, "
             f"{meta['repeat']} boots each)", "",
             "| dedup ids | bloom | boot s (median / max) | first commit s (median / max) "
             "| first batch |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dedup_ids']:,} | {'snapshot' if r['snapshot'] else 'rebuilt'} "
                     f"| {r['boot_s_median']:.3f} / {r['boot_s_max']:.3f} "
                     f"| {r['first_commit_s_median']:.3f} / {r['first_commit_s_max']:.3f} "
                     f"| {r['first_batch_records']:,} |")
    return "\n".join(lines) + "\n"


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
