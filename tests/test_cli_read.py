"""`aggregator get` and `aggregator stats`: offline, read-only reads of a data directory."""

from __future__ import annotations

import json

from click.testing import CliRunner

from aggregator.cli import main
from aggregator.control import ControlBlock, Slot
from aggregator.metrics import prefix_of
from aggregator.protocol import ring_names

from .support.viewdata import record, write_docs


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_get(tmp_path):
    write_docs(tmp_path, 2, {("customer", "c1"): record({"name": "Ada"}, 3),
                             ("customer", "gone"): record(None)})
    r = run("get", "customer", "c1", "--data-dir", tmp_path)
    assert r.exit_code == 0 and json.loads(r.output) == {"name": "Ada"}
    r = run("get", "customer", "c1", "--data-dir", tmp_path, "--full")
    assert json.loads(r.output)["version"] == 3
    r = run("get", "customer", "gone", "--data-dir", tmp_path)
    assert r.exit_code == 1 and "no document 'gone'" in r.output
    r = run("get", "nope", "c1", "--data-dir", tmp_path)
    assert r.exit_code == 2 and "unknown view 'nope'" in r.output
    r = run("get", "customer", "c1", "--data-dir", tmp_path, "--workers", 3)
    assert r.exit_code == 2 and "written by 2 workers" in r.output


def test_stats(tmp_path):
    write_docs(tmp_path, 2, {("order", f"o{i}"): record({}) for i in range(10)})
    r = run("stats", "--data-dir", tmp_path)
    assert r.exit_code == 0
    assert "shard 0: file" in r.output and "shard 1: file" in r.output
    assert "service: not running" in r.output
    ctl = ControlBlock.create(ring_names(prefix_of(tmp_path), 2)["control"], 2)
    try:
        ctl.add(1, Slot.APPLIED, 77)
        r = run("stats", "--data-dir", tmp_path, "--json")
        out = json.loads(r.output)
        assert sum(s["entries"]["views"] for s in out["shards"]) == 10
        assert out["live"]["workers"][1]["applied"] == 77
        r = run("stats", "--data-dir", tmp_path)
        assert "stale control block" in r.output and "applied=77" in r.output
    finally:
        ctl.counters.close()
        ctl.counters.unlink()


def test_stats_prints_the_shards_totals(tmp_path):
    """The stored totals (store.py meta "totals"), per shard and summed, with no service
    running; a shard written before totals existed shows zeros."""
    from aggregator.store import Shard, shard_path

    write_docs(tmp_path, 2, {("order", "o1"): record({})})
    shard = Shard(shard_path(tmp_path, 1), sync=False)
    try:
        b = shard.begin()
        b.put_totals({"records": 10, "applied": 7, "duplicates": 2, "stale": 1,
                      "deadlettered": 0, "gaps_skipped": 0, "forwarded": 4,
                      "since": 1_760_000_000_000})
        b.commit()
    finally:
        shard.close()
    r = run("stats", "--data-dir", tmp_path)
    assert r.exit_code == 0, r.output
    assert "shard 0 totals: records=0, applied=0" in r.output
    assert "shard 1 totals: records=10, applied=7, duplicates=2, stale=1, gaps_skipped=0, " \
        "deadlettered=0, forwarded=4 (since 2025-10-09 08:53:20 UTC)" in r.output
    assert "\ntotals: records=10, applied=7" in r.output
    out = json.loads(run("stats", "--data-dir", tmp_path, "--json").output)
    assert [s["totals"]["applied"] for s in out["shards"]] == [0, 7]
