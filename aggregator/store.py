"""One worker's LMDB shard: view documents, dedup index, sequences, parked events, offsets.

Layout (named databases; `S` = 2-byte slot prefix, see routing.py):

=============  =====================================  ====================================
database       key                                    value
=============  =====================================  ====================================
views          S + view id (1 byte) + view key        msgpack {"v": version, "d": doc,
                                                      "s": {source: [seq, time]}}
dedup          S + identity hash (16)                 generation (8, big-endian)
dedup_gen      generation (8) + S + identity hash     b""  (prune index by generation)
seq            S + gate hash (16)                     msgpack [last, topic, partition]
parked         S + gate hash (16) + seq (8)           msgpack [parked_at, record]
offsets        topic + b"\\0" + partition (4)          through offset (8, signed)
links          source worker (2)                      last applied link seq (8)
outbox         target worker (2) + link seq (8)       msgpack message (view updates)
changes        change seq (8)                         msgpack [view id, key, version, data,
                                                      ms] (change events not yet delivered)
dedup_log      log seq (8)                            generation (8) + identity hashes
                                                      (16 each): the ids a batch added
meta           name                                   msgpack value
=============  =====================================  ====================================

Format notes (additions that keep FORMAT_VERSION 1: older builds ignore them, and a shard
written before them opens as it is):

- meta ``totals``: msgpack {name: int} with the names of `TOTALS`, plus
  ``since`` (unix ms when this shard started counting). The worker writes it in the
  transaction of every batch that counted something, so it is exactly what the committed
  batches did, through any crash. A shard without it starts from zero at its next batch
  (``since`` then says when): the earlier counts cannot be derived from the shard (the
  dedup index keeps only the dedup window, sequences only the last one).
- ``dedup_log`` and meta ``dedup_log_seq`` (last log seq used), ``dedup_log_pruned`` (entries
  up to it deleted) and ``shard_token`` (random, made at the first boot): the ids each batch
  adds to the dedup index, in the batch's transaction, kept until a saved bloom filter
  (``bloom.snap`` in the shard directory, bloom_snapshot.py) covers them. A shard without them
  (or without the file) rebuilds its filter from the dedup index at boot, as before.

The shard is opened inside the worker process (never across a fork). Every batch is one write
transaction; a MAP_FULL aborts the whole transaction (nothing partial is kept), grows the map up
to the configured maximum and lets the caller retry the batch. A full, read-only or failing data
disk makes the commit fail the same way (LMDB keeps nothing of the transaction):
`storage_errno` tells these errors apart from the others, so that the caller can wait and retry.

Who touches LMDB: only this module. The worker writes through `Batch`; the changelog's
restore and task drop, and the reshard's copy, write through `RawWrite` (puts and deletes of
encoded rows, by database name); the reshard reads an old shard through one `Snapshot`, and
the HTTP API and CLI read through `SharedReader` (read-only, next to the writer: query.py
states its rules). The layout table above is the single description of the format.

Fencing: a worker claims its shard at boot (`Shard.claim_writer` bumps meta ``writer_epoch``)
and every batch transaction first checks that the epoch is still its own; a worker that was
replaced (e.g. it was stopped past its heartbeat timeout and then resumed) gets `Fenced`
instead of a transaction, before it writes anything.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from pathlib import Path
from typing import Callable, Iterator

import lmdb
import msgpack

from .datadir import FILE_MODE

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DBS = ("views", "dedup", "dedup_gen", "seq", "parked", "offsets", "links", "outbox", "changes",
        "dedup_log", "meta")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_U16 = struct.Struct(">H")
_PART = struct.Struct(">i")

_pack = msgpack.Packer(use_bin_type=True).pack


def _unpack(b: bytes):
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


class ShardError(RuntimeError):
    """A shard cannot be used as it is (format, worker count, or a full map)."""


WRITER_EPOCH = b"writer_epoch"  # meta key: the epoch of the shard's current writer
TOTALS_KEY = "totals"  # meta key: the shard's exact per-batch totals (format note above)
# What a worker counts per batch, in the order of control.Slot's counters: records received,
# events applied (each once), dropped as duplicates / stale, sequence gaps skipped, records
# dead-lettered, view updates forwarded to another shard.
TOTALS = ("records", "applied", "duplicates", "stale", "gaps_skipped", "deadlettered",
          "forwarded")


class Fenced(RuntimeError):
    """Another process claimed this shard (a newer writer epoch): this one must stop writing.

    Not a ShardError: the shard is fine, only this writer is stale (see Shard.claim_writer).
    """

    def __init__(self, path: str | os.PathLike, mine: int, epoch: int):
        self.path, self.mine, self.epoch = path, mine, epoch
        super().__init__(f"{path}: writer epoch {mine} superseded by epoch {epoch}")


# Errors of the data disk that the operator can clear while the service waits: the write
# that failed is retried (see Worker.process). Each with the words the log and /readyz use.
STORAGE_ERRORS = {
    errno.ENOSPC: "data disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "data disk read-only",
    errno.EIO: "data disk I/O error",
    errno.EACCES: "no write permission",
}
LOCK_FILE_BYTES = 64 << 10  # lock.mdb, allocated before LMDB maps it (see Shard.__init__)


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a data-disk error (a key of STORAGE_ERRORS), or None for anything else.

    py-lmdb raises ``DiskError`` for ENOSPC and a plain ``lmdb.Error`` whose message ends in
    the strerror text for the other system errors (the code itself is not kept); MDB_PANIC
    follows a failed write of the meta page and is reported as an I/O error.
    """
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in STORAGE_ERRORS else None
    if isinstance(exc, lmdb.MapFullError):
        return None
    if isinstance(exc, lmdb.DiskError):
        return errno.ENOSPC
    if isinstance(exc, lmdb.PanicError):
        return errno.EIO
    if isinstance(exc, lmdb.Error):
        text = str(exc)
        for code in STORAGE_ERRORS:
            if text.endswith(os.strerror(code)):
                return code
    return None


