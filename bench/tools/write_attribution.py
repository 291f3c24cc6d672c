"""Where a worker's disk writes come from: bytes and pages per record, table by table.

    python -m bench.tools.write_attribution --events 200000

One in-process `Worker` (bench.tools.scale_profile.in_process_worker: shop.toml, every slot,
a fresh shard, the shipped LMDB settings) applies the seeded workload in transactions of
`service.commit_max_bytes` of ring messages, as the commit window does under a backlog.
Measured: `write_bytes` of /proc/self/io per record (what the kernel charged for dirtied
page-cache pages, an env.sync at the end). Modelled, per transaction and table, from the
table's pages before the transaction (`txn.stat`) and what the transaction wrote to it:

- random-key tables (views, seq, the current dedup generation): u writes into a table of L
  leaf pages touch L * (1 - (1 - 1/L)**u) distinct leaves (each a 4 KiB page copied and
  written once per transaction), plus the branch pages above them (counted whole);
- append-only blobs (change events, forwarded-update outbox, dedup log, sequence log,
  format 4's dedup_live of the unsealed ids, format 5's document log): their bytes;
- ``seq``: written by the checkpoints of the sequence log (format 4), u = the streams a
  checkpoint writes; ``views`` likewise by the checkpoints of the document log (format 5),
  u = the documents a checkpoint writes.

The transactions that checkpoint the sequence log or the document log are also reported on
their own (their measured write_bytes and CPU, and the modelled seq / views pages they
dirty) next to the others.

The model's sum is printed next to the measured write_bytes: what the model leaves out is
LMDB's free-page list and meta pages, and the file system's own writes.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import msgpack

from bench.tools.write_path import _write_bytes

PAGE = 4096
RANDOM = ("views", "seq", "dedup")


def _pages(shard) -> dict[str, tuple[int, int]]:
    """(leaf + overflow pages, branch pages) of each table of interest; "dedup" = the dedup
    generations' databases together."""
    out = {}
    with shard.env.begin() as txn:
        for name in ("views", "seq"):
            st = txn.stat(shard.db[name])
            out[name] = (st["leaf_pages"] + st["overflow_pages"], st["branch_pages"])
        leaf = branch = 0
        for db in shard.dedup_pool.values():
            st = txn.stat(db)
            leaf, branch = leaf + st["leaf_pages"], branch + st["branch_pages"]
        out["dedup"] = (leaf, branch)
    return out


