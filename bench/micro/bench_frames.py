"""Supervisor → worker framing: CPU µs per record, msgpack (before) vs binary frames (after).

Run: ``python -m bench.micro.bench_frames [--records N] [--round R] [--workers W] [--json]``
(also as pytest-benchmark, on 10k records: ``pytest bench/micro/bench_frames.py
--benchmark-only``, and in ``python -m bench --stage micro``).

On a seeded `bench.workload` (shop.toml: binary JSON, binary msgpack, 20 % structured), in
rounds of `batch_max_records` (5,000) records, with Message stand-ins that answer like
confluent_kafka.Message (Python methods: their calls cost the same in every variant), or with
``--kafka`` real Messages consumed from the embedded broker (`headers()` then builds its
list of tuples on every call, as in the service):

- ``supervisor encode``: the consume batch → one ring message per worker. *msgpack*: the
  loop `Supervisor._dispatch` ran before binary frames (envelope.routing_key, slot_of, a
  tuple per record, protocol.frame_records); *frames (compiled)*: `_frames.FrameRouter`;
  *frames (pure)*: `frames.FrameRouterRef`, the reference the pure core runs.
- ``worker unpack``: ring messages → the REC_* record lists, held for a 4 MiB transaction
  and then freed: *msgpack*:
  protocol.unpack; *frames (compiled)*: `_frames.read_frames`; *frames (pure)*:
  protocol.read_frames.

Process CPU time (`time.process_time`), best of `--repeat` passes, so a busy neighbour on
the machine counts little; the garbage collector tuned as in the service (runtime.tune_gc).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import uuid

import msgpack
import pytest

from aggregator import _frames
from aggregator.config import load_config
from aggregator.envelope import routing_key
from aggregator.frames import FrameRouterRef
from aggregator.protocol import frame_records, read_frames, unpack
from aggregator.routing import slot_of
from aggregator.runtime import tune_gc
from bench import workload as wl
from tests.support.messages import FakeMessage

MAX_MESSAGE = 16 << 20




def msgpack_encode(msgs, tindex, detect, workers, max_bytes, packer, bids):
    """The supervisor's loop before binary frames (Supervisor._dispatch at 6d99ae1)."""
    n = workers
    per: list[list] = [[] for _ in range(n)]
    through: dict = {}
    last_topic, ti = None, -1
    for m in msgs:
        if m.error() is not None:
            continue
        topic = m.topic()
        if topic is not last_topic:
            last_topic, ti = topic, tindex[topic]
        part, off = m.partition(), m.offset()
        through[(ti, part)] = off
        value, key, headers = m.value(), m.key(), m.headers()
        if value is not None and len(value) > max_bytes:
            continue
        rk = routing_key(value, headers, key, detect=detect[ti])
        slot = slot_of(rk) if rk is not None else 0
        per[slot % n].append((ti, part, off, key, value, headers, m.timestamp()[1], slot))
    thr = [[ti, p, o] for (ti, p), o in through.items()]
    out = []
    for w in range(n):
        out.append([msg for _, msg, _ in frame_records(packer, per[w], thr, bids[w],
                                                        MAX_MESSAGE)])
    return out


