"""The worker stage alone (`python -m bench --stage worker`): does it scale with workers?

The supervisor is taken out of the way: the harness pre-encodes, before the clock starts, the
ring messages the supervisor would send for the workload (rounds of `batch_max_records`
records, one message per worker per round in binary frames (protocol.py), each record's
frame carrying topic idx, partition, offset, key, value, headers, ts and slot, routed by
``slot % workers``), then starts real worker processes
(`aggregator.worker_process.worker_main`, the same entry point the supervisor spawns) on real
rings and a control block, and copies the messages into their rings as fast as the rings take
them.

Window: first message put → every worker has acknowledged its last batch (durably committed)
and every forwarded update has been applied by its owner (the link counters are quiet).
The shipped config otherwise (LMDB fsync on). Views are checked against the oracle.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack

from aggregator.config import load_config
from aggregator.control import ControlBlock, Slot
from aggregator.envelope import routing_key
from aggregator.protocol import (
    MSG_STOP,
    create_segments,
    frame_messages,
    pack_frame,
    peer_ring_bytes,
)
from aggregator.ring import Ring, cleanup_stale
from aggregator.routing import slot_of
from aggregator.worker_process import worker_main
from bench import workload as wl
from bench.metrics import ProcessSampler
from bench.verify import check_views

log = logging.getLogger(__name__)

@dataclass
class StageRun:
    workers: int
    ok: bool = False
    error: str = ""
    records: int = 0
    messages: int = 0
    window_s: float = 0.0
    records_per_s: float = 0.0
    cpu_s: dict = field(default_factory=dict)
    feeder_cpu_s: float = 0.0
    commits: int = 0  # LMDB commits of all workers in the window
    write_bytes: int = 0  # bytes the workers caused to be written to disk (/proc/<pid>/io)
    memory: dict = field(default_factory=dict)
    verified: str = "not checked"

    def to_json(self) -> dict:
        return asdict(self)


def encode_rounds(records: list, workers: int, topics: list[str], round_size: int,
                  max_message: int, prefix: str = "") -> list[list[bytes]]:
    """Per worker, the ring messages of every round, as Supervisor._dispatch builds them
    (`topics`: the configured source topics, `prefix` + the simulator's names)."""
    tindex = {t[len(prefix):]: i for i, t in enumerate(topics)}
    next_off: dict[tuple[int, int], int] = {}
    out: list[list[bytes]] = [[] for _ in range(workers)]
    bids = [1] * workers
    ts = 1_700_000_000_000
    for start in range(0, len(records), round_size):
        per: list[list] = [[] for _ in range(workers)]
        through: dict[tuple[int, int], int] = {}
        for topic, key, value, headers in records[start:start + round_size]:
            ti = tindex[topic]
            part = slot_of(key) % wl.PARTITIONS if key else 0
            off = next_off.get((ti, part), 0)
            next_off[(ti, part)] = off + 1
            through[(ti, part)] = off
            rk = routing_key(value, headers, key)
            slot = slot_of(rk) if rk is not None else 0
            per[slot % workers].append(pack_frame(ti, part, off, key, value, headers, ts + off,
                                                  slot))
        thr = [[ti, p, o] for (ti, p), o in through.items()]
        for w in range(workers):
            msgs = frame_messages(per[w], thr, bids[w], max_message)
            out[w].extend(msgs)
            bids[w] += len(msgs)
    return out


def _write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def measure_stage(workload, oracle: dict, workers: int, *, timeout: float = 1800,
                  bootstrap: str = "", prefix: str = "",
                  overrides: dict | None = None) -> StageRun:
    """`bootstrap`/`prefix`: where the workers' own output goes (dead letters, change events
    when the config publishes them); the topics must exist. Nothing is consumed from Kafka.
    `overrides`: config settings on top (e.g. ``{"service.commit_window_ms": 0}``)."""
    run = StageRun(workers, records=len(workload.records))
    tmp = Path(tempfile.mkdtemp(prefix="agg-stage-"))
    opts = {"service.workers": workers, "service.data_dir": str(tmp / "data")}
    if bootstrap:
        opts.update(wl.overrides(bootstrap, prefix, workers=workers, data_dir=tmp / "data",
                                 group="unused", embedded=False))
    opts.update(overrides or {})
    cfg = load_config(wl.CONFIG_PATH, opts, env={})
    svc = cfg.service
    seg = f"agg-stage-{uuid.uuid4().hex[:10]}"
    segments = create_segments(seg, workers, svc.ring_bytes,
                               peer_ring_bytes(svc.ring_bytes, svc.max_record_bytes))
    ctl, inbound = segments.ctl, segments.inbound
    msgs = encode_rounds(workload.records, workers, cfg.topics(), svc.batch_max_records,
                         min(r.capacity for r in inbound) // 4, prefix)
    run.messages = sum(len(m) for m in msgs)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker_main, name=f"stage-worker-{i}",
                         args=(cfg, i, seg, logging.WARNING)) for i in range(workers)]
    sampler = None
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 120
        while any(ctl.get(i, Slot.EPOCH) < 1 for i in range(workers)):
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                run.error = "workers did not boot"
                return run
            time.sleep(0.01)
        sampler = ProcessSampler({f"worker-{i}": p.pid for i, p in enumerate(procs)})
        sampler.__enter__()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        io0 = sum(_write_bytes(p.pid) for p in procs)
        commits0 = sum(ctl.get(i, Slot.COMMITS) for i in range(workers))
        t0 = time.monotonic()
        _feed(inbound, msgs, procs, t0 + timeout)
        last_bid = [len(m) for m in msgs]
        while not _done(ctl, workers, last_bid):
            if time.monotonic() > t0 + timeout or not all(p.is_alive() for p in procs):
                run.error = "workers did not finish"
                return run
            time.sleep(0.002)
        t1 = time.monotonic()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        run.commits = sum(ctl.get(i, Slot.COMMITS) for i in range(workers)) - commits0
        run.write_bytes = sum(_write_bytes(p.pid) for p in procs) - io0
        run.window_s = t1 - t0
        run.records_per_s = run.records / run.window_s
        run.feeder_cpu_s = round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 3)
        sampler.stop()
        run.cpu_s = {k: round(v, 3) for k, v in sampler.cpu_between(t0, t1).items()}
        run.memory = sampler.summary()
        for ring in inbound:
            ring.put(msgpack.packb([MSG_STOP]), timeout=5)
        for p in procs:
            p.join(30)
        problems = check_views(tmp / "data", oracle)
        applied = sum(ctl.get(i, Slot.RECORDS) for i in range(workers))
        if applied != run.records:
            problems.insert(0, f"workers received {applied} records, sent {run.records}")
        run.verified = "PASSED" if not problems else "FAILED: " + "; ".join(problems[:5])
        run.ok = not problems
        return run
    finally:
        if sampler is not None:
            sampler.stop()
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        segments.close()
        cleanup_stale(seg)
        shutil.rmtree(tmp, ignore_errors=True)


def _feed(rings: list[Ring], msgs: list[list[bytes]], procs, deadline: float) -> None:
    pos = [0] * len(rings)
    while True:
        progressed = pending = False
        for w, ring in enumerate(rings):
            queue = msgs[w]
            while pos[w] < len(queue) and ring.try_put(queue[pos[w]]):
                pos[w] += 1
                progressed = True
            pending = pending or pos[w] < len(queue)
        if not pending:
            return
        if not progressed:
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError("feeding the worker rings stalled")
            time.sleep(0.0005)


def _done(ctl: ControlBlock, n: int, last_bid: list[int]) -> bool:
    if any(ctl.get(i, Slot.ACK_BATCH) < last_bid[i] for i in range(n)):
        return False
    return all(ctl.link_applied(j, i) >= ctl.link_committed(i, j)
               for i in range(n) for j in range(n) if i != j)
