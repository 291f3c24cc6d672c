"""`aggregator demo --mixed`: orders relayed from an outbox table and payments as plain
JSON, next to five CloudEvents services, still equal to the oracle's views."""

from __future__ import annotations

import re

from tests.support.cliproc import aggregator


def test_demo_mixed_passes_the_oracle_check(tmp_path):
    r = aggregator("demo", "--mixed", "--events", "2500", "--seed", "3", cwd=tmp_path,
                   timeout=240)
    out = " ".join((r.stdout + r.stderr).split())  # the console wraps lines
    assert r.returncode == 0, out[-3000:]
    assert "orders from an outbox relay, payments as plain JSON" in out
    assert "CHECK PASSED" in out
    # only the 8 malformed records are dead-lettered: every mapped record was read
    assert re.search(r"dead-lettered 8\b", out), out[-2000:]
