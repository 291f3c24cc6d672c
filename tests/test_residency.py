"""The resident budget of a shard's map (residency.py, service.lmdb_resident_bytes) on real
LMDB files: the data.mdb mapping's Rss (/proc/self/smaps) stays under the budget plus one
transaction's pages, with and without WRITEMAP, across map growth; everything reads back the
same, in this process and in a read-only reader process; a budget of 0 never calls madvise."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest

from aggregator import residency
from aggregator.store import Shard, view_key

MiB = 1 << 20
BUDGET = 8 * MiB
DOC = 2000  # bytes of a document's payload: ~1,000 documents = one ~2 MiB transaction
PER_TXN = 1000
TXNS = 40  # ~80 MiB of documents


def map_rss(path: Path) -> int:
    """Rss of this process's mappings of `path` (/proc/self/smaps)."""
    name = str(path.resolve())
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                inside = len(head) == 6 and head[5].strip() == name
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def _doc(i: int) -> dict:
    return {"v": 1, "d": {"n": i, "pad": f"{i:08d}" * (DOC // 8)}, "s": {}}


def _key(i: int) -> bytes:
    return view_key(i.to_bytes(2, "big"), 0, f"k{i}")


def _write(shard: Shard, order: list[int], probe=None) -> dict:
    """Commit the documents of `order` in PER_TXN transactions as the worker does (grow ahead,
    MAP_FULL: abort, grow, retry), each one a checkpoint of the document log, so that every
    transaction writes ``views`` at random keys through the map; `probe(stage)` is called
    inside each transaction before the commit and after it. Returns {"txn_peak": the largest
    Rss one transaction added}."""
    txn_peak = 0
    for t in range(0, len(order), PER_TXN):
        while True:
            shard.grow_ahead()
            before = map_rss(shard.path / "data.mdb")
            b = shard.begin()
            try:
                for i in order[t:t + PER_TXN]:
                    b.put_doc(_key(i), _doc(i))
                b.checkpoint_docs()  # into views at random keys (not only the appended log)
                if probe:
                    probe("in")
                txn_peak = max(txn_peak, map_rss(shard.path / "data.mdb") - before)
                b.commit()
                break
            except lmdb.MapFullError:
                b.abort()
                assert shard.grow()
        if probe:
            probe("after")
    return {"txn_peak": txn_peak}


def _digest(shard: Shard) -> str:
    h = hashlib.sha256()
    with shard.env.begin() as txn:
        for k, v in txn.cursor(db=shard.db["views"]):
            h.update(bytes(k) + bytes(v))
    return h.hexdigest()


READER = textwrap.dedent("""
    import hashlib, sys
    from aggregator.store import Shard
    r = Shard(sys.argv[1], readonly=True)
    h = hashlib.sha256()
    with r.env.begin() as txn:
        for k, v in txn.cursor(db=r.db["views"]):
            h.update(bytes(k) + bytes(v))
    r.close()
    print(h.hexdigest())
""")


@pytest.mark.parametrize("writemap", [False, True], ids=["pwrite", "writemap"])
def test_budget_bounds_the_resident_map_and_everything_reads_back(tmp_path, writemap):
    path = tmp_path / "shard-0"
    order = list(range(TXNS * PER_TXN))
    random.Random(7).shuffle(order)  # random keys: each transaction touches pages all over
    s = Shard(path, map_size=4 * MiB, max_map_size=1 << 30, sync=False, writemap=writemap,
              resident_bytes=BUDGET)
    data = path / "data.mdb"
    after, inside = [], []
    try:
        assert s.residency is not None
        got = _write(s, order, lambda stage: (after if stage == "after" else inside)
                     .append(map_rss(data)))
        assert s.env.info()["map_size"] >= 64 * MiB  # grown (moved) several times
        assert s.residency.drops >= 3
        # between transactions: under the budget (+ the few pages resident at the baseline)
        assert max(after) <= BUDGET + 256 * 1024, after
        # within one: the budget + that transaction's pages
        assert max(inside) <= BUDGET + got["txn_peak"] + 256 * 1024, (inside, got)
        for i in random.Random(8).sample(order, 2000):  # the store's own read path
            b = s.begin()
            try:
                assert b.get_doc(_key(i)) == _doc(i)
            finally:
                b.abort()
        assert sum(1 for _ in s.documents(["v"])) == len(order)  # every record unpacks
        mine = _digest(s)
        r = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() == mine
    finally:
        s.close()
    s = Shard(path, sync=False, writemap=writemap)  # reopened: the same bytes
    try:
        assert _digest(s) == mine
    finally:
        s.close()


@pytest.mark.parametrize("writemap", [False, True], ids=["pwrite", "writemap"])
def test_a_budget_of_zero_never_calls_madvise(tmp_path, monkeypatch, writemap):
    def refuse(*a):
        raise AssertionError("madvise called")

    monkeypatch.setattr(residency, "_madvise", refuse)
    path = tmp_path / "shard-0"
    s = Shard(path, map_size=64 * MiB, sync=False, writemap=writemap, resident_bytes=0)
    try:
        assert s.residency is None
        order = list(range(12 * PER_TXN))
        random.Random(7).shuffle(order)
        _write(s, order)
        b = s.begin()  # reads touch every page: all of them stay mapped
        try:
            assert all(b.get_doc(_key(i)) == _doc(i) for i in order)
        finally:
            b.abort()
        assert map_rss(path / "data.mdb") > 2 * BUDGET  # what the budget bounds otherwise
    finally:
        s.close()


def test_a_small_shard_under_the_budget_is_never_dropped(tmp_path):
    s = Shard(tmp_path / "s", map_size=64 * MiB, sync=False, writemap=True,
              resident_bytes=64 * MiB)
    try:
        _write(s, list(range(3 * PER_TXN)))
        assert s.residency.drops == 0
    finally:
        s.close()


def test_a_failed_madvise_leaves_the_commit_and_turns_the_budget_off(tmp_path, monkeypatch):
    monkeypatch.setattr(residency, "_madvise", lambda *a: -1)
    s = Shard(tmp_path / "s", map_size=64 * MiB, sync=False, writemap=True,
              resident_bytes=1 * MiB)
    try:
        _write(s, list(range(2 * PER_TXN)))  # commits go on
        assert s.residency is None
        assert sum(1 for _ in s.documents(["v"])) == 2 * PER_TXN
    finally:
        s.close()


def test_shared_mappings_finds_the_map_where_it_is(tmp_path):
    """py-lmdb's info()["map_addr"] is LMDB's fixed-map address (0), not the map: the map is
    found in /proc/self/maps, again after a grow moved it."""
    s = Shard(tmp_path / "s", map_size=1 * MiB, sync=False, writemap=True)
    try:
        assert s.env.info()["map_addr"] == 0
        (start, end), = residency.shared_mappings(s.path / "data.mdb")
        assert end - start == 1 * MiB
        s.grow()
        (start, end), = residency.shared_mappings(s.path / "data.mdb")
        assert end - start == 2 * MiB
    finally:
        s.close()


def test_the_default_is_documented():
    from aggregator.config import load_config

    svc = load_config(None, {}, env={}).service
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert f"| `lmdb_resident_bytes` | size, ≥ 0 | `{svc.lmdb_resident_bytes >> 20} MiB` |" in doc
