"""task_manager.Holes: where to read a tasks-topic partition again from when a fetch left
records out (the supervisor seeks there; tests/cluster/test_placement.py has the whole
cluster through such holes)."""

from __future__ import annotations

import logging

from aggregator.task_manager import Holes


def test_a_hole_is_read_again_from_its_start(caplog):
    lows = {3: 0}
    h = Holes("g.tasks", lambda task: lows[task])
    with caplog.at_level(logging.WARNING, logger="aggregator.task_manager"):
        assert h.check(3, 100, 117) == 100
        assert h.check(3, 100, 117) == 100  # the same hole again: read again again
    assert h.count == 2
    assert "a fetch skipped offsets 100..116: reading again from 100" in caplog.text
    assert caplog.text.count("a fetch skipped") == 1  # at most once per 10 s


def test_a_hole_that_retention_removed_is_let_be(caplog):
    h = Holes("g.tasks", lambda task: 120)
    with caplog.at_level(logging.WARNING, logger="aggregator.task_manager"):
        assert h.check(1, 100, 117) is None
        assert h.check(1, 100, 120) is None
    assert h.count == 0
    assert "records 100..116 were deleted before they were read" in caplog.text


def test_a_hole_partly_removed_is_read_from_the_partition_start():
    h = Holes("g.tasks", lambda task: 110)
    assert h.check(0, 100, 117) == 110
    unknown = Holes("g.tasks", lambda task: -1)  # the watermark query failed
    assert unknown.check(0, 100, 117) == 100


def test_a_hole_that_every_read_shows_is_given_up(caplog):
    """Offsets really missing from the log (a compacted or transactional topic given as the
    tasks topic): after `TRIES` reads the task goes on, with an error, instead of stalling."""
    h = Holes("g.tasks", lambda task: 0)
    with caplog.at_level(logging.WARNING, logger="aggregator.task_manager"):
        assert [h.check(2, 40, 45) for _ in range(Holes.TRIES)] == [40] * Holes.TRIES
        assert h.check(2, 40, 45) is None
    assert "offsets 40..44 are missing from every read (5 tries): going on" in caplog.text
    assert h.check(2, 40, 45) == 40  # counted anew
    assert h.check(2, 46, 50) == 46 and h.check(2, 40, 45) == 40  # another hole between
