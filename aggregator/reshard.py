"""Reshard: rewrite the shards of a data directory for another worker count.

The supervisor calls `ensure_layout` at start, holding the data-dir LOCK, before any worker
exists. Every per-key LMDB key starts with its 2-byte slot (routing.py), so slot `s` moves
whole from old shard `s % N` to new shard `s % M`. Per table:

- ``views``, ``parked``: copied slot by slot, unchanged (documents keep their version and
  parked events move with their stream); ``seq`` rows too (with the sequence log of format 4
  overlaid), their topic index translated to
  the new shard's topic table (meta ``seq_topics``: the old shards' tables merged).
- dedup ids: copied slot by slot; generations are shifted so that every old shard's current
  bloom generation becomes the new current one G = max over old shards (so one merged shard
  keeps every live generation of each source), and entries older than the dedup window
  (G - dedup.bloom_generations) are dropped, as a rotation would. The new shard's worker
  seals the older generations (store.py); the bloom filter is rebuilt from the index at boot.

Migration from format 1 (store.py) is a reshard from N to N workers (or to the configured
count) that reads format 1 and writes format 2: the same crash-safe steps below, at every
start (`ensure_layout`) or with `aggregator migrate`. Format 1's ``seq`` rows (msgpack with
the topic name) become fixed-size rows, its ``dedup`` table (``dedup_gen`` is not read)
becomes the per-generation index. With the worker count unchanged, every new shard is its
old shard: generations are not shifted, and the shard token, the dedup log and the saved
bloom filter (bloom_snapshot.py) are carried over, so the first boot restores the filter.
- ``offsets``: per (topic, partition) the minimum over the old shards that give slots to the
  new one (none if any of them has none). Records above that minimum are redelivered to the
  new shard; those an old shard had applied are dropped there by the exact dedup index that
  moved with their slot (a malformed one is dead-lettered again: at least once).
- ``outbox``, ``links``, meta ``link_out``: forwarded updates a peer had not applied yet
  (link seq > the peer's ``links`` entry) are applied here, into the destination document, as
  the target worker would (worker.py, MSG_FORWARD; a merge error is dead-lettered); then
  every new shard starts with no link state.
- ``changes``: unpublished change events (seq > meta ``changes_published``) move to the new
  owner of their document, ahead of the events of the forwarded updates applied here, and
  are renumbered from 1 (ids are "<view>:<version>:<key>", not the sequence).
- ``meta``: the layout of the new shard; ``views`` and ``fingerprint`` as before;
  ``bloom_generation`` = G; ``writer_epoch`` above every old one; ``totals`` (store.py): the
  sum over the old shards, plus the pending forwarded updates dead-lettered here, goes to new
  shard 0 and the others start from zero (a total is not kept per slot), so the service's
  sum stays exact; ``shard_token`` and the dedup log's (store.py) are not carried (a new shard
  has no saved bloom filter: its first boot rebuilds it from the dedup index); other names are
  copied from the first old shard that has them.

Crash safety (a SIGKILL anywhere leaves the old layout, or finishes the new one):

1. build ``reshard-tmp/shard-<j>`` and sync it (an interrupted build is deleted at the next
   start: the old shards were not touched);
2. write the marker file ``RESHARD`` (fsync, rename): the commit point;
3. move every old shard to ``reshard-old/``, then every new one into place;
4. delete ``reshard-old`` and ``reshard-tmp``, then the marker.

With the marker present at start, steps 3-4 are redone: a ``shard-<k>`` in the data dir is
a new one exactly when k < M and ``reshard-tmp/shard-<k>`` is gone (the old ones all leave
before the first new one arrives).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lmdb
import msgpack

from . import bloom_snapshot, forwards
from .changes import ChangeEncoder, entry_of, outbox_records
from .config import Config
from .datadir import fsync_dir
from .doc_codec import json_body, pack_record, unpack_record
from .faults import fault_point
from .merge import MergeError
from .plan import ViewPlan, assign_view_ids
from .routing import SLOTS, slot_of, slot_prefix
from .store import (
    FORMAT_VERSION,
    FORMATS_IN_PLACE,
    TOTALS,
    TOTALS_KEY,
    Shard,
    change_key,
    key_slot,
    normalize_totals,
    offset_key,
    offset_value,
    outbox_prefix,
    parse_link,
    parse_offset_key,
    parse_offset_value,
    parse_outbox_key,
    parse_seq_value,
    parse_seq_value_v1,
    parse_view_key,
    view_key,
)

log = logging.getLogger(__name__)

MARKER = "RESHARD"
TMP = "reshard-tmp"
OLD = "reshard-old"
_SLOT_TABLES = ("views", "seq", "parked")  # copied slot by slot
_KNOWN_META = {"format", "shard", "workers", "slots", "views", "fingerprint",
               "bloom_generation", "change_seq", "changes_published", "link_out",
               TOTALS_KEY, "shard_token", "dedup_log_seq", "dedup_log_pruned",
               "dedup_index", "seq_topics"}
_CARRIED_META = ("shard_token", "dedup_log_seq", "dedup_log_pruned")  # same worker count
FORMATS_READ = (1, *FORMATS_IN_PLACE, FORMAT_VERSION)  # format 1 is migrated
_CHUNK_BYTES = 16 << 20  # bytes written per LMDB transaction

_pack = msgpack.Packer(use_bin_type=True).pack


def _unpack(b: bytes):
    return msgpack.unpackb(b, raw=False, strict_map_key=False, use_list=True)


class ReshardError(RuntimeError):
    """The data dir cannot be resharded as it is (nothing was changed)."""


@dataclass
class ReshardStats:
    old_workers: int
    new_workers: int
    keys: int = 0  # rows written, all tables
    bytes: int = 0  # key + value bytes written
    forwarded: int = 0  # pending forwarded updates applied
    changes: int = 0  # unpublished change events moved
    parked: int = 0
    dedup_dropped: int = 0  # outside the dedup window
    dead_lettered: int = 0  # pending forwarded updates that failed to merge
    seconds: float = 0.0


# ---- entry point ------------------------------------------------------------------------------


def ensure_layout(cfg: Config, data_dir: str | os.PathLike, workers: int,
                  dead_letters: Callable[[], object] | None = None) -> ReshardStats | None:
    """Finish an interrupted reshard, then reshard the data dir if its shards were written
    for another worker count. Returns the statistics of a reshard, or None.

    `dead_letters()` makes a DeadLetters-like object (send/deliver/close); it is called only
    if a pending forwarded update fails to merge.
    """
    data_dir = Path(data_dir)
    recover(data_dir)
    old = current_workers(data_dir)
    if old is None or (old == workers and not needs_migration(data_dir)):
        return None
    return Resharder(cfg, data_dir, old, workers, dead_letters).run()


def needs_migration(data_dir: Path) -> bool:
    """True if a shard of the data dir is in an older format than this build writes."""
    return any(_read_meta(p).get("format", FORMAT_VERSION) not in
               (FORMAT_VERSION, *FORMATS_IN_PLACE) for p in _shard_dirs(Path(data_dir)).values())


def _shard_dirs(data_dir: Path) -> dict[int, Path]:
    out = {}
    for p in data_dir.glob("shard-*"):
        suffix = p.name[len("shard-"):]
        if p.is_dir() and suffix.isdigit():
            out[int(suffix)] = p
    return out


def _read_meta(path: Path) -> dict:
    if not (path / "data.mdb").exists():
        return {}
    try:
        shard = Shard(path, readonly=True)
    except lmdb.Error as e:
        raise ReshardError(f"cannot read shard {path}: {e}") from e
    try:
        return shard.meta_items()
    finally:
        shard.close()


def current_workers(data_dir: Path) -> int | None:
    """The worker count the shards were written by (None: no stamped shard)."""
    counts: dict[int, list[int]] = {}
    for i, path in sorted(_shard_dirs(data_dir).items()):
        meta = _read_meta(path)
        if "format" not in meta:
            continue  # never stamped: empty
        if meta["format"] not in FORMATS_READ or meta.get("slots") != SLOTS:
            raise ReshardError(f"{path}: data format {meta['format']} with "
                               f"{meta.get('slots')} slots; this build reads formats "
                               f"{FORMATS_READ} with {SLOTS} slots")
        if meta.get("shard") != i:
            raise ReshardError(f"{path} says it is shard {meta.get('shard')}")
        counts.setdefault(meta.get("workers"), []).append(i)
    if not counts:
        return None
    if len(counts) > 1:
        raise ReshardError(f"the shards of {data_dir} disagree on the worker count: "
                           + ", ".join(f"{n} in shards {ix}" for n, ix in sorted(counts.items())))
    (n, indices), = counts.items()
    if max(indices) >= n:
        raise ReshardError(f"{data_dir}: shard {max(indices)} of a {n}-worker layout")
    return n


# ---- crash safety: the swap and its recovery ---------------------------------------------------


def _write_marker(data_dir: Path, content: dict) -> None:
    tmp = data_dir / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data_dir / MARKER)
    fsync_dir(data_dir)


def recover(data_dir: Path) -> None:
    """Finish a reshard whose marker was written; delete the leftovers of one that was not."""
    marker = data_dir / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        log.warning("finishing an interrupted reshard (%d → %d workers)", info["from"],
                    info["to"])
        _swap(data_dir, info["to"])
        return
    (data_dir / (MARKER + ".tmp")).unlink(missing_ok=True)
    if (data_dir / OLD).exists():
        raise ReshardError(f"{data_dir / OLD} exists without the {MARKER} marker; "
                           "move it away after checking the shards")
    if (data_dir / TMP).exists():
        log.warning("deleting an unfinished reshard in %s (the shards were not changed)",
                    data_dir / TMP)
        shutil.rmtree(data_dir / TMP)
        fsync_dir(data_dir)


def _swap(data_dir: Path, new_workers: int) -> None:
    """Steps 3-4; idempotent, so a rerun after any crash finishes them."""
    tmp, old = data_dir / TMP, data_dir / OLD
    old.mkdir(exist_ok=True)
    for k, path in sorted(_shard_dirs(data_dir).items()):
        if k >= new_workers or (tmp / path.name).exists():  # an old shard
            os.rename(path, old / path.name)
            fault_point("reshard_swap")
    fsync_dir(data_dir)
    fsync_dir(old)
    if tmp.exists():
        for path in sorted(_shard_dirs(tmp).values()):
            os.rename(path, data_dir / path.name)
            fault_point("reshard_swap")
        fsync_dir(tmp)
    fsync_dir(data_dir)
    shutil.rmtree(old)
    if tmp.exists():
        shutil.rmtree(tmp)
    fsync_dir(data_dir)
    fault_point("reshard_swap")
    (data_dir / MARKER).unlink()
    fsync_dir(data_dir)


# ---- the rewrite ---------------------------------------------------------------------------------


class _Old:
    """An old shard, read-only, in one read transaction for the whole reshard."""

    def __init__(self, path: Path | None):
        self.present = path is not None and (path / "data.mdb").exists()
        self.meta: dict = {}
        if not self.present:
            return
        self.path = path
        self.shard = Shard(path, readonly=True)
        self.snap = self.shard.snapshot()
        self.meta = self.snap.meta()
        self.format = self.meta.get("format", FORMAT_VERSION)
        self.topics = self.snap.seq_topics()

    def seq_row(self, value: bytes) -> list:
        """[last, topic name, partition] of a seq row of this shard's format."""
        if self.format == 1:
            return parse_seq_value_v1(value)
        return parse_seq_value(value, self.topics)

    def dedup_rows(self, prefix: bytes):
        """(S + identity hash, generation) of the shard's dedup ids in a slot."""
        if not self.present:
            return iter(())
        return self.snap.dedup_rows(prefix)

    def rows(self, table: str, prefix: bytes = b"", start: bytes | None = None):
        """(key, value) of a table whose key starts with `prefix` (and is >= `start`), in
        key order."""
        if not self.present:
            return iter(())
        return self.snap.rows(table, prefix, start)

    def get(self, table: str, key: bytes) -> bytes | None:
        return self.snap.get(table, key) if self.present else None

    def entries(self, table: str) -> int:
        """Rows of a table (``seq``: the streams, the sequence log overlaid)."""
        if not self.present:
            return 0
        return self.snap.seq_entries() if table == "seq" else self.snap.entries(table)

    def seq_rows(self, prefix: bytes):
        """(key, seq row) of the streams in a slot: ``seq`` with the sequence log overlaid
        (format 4; older formats have no log)."""
        if not self.present:
            return iter(())
        return self.snap.seq_rows(prefix)

    def close(self) -> None:
        if self.present:
            self.snap.close()
            self.shard.close()