def storage_message(code: int, path: str | os.PathLike) -> str:
    """``data disk full: /data/shard-0 (No space left on device)``."""
    what = STORAGE_ERRORS.get(code, "storage error")
    return f"{what}: {path} ({os.strerror(code)})"


def normalize_totals(raw) -> dict[str, int]:
    """A stored ``totals`` value (or None) with every name of TOTALS and ``since``."""
    raw = raw if isinstance(raw, dict) else {}
    out = {name: int(raw.get(name, 0)) for name in TOTALS}
    out["since"] = int(raw.get("since", 0))
    return out


def shard_path(data_dir: str | os.PathLike, index: int) -> Path:
    return Path(data_dir) / f"shard-{index}"


def offset_key(topic: str, partition: int) -> bytes:
    return topic.encode() + b"\0" + _PART.pack(partition)


def parse_offset_key(key: bytes) -> tuple[str, int]:
    return bytes(key[:-5]).decode(), _PART.unpack(key[-4:])[0]


# ---- key and value codecs of the layout table (for the modules that read or copy rows) ------
def key_slot(key: bytes) -> int:
    """The slot of a slot-prefixed key (views, dedup, seq, parked)."""
    return _U16.unpack(key[:2])[0]


def parse_view_key(key: bytes) -> tuple[int, str]:
    """(view id, view key) of a views key (see view_key)."""
    return key[2], bytes(key[3:]).decode()


def parked_key(gkey: bytes, seq: int) -> bytes:
    return gkey + _U64.pack(seq)


def generation_value(generation: int) -> bytes:
    """A dedup value (and the first 8 bytes of its dedup_gen key)."""
    return _U64.pack(generation)


def parse_generation(value: bytes) -> int:
    return _U64.unpack(value[:8])[0]


def offset_value(through: int) -> bytes:
    return _I64.pack(through)


def parse_offset_value(value: bytes) -> int:
    return _I64.unpack(value)[0]


def change_key(seq: int) -> bytes:
    return _U64.pack(seq)


def parse_link(key: bytes, value: bytes) -> tuple[int, int]:
    """(source worker, last applied link seq) of a links row."""
    return _U16.unpack(key)[0], _U64.unpack(value)[0]


def outbox_prefix(target: int) -> bytes:
    return _U16.pack(target)


def parse_outbox_key(key: bytes) -> tuple[int, int]:
    """(target worker, link seq) of an outbox key."""
    return _U16.unpack(key[:2])[0], _U64.unpack(key[2:])[0]


