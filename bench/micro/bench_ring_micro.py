"""Micro-benchmarks of aggregator.ring put/get in one process (pytest-benchmark).

Run: ``pytest bench/micro/bench_ring_micro.py --benchmark-only`` (``--benchmark-disable`` runs
each case once, as a smoke test). Between two processes, see ``bench/micro/bench_ring.py``.

- ``put+get``: one message of 100 B / 1 KiB / 16 KiB through ``try_put`` then ``try_get``;
- ``put+get_many``: 1,000 messages of 300 B put, then drained with one ``get_many``;
- ``batch message``: a supervisor→worker message of 5,000 records (~3 MB) — msgpack pack,
  put, get, unpack: the per-round cost of the ring path.

``extra_info["items_per_s"]`` is messages (or records) per second from the mean time.
"""

from __future__ import annotations

import random
import uuid

import msgpack
import pytest

from aggregator.ring import Ring


def _report(benchmark, items: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.mean:
        benchmark.extra_info["items_per_s"] = round(items / stats.stats.mean)


@pytest.fixture
def ring():
    r = Ring.create(f"agg-bench-micro-{uuid.uuid4().hex[:10]}", 32 << 20)
    yield r
    r.close()
    r.unlink()


@pytest.mark.benchmark(group="ring-put+get")
@pytest.mark.parametrize("size", [100, 1024, 16384])
def test_put_get(benchmark, ring, size):
    payload = b"x" * size

    def once():
        ring.try_put(payload)
        return ring.try_get()

    assert benchmark(once) == payload
    _report(benchmark, 1)


@pytest.mark.benchmark(group="ring-put+get_many")
def test_put_get_many(benchmark, ring):
    payload = b"r" * 300

    def thousand():
        put = ring.try_put
        for _ in range(1000):
            put(payload)
        return ring.get_many(1000)

    assert len(benchmark(thousand)) == 1000
    _report(benchmark, 1000)


def _records(n: int) -> list:
    rng = random.Random(3)
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"0" * 36), ("ce_source", b"/shop/orders"),
               ("ce_type", b"shop.order.updated"), ("ce_time", b"2025-01-01T00:00:00.000Z"),
               ("ce_partitionkey", b"o-000001"), ("ce_sequence", b"3"),
               ("content-type", b"application/json")]
    return [[rng.randrange(7), rng.randrange(4), i, b"o-%06d" % i, rng.randbytes(340), headers,
             1_700_000_000_000 + i, rng.randrange(4096)] for i in range(n)]


@pytest.mark.benchmark(group="ring-batch-message-5000")
def test_batch_message(benchmark, ring):
    records = _records(5000)
    through = [[t, p, 5000] for t in range(7) for p in range(4)]

    def round_trip():
        ring.try_put(msgpack.packb([1, 1, through, records], use_bin_type=True))
        return msgpack.unpackb(ring.try_get(), raw=False, use_list=True)

    assert len(benchmark(round_trip)[3]) == 5000
    _report(benchmark, 5000)
