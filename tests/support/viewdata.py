"""Write view documents into real LMDB shards the way a worker lays them out (for read tests)."""

from __future__ import annotations

from pathlib import Path

from aggregator.routing import SLOTS, slot_of, slot_prefix, worker_of
from aggregator.store import Shard, shard_path, view_key

VIEWS = ["customer", "order", "product"]  # shop.toml's views, in their id order


def record(doc: dict | None, version: int = 1, fresh: dict | None = None) -> dict:
    """A stored document: ``{"v", "d" (None = tombstone), "s": {source: [seq, time]}}``."""
    return {"v": version, "d": doc, "s": fresh or {}}


def shard_of(key: str, workers: int) -> int:
    return worker_of(slot_of(key.encode()), workers)


def lmdb_key(view_id: int, key: str) -> bytes:
    return view_key(slot_prefix(slot_of(key.encode())), view_id, key)


def write_docs(data_dir: Path, workers: int, docs: dict[tuple[str, str], dict],
               views: list[str] = VIEWS, map_size: int = 16 << 20) -> None:
    """Create (or add to) the shards of ``data_dir`` with ``docs``: {(view, key): record}.

    Every shard is stamped like a booted worker (layout and ``meta["views"]``), and closed
    again: LMDB allows one open environment per file per process.
    """
    for i in range(workers):
        shard = Shard(shard_path(data_dir, i), map_size=map_size, sync=False)
        try:
            shard.check_layout(shard=i, workers=workers, slots=SLOTS)
            shard.put_meta(views=list(views))
            mine = {k: v for k, v in docs.items() if shard_of(k[1], workers) == i}
            b = shard.begin()
            for (view, key), rec in mine.items():
                b.put_doc(lmdb_key(views.index(view), key), rec)
            b.commit()
        finally:
            shard.close()
