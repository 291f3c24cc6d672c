"""The cluster-mode task lifecycle as data (task_manager.TaskState): the legal transitions,
and a TaskManager refusing the others."""

from types import SimpleNamespace

import pytest

from aggregator.config import load_config
from aggregator.task_manager import TaskManager, TaskState


def test_every_state_lists_its_next_states():
    for state in TaskState:
        assert state.next <= set(TaskState)
    assert TaskState.RUNNING in TaskState.RESTORING.next
    assert TaskState.CATCHING_UP in TaskState.RUNNING.next
    assert TaskState.RUNNING in TaskState.CATCHING_UP.next
    assert TaskState.CATCHING_UP not in TaskState.RESTORING.next  # not served yet
    assert not TaskState.RESTORING.served
    assert TaskState.RUNNING.served and TaskState.CATCHING_UP.served


def test_task_manager_keeps_to_the_transitions(tmp_path):
    cfg = load_config(None, {"service.workers": 2, "service.data_dir": str(tmp_path),
                             "cluster.enabled": True}, env={})
    tm = TaskManager(SimpleNamespace(workers=2), cfg)
    tm._enter(3, TaskState.RESTORING)
    assert tm.in_restore() and tm.owned() == []
    tm._enter(3, TaskState.RUNNING)
    assert not tm.in_restore() and tm.owned() == [3]
    with pytest.raises(AssertionError):
        tm._enter(3, TaskState.RUNNING)  # restored twice: a bug
    tm._enter(3, TaskState.CATCHING_UP)
    assert tm.owned() == [3] and not tm.in_restore()  # in_restore: the restore requests say
    tm._leave(3)
    assert tm.owned() == []
