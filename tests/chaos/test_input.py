"""Hostile input: duplicates beyond the dedup window, a bloom filter that always says "maybe",
reordering in windows of 100, gaps that never fill, poison records."""

from __future__ import annotations

import os
import time

import msgpack

from aggregator.devtools import simulate
from tests.support.chaos import (
    Sampler,
    reordered_in_windows,
    with_far_duplicates,
    with_gaps,
)

EVENTS = int(os.environ.get("AGGREGATOR_CHAOS_EVENTS", "60000")) // 2
POISON_MIB = 256  # heap the poison records may take on top of the workload's

SMALL_BLOOM = """
[dedup]
bloom_capacity = 2000
bloom_fp_rate = 0.01
bloom_generations = 2
"""


def test_duplicates_outside_the_bloom_window(chaos):
    """Fault 6a: 10 % duplicates, and 5 % more re-sent after the whole workload, far beyond
    a dedup window of ~4,000 ids: the sequence gate drops what dedup forgot."""
    w = with_far_duplicates(simulate.generate(31, EVENTS, dup_rate=0.10), 0.05)
    run = chaos(w, name="duplicates beyond the bloom window").produce()
    run.start(extra=SMALL_BLOOM)
    report = run.finish()
    assert "bloom" in run.svc.log()
    report.assert_ok()


def test_bloom_filter_that_always_says_maybe(chaos):
    """Fault 6b: every id is "maybe seen": the exact index alone decides, zero double applies."""
    w = simulate.generate(32, EVENTS, dup_rate=0.10)
    run = chaos(w, name="bloom answers maybe for everything").produce()
    run.start(env={"AGGREGATOR_FAULTS": "bloom-maybe"})
    report = run.finish()
    report.assert_ok()


def test_reordering_in_windows_and_gaps_that_never_fill(chaos):
    """Fault 7: records shuffled within windows of 100, and 1 % of the strict keys lose an
    event for good: parked events stay bounded, the gap policy (skip) fires once per such
    key after gap_timeout_ms, and the metrics show it."""
    w, gaps = with_gaps(reordered_in_windows(simulate.generate(33, EVENTS), 100), 0.01)
    run = chaos(w, name="reorder window 100 + 1% gaps never filled").produce()
    run.start(extra="\n[gate]\ngap_timeout_ms = 2000\nmax_parked_total = 20000\n")
    with Sampler(run, every=0.2) as sampler:
        run.wait_fraction(1.0)
        deadline = time.monotonic() + 30
        while True:  # the last gaps expire gap_timeout_ms after their last event
            m = run.metrics()
            if m.get("aggregator_gaps_skipped_total", 0) >= gaps or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(0.5)  # the commit after the skips
    assert m["aggregator_gaps_skipped_total"] == gaps, m
    assert m["aggregator_parked"] == 0, m
    assert 0 < sampler.peak("aggregator_parked") <= 20000
    report = run.finish()
    assert run.svc.log().count("sequence gap skipped") == gaps
    report.assert_ok()


def poison_records(topic: str) -> list[tuple]:
    """(topic, key, value, headers, reason): each otherwise a valid binary-mode CloudEvent."""
    def headers(pk: bytes | None, ctype: bytes = b"application/msgpack") -> list:
        h = {"ce_specversion": b"1.0", "ce_id": b"poison-%d" % len(pk or b""),
             "ce_source": b"/shop/orders", "ce_type": b"shop.order.placed",
             "ce_partitionkey": pk, "ce_sequence": b"1", "content-type": ctype}
        return [(k, v) for k, v in h.items() if v is not None]

    packed = msgpack.packb({"order_id": "o-p", "quantity": 1})
    deep = b"\x91" * 10_000 + b"\xc0"  # 10k nested one-element arrays
    huge_map = b"\xdf\xff\xff\xff\xff"  # a map header claiming 2^32-1 entries, then nothing
    return [
        (topic, b"p-trunc", packed[:-3], headers(b"p-trunc"), "bad_msgpack"),
        (topic, b"p-map", huge_map, headers(b"p-map"), "bad_msgpack"),
        (topic, b"p-deep", deep, headers(b"p-deep"), "bad_msgpack"),
        (topic, b"p-utf8", b'{"order_id": "\xff\xfe"}',
         headers(b"p-utf8", b"application/json"), "bad_encoding"),
        (topic, b"p-big", b"x" * (10 << 20), headers(b"p-big"), "too_large"),
        (topic, b"k" * (1 << 20), packed, headers(None), "key_too_long"),  # key = routing key
    ]


def test_poison_records(chaos):
    """Fault 9: truncated msgpack, a 2^32-entry map header, 10k-deep nesting, invalid UTF-8,
    a 10 MB value, a 1 MB key, each three times, after half of the workload: each goes to the
    dead-letter topic with its reason, nothing crashes, the partitions keep flowing (the
    second half is applied exactly), and memory stays bounded: the poison costs less than
    POISON_MIB of heap over what the workload itself took (whatever the workload's size)."""
    w = simulate.generate(34, EVENTS)
    run = chaos(w, name="poison records").produce(0, 0.5)
    run.start()
    with Sampler(run) as before:
        run.wait_fraction(1.0)
    poison = poison_records(run.prefix + "shop.orders") * 3
    with Sampler(run) as during:
        run.produce_records([p[:4] for p in poison], producer_config={
            "message.max.bytes": 12 << 20})
        run.wait_fraction(1.0)
        time.sleep(1.0)
    run.produce(0.5, 1.0)
    run.bad += [simulate.BadRecord(*p) for p in poison]
    report = run.finish()
    assert before.samples and during.samples, "no metrics sampled"
    grew = during.peak("anon_mib") - before.peak("anon_mib")
    assert grew < POISON_MIB, f"the poison records took {grew:.0f} MiB of heap"
    report.assert_ok()
