"""Parked events (strict sources waiting for a predecessor) under SIGKILL, and one key flooded
with out-of-order events."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

from aggregator.devtools import simulate
from tests.support.chaos import Sampler, with_held_back

EVENTS = int(os.environ.get("AGGREGATOR_CHAOS_EVENTS", "60000"))
HOT_EVENTS = int(os.environ.get("AGGREGATOR_CHAOS_HOT_EVENTS", "100000"))
HOT_MIB = 256  # heap the hot key may take on top of the normal workload's


def wait_metric(run, name: str, at_least: float, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run._check_alive()
        try:
            value = run.metrics().get(name, 0)
        except OSError:
            value = 0
        if value >= at_least:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{name} did not reach {at_least} within {timeout}s")


def test_sigkill_while_thousands_of_events_are_parked(chaos):
    """Fault 8: the first event of many strict streams is held back to the end of the
    workload, so thousands of later events park; SIGKILL a worker, then the whole service,
    while they are parked: none is lost, none applied twice."""
    w, parked = with_held_back(simulate.generate(51, EVENTS), 4000)
    assert parked >= 4000
    # every start (also the restart) waits for gaps far longer than the run takes
    run = chaos(w, name="SIGKILL with thousands parked",
                extra_config="[gate]\ngap_timeout_ms = 3600000\n")
    run.produce(0, 0.97)  # everything but the held-back events (and a few others)
    svc = run.start()
    n = wait_metric(run, "aggregator_parked", 2000, timeout=900)
    before = run.committed_total()
    run.fault("sigkill worker", lambda: run.kill_worker(0), detail=f"{n:.0f} parked")
    n = wait_metric(run, "aggregator_parked", 3000, timeout=900)
    run.fault("sigkill service", lambda: os.kill(svc.proc.pid, signal.SIGKILL),
              detail=f"{n:.0f} parked", measure=False)
    svc.proc.wait(10)
    before = run.committed_total()
    restart = run.fault("restart", lambda: run.start(), measure=False)
    run.measure_recovery(restart, before)
    assert wait_metric(run, "aggregator_parked", parked * 0.9, timeout=900) <= parked
    run.produce(0.97, 1.0)  # the held-back events: every parked event becomes applicable
    report = run.finish()
    report.assert_ok()


def hot_key_records(topic: str, n: int, window: int, seed: int) -> list[tuple]:
    """`n` inventory adjustments of one product (sequences 1..n) in an order shuffled
    within windows of `window` records: (topic, key, value, headers)."""
    import random

    rng = random.Random(seed)
    seqs = list(range(1, n + 1))
    for start in range(0, n, window):
        block = seqs[start:start + window]
        rng.shuffle(block)
        seqs[start:start + window] = block
    out = []
    for s in seqs:
        data = json.dumps({"product_id": "p-hot", "delta": 1, "reason": "flood"}).encode()
        out.append((topic, b"p-hot", data, [
            ("ce_specversion", b"1.0"), ("ce_id", str(uuid.UUID(int=s)).encode()),
            ("ce_source", b"/shop/inventory"), ("ce_type", b"shop.inventory.adjusted"),
            ("ce_partitionkey", b"p-hot"), ("ce_sequence", str(s).encode()),
            ("content-type", b"application/json")]))
    return out


def test_one_key_flooded_with_out_of_order_events(chaos):
    """Fault 13: HOT_EVENTS (1M in the long mode) out-of-order events for a single key of a
    strict source, shuffled in windows of 5,000 (more than max_parked_per_key = 1,000), after
    the normal workload: memory stays bounded (parked events are bounded and live in LMDB,
    not in RAM: the heap grows by less than HOT_MIB over the normal workload's, for 100k or
    1M hot events alike), the partitions are paused while the key's worker catches up (ring
    backpressure), the gap policy fires where the bound is hit, every event of the key is
    accounted for exactly once (applied + stale), and every other document is exact."""
    w = simulate.generate(52, EVENTS // 2)
    run = chaos(w, name=f"{HOT_EVENTS:,} out-of-order events for one key", with_bad=False)
    run.ignore_docs = {("product", "p-hot")}
    run.produce()
    run.start(extra="\n[gate]\nmax_parked_per_key = 1000\nmax_parked_total = 5000\n"
                "gap_timeout_ms = 600000\n")
    with Sampler(run) as before:
        run.wait_fraction(1.0)
    pauses_before = run.metrics().get("aggregator_consumer_pauses_total", 0)
    with Sampler(run) as during:
        run.produce_records(hot_key_records(run.prefix + "shop.inventory", HOT_EVENTS, 5000, 53))
        run.wait_fraction(1.0, timeout=1800)
        time.sleep(0.5)
        m = run.metrics()
    report = run.finish()
    parked_max = max(before.peak("aggregator_parked"), during.peak("aggregator_parked"))
    grew = during.peak("anon_mib") - before.peak("anon_mib")
    assert parked_max <= 5000, "parked beyond max_parked_total"
    assert grew < HOT_MIB, f"the hot key took {grew:.0f} MiB of heap"
    assert m["aggregator_consumer_pauses_total"] > pauses_before, "never paused for the key"
    assert m["aggregator_gaps_skipped_total"] > 0

    # every event of the hot key exactly once: applied (its adjustments count) or stale
    doc = run.documents["product"]["p-hot"]
    normal = simulate.applied_events(w)
    normal_stale = len(w.events) - len(normal)
    hot_applied = doc["d"]["adjustments"]
    assert doc["d"]["stock"] == hot_applied and doc["v"] == hot_applied
    assert m["aggregator_events_applied_total"] == len(normal) + hot_applied, m
    hot_stale = m["aggregator_stale_dropped_total"] - normal_stale
    assert hot_applied + hot_stale == HOT_EVENTS, (hot_applied, hot_stale)
    print(f"\nhot key: {hot_applied:,} applied, {hot_stale:,.0f} stale (gap policy skip), "
          f"heap +{grew:.0f} MiB, parked max {parked_max:.0f}, "
          f"pauses {m['aggregator_consumer_pauses_total']:.0f}")
    report.assert_ok()
