"""Issue 17: the group's tasks that no live instance serves are visible
(`aggregator_tasks_unowned`, `/readyz`'s `tasks_unowned`): up after an instance is SIGKILLed,
back to 0 once the survivor has taken its tasks over (ownership.py).

Small for CI (10k events); `AGGREGATOR_CLUSTER_EVENTS` / 4 raises it (the long mode).
"""

from __future__ import annotations

import os
import time

import pytest

from aggregator.devtools import simulate

EVENTS = int(os.environ.get("AGGREGATOR_CLUSTER_EVENTS", "40000")) // 4
UNOWNED = "aggregator_tasks_unowned"


@pytest.fixture(scope="module")
def workload():
    return simulate.generate(47, EVENTS)


def _wait(run, inst, cond, what: str, timeout: float = 120) -> tuple[float, dict]:
    """Poll `inst`'s metrics until `cond(metrics)`; (seconds waited, metrics)."""
    t0 = time.monotonic()
    while True:
        m = run.all_metrics([inst])[inst.index] or {}
        if cond(m):
            return time.monotonic() - t0, m
        assert time.monotonic() - t0 < timeout, f"{what}: {m.get(UNOWNED)}, {m}"
        run._check_alive()
        time.sleep(0.2)


def test_unowned_tasks_visible_across_a_kill(workload, cluster):
    run = cluster(workload, name="unowned gauge", tasks=8, workers=2)
    run.produce(0, 0.5)
    survivor, victim = run.start_instance(), run.start_instance()
    for inst in (survivor, victim):  # both serve tasks, none unowned
        _wait(run, inst, lambda m: m.get("aggregator_tasks_owned", 0) > 0
              and m.get(UNOWNED) == 0, "no settled group")
    status, body = survivor.api().json("/readyz")
    assert body["tasks_unowned"] == [], body
    run.kill(victim)
    up_s, m = _wait(run, survivor, lambda m: m.get(UNOWNED, 0) > 0, "never went up",
                    timeout=30)
    seen = m[UNOWNED]
    assert 0 < seen <= 8 - m["aggregator_tasks_owned"], m
    status, body = survivor.api().json("/readyz")
    assert body["tasks_unowned"], body  # visible there too (informational)
    back_s, m = _wait(run, survivor, lambda m: m.get(UNOWNED) == 0
                      and m.get("aggregator_tasks_owned") == 8, "never back to 0")
    print(f"unowned: up {up_s:.1f} s after the kill ({seen:.0f} tasks), back to 0 "
          f"{back_s:.1f} s later", flush=True)
    run.produce(0.5, 1.0)
    report = run.finish()
    report.assert_ok()
