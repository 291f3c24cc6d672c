"""The sequence log of format 4 (store.py): each commit's dirty seq rows appended as one
``seq_log`` record, checkpointed into ``seq`` (one putmulti, the log dropped) in the
transaction of a batch; every reader sees ``seq`` with the log overlaid."""

from __future__ import annotations

import random

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.changelog import CapturingBatch
from aggregator.store import (
    SEQ_LOG_ENTRY,
    SEQ_ROW,
    Shard,
    ShardError,
    parse_seq_value,
    seq_log_rows,
)
from tests import test_store
from tests.test_store import gk

_commit, _table = test_store.commit, test_store.table
shard = test_store.shard  # the same fixture: a shard in each LMDB mode (pwrite, writemap)


def _overlaid(shard: Shard) -> dict[bytes, list]:
    return {k: parse_seq_value(v, shard.seq_topics) for k, v in shard.seq_rows()}


def test_a_commit_logs_one_record_and_a_checkpoint_moves_the_rows(shard):
    rows = [(gk(3, 1), 5, "a", 0), (gk(1, 2), 7, "b", 1)]
    _commit(shard, lambda b: b.put_seqs(rows))
    log = _table(shard, "seq_log")
    assert list(log) == [(1).to_bytes(8, "big")]  # one record per commit, sequential key
    assert len(log[(1).to_bytes(8, "big")]) == 2 * SEQ_LOG_ENTRY == 64
    assert _table(shard, "seq") == {}
    assert shard.seq_logged == 2 and set(shard.seq_pending) == {gk(3, 1), gk(1, 2)}
    _commit(shard, lambda b: b.put_seqs([(gk(3, 1), 6, "a", 0)]))
    assert list(_table(shard, "seq_log")) == [(1).to_bytes(8, "big"), (2).to_bytes(8, "big")]
    b = shard.begin()
    assert b.get_seq(gk(3, 1)) == [6, "a", 0] and b.get_seq(gk(1, 2)) == [7, "b", 1]
    assert b.seq_log_rows == 3
    b.abort()
    assert _commit(shard, lambda b: b.checkpoint_seqs()) == 2
    assert _table(shard, "seq_log") == {}
    assert {k: parse_seq_value(v, shard.seq_topics) for k, v in _table(shard, "seq").items()} \
        == {gk(3, 1): [6, "a", 0], gk(1, 2): [7, "b", 1]}
    assert shard.seq_logged == 0 and shard.seq_pending == {}
    _commit(shard, lambda b: b.put_seqs([(gk(1, 2), 8, "b", 1)]))  # the log starts again
    assert list(_table(shard, "seq_log")) == [(1).to_bytes(8, "big")]
    assert _overlaid(shard) == {gk(3, 1): [6, "a", 0], gk(1, 2): [8, "b", 1]}


def test_rows_logged_after_a_checkpoint_in_the_same_transaction(shard):
    _commit(shard, lambda b: b.put_seqs([(gk(1, 1), 1, "a", 0), (gk(1, 2), 1, "a", 0)]))

    def batch(b):
        b.put_seqs([(gk(1, 1), 2, "a", 0)])
        assert b.checkpoint_seqs() == 2
        assert b.get_seq(gk(1, 1)) == [2, "a", 0]  # from seq now, not the older log row
        b.put_seqs([(gk(1, 2), 3, "a", 0)])
        assert b.seq_log_rows == 1
    _commit(shard, batch)
    assert shard.seq_logged == 1 and list(shard.seq_pending) == [gk(1, 2)]
    assert _overlaid(shard) == {gk(1, 1): [2, "a", 0], gk(1, 2): [3, "a", 0]}
    shard.reopen()  # the log read back from the file
    assert shard.seq_logged == 1 and shard.seq_log_last == 1
    assert _overlaid(shard) == {gk(1, 1): [2, "a", 0], gk(1, 2): [3, "a", 0]}


def test_an_aborted_batch_leaves_log_and_checkpoint_as_they_were(shard):
    _commit(shard, lambda b: b.put_seqs([(gk(1, 1), 1, "a", 0)]))
    b = shard.begin()
    b.put_seqs([(gk(1, 1), 9, "z", 0)])
    b.checkpoint_seqs()
    b.abort()
    assert shard.seq_logged == 1 and shard.seq_topics == ["a"]
    assert _table(shard, "seq") == {} and len(_table(shard, "seq_log")) == 1
    b = shard.begin()
    assert b.get_seq(gk(1, 1)) == [1, "a", 0]
    b.abort()


def test_readers_see_the_log_overlaid(shard):
    _commit(shard, lambda b: (b.put_seqs([(gk(2, 1), 4, "a", 0), (gk(2, 2), 4, "a", 0)]),
                              b.checkpoint_seqs()))
    _commit(shard, lambda b: (b.put_seqs([(gk(2, 2), 6, "a", 0), (gk(1, 3), 1, "b", 2)]),
                              b.park(gk(2, 2), 9, 1.5, [0]), b.park(gk(1, 3), 3, 2.5, [1])))
    want = {gk(1, 3): [1, "b", 2], gk(2, 1): [4, "a", 0], gk(2, 2): [6, "a", 0]}
    assert _overlaid(shard) == want and list(_overlaid(shard)) == sorted(want)  # key order
    parked = shard.parked_streams()
    assert parked[gk(2, 2)][0] == [6, "a", 0] and parked[gk(1, 3)][0] == [1, "b", 2]
    snap = shard.snapshot()  # what the reshard reads
    try:
        assert {k: parse_seq_value(v, shard.seq_topics)
                for k, v in snap.seq_rows(gk(2, 0)[:2])} == \
            {gk(2, 1): [4, "a", 0], gk(2, 2): [6, "a", 0]}
        assert snap.seq_entries() == 3 and snap.entries("seq") == 2
        assert snap.entries_of()["seq"] == 3  # what `aggregator stats` shows
    finally:
        snap.close()


