"""runtime.set_parent_death_signal: children never outlive their supervisor."""

from __future__ import annotations

import os
import subprocess
import sys
import time

PARENT = """
import multiprocessing, os, sys, time
from aggregator.runtime import set_parent_death_signal

def child(delay):
    time.sleep(delay)  # the start-up imports of a real worker, say
    set_parent_death_signal()
    time.sleep(60)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child, args=(float(sys.argv[1]),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(float(sys.argv[2]))
    os._exit(0)  # the parent dies (SIGKILL would do the same)
"""


def run_parent(tmp_path, child_delay: float, parent_life: float) -> int:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    out = subprocess.run([sys.executable, str(script), str(child_delay), str(parent_life)],
                         capture_output=True, text=True, timeout=60)
    return int(out.stdout.split()[0])


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    return False


def test_child_dies_with_its_parent(tmp_path):
    assert gone(run_parent(tmp_path, child_delay=0.0, parent_life=2.0))


def test_parent_gone_before_the_signal_was_armed(tmp_path):
    assert gone(run_parent(tmp_path, child_delay=2.0, parent_life=0.2))
