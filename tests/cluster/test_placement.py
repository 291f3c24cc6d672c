"""Issue 17: an instance places the tasks it owns on its workers by what it owns (balanced
by count), and moves a task between its workers (drain, commit, drop, restore) without
losing or doubling anything.

Small for CI (10k events); `AGGREGATOR_CLUSTER_EVENTS` / 4 raises it (the long mode).
"""

from __future__ import annotations

import os
import time

import pytest

from aggregator.devtools import simulate

EVENTS = int(os.environ.get("AGGREGATOR_CLUSTER_EVENTS", "40000")) // 4
SKEW = {"AGGREGATOR_FAULTS": "placement-one-worker"}  # every gained task on worker 0


@pytest.fixture(scope="module")
def workload():
    return simulate.generate(43, EVENTS)


def wait_owns(run, inst, timeout: float = 120) -> None:
    """Until `inst` owns tasks and restores none (it joined the group and restored)."""
    deadline = time.monotonic() + timeout
    while True:
        m = run.all_metrics([inst])[inst.index] or {}
        if m.get("aggregator_tasks_owned", 0) > 0 and not m.get("aggregator_tasks_restoring"):
            return
        assert time.monotonic() < deadline, f"instance {inst.index} owns no task: {m}"
        run._check_alive()
        time.sleep(0.25)


def two_instances(cluster, workload, name: str, env: dict | None = None):
    """Two instances of two workers, 8 tasks, started together after 30 % of the records;
    the rest produced once both own tasks; converged (the instances left running)."""
    run = cluster(workload, name=name, tasks=8, workers=2)
    run.produce(0, 0.3)
    insts = [run.start_instance(env=env), run.start_instance(env=env)]
    for inst in insts:
        wait_owns(run, inst)
    run.produce(0.3, 1.0)
    return run, insts, run.finish(all_own=True, stop=False)


def worker_tasks(inst) -> dict[int, float]:
    return {int(w): n for (w,), n in inst.api().labeled("aggregator_worker_tasks").items()}


def worker_applied(inst) -> dict[int, float]:
    return {int(w): n for (w,), n in
            inst.api().labeled("aggregator_events_applied_total").items()}


@pytest.mark.long  # CI: test_two_by_two_placement_is_balanced checks the placement
def test_local_moves_balance_workers_and_keep_views_exact(workload, cluster):
    """Both instances place every task they gain on worker 0 (a fault flag: the idle-worker
    placement of issue 17, whatever the group assigns); each must move tasks to worker 1
    while records flow (the first one twice: alone with 8 tasks, then after the second one
    joins and takes 4), end with 2 tasks per worker, both workers applying, and the views
    exact with every change event once in order."""
    run = cluster(workload, name="local moves", changes=True, tasks=8, workers=2)
    run.produce(0, 0.4)
    first = run.start_instance(env=SKEW)
    run.wait_progress(EVENTS // 10)
    second = run.start_instance(env=SKEW)
    wait_owns(run, second)
    run.produce(0.4, 1.0)
    report = run.finish(all_own=True, stop=False)
    try:
        report.assert_ok()
        for inst in (first, second):
            tasks = worker_tasks(inst)
            assert tasks == {0: 2, 1: 2}, (inst.index, tasks)
            applied = worker_applied(inst)
            assert all(applied.get(w, 0) > 0 for w in (0, 1)), (inst.index, applied)
            log = inst.svc.log()
            assert "moving tasks between local workers" in log, log[-3000:]
            assert "restored on worker 1" in log
    finally:
        run.stop_all()
    assert run.report.ok, run.report.problems


def test_two_by_two_placement_is_balanced(workload, cluster):
    """No fault: two instances of two workers, 8 tasks; the group gives each instance 4 (in
    the runs of issue 17, all odd or all even: `task % workers` left a worker idle). Each
    worker holds 2 tasks and applies events."""
    run, insts, report = two_instances(cluster, workload, "2x2 placement")
    try:
        report.assert_ok()
        for inst in insts:
            assert worker_tasks(inst) == {0: 2, 1: 2}, (inst.index, worker_tasks(inst))
            applied = worker_applied(inst)
            assert all(applied.get(w, 0) > 0 for w in (0, 1)), (inst.index, applied)
    finally:
        run.stop_all()
    assert run.report.ok, run.report.problems


def test_a_fetch_that_left_records_out_is_read_again(workload, cluster):
    """The test broker's fetch at the end of a partition that several producers write can
    leave a record batch out (the CI run of issue 13's session 14 lost 17 forwarded
    updates that way, task_manager.Holes). Here each instance's supervisor leaves out one
    forward per task as such a fetch would (fault `tasks-fetch-hole`): the next record
    of the task shows the hole, the partition is read again from it, and the views are
    exact."""
    run, insts, report = two_instances(cluster, workload, "fetch holes",
                                       {"AGGREGATOR_FAULTS": "tasks-fetch-hole"})
    try:
        report.assert_ok()
        logs = [inst.svc.log() for inst in insts]
        assert sum(log.count("fault tasks-fetch-hole") for log in logs) >= 4, logs[0][-2000:]
        assert all("a fetch skipped offsets" in log for log in logs if
                   "fault tasks-fetch-hole" in log)
    finally:
        run.stop_all()
    assert run.report.ok, run.report.problems
