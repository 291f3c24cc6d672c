"""End-to-end latency under a paced load: produce time → the event's state committed.

The aggregator starts cold on fresh topics. A warm-up of `WARMUP` records is produced and
waited for (so the group join and the worker boot are not measured), then the rest of a
seeded workload is produced at a fixed rate (a fraction of the measured maximum), each
record stamped with the wall-clock time just before `produce()`.

"State committed" for a record = the first `DurablePoller` poll (every 20 ms) at which the
shard that owns the record's routing key (``slot_of(key) % workers``) has durably stored a
through-offset ≥ the record's offset in LMDB. Each latency is therefore an upper bound, late
by at most one poll interval (10 ms on average) plus the poll itself. Included: the
producer's linger (5 ms) and batching, the broker, the consumer fetch, dispatch, the
worker's transaction and fsync. Not included: forwarded updates applied later on another
shard (their outbox entry is committed in the same transaction).

The floor (`measure_floor`): the same paced load read by a bare consumer with the same
consumer settings, latency = time fetched − the record's CreateTime (set by the producer at
`produce()`, 1 ms resolution). What the broker and librdkafka alone cost: the embedded
broker answers a fetch only when `fetch.wait.max.ms` (librdkafka default 500 ms) runs out,
not when new data arrives, so that setting dominates both figures on it.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from aggregator.devtools import simulate
from aggregator.devtools.latency_trace import ENV as TRACE_ENV
from aggregator.devtools.latency_trace import read_dir as read_trace
from aggregator.routing import slot_of
from bench import workload as wl
from bench.stages.service import AggregatorProcess
from bench.verify import check_views

log = logging.getLogger(__name__)

WARMUP = 500


@dataclass
class LatencyRun:
    workers: int
    target_rate: float
    consumer: dict = field(default_factory=dict)  # extra librdkafka consumer settings
    producer: dict = field(default_factory=dict)  # the paced producer's extra settings
    ok: bool = False
    error: str = ""
    achieved_rate: float = 0.0
    records: int = 0
    measured: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    resolution_ms: float = 20.0
    timeline: list = field(default_factory=list)  # per second sent: [s, records, p50, max]
    memory: dict = field(default_factory=dict)
    verified: str = "not checked"
    breakdown: dict = field(default_factory=dict)  # measure_latency(trace=True): `breakdown`
    # CPU µs per paced event by process (first paced record sent -> all durable)
    cpu_us_per_event: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class PacedProducer:
    """Produces records at a fixed rate and keeps each one's send time and offset."""

    def __init__(self, bootstrap: str, prefix: str, producer: dict | None = None) -> None:
        """`producer`: librdkafka settings over the defaults below (e.g. a longer
        ``linger.ms``: fewer, larger produce requests for the broker on the same cores)."""
        self.prefix = prefix
        self.p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                           "acks": "all", "linger.ms": 5,
                           "queue.buffering.max.messages": 500_000, **(producer or {})})
        self.sent_at: list[float] = []
        self.where: list[tuple[str, int, int] | None] = []
        self.keys: list[bytes] = []
        self.failures: list[str] = []

    def _send(self, rec) -> None:
        topic, key, value, headers = rec
        i = len(self.sent_at)
        self.where.append(None)
        self.keys.append(key)

        def done(err, msg, i=i) -> None:
            if err is not None:
                self.failures.append(str(err))
            else:
                self.where[i] = (msg.topic(), msg.partition(), msg.offset())

        self.sent_at.append(time.time())
        while True:
            try:
                self.p.produce(self.prefix + topic, value=value, key=key, headers=headers,
                               on_delivery=done)
                return
            except BufferError:
                self.p.poll(0.01)

    def burst(self, records) -> None:
        for r in records:
            self._send(r)
        self.flush()

    def paced(self, records, rate: float) -> float:
        """Send `records` at `rate` per second; returns the achieved rate."""
        t0 = time.monotonic()
        i = 0
        n = len(records)
        while i < n:
            due = min(n, int((time.monotonic() - t0) * rate) + 1)
            while i < due:
                self._send(records[i])
                i += 1
            self.p.poll(0)
            time.sleep(0.001)
        took = time.monotonic() - t0
        self.flush()
        return n / took if took > 0 else 0.0

    def flush(self) -> None:
        left = self.p.flush(120)
        if left or self.failures:
            raise RuntimeError(f"produce failed: {left} undelivered, {self.failures[:3]}")

    def last_offsets(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for w in self.where:
            if w is not None:
                tp = (w[0], w[1])
                out[tp] = max(out.get(tp, -1), w[2])
        return out


@contextlib.contextmanager
def steady_pacing():
    """No garbage-collector pause in this process while it paces the load and polls.

    The workload (hundreds of thousands of records: millions of objects) lives in this
    process, and a collection of the oldest generation traverses all of it with the GIL
    held. The paced producer then sends nothing and the `DurablePoller` thread polls nothing
    for up to a second or more, after which the producer catches up at several times the
    rate: a burst the service is then measured on, and a poll late by that pause. Frozen
    (`gc.freeze`), what exists before the run is never traversed; disabled, the collector
    does not run at all while the records are paced (what they allocate is freed by
    reference counting; the frozen and the cyclic garbage are collected after). What was
    frozen before stays frozen: unfreezing cannot tell it from what this froze."""
    frozen_before = gc.get_freeze_count()
    gc.collect()
    gc.freeze()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        if not frozen_before:
            gc.unfreeze()


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure_latency(bootstrap: str, prefix: str, workers: int, rate: float, seconds: float,
                    seed: int, *, embedded: bool, broker_pid: int | None,
                    timeout: float, consumer: dict | None = None,
                    overrides: dict | None = None, trace: bool = False,
                    producer: dict | None = None) -> LatencyRun:
    """`overrides`: extra config overrides of the aggregator; `trace`: the service writes
    its per-step timestamps (aggregator/devtools/latency_trace.py) and `run.breakdown` says
    where the latency went (`breakdown`); `producer`: the paced producer's extra librdkafka
    settings (`PacedProducer`)."""
    run = LatencyRun(workers, round(rate), dict(consumer or {}), dict(producer or {}))
    trace_dir = tempfile.mkdtemp(prefix="agg-lat-trace-") if trace else None
    n = WARMUP + max(100, int(rate * seconds))
    w = wl.generate(seed, n)
    records = w.records
    oracle = simulate.expected_views(w)
    wl.create(bootstrap, prefix)
    p = AggregatorProcess(bootstrap, prefix, workers, embedded=embedded, broker_pid=broker_pid,
                          consumer=consumer, overrides=overrides)
    try:
        if trace_dir is not None:
            os.environ[TRACE_ENV] = trace_dir  # inherited by the spawned service
        try:
            p.start()
        finally:
            os.environ.pop(TRACE_ENV, None)
        prod = PacedProducer(bootstrap, prefix, producer)
        with steady_pacing():
            prod.burst(records[:WARMUP])
            p.poller.set_targets(prod.last_offsets())
            if not p.poller.wait(timeout):
                run.error = "warm-up records never became durable"
                p.stop_event.set()
                p.finish(60)
                return run
            t_paced0 = time.monotonic()
            run.achieved_rate = round(prod.paced(records[WARMUP:], rate))
            p.poller.set_targets(prod.last_offsets())
            if not p.poller.wait(timeout):
                run.error = "paced records never became durable"
            t_paced1 = time.monotonic()
        p.stop_event.set()
        res = p.finish(timeout)
        run.memory = p.sampler.summary()
        run.records = len(records)
        paced = max(1, len(records) - WARMUP)
        run.cpu_us_per_event = {k: round(v / paced * 1e6, 1) for k, v in
                                p.sampler.cpu_between(t_paced0, t_paced1).items()}
        lat = []
        per_second: dict[int, list[float]] = {}
        t_paced = prod.sent_at[WARMUP] if len(records) > WARMUP else 0.0
        for i in range(WARMUP, len(records)):
            where = prod.where[i]
            if where is None:
                continue
            owner = slot_of(prod.keys[i]) % workers
            t = p.poller.history[owner].durable_at((where[0], where[1]), where[2])
            if t is not None:
                ms = (t - prod.sent_at[i]) * 1000
                lat.append(ms)
                per_second.setdefault(int(prod.sent_at[i] - t_paced), []).append(ms)
        for sec, xs in sorted(per_second.items()):
            xs.sort()
            run.timeline.append([sec, len(xs), round(_pct(xs, 0.5), 1), round(xs[-1], 1)])
        run.measured = len(lat)
        _fill(run, lat)
        if trace_dir is not None:
            run.breakdown = breakdown(trace_dir, prod, p.poller, workers, WARMUP)
        if res.get("code") != 0:
            run.error = run.error or f"aggregator exited with code {res.get('code')}"
            return run
        problems = check_views(p.data_dir, oracle)
        consumed = (res.get("stats") or {}).get("consumed", 0)
        if consumed != len(records):
            problems.insert(0, f"consumed {consumed} records, produced {len(records)}")
        if run.measured != len(records) - WARMUP:
            problems.insert(0, f"{len(records) - WARMUP - run.measured} records without a "
                               "commit time")
        run.verified = "PASSED" if not problems else "FAILED: " + "; ".join(problems[:5])
        run.ok = not problems and not run.error
        return run
    finally:
        p.cleanup()
        if trace_dir is not None:
            shutil.rmtree(trace_dir, ignore_errors=True)


STEPS = ("fetch", "ring_full", "queued", "window", "apply", "commit", "poll")
STEP_DOC = {
    "fetch": "produce() -> dispatched by the supervisor (linger, broker, fetch wait, consume)",
    "ring_full": "dispatched -> in the worker's ring (waited in pending: ring full, paused)",
    "queued": "in the ring -> taken by the worker (behind the transaction in front)",
    "window": "taken -> the commit window closed (waiting for more ring messages)",
    "apply": "window closed -> LMDB commit started (applying the transaction)",
    "commit": "LMDB commit (fsync)",
    "poll": "durable -> seen by the 20 ms poller",
}


def breakdown(trace_dir: str, prod: PacedProducer, poller, workers: int, first: int) -> dict:
    """Join the service's trace (latency_trace.py) with the producer's send times and the
    poller: per record from `first` on, the time spent in each of `STEPS` (they add up to
    its latency). Returns per step p50/p90/p99/mean over all records, the mean of each step
    over the slowest 1 % and over the records around the median, the consume rounds and the
    transactions (count, mean bytes budget, mean records)."""
    sup, wlines = read_trace(trace_dir)
    topics = next((ln[1] for ln in sup if ln[0] == "topics"), [])
    tindex = {t: i for i, t in enumerate(topics)}
    put = {(ln[1], ln[2]): (ln[3], ln[4]) for ln in sup if ln[0] == "put"}
    rounds = [ln for ln in sup if ln[0] == "round"]
    # per worker, per (topic index, partition): sorted (first, last, bid, taken, txn)
    index: list[dict] = [{} for _ in range(workers)]
    txns: list[tuple] = []
    for w, lines in wlines.items():
        for ln in lines:
            if ln[0] != "txn":
                continue
            _, t_close, t_commit, t_durable, _acked, txn_bytes, msgs = ln
            txn = (t_close, t_commit, t_durable)
            txns.append((txn_bytes, sum(hi - lo + 1 for m in msgs for _, _, lo, hi in m[2]),
                         t_durable - t_commit))
            for bid, t_taken, ranges in msgs:
                for ti, part, lo, hi in ranges:
                    index[w].setdefault((ti, part), []).append((lo, hi, bid, t_taken, txn))
    for per in index:
        for k, v in per.items():
            v.sort()
            per[k] = ([x[0] for x in v], v)
    rows = []
    missing = 0
    for i in range(first, len(prod.sent_at)):
        where = prod.where[i]
        if where is None or where[0] not in tindex:
            missing += 1
            continue
        owner = slot_of(prod.keys[i]) % workers
        seen = poller.history[owner].durable_at((where[0], where[1]), where[2])
        found = index[owner].get((tindex[where[0]], where[1]))
        if seen is None or found is None:
            missing += 1
            continue
        los, entries = found
        j = bisect.bisect_right(los, where[2]) - 1
        if j < 0 or entries[j][1] < where[2]:
            missing += 1
            continue
        _, _, bid, t_taken, (t_close, t_commit, t_durable) = entries[j]
        t_disp, t_put = put.get((owner, bid), (t_taken, t_taken))
        sent = prod.sent_at[i]
        rows.append((seen - sent, (t_disp - sent, t_put - t_disp, t_taken - t_put,
                                   t_close - t_taken, t_commit - t_close,
                                   t_durable - t_commit, seen - t_durable)))
    out: dict = {"records": len(rows), "missing": missing, "steps": {}}
    if not rows:
        return out
    rows.sort(key=lambda r: r[0])
    tail = rows[int(0.99 * len(rows)):]
    mid = rows[int(0.45 * len(rows)):int(0.55 * len(rows)) + 1]
    for k, name in enumerate(STEPS):
        xs = sorted(r[1][k] * 1000 for r in rows)
        out["steps"][name] = {
            "p50": round(_pct(xs, 0.5), 1), "p90": round(_pct(xs, 0.9), 1),
            "p99": round(_pct(xs, 0.99), 1), "mean": round(statistics.fmean(xs), 1),
            "mean_at_p50": round(statistics.fmean(r[1][k] for r in mid) * 1000, 1),
            "mean_slowest_1pct": round(statistics.fmean(r[1][k] for r in tail) * 1000, 1)}
    took = sorted((r[2] - r[1]) * 1000 for r in rounds)
    out["rounds"] = {"count": len(rounds),
                     "records_mean": round(statistics.fmean(r[3] for r in rounds), 1)
                     if rounds else 0,
                     "ms_p50": round(_pct(took, 0.5), 1) if took else 0,
                     "ms_p99": round(_pct(took, 0.99), 1) if took else 0}
    out["transactions"] = {
        "count": len(txns),
        "budget_bytes_mean": round(statistics.fmean(t[0] for t in txns)) if txns else 0,
        "records_mean": round(statistics.fmean(t[1] for t in txns), 1) if txns else 0,
        "commit_ms_mean": round(statistics.fmean(t[2] for t in txns) * 1000, 1) if txns else 0}
    return out


def format_breakdown(b: dict) -> str:
    """`breakdown` as a text table (ms)."""
    lines = [f"{'step':<10} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7} {'@p50':>7} "
             f"{'@p99+':>7}  what"]
    for name in STEPS:
        s = b["steps"].get(name)
        if s is None:
            continue
        lines.append(f"{name:<10} {s['p50']:>7} {s['p90']:>7} {s['p99']:>7} {s['mean']:>7} "
                     f"{s['mean_at_p50']:>7} {s['mean_slowest_1pct']:>7}  {STEP_DOC[name]}")
    lines.append(f"records {b['records']} (missing {b['missing']}); consume rounds "
                 f"{b.get('rounds')}; transactions {b.get('transactions')}")
    return "\n".join(lines)


def _fill(run, lat: list[float]) -> None:
    lat.sort()
    if lat:
        run.p50_ms, run.p90_ms = round(_pct(lat, 0.5), 1), round(_pct(lat, 0.9), 1)
        run.p99_ms, run.max_ms = round(_pct(lat, 0.99), 1), round(lat[-1], 1)
        run.mean_ms = round(statistics.fmean(lat), 1)


@dataclass
class FloorRun:
    """Produce → fetched by a bare consumer: the broker's and the client's share."""

    target_rate: float
    consumer: dict = field(default_factory=dict)
    producer: dict = field(default_factory=dict)  # the paced producer's extra settings
    ok: bool = False
    error: str = ""
    achieved_rate: float = 0.0
    measured: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    resolution_ms: float = 1.0

    def to_json(self) -> dict:
        return asdict(self)


def floor_consumer(bootstrap: str, topics: list[str], consumer: dict, expected, conn) -> None:
    """Child process: fetch every record and note (CreateTime ms, fetch time ms)."""
    from aggregator.kafka_clients import consume_ready
    from bench.stages.raw import consumer_conf

    conf = {**consumer_conf(bootstrap, "bench-floor"), **consumer}
    c = Consumer(conf)
    c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics
              for p in range(wl.PARTITIONS)])
    seen: list[tuple[int, float]] = []
    deadline = time.monotonic() + 1800
    try:
        while time.monotonic() < deadline:
            msgs = consume_ready(c, 5000, 0.05)  # as the supervisor does
            now = time.time() * 1000
            for m in msgs:
                if m.error() is None:
                    seen.append((m.timestamp()[1], now))
            if 0 <= expected.value <= len(seen):
                break
    finally:
        c.close()
    conn.send(seen)


