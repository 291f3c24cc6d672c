"""What one attempt at applying a batch has done so far, held until its commit.

A worker applies a group of ring messages in one LMDB transaction (worker.py). Everything the
attempt changes outside that transaction lives in one `BatchState`, built fresh for every
attempt (`Worker.process`): after a rollback nothing of the failed attempt is left to reset
by hand, and after the commit `Worker._post_commit` moves what it must keep into the
worker's long-lived state (through-offsets, link sequences, totals...).

`TaskBatchState` adds what cluster mode keeps per attempt (task_worker.py).
"""

from __future__ import annotations

from .store import TOTALS


class BatchState:
    """The per-attempt state of a worker's batch (see the module docstring)."""

    __slots__ = (
        "through", "link_in", "out", "seqpart", "parked", "stats", "totals", "seen_log",
        "log_pruned", "ack", "docs", "log", "changes", "chg_out", "pruned", "outmsg",
        "pruned_out", "bloom_saved", "dlq", "stop", "doc_bytes", "bodies", "route", "full",
    )

    def __init__(self) -> None:
        self.through: dict[tuple[int, int], int] = {}  # (topic index, partition) -> offset
        self.link_in: dict[int, int] = {}  # source worker -> last link seq applied
        self.out: dict[int, list] = {}  # owner worker -> view updates to forward
        self.seqpart: dict[bytes, tuple[str, int]] = {}  # gate key -> (topic, partition)
        self.parked: dict[tuple[bytes, int], tuple] = {}  # (gate key, seq) -> (event, record)
        self.stats = dict.fromkeys(TOTALS, 0)  # what the batch counted
        self.totals: dict[str, int] | None = None  # the shard's totals with this batch
        self.seen_log: tuple[int, int] | None = None  # (dedup log seq, ids) of the batch
        self.log_pruned = 0  # dedup log pruned up to this seq
        self.ack = -1  # highest supervisor batch id, acknowledged after the commit
        # document key -> document, changed in place (taken from the worker's doc_cache, or
        # read from the shard; back into the cache after the commit)
        self.docs: dict[bytes, dict] = {}
        self.doc_bytes: dict[bytes, int] = {}  # document key -> stored size (as committed)
        # document key -> (version, doc_codec.json_body of the document at that version:
        # JSON bytes, or None when not JSON-exact), made by the change event of that version
        # or at the store, used by both (one encoding, see doc_codec.py)
        self.bodies: dict[bytes, tuple[int, bytes | None]] = {}
        # document key -> updates applied (for undo), or their count (the compiled route
        # stage's byte path, which undoes without them: _route.pyx)
        self.log: dict[bytes, list | int] = {}
        self.changes: list[tuple] = []  # change events, one per version (not coalesced)
        self.chg_out: list[tuple[int, int, bytes]] = []  # (first, last change seq, blob)
        self.pruned = 0  # change events pruned up to this seq
        self.outmsg: dict[int, list[tuple[int, bytes]]] = {}  # owner -> (link seq, message)
        self.pruned_out: dict[int, int] = {}  # peer -> outbox pruned up to this link seq
        self.bloom_saved = False  # the bloom filter's generation stored
        self.dlq: list[tuple] = []  # dead letters sent (not again on a retry)
        self.stop = False  # a stop message was among the batch's
        self.route = None  # the compiled route stage's reads of worker and attempt (_route.pyx)
        # (gate key, event, record) whose park was full, left for the gap policy until the
        # transaction's last pass (worker.py `_apply`); None: handled at once (gate.py)
        self.full: list | None = None


class TaskBatchState(BatchState):
    """Cluster mode: `BatchState` plus the tasks topic's forwards and the changelog."""

    __slots__ = ("kfwd", "kafka_done", "markers", "allowed")

    def __init__(self, allowed: set[int]) -> None:
        super().__init__()
        self.kfwd: list[tuple[int, list]] = []  # (task, update) to forward
        self.kafka_done = False  # the changelog has the batch (its markers delivered)
        self.markers: dict[int, tuple[int, int]] = {}  # task -> (epoch, seq)
        self.allowed = allowed  # owned tasks the supervisor still wants this worker to act on
