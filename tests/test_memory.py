"""aggregator/memory.py (malloc_trim) on real allocations, the worker's trim
after its commits on a real shard, and bench.metrics.smaps_breakdown on real mappings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from aggregator import memory
from aggregator.config import ConfigError, load_config
from aggregator.devtools import simulate
from aggregator.ring import Ring
from bench.metrics import BREAKDOWN, smaps_breakdown
from tests import test_worker as tw
from tests.test_worker import make_cluster  # noqa: F401 - the fixture

MiB = 1 << 20


def _anon_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise AssertionError("no Anonymous line")


def test_trim_gives_back_the_free_pages_between_live_chunks():
    # 40 MiB of 4 KiB malloc chunks (bytes objects over 512 B come from malloc); every 16th
    # stays alive, so the heap cannot shrink from its top and free() keeps the pages
    chunks = [bytes(4000) + i.to_bytes(4, "little") for i in range(10_000)]
    keep = chunks[::16]
    del chunks
    before = _anon_kib()
    assert memory.trim()
    after = _anon_kib()
    assert before - after > 20 * 1024, (before, after)
    assert len(keep) == 625


def test_trimmer_interval():
    t = memory.Trimmer(0)
    assert not t.maybe() and t.trims == 0
    t = memory.Trimmer(60_000)
    assert t.maybe() and not t.maybe()
    assert t.trims == 1 and t.seconds >= 0.0


def test_config_documents_the_defaults():
    svc = load_config(None, {}, env={}).service
    assert svc.malloc_trim_interval_ms == 1000
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert "| `malloc_trim_interval_ms` | int, ≥ 0 | `1000` |" in doc
    assert f"| `ring_bytes` | size | `{svc.ring_bytes >> 20} MiB` |" in doc
    with pytest.raises(ConfigError, match="malloc_trim_interval_ms"):
        load_config(None, {"service.malloc_trim_interval_ms": -1}, env={})


@pytest.fixture(scope="module")
def events() -> simulate.Workload:
    return simulate.generate(7, tw.N_EVENTS)


def test_worker_trims_after_its_commits_on_a_real_shard(make_cluster, events,  # noqa: F811
                                                         monkeypatch):
    calls = []
    real = memory.trim
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or real())
    c = make_cluster(2, overrides={"service.malloc_trim_interval_ms": 1})
    recs = c.ring_records(events.records)
    half = len(recs) // 2
    c.dispatch(recs[:half])
    c.dispatch(recs[half:])
    c.settle()
    trims = sum(w.trimmer.trims for w in c.workers)
    assert trims >= 2 and len(calls) == trims
    tw.assert_views(c.views(), simulate.expected_views(events))


def test_worker_does_not_trim_when_off(make_cluster, events, monkeypatch):  # noqa: F811
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1))
    c = make_cluster(1, overrides={"service.malloc_trim_interval_ms": 0})
    c.dispatch(c.ring_records(events.records[:500]))
    assert calls == [] and c.workers[0].trimmer.trims == 0


def test_smaps_breakdown_sees_rings_lmdb_and_heap(tmp_path):
    name = f"aggtest-mem-{os.getpid()}"
    ring = Ring.create(name, 4 * MiB)
    env = lmdb.open(str(tmp_path / "db"), map_size=64 * MiB, sync=False)
    try:
        for _ in range(40):  # touch every page of the ring's data area
            ring.put(bytes(100_000))
            ring.get_many(10)
        with env.begin(write=True) as txn:
            for i in range(3000):
                txn.put(i.to_bytes(4, "big"), bytes(1000))
        with env.begin() as txn:  # read through the map
            assert sum(len(v) for _, v in txn.cursor()) == 3_000_000
        big = bytearray(16 * MiB)
        big[::4096] = b"x" * (len(big) // 4096)
        b = smaps_breakdown(os.getpid())
        assert set(b) == set(BREAKDOWN)
        assert b["shm"]["rss"] >= 3 * MiB
        assert b["lmdb"]["rss"] >= 2 * MiB
        assert b["heap"]["rss"] + b["anon_other"]["rss"] >= 16 * MiB
        assert b["code_files"]["rss"] > 0
        rollup = {}
        with open(f"/proc/{os.getpid()}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if v.strip().endswith("kB"):
                    rollup[k] = int(v.split()[0]) * 1024
        total = sum(c["rss"] for c in b.values())
        assert abs(total - rollup["Rss"]) < 4 * MiB  # every mapping counted once
        del big
    finally:
        env.close()
        ring.close()
        ring.unlink()


def test_smaps_breakdown_of_a_gone_process():
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True, check=True)
    assert smaps_breakdown(int(p.stdout)) is None


def test_smaps_breakdown_of_an_exiting_process_is_none():
    """A process that has exited but is not reaped yet (a zombie: what the sampler may meet
    at the end of a run) reads an empty smaps: no breakdown, rather than one of zeros."""
    p = subprocess.Popen(["true"])
    try:
        for _ in range(500):
            with open(f"/proc/{p.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        else:
            raise AssertionError("the child did not exit")
        assert smaps_breakdown(p.pid) is None
    finally:
        p.wait()
    assert smaps_breakdown(os.getpid())["code_files"]["rss"] > 0
