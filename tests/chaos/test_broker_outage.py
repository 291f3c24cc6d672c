"""The broker frozen (SIGSTOP) for 20 s in the middle of a run, then resumed (SIGCONT)."""

from __future__ import annotations

import os
import time

from aggregator.devtools import simulate

EVENTS = int(os.environ.get("AGGREGATOR_CHAOS_EVENTS", "60000"))
FREEZE_S = float(os.environ.get("AGGREGATOR_CHAOS_FREEZE_S", "20"))


def test_broker_frozen_for_20s(broker, chaos):
    """Fault 4: no commit while the broker is stalled, every process survives it, and the
    result is exact afterwards (malformed records are interleaved, so the dead-letter
    producer and the change-event producer are both waiting on the frozen broker)."""
    w = simulate.generate(41, EVENTS)
    run = chaos(w, name=f"broker frozen {FREEZE_S:g} s").produce()
    svc = run.start()
    run.wait_fraction(0.3)
    pids = svc.wait_workers(2)
    before = run.committed_total()

    def outage() -> None:
        broker.freeze()
        try:
            time.sleep(FREEZE_S)
            assert svc.proc.poll() is None, svc.log()[-3000:]
            assert svc.worker_pids() == pids, "a worker died while the broker was frozen"
        finally:
            broker.thaw()

    fault = run.fault("broker SIGSTOP", outage, detail=f"{FREEZE_S:g} s", measure=False)
    run.measure_recovery(fault, before)
    assert svc.worker_pids() == pids, f"workers restarted:\n{svc.log()[-3000:]}"
    report = run.finish()
    report.assert_ok()