class Shard:
    """An LMDB environment owned by one worker."""

    def __init__(
        self,
        path: str | os.PathLike,
        map_size: int = 1 << 30,
        max_map_size: int = 64 << 30,
        sync: bool = True,
        readonly: bool = False,
    ):
        self.path = Path(path)
        self.map_size = map_size
        self.max_map_size = max_map_size
        self.readonly = readonly
        self.writer_epoch: int | None = None  # set by claim_writer; checked by every Batch
        # mode: the process umask decides (datadir.py; py-lmdb's default 0755 would make
        # data.mdb executable)
        self._options = dict(max_dbs=len(_DBS) + 2, sync=sync, metasync=sync, readahead=False,
                             readonly=readonly, lock=True, max_readers=256, mode=FILE_MODE)
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
            _allocate_lock_file(self.path / "lock.mdb")
        self.env = lmdb.open(str(self.path), map_size=map_size, **self._options)
        if readonly:
            with self.env.begin() as txn:
                names = {name for name, _ in txn.cursor()}
            self.db = {
                n: self.env.open_db(n.encode()) for n in _DBS if n.encode() in names
            }
        else:
            self.db = {n: self.env.open_db(n.encode()) for n in _DBS}

    # ---- metadata --------------------------------------------------------------------
    def get_meta(self, name: str, default=None):
        db = self.db.get("meta")
        if db is None:
            return default
        with self.env.begin(db=db) as txn:
            raw = txn.get(name.encode())
        return default if raw is None else _unpack(raw)

    def totals(self) -> dict[str, int]:
        """The shard's totals (meta ``totals``): every name of TOTALS (0 if never counted)
        and ``since`` (unix ms when counting started; 0 if it has not yet)."""
        return normalize_totals(self.get_meta(TOTALS_KEY))

    def put_meta(self, **values) -> None:
        with self.env.begin(write=True, db=self.db["meta"]) as txn:
            for name, value in values.items():
                txn.put(name.encode(), _pack(value))

    def claim_writer(self) -> int:
        """Become the shard's only writer: bump meta ``writer_epoch`` in a write transaction
        of its own and remember the new value (fencing).

        LMDB serializes write transactions across processes (its writer lock), so once this
        transaction committed, every later `Batch` of a previous writer sees the newer epoch
        first and raises `Fenced` without writing anything; a batch of that writer already
        running finishes before this claim (it holds the lock), and the new writer reads the
        shard after it.
        """
        with self.env.begin(write=True, db=self.db["meta"]) as txn:
            raw = txn.get(WRITER_EPOCH)
            epoch = (0 if raw is None else _unpack(raw)) + 1
            txn.put(WRITER_EPOCH, _pack(epoch))
        self.writer_epoch = epoch
        return epoch

    def check_layout(self, *, shard: int, workers: int, slots: int) -> None:
        """Stamp a new shard, or refuse one written for another layout."""
        fmt = self.get_meta("format")
        if fmt is None:
            self.put_meta(format=FORMAT_VERSION, shard=shard, workers=workers, slots=slots)
            return
        if fmt != FORMAT_VERSION:
            raise ShardError(f"{self.path}: data format {fmt}, this build reads {FORMAT_VERSION}")
        old = (self.get_meta("workers"), self.get_meta("slots"), self.get_meta("shard"))
        if old != (workers, slots, shard):
            raise ShardError(
                f"{self.path}: written by {old[0]} workers, configured for {workers}; "
                "changing the worker count of an existing data directory is refused "
                "(use the old worker count, or a new data_dir)"
            )

    # ---- reads outside the write path -------------------------------------------------
    def offsets(self) -> dict[tuple[str, int], int]:
        """Durable through-offsets per (topic, partition)."""
        db = self.db.get("offsets")
        if db is None:
            return {}
        with self.env.begin(db=db) as txn:
            return {parse_offset_key(k): _I64.unpack(v)[0] for k, v in txn.cursor()}

    def links(self) -> dict[int, int]:
        with self.env.begin(db=self.db["links"]) as txn:
            return {_U16.unpack(k)[0]: _U64.unpack(v)[0] for k, v in txn.cursor()}

    def outbox_after(self, target: int, after: int) -> Iterator[tuple[int, bytes]]:
        """(link seq, message) for `target` with seq > after, in order."""
        prefix = _U16.pack(target)
        with self.env.begin(db=self.db["outbox"]) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix + _U64.pack(after + 1)):
                return
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                yield _U64.unpack(k[2:])[0], bytes(v)

    def last_outbox_seq(self, target: int) -> int:
        prefix = _U16.pack(target)
        with self.env.begin(db=self.db["outbox"]) as txn:
            cur = txn.cursor()
            if cur.set_range(_U16.pack(target + 1)):
                if cur.prev() and cur.key().startswith(prefix):
                    return _U64.unpack(cur.key()[2:])[0]
            elif cur.last() and cur.key().startswith(prefix):
                return _U64.unpack(cur.key()[2:])[0]
        return 0

    def changes_after(self, after: int) -> Iterator[tuple[int, bytes]]:
        """(change seq, entry) of the change outbox with seq > after, in order."""
        with self.env.begin(db=self.db["changes"]) as txn:
            cur = txn.cursor()
            if not cur.set_range(_U64.pack(after + 1)):
                return
            for k, v in cur:
                yield _U64.unpack(k)[0], bytes(v)

    def last_change_seq(self) -> int:
        with self.env.begin(db=self.db["changes"]) as txn:
            cur = txn.cursor()
            return _U64.unpack(cur.key())[0] if cur.last() else 0

    def dedup_entries(self) -> Iterator[tuple[int, bytes]]:
        """(generation, identity hash) of the dedup index, oldest generation first."""
        with self.env.begin(db=self.db["dedup_gen"]) as txn:
            for k, _ in txn.cursor():
                yield _U64.unpack(k[:8])[0], bytes(k[10:26])

    def dedup_log_after(self, after: int) -> Iterator[tuple[int, int, bytes]]:
        """(log seq, generation, identity hashes) of the dedup log with seq > after."""
        db = self.db.get("dedup_log")
        if db is None:
            return
        with self.env.begin(db=db) as txn:
            cur = txn.cursor()
            if not cur.set_range(_U64.pack(after + 1)):
                return
            for k, v in cur:
                yield _U64.unpack(k)[0], _U64.unpack(v[:8])[0], bytes(v[8:])

    def parked_streams(self) -> dict[bytes, tuple[list | None, list[tuple[int, float]], int]]:
        """Every gate key with parked events: (its seq row or None, [(seq, parked_at)]
        ascending, topic index of its first parked record)."""
        out: dict[bytes, tuple[list | None, list[tuple[int, float]], int]] = {}
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.db["parked"]):
                g, seq = bytes(k[:-8]), _U64.unpack(k[-8:])[0]
                parked_at, record = _unpack(v)
                entry = out.get(g)
                if entry is None:
                    raw = txn.get(g, db=self.db["seq"])
                    entry = out[g] = (None if raw is None else _unpack(raw), [], record[0])
                entry[1].append((seq, parked_at))
        return out

    def documents(self, views: list[str]) -> Iterator[tuple[str, str, dict]]:
        """(view, key, stored record) for every document in the shard."""
        with self.env.begin(db=self.db["views"], buffers=False) as txn:
            for k, v in txn.cursor():
                vid = k[2]
                yield views[vid], k[3:].decode(), _unpack(v)

    def meta_items(self) -> dict:
        """Every meta entry, decoded ({} for a shard without the meta database)."""
        db = self.db.get("meta")
        if db is None:
            return {}
        with self.env.begin(db=db) as txn:
            return {bytes(k).decode(): _unpack(v) for k, v in txn.cursor()}

    def snapshot(self) -> "Snapshot":
        """One read transaction over the whole shard, until `Snapshot.close`."""
        return Snapshot(self.env.begin(buffers=False), self.db)

    def raw_write(self) -> "RawWrite":
        """A write transaction of encoded rows (no fencing check: see RawWrite)."""
        return RawWrite(self)

    def sync(self) -> None:
        """Flush the environment to disk (a shard opened with ``sync=False``)."""
        self.env.sync(True)

    def stat(self) -> dict:
        info = self.env.info()
        out = {"map_size": info["map_size"], "last_pgno": info["last_pgno"]}
        with self.env.begin() as txn:
            for name, db in self.db.items():
                out[name] = txn.stat(db)["entries"]
        return out

    def begin(self) -> "Batch":
        return Batch(self)

    def grow(self) -> bool:
        """Double the map size up to the maximum. False when already at the maximum."""
        size = self.env.info()["map_size"]
        if size >= self.max_map_size:
            return False
        new = min(size * 2, self.max_map_size)
        self.env.set_mapsize(new)  # only valid with no write transaction open
        self.map_size = new
        log.warning("%s: LMDB map grown from %d to %d bytes", self.path, size, new)
        return True

    def reopen(self) -> None:
        """Close and open the environment again, at its current map size: after MDB_PANIC
        (a failed write of the meta page), LMDB refuses every transaction until then."""
        self.env.close()
        self.env = lmdb.open(str(self.path), map_size=self.map_size, **self._options)
        self.db = {n: self.env.open_db(n.encode()) for n in _DBS}
        log.warning("%s: LMDB environment reopened", self.path)

    def close(self) -> None:
        self.env.close()


