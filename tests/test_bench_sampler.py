"""bench.metrics.ProcessSampler's CPU split (user/system, main thread/other threads) on a real
child process whose main thread and second thread each burn a known amount of CPU time."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.metrics import ProcessSampler

# The child: a second thread burns THREAD_S of its own CPU time, then the main thread burns
# MAIN_S of its own, then it waits to be killed (so the last samples see it alive).
CHILD = """
import sys, threading, time
def burn(s):
    t = time.thread_time()
    while time.thread_time() - t < s:  # a syscall: check between runs of arithmetic
        x = 0
        for i in range(20000):
            x += i * i
th = threading.Thread(target=burn, args=(0.4,))
th.start(); th.join()
burn(0.6)
print("done", flush=True)
time.sleep(60)
"""


def test_the_sampler_splits_a_process_cpu_into_main_thread_and_other_threads():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        with ProcessSampler({"child": child.pid}, interval=0.02, breakdown=False) as s:
            t0 = time.monotonic()
            assert child.stdout.readline().strip() == "done"
        t1 = time.monotonic()  # after the sampler's last sample, taken when it stops
        split = s.cpu_split_between(t0, t1)["child"]
    finally:
        child.kill()
        child.wait()
    # CPU time, not wall time: each burn is measured by its own thread's clock; the bounds
    # leave room for the interpreter's start-up before the first sample and tick rounding
    assert 0.3 <= split["threads"] <= 0.6, split
    assert 0.5 <= split["main"] <= 1.0, split
    assert abs(split["user"] + split["system"] - split["main"] - split["threads"]) < 0.05
    assert split["user"] > split["system"]
