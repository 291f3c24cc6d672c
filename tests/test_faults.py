"""Fault injection points (aggregator/faults.py), in real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SCRIPT = """
import os, sys
from aggregator.faults import fault_flag, fault_point
print("flag", fault_flag("bloom-maybe"), flush=True)
for i in range(1, 6):
    fault_point("p")
    print("passed", i, flush=True)
"""


def run(spec: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, AGGREGATOR_FAULTS=spec, **env))


def test_kill_on_the_nth_hit():
    p = run("p=3")
    assert p.returncode == -signal.SIGKILL
    assert p.stdout.split("\n")[:3] == ["flag False", "passed 1", "passed 2"]


def test_flags_and_sleep():
    t0 = time.monotonic()
    p = run("bloom-maybe,p=2:sleep=0.5")
    assert p.returncode == 0 and "flag True" in p.stdout and "passed 5" in p.stdout
    assert time.monotonic() - t0 >= 0.5


def test_kill_parent():
    # the parent is a shell that waits; the child kills it and carries on
    code = f"{sys.executable} -c '{SCRIPT}' > /dev/null; sleep 30"
    p = subprocess.Popen(["bash", "-c", code],
                         env=dict(os.environ, AGGREGATOR_FAULTS="p=1:kill-parent"))
    assert p.wait(20) == -signal.SIGKILL


def test_once_file(tmp_path):
    once = tmp_path / "fired"
    assert run("p=1", AGGREGATOR_FAULTS_ONCE=str(once)).returncode == -signal.SIGKILL
    assert once.exists()
    assert run("p=1", AGGREGATOR_FAULTS_ONCE=str(once)).returncode == 0


def test_unknown_action_is_an_error():
    p = run("p=1:explode")
    assert p.returncode == 1 and "unknown action 'explode'" in p.stderr


def test_raise_on_the_nth_hit():
    p = run("p=2:raise")
    assert p.returncode == 1
    assert p.stdout.split("\n")[:2] == ["flag False", "passed 1"]
    assert "InjectedFault: fault injected at p" in p.stderr
