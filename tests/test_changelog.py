"""The task changelog (changelog.py) on real LMDB files: what a batch captures, and what a
restore applies from a stream of changelog records — confirmed batches only, never the
tail of a batch cut short, nothing from a superseded owner."""

from __future__ import annotations

import lmdb
import msgpack
import pytest

from aggregator.batch_state import TaskBatchState
from aggregator.changelog import (
    DEDUP,
    OFFSETS,
    PARKED,
    SEQ,
    VIEWS,
    CapturingBatch,
    ChangelogError,
    Restore,
    drop_task,
    marker_key,
    meta_name,
    task_of,
)
from aggregator.store import Shard, offset_key

TASKS = 8
TOPIC = "g.tasks"


def sk(slot: int, n: int) -> bytes:
    return slot.to_bytes(2, "big") + n.to_bytes(16, "big")


def dk(slot: int, key: str) -> bytes:
    return slot.to_bytes(2, "big") + b"\x00" + key.encode()


@pytest.fixture
def shard(tmp_path):
    s = Shard(tmp_path / "shard-0", map_size=16 << 20, max_map_size=64 << 20, sync=False)
    yield s
    s.close()


@pytest.fixture
def other(tmp_path):
    s = Shard(tmp_path / "shard-1", map_size=16 << 20, max_map_size=64 << 20, sync=False)
    yield s
    s.close()


def capture(shard: Shard, fn) -> CapturingBatch:
    b = CapturingBatch(shard)
    fn(b)
    b.commit()
    return b


class Log:
    """A changelog partition in memory: records as the worker writes them."""

    def __init__(self):
        self.records: list[tuple[int, bytes, bytes | None, list]] = []

    def batch(self, epoch: int, seq: int, entries, marker: bool = True) -> None:
        hdr = [("b", msgpack.packb([epoch, seq]))]
        for code, key, value in entries:
            self.records.append((len(self.records), bytes((code,)) + key, value, hdr))
        if marker:
            self.mark(epoch, seq)

    def mark(self, epoch: int, seq: int) -> None:
        self.records.append((len(self.records), marker_key(epoch, seq),
                             msgpack.packb([epoch, seq]), []))

    def feed(self, r: Restore, start: int = 0) -> None:
        for rec in self.records[start:]:
            r.feed(*rec)


def doc(v: int) -> bytes:
    return msgpack.packb({"v": v, "d": {"n": v}, "s": {}})


def views(shard: Shard) -> dict[bytes, int]:
    with shard.env.begin(db=shard.db["views"]) as txn:
        return {bytes(k): msgpack.unpackb(v)["v"] for k, v in txn.cursor()}


# ---- capture ----------------------------------------------------------------------------


def test_capturing_batch_logs_every_change_of_task_state(shard):
    b = capture(shard, lambda b: (
        b.put_doc(dk(3, "a"), {"v": 1, "d": {}, "s": {}}),
        b.mark_seen(sk(3, 1), 0),
        b.put_seq(sk(11, 2), 5, "t", 0),
        b.park(sk(11, 2), 7, 1.0, [0, 0, 0]),
        b.put_offset(TOPIC, 3, 99),
    ))
    codes = [(c, k) for c, k, _ in b.log]
    assert codes == [(VIEWS, dk(3, "a")), (DEDUP, sk(3, 1)), (SEQ, sk(11, 2)),
                     (PARKED, sk(11, 2) + (7).to_bytes(8, "big")),
                     (OFFSETS, offset_key(TOPIC, 3))]
    assert set(b.by_task(TASKS)) == {3}  # slot 3 and 11 are task 3, and so is partition 3
    b2 = capture(shard, lambda b: (b.unpark(sk(11, 2), 7), b.delete_doc(dk(3, "a"))))
    assert [(c, v) for c, _, v in b2.log] == [(PARKED, None), (VIEWS, None)]


def test_pruned_dedup_generations_are_tombstones(shard):
    capture(shard, lambda b: [b.mark_seen(sk(s, s), 0) for s in range(4)])
    capture(shard, lambda b: b.mark_seen(sk(9, 9), 1))
    b = capture(shard, lambda b: b.drop_generations(0))
    assert sorted((c, k, v) for c, k, v in b.log) == [(DEDUP, sk(s, s), None) for s in range(4)]


def test_task_of():
    assert task_of(VIEWS, dk(4095, "x"), TASKS) == 4095 % TASKS
    assert task_of(OFFSETS, offset_key(TOPIC, 5), TASKS) == 5


# ---- restore ----------------------------------------------------------------------------


