"""bench/stages/latency.py's pacing guard and bench/run.py's latency variants."""

from __future__ import annotations

import gc

import pytest

from bench.run import parse_args
from bench.stages.latency import steady_pacing


def test_steady_pacing_freezes_and_stops_the_collector_then_restores_it():
    held = [[i] for i in range(1000)]  # containers the collector would traverse
    assert gc.isenabled()
    with steady_pacing():
        assert not gc.isenabled()
        assert gc.get_freeze_count() >= len(held)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_steady_pacing_restores_the_collector_after_an_error():
    with pytest.raises(RuntimeError), steady_pacing():
        raise RuntimeError("paced run failed")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_steady_pacing_leaves_a_disabled_collector_disabled():
    gc.disable()
    try:
        with steady_pacing():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_latency_variants_pair_each_fetch_wait_with_each_producer_linger():
    full = parse_args([])
    assert full.latency_variants == [({}, {"linger.ms": 5}), ({}, {"linger.ms": 50})]
    assert parse_args(["--quick"]).latency_variants == [({}, {"linger.ms": 5})]
    both = parse_args(["--latency-fetch-wait-ms", "default,10", "--latency-linger-ms", "20"])
    assert both.latency_variants == [({}, {"linger.ms": 20}),
                                     ({"fetch.wait.max.ms": 10}, {"linger.ms": 20})]
    with pytest.raises(SystemExit):
        parse_args(["--latency-linger-ms", "5ms"])
