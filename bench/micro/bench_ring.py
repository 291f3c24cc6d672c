"""Throughput of aggregator.ring between two real processes.

    python bench/micro/bench_ring.py            # ~2 s per scenario
    python bench/micro/bench_ring.py --quick    # short run (CI), same scenarios
    python bench/micro/bench_ring.py --json     # one JSON object per scenario

The producer runs in a child process ('spawn' context), the consumer in this
process.  The consumer counts what it receives during a measuring window that
starts after a short warm-up; figures are consumer-side rates.

Scenarios
  raw-300B/get_many   300-byte messages, consumer drains with get_many(1024)
  raw-300B/try_get    300-byte messages, consumer takes one at a time
  batch/transport     one pre-packed msgpack batch of N records per message,
                      consumer does not decode (cost of the ring alone)
  batch/pack+unpack   producer msgpack-packs each batch (supervisor->worker
                      message shape of docs/architecture.md, module contracts), consumer unpacks it
  ping-pong           one 64-byte message there and back over two rings,
                      round-trip latency (wait() spin, then short sleeps)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aggregator.ring import Ring, SharedCounters, cleanup_stale  # noqa: E402

RING_CAPACITY = 8 << 20
STOP, SENT = 0, 1  # control counter slots


def make_records(n: int, seed: int = 1) -> list[list]:
    """Small records shaped like the supervisor's: [topic_idx, partition,
    offset, key, value, headers, ts], ~100 bytes packed."""
    rnd = random.Random(seed)
    ts = 1_700_000_000_000
    return [
        [
            rnd.randrange(7),
            rnd.randrange(12),
            1_000_000 + i,
            b"order-%08d" % rnd.randrange(10**8),
            rnd.randbytes(64),
            [],
            ts + i,
        ]
        for i in range(n)
    ]


def batch_message(batch_id: int, records: list[list]) -> bytes:
    through = [[0, p, 1_000_000 + len(records)] for p in range(12)]
    return msgpack.packb([1, batch_id, through, records], use_bin_type=True)


# ---------------------------------------------------------------------------
# producer (child process)


def producer(ring_name: str, ctl_name: str, mode: str, batch: int) -> None:
    ring = Ring.attach(ring_name)
    ctl = SharedCounters.attach(ctl_name)
    sent = 0
    try:
        if mode == "raw":
            payload = b"r" * 300
            try_put = ring.try_put
            while not ctl.get(STOP):
                for _ in range(256):
                    if try_put(payload):
                        sent += 1
                    else:
                        time.sleep(50e-6)
                        break
        elif mode == "transport":
            payload = batch_message(0, make_records(batch))
            while not ctl.get(STOP):
                if ring.put(payload, timeout=0.05):
                    sent += 1
        elif mode == "pack":
            records = make_records(batch)
            batch_id = 0
            while not ctl.get(STOP):
                payload = batch_message(batch_id, records)
                batch_id += 1
                while not ring.put(payload, timeout=0.05):
                    if ctl.get(STOP):
                        break
                else:
                    sent += 1
        else:
            raise ValueError(mode)
    finally:
        ctl.set(SENT, sent)
        ring.close()
        ctl.close()


def echo(ping_name: str, pong_name: str, ctl_name: str) -> None:
    ping, pong = Ring.attach(ping_name), Ring.attach(pong_name)
    ctl = SharedCounters.attach(ctl_name)
    while not ctl.get(STOP):
        if ping.wait(0.05):
            for msg in ping.get_many(64):
                pong.put(msg, timeout=1)


# ---------------------------------------------------------------------------
# consumer (this process)


def run_stream(prefix: str, mode: str, consume: str, batch: int, warmup: float, seconds: float):
    ring = Ring.create(f"{prefix}-{mode}-{consume}", RING_CAPACITY)
    ctl = SharedCounters.create(f"{prefix}-{mode}-{consume}-ctl", 2)
    proc = mp.get_context("spawn").Process(target=producer, args=(ring.name, ctl.name, mode, batch))
    proc.start()
    unpack = consume == "unpack"
    msgs = nbytes = records = 0
    t_start = None
    try:
        if not ring.wait(30):
            raise RuntimeError("producer did not start")
        t_warm_end = time.perf_counter() + warmup
        while True:
            if consume == "try_get":
                m = ring.try_get()
                got = [m] if m is not None else ()
            else:
                got = ring.get_many(1024 if mode == "raw" else 8)
            now = time.perf_counter()
            if t_start is None and now >= t_warm_end:
                t_start, msgs, nbytes, records = now, 0, 0, 0
            for m in got:
                msgs += 1
                nbytes += len(m)
                if unpack:
                    records += len(msgpack.unpackb(m, use_list=True)[3])
            if t_start is not None and now - t_start >= seconds:
                break
            if not got:
                ring.wait(0.1)
        elapsed = time.perf_counter() - t_start
    finally:
        ctl.set(STOP, 1)
        # unblock a producer waiting for space, then reap it
        while proc.is_alive():
            ring.reset_consumer()
            proc.join(0.05)
        ring.close()
        ctl.close()
        ring.unlink()
        ctl.unlink()
    if mode != "raw" and not unpack:
        records = msgs * batch
    return {
        "msgs_per_s": msgs / elapsed,
        "records_per_s": (records / elapsed) if mode != "raw" else msgs / elapsed,
        "mb_per_s": nbytes / elapsed / 1e6,
        "msg_bytes": nbytes // max(msgs, 1),
        "seconds": elapsed,
    }


def run_pingpong(prefix: str, rounds: int):
    ping = Ring.create(f"{prefix}-ping", 1 << 16)
    pong = Ring.create(f"{prefix}-pong", 1 << 16)
    ctl = SharedCounters.create(f"{prefix}-pp-ctl", 2)
    proc = mp.get_context("spawn").Process(target=echo, args=(ping.name, pong.name, ctl.name))
    proc.start()
    rtts = []
    try:
        msg = b"p" * 64
        ping.put(msg, timeout=30)
        if not pong.wait(30):
            raise RuntimeError("echo process did not start")
        pong.try_get()
        for _ in range(rounds):
            t0 = time.perf_counter()
            ping.put(msg, timeout=1)
            while pong.try_get() is None:
                pong.wait(1)
            rtts.append(time.perf_counter() - t0)
    finally:
        ctl.set(STOP, 1)
        proc.join(10)
        for seg in (ping, pong, ctl):
            seg.close()
            seg.unlink()
    rtts.sort()
    return {
        "rtt_p50_us": statistics.median(rtts) * 1e6,
        "rtt_p99_us": rtts[int(len(rtts) * 0.99)] * 1e6,
        "rounds": rounds,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring window per scenario")
    ap.add_argument("--batch", type=int, default=1000, help="records per batch message")
    ap.add_argument("--quick", action="store_true", help="short run (0.3 s windows)")
    ap.add_argument("--json", action="store_true", help="print JSON lines")
    args = ap.parse_args()
    seconds = 0.3 if args.quick else args.seconds
    warmup = 0.1 if args.quick else 0.5

    prefix = f"agg-bench-{uuid.uuid4().hex[:8]}"
    scenarios = [
        ("raw-300B/get_many", "raw", "get_many"),
        ("raw-300B/try_get", "raw", "try_get"),
        (f"batch{args.batch}/transport", "transport", "get_many"),
        (f"batch{args.batch}/pack+unpack", "pack", "unpack"),
    ]
    if not args.json:
        py = sys.version.split()[0]
        print(f"python {py}, {os.cpu_count()} cpus, ring {RING_CAPACITY >> 20} MiB")
        print(f"{'scenario':28} {'msgs/s':>12} {'records/s':>12} {'MB/s':>9} {'bytes/msg':>10}")
    try:
        for label, mode, consume in scenarios:
            r = run_stream(prefix, mode, consume, args.batch, warmup, seconds)
            if args.json:
                print(json.dumps({"scenario": label, **r}))
            else:
                print(
                    f"{label:28} {r['msgs_per_s']:12,.0f} {r['records_per_s']:12,.0f} "
                    f"{r['mb_per_s']:9,.0f} {r['msg_bytes']:10,}"
                )
        pp = run_pingpong(prefix, 2000 if args.quick else 20000)
        if args.json:
            print(json.dumps({"scenario": "ping-pong", **pp}))
        else:
            print(
                f"{'ping-pong 64B':28} rtt p50 {pp['rtt_p50_us']:.1f} us, "
                f"p99 {pp['rtt_p99_us']:.1f} us ({pp['rounds']} rounds)"
            )
    finally:
        cleanup_stale(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
