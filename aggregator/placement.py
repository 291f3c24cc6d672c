"""Which local worker runs each task this instance owns (cluster mode).

The consumer group decides which tasks (tasks-topic partitions) an instance owns; the
supervisor decides which of its workers runs each one, with this class, when tasks are
assigned, revoked or lost. Workers learn it through ring messages: a restore request
(MSG_RESTORE) makes a task a worker's, a drop request (MSG_DROP) takes it away, and the
shared "wanted" word of the task (cluster.wanted_segment_name) names the one request whose
worker may act on it.

Invariants:
- A task is placed on at most one worker at a time (`worker_of`), so one task's records, hence
  every key of it, are applied by one worker in partition order.
- Balanced by count: after `place`, and after the moves `moves()` returns are carried out, the
  numbers of tasks of any two workers differ by at most one.
- Sticky: a task gained goes to the worker whose shard already holds its state (then its
  restore is a catch-up) as long as that keeps the balance; a placed task moves only when the
  counts would otherwise differ by more than one.

A move between local workers is the supervisor's (`TaskManager.balance`): the task's
partition is paused, every worker drains and commits, the old worker drops the task, the new
one restores it from the changelog and claims it (a new epoch): the semantics of a revoke
on one worker and an assignment on another.
"""

from __future__ import annotations


class Placement:
    """task → local worker for the tasks this instance owns or is restoring."""

    def __init__(self, workers: int):
        self.workers = workers
        self.worker_of: dict[int, int] = {}

    def counts(self) -> list[int]:
        out = [0] * self.workers
        for w in self.worker_of.values():
            out[w] += 1
        return out

    def tasks_of(self, worker: int) -> list[int]:
        return sorted(t for t, w in self.worker_of.items() if w == worker)

    def place(self, tasks: list[int], cached: dict[int, int] | None = None) -> dict[int, int]:
        """Place tasks not placed yet; `cached[t]`: the worker whose shard holds t's state.
        Returns {task: worker} for `tasks`."""
        cached = cached or {}
        counts = self.counts()
        total = sum(counts) + len(tasks)
        base, extra = divmod(total, self.workers)  # `extra` workers may hold base + 1
        over = sum(c > base for c in counts)
        out: dict[int, int] = {}
        # the tasks with a cache first: they get their worker while it has room
        for t in sorted(tasks, key=lambda t: (t not in cached, t)):
            w = cached.get(t)
            if w is None or not (counts[w] < base or (counts[w] == base and over < extra)):
                w = min(range(self.workers), key=lambda i: (counts[i], i))
            if counts[w] >= base:
                over += 1
            counts[w] += 1
            self.worker_of[t] = out[t] = w
        return out

    def remove(self, tasks) -> dict[int, int]:
        """Forget tasks (revoked, lost): {task: the worker it was on} for those placed."""
        return {t: self.worker_of.pop(t) for t in tasks if t in self.worker_of}

    def moves(self) -> list[tuple[int, int, int]]:
        """(task, from, to) moves that balance the counts (none when they differ by at most
        one); the highest-numbered tasks of the fullest workers move first. Not applied:
        the caller applies them with `move`."""
        counts = self.counts()
        by_worker = {w: self.tasks_of(w) for w in range(self.workers)}
        out = []
        while True:
            hi = max(range(self.workers), key=lambda i: (counts[i], -i))
            lo = min(range(self.workers), key=lambda i: (counts[i], i))
            if counts[hi] - counts[lo] <= 1:
                return out
            t = by_worker[hi].pop()
            out.append((t, hi, lo))
            counts[hi] -= 1
            counts[lo] += 1

    def move(self, task: int, worker: int) -> None:
        self.worker_of[task] = worker

    def snapshot(self) -> dict[str, int]:
        """{task (as a string, for JSON): worker}."""
        return {str(t): w for t, w in sorted(self.worker_of.items())}
