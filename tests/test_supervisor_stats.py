"""The supervisor's Stats sum the workers' control-block counters (bench JSON, progress)."""

from __future__ import annotations

from types import SimpleNamespace

from aggregator.control import ControlBlock, Slot
from aggregator.metrics import prefix_of
from aggregator.protocol import ring_names
from aggregator.supervisor import Stats, Supervisor


def test_stats_sum_the_workers_counters_and_commits(tmp_path):
    ctl = ControlBlock.create(ring_names(prefix_of(tmp_path), 2)["control"], 2)
    try:
        ctl.add(0, Slot.APPLIED, 5)
        ctl.add(1, Slot.APPLIED, 7)
        ctl.add(0, Slot.COMMITS, 3)
        ctl.add(1, Slot.COMMITS, 4)
        ctl.add(0, Slot.COMMIT_NS, 2_500_000)
        ctl.add(1, Slot.COMMIT_NS, 500_000)
        sup = SimpleNamespace(stats=Stats(), ctl=ctl, workers=2)
        Supervisor._refresh_stats(sup)
        assert sup.stats.applied == 12
        assert sup.stats.commits == 7
        assert sup.stats.commit_ms == 3.0
    finally:
        ctl.counters.close()
        ctl.counters.unlink()
