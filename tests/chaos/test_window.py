"""Workers SIGKILLed inside their commit window: messages taken from the ring and partly
applied in an open transaction, nothing of them committed or acknowledged. The supervisor
respawns the worker and sends the unacknowledged batches again; the verifier checks views,
versions (no lost or double-applied update), change events and dead letters.
"""

from __future__ import annotations

import time

import pytest

from aggregator.devtools import simulate

EVENTS = 30_000
SLICES = 40  # produced one after the other while the service runs: the rings run dry, so a
# window takes several times from them (a saturated worker fills its window in one take)


@pytest.mark.long  # CI: the worker kills of test_kills.py land in the default 50 ms window too
def test_sigkill_a_worker_inside_its_commit_window(chaos, tmp_path):
    run = chaos(simulate.generate(29, EVENTS), name="kill a worker inside its commit window")
    once = tmp_path / "fired"
    run.produce(0, 1 / SLICES)
    svc = run.start(env={"AGGREGATOR__SERVICE__COMMIT_WINDOW_MS": "400",
                         "AGGREGATOR_FAULTS": "worker_commit_window=5",
                         "AGGREGATOR_FAULTS_ONCE": str(once)})
    svc.wait_workers(2)
    fault = None
    for i in range(1, SLICES):
        run.produce(i / SLICES, (i + 1) / SLICES)
        run._check_alive()
        if fault is None and once.exists():
            fault = run.fault("sigkill worker inside its commit window", lambda: None,
                              detail="worker_commit_window=5", measure=False)
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    while "exited with code -9" not in svc.log():
        assert once.exists() and time.monotonic() < deadline, svc.log()[-3000:]
        time.sleep(0.05)
    report = run.finish()
    assert fault is not None or once.exists()
    report.assert_ok()
