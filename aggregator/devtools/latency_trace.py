"""Where a record's end-to-end latency goes: per-step timestamps, for the bench only.

Off (every hook is ``None``) unless the environment variable ``AGGREGATOR_LATENCY_TRACE``
names a directory when a process starts; then the supervisor and each worker write one
JSON line per step into ``<dir>/<role>-<pid>.jsonl`` (line-buffered, so a killed process
keeps what it wrote). bench/stages/latency.py (`measure_latency(trace=True)`) sets it and
joins the files with the producer's send times and the durable-offset poller
(`breakdown`). Times are wall-clock seconds (``time.time()``), the clock of the producer and
the poller.

Lines:

- supervisor ``["topics", [topic, ...]]``: the topic of each topic index, first;
- supervisor ``["round", t_called, t_returned, n]``: one ``consume()`` call that returned
  `n` records;
- supervisor ``["put", worker, batch id, t_dispatched, t_put]``: a ring message of the round
  dispatched at `t_dispatched` went into the worker's ring at `t_put` (later when the ring
  was full: the message waited in ``pending`` and the partitions were paused);
- worker ``["txn", t_close, t_commit, t_durable, t_acked, txn_bytes, [[batch id, t_taken,
  [[topic index, partition, first offset, last offset], ...]], ...]]``: one transaction,
  its commit window closed at `t_close` (applying starts), LMDB commit from `t_commit` to
  `t_durable`, acknowledged and published at `t_acked`; the ring messages it took, each
  with the time it was taken and its records' offset ranges per partition. `txn_bytes`:
  the transaction's byte budget (slow start).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "AGGREGATOR_LATENCY_TRACE"


class Trace:
    """One process's trace file."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "w", buffering=1)  # noqa: SIM115 - closed by close()
        self.mono_to_wall = time.time() - time.monotonic()
        self.dispatched: dict[tuple[int, int], float] = {}  # (worker, bid) -> t, pending
        self.taken: list = []  # the current transaction's ring messages

    def write(self, *fields) -> None:
        self.f.write(json.dumps(fields) + "\n")

    # ---- supervisor ---------------------------------------------------------------------
    def round(self, t_called: float, n: int) -> None:
        self.write("round", t_called, time.time(), n)

    def put(self, worker: int, bid: int, t_dispatched: float | None = None) -> None:
        """A ring message went into its ring now (`t_dispatched` None: it was pending)."""
        if t_dispatched is None:
            t_dispatched = self.dispatched.pop((worker, bid), 0.0)
        self.write("put", worker, bid, t_dispatched, time.time())

    def pending(self, worker: int, bid: int, t_dispatched: float) -> None:
        self.dispatched[(worker, bid)] = t_dispatched

    # ---- worker -------------------------------------------------------------------------
    def took(self, msgs: list) -> None:
        """Decoded supervisor messages taken from the ring now."""
        now = time.time()
        for m in msgs:
            if len(m) < 4:
                continue  # a stop message
            ranges: dict[tuple[int, int], list[int]] = {}
            for rec in m[3]:
                r = ranges.get((rec[0], rec[1]))
                if r is None:
                    ranges[(rec[0], rec[1])] = [rec[2], rec[2]]
                else:
                    r[0], r[1] = min(r[0], rec[2]), max(r[1], rec[2])
            self.taken.append([m[1], now, [[ti, p, lo, hi] for (ti, p), (lo, hi) in
                                           ranges.items()]])

    def transaction(self, t_close: float, commit_ns: int, dt_ns: int, txn_bytes: int) -> None:
        """The transaction whose window closed at `t_close` committed (monotonic ns start,
        duration) and was acknowledged now."""
        if not self.taken:
            return
        c0 = commit_ns / 1e9 + self.mono_to_wall
        self.write("txn", t_close, c0, c0 + dt_ns / 1e9, time.time(), txn_bytes, self.taken)
        self.taken = []

    def close(self) -> None:
        self.f.close()


def open_trace(role: str) -> Trace | None:
    """The trace of this process (`role`: "supervisor", "worker0"...), None when off."""
    d = os.environ.get(ENV)
    if not d:
        return None
    return Trace(Path(d) / f"{role}-{os.getpid()}.jsonl")


def read_dir(d: str | Path) -> tuple[list, dict]:
    """(supervisor lines, {worker index: lines}) of a trace directory."""
    sup: list = []
    workers: dict[int, list] = {}
    for p in sorted(Path(d).glob("*.jsonl")):
        lines = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        role = p.name.split("-")[0]
        if role == "supervisor":
            sup.extend(lines)
        elif role.startswith("worker"):
            workers.setdefault(int(role[6:]), []).extend(lines)
    return sup, workers
