"""placement.py: owned tasks on local workers, balanced by count, sticky to cached state."""

from __future__ import annotations

import random

from aggregator.placement import Placement


def test_odd_tasks_spread_over_two_workers():
    """Issue 17: the group gives an instance tasks [1, 3, 5, ...]; `task % 2` put them all on
    worker 1. Placed by what it owns, each worker gets half."""
    p = Placement(2)
    placed = p.place([1, 3, 5, 7, 9, 11])
    assert p.counts() == [3, 3]
    assert sorted(placed) == [1, 3, 5, 7, 9, 11]
    q = Placement(2)
    q.place([0, 2, 4, 6, 8, 10])
    assert q.counts() == [3, 3]


def test_cached_state_is_sticky_while_balanced():
    p = Placement(2)
    placed = p.place([0, 1, 2, 3], cached={0: 1, 1: 1, 2: 1, 3: 0})
    assert p.counts() == [2, 2]
    assert placed[3] == 0
    assert sum(placed[t] == 1 for t in (0, 1, 2)) == 2  # two of the three keep their cache
    assert p.moves() == []


def test_takeover_fills_the_lighter_worker():
    p = Placement(2)
    p.place([1, 3, 5])
    p.remove([1])  # counts 1/1 or so
    p.place([0, 2, 4, 6, 8, 10])
    c = p.counts()
    assert max(c) - min(c) <= 1 and sum(c) == 8


def test_moves_after_revokes():
    p = Placement(2)
    p.place(list(range(8)))
    gone = p.tasks_of(0)[:3]  # a joiner takes three tasks, all of worker 0
    p.remove(gone)
    assert p.counts() == [1, 4]
    moves = p.moves()
    assert len(moves) == 1 and moves[0][1:] == (1, 0)
    p.move(moves[0][0], 0)
    assert p.counts() == [2, 3]
    assert p.moves() == []


def test_random_sequences_stay_balanced():
    rnd = random.Random(17)
    for workers in (1, 2, 3, 4):
        p = Placement(workers)
        for _ in range(300):
            owned = set(p.worker_of)
            free = [t for t in range(24) if t not in owned]
            if owned and rnd.random() < 0.5:
                p.remove(rnd.sample(sorted(owned), rnd.randint(1, len(owned))))
            elif free:
                gain = rnd.sample(free, rnd.randint(1, len(free)))
                cached = {t: rnd.randrange(workers) for t in gain if rnd.random() < 0.5}
                before = p.counts()
                p.place(gain, cached)
                after = p.counts()
                # placing alone balances unless the counts were unbalanced before
                if max(before) - min(before) <= 1:
                    assert max(after) - min(after) <= 1, (before, after, gain, cached)
            for t, _, new in p.moves():
                p.move(t, new)
            c = p.counts()
            assert max(c) - min(c) <= 1, c
            assert sorted(p.worker_of) == sorted(set(p.worker_of))
