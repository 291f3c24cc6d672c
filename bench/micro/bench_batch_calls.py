"""The per-batch calls of the worker's stages, compiled against their references: CPU per
record of each, on the same batch, in one run.

    python -m bench.micro.bench_batch_calls [--n 5000] [--repeat 200]

- ``pack_blob``: a commit's change rows ((doc key, view id, key, version, ~370 B JSON
  data), as LinksStage._write_changes passes them) into one outbox blob — changes.pack_blob_ref
  (the reference: struct per row, the `[r[1:] for r in rows]` slice it replaces) vs
  _publish.pack_blob;
- ``dedup_keys``: dedup keys of a batch (slot prefix + identity hash) and the bloom input —
  `routing.identity_hash` per event (the former DedupStage) vs _core.dedup_keys;
- ``put_seqs``: a commit's dirty seq rows, `Batch.write_seqs` (one putmulti at random keys
  of ``seq``: what format 3 did per commit, and cluster mode still does) vs `Batch.put_seqs`
  (format 4: one appended ``seq_log`` record; its checkpoints are not in this figure);
- ``gate_batch``: the gate stage's inputs (gate keys, sequences, strict modes, the streams'
  topic/partition, the first topic of each key) — built event by event as the former
  GateStage._gate_apply did vs _core.gate_batch;
- ``mark_seen``: n new ids into a dedup generation of a real LMDB shard, one transaction
  (aborted) per round — `Batch.mark_seen` per id vs `Batch.mark_seen_many`.

Prints µs per record of the per-record code and of the batch call (process CPU time, best
of --repeat rounds after a warm-up).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from aggregator import changes

try:
    from aggregator import _core, _publish
except ImportError:  # pragma: no cover - the compiled core is required for this bench
    _core = _publish = None


def best(fn, repeat: int) -> float:
    fn()
    t = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        t.append(time.process_time() - t0)
    return min(t)


def change_rows(n: int, rnd: random.Random) -> list[tuple]:
    rows = []
    for i in range(n):
        key = f"order-{rnd.randrange(100000)}"
        data = None if i % 50 == 0 else b'{"x":' + os.urandom(180).hex().encode() + b"}"
        rows.append((b"\x00\x01\x00" + key.encode(), i % 3, key, rnd.randrange(1, 1000), data))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--only", default="",
                    help="comma-separated: pack_blob,dedup_keys,mark_seen,put_seqs,gate_batch")
    a = ap.parse_args(argv)
    rnd = random.Random(7)
    n = a.n
    only = set(filter(None, a.only.split(",")))
    res = []

    def run(name, ref, comp):
        if only and name.split(" ")[0] not in only:
            return
        r = best(ref, a.repeat) / n * 1e6
        c = best(comp, a.repeat) / n * 1e6
        res.append((name, r, c))
        print(f"{name:<28} per record {r:7.3f} µs   batch call {c:7.3f} µs   "
              f"x{r / c:5.1f}", flush=True)

    rows = change_rows(n, rnd)
    run("pack_blob",
        lambda: changes.pack_blob_ref([r[1:] for r in rows], 123, True),
        lambda: _publish.pack_blob(rows, 123, True, 1))
    for extra in BENCHES:
        extra(run, n, rnd, a.repeat)


class _Ev:
    __slots__ = ("source", "id")

    def __init__(self, source, event_id):
        self.source, self.id = source, event_id


def bench_dedup(run, n, rnd, repeat):
    """Dedup keys and bloom input of a batch; then marking the batch's ids in a shard."""
    from aggregator.protocol import REC_SLOT
    from aggregator.routing import identity_hash, slot_prefix
    from aggregator.store import Shard

    events = []
    for _ in range(n):
        rec = [None] * (REC_SLOT + 1)
        rec[REC_SLOT] = rnd.randrange(4096)
        events.append((_Ev("https://shop.example/orders", f"ev-{rnd.getrandbits(64):x}"), rec))

    def per_event():  # the former DedupStage._dedup
        slots = [rec[REC_SLOT] for _, rec in events]
        hashes = [identity_hash(ev.source, ev.id) for ev, _ in events]
        joined = b"".join(hashes)
        return [slot_prefix(slots[i]) + hashes[i] for i in range(len(events))], joined

    run("dedup_keys", per_event, lambda: _core.dedup_keys(events, REC_SLOT))
    skeys = _core.dedup_keys(events, REC_SLOT)[0]
    with tempfile.TemporaryDirectory() as tmp:
        shard = Shard(Path(tmp) / "shard", map_size=1 << 30)
        try:
            b = shard.begin()  # a dedup index of 20 batches already
            for _ in range(20):
                b.mark_seen_many([k[:2] + os.urandom(16) for k in skeys], 0)
            b.commit()

            def one_by_one():
                b = shard.begin()
                for k in skeys:
                    b.mark_seen(k, 0)
                b.txn.abort()

            def many():
                b = shard.begin()
                b.mark_seen_many(skeys, 0)
                b.txn.abort()

            run("mark_seen", one_by_one, many)

            rows = [(k, rnd.randrange(1, 10**6), "orders", rnd.randrange(8)) for k in skeys]

            def seq_direct():  # format 3's Batch.put_seqs, now Batch.write_seqs
                b = shard.begin()
                b.write_seqs(rows)
                b.txn.abort()

            def seq_many():
                b = shard.begin()
                b.put_seqs(rows)
                b.txn.abort()

            run("put_seqs", seq_direct, seq_many)
        finally:
            shard.close()


