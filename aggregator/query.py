"""Read-only access to the view documents in the shards, for the HTTP API and the CLI.

Reads go straight to LMDB, never through the workers: each shard's environment is opened
read-only (``lmdb.open(readonly=True, lock=True)``, by store.SharedReader), which LMDB
allows next to the one writer (the worker) and any number of other readers. Rules kept here:

- **One read transaction per call, per shard.** A transaction pins the snapshot it started
  on and keeps the writer from reusing those pages, so none outlives the call that opened it.
  Database handles are opened before it, in a transaction of their own: a handle opened
  inside a read transaction is closed again when that transaction ends.
- **Map growth by the writer.** When a worker grows its map past the size this process has
  mapped, ``mdb_txn_begin`` fails with ``MDB_MAP_RESIZED``; the reader then adopts the new
  size with ``set_mapsize(0)`` (allowed with no transaction open in this process, which the
  per-shard lock ensures) and begins again.
- **Shards that do not exist yet** (the service has not booted) read as empty; they are
  opened on first use once ``data.mdb`` appears.
- **The document log** (store.py, format 5): documents committed since the worker's last
  checkpoint are in ``doc_log``, not yet in ``views``. Each shard keeps a `DocLogIndex`
  (document key -> where its latest record is), caught up in each read transaction with the
  log records appended since the previous one; a get reads the log record's bytes through a
  buffer, a listing merges the indexed keys into the ``views`` scan in key order.

Listing order (:meth:`Views.list_keys`): shard 0..N-1, and within a shard the LMDB key order
of that view's rows, which is slot order (``xxh3_64(key) % 4096``) and then key bytes. It is
stable while keys are added or removed, but it is **not alphabetical**. A cursor is an opaque
string that encodes (shard, last LMDB key returned); listing resumes strictly after it, so a
walk over all pages returns every key that existed throughout the walk exactly once.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

from .doc_codec import record_live, unpack_record
from .metrics import read_status
from .routing import slot_of, slot_prefix, worker_of
from .store import (
    DOC_LOG_EPOCH,
    TOTALS_KEY,
    SharedReader,
    doc_log_entries,
    normalize_totals,
    parse_view_key,
    shard_path,
    view_key,
)

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 480  # view keys are bounded by service.max_key_bytes (<= 480)
_CURSOR_VERSION = 1


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


class QueryError(Exception):
    """A request that cannot be answered as asked (unknown view, bad cursor)."""


class UnknownView(QueryError, KeyError):
    """The view is not configured (or, without a config, not in any shard)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown view"


class BadCursor(QueryError, ValueError):
    """The cursor was not produced by :meth:`Views.list_keys` for this data directory."""


_LEN = 0xFFFFFFFF
_DOC_NAMES = ("views", "doc_log", "meta")  # what a document read opens


