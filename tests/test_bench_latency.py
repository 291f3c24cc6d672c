"""bench/stages/latency.py's pacing guard and bench/run.py's latency variants."""

from __future__ import annotations

import gc

import pytest

from bench.run import parse_args
from bench.stages.latency import steady_pacing


@pytest.fixture
def collector():
    """An enabled collector with nothing frozen, and set back so after the test."""
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()


def test_steady_pacing_freezes_and_stops_the_collector_then_restores_it(collector):
    held = [[i] for i in range(1000)]  # containers the collector would traverse
    with steady_pacing():
        assert not gc.isenabled()
        assert gc.get_freeze_count() >= len(held)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_steady_pacing_restores_the_collector_after_an_error(collector):
    with pytest.raises(RuntimeError), steady_pacing():
        raise RuntimeError("paced run failed")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_steady_pacing_leaves_a_disabled_collector_disabled(collector):
    gc.disable()
    with steady_pacing():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_steady_pacing_leaves_an_earlier_freeze_frozen(collector):
    gc.freeze()  # as a worker's runtime.tune_gc does
    frozen = gc.get_freeze_count()
    with steady_pacing():
        pass
    assert gc.get_freeze_count() >= frozen > 0


def test_latency_variants_pair_each_fetch_wait_with_each_producer_linger():
    full = parse_args([])
    assert full.latency_variants == [({}, {"linger.ms": 5}), ({}, {"linger.ms": 50})]
    assert parse_args(["--quick"]).latency_variants == [({}, {"linger.ms": 5})]
    both = parse_args(["--latency-fetch-wait-ms", "default,10", "--latency-linger-ms", "20"])
    assert both.latency_variants == [({}, {"linger.ms": 20}),
                                     ({"fetch.wait.max.ms": 10}, {"linger.ms": 20})]
    with pytest.raises(SystemExit):
        parse_args(["--latency-linger-ms", "5ms"])
    with pytest.raises(SystemExit):
        parse_args(["--latency-linger-ms", "default"])  # the producer's has no 'default'
    with pytest.raises(SystemExit):
        parse_args(["--latency-fetch-wait-ms", "soon"])