def _allocate_lock_file(path: Path) -> None:
    """Give a new LMDB lock file its disk blocks before LMDB maps it.

    LMDB extends lock.mdb with ftruncate (a sparse file) and writes its header and reader
    slots through a shared mapping: on a full disk the first touch of a page kills the
    process with SIGBUS instead of returning an error. Allocated here, a full disk is an
    OSError (ENOSPC) at open; LMDB then has more reader slots than it asks for. A lock file
    that exists is left alone (other processes may be using it).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
    except OSError as e:
        if e.errno in STORAGE_ERRORS:
            try:
                os.unlink(path)  # the next attempt allocates it again
            except OSError:
                pass
            raise
        log.debug("%s: not preallocated: %s", path, e)  # a filesystem without fallocate
    finally:
        os.close(fd)


class Batch:
    """One write transaction: everything a batch changes, committed at once or not at all."""

    __slots__ = ("shard", "txn", "_db", "_seen")

    def __init__(self, shard: Shard):
        self.shard = shard
        self.txn = shard.env.begin(write=True)
        self._db = shard.db
        self._seen: dict[int, list[bytes]] = {}  # generation -> hashes marked seen
        mine = shard.writer_epoch
        if mine is not None:  # fencing: one get per transaction (see Shard.claim_writer)
            raw = self.txn.get(WRITER_EPOCH, db=self._db["meta"])
            epoch = 0 if raw is None else _unpack(raw)
            if epoch != mine:
                self.txn.abort()
                raise Fenced(shard.path, mine, epoch)

    # documents
    def get_doc(self, dkey: bytes) -> dict | None:
        raw = self.txn.get(dkey, db=self._db["views"])
        return None if raw is None else _unpack(raw)

    def put_doc(self, dkey: bytes, record: dict) -> None:
        self.txn.put(dkey, _pack(record), db=self._db["views"])

    def delete_doc(self, dkey: bytes) -> None:
        self.txn.delete(dkey, db=self._db["views"])

    # dedup index
    def seen(self, skey: bytes) -> bool:
        return self.txn.get(skey, db=self._db["dedup"]) is not None

    def mark_seen(self, skey: bytes, generation: int) -> None:
        g = _U64.pack(generation)
        self.txn.put(skey, g, db=self._db["dedup"])
        self.txn.put(g + skey, b"", db=self._db["dedup_gen"])
        seen = self._seen.get(generation)
        if seen is None:
            seen = self._seen[generation] = []
        seen.append(skey[2:])

    @property
    def seen_count(self) -> int:
        """Ids this transaction added to the dedup index."""
        return sum(len(v) for v in self._seen.values())

    def log_seen(self, last_seq: int) -> int:
        """Write the ids this transaction marked seen to the dedup log (one entry per
        generation, seqs after `last_seq`); returns the last seq used."""
        for gen in sorted(self._seen):
            last_seq += 1
            self.txn.put(_U64.pack(last_seq), _U64.pack(gen) + b"".join(self._seen[gen]),
                         db=self._db["dedup_log"])
        return last_seq

    def prune_dedup_log(self, upto: int) -> int:
        """Delete dedup log entries with seq <= upto."""
        return self._prune_upto("dedup_log", upto)

    def _prune_upto(self, db: str, upto: int) -> int:
        """Delete the entries of a database keyed by big-endian u64 with key <= upto (they
        are in key order, so from the first); returns how many."""
        cur = self.txn.cursor(db=self._db[db])
        n = 0
        if not cur.first():
            return 0
        while _U64.unpack(cur.key())[0] <= upto:
            if not cur.delete():
                break
            n += 1
            if not cur.key():
                break
        return n

    def prune_generations(self, upto: int, limit: int = 100_000) -> int:
        """Delete index entries of generations <= upto; at most `limit` per call."""
        cur = self.txn.cursor(db=self._db["dedup_gen"])
        dedup = self._db["dedup"]
        n = 0
        if not cur.first():
            return 0
        while n < limit:
            k = cur.key()
            if not k or _U64.unpack(k[:8])[0] > upto:
                break
            skey = k[8:]
            raw = self.txn.get(skey, db=dedup)
            if raw is not None and _U64.unpack(raw)[0] <= upto:
                self.txn.delete(skey, db=dedup)
                self._unseen(skey)
            if not cur.delete():
                break
            n += 1
        return n

    def _unseen(self, skey: bytes) -> None:
        """A dedup id was pruned (a hook for changelog.CapturingBatch)."""

    # sequences and parked events
    def get_seq(self, gkey: bytes) -> list | None:
        raw = self.txn.get(gkey, db=self._db["seq"])
        return None if raw is None else _unpack(raw)

    def put_seq(self, gkey: bytes, last: int, topic: str, partition: int) -> None:
        self.txn.put(gkey, _pack([last, topic, partition]), db=self._db["seq"])

    def put_seqs(self, rows: list[tuple[bytes, int, str, int]]) -> None:
        """`put_seq` of each ``(gkey, last, topic, partition)``: one commit's dirty keys."""
        put_seq = self.put_seq
        for gkey, last, topic, partition in rows:
            put_seq(gkey, last, topic, partition)

    def park(self, gkey: bytes, seq: int, parked_at: float, record: list) -> None:
        self.txn.put(gkey + _U64.pack(seq), _pack([parked_at, record]), db=self._db["parked"])

    def unpark(self, gkey: bytes, seq: int) -> list | None:
        """Remove and return the parked record (or None if it is not there)."""
        k = gkey + _U64.pack(seq)
        raw = self.txn.pop(k, db=self._db["parked"])
        return None if raw is None else _unpack(raw)[1]

    def has_parked(self) -> bool:
        """Whether any parked event is stored (this transaction's own writes included)."""
        return self.txn.stat(self._db["parked"])["entries"] > 0

    def parked_of(self, gkey: bytes) -> list[tuple[int, float]]:
        cur = self.txn.cursor(db=self._db["parked"])
        out = []
        if cur.set_range(gkey):
            for k, v in cur:
                if not k.startswith(gkey):
                    break
                out.append((_U64.unpack(k[len(gkey):])[0], _unpack(v)[0]))
        return out

    # offsets and links
    def put_offset(self, topic: str, partition: int, through: int) -> None:
        self.txn.put(offset_key(topic, partition), _I64.pack(through), db=self._db["offsets"])

    def put_link(self, source_worker: int, seq: int) -> None:
        self.txn.put(_U16.pack(source_worker), _U64.pack(seq), db=self._db["links"])

    def put_outbox(self, target: int, seq: int, message: bytes) -> None:
        self.txn.put(_U16.pack(target) + _U64.pack(seq), message, db=self._db["outbox"])

    def prune_outbox(self, target: int, upto: int) -> int:
        prefix = _U16.pack(target)
        cur = self.txn.cursor(db=self._db["outbox"])
        n = 0
        if not cur.set_range(prefix):
            return 0
        while True:
            k = cur.key()
            if not k.startswith(prefix) or _U64.unpack(k[2:])[0] > upto:
                break
            if not cur.delete():
                break
            n += 1
        return n

    def put_change(self, seq: int, entry: bytes) -> None:
        self.txn.put(_U64.pack(seq), entry, db=self._db["changes"])

    def prune_changes(self, upto: int) -> int:
        """Delete delivered change events (seq <= upto)."""
        return self._prune_upto("changes", upto)

    def put_meta(self, name: str, value) -> None:
        self.txn.put(name.encode(), _pack(value), db=self._db["meta"])

    def put_raw(self, table: str, key: bytes, value: bytes) -> None:
        """Put an encoded row (changelog.CapturingBatch logs the bytes it puts)."""
        self.txn.put(key, value, db=self._db[table])

    def put_totals(self, totals: dict[str, int]) -> None:
        """Store the shard's totals (see the format notes) in this transaction."""
        self.put_meta(TOTALS_KEY, totals)

    def commit(self) -> None:
        """Commit; raises lmdb.MapFullError (the caller aborts, grows and retries), or a
        data-disk error (see storage_errno); either way nothing of the transaction is kept."""
        self.txn.commit()

    def abort(self) -> None:
        try:
            self.txn.abort()
        except lmdb.Error:
            pass


