"""The commit watermark across workers (checkpoint.py)."""

from __future__ import annotations

from aggregator.checkpoint import Checkpoint

A, B = (0, 0), (0, 1)  # (topic index, partition)


def test_nothing_acked_nothing_committable():
    cp = Checkpoint(2)
    cp.assign(A, 0, [None, None])
    cp.dispatched(0, 1, {A: 10})
    cp.dispatched(1, 1, {A: 10})
    assert cp.watermark(A) is None
    assert cp.committable([A]) == []
    assert not cp.idle()


def test_watermark_is_min_over_workers():
    cp = Checkpoint(3)
    cp.assign(A, 0, [None] * 3)
    for w in range(3):
        cp.dispatched(w, 1, {A: 10})
        cp.dispatched(w, 2, {A: 20})
    cp.acked(0, 2)
    cp.acked(1, 1)
    assert cp.watermark(A) is None  # worker 2 has acknowledged nothing
    cp.acked(2, 2)
    assert cp.watermark(A) == 10
    cp.acked(1, 2)
    assert cp.watermark(A) == 20
    assert cp.idle()


def test_unacked_messages_hold_the_watermark_back():
    cp = Checkpoint(2)
    cp.assign(A, 0, [None, None])
    cp.assign(B, 0, [None, None])
    cp.dispatched(0, 1, {A: 5, B: 7})
    cp.dispatched(1, 1, {A: 5, B: 7})
    cp.dispatched(0, 2, {A: 9})
    cp.dispatched(1, 2, {A: 9})
    cp.dispatched(0, 3, None)  # a chunk without through-offsets
    cp.dispatched(0, 4, {A: 15, B: 16})
    cp.dispatched(1, 3, {A: 15, B: 16})
    cp.acked(0, 3)
    cp.acked(1, 3)
    assert cp.watermark(A) == 9  # worker 0's batch 4 is not acknowledged
    assert cp.watermark(B) == 7
    assert not cp.idle()
    cp.acked(0, 4)
    assert (cp.watermark(A), cp.watermark(B)) == (15, 16)
    assert cp.idle()


def test_ack_covers_every_earlier_batch_and_never_goes_back():
    cp = Checkpoint(1)
    cp.assign(A, 0, [None])
    cp.dispatched(0, 1, {A: 3})
    cp.dispatched(0, 2, {A: 8})
    cp.dispatched(0, 3, {A: 6})  # a rewound partition: lower through, must not lower it
    cp.acked(0, 3)
    assert cp.watermark(A) == 8
    cp.acked(0, 3)  # repeated ack: harmless
    cp.acked(0, 1)  # stale ack: harmless
    assert cp.watermark(A) == 8


def test_committable_only_when_moved():
    cp = Checkpoint(2)
    cp.assign(A, 0, [None, None])
    cp.assign(B, 0, [None, None])
    for w in range(2):
        cp.dispatched(w, 1, {A: 4})
    cp.acked(0, 1)
    cp.acked(1, 1)
    assert cp.committable([A, B]) == [(A, 4)]  # B has no watermark
    assert cp.committable([A, B]) == []  # not moved
    for w in range(2):
        cp.dispatched(w, 2, {A: 4, B: 1})
        cp.acked(w, 2)
    assert cp.committable([A, B]) == [(B, 1)]
    for w in range(2):
        cp.dispatched(w, 3, {A: 5})
    cp.acked(0, 3)
    assert cp.committable([A]) == []
    cp.acked(1, 3)
    assert cp.committable([A]) == [(A, 5)]
    assert cp.committable({A}) == []


def test_committable_restricted_to_the_given_partitions():
    cp = Checkpoint(1)
    cp.assign(A, 0, [None])
    cp.assign(B, 0, [None])
    cp.dispatched(0, 1, {A: 1, B: 2})
    cp.acked(0, 1)
    assert cp.committable([B]) == [(B, 2)]
    assert cp.committable([A, B]) == [(A, 1)]


def test_assign_with_full_durable_offsets():
    cp = Checkpoint(2)
    cp.assign(A, 11, [10, 12])
    assert cp.assign_start[A] == 11
    assert cp.watermark(A) == 10
    assert cp.committable([A]) == [(A, 10)]


def test_assign_with_partial_durable_offsets():
    cp = Checkpoint(3)
    cp.assign(A, 0, [40, None, 35])
    assert cp.watermark(A) is None  # worker 1 holds nothing of A yet
    assert cp.committable([A]) == []
    # the partition is re-read from 0; every worker gets the through-offsets
    for w in range(3):
        cp.dispatched(w, 1, {A: 20})
    for w in range(3):
        cp.acked(w, 1)
    # workers 0 and 2 skip records at or below their own durable offset: no regression
    assert cp.acked_through[0][A] == 40 and cp.acked_through[2][A] == 35
    assert cp.watermark(A) == 20
    for w in range(3):
        cp.dispatched(w, 2, {A: 38})
        cp.acked(w, 2)
    assert cp.watermark(A) == 38
    assert cp.committable([A]) == [(A, 38)]


def test_reassign_forgets_the_last_commit_and_stale_offsets():
    cp = Checkpoint(2)
    cp.assign(A, 0, [None, None])
    for w in range(2):
        cp.dispatched(w, 1, {A: 9})
        cp.acked(w, 1)
    assert cp.committable([A]) == [(A, 9)]
    # revoked and assigned again (another instance may have moved it meanwhile)
    cp.assign(A, 20, [19, None])
    assert cp.watermark(A) is None
    cp.assign(A, 20, [19, 25])
    assert cp.committable([A]) == [(A, 19)]  # committed again after a reassignment


def test_reset_worker_drops_inflight_and_keeps_durable():
    cp = Checkpoint(2)
    cp.assign(A, 0, [None, None])
    cp.assign(B, 0, [None, None])
    for w in range(2):
        cp.dispatched(w, 1, {A: 10, B: 10})
        cp.acked(w, 1)
        cp.dispatched(w, 2, {A: 20, B: 20})
    cp.acked(1, 2)
    # worker 0 died; its shard holds A through 15 (e.g. a later ack it never reported)
    cp.reset_worker(0, {A: 15})
    assert cp.inflight[0] == type(cp.inflight[0])()
    assert cp.watermark(A) == 15
    assert cp.watermark(B) is None  # nothing of B durable in shard 0
    assert cp.idle()
    # the old ack counter of the dead process must not acknowledge new batches
    cp.dispatched(0, 3, {A: 20, B: 20})
    cp.acked(0, 2)
    assert cp.watermark(A) == 15
    cp.acked(0, 3)
    assert (cp.watermark(A), cp.watermark(B)) == (20, 20)


def test_reset_worker_copies_the_durable_dict():
    cp = Checkpoint(1)
    durable = {A: 3}
    cp.reset_worker(0, durable)
    cp.dispatched(0, 1, {A: 9})
    cp.acked(0, 1)
    assert durable == {A: 3}
    assert cp.watermark(A) == 9