def run(events: int, seed: int, overrides: dict | None = None) -> dict:
    from aggregator import store
    from bench import workload as wl
    from bench.tools.scale_profile import in_process_worker, transactions

    msgs = wl.ring_messages(wl.generate(seed, events), 100, packed=True)
    writes: collections.Counter = collections.Counter()  # table -> writes this transaction
    blob_bytes: collections.Counter = collections.Counter()  # table -> bytes, whole run
    model: collections.Counter = collections.Counter()  # table -> modelled bytes, whole run

    def count(name: str, table: str, n_of, bytes_of=None):
        real = getattr(store.Batch, name)

        def counted(self, *a, **k):
            if table == "dedup" and getattr(self.shard, "live", None) is not None:
                # format 4: the unsealed ids are appended to dedup_live (18 bytes each)
                blob_bytes["dedup_live"] += 18 * len(a[0])
                blob_bytes["dedup"] += 16 * len(a[0])
                return real(self, *a, **k)
            writes[table] += n_of(a)
            if bytes_of is not None:
                blob_bytes[table] += bytes_of(a)
            return real(self, *a, **k)
        setattr(store.Batch, name, counted)

    saved = {n: getattr(store.Batch, n) for n in
             ("put_doc", "put_seqs", "checkpoint_seqs", "checkpoint_docs", "_write_doc_log",
              "mark_seen_many", "put_changes", "put_outbox", "commit")}
    docs_ckpt: list[int] = []  # documents written by each doc checkpoint of this transaction

    first_docs = [0]  # bytes of the documents of a checkpoint into an empty views table

    def checkpoint_docs(self):
        if not self.txn.stat(self._db["views"])["entries"]:
            docs = self._docp if self._doc_ckpt else {**self.shard.doc_pending, **self._docp}
            first_docs[0] = sum(len(k) + len(v) + 8 for k, v in docs.items() if v is not None)
        n = saved["checkpoint_docs"](self)
        writes["views"] += n
        docs_ckpt.append(n)
        return n
    store.Batch.checkpoint_docs = checkpoint_docs

    def write_doc_log(self):  # format 5: one appended record per commit, its entries' bytes
        blob_bytes["doc_log"] += self._doc_n
        return saved["_write_doc_log"](self)
    store.Batch._write_doc_log = write_doc_log
    count("put_seqs", "seq_log", lambda a: 0, lambda a: store.SEQ_LOG_ENTRY * len(a[0]))
    ckpt_rows: list[int] = []  # streams written by each checkpoint of this transaction

    def checkpoint(self):
        n = saved["checkpoint_seqs"](self)
        writes["seq"] += n
        ckpt_rows.append(n)
        return n
    store.Batch.checkpoint_seqs = checkpoint
    per_txn: list[tuple[bool, int, float, float, bool, float]] = []  # (seq checkpoint?,
    # write_bytes, cpu s, modelled seq bytes, doc checkpoint?, modelled views bytes)
    count("mark_seen_many", "dedup", lambda a: len(a[0]), lambda a: 16 * len(a[0]))
    count("put_changes", "changes", lambda a: 1, lambda a: len(a[2]))
    count("put_outbox", "outbox", lambda a: 1, lambda a: len(a[2]))
    try:
        with in_process_worker("wattr", overrides) as (worker, cfg, _tmp):
            shard = worker.shard
            before = _pages(shard)
            real_commit = saved["commit"]

            seq_model = [0.0]
            views_model = [0.0]

            def commit(self):
                nonlocal before
                real_commit(self)
                seq_model[0] = views_model[0] = 0.0
                for t in RANDOM:
                    leaves, branches = before[t]
                    u = writes.pop(t, 0)
                    if u and leaves:
                        touched = leaves * (1 - (1 - 1 / leaves) ** u) + branches
                        model[t] += touched * PAGE
                        if t == "seq":
                            seq_model[0] = touched * PAGE
                        elif t == "views":
                            views_model[0] = touched * PAGE
                    elif u and t == "seq":  # the first checkpoint: a new table, u rows
                        seq_model[0] = u * 40 / 0.75  # key, row, node header; fill
                        model[t] += seq_model[0]
                    elif u and t == "views":  # the first doc checkpoint: a new table
                        views_model[0] = first_docs[0] / 0.75  # node headers; fill
                        model[t] += views_model[0]
                writes.clear()
                before = _pages(shard)
            store.Batch.commit = commit
            txns = transactions(msgs, cfg.service.commit_max_bytes)
            peak = [0, 0, 0]  # the largest doc_pending: bytes in Python objects, documents,
            # bytes of their records
            untimed = 0.0
            wb0, c0 = _write_bytes(), time.process_time()
            for group in txns:
                ckpt_rows.clear()
                docs_ckpt.clear()
                w0, t0 = _write_bytes(), time.process_time()
                worker.process([msgpack.unpackb(m, raw=False, strict_map_key=False)
                                for m in group], [])
                per_txn.append((bool(ckpt_rows), _write_bytes() - w0,
                                time.process_time() - t0, seq_model[0], bool(docs_ckpt),
                                views_model[0]))
                t1 = time.process_time()  # the worker's map of logged documents (format 5)
                pend = getattr(shard, "doc_pending", {})
                size = sys.getsizeof(pend) + sum(sys.getsizeof(k) + sys.getsizeof(v)
                                                 for k, v in pend.items())
                if size > peak[0]:
                    peak[:] = [size, len(pend), sum(len(v or b"") for v in pend.values())]
                untimed += time.process_time() - t1
            shard.sync()
            measured, cpu = _write_bytes() - wb0, time.process_time() - c0 - untimed
            final = _pages(shard)
    finally:
        for n, f in saved.items():
            setattr(store.Batch, n, f)
    records = len(msgs) * 100
    for t in ("changes", "outbox", "seq_log", "doc_log"):
        model[t] = blob_bytes[t]
    model["dedup log (ids)"] = blob_bytes["dedup"]
    if blob_bytes["dedup_live"]:
        model["dedup_live (unsealed ids)"] = blob_bytes["dedup_live"]
    return {"records": records, "transactions": len(txns), "cpu_us": cpu / records * 1e6,
            "measured": measured / records, "model": {t: b / records for t, b in model.items()},
            "final_pages": final, "per_txn": per_txn,
            "checkpoint_rows": worker.cfg.gate.seq_checkpoint_rows,
            "doc_checkpoint_bytes": worker.cfg.service.doc_checkpoint_bytes,
            "doc_pending_peak": peak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", "-n", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--seq-checkpoint-rows", type=int, default=None,
                    help="gate.seq_checkpoint_rows (default: the config's)")
    ap.add_argument("--doc-checkpoint-bytes", type=int, default=None,
                    help="service.doc_checkpoint_bytes (default: the config's)")
    a = ap.parse_args(argv)
    overrides = {}
    if a.seq_checkpoint_rows is not None:
        overrides["gate.seq_checkpoint_rows"] = a.seq_checkpoint_rows
    if a.doc_checkpoint_bytes is not None:
        overrides["service.doc_checkpoint_bytes"] = a.doc_checkpoint_bytes
    r = run(a.events, a.seed, overrides or None)
    print(f"{r['records']:,} records in {r['transactions']} transactions, "
          f"{r['cpu_us']:.1f} µs CPU per record")
    print("\n| table | modelled bytes written per record |\n|---|---:|")
    for t, b in sorted(r["model"].items(), key=lambda kv: -kv[1]):
        print(f"| {t} | {b:,.0f} |")
    total = sum(r["model"].values())
    print(f"| **model, all** | **{total:,.0f}** |")
    print(f"| measured (/proc/self/io write_bytes) | {r['measured']:,.0f} |")
    print("\npages at the end (leaf+overflow, branch): "
          + ", ".join(f"{t} {lp:,}/{bp:,}" for t, (lp, bp) in r["final_pages"].items()))
    size, n, raw = r["doc_pending_peak"]
    if n:
        print(f"\nlogged documents in memory at most (Shard.doc_pending): {n:,} documents, "
              f"{raw / 2**20:.1f} MiB of records, {size / 2**20:.1f} MiB as Python objects")
    print(f"\ntransactions (gate.seq_checkpoint_rows = {r['checkpoint_rows']:,}, "
          f"service.doc_checkpoint_bytes = {r['doc_checkpoint_bytes']:,}):\n"
          "| | n | write_bytes mean / max (MiB) | CPU mean / max (ms) | seq pages (model) "
          "| views pages (model) |\n|---|---:|---:|---:|---:|---:|")
    for name, pick in (("with a doc checkpoint", lambda x: x[4]),
                       ("with a seq checkpoint", lambda x: x[0] and not x[4]),
                       ("the others", lambda x: not x[0] and not x[4])):
        xs = [x for x in r["per_txn"] if pick(x)]
        if not xs:
            continue
        wb, cpu, sm, vm = ([x[i] for x in xs] for i in (1, 2, 3, 5))
        print(f"| {name} | {len(xs)} | {sum(wb) / len(xs) / 2**20:.1f} / {max(wb) / 2**20:.1f} "
              f"| {sum(cpu) / len(xs) * 1e3:.0f} / {max(cpu) * 1e3:.0f} "
              f"| {sum(sm) / len(xs) / PAGE:,.0f} | {sum(vm) / len(xs) / PAGE:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