class _SeqEv:
    __slots__ = ("source", "partitionkey", "sequence")

    def __init__(self, source, pk, sequence):
        self.source, self.partitionkey, self.sequence = source, pk, sequence


def bench_gate(run, n, rnd, repeat):
    """The gate stage's per-event inputs: keys, sequences, modes, seqpart."""
    from aggregator.protocol import REC_PARTITION, REC_SLOT, REC_TOPIC

    topics, strict = ["orders", "customers", "products"], [False, True, False]
    kept = []
    for _ in range(n):
        rec = [None] * (max(REC_SLOT, REC_TOPIC, REC_PARTITION) + 1)
        rec[REC_SLOT], rec[REC_TOPIC], rec[REC_PARTITION] = rnd.randrange(4096), \
            rnd.randrange(3), rnd.randrange(8)
        kept.append((_SeqEv("https://shop.example/orders", f"order-{rnd.randrange(20000)}",
                            rnd.randrange(1, 100)), rec))

    def per_event():  # the former GateStage._gate_apply up to SequenceGate.decide
        gated = [(i, ev, rec) for i, (ev, rec) in enumerate(kept) if ev.sequence is not None]
        gkeys = _core.gate_keys([rec[REC_SLOT] for _, _, rec in gated],
                                [ev.source for _, ev, _ in gated],
                                [ev.partitionkey for _, ev, _ in gated])
        seqpart = {}
        for g, (_, ev, rec) in zip(gkeys, gated):
            seqpart[g] = (topics[rec[REC_TOPIC]], rec[REC_PARTITION])
        tix = [rec[REC_TOPIC] for _, _, rec in gated]
        modes = bytes(strict[rec[REC_TOPIC]] for _, _, rec in gated)
        seqs = [ev.sequence for _, ev, _ in gated]
        codes = bytearray(len(kept))
        for j, (i, _, _) in enumerate(gated):
            codes[i] = 0
        first_ti = {}
        for g, ti in zip(gkeys, tix):
            first_ti.setdefault(g, ti)
        return {gated[j][0]: gkeys[j] for j in range(len(gated))}, seqs, modes

    def batch():
        at, gkeys, seqs, tix, modes, streams = _core.gate_batch(
            kept, REC_SLOT, REC_TOPIC, REC_PARTITION, topics, strict)
        seqpart = {}
        seqpart.update(zip(gkeys, streams))
        first_ti = dict(zip(reversed(gkeys), reversed(tix)))
        return first_ti, seqs, modes

    run("gate_batch", per_event, batch)


BENCHES: list = [bench_dedup, bench_gate]

if __name__ == "__main__":
    main()
