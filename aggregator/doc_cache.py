"""Committed view documents kept in a worker across transactions (service.doc_cache_bytes).

A worker's transaction reads every document it touches and unpacks it (store.Batch.get_doc);
hot documents are touched again by the next transactions. `DocCache` keeps the record as
the merge uses it (``{"v", "j": JSON bytes, "s"}`` for the compiled route stage's byte path,
``{"v", "d", "s"}`` otherwise) of recently committed documents,
least recently committed first out, bounded by an estimate of their memory.

Only committed states enter the cache, and an attempt owns what it takes:

- `take` removes the document from the cache and hands it to the attempt, which changes it in
  place (stages/route.py). Until the attempt commits, the cache does not have that key, so a
  rolled-back attempt (LMDB error, map full, data disk refused, a merge error undone by
  `_replay`, an exception that stops the worker) leaves nothing of itself here: the retry
  reads the document from the shard;
- `put` is called after the commit (`Worker._post_commit`) with the documents the transaction
  stored, as they were stored.

Nothing else writes documents in normal mode (a reshard runs before the workers start). Cluster
mode restores and drops tasks with raw writes and does not use the cache (task_worker.py).
"""

from __future__ import annotations

from collections import OrderedDict

# The unpacked form of a document costs about 8x its msgpack size (measured over the shop
# views: 6.8-13x, mean 8.3); plus the entry: key, tuple, ordered-dict node.
OBJECT_FACTOR = 8
ENTRY_BYTES = 200


def cost(packed_bytes: int) -> int:
    """Estimated memory of a cached document whose stored (packed) form has this size."""
    return packed_bytes * OBJECT_FACTOR + ENTRY_BYTES


class DocCache:
    """Document key -> committed stored form, bounded by `budget` estimated bytes (LRU)."""

    __slots__ = ("_docs", "budget", "used", "hits", "misses")

    def __init__(self, budget: int) -> None:
        self._docs: OrderedDict[bytes, tuple[dict, int]] = OrderedDict()
        self.budget = budget
        self.used = 0  # estimated bytes of the cached documents
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, dkey: bytes) -> bool:
        return dkey in self._docs

    def take(self, dkey: bytes) -> dict | None:
        """The committed document, removed from the cache (the caller may change it), or
        None when it is not cached."""
        entry = self._docs.pop(dkey, None)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.used -= entry[1]
        return entry[0]

    def put(self, dkey: bytes, stored: dict, packed_bytes: int) -> None:
        """Keep a committed document (`packed_bytes`: its stored size); evicts the least
        recently put documents beyond the budget."""
        size = cost(packed_bytes)
        old = self._docs.pop(dkey, None)
        if old is not None:
            self.used -= old[1]
        if size > self.budget:
            return
        self._docs[dkey] = (stored, size)
        self.used += size
        docs = self._docs
        while self.used > self.budget:
            self.used -= docs.popitem(last=False)[1][1]

    def discard(self, dkey: bytes) -> None:
        entry = self._docs.pop(dkey, None)
        if entry is not None:
            self.used -= entry[1]

    def clear(self) -> None:
        self._docs.clear()
        self.used = 0