class _Writer:
    """Puts into a new shard in bounded transactions; a full map grows and redoes the chunk."""

    def __init__(self, shard: Shard, stats: ReshardStats):
        self.shard = shard
        self.stats = stats
        self.ops: list[tuple[str, bytes, bytes, bool]] = []
        self.size = 0

    def put(self, table: str, key: bytes, value, append: bool = False) -> None:
        """A row; table ``dedup``: value = generation, ``seq``: value = [last, topic,
        partition] (the new shard's own encodings, store.py)."""
        self.ops.append((table, key, value, append))
        self.size += len(key) + (len(value) if isinstance(value, bytes) else 16)
        if self.size >= _CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.ops:
            return
        while True:
            chunk = self.shard.raw_write()
            try:
                for table, k, v, append in self.ops:
                    if table == "dedup":
                        chunk.set_seen(k, v)
                    elif table == "seq":
                        chunk.put_seq(k, *v)
                    elif not chunk.put(table, k, v, append=append):
                        raise ReshardError(f"{self.shard.path}: {table} key out of order")
                chunk.commit()
                break
            except lmdb.MapFullError:
                chunk.abort()
                if not self.shard.grow():
                    raise ReshardError(f"{self.shard.path}: LMDB map full at "
                                       "service.lmdb_max_map_size") from None
            except BaseException:
                chunk.abort()
                raise
        self.stats.keys += len(self.ops)
        self.stats.bytes += self.size
        self.ops.clear()
        self.size = 0