def test_fold_and_the_writers_that_bypass_the_log(shard):
    """Cluster mode writes seq rows straight into seq (CapturingBatch), the restore with
    RawWrite: both refuse a shard with a non-empty log, which `fold_seq_log` checkpoints."""
    _commit(shard, lambda b: b.put_seqs([(gk(1, 1), 1, "a", 0)]))
    b = CapturingBatch(shard)
    with pytest.raises(ShardError, match="non-empty log"):
        b.put_seqs([(gk(1, 2), 1, "a", 0)])
    b.abort()
    with pytest.raises(ShardError, match="non-empty log"):
        with shard.raw_write() as w:
            w.put_seq(gk(1, 2), 1, "a", 0)
    assert shard.fold_seq_log() == 1 and shard.fold_seq_log() == 0
    assert _table(shard, "seq_log") == {} and shard.seq_pending == {}
    b = CapturingBatch(shard)
    b.put_seqs([(gk(1, 2), 2, "a", 0)])
    b.commit()
    assert _table(shard, "seq_log") == {}
    assert _overlaid(shard) == {gk(1, 1): [1, "a", 0], gk(1, 2): [2, "a", 0]}


def test_a_seq_key_of_another_size_is_refused(shard):
    b = shard.begin()
    with pytest.raises(ValueError, match="seq keys"):
        b.put_seqs([(b"short", 1, "a", 0)])
    b.abort()


# ---- random operation sequences against a model -----------------------------------------------

_OPS = st.lists(st.tuples(st.sampled_from(["batch", "batch", "batch", "abort", "reopen"]),
                          st.lists(st.tuples(st.integers(0, 5), st.integers(0, 11),
                                             st.integers(-3, 50)), max_size=6),
                          st.sampled_from([None, "before", "after"])),
                max_size=25)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_random_batches_checkpoints_aborts_and_reopens(tmp_path_factory, ops):
    """Any sequence of logged batches (some with a checkpoint before or after more rows),
    aborted batches and reopens (a kill: only the file is left) reads as a model dict of
    the committed rows, through every reader."""
    s = Shard(tmp_path_factory.mktemp("seqlog") / "shard-0", map_size=16 << 20, sync=False)
    model: dict[bytes, list] = {}
    try:
        for op, rows, ckpt in ops:
            if op == "reopen":
                s.close()
                s = Shard(s.path, map_size=16 << 20, sync=False)
                continue
            rows = [(gk(slot, n), last, f"t{n % 3}", n) for slot, n, last in rows]
            half = len(rows) // 2
            b = s.begin()
            b.put_seqs(rows[:half])
            if ckpt == "before":
                b.checkpoint_seqs()
            b.put_seqs(rows[half:])
            if ckpt == "after":
                b.checkpoint_seqs()
            got = {g: b.get_seq(g) for g, *_ in rows}
            want = {**model, **{g: [last, t, p] for g, last, t, p in rows}}
            assert got == {g: want[g] for g in got}
            if op == "abort":
                b.abort()
                continue
            b.commit()
            model = want
            assert _overlaid(s) == model
            with s.env.begin() as txn:
                logged, _, n = seq_log_rows(txn, s.db["seq_log"])
            assert logged == s.seq_pending and n == s.seq_logged
        b = s.begin()
        assert {g: b.get_seq(g) for g in model} == model
        b.abort()
    finally:
        s.close()


def test_log_records_are_fixed_size_entries(shard):
    rng = random.Random(3)
    rows = [(gk(rng.randrange(9), i), rng.randrange(-5, 99), "t", i) for i in range(300)]
    _commit(shard, lambda b: b.put_seqs(rows))
    (value,) = _table(shard, "seq_log").values()
    assert len(value) == 300 * SEQ_LOG_ENTRY
    for i, (g, last, _, part) in enumerate(rows):
        e = value[i * SEQ_LOG_ENTRY:(i + 1) * SEQ_LOG_ENTRY]
        assert e[:18] == g and SEQ_ROW.unpack(e[18:]) == (last, 0, part)


def test_map_full_in_a_checkpoint_keeps_nothing(tmp_path):
    """A checkpoint that does not fit rolls back with its batch: the log, the rows and the
    shard's in-memory state are those of the commit before, also after a reopen."""
    s = Shard(tmp_path / "s", map_size=1 << 20, max_map_size=1 << 20, sync=False)
    try:
        _commit(s, lambda b: b.put_seqs([(gk(i % 50, i), i, "t", 0) for i in range(3000)]))
        n = 0
        while True:  # grow the seq table until a checkpoint no longer fits
            n += 1
            assert n < 200
            _commit(s, lambda b: b.put_seqs(  # a non-empty log before each checkpoint
                [(gk(n % 5, 900_000 + n * 50 + j), j, "t", 1) for j in range(50)]))
            before, logged, log = _overlaid(s), s.seq_logged, _table(s, "seq_log")
            try:
                _commit(s, lambda b: (b.put_seqs([(gk(n % 7, 10_000 + n * 500 + j), j, "t", 0)
                                                  for j in range(500)]), b.checkpoint_seqs()))
            except lmdb.MapFullError:
                break
        assert logged > 0 and s.seq_logged == logged
        assert _overlaid(s) == before and _table(s, "seq_log") == log
        s.close()
        s = Shard(tmp_path / "s", map_size=1 << 20, max_map_size=1 << 20, sync=False)
        assert s.seq_logged == logged and _overlaid(s) == before
    finally:
        s.close()
