"""Fault injection points for crash tests: a process kills itself at a named point.

`AGGREGATOR_FAULTS="worker_after_commit=3"` makes the process that reaches
`fault_point("worker_after_commit")` for the 3rd time SIGKILL itself (no cleanup, no flush: exactly
what a power cut or the OOM killer does at that instant). Unset, a fault point costs one
global lookup. Workers inherit the variable from the supervisor's environment; a restarted
worker sees it again, so use counts that a restart does not reach, or `AGGREGATOR_FAULTS_ONCE`
(a file path: the first process to hit a point creates it, later ones skip all points).
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("AGGREGATOR_FAULTS")
_points: dict[str, int] | None = None
if _spec:
    _points = {}
    for item in _spec.split(","):
        name, _, count = item.partition("=")
        _points[name.strip()] = int(count or 1)
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    if _points is None or name not in _points:
        return
    _hits[name] = n = _hits.get(name, 0) + 1
    if n != _points[name]:
        return
    once = os.environ.get("AGGREGATOR_FAULTS_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