def measure_floor(bootstrap: str, prefix: str, rate: float, seconds: float, seed: int, *,
                  consumer: dict | None = None, timeout: float = 600,
                  producer: dict | None = None) -> FloorRun:
    import multiprocessing as mp

    run = FloorRun(round(rate), dict(consumer or {}), dict(producer or {}))
    records = wl.generate(seed, WARMUP + max(100, int(rate * seconds))).records
    topics = wl.create(bootstrap, prefix)
    ctx = mp.get_context("spawn")
    expected = ctx.Value("q", -1)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=floor_consumer, name="bench-floor",
                       args=(bootstrap, topics, dict(consumer or {}), expected, send))
    proc.start()
    send.close()
    try:
        prod = PacedProducer(bootstrap, prefix, producer)
        prod.burst(records[:WARMUP])
        time.sleep(1.0)  # the consumer is connected and has fetched the warm-up
        t_paced = time.time() * 1000
        with steady_pacing():
            run.achieved_rate = round(prod.paced(records[WARMUP:], rate))
        expected.value = len(records)
        if not recv.poll(timeout):
            run.error = "the floor consumer did not see every record"
            return run
        seen = recv.recv()
        lat = [float(now - ts) for ts, now in seen if ts >= t_paced]
        run.measured = len(lat)
        _fill(run, lat)
        run.ok = len(seen) == len(records)
        if not run.ok:
            run.error = f"fetched {len(seen)} of {len(records)} records"
        return run
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
