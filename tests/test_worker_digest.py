"""bench.tools.worker_digest end to end: one in-process worker fed frames messages as the
supervisor writes them, decoded as the worker's `_take` decodes them; the compiled and the
pure core must store the same views, sequence rows, dedup ids and change events."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator import core

ROOT = Path(__file__).resolve().parents[1]


def _digest(pure: bool) -> tuple[float, str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("AGGREGATOR_PURE_CORE", None)
    if pure:
        env["AGGREGATOR_PURE_CORE"] = "1"
    out = subprocess.run([sys.executable, "-m", "bench.tools.worker_digest", "--events",
                          "30000"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    m = re.search(r"CPU µs/record ([0-9.]+) \(records after the first message\); (.*)$",
                  out.strip().splitlines()[-1])
    assert m, out
    return float(m.group(1)), m.group(2)


@pytest.mark.skipif(core.IMPLEMENTATION != "cython", reason="no compiled core to compare")
def test_the_compiled_and_the_pure_core_store_the_same_state():
    cpu, digests = _digest(pure=False)
    cpu_ref, digests_ref = _digest(pure=True)
    assert cpu > 0 and cpu_ref > 0
    assert digests == digests_ref
    assert set(re.findall(r"(\S+) [0-9a-f]{16}", digests)) == {
        "changes", "dedup", "records", "seq+dedup_log", "views"}
