"""The LMDB write path of one worker: WRITEMAP off/on × transaction size, on the same records.

    python -m bench.tools.write_path                          # 200k events, off/on × 2,4,8,16 MiB
    python -m bench.tools.write_path --events 100000 --sizes 2,16 --modes on

One in-process `Worker` (bench.tools.scale_profile.in_process_worker: shop.toml, every slot,
a fresh shard with fsync on, dead letters discarded) per variant, each in a process of its
own (fresh heap and RSS). The records are the seeded workload packed as supervisor ring
messages of 100 records; a transaction takes messages until it holds `commit_max_bytes` of
them, as the worker's commit window does under a backlog (`Worker._take`), and
`Worker.process` applies and commits it. Per variant:

- ``cpu_us``: process CPU (user + sys) per record of the apply-and-commit loop;
- ``sys_us``, ``faults_per_record``: the loop's system CPU and minor page faults per record
  (with WRITEMAP the first store to a page after a commit's msync is a write fault);
- ``commit_cpu_us``: CPU per record of the committing thread in `Batch.commit` (LMDB's
  commit: page copies, pwrite or msync, fsyncs' system time);
- ``commit_ms``: mean wall time of an LMDB commit (the worker's Slot.COMMIT_NS), and
  ``commit_cpu_pct``: the share of the loop's wall time spent committing;
- ``write_kb``: disk writes per record (``write_bytes`` of /proc/self/io, which the kernel
  charges when a page of the page cache is dirtied, whether by pwrite or a store through
  the map; an env.sync at the end) — the shard's boot excluded;
- ``rss_anon_mib`` (peak of RssAnon after each transaction: the heap, LMDB's malloc'd dirty
  pages included), ``hwm_mib`` (VmHWM: file pages of the map count too);
- ``file_mib``: data.mdb's last page (used size), ``alloc_mib``: its allocated blocks;
- digests of what was stored (bench.tools.worker_digest): equal within one transaction size
  whatever the mode (across sizes the dedup log's batch boundaries differ by design).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import msgpack
import orjson

MiB = 1 << 20
MSG_RECORDS = 100


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def run_variant(msgs_path: str, writemap: bool, max_bytes: int) -> dict:
    """One variant, in this process (the child)."""
    from aggregator.control import Slot
    from aggregator.store import read_views
    from bench.tools.scale_profile import in_process_worker, transactions
    from bench.tools.worker_digest import digests

    with open(msgs_path, "rb") as f:
        packed = msgpack.unpackb(f.read(), raw=False)
    txns = transactions(packed, max_bytes)
    records = len(packed) * MSG_RECORDS
    overrides = {"service.lmdb_writemap": writemap, "service.commit_max_bytes": max_bytes}
    from aggregator import store

    commit_cpu = [0.0]
    real_commit = store.Batch.commit

    def timed_commit(self):  # the committing thread's CPU (the fsyncs' system time included)
        t = time.thread_time()
        try:
            real_commit(self)
        finally:
            commit_cpu[0] += time.thread_time() - t

    store.Batch.commit = timed_commit
    with in_process_worker("wpath", overrides) as (worker, cfg, tmp):
        shard = worker.shard
        ctl, me = worker.ctl, worker.index
        ns0, n0 = ctl.get(me, Slot.COMMIT_NS), ctl.get(me, Slot.COMMITS)
        wb0 = _write_bytes()
        peak_anon = 0
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0, t0 = time.process_time(), time.monotonic()
        for group in txns:
            worker.process([msgpack.unpackb(m, raw=False, strict_map_key=False)
                            for m in group], [])
            peak_anon = max(peak_anon, _status("RssAnon"))
        cpu, wall = time.process_time() - c0, time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        shard.sync()
        wb = _write_bytes() - wb0
        commit_ns = ctl.get(me, Slot.COMMIT_NS) - ns0
        commits = max(ctl.get(me, Slot.COMMITS) - n0, 1)
        info = shard.env.info()
        psize = shard.env.stat()["psize"]
        st = os.stat(shard.path / "data.mdb")
        d = digests(shard)
        hwm = _status("VmHWM")
        txn_records = records / len(txns)
    views = read_views(tmp + "/data", list(cfg.views))
    d["views"] = hashlib.sha256(orjson.dumps(views, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    shutil.rmtree(tmp, ignore_errors=True)  # with WRITEMAP the file holds its whole map
    return {"writemap": writemap, "max_mib": max_bytes / MiB, "records": records,
            "txns": len(txns), "records_per_txn": round(txn_records),
            "cpu_us": round(cpu / records * 1e6, 1),
            "commit_cpu_us": round(commit_cpu[0] / records * 1e6, 2),
            "sys_us": round((r1.ru_stime - r0.ru_stime) / records * 1e6, 1),
            "faults_per_record": round((r1.ru_minflt - r0.ru_minflt) / records, 2),
            "commit_ms": round(commit_ns / commits / 1e6, 1),
            "commit_wall_pct": round(commit_ns / 1e9 / wall * 100, 1),
            "write_kb": round(wb / records / 1000, 2),
            "rss_anon_mib": round(peak_anon / MiB), "hwm_mib": round(hwm / MiB),
            "file_mib": round((info["last_pgno"] + 1) * psize / MiB),
            "alloc_mib": round(st.st_blocks * 512 / MiB), "digests": d}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", "-n", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--sizes", default="2,4,8,16", help="commit_max_bytes in MiB")
    ap.add_argument("--modes", default="off,on", help="writemap off/on")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each variant (interleaved)")
    ap.add_argument("--child", nargs=3, metavar=("MSGS", "WRITEMAP", "BYTES"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        row = run_variant(a.child[0], a.child[1] == "on", int(a.child[2]))
        print(json.dumps(row), flush=True)
        return 0
    from bench import workload as wl

    msgs = wl.ring_messages(wl.generate(a.seed, a.events), MSG_RECORDS, packed=True)
    rows = []
    with tempfile.NamedTemporaryFile(prefix="agg-wpath-", suffix=".msgs") as f:
        f.write(msgpack.packb(msgs, use_bin_type=True))
        f.flush()
        for size in [s for _ in range(a.repeat) for s in a.sizes.split(",")]:
            for mode in a.modes.split(","):
                out = subprocess.run(
                    [sys.executable, "-m", "bench.tools.write_path", "--child", f.name, mode,
                     str(int(float(size) * MiB))], check=True, capture_output=True, text=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    keys = ("cpu_us", "sys_us", "faults_per_record", "commit_cpu_us", "commit_ms",
            "commit_wall_pct", "write_kb", "rss_anon_mib", "hwm_mib", "file_mib", "alloc_mib")
    print("\n| writemap | MiB/txn | records/txn | " + " | ".join(keys) + " | digests |")
    print("|---" * (len(keys) + 4) + "|")
    for r in rows:
        same = [x for x in rows if x["max_mib"] == r["max_mib"]]
        ok = "same" if all(x["digests"] == r["digests"] for x in same) else "DIFFER"
        print(f"| {'on' if r['writemap'] else 'off'} | {r['max_mib']:g} | "
              f"{r['records_per_txn']} | " + " | ".join(str(r[k]) for k in keys) + f" | {ok} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
