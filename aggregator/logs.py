"""Log set-up of every process of the service: the supervisor, each worker, the HTTP API.

Two formats, chosen once on the command line (``--log-format``) and handed to every spawned
process with its level (multiprocessing "spawn" starts each child from nothing, so each one
calls :func:`setup` first thing):

- ``text``: ``<time> <role> <LEVEL> <logger>: <message>``, ``role`` being ``supervisor``,
  ``worker-<i>`` or ``http``, then a traceback if any.
- ``json``: one JSON object per line and nothing else on the line (what log shippers such as
  Vector, Fluent Bit and Promtail read): ``time`` (RFC 3339, UTC, milliseconds), ``level``,
  ``logger``, ``role`` (``supervisor``, ``worker``, ``http``), ``worker`` (its index, null
  outside a worker), ``pid``, ``message`` and, for a record with an exception, ``exception``
  (the formatted traceback, newlines escaped inside the string).

Invariant: after :func:`setup`, the root logger has exactly one handler, on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
ROLES = ("supervisor", "worker", "http")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, role: str, worker: int | None = None):
        super().__init__()
        self.role, self.worker = role, worker

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "role": self.role,
            "worker": self.worker,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def formatter(fmt: str, role: str, worker: int | None = None) -> logging.Formatter:
    """The formatter of ``fmt`` ("text" or "json") for a process of ``role``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    if fmt == "json":
        return JsonFormatter(role, worker)
    if fmt != "text":
        raise ValueError(f"unknown log format {fmt!r} (one of {', '.join(FORMATS)})")
    label = role if worker is None else f"{role}-{worker}"
    return logging.Formatter(f"%(asctime)s {label} %(levelname)s %(name)s: %(message)s")


def setup(level: int | str, fmt: str = "text", role: str = "supervisor",
          worker: int | None = None, stream=None) -> None:
    """Configure the root logger of this process: ``level``, one stderr handler in ``fmt``.

    Replaces handlers set before (a second call wins, as in a spawned child that imported a
    module which logged at import time)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt, role, worker))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
