"""Micro-benchmark of the batch path: one `Worker.process()` call on 5,000 records.

Run: ``pytest bench/micro/bench_batch.py --benchmark-only`` (``--benchmark-disable``: smoke test).

A real `Worker` on a real LMDB shard in a temporary directory (``lmdb_sync`` as shipped:
on), driven in-process as in tests/test_worker.py: the harness creates the control block and
the rings, and hands `process()` decoded supervisor messages of 5,000 records each (the
simulated shop: JSON, msgpack and structured events, 5 % duplicates, 2 % reordered).
Every round takes the next batch of the stream (new offsets), so the shard grows as in
production. One worker owns every slot here (workers = 1, no forwarding). Compiled core
and the pure-Python twin side by side, each without the document cache (``-nocache``, as
shipped: every document read from LMDB and unpacked) and with it (``-cache``:
``service.doc_cache_bytes = 32 MiB``, documents of earlier batches come from it). The garbage
collector is tuned after the boot as in a worker process (`runtime.tune_gc`).

``extra_info["items_per_s"]`` is records per second from the mean time.
"""

from __future__ import annotations

import gc
import itertools
import types
import uuid

import pytest

import aggregator.worker as worker_mod
from aggregator import core_ref
from aggregator.config import load_config
from aggregator.protocol import create_segments
from aggregator.runtime import tune_gc
from aggregator.worker import Worker

try:
    from aggregator import _core
except ImportError:  # only acceptable when the pure core is forced
    _core = None

from bench import workload as wl

BATCH = 5000
ROUNDS = 12
CORES = [pytest.param(types.SimpleNamespace(BloomFilter=core_ref.BloomFilter,
                                            SequenceGate=core_ref.SequenceGate,
                                            IMPLEMENTATION="python"), id="python")]
if _core is not None:
    CORES.insert(0, pytest.param(types.SimpleNamespace(
        BloomFilter=_core.BloomFilter, SequenceGate=_core.SequenceGate,
        IMPLEMENTATION="cython"), id="cython"))
# (core, overrides): each core without the document cache (as shipped) and with it
VARIANTS = [pytest.param((c.values[0], extra), id=f"{c.id}-{name}")
            for c in CORES for name, extra in (("nocache", {}),
                                               ("cache", {"service.doc_cache_bytes": 32 << 20}))]


class NoDeadLetters:
    def send(self, rec, reason, message):
        raise AssertionError(f"unexpected dead letter: {reason}: {message}")

    def flush(self, timeout=30.0):
        pass

    def deliver(self, waiting):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def batches():
    """ROUNDS + 2 decoded supervisor messages of BATCH records each."""
    return wl.ring_messages(wl.generate(11, (ROUNDS + 2) * BATCH), BATCH)


@pytest.fixture
def worker(tmp_path, request, monkeypatch):
    core, extra = request.param
    monkeypatch.setattr(worker_mod, "core", core)
    cfg = load_config(wl.CONFIG_PATH, {"service.workers": 1,
                                       "service.data_dir": str(tmp_path / "data"),
                                       "service.ring_bytes": 8 << 20, **extra}, env={})
    prefix = f"agg-bench-batch-{uuid.uuid4().hex[:10]}"
    segments = create_segments(prefix, 1, 8 << 20, 8 << 20)
    w = Worker(cfg, 0, prefix)
    w.boot()
    w.dlq = NoDeadLetters()
    thresholds = gc.get_threshold()
    tune_gc()  # as worker_process does after the boot
    yield w
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    # No broker here: drop queued change events (if the build publishes them) instead of
    # waiting for their delivery at close.
    producer = getattr(getattr(w, "publisher", None), "producer", None)
    if producer is not None and hasattr(producer, "purge"):
        producer.purge()
    w.close()
    w.inbound.close()
    w.ctl.close()
    segments.close()


@pytest.mark.benchmark(group="worker-process-5000")
@pytest.mark.parametrize("worker", VARIANTS, indirect=True)
def test_worker_process(benchmark, worker, batches):
    it = itertools.cycle(batches)
    worker.process([next(it)], [])  # warm-up: the first batch creates the databases

    def next_batch():
        return ([next(it)], []), {}

    benchmark.pedantic(worker.process, setup=next_batch, rounds=ROUNDS, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.mean:
        benchmark.extra_info["items_per_s"] = round(BATCH / stats.stats.mean)
    cache = worker.doc_cache
    if cache is not None and cache.hits + cache.misses:
        benchmark.extra_info["doc_cache_hit_rate"] = round(
            cache.hits / (cache.hits + cache.misses), 3)
