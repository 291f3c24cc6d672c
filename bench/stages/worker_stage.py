"""The worker stage alone (`python -m bench --stage worker`): does it scale with workers?

The supervisor is taken out of the way: the harness pre-encodes, before the clock starts, the
ring messages the supervisor would send for the workload (rounds of `batch_max_records`
records, one message per worker per round in binary frames (protocol.py), each record's
frame carrying topic idx, partition, offset, key, value, headers, ts and slot, routed by
``slot % workers``), then starts real worker processes
(`aggregator.worker_process.worker_main`, the same entry point the supervisor spawns) on real
rings and a control block, and copies the messages into their rings as the rings take them
(`_feed`: pausing while they are full, so that the feeder takes little CPU from the workers).

Window: first message put → every worker has acknowledged its last batch (durably committed)
and every forwarded update has been applied by its owner (the link counters are quiet).
The shipped config otherwise (LMDB fsync on). Views are checked against the oracle.
`StageRun.window`: where the window's CPU went (each worker's main thread, user and system,
and how long it waited, runnable, for a core; its other threads; its context switches; the
broker; the whole machine, whose other tenants count too): bench/results/forward-scaling.md
reads the scaling from it.
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
import psutil

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
    # where the window's CPU went (`window_cpu`): per worker its main thread, its other
    # threads (librdkafka's) and its context switches; the broker; the whole machine
    window: dict = field(default_factory=dict)

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


def _snapshot(pids: dict[str, int]) -> dict:
    """CPU seconds and context switches of each process (main thread and the others apart),
    and the machine's CPU times (/proc/stat, every process of every user)."""
    out: dict = {}
    for name, pid in pids.items():
        try:
            p = psutil.Process(pid)
            threads = p.threads()
            ctx = p.num_ctx_switches()
        except psutil.Error:
            continue
        main = [t for t in threads if t.id == pid]
        rest = sum(t.user_time + t.system_time for t in threads if t.id != pid)
        out[name] = {"main_user_s": sum(t.user_time for t in main),
                     "main_system_s": sum(t.system_time for t in main),
                     "main_runqueue_s": _runqueue_s(pid), "threads_s": rest,
                     "voluntary": ctx.voluntary, "involuntary": ctx.involuntary}
    m = psutil.cpu_times()
    out["machine"] = {"busy_s": sum(m) - m.idle - getattr(m, "iowait", 0.0),
                      "idle_s": m.idle, "iowait_s": getattr(m, "iowait", 0.0),
                      "steal_s": getattr(m, "steal", 0.0)}
    return out


def _runqueue_s(pid: int) -> float:
    """Seconds the main thread of `pid` was runnable but waited for a core
    (/proc/<pid>/schedstat: on-CPU ns, run-queue wait ns, timeslices)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def window_cpu(a: dict, b: dict, window_s: float) -> dict:
    """What happened between two snapshots (`_snapshot`)."""
    out: dict = {}
    for name in b:
        if name not in a:
            continue
        out[name] = {k: round(b[name][k] - a[name][k], 3) if isinstance(b[name][k], float)
                     else b[name][k] - a[name][k] for k in b[name]}
    m = out.get("machine")
    if m is not None:
        m["cores_busy"] = round(m["busy_s"] / window_s, 2)
    return out


def _write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def measure_stage(workload, oracle: dict, workers: int, *, timeout: float = 1800,
                  bootstrap: str = "", prefix: str = "",
                  overrides: dict | None = None, broker_pid: int | None = None) -> StageRun:
    """`bootstrap`/`prefix`: where the workers' own output goes (dead letters, change events
    when the config publishes them); the topics must exist. Nothing is consumed from Kafka.
    `overrides`: config settings on top (e.g. ``{"service.commit_window_ms": 0}``).
    `broker_pid`: the embedded broker, whose CPU in the window is shown beside."""
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
        sampler = ProcessSampler({f"worker-{i}": p.pid for i, p in enumerate(procs)},
                                 children=False)  # a worker starts no processes
        sampler.__enter__()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        io0 = sum(_write_bytes(p.pid) for p in procs)
        commits0 = sum(ctl.get(i, Slot.COMMITS) for i in range(workers))
        watched = {f"worker-{i}": p.pid for i, p in enumerate(procs)}
        if broker_pid:
            watched["broker"] = broker_pid
        snap0 = _snapshot(watched)
        t0 = time.monotonic()
        _feed(inbound, msgs, procs, t0 + timeout)
        last_bid = [len(m) for m in msgs]
        while not _done(ctl, workers, last_bid):
            if time.monotonic() > t0 + timeout or not all(p.is_alive() for p in procs):
                run.error = "workers did not finish"
                return run
            time.sleep(0.002)
        t1 = time.monotonic()
        snap1 = _snapshot(watched)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        run.commits = sum(ctl.get(i, Slot.COMMITS) for i in range(workers)) - commits0
        run.write_bytes = sum(_write_bytes(p.pid) for p in procs) - io0
        run.window_s = t1 - t0
        run.window = window_cpu(snap0, snap1, run.window_s)
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


FEED_SLEEP_S = (0.0005, 0.008)  # the feeder's pause while every ring is full: min, max


def _feed(rings: list[Ring], msgs: list[list[bytes]], procs, deadline: float) -> None:
    """Copy each worker's messages into its ring as the ring takes them. While every ring
    is full the feeder sleeps, 0.5 ms doubling to 8 ms (a ring holds several transactions'
    worth, ~0.2 s of a worker's work each: the longer pause never leaves a worker without
    messages, and the feeder, a stand-in for the supervisor, takes less of the two cores
    from the workers it measures); the workers' liveness is checked every 0.1 s."""
    pos = [0] * len(rings)
    lo, hi = FEED_SLEEP_S
    delay = lo
    check_at = 0.0
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
        if progressed:
            delay = lo
            continue
        now = time.monotonic()
        if now >= check_at:
            if now > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError("feeding the worker rings stalled")
            check_at = now + 0.1
        time.sleep(delay)
        delay = min(delay * 2, hi)


def _done(ctl: ControlBlock, n: int, last_bid: list[int]) -> bool:
    if any(ctl.get(i, Slot.ACK_BATCH) < last_bid[i] for i in range(n)):
        return False
    return all(ctl.link_applied(j, i) >= ctl.link_committed(i, j)
               for i in range(n) for j in range(n) if i != j)