class RawWrite:
    """A write transaction of encoded rows, by database name, for the changelog's restore and
    task drop and the reshard's copy. Unlike `Batch` it does not check the writer epoch: its
    callers run in the shard's writer (the restore, before the worker's batches) or on a shard
    nobody else opened (the reshard). As a context manager it commits at the end of the block
    and aborts on an exception."""

    __slots__ = ("txn", "_db")

    def __init__(self, shard: Shard):
        self.txn = shard.env.begin(write=True)
        self._db = shard.db

    def get(self, table: str, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self._db[table])

    def put(self, table: str, key: bytes, value: bytes, append: bool = False) -> bool:
        """False when `append` and the key is not after the table's last key."""
        return self.txn.put(key, value, db=self._db[table], append=append)

    def delete(self, table: str, key: bytes) -> bool:
        return self.txn.delete(key, db=self._db[table])

    def set_seen(self, skey: bytes, generation: bytes | None) -> None:
        """Put (or, with None, delete) a dedup id with its generation (8 bytes), keeping the
        ``dedup_gen`` index in step."""
        old = self.txn.get(skey, db=self._db["dedup"])
        if old is not None:
            self.txn.delete(bytes(old) + skey, db=self._db["dedup_gen"])
        if generation is None:
            self.txn.delete(skey, db=self._db["dedup"])
        else:
            self.txn.put(skey, generation, db=self._db["dedup"])
            self.txn.put(generation + skey, b"", db=self._db["dedup_gen"])

    def delete_prefix(self, table: str, prefix: bytes) -> int:
        """Delete the rows whose key starts with `prefix` (dedup ids with their ``dedup_gen``
        entries); returns the number of rows deleted from `table`."""
        cur = self.txn.cursor(db=self._db[table])
        n = 0
        if not cur.set_range(prefix):
            return 0
        while True:
            k = cur.key()
            if not k or not k.startswith(prefix):
                break
            if table == "dedup":
                self.txn.delete(bytes(cur.value()) + bytes(k), db=self._db["dedup_gen"])
            if not cur.delete():
                break
            n += 1
        return n

    def commit(self) -> None:
        self.txn.commit()

    def abort(self) -> None:
        self.txn.abort()

    def __enter__(self) -> "RawWrite":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Snapshot:
    """One read transaction (a consistent snapshot) over named databases; a database that
    does not exist (yet) reads as empty. Closed by its owner: it pins its pages."""

    __slots__ = ("txn", "_db")

    def __init__(self, txn, dbs: dict):
        self.txn, self._db = txn, dbs

    def get(self, table: str, key: bytes) -> bytes | None:
        db = self._db.get(table)
        return None if db is None else self.txn.get(key, db=db)

    def rows(self, table: str, prefix: bytes = b"", start: bytes | None = None):
        """(key, value) of a table whose key starts with `prefix` (and is >= `start`), in
        key order."""
        db = self._db.get(table)
        if db is None:
            return
        cur = self.txn.cursor(db=db)
        if not cur.set_range(prefix if start is None else start):
            return
        for k, v in cur:
            if not k.startswith(prefix):
                break
            yield k, v

    def meta(self) -> dict:
        """Every meta entry, decoded."""
        return {bytes(k).decode(): _unpack(v) for k, v in self.rows("meta")}

    def entries(self, table: str) -> int:
        db = self._db.get(table)
        return 0 if db is None else self.txn.stat(db)["entries"]

    def entries_of(self) -> dict[str, int]:
        """Entries per database of this snapshot that exists."""
        return {name: self.txn.stat(db)["entries"] for name, db in self._db.items()
                if db is not None}

    def names(self) -> list[str]:
        """The named databases of the shard (the main database's keys)."""
        return [bytes(k).decode() for k, _ in self.txn.cursor()]

    def view_keys(self, vid: int, after: bytes | None, limit: int,
                  serves: Callable[[int], bool] | None = None) -> Iterator[bytes]:
        """Keys ``slot(2) + vid + key`` of live documents in LMDB order, strictly after
        ``after``, at most ``limit``; ``serves(slot)`` filters slots.

        Rows of other views interleave with this view's (the slot comes first), so the scan
        jumps: on a row of another view it seeks straight to this view's rows in that slot,
        or in the next slot. The cost is one seek per non-empty slot plus one step per row
        returned.
        """
        db = self._db.get("views")
        if db is None:
            return
        cur = self.txn.cursor(db=db)
        v = bytes((vid,))
        if after is None:
            found = cur.set_range(b"\0\0" + v)
        else:
            found = cur.set_range(after)
            if found and cur.key() == after:
                found = cur.next()
        n = 0
        while found and n < limit:
            k = cur.key()
            if len(k) < 3:
                found = cur.next()
                continue
            slot, kv = k[:2], k[2]
            if kv == vid:
                raw = cur.value()
                if (serves is None or serves(int.from_bytes(slot, "big"))) and \
                        _unpack(raw).get("d") is not None:
                    n += 1
                    yield bytes(k)
                found = cur.next()
            elif kv < vid:
                found = cur.set_range(slot + v)  # this view's rows in the same slot
            else:
                nxt = int.from_bytes(slot, "big") + 1  # past this slot: same view, next slot
                if nxt > 0xFFFF:
                    return
                found = cur.set_range(nxt.to_bytes(2, "big") + v)

    def close(self) -> None:
        self.txn.abort()  # read-only: releases the snapshot


