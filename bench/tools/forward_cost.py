"""What one forwarded view update costs, by part, and what two workers cost against one.

    python -m bench.tools.forward_cost [--events 30000] [--rounds 4]
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/x/fc.%p \\
        python -m bench.tools.forward_cost --callgrind [--part decode]   # instructions

Two real `Worker` objects in this process (shop.toml, ``workers = 2``, real LMDB shards and
peer rings) are fed the seeded shop workload in 5,000-record rounds split by the real
routing, as bench/micro/bench_forward.py feeds them; what worker 0 forwards to worker 1 is
captured (the update lists `stages/route.py` makes). Then the updates of the last
`--rounds` rounds go through the forwarding path again, one part at a time over all of
them, with fresh link sequence numbers, on the warm shards:

1. encode: `LinksStage._forward_messages` (forwards.encode: format 2 messages);
2. outbox: the messages put into worker 0's outbox in one transaction, committed;
3. ring: each message put into the peer ring and taken by worker 1 (`get_many`);
4. decode: `Worker._decode_peer` (forwards.decode, the projected data);
5. apply: `Worker.process([], messages)`: one transaction applying every update (link
   seq check, the merge into the owner's documents, the documents and link seqs written,
   the commit, acknowledging the link seq in the control block);
6. ack: worker 0 prunes its outbox up to what worker 1 acknowledged, one transaction.

Each part is printed per forwarded update: CPU µs (this thread's time, best of
`--repeat`) or, with ``--callgrind`` under valgrind, instructions: the parts (or the one
`--part`) are instrumented alone (``callgrind_control -i on/off``) and valgrind's output
file is read with ``callgrind_annotate``: its total over the updates printed, and,
inclusive, e.g. ``_route._apply_local`` for the merge inside "apply" (a local update pays
it too), ``_forwards.decode``, ``_forwards.encode_message``.
"""

from __future__ import annotations

import argparse
import operator
import os
import shutil
import subprocess
import tempfile
import time
import uuid

from aggregator import forwards
from aggregator.config import load_config
from aggregator.protocol import create_segments
from aggregator.runtime import tune_gc
from aggregator.worker import Worker
from bench import workload as wl
from bench.micro.bench_batch import NoDeadLetters
from bench.micro.bench_forward import split

PARTS = ("encode", "outbox", "ring", "decode", "apply", "ack")