class Resharder:
    """One reshard of `data_dir` from `old` to `new` workers (steps 1-4 above)."""

    def __init__(self, cfg: Config, data_dir: Path, old: int, new: int,
                 dead_letters: Callable[[], object] | None = None):
        self.cfg = cfg
        self.data_dir = data_dir
        self.n, self.m = old, new
        self.make_dlq = dead_letters
        self.dlq = None
        self.stats = ReshardStats(old, new)

    def run(self) -> ReshardStats:
        t0 = time.monotonic()
        log.info("resharding %s: %d → %d workers", self.data_dir, self.n, self.m)
        tmp = self.data_dir / TMP
        tmp.mkdir()
        dirs = _shard_dirs(self.data_dir)
        olds = [_Old(dirs.get(i)) for i in range(self.n)]
        self.copied: dict[tuple[int, str], int] = {}  # (old shard, table) -> rows copied
        try:
            self._prepare(olds)
            for j in range(self.m):
                self._build(j, olds, tmp / f"shard-{j}")
                fault_point("reshard_build")
            self._check_all_copied(olds)
            fsync_dir(tmp)
            if self.dlq is not None:  # before the commit point: a rerun repeats, never loses
                self.dlq.deliver(lambda: None)  # waits for the broker, however long
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the old shards were not touched
            raise
        finally:
            for o in olds:
                o.close()
            if self.dlq is not None:
                self.dlq.close()
        _write_marker(self.data_dir, {"from": self.n, "to": self.m})
        _swap(self.data_dir, self.m)
        s = self.stats
        s.seconds = time.monotonic() - t0
        log.info("resharded %d → %d workers: %d keys (%.1f MB) in %.2f s; %d pending forwarded "
                 "updates applied, %d unpublished change events and %d parked events moved, "
                 "%d dedup ids beyond the window dropped", s.old_workers, s.new_workers, s.keys,
                 s.bytes / 1e6, s.seconds, s.forwarded, s.changes, s.parked, s.dedup_dropped)
        return s

    # -- everything that is not copied slot by slot, computed once ------------------------------
    def _prepare(self, olds: list[_Old]) -> None:
        metas = [o.meta for o in olds if "format" in o.meta]
        lists = [m.get("views") or [] for m in metas]
        self.views = max(lists, key=len)
        if any(v != self.views[:len(v)] for v in lists):
            raise ReshardError(f"the shards of {self.data_dir} number their views differently: "
                               f"{lists}")
        prints = {m.get("fingerprint") for m in metas} - {None}
        if len(prints) > 1:
            raise ReshardError(f"the shards of {self.data_dir} were written with different "
                               "configs; run once with the previous worker count and config")
        self.fingerprint = prints.pop() if prints else None
        self.extra_meta: dict = {}
        for m in metas:
            for name, value in m.items():
                if name not in _KNOWN_META:
                    self.extra_meta.setdefault(name, value)
        epochs = [m["writer_epoch"] for m in metas if isinstance(m.get("writer_epoch"), int)]
        if epochs:  # fencing (store.py): above every old writer, which must never write here
            self.extra_meta["writer_epoch"] = max(epochs) + 1
        # dedup generations: old shard i's generation g becomes g + shift[i]
        gens = [o.meta.get("bloom_generation", 0) for o in olds]
        self.same = self.n == self.m  # a migration: new shard j is old shard j
        self.gens = gens
        self.generation = max(gens)
        self.shift = [0 if self.same else self.generation - g for g in gens]
        self.oldest_gen = self.generation - self.cfg.dedup.bloom_generations + 1
        # the service's totals, all in new shard 0 (the module docstring)
        olds_totals = [normalize_totals(m.get(TOTALS_KEY)) for m in metas if TOTALS_KEY in m]
        self.totals = {name: sum(t[name] for t in olds_totals) for name in TOTALS}
        self.totals["since"] = min((t["since"] for t in olds_totals if t["since"]), default=0)
        self.new_docs: list[dict[bytes, dict]] = [{} for _ in range(self.m)]
        self.moved_changes: list[list[bytes]] = [[] for _ in range(self.m)]
        self.new_changes: list[list[bytes]] = [[] for _ in range(self.m)]
        self._move_changes(olds)
        self._apply_forwarded(olds)

    def _move_changes(self, olds: list[_Old]) -> None:
        """Unpublished change events → the new owner of their document, in sequence order
        (from blobs or format 1 rows, written as format 1 entries with their own time)."""
        for i, o in enumerate(olds):
            published = o.meta.get("changes_published", 0)
            index = None  # (view id, key) -> slot of the documents of shard i, if needed
            for rec in outbox_records(o.rows("changes"), published):
                vid, key = rec[1], rec[2]
                slot = slot_of(key.encode())
                if slot % self.n != i or o.get("views", view_key(slot_prefix(slot), vid,
                                                                 key)) is None:
                    if index is None:
                        index = {parse_view_key(k): key_slot(k) for k, _ in o.rows("views")}
                    found = index.get((vid, key))
                    if found is None:
                        log.warning("reshard: change event of %s/%s has no document",
                                    self.views[vid], key)
                    else:
                        slot = found
                self.moved_changes[slot % self.m].append(entry_of(*rec[1:]))
                self.stats.changes += 1

    def _apply_forwarded(self, olds: list[_Old]) -> None:
        """Forwarded updates that their target shard had not applied, applied in link order
        as worker.py does for MSG_FORWARD (merge error: dead-letter, document unchanged)."""
        links = [dict(parse_link(k, v) for k, v in o.rows("links")) for o in olds]
        pending = []
        for i, o in enumerate(olds):
            for t in range(self.n):
                if t == i:
                    continue
                after = links[t].get(i, 0)
                for k, msg in o.rows("outbox", outbox_prefix(t)):
                    seq = parse_outbox_key(k)[1]
                    if seq > after:
                        pending.append((seq, msg))
        if not pending:
            return
        if self.fingerprint is not None and self.fingerprint != self.cfg.fingerprint():
            raise ReshardError(
                f"{len(pending)} forwarded updates are pending from a run with another config "
                "(sources or views changed); run once with the previous config and worker "
                "count and stop it cleanly (SIGTERM), or start from a new data_dir")
        views = assign_view_ids(self.views, list(self.cfg.views))
        plan = ViewPlan(self.cfg, {v: i for i, v in enumerate(views)})
        chg = ChangeEncoder(self.cfg, views)
        docs: dict[bytes, dict] = {}
        changed: dict[bytes, tuple[int, str]] = {}
        for _, msg in pending:
            for feed_id, key, slot, fwd in forwards.decode(msg)[3]:
                feed = plan.feeds[feed_id]
                dkey = view_key(slot_prefix(slot), feed.view_id, key)
                stored = docs.get(dkey)
                if stored is None:
                    raw = olds[slot % self.n].get("views", dkey)
                    stored = unpack_record(raw) if raw is not None else \
                        {"v": 0, "d": None, "s": {}}
                before = _pack(stored)
                try:
                    doc = feed.merge.apply(stored["d"], fwd)
                except MergeError as e:
                    log.warning("reshard: merge error in view %s: %s", feed.view, e)
                    if dkey in docs:
                        docs[dkey] = _unpack(before)
                    if self.dlq is None:
                        if self.make_dlq is None:
                            raise ReshardError("a pending forwarded update failed to merge "
                                               "and there is no dead-letter output") from None
                        self.dlq = self.make_dlq()
                    self.dlq.send(fwd.record(), "merge_error", f"view {feed.view}: merge failed")
                    self.totals["deadlettered"] += 1
                    self.stats.dead_lettered += 1
                    continue
                stored["d"] = doc
                stored["v"] += 1
                stored["s"][fwd.source] = [fwd.sequence, fwd.time]
                docs[dkey] = stored
                self.stats.forwarded += 1
                if chg.enabled and chg.topics[feed.view_id] is not None:
                    if chg.coalesce:
                        changed[dkey] = (feed.view_id, key)
                    else:
                        self.new_changes[slot % self.m].append(
                            chg.entry(feed.view_id, key, stored["v"], chg.encode(doc)))
        for dkey, (vid, key) in changed.items():  # coalesced: one event per document
            stored = docs[dkey]
            slot = key_slot(dkey)
            self.new_changes[slot % self.m].append(
                chg.entry(vid, key, stored["v"], chg.encode(stored["d"])))
        for dkey, stored in docs.items():
            self.new_docs[key_slot(dkey) % self.m][dkey] = pack_record(stored,
                                                                      json_body(stored["d"]))

    # -- one new shard ----------------------------------------------------------------------------
    def _build(self, j: int, olds: list[_Old], path: Path) -> None:
        svc = self.cfg.service
        shard = Shard(path, map_size=svc.lmdb_map_size, max_map_size=svc.lmdb_max_map_size,
                      sync=False)
        keys0, bytes0 = self.stats.keys, self.stats.bytes
        try:
            w = _Writer(shard, self.stats)
            slots = range(j, SLOTS, self.m)
            generation = self.gens[j] if self.same else self.generation
            for table in (*_SLOT_TABLES, "dedup"):
                for s in slots:
                    src = s % self.n
                    n = 0
                    if table == "dedup":
                        shift = self.shift[src]
                        oldest = generation - self.cfg.dedup.bloom_generations + 1
                        for k, gen in olds[src].dedup_rows(slot_prefix(s)):
                            n += 1
                            gen += shift
                            if gen < oldest:
                                self.stats.dedup_dropped += 1
                                continue
                            w.put("dedup", k, gen)
                    elif table == "seq":
                        for k, v in olds[src].seq_rows(slot_prefix(s)):
                            n += 1
                            w.put("seq", k, olds[src].seq_row(v))
                    else:
                        for k, v in olds[src].rows(table, slot_prefix(s)):
                            n += 1
                            w.put(table, k, v, append=True)
                        if table == "parked":
                            self.stats.parked += n
                    self.copied[(src, table)] = self.copied.get((src, table), 0) + n
            for dkey, raw in self.new_docs[j].items():  # documents of forwarded updates
                w.put("views", dkey, raw)
            for seq, entry in enumerate(itertools.chain(self.moved_changes[j],
                                                        self.new_changes[j]), 1):
                w.put("changes", change_key(seq), entry, append=True)
            for (topic, part), off in self._offsets(j, olds).items():
                w.put("offsets", offset_key(topic, part), offset_value(off))
            extra = self.extra_meta
            if self.same and olds[j].present:  # a migration: shard j's own names (e.g. the
                # cluster mode's task.<t> cache rows are per shard), above every old epoch
                extra = {**{k: v for k, v in olds[j].meta.items() if k not in _KNOWN_META},
                         **({"writer_epoch": self.extra_meta["writer_epoch"]}
                            if "writer_epoch" in self.extra_meta else {})}
            meta = {**extra, "format": FORMAT_VERSION, "shard": j,
                    "workers": self.m, "slots": SLOTS, "views": self.views,
                    "bloom_generation": generation,
                    "change_seq": len(self.moved_changes[j]) + len(self.new_changes[j]),
                    "changes_published": 0, "link_out": {}}
            if self.fingerprint is not None:
                meta["fingerprint"] = self.fingerprint
            if j == 0 and (self.totals["since"] or any(self.totals.values())):
                meta[TOTALS_KEY] = self.totals
            if self.same and olds[j].present:  # the saved bloom filter stays usable
                for name in _CARRIED_META:
                    if name in olds[j].meta:
                        meta[name] = olds[j].meta[name]
                for k, v in olds[j].rows("dedup_log"):
                    w.put("dedup_log", k, v, append=True)
            for name, value in meta.items():
                w.put("meta", name.encode(), _pack(value))
            w.flush()
            shard.sync()
        finally:
            shard.close()
        if self.same and olds[j].present:
            snap = bloom_snapshot.path_of(olds[j].path)
            if snap.exists():
                shutil.copyfile(snap, bloom_snapshot.path_of(path))
        fd = os.open(path / "data.mdb", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path)
        log.info("reshard: shard-%d of %d written: %d keys, %.1f MB", j, self.m,
                 self.stats.keys - keys0, (self.stats.bytes - bytes0) / 1e6)

    def _check_all_copied(self, olds: list[_Old]) -> None:
        """Each row of a slot table was copied exactly once, as every old shard holds only
        slots it owns; a row in a slot it does not own would be lost: refuse."""
        for i, o in enumerate(olds):
            for table in (*_SLOT_TABLES, "dedup"):
                have, want = self.copied.get((i, table), 0), o.entries(table)
                if have != want:
                    raise ReshardError(f"shard-{i}: {want - have} of {want} {table} rows are "
                                       "in slots that shard does not own; not resharded")

    def _offsets(self, j: int, olds: list[_Old]) -> dict[tuple[str, int], int]:
        """Per partition, the minimum through-offset of the old shards that own slots of
        new shard j; a partition that one of them has not stored is left out."""
        result: dict[tuple[str, int], int] | None = None
        for i in sorted({s % self.n for s in range(j, SLOTS, self.m)}):
            offs = {parse_offset_key(k): parse_offset_value(v)
                    for k, v in olds[i].rows("offsets")}
            if result is None:
                result = offs
            else:
                result = {tp: min(off, offs[tp]) for tp, off in result.items() if tp in offs}
        return result or {}