_READER_MAX_DBS = 16  # >= the named databases above


class SharedReader:
    """One shard opened read-only next to its writer, on first use (the rules are in
    query.py's docstring): database handles are opened in a transaction of their own before
    the read transaction, and a map grown by the writer is adopted and the call retried."""

    def __init__(self, path: Path, logger: logging.Logger = log):
        self.path = path
        self.log = logger  # the reading module's (query.py): its debug lines are its own
        self._env: lmdb.Environment | None = None
        self._dbs: dict[str, object] = {}

    def _open(self) -> lmdb.Environment | None:
        if self._env is None:
            if not (self.path / "data.mdb").exists():
                return None
            env = lmdb.open(str(self.path), readonly=True, lock=True, map_size=0,
                            max_dbs=_READER_MAX_DBS, readahead=False, subdir=True)
            try:
                env.reader_check()  # free reader slots of dead processes
            except lmdb.Error:
                pass
            self._env = env
            self.log.debug("opened %s read-only", self.path)
        return self._env

    def _retry_resized(self, env: lmdb.Environment, op, attempts: int = 20):
        """Run `op`; when the writer grew the map meanwhile, adopt its size and retry (the
        writer may grow it again between our retries, hence a loop)."""
        for _ in range(attempts - 1):
            try:
                return op()
            except lmdb.MapResizedError:
                env.set_mapsize(0)  # adopt the size the writer grew the map to
                self.log.debug("%s: map grown by the writer, now %d bytes", self.path,
                               env.info()["map_size"])
        return op()

    def _db(self, env: lmdb.Environment, name: str):
        """The handle of a named database, or None if the worker has not created it yet.

        Opened in a transaction of its own (py-lmdb commits it), before the read
        transaction begins: a handle opened inside a read transaction dies with it.
        """
        db = self._dbs.get(name)
        if db is None:
            try:
                db = self._retry_resized(env, lambda: env.open_db(name.encode(), create=False))
            except lmdb.NotFoundError:
                return None
            self._dbs[name] = db
        return db

    def snapshot(self, names: tuple[str, ...]) -> Snapshot | None:
        """A read transaction over the databases `names` (one that does not exist reads as
        empty); None if the shard does not exist yet. The caller closes it."""
        env = self._open()
        if env is None:
            return None
        dbs = {name: self._db(env, name) for name in names}
        return Snapshot(self._retry_resized(env, lambda: env.begin(buffers=False)), dbs)

    def info(self) -> tuple[dict, int] | None:
        """(LMDB environment info, page size), or None if not opened."""
        if self._env is None:
            return None
        return self._env.info(), self._env.stat()["psize"]

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            self._dbs.clear()


def view_key(slot_prefix: bytes, view_id: int, key: str) -> bytes:
    return slot_prefix + bytes((view_id,)) + key.encode()


def read_views(data_dir: str | os.PathLike, views: list[str]) -> dict[str, dict[str, dict]]:
    """All view documents of every shard in a data directory: {view: {key: document}}.

    Tombstones (documents deleted by a `delete` op, stored with ``"d": None``) are left
    out. View ids are mapped with the order stored in the shard (``meta["views"]``, see
    plan.assign_view_ids), which may differ from the order of `views`.
    """
    out: dict[str, dict[str, dict]] = {v: {} for v in views}
    for path in sorted(Path(data_dir).glob("shard-*")):
        shard = Shard(path, readonly=True)
        try:
            if "views" not in shard.db:
                continue
            names = shard.get_meta("views") or list(views)
            for view, key, rec in shard.documents(names):
                if rec["d"] is not None and view in out:
                    out[view][key] = rec["d"]
        finally:
            shard.close()
    return out