class Pair:
    """Two booted workers of one data dir in this process (closed by `close`)."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="agg-fwdcost-")
        cfg = load_config(wl.CONFIG_PATH, {"service.workers": 2,
                                           "service.data_dir": self.tmp + "/data",
                                           "service.ring_bytes": 32 << 20}, env={})
        prefix = f"agg-fwdcost-{uuid.uuid4().hex[:8]}"
        self.segments = create_segments(prefix, 2, 32 << 20, 16 << 20)
        self.w = []
        for i in range(2):
            w = Worker(cfg, i, prefix)
            w.boot()
            w.dlq = NoDeadLetters()
            self.w.append(w)
        tune_gc()
        self.captured: list[list] = []  # worker 0's updates for worker 1, per transaction
        w0 = self.w[0]
        fm = w0._forward_messages

        def capture(owner, last_seq, updates):
            if owner == 1:
                self.captured.append(list(updates))
            return fm(owner, last_seq, updates)

        w0._forward_messages = capture
        self.forward_messages = fm

    def step(self, per: list | None) -> None:
        """Each worker takes what its peer sent and applies it with its records."""
        for i, w in enumerate(self.w):
            peers = []
            for r in w.peer_in.values():
                peers.extend(r.get_many(1 << 20))
            if per is not None or peers:
                w._process_ring([per[i]] if per is not None else [], peers)

    def quiesce(self) -> None:
        for _ in range(4):
            self.step(None)

    def close(self) -> None:
        for w in self.w:
            producer = getattr(getattr(w, "publisher", None), "producer", None)
            if producer is not None and hasattr(producer, "purge"):
                producer.purge()
            w.close()
        self.segments.close()
        shutil.rmtree(self.tmp, ignore_errors=True)  # a WRITEMAP shard takes its whole map


def run_parts(pair: Pair, batches: list[list], clock) -> tuple[dict, int]:
    """The six parts over `batches` (lists of updates), each measured by `clock` (called
    with the part's name after it); returns ({part: clock's result}, updates)."""
    w0, w1 = pair.w
    out: dict = {}
    n = sum(len(b) for b in batches)
    st: dict = {"seq": w0.link_out[1], "first": w0.link_out[1] + 1}
    call = operator.call

    def encode():
        msgs, seq = [], st["seq"]
        for b in batches:
            m = pair.forward_messages(1, seq, b)
            msgs.extend(m)
            seq += len(m)
        st["msgs"], st["seq"] = msgs, seq

    def outbox():
        batch = w0.shard.begin()
        for k, m in enumerate(st["msgs"]):
            batch.put_outbox(1, st["first"] + k, m)
        batch.commit()

    def ring():
        out_ring, inbound = w0.peer_out[1], w1.peer_in[0]
        raw = []
        for m in st["msgs"]:
            if not out_ring.try_put(m):
                raise RuntimeError("peer ring full")
            raw.extend(inbound.get_many(16))
        st["raw"] = raw

    def decode():
        st["decoded"] = [w1._decode_peer(m) for m in st["raw"]]

    def apply():
        w1.process([], st["decoded"])

    def ack():
        acked = st["acked"] = w0.ctl.link_applied(1, 0)
        batch = w0.shard.begin()
        batch.prune_outbox(1, acked)
        batch.commit()

    clock("start")
    call(lambda: None)
    out["calibration"] = clock("calibration")  # nothing: what a part's frame costs
    for part, fn in zip(PARTS, (encode, outbox, ring, decode, apply, ack)):
        call(fn)
        out[part] = clock(part)
    # worker 0's own counters follow (as `_post_commit` would have moved them)
    seq = st["seq"]
    w0.link_out[1] = seq
    w0.sent[1] = w0.pruned[1] = seq
    w0.ctl.set_link_committed(0, 1, seq)
    if st["acked"] != seq:
        raise RuntimeError(f"worker 1 applied link seq {st['acked']}, not {seq}")
    return out, n


def thread_clock():
    last = [time.thread_time_ns()]

    def clock(_part: str) -> int:
        now = time.thread_time_ns()
        dt, last[0] = now - last[0], now
        return dt

    return clock


def callgrind_clock(only: str | None):
    """Instruments the parts alone (`only`: that part): ``callgrind_control -i on`` before,
    ``-i off`` after (valgrind started with ``--instr-atstart=no``); the counts are then
    read from valgrind's output file with ``callgrind_annotate``."""
    order = ["start", "calibration", *PARTS]
    state = {"on": False}

    def clock(part: str) -> str:
        k = order.index(part) + 1  # the part that runs next
        on = k < len(order) and order[k] in PARTS and only in (None, order[k])
        if on != state["on"]:
            subprocess.run(["callgrind_control", "-i", "on" if on else "off",
                            str(os.getpid())], check=True, capture_output=True)
            state["on"] = on
        return part

    return clock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--rounds", type=int, default=4,
                    help="the last ROUNDS rounds' forwarded updates are measured")
    ap.add_argument("--repeat", type=int, default=3, help="CPU time: best of")
    ap.add_argument("--callgrind", action="store_true",
                    help="under valgrind --instr-atstart=no: instrument the parts only")
    ap.add_argument("--part", choices=PARTS, help="with --callgrind: this part alone")
    args = ap.parse_args(argv)
    rounds = split(wl.ring_messages(wl.generate(11, args.events), 5000))
    pair = Pair()
    try:
        for per in rounds:
            pair.step(per)
        pair.quiesce()
        records = sum(w.totals["records"] for w in pair.w)
        fwd = sum(w.totals["forwarded"] for w in pair.w)
        print(f"{forwards.IMPLEMENTATION} forwards; warm-up: {records} records, {fwd} "
              f"forwarded updates ({fwd / records:.3f} per record)")
        batches = [b for b in pair.captured[-args.rounds:] if b]
        if args.callgrind:
            _, n = run_parts(pair, batches, callgrind_clock(args.part))
            print(f"{n} forwarded updates: {args.part or 'every part'} instrumented "
                  "(callgrind_annotate <valgrind's output file>; divide by the updates)")
            return 0
        best: dict[str, float] = {}
        n = 0
        for _ in range(args.repeat):
            res, n = run_parts(pair, batches, thread_clock())
            for part, ns in res.items():
                best[part] = min(best.get(part, float("inf")), ns)
        print(f"{n} forwarded updates in {len(batches)} transactions; CPU µs per update "
              "(this thread, best of runs):")
        for part in PARTS:
            print(f"  {part:8s} {best[part] / n / 1e3:7.2f}")
        print(f"  {'total':8s} {sum(best[p] for p in PARTS) / n / 1e3:7.2f}")
        return 0
    finally:
        pair.close()


if __name__ == "__main__":
    raise SystemExit(main())
