"""bench/tools/latency_breakdown.py end to end on a short paced load: the real service on
the embedded broker writes its step trace (aggregator/devtools/latency_trace.py), and every
record's steps are found and add up to its measured latency."""

from __future__ import annotations

import json

from bench.stages.latency import STEPS
from bench.tools import latency_breakdown


def test_every_record_is_traced_and_its_steps_add_up(tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert latency_breakdown.main(["--rate", "400", "--seconds", "3", "--json", str(out),
                                   "--set", "service.commit_idle_ms=5",
                                   "--producer", "linger.ms=20", "--floor"]) == 0
    r = json.loads(out.read_text())
    assert r["ok"] and r["verified"] == "PASSED"
    assert r["producer"] == {"linger.ms": 20}
    floor = r["floor"]  # the bare consumer on the same paced load and producer settings
    assert floor["ok"] and floor["producer"] == {"linger.ms": 20}
    assert floor["measured"] == r["measured"] and 0 < floor["p50_ms"] <= floor["p99_ms"]
    b = r["breakdown"]
    assert b["missing"] == 0 and b["records"] == r["measured"] > 1000
    assert set(b["steps"]) == set(STEPS)
    # the steps' means add up to the mean latency (each record's steps are its latency)
    assert abs(sum(s["mean"] for s in b["steps"].values()) - r["mean_ms"]) < 1.0
    for name in ("fetch", "apply", "commit"):
        assert b["steps"][name]["p50"] > 0
    assert b["rounds"]["count"] > 0 and b["transactions"]["count"] > 0
    assert {"supervisor", "worker-0", "worker-1"} <= set(r["cpu_us_per_event"])
    assert "window closed -> LMDB commit started" in capsys.readouterr().out