def test_restore_applies_confirmed_batches_and_drops_a_cut_short_tail(shard):
    log = Log()
    log.batch(1, 0, [])  # the claim
    log.batch(1, 1, [(VIEWS, dk(1, "a"), doc(1)), (DEDUP, sk(1, 1), b"")])
    log.batch(1, 2, [(VIEWS, dk(1, "a"), doc(2)), (OFFSETS, offset_key(TOPIC, 1),
                                                   (41).to_bytes(8, "big"))])
    log.batch(1, 3, [(VIEWS, dk(1, "a"), doc(3)), (VIEWS, dk(9, "b"), doc(1))], marker=False)
    r = Restore(shard, 1, generation=7)
    log.feed(r)
    r.finish()
    assert views(shard) == {dk(1, "a"): 2}  # batch 3 has no marker: none of it
    assert shard.offsets() == {(TOPIC, 1): 41}
    assert shard.get_meta(meta_name(1)) == [log.records[-3][0], 1, 2]  # batch 2's marker
    assert r.dedup_hashes == [sk(1, 1)[2:]]
    # dedup ids get the restoring worker's generation
    assert list(shard.dedup_entries()) == [(7, sk(1, 1)[2:])]


def test_seq_rows_travel_in_the_portable_form(shard, other):
    """The changelog carries [last, topic name, partition]: shards number topics their own
    way (store.py, meta seq_topics)."""
    b = capture(shard, lambda b: (b.put_seq(sk(1, 2), 5, "a", 0), b.put_seq(sk(1, 3), 6, "b", 1)))
    assert [msgpack.unpackb(v) for _, _, v in b.log] == [[5, "a", 0], [6, "b", 1]]
    log = Log()
    log.batch(1, 0, [])
    log.batch(1, 1, [(SEQ, sk(1, 3), msgpack.packb([6, "b", 1])),
                     (SEQ, sk(1, 2), msgpack.packb([5, "a", 0]))])
    r = Restore(other, 1, generation=0)
    log.feed(r)
    r.finish()
    assert other.seq_topics == ["b", "a"]
    w = other.begin()
    assert w.get_seq(sk(1, 2)) == [5, "a", 0] and w.get_seq(sk(1, 3)) == [6, "b", 1]
    w.abort()


def test_restore_ignores_a_superseded_owner(shard):
    log = Log()
    log.batch(1, 0, [])
    log.batch(1, 1, [(VIEWS, dk(1, "a"), doc(1))])
    log.batch(1, 2, [(VIEWS, dk(1, "a"), doc(99))], marker=False)  # cut short by the claim
    log.batch(2, 0, [])  # a new owner's claim
    log.batch(1, 2, [(VIEWS, dk(1, "a"), doc(98))])  # the old owner, still writing
    log.batch(2, 1, [(VIEWS, dk(1, "a"), doc(2))])
    log.batch(1, 3, [(VIEWS, dk(9, "z"), doc(1))])  # the old owner again
    r = Restore(shard, 1, generation=0)
    log.feed(r)
    r.finish()
    assert views(shard) == {dk(1, "a"): 2}
    assert r.max_epoch == 2 and r.epoch == 2


def test_a_batch_between_the_end_read_and_the_claim_is_applied(shard):
    """The previous owner completes a batch after the restorer read the end, before its
    claim: the restore goes on to its claim, so that batch (and its offset) is applied."""
    log = Log()
    log.batch(1, 0, [])
    log.batch(1, 1, [(VIEWS, dk(1, "a"), doc(1))])
    end = len(log.records)
    log.batch(1, 2, [(VIEWS, dk(1, "a"), doc(2))])
    log.batch(2, 0, [])  # the claim
    r = Restore(shard, 1, generation=0)
    for rec in log.records[:end]:
        r.feed(*rec)
    assert r.max_epoch == 1
    for rec in log.records[end:]:
        r.feed(*rec)
    r.finish()
    assert views(shard) == {dk(1, "a"): 2}
    assert shard.get_meta(meta_name(1)) == [len(log.records) - 1, 2, 0]


def test_restore_resumes_from_the_cached_offset(shard, other):
    """Restoring in two steps (the local cache, then the rest) equals one full restore."""
    log = Log()
    log.batch(1, 0, [])
    for i in range(1, 30):
        log.batch(1, i, [(VIEWS, dk(1, f"k{i % 5}"), doc(i)), (DEDUP, sk(1, i), b"")])
        if i % 7 == 0:
            log.batch(1, 100 + i, [(DEDUP, sk(1, i - 3), None)])
    half = len(log.records) // 2
    r = Restore(shard, 1, generation=0)
    for rec in log.records[:half]:
        r.feed(*rec)
    r.finish()
    r2 = Restore(shard, 1, generation=0)
    assert r2.start == shard.get_meta(meta_name(1))[0] + 1
    log.feed(r2, r2.start)
    r2.finish()
    full = Restore(other, 1, generation=0)
    log.feed(full)
    full.finish()
    assert views(shard) == views(other)
    assert list(shard.dedup_entries()) == list(other.dedup_entries())


