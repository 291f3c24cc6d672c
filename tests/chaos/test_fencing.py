"""Fault 3: a worker stopped (SIGSTOP) past its heartbeat timeout, then resumed (SIGCONT).

The supervisor kills it (SIGKILL also ends a stopped process) and starts the replacement only
once it is gone; were it still there, its shard would fence it (tests/test_fencing.py covers
the fence itself: a replaced worker writes nothing and takes no messages from its ring).
"""

from __future__ import annotations

import os
import re
import signal
import time

from aggregator.devtools import simulate
from tests.support.service import _is_zombie

HEARTBEAT_TIMEOUT_MS = 1500


def test_sigstop_a_worker_past_its_heartbeat_timeout(chaos):
    workload = simulate.generate(31, 40_000)
    run = chaos(workload, name="SIGSTOP a worker past its heartbeat timeout",
                extra_config=f"[service]\nheartbeat_timeout_ms = {HEARTBEAT_TIMEOUT_MS}\n")
    run.produce()
    svc = run.start()
    pids = svc.wait_workers(2)
    run.wait_fraction(0.15)
    victim = pids[-1]
    before = run.committed_total()
    fault = run.fault("SIGSTOP worker", lambda: os.kill(victim, signal.SIGSTOP),
                      detail=str(victim), measure=False)

    # the replacement starts once the stopped worker is gone
    deadline = time.monotonic() + 60
    while True:
        run._check_alive()
        log = svc.log()
        now = svc.worker_pids()
        if "missed its heartbeat" in log and len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"no replacement:\n{log[-3000:]}"
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{victim}") or _is_zombie(victim)
    try:
        os.kill(victim, signal.SIGCONT)  # if it still existed, it would be fenced
    except ProcessLookupError:
        pass
    run.measure_recovery(fault, before)
    report = run.finish()
    log = svc.log()
    killed = re.findall(r"worker (\d+) missed its heartbeat", log)
    assert killed, log[-3000:]
    assert re.search(rf"worker {killed[0]} \(pid {victim}\) exited with code -9", log), \
        log[-3000:]
    assert "Traceback" not in log, log[-5000:]
    report.assert_ok()

