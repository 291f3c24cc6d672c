"""Fault 5: the supervisor stalls beyond the consumer's max.poll.interval.ms.

librdkafka then leaves the group on its own (the session heartbeats go on in its thread, so
only the poll interval expires): the partitions are lost, not revoked. When the supervisor
polls again it joins again and gets them back; nothing may be lost or applied twice.
"""

from __future__ import annotations

import re
import time

from aggregator.devtools import simulate

MAX_POLL_MS = 4000  # librdkafka: >= session.timeout.ms (2000 in the test config)
STALL_S = 8
STALL_AT = 200  # loop iteration


def test_supervisor_stalled_beyond_max_poll_interval(chaos):
    """The stall comes mid-run: records keep arriving (2 % of the workload at a time) until
    the partitions are lost, the rest arrives during the stall."""
    workload = simulate.generate(41, 40_000)
    run = chaos(workload, name="supervisor stalled past max.poll.interval.ms",
                extra_config=f'[kafka.consumer]\n"max.poll.interval.ms" = {MAX_POLL_MS}\n'
                             '[service]\nring_bytes = "4MiB"\n')  # fills: pending, paused
    run.produce(0, 0.2)
    svc = run.start(env={"AGGREGATOR_FAULTS": f"supervisor_loop={STALL_AT}:sleep={STALL_S}"})
    svc.wait_workers(2)
    t0 = time.monotonic()
    produced = 0.2
    while not re.search(r"lost \d+ partitions", svc.log()):
        run._check_alive()
        assert produced < 1, f"the stall came after the run\n{svc.log()[-3000:]}"
        assert time.monotonic() - t0 < 120, f"the stall did not happen\n{svc.log()[-3000:]}"
        if "assigned" in svc.log():
            run.produce(produced, produced + 0.02)
            produced += 0.02
        time.sleep(0.1)
    before = run.committed_total()
    fault = run.fault("supervisor stalled", lambda: None, measure=False,
                      detail=f"{STALL_S} s > max.poll.interval.ms {MAX_POLL_MS}")
    run.produce(produced, 1.0)
    run.measure_recovery(fault, before)
    report = run.finish()
    log = svc.log()
    assert re.search(r"assigned .*\n(.*\n)*.*lost \d+ partitions(.*\n)*.*assigned ", log), \
        log[-5000:]
    assert "Application maximum poll interval" in log  # librdkafka left the group
    assert "offset commit failed" not in log, log[-5000:]
    assert "Traceback" not in log, log[-5000:]
    print(f"\nthe stall came with {produced:.0%} of the workload produced")
    report.assert_ok()