def test_restore_commits_in_chunks_at_markers(shard, monkeypatch):
    monkeypatch.setattr("aggregator.changelog.CHUNK_RECORDS", 3)
    log = Log()
    log.batch(1, 0, [])
    for i in range(1, 6):
        log.batch(1, i, [(VIEWS, dk(1, f"k{i}"), doc(i))])
    r = Restore(shard, 1, generation=0)
    for rec in log.records[:8]:  # up to batch 3's marker and one record of batch 4
        r.feed(*rec)
    # a crash now: what was committed is a prefix of whole batches with its marker offset
    r.abort()
    committed = views(shard)
    pos = shard.get_meta(meta_name(1))[0]
    assert committed == {dk(1, f"k{i}"): i for i in range(1, 4)}  # the chunk up to batch 3
    assert log.records[pos][1][:1] == b"\0"


def test_a_record_without_its_batch_id_is_an_error(shard):
    r = Restore(shard, 1, generation=0)
    with pytest.raises(ChangelogError):
        r.feed(0, bytes((VIEWS,)) + dk(1, "a"), doc(1), [])


def test_drop_task_deletes_only_that_task(shard):
    capture(shard, lambda b: (
        b.put_doc(dk(1, "a"), {"v": 1, "d": {}, "s": {}}),
        b.put_doc(dk(9, "b"), {"v": 1, "d": {}, "s": {}}),  # task 1 too
        b.put_doc(dk(2, "c"), {"v": 1, "d": {}, "s": {}}),
        b.mark_seen(sk(1, 1), 0), b.mark_seen(sk(2, 2), 0),
        b.put_seq(sk(17, 3), 4, "t", 0), b.park(sk(17, 3), 6, 0.0, [0]),
        b.put_offset(TOPIC, 1, 10), b.put_offset(TOPIC, 2, 20),
        b.put_meta(meta_name(1), [5, 1, 1]),
    ))
    n = drop_task(shard, 1, TASKS, TOPIC)
    assert n == 5  # 2 documents, 1 dedup id, 1 sequence, 1 parked event
    assert views(shard) == {dk(2, "c"): 1}
    assert shard.offsets() == {(TOPIC, 2): 20}
    assert shard.get_meta(meta_name(1)) is None
    assert list(shard.dedup_entries()) == [(0, sk(2, 2)[2:])]


def test_a_claim_has_a_key_no_marker_shares():
    """Compaction keeps the latest record per key: a claim must never be superseded."""
    claims = {marker_key(e, 0) for e in range(1, 4)}
    markers = {marker_key(e, s) for e in range(1, 4) for s in range(1, 600)}
    assert len(claims) == 3 and not claims & markers
    assert marker_key(1, 1) == marker_key(1, 256) != marker_key(1, 257)


def test_pruned_dedup_ids_of_a_stale_task_are_not_written(shard):
    """A task kept locally as a cache (not owned now): the bloom filter's pruning deletes its
    old dedup ids locally, and that is no change of the task for the changelog."""
    import types

    from aggregator.task_worker import TaskWorker

    capture(shard, lambda b: (b.mark_seen(sk(1, 1), 0), b.mark_seen(sk(2, 2), 5)))
    b = CapturingBatch(shard)
    b.drop_generations(0)
    began = []
    fake = types.SimpleNamespace(tasks=TASKS, owned={2: [7, 3, 1]}, attempt=TaskBatchState({2}),
                                 change_msgs=None, index=0, _writer=lambda: began.append(1))
    TaskWorker._write_changelog(fake, b)  # nothing to write: no transaction at all
    assert began == []
    b.abort()


def test_a_restore_that_fills_the_map_resumes_after_growing(tmp_path):
    shard = Shard(tmp_path / "small", map_size=1 << 20, max_map_size=64 << 20, sync=False)
    log = Log()
    log.batch(1, 0, [])
    big = msgpack.packb({"v": 1, "d": "x" * 4000, "s": {}})
    for i in range(1, 600):
        log.batch(1, i, [(VIEWS, dk(1, f"k{i}"), big)])
    grown = 0
    while True:  # what worker._restore does
        r = Restore(shard, 1, 0)
        try:
            log.feed(r, max(r.start, 0))  # OFFSET_BEGINNING is negative
            r.finish()
            break
        except lmdb.MapFullError:
            r.abort()
            assert shard.grow()
            grown += 1
    assert grown >= 1
    assert len(views(shard)) == 599
    shard.close()
