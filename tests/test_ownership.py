"""ownership.py's board: tasks unowned as last seen, from the instances' records."""

from __future__ import annotations

import msgpack

from aggregator.ownership import OwnersBoard


def rec(tasks, interval_ms=1000) -> bytes:
    return msgpack.packb([tasks, interval_ms])


def test_unowned_from_live_records():
    b = OwnersBoard(8)
    b.update(b"a", rec([0, 2, 4, 6]), ts=100.0)
    b.update(b"b", rec([1, 3, 5]), ts=100.0)
    assert b.unowned(101.0, mine=set()) == [7]
    assert b.unowned(101.0, mine={7}) == []
    # b's last record is older than 3 intervals: b counts as gone (a published again)
    b.update(b"a", rec([0, 2, 4, 6]), ts=103.0)
    assert b.unowned(103.5, mine={7}) == [1, 3, 5]
    b.update(b"b", rec([1, 3, 5]), ts=103.2)
    assert b.unowned(103.5, mine={7}) == []


def test_own_record_is_replaced_by_the_live_set_and_tombstones_remove():
    b = OwnersBoard(4)
    b.update(b"me", rec([0, 1, 2, 3]), ts=10.0)
    assert b.unowned(10.5, mine={0, 1}, me=b"me") == [2, 3]  # mine is what counts
    b.update(b"x", rec([2, 3]), ts=10.0)
    assert b.unowned(10.5, mine={0, 1}, me=b"me") == []
    b.update(b"x", None, ts=11.0)  # a clean stop
    assert b.unowned(11.0, mine={0, 1}, me=b"me") == [2, 3]


def test_foreign_values_are_ignored():
    b = OwnersBoard(2)
    b.update(b"junk", b"\xc1", ts=1.0)
    b.update(b"junk2", msgpack.packb({"a": 1}), ts=1.0)
    assert b.unowned(1.0, mine=set()) == [0, 1]