class DocLogIndex:
    """A reader's index of one shard's document log (store.py, format 5): where the latest
    record of each document logged since the last checkpoint is, so that a request reads
    only the log records appended since the previous one, and a document's bytes straight
    from the log record that holds it.

    Per document one int: log key << 67 | offset << 35 | length << 3 | in views << 2 |
    stored << 1 | live (stored 0: deleted; live: stored and not a tombstone record), ~125
    bytes per logged document with its key and the sorted key list. ``views`` changes only
    at a checkpoint, so whether a key is in it is looked up once, and `views_delta` (what
    the log adds to the entries of ``views``) is kept up to date. The worker bumps meta
    ``doc_log_epoch`` in every checkpoint (the log is emptied and its keys start again at
    1): a new epoch drops the index.
    """

    __slots__ = ("epoch", "last", "where", "views_delta", "_keys")

    def __init__(self):
        self.epoch: int | None = None
        self.last = 0  # last log key read
        self.where: dict[bytes, int] = {}
        self.views_delta = 0
        self._keys: list[bytes] | None = None  # sorted keys of `where`, made on demand

    def refresh(self, snap) -> None:
        """Catch up with the log as of `snap` (opened with ``_DOC_NAMES``, doc_log=False)."""
        raw = snap.get("meta", DOC_LOG_EPOCH)
        epoch = 0 if raw is None else _unpack(raw)
        if epoch != self.epoch:
            self.epoch, self.last, self.where, self._keys = epoch, 0, {}, None
            self.views_delta = 0
        where = self.where
        for n, value in snap.doc_log_after(self.last):
            for dkey, off, length in doc_log_entries(value):
                old = where.get(dkey)
                if old is None:
                    in_views = snap.get("views", dkey) is not None
                else:
                    in_views = bool(old & 4)
                    self.views_delta -= ((old >> 1) & 1) - in_views
                if length < 0:
                    where[dkey] = in_views << 2
                    self.views_delta -= in_views
                else:
                    where[dkey] = (n << 67 | off << 35 | length << 3 | in_views << 2 | 2
                                   | record_live(value[off:off + length]))
                    self.views_delta += 1 - in_views
            self.last = n
            self._keys = None

    def keys(self) -> list[bytes]:
        if self._keys is None:
            self._keys = sorted(self.where)
        return self._keys

    def live(self, dkey: bytes) -> bool:
        return bool(self.where[dkey] & 1)

    def record(self, snap, dkey: bytes) -> bytes | None:
        """The stored bytes of a document (the log overlaid), or None."""
        w = self.where.get(dkey)
        if w is None:
            raw = snap.get("views", dkey)
        elif not w & 2:
            return None  # deleted
        else:
            off, length = (w >> 35) & _LEN, (w >> 3) & _LEN
            rec = snap.get("doc_log", (w >> 67).to_bytes(8, "big"))
            raw = rec[off:off + length]
        return None if raw is None else bytes(raw)


class ShardReader:
    """One shard's LMDB environment, opened read-only on first use (store.SharedReader)."""

    def __init__(self, path: Path):
        self.path = path
        self._reader = SharedReader(path, log)
        self._views: list[str] | None = None  # meta "views": view names in id order
        self._lock = threading.Lock()
        self.doc_log = DocLogIndex()  # read and changed under _lock (read_docs)

    def read(self, names: tuple[str, ...], fn, buffers: bool = False, doc_log: bool = True):
        """Run ``fn(snapshot) -> value`` in one read transaction (a store.Snapshot over the
        databases ``names``, a missing one reading as empty); None if no shard yet.
        `buffers`: values are buffers valid until `fn` returns."""
        with self._lock:
            snap = self._reader.snapshot(names, buffers=buffers, doc_log=doc_log)
            if snap is None:
                return None
            try:
                return fn(snap)
            finally:
                snap.close()

    def read_docs(self, fn):
        """``fn(snapshot, doc_log_index)`` in one read transaction over ``views`` with the
        document log, the index caught up first (values are buffers until `fn` returns)."""
        def run(snap):
            self.doc_log.refresh(snap)
            return fn(snap, self.doc_log)
        return self.read(_DOC_NAMES, run, buffers=True, doc_log=False)

    def view_ids(self, refresh: bool = False) -> list[str]:
        """View names in id order (``meta["views"]``); [] before the worker booted."""
        if self._views is None or refresh:
            def fn(snap):
                raw = snap.get("meta", b"views")
                return None if raw is None else list(_unpack(raw))
            views = self.read(("meta",), fn)
            if views is not None:
                self._views = views
        return self._views or []

    def view_id(self, view: str) -> int | None:
        ids = self.view_ids()
        if view not in ids:
            ids = self.view_ids(refresh=True)  # a restart with a new view appends ids
        return ids.index(view) if view in ids else None

    # ---- stats -----------------------------------------------------------------------
    def stats(self) -> dict:
        """Entries per named database, map size, data file size, the shard's totals."""
        data = self.path / "data.mdb"
        out: dict[str, Any] = {"path": str(self.path), "exists": data.exists()}
        if not out["exists"]:
            return out
        out["file_bytes"] = data.stat().st_size

        names = self.read((), lambda snap: snap.names())
        # the dedup index's databases count as one, "dedup" (store.py, format 2)
        tables = tuple(n for n in names or () if not n.startswith("dedup."))
        def count(snap):
            out = snap.entries_of()
            if "views" in out and "doc_log" in out:  # with the log overlaid (DocLogIndex)
                self.doc_log.refresh(snap)
                out["views"] += self.doc_log.views_delta
            return out
        entries = self.read(tables, count, doc_log=False)
        if entries is not None and names and any(n.startswith("dedup.") for n in names):
            entries["dedup"] = self.read(  # with the unsealed ids of dedup_live (format 4)
                (*(n for n in names if n.startswith("dedup.")), "dedup_live", "meta"),
                lambda snap: snap.dedup_entries())
        with self._lock:
            opened = self._reader.info()
            if entries is None or opened is None:
                return out
            info, psize = opened
        out["entries"] = entries
        raw = self.read(("meta",), lambda snap: snap.get("meta", TOTALS_KEY.encode()))
        out["totals"] = normalize_totals(None if raw is None else _unpack(raw))
        out["map_bytes"] = info["map_size"]
        out["used_bytes"] = (info["last_pgno"] + 1) * psize
        out["readers"] = info["num_readers"]
        return out

    def close(self) -> None:
        with self._lock:
            self._reader.close()