def _cpu(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def consumed(bootstrap: str, w, records: int) -> tuple[str, list]:
    """Load the workload into fresh topics and consume it back: real Message objects."""
    from confluent_kafka import Consumer

    prefix = f"bench-frames-{uuid.uuid4().hex[:8]}-"
    loaded = wl.load(bootstrap, w, prefix)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": prefix + "g",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe(loaded.topics)
    msgs: list = []
    deadline = time.monotonic() + 300
    while len(msgs) < records and time.monotonic() < deadline:
        msgs.extend(m for m in c.consume(5000, 1.0) if m.error() is None)
    c.close()
    return prefix, msgs[:records]


def setup(records: int, round_: int, workers: int, bootstrap: str = ""):
    """(encode variants, unpack variants, records, bytes per record) on a seeded workload;
    checks first that msgpack and frames carry the same records. With `bootstrap`, the
    records are real confluent_kafka Messages consumed from that broker."""
    cfg = load_config(wl.CONFIG_PATH, {}, env={})
    topics = cfg.topics()
    detect_topics = {s.topic for s in cfg.sources.values() if s.structured == "detect"}
    detect = [t in detect_topics for t in topics]
    max_bytes = cfg.service.max_record_bytes
    w = wl.generate(7, records)
    if bootstrap:
        prefix, msgs = consumed(bootstrap, w, records)
    else:
        prefix, msgs = "", []
        offs: dict = {}
        for topic, key, value, headers in w.records[:records]:
            part = slot_of(key) % wl.PARTITIONS if key else 0
            off = offs.get((topic, part), 0)
            offs[(topic, part)] = off + 1
            msgs.append(FakeMessage(topic, part, off, key, value,
                                    list(headers) if headers else None,
                                    1_700_000_000_000 + off))
    tindex = {prefix + t: i for i, t in enumerate(topics)}
    rounds = [msgs[i:i + round_] for i in range(0, len(msgs), round_)]
    n = len(msgs)
    bids = [1] * workers
    packer = msgpack.Packer(use_bin_type=True)
    fns = [None] * len(topics)
    fast = _frames.FrameRouter(workers, tindex, detect, fns, max_bytes)
    ref = FrameRouterRef(workers, tindex, detect, fns, max_bytes)

    enc = {
        "msgpack": lambda: [msgpack_encode(r, tindex, detect, workers, max_bytes,
                                           packer, bids) for r in rounds],
        "frames (compiled)": lambda: [fast.route(r, bids, MAX_MESSAGE) for r in rounds],
        "frames (pure)": lambda: [ref.route(r, bids, MAX_MESSAGE) for r in rounds],
    }
    old_msgs = [m for r in rounds for out in msgpack_encode(r, tindex, detect, workers,
                                                            max_bytes, packer, bids)
                for m in out]
    new_msgs = [m for r in rounds for out in fast.route(r, bids, MAX_MESSAGE).messages
                for m in out]
    # same records, same routing: the decoded rounds agree (headers: lists vs tuples)
    for a, b in zip(old_msgs, new_msgs):
        ua, ub = unpack(a), _frames.read_frames(b)
        assert ua[:3] == ub[:3] and len(ua[3]) == len(ub[3])
        for ra, rb in zip(ua[3], ub[3]):
            assert ra[:5] == rb[:5] and ra[6:] == rb[6:]
            assert (ra[5] is None) == (rb[5] is None)
            assert ra[5] is None or [tuple(h) for h in ra[5]] == rb[5]

    def drain(reader, batch):
        """Decode the messages of a worker transaction (up to 4 MiB of ring messages, as
        worker.TXN_MAX_BYTES), hold them, then drop them: freeing counts."""
        txns, cur, size = [], [], 0
        for m in batch:
            if cur and size + len(m) > 4 << 20:
                txns.append(cur)
                cur, size = [], 0
            cur.append(m)
            size += len(m)
        txns.append(cur)

        def go():
            for txn in txns:
                held = [reader(m) for m in txn]
                del held
        return go

    dec = {
        "msgpack": drain(unpack, old_msgs),
        "frames (compiled)": drain(_frames.read_frames, new_msgs),
        "frames (pure)": drain(read_frames, new_msgs),
    }
    sizes = {"msgpack": sum(map(len, old_msgs)) / n, "frames": sum(map(len, new_msgs)) / n}
    return enc, dec, n, sizes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--round", type=int, default=5000, help="records per consume round")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kafka", action="store_true",
                    help="real Message objects: consumed from the embedded broker")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.kafka:
        from aggregator.devtools.broker import EmbeddedBroker

        with EmbeddedBroker() as broker:
            enc, dec, n, sizes = setup(args.records, args.round, args.workers,
                                       broker.bootstrap_servers)
    else:
        enc, dec, n, sizes = setup(args.records, args.round, args.workers)
    tune_gc()  # the collector's settings of the service processes
    res: dict = {"records": n, "messages": "confluent_kafka" if args.kafka else "stand-ins",
                 "round": args.round, "workers": args.workers,
                 "bytes_per_record": sizes,
                 "supervisor_encode_us": {}, "worker_unpack_us": {}}
    for name, fn in enc.items():
        res["supervisor_encode_us"][name] = _cpu(fn, args.repeat) / n * 1e6
    for name, fn in dec.items():
        res["worker_unpack_us"][name] = _cpu(fn, args.repeat) / n * 1e6
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{n} records ({res['messages']}), rounds of {args.round}, {args.workers} "
              f"workers; CPU µs per record (best of {args.repeat})")
        print(f"{'':22}{'supervisor encode':>20}{'worker unpack+free':>20}")
        for name in enc:
            print(f"{name:22}{res['supervisor_encode_us'][name]:>20.2f}"
                  f"{res['worker_unpack_us'][name]:>20.2f}")
        print("bytes per record: msgpack {msgpack:.0f}, frames {frames:.0f}".format(
            **res["bytes_per_record"]))
    return res


# ---- pytest-benchmark (`python -m bench --stage micro`): the same variants, 10k records --

VARIANTS = ["msgpack", "frames (compiled)", "frames (pure)"]


@pytest.fixture(scope="module")
def variants():
    return setup(10_000, 5000, 2)


@pytest.mark.benchmark(group="frames-supervisor-encode")
@pytest.mark.parametrize("variant", VARIANTS)
def test_supervisor_encode(benchmark, variants, variant):
    enc, _, n, _ = variants
    benchmark(enc[variant])
    _report(benchmark, n)


@pytest.mark.benchmark(group="frames-worker-unpack")
@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_unpack(benchmark, variants, variant):
    _, dec, n, _ = variants
    benchmark(dec[variant])
    _report(benchmark, n)


def _report(benchmark, items: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.mean:
        benchmark.extra_info["items_per_s"] = round(items / stats.stats.mean)


if __name__ == "__main__":
    main()
