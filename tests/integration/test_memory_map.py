"""bench/tools/memory_map.py end to end on a tiny workload: the real service on the embedded
broker, each process's memory broken down from its smaps near its peak."""

from __future__ import annotations

import json

from bench.metrics import BREAKDOWN
from bench.tools import memory_map


def test_memory_map_breaks_down_every_process(tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert memory_map.main(["--events", "3000", "--workers", "2", "--variants",
                            "shipped,before", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["shipped", "before"]
    for r in rows:
        assert r["ok"] and r["verified"] == "PASSED"
        procs = r["processes"]
        assert {"supervisor", "worker-0", "worker-1"} <= set(procs)
        for label in ("supervisor", "worker-0", "worker-1"):
            b = procs[label]["breakdown"]
            assert set(b["rss_mib"]) == set(BREAKDOWN)
            # the parts add up to the RSS they were read at (every mapping counted once;
            # smaps is read just after the RSS, the process may grow in between)
            assert abs(sum(b["rss_mib"].values()) - b["at_rss_mib"]) < max(
                4, 0.05 * b["at_rss_mib"])
            assert b["rss_mib"]["shm"] > 0 and b["rss_mib"]["code_files"] > 0
        assert procs["worker-0"]["breakdown"]["rss_mib"]["lmdb"] > 0
    text = capsys.readouterr().out
    assert "== shipped:" in text and "worker-1" in text


def test_variant_names():
    assert memory_map.variant("shipped") == {}
    assert memory_map.variant("ring=8+max=2+prefetch=4096") == {
        "service.ring_bytes": 8 << 20, "service.commit_max_bytes": 2 << 20,
        "kafka.consumer.queued.max.messages.kbytes": 4096}
    assert memory_map.variant("set.gate.max_cached_keys=50000+kset.linger.ms=10") == {
        "gate.max_cached_keys": 50000, "kafka.common.linger.ms": 10}
    assert memory_map.variant("before")["service.ring_bytes"] == 16 << 20