class OwnedTasks:
    """Cluster mode: which slots this instance serves and from which shard, from the status
    file's ``tasks`` (the tasks it owns and has restored) and ``placement`` (task -> the
    worker running it, placement.py); re-read at most every 0.5 s. A key of another task is
    not served here: its state may be stale or gone."""

    def __init__(self, data_dir: str | os.PathLike, tasks: int, workers: int):
        self.data_dir, self.tasks, self.workers = data_dir, tasks, workers
        self._shard: dict[int, int] = {}
        self._read_at = 0.0

    def __call__(self, slot: int) -> int | None:
        """The shard serving the slot's keys, or None."""
        now = time.monotonic()
        if now - self._read_at > 0.5:
            status = read_status(self.data_dir) or {}
            placement = status.get("placement") or {}
            self._shard = {t: placement.get(str(t), t % self.workers)
                           for t in status.get("tasks") or ()}
            self._read_at = now
        return self._shard.get(slot % self.tasks)


class Views:
    """Read-only queries over all shards of a data directory."""

    def __init__(self, data_dir: str | os.PathLike, workers: int,
                 views: list[str] | None = None,
                 serves: Callable[[int], int | None] | None = None):
        """``views``: the configured view names (None: whatever the shards hold);
        ``serves(slot)``: the shard that serves keys of a slot, None if none does (None:
        every slot, from its worker's shard, `routing.worker_of`)."""
        self.data_dir = Path(data_dir)
        self.serves = serves
        self.workers = workers
        self.configured = None if views is None else list(views)
        self.shards = [ShardReader(shard_path(self.data_dir, i)) for i in range(workers)]

    @classmethod
    def from_config(cls, config) -> Views:
        serves = None
        if config.cluster.enabled:
            serves = OwnedTasks(config.service.data_dir, config.cluster.tasks,
                                config.service.workers)
        return cls(config.service.data_dir, config.service.workers, list(config.views), serves)

    def check_layout(self) -> None:
        """Raise QueryError if an existing shard was written for another worker count."""
        for i, shard in enumerate(self.shards):
            def fn(snap):
                raw = snap.get("meta", b"workers")
                return None if raw is None else _unpack(raw)
            written = shard.read(("meta",), fn)
            if written is not None and written != self.workers:
                raise QueryError(f"{shard.path} was written by {written} workers, but "
                                 f"{self.workers} are configured (service.workers)")

    def views(self) -> list[str]:
        """The view names that can be queried."""
        if self.configured is not None:
            return list(self.configured)
        names: list[str] = []
        for s in self.shards:
            names += [v for v in s.view_ids(refresh=True) if v not in names]
        return names

    def _check_view(self, view: str) -> None:
        if self.configured is not None:
            if view not in self.configured:
                raise UnknownView(f"unknown view {view!r}")
        elif view not in self.views():
            raise UnknownView(f"unknown view {view!r}")

    # ---- documents ------------------------------------------------------------------
    def get(self, view: str, key: str) -> dict | None:
        """The document of ``view``/``key`` or None (absent or deleted).

        Returns ``{"view", "key", "version", "document", "freshness": {source: {"sequence",
        "time"}}}``; freshness holds, per CloudEvents source, the sequence and time of the last
        event of that source applied to the document.
        """
        self._check_view(view)
        raw_key = key.encode()
        if not raw_key or len(raw_key) > MAX_KEY_BYTES:
            return None
        slot = slot_of(raw_key)
        index = worker_of(slot, self.workers) if self.serves is None else self.serves(slot)
        if index is None:
            return None
        shard = self.shards[index]
        vid = shard.view_id(view)
        if vid is None:
            return None
        lkey = view_key(slot_prefix(slot), vid, key)

        raw = shard.read_docs(lambda snap, docs: docs.record(snap, lkey))
        if raw is None:
            return None
        rec = unpack_record(raw)
        if rec.get("d") is None:
            return None  # tombstone
        return {
            "view": view,
            "key": key,
            "version": rec["v"],
            "document": rec["d"],
            "freshness": {src: {"sequence": st[0], "time": st[1]}
                          for src, st in (rec.get("s") or {}).items()},
        }

    # ---- listing ----------------------------------------------------------------------
    def list_keys(self, view: str, limit: int = 100,
                  cursor: str | None = None) -> tuple[list[str], str | None]:
        """Up to ``limit`` keys of ``view`` after ``cursor``, and the cursor of the next page
        (None when there is no more). Deleted documents are left out. The order is shard,
        then slot, then key bytes: stable, not alphabetical (see the module docstring)."""
        self._check_view(view)
        if limit < 1:
            raise QueryError("limit must be >= 1")
        start_shard, after = decode_cursor(cursor, self.workers)
        keys: list[str] = []
        last: tuple[int, bytes] | None = None
        for i in range(start_shard, self.workers):
            want = limit + 1 - len(keys)  # one more than needed: is there a next page?
            rows = self._scan(i, view, after if i == start_shard else None, want)
            for lkey in rows:
                if len(keys) == limit:
                    return keys, encode_cursor(*last)
                keys.append(parse_view_key(lkey)[1])
                last = (i, lkey)
        return keys, None

    def _scan(self, index: int, view: str, after: bytes | None, limit: int) -> list[bytes]:
        """LMDB keys of live documents of ``view`` in shard ``index``, strictly after
        ``after``, at most ``limit``. One read transaction."""
        shard = self.shards[index]
        vid = shard.view_id(view)
        if vid is None:
            return []

        def fn(snap, docs):
            serves = None if self.serves is None else (
                lambda slot: self.serves(slot) == index)  # noqa: B023 - used at once
            overlay = (docs.keys(), docs.live) if docs.where else None
            return list(snap.view_keys(vid, after, limit, serves, overlay))

        return shard.read_docs(fn) or []

    def stats(self) -> list[dict]:
        """Per shard: path, entries per database, map size, file size (see ShardReader)."""
        return [{"shard": i, **s.stats()} for i, s in enumerate(self.shards)]

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> Views:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_cursor(shard: int, lkey: bytes) -> str:
    """Opaque page cursor: url-safe base64 of msgpack [version, shard, last LMDB key]."""
    blob = msgpack.packb([_CURSOR_VERSION, shard, lkey], use_bin_type=True)
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode()


def decode_cursor(cursor: str | None, workers: int) -> tuple[int, bytes | None]:
    """(shard, last LMDB key) of a cursor; (0, None) for the first page."""
    if not cursor:
        return 0, None
    try:
        blob = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, shard, lkey = msgpack.unpackb(blob, raw=False)
    except (binascii.Error, ValueError, TypeError, msgpack.UnpackException):
        raise BadCursor("invalid cursor") from None
    if (version != _CURSOR_VERSION or not isinstance(shard, int) or not 0 <= shard < workers
            or not isinstance(lkey, bytes) or len(lkey) < 3):
        raise BadCursor("invalid cursor")
    return shard, lkey
