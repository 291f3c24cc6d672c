"""Which Kafka offsets may be committed: the durability watermark across workers.

Each ring message the supervisor sends a worker may carry "through" offsets: the last offset
of each partition consumed in that round. When the worker acknowledges the message (after
its LMDB commit), everything routed to it from those partitions up to those offsets is
durable. A partition's offset is committable up to the minimum over all workers of their
acknowledged through-offset — every record at or below it is durable in the shard it went to.

The order of durability, as in quix-streams' checkpoint:
  1. the worker commits state, dedup ids, sequences and through-offsets in one LMDB
     transaction (after flushing its dead-letter producer);
  2. it acknowledges the batch id in the control block;
  3. the supervisor commits the watermark to Kafka (informational: on restart the start
     offsets come from LMDB, which can only be ahead of Kafka's).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

TP = tuple[int, int]  # (topic index, partition)


class Checkpoint:
    def __init__(self, workers: int, owner: Callable[[TP], int] | None = None):
        """`owner(tp)`: the one worker that gets a partition's records (cluster mode: a
        task's partition), whose acknowledgements alone decide its watermark; None: all."""
        self.workers = workers
        self.owner = owner
        self.assign_start: dict[TP, int] = {}
        self.acked_through: list[dict[TP, int]] = [{} for _ in range(workers)]
        self.inflight: list[deque] = [deque() for _ in range(workers)]
        self.last_committed: dict[TP, int] = {}

    def assign(self, tp: TP, start: int, durable: list[int | None]) -> None:
        """A partition was assigned, starting at `start`; `durable[w]` is shard w's offset."""
        self.assign_start[tp] = start
        self.last_committed.pop(tp, None)
        for w, off in enumerate(durable):
            if off is None:
                self.acked_through[w].pop(tp, None)
            else:
                self.acked_through[w][tp] = off

    def dispatched(self, worker: int, batch_id: int, through: dict[TP, int] | None) -> None:
        self.inflight[worker].append((batch_id, through))

    def acked(self, worker: int, batch_id: int) -> None:
        """The worker durably committed every message up to `batch_id`."""
        q = self.inflight[worker]
        done = self.acked_through[worker]
        while q and q[0][0] <= batch_id:
            _, through = q.popleft()
            if through:
                for tp, off in through.items():
                    if off > done.get(tp, -1):
                        done[tp] = off

    def reset_worker(self, worker: int, durable: dict[TP, int]) -> None:
        """A worker died: forget its unacknowledged messages; keep what its shard holds."""
        self.inflight[worker].clear()
        self.acked_through[worker] = dict(durable)

    def watermark(self, tp: TP) -> int | None:
        """Highest offset of `tp` durable in every shard, or None."""
        if self.owner is not None:
            return self.acked_through[self.owner(tp)].get(tp)
        low = None
        for done in self.acked_through:
            off = done.get(tp)
            if off is None:
                return None
            if low is None or off < low:
                low = off
        return low

    def committable(self, tps) -> list[tuple[TP, int]]:
        """(partition, offset) pairs whose watermark moved since the last call."""
        out = []
        for tp in tps:
            wm = self.watermark(tp)
            if wm is not None and wm > self.last_committed.get(tp, -1):
                self.last_committed[tp] = wm
                out.append((tp, wm))
        return out

    def idle(self) -> bool:
        """True when every dispatched message has been acknowledged."""
        return not any(self.inflight)
