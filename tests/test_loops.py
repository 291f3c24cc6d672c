"""The compiled per-record loops (`aggregator._loops`) against the reference methods of
worker.py and stages/gate.py: in-process workers on real LMDB shards fed the same records,
once with each, must store the same bytes in every table, publish the same change events,
forward the same updates, send the same dead letters and count the same stats.

The records take every path of the loops: malformed records (dead letters from the parse),
duplicates, events out of order (parked, then applied when the gap fills), stale events, a
park bound small enough to overflow (the gap policy), the rare route events of
test_route_twins, and the whole workload delivered a second time (records at or below the
through-offsets are skipped). `record_bytes` is held to `doc_codec.pack_record` byte for
byte.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import worker as worker_mod
from aggregator.devtools import simulate
from aggregator.doc_codec import pack_record
from aggregator.stages import gate
from aggregator.store import Shard
from tests import test_route_twins as rt
from tests import test_worker as tw
from tests.test_worker import make_cluster  # noqa: F401 - the fixture

_loops = pytest.importorskip("aggregator._loops")

pytestmark = pytest.mark.skipif(worker_mod.core.IMPLEMENTATION != "cython",
                                reason="AGGREGATOR_PURE_CORE=1: no compiled loops")

TABLES = ("views", "seq", "seq_log", "parked", "offsets", "links", "outbox", "changes")


def _tables(data_dir) -> dict:
    """Every row of the tables of every shard (the logs as written), but the time at
    which an event was parked."""
    out = {}
    for path in sorted(Path(data_dir).glob("shard-*")):
        shard = Shard(path, readonly=True)
        try:
            with shard.env.begin() as txn:
                for name in TABLES:
                    db = shard.db.get(name)
                    if db is None:
                        continue
                    rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
                    if name == "parked":  # [parked at (the clock), record]: the record
                        rows = [(k, msgpack.unpackb(v)[1]) for k, v in rows]
                    out[(path.name, name)] = rows
        finally:
            shard.close()
    return out


def _inventory(key: str, seq: int) -> tuple:
    return tw._event("inventory", "shop.inventory.adjusted", key, seq,
                     {"product_id": key, "delta": seq, "n": seq}, f"inv-{key}-{seq}")


def _strict_streams() -> list[tuple]:
    """Inventory (strict ordering) out of order: a stream whose gap fills (parked, then
    applied when the missing event comes), one whose park overflows the bound of 2 (the
    gap is skipped; its missing event, sent last, is stale), one left parked at the end."""
    fills = [_inventory("p-fill", s) for s in (1, 3, 4, 2, 5)]
    overflow = [_inventory("p-over", s) for s in (1, 3, 4, 5, 6)]
    waits = [_inventory("p-wait", s) for s in (1, 3)]
    return fills + overflow + waits


def _run(tmp_path, sub: str, n: int, records: list, chunk: int | None = None) -> dict:
    # a park bound of 2 per key overflows on the reordered streams: the gap policy runs
    c = rt.RecordingCluster(tmp_path / sub, n, {"gate.max_parked_per_key": 2,
                                                "gate.max_parked_total": 50})
    try:
        c.boot()
        if chunk is not None:
            for w in c.workers:
                w.apply_chunk = chunk
        recs = c.ring_records(records)
        c.feed(recs, random.Random(5), max_batch=150)
        c.feed(recs, random.Random(6), max_batch=400)  # again: every record skipped
        got = rt.outcome(c)
        got["tables"] = _tables(tmp_path / sub)
        return got
    finally:
        c.close()


@pytest.mark.parametrize("n", [1, 2])
def test_compiled_loops_store_publish_and_count_as_the_reference(tmp_path, monkeypatch, n):
    records = _workload(n)
    got = _run(tmp_path, "compiled", n, records)
    for name, fn in worker_mod.REFERENCE_LOOPS.items():
        monkeypatch.setattr(worker_mod.Worker, name, fn)
    monkeypatch.setattr(gate.GateStage, "_apply_gated", gate.REFERENCE_APPLY_GATED)
    ref = _run(tmp_path, "reference", n, records)
    s = got["stats"]
    # every path was taken
    assert s["DEADLETTERED"] > 10 and s["DUPLICATES"] > 50 and s["STALE"] > 0, s
    assert s["PARKED"] > 0 and s["GAPS_SKIPPED"] > 0, s
    assert s["RECORDS"] == len(records), s  # the second delivery was skipped whole
    assert got["stats"] == ref["stats"]
    assert got["dlq"] == ref["dlq"]
    assert got["published"] == ref["published"] and got["published"]
    assert got["forwarded"] == ref["forwarded"]
    assert got["views"] == ref["views"]
    assert got["tables"] == ref["tables"]
    assert got["tables"][("shard-0", "views")] or got["tables"][("shard-0", "seq_log")]


def _workload(n: int) -> list:
    w = simulate.generate(17, 1500, dup_rate=0.08, reorder_rate=0.1)
    records = list(w.records)
    rng = random.Random(n)
    for r in [*rt._rare_events(), *(tuple(b)[:4] for b in simulate.bad_records())]:
        records.insert(rng.randrange(len(records) + 1), r)
    return _strict_streams() + records + [_inventory("p-over", 2)]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_records_applied_in_passes_as_in_one(tmp_path, chunk):
    """A transaction's records go through read, dedup, gate and merge `apply_chunk` at a
    time (worker.APPLY_CHUNK): the same tables, change events, forwards, dead letters and
    counters as in one pass over the whole transaction. Duplicates, reordered and parked
    events, gaps that fill and a park that overflows fall across the passes' boundaries
    (transactions of up to 400 records)."""
    records = _workload(2)
    got = _run(tmp_path, f"chunk{chunk}", 2, records, chunk=chunk)
    one = _run(tmp_path, "one", 2, records, chunk=1 << 30)
    s = got["stats"]
    assert s["DUPLICATES"] > 50 and s["PARKED"] > 0 and s["GAPS_SKIPPED"] > 0, s
    for what in ("stats", "dlq", "published", "forwarded", "views", "tables"):
        assert got[what] == one[what], what


def test_the_compiled_loops_are_installed():
    """Unless AGGREGATOR_PURE_CORE=1 the worker runs the compiled loops; the reference
    methods stay reachable for the comparison."""
    assert worker_mod.Worker._read_records is _loops.read_records
    assert worker_mod.Worker._store_docs is _loops.store_docs
    assert worker_mod.Worker._seq_rows is _loops.seq_rows
    assert gate.GateStage._apply_gated is _loops.apply_gated
    assert worker_mod.REFERENCE_LOOPS["_read_records"] is not _loops.read_records


_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8)
    | st.binary(max_size=8) | st.floats(allow_nan=False),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8)
_versions = st.one_of(
    st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]),
    st.integers(0, 2**64 - 1), st.integers(-5, -1), st.just(2**64), st.booleans())
_bodies = st.one_of(st.none(), st.binary(max_size=40),
                    st.sampled_from([255, 256, 65535, 65536]).map(lambda k: b"x" * k))
_fresh = st.dictionaries(st.text(max_size=6),
                         st.tuples(st.none() | st.integers(0, 2**40),
                                   st.none() | st.text(max_size=10)).map(list), max_size=5)


@settings(max_examples=400, deadline=None)
@given(v=_versions, body=_bodies,
       fresh=_fresh | st.dictionaries(st.integers() | st.binary(max_size=4) | st.none(), _plain,
                                      max_size=2) | _plain,
       third=st.sampled_from(["j", "d", "x"]), extra=st.booleans())
def test_record_bytes_are_pack_records(v, body, fresh, third, extra):
    record = {"v": v, third: b"{}" if third == "j" else None, "s": fresh}
    if extra:
        record["k"] = 1  # a fourth key: pack_record's copy
    try:
        want = pack_record(record, body)
    except (OverflowError, ValueError, TypeError, msgpack.PackException) as e:
        with pytest.raises(type(e)):
            _loops.record_bytes(record, body)
        return
    assert _loops.record_bytes(record, body) == want
