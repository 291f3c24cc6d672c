"""Run a measured function in a 'spawn' child process, sampled by `ProcessSampler`.

The function gets a `conn` (one end of a pipe) as its last argument and sends one dict,
which should hold ``t_first`` and ``t_last`` (CLOCK_MONOTONIC, shared between processes):
the window used for CPU accounting.
"""

from __future__ import annotations

import multiprocessing as mp
import time

from bench.metrics import ProcessSampler


def run_measured(target, args: tuple, label: str, *, broker_pid: int | None,
                 timeout: float) -> tuple[dict, ProcessSampler]:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, name=f"bench-{label}", args=(*args, send))
    proc.start()
    send.close()
    sampler = ProcessSampler({label: proc.pid}, extra={"broker": broker_pid}).__enter__()
    deadline = time.monotonic() + timeout
    result: dict = {}
    try:
        while True:
            if recv.poll(0.2):
                result = recv.recv()
                break
            if not proc.is_alive():
                result = {"error": f"{label} exited with code {proc.exitcode}"}
                break
            if time.monotonic() > deadline:
                proc.kill()
                result = {"error": f"{label} timed out after {timeout:.0f} s"}
                break
        proc.join(30)
    finally:
        sampler.stop()
    if "t_first" in result and "t_last" in result:
        result["cpu_s"] = {k: round(v, 3) for k, v in
                           sampler.cpu_between(result["t_first"], result["t_last"]).items()}
    result["memory"] = sampler.summary()
    return result, sampler
