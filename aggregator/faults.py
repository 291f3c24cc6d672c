"""Fault injection for crash tests: a process hurts itself at a named point.

`AGGREGATOR_FAULTS` is a comma-separated list of ``point=N[:action]`` items and bare flags:

- ``worker_after_commit=3``: the 3rd time a process reaches `fault_point("worker_after_commit")`
  it SIGKILLs itself (no cleanup, no flush: exactly what a power cut or the OOM killer does at
  that instant);
- ``worker_before_commit=5:kill-parent``: SIGKILL the parent process (a worker's supervisor)
  at that instant, then carry on (the worker dies with its parent: PR_SET_PDEATHSIG);
- ``supervisor_loop=40:sleep=20``: sleep 20 s there (a stalled process, e.g. beyond the
  consumer's max.poll.interval.ms), then carry on;
- ``supervisor_loop=40:stop``: SIGSTOP itself (someone else sends SIGCONT);
- ``worker_before_commit=1:raise``: raise `InjectedFault` there (a bug that meets every
  restarted process the same way);
- a bare name (``bloom-maybe``) is a flag that code asks for with `fault_flag`.

Unset, a fault point costs one global lookup. Workers inherit the variable from the
supervisor's environment; a restarted worker sees it again, so use counts that a restart does
not reach, or `AGGREGATOR_FAULTS_ONCE` (a file path: the first process to fire a point creates
it, later ones skip all points).
"""

from __future__ import annotations

import os
import signal
import time

_spec = os.environ.get("AGGREGATOR_FAULTS")
_points: dict[str, tuple[int, str]] | None = None
_flags: frozenset[str] = frozenset()
if _spec:
    _points = {}
    flags = set()
    for item in _spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            flags.add(item)
            continue
        name, _, rest = item.partition("=")
        count, _, action = rest.partition(":")
        _points[name.strip()] = (int(count or 1), action.strip() or "kill")
    _flags = frozenset(flags)
_hits: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Raised by a fault point whose action is ``raise``."""


def fault_flag(name: str) -> bool:
    """True when the bare flag `name` is in AGGREGATOR_FAULTS."""
    return name in _flags


def fault_point(name: str) -> None:
    if _points is None or name not in _points:
        return
    count, action = _points[name]
    _hits[name] = n = _hits.get(name, 0) + 1
    if n != count:
        return
    once = os.environ.get("AGGREGATOR_FAULTS_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "kill-parent":
        os.kill(os.getppid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "raise":
        raise InjectedFault(f"fault injected at {name}")
    elif action.startswith("sleep="):
        time.sleep(float(action.partition("=")[2]))
    else:
        raise ValueError(f"AGGREGATOR_FAULTS: unknown action {action!r} for {name}")
