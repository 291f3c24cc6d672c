"""One worker's LMDB shard: view documents, dedup index, sequences, parked events, offsets.

Layout (named databases; `S` = 2-byte slot prefix, see routing.py):

=============  =====================================  ====================================
database       key                                    value
=============  =====================================  ====================================
views          S + view id (1 byte) + view key        msgpack {"v": version, "j": JSON of
                                                      the doc, "s": {source: [seq, time]}}
                                                      or {"v", "d": doc, "s"} (see below),
                                                      as of the last checkpoint (doc_log)
doc_log        log seq (8)                            one commit's documents: per document
                                                      key length (2) + record length (4,
                                                      0xFFFFFFFF: deleted) + key + record
                                                      (as in views; format 5)
dedup.<i>      b"h" (hot) or b"s" (sealed); DUPSORT   S + identity hash (16) per duplicate
               + DUPFIXED: one database per dedup     (sorted, fixed size: LMDB packs them
               generation g, i = g % DEDUP_POOL       16+2 bytes each, no node headers)
seq            S + gate hash (16)                     SEQ_ROW: last (8, signed) + topic
                                                      index (2, meta ``seq_topics``) +
                                                      partition (4, signed), as of the
                                                      last checkpoint (see seq_log)
seq_log        log seq (8)                            one commit's dirty seq rows: entries
                                                      of S + gate hash (16) + SEQ_ROW
                                                      (32 bytes each; format 4)
parked         S + gate hash (16) + seq (8)           msgpack [parked_at, record]
offsets        topic + b"\\0" + partition (4)          through offset (8, signed)
links          source worker (2)                      last applied link seq (8)
outbox         target worker (2) + link seq (8)       forwarded view updates (forwards.py:
                                                      format 2; format 1 msgpack still read)
changes        first change seq (8) + last (8)        one commit's change events: a blob
                                                      (changes.py, `pack_blob`), not yet
                                                      all delivered; format 6: the data
                                                      its doc_log record holds left out
               (format 1 rows: change seq (8))        msgpack [view id, key, version, data,
                                                      ms, json?] (one change event)
dedup_log      log seq (8)                            generation (8) + identity hashes
                                                      (16 each): the ids a batch added
dedup_live     entry seq (8)                          generation (8) + S + identity hash
                                                      (18 each): a batch's ids of a
                                                      generation not sealed yet (format 4)
meta           name                                   msgpack value
=============  =====================================  ====================================

Format 6 (this build) is format 5 with logged change blobs: a commit's change event
whose data is the JSON body of its document's record in the commit's ``doc_log`` record
(when it is the document's last version in the commit) is stored without it, as a
reference to that record (changes.py, `stored_blob`: flag BLOB_LOGGED, the record's key,
per such event its document's slot): that data is written to disk once instead of twice,
and the blob's LZ4 reads less. The readers of the outbox put it back
(`change_blobs.resolve_stored`): `Shard.changes_after` (the publisher reading the outbox after a
restart or a failure) and `Snapshot.rows` (the reshard, the tools). A checkpoint empties
the log, so it first rewrites the outbox's logged blobs with their data
(`write_doc_checkpoint`): every blob of the outbox can be made whole at every commit. A
format-5 shard is read as it is and stamped 6 when a worker opens it, so that an older
build then refuses it instead of misreading a logged blob.

Format 5 is format 4 with the document log and compressed change blobs.

The document log: a worker's commit appends its
documents (the packed records of ``views``, or deletes) as one ``doc_log`` record
(sequential key: contiguous overflow pages, about the documents' size on disk) instead of
putting them at random keys of ``views`` (one 4 KiB page per update once the table outgrows
a transaction). Once the bytes logged since the last checkpoint reach
``service.doc_checkpoint_bytes``, a batch's transaction also checkpoints: the latest record
of every document logged since goes into ``views`` (one sorted putmulti, then the deletes),
the log is emptied (mdb_drop) and meta ``doc_log_epoch`` is bumped. A document's record is
the log's if it has one (the later record wins; a deleted entry hides the ``views`` row),
else the one of ``views``: every reader overlays the log (the worker from memory,
`Shard.doc_pending`, loaded from the log at open; `Snapshot` with the log's database:
`Shard.documents`, `Shard.stat`, `read_views`, the reshard; query.py keeps its own index of
the log per shard, read incrementally, dropped when ``doc_log_epoch`` changes). Cluster mode
writes ``views`` directly (`Batch.write_doc`, changelog.py) and folds a log left by a
non-cluster run at boot (`Shard.fold_doc_log`); the reshard and the restore write ``views``
as they did. A format-4 shard (no ``doc_log``) is read as it is and stamped 5 when a worker
opens it, so that an older build then refuses it instead of missing the logged documents.

The change outbox blobs may be compressed: a blob
whose body (everything after its 16-byte head) is at least 256 bytes and gets smaller is
stored with flag 2 (BLOB_LZ4) in its head, the body's length (u32) and the body as one LZ4
block (changes.py, `compress_blob`; ``changes.compress_blobs`` turns it off). Every reader
goes through `changes.outbox_blobs` / `blob_records`, which take both forms, so a format-4
shard's blobs are read as they are; an older build refuses a format-5 directory instead of
misreading a compressed blob.

Format 4 is format 3 with two appended tables in place of random-key writes
per event: the sequence log and the unsealed dedup ids.

The sequence log: a worker's commit appends its dirty
``seq`` rows as one ``seq_log`` record (sequential key: appended pages, ~32 bytes per row)
instead of putting them at random keys of ``seq``; once the rows logged since the last
checkpoint reach ``gate.seq_checkpoint_rows``, a batch's transaction also checkpoints: the
latest row of every stream logged since goes into ``seq`` in one putmulti and the log
is emptied (mdb_drop), so ``seq`` pages are rewritten once per checkpoint, not once per
commit. A stream's row is the one of the log if it has one (the later record, and the later
entry in a record, wins), else the one of ``seq``: every reader overlays the log (the worker
from memory, `Shard.seq_pending`, loaded from the log at open; `Shard.parked_streams`,
`Snapshot.seq_rows` for the reshard and the tools). Cluster mode writes ``seq`` directly
(`Batch.write_seqs`, changelog.py: its restore and task drop write that table as it is) and
folds a log left by a non-cluster run at boot (`Shard.fold_seq_log`). Formats 2 and 3 (no
``seq_log``, every row in ``seq``) are read as they are and stamped 4 (now 5) when a worker
opens them (`Shard.check_layout`), so that an older build then refuses the directory ("data format
4") instead of missing the logged rows.

The unsealed dedup ids are in ``dedup_live`` instead of
under the generations' HOT key: a batch appends its new ids (S + hash, in its own
transaction, one entry per generation), the worker keeps each unsealed generation's ids in
memory (idtable.py: a compact open-addressing table, 22-34 bytes per id, read from
``dedup_live`` at boot) and confirms a "maybe" of the bloom filter there, and
`Batch.seal_dedup` appends the generation's ids to SEALED in slot order from that table (in
slices, ``sealed_below`` as in format 2); once a generation is sealed whole or dropped, its
``dedup_live`` entries are deleted from the front and its table freed. No random-key write
per new id is left. A format-3 shard is read as it is and stamped 4 when a worker opens it;
the worker's boot moves whatever is under HOT (format 3's unsealed ids, a reshard's or
restore's output) into ``dedup_live`` in one transaction (`Shard.open_live_dedup`). HOT stays
readable and writable: the cluster mode's task workers (their changelog captures the
writes), `RawWrite.set_seen` (reshard, restore) and tools write there.

Format 3 is format 2 with the ``"j"`` form of ``views`` records (below) and ``outbox`` rows
of forwards.py's binary format 2 (format-1 msgpack rows are still read); a format-2 shard's
records are all ``"d"`` and its outbox rows format 1, both read by format 3 and 4. Format 1
is migrated by reshard.py (`aggregator migrate`). What format 2 brought:

- the dedup index: meta ``dedup_index`` = [[generation, sealed_below], ...] lists the live
  generations, oldest first. A generation's ids go to its database under key b"h" as they
  come (random inserts: ~27 bytes per id on disk). Once the generation is no longer the
  bloom filter's current one, `Batch.seal_dedup` moves them in slices, slot by slot in
  order, to key b"s" with appends (full pages: ~18 bytes per id); ``sealed_below`` is the
  first slot not moved yet, so an id of slot s is under b"s" if s < sealed_below, else
  under b"h". A generation leaves the window whole: `Batch.drop_generations` empties its
  database with mdb_drop, which frees the pages without visiting the entries (no dirty
  page, no per-id work). Format 1 had ``dedup`` (S + hash -> generation) and ``dedup_gen``
  (generation + S + hash), ~108 bytes per id, pruned id by id.
- ``seq`` rows are fixed-size (SEQ_ROW); meta ``seq_topics`` is the shard's topic table
  (append-only; index NO_TOPIC = no topic). Format 1 stored msgpack [last, topic name,
  partition].

Format notes (additions within a format version: older builds ignore them, and a shard
written before them opens as it is):

- ``views`` records (format 3): a JSON-exact document (one that orjson's bytes give back
  exactly) is stored as those bytes under ``"j"``, the same bytes as its JSON change event
  body; any other document, and a tombstone (``"d": None``), stays a msgpack value under
  ``"d"``, as every record of format 2 (doc_codec.py decides and reads both).
- meta ``totals``: msgpack {name: int} with the names of `TOTALS`, plus
  ``since`` (unix ms when this shard started counting). The worker writes it in the
  transaction of every batch that counted something, so it is exactly what the committed
  batches did, through any crash. A shard without it starts from zero at its next batch
  (``since`` then says when): the earlier counts cannot be derived from the shard (the
  dedup index keeps only the dedup window, sequences only the last one).
- ``changes`` rows keyed by a change seq range (16 bytes) hold all the change events of one
  commit in one value; rows keyed by one change seq (8 bytes, written before them and by the
  reshard) stay readable, so a shard upgraded with undelivered events publishes them all.
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

import bisect
import contextlib
import errno
import itertools
import logging
import os
import struct
from pathlib import Path
from typing import Callable, Iterator

import lmdb
import msgpack

from .change_blobs import (
    BLOB_LOGGED,
    BLOB_LZ4,
    compress_blob,
    logged_key,
    open_blob,
    resolve_stored,
)
from .datadir import FILE_MODE
from .doc_codec import json_body, pack_record, record_live, unpack_record
from .idtable import IdTable
from .residency import MapResidency
from .runtime import pid_alive

log = logging.getLogger(__name__)

FORMAT_VERSION = 6
FORMATS_IN_PLACE = (2, 3, 4, 5)  # read as they are; stamped FORMAT_VERSION when a worker opens them
_DBS = ("views", "seq", "seq_log", "parked", "offsets", "links", "outbox", "changes",
        "dedup_log", "dedup_live", "doc_log", "meta")
FORMAT1_DBS = ("dedup", "dedup_gen")  # format 1's dedup index (read by the migration only)
DEDUP_POOL = 66  # dedup.<g % DEDUP_POOL>: more than dedup.bloom_generations (<= 64) + 1
HOT, SEALED = b"h", b"s"  # the two keys of a generation's database (format 2 above)
LIVE_REC = 18  # a dedup_live id: S + identity hash
LIVE_CHUNK = 1 << 16  # ids per dedup_live entry written by the boot's move of HOT ids
SLOTS_ALL = 1 << 16  # sealed_below of a fully sealed generation (above every slot)
SEQ_ROW = struct.Struct(">qHi")  # last applied sequence, topic index, partition
SEQ_KEY_BYTES = 18  # a seq key: slot prefix (2) + gate hash (16)
SEQ_LOG_ENTRY = SEQ_KEY_BYTES + SEQ_ROW.size  # a seq_log entry: seq key + SEQ_ROW (32 bytes)
NO_TOPIC = 0xFFFF
_U64 = struct.Struct(">Q")
_DOC_HEAD = struct.Struct(">HI")  # a doc_log entry: key length, record length (then both)
DOC_GONE = 0xFFFFFFFF  # the record length of a deleted document's entry (no record bytes)
DOC_LOG_EPOCH = b"doc_log_epoch"  # meta: bumped by every doc checkpoint (query.py's cache)
_I64 = struct.Struct(">q")
_U16 = struct.Struct(">H")
_PART = struct.Struct(">i")

_pack = msgpack.Packer(use_bin_type=True).pack
_ABSENT = object()  # not in a map of logged documents (None there: deleted)


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


def parse_generation(value: bytes) -> int:
    """The generation of a format-1 ``dedup`` value (read by the migration)."""
    return _U64.unpack(value[:8])[0]


def parse_seq_value(value: bytes, topics: list[str]) -> list:
    """[last, topic name, partition] of a format-2 ``seq`` row (`topics`: the shard's
    ``seq_topics``)."""
    last, ti, part = SEQ_ROW.unpack(value)
    return [last, "" if ti == NO_TOPIC or ti >= len(topics) else topics[ti], part]


def seq_log_rows(txn, db) -> tuple[dict[bytes, bytes], int, int]:
    """The ``seq_log`` of a shard read in `txn` (`db` its handle, or None: no log): ({seq
    key: latest SEQ_ROW logged}, last log key, rows logged). Records in key order, entries
    in a record in order: the later row of a key wins."""
    rows: dict[bytes, bytes] = {}
    last = n = 0
    if db is None:
        return rows, last, n
    size, k = SEQ_LOG_ENTRY, SEQ_KEY_BYTES
    for key, value in txn.cursor(db=db):
        value = bytes(value)
        for i in range(0, len(value), size):
            rows[value[i:i + k]] = value[i + k:i + size]
        n += len(value) // size
        last = _U64.unpack(key)[0]
    return rows, last, n


def write_seq_checkpoint(txn, seq_db, log_db, rows: dict[bytes, bytes]) -> None:
    """A checkpoint of the sequence log in `txn`: `rows` (the latest row of every stream
    logged since the last checkpoint) into ``seq`` in one putmulti, and the log
    emptied (mdb_drop of its pages: they go to the free list, no entry is visited)."""
    if rows:  # in the map's order: sorting the keys first cost more CPU than it saved in
        # LMDB (30k rows into a 200k-row table: sort 12-36 ms + putmulti 17 ms, unsorted 23 ms)
        txn.cursor(db=seq_db).putmulti(rows.items())
    txn.drop(log_db, delete=False)


def pack_doc_log(docs: dict[bytes, bytes | None]) -> bytes:
    """One ``doc_log`` record: per document, key length (2) + record length (4) + key +
    record; a deleted document has the length DOC_GONE and no record bytes."""
    head, parts = _DOC_HEAD.pack, []
    for dkey, raw in docs.items():
        if raw is None:
            parts += (head(len(dkey), DOC_GONE), dkey)
        else:
            parts += (head(len(dkey), len(raw)), dkey, raw)
    return b"".join(parts)


def doc_log_entries(value) -> Iterator[tuple[bytes, int, int]]:
    """(document key, offset of its record, record length or -1: deleted) of the entries of
    one ``doc_log`` record (bytes or a buffer), in order."""
    unpack, hs, n, i = _DOC_HEAD.unpack_from, _DOC_HEAD.size, len(value), 0
    while i < n:
        kl, rl = unpack(value, i)
        i += hs
        dkey = bytes(value[i:i + kl])
        i += kl
        if rl == DOC_GONE:
            yield dkey, i, -1
        else:
            yield dkey, i, rl
            i += rl


def doc_log_docs(value) -> dict[bytes, bytes | None]:
    """The documents of one ``doc_log`` record: key -> record (None: deleted)."""
    return {dkey: None if length < 0 else bytes(value[off:off + length])
            for dkey, off, length in doc_log_entries(value)}


def doc_log_rows(txn, db) -> tuple[dict[bytes, bytes | None], int, int]:
    """The ``doc_log`` of a shard read in `txn` (`db` its handle, or None: no log): ({document
    key: latest record logged, None if deleted}, last log key, bytes logged). Records in key
    order, entries in a record in order: the later entry of a key wins."""
    docs: dict[bytes, bytes | None] = {}
    last = n = 0
    if db is None:
        return docs, last, n
    for key, value in txn.cursor(db=db):
        value = bytes(value)
        for dkey, off, length in doc_log_entries(value):
            docs[dkey] = None if length < 0 else value[off:off + length]
        n += len(value)
        last = _U64.unpack(key)[0]
    return docs, last, n


def write_doc_checkpoint(txn, views_db, log_db, meta_db, docs: dict[bytes, bytes | None],
                         changes_db=None) -> None:
    """A checkpoint of the document log in `txn`: `docs` (the latest record of every document
    logged since the last checkpoint, None: deleted) into ``views`` in one sorted putmulti
    and the deletes, the logged change blobs of the outbox (`changes_db`) rewritten with
    their data (`resolve_changes`: the log they refer to goes), the log emptied (mdb_drop:
    its pages go to the free list) and meta DOC_LOG_EPOCH bumped (readers that cached the
    log see that it was dropped)."""
    if changes_db is not None:
        resolve_changes(txn, changes_db, log_db)
    if docs:
        live = sorted((k, v) for k, v in docs.items() if v is not None)
        cur = txn.cursor(db=views_db)
        if live:
            cur.putmulti(live)
        for k in sorted(k for k, v in docs.items() if v is None):
            if cur.set_key(k):
                cur.delete()
    txn.drop(log_db, delete=False)
    raw = txn.get(DOC_LOG_EPOCH, db=meta_db)
    txn.put(DOC_LOG_EPOCH, _pack((0 if raw is None else _unpack(raw)) + 1), db=meta_db)


def resolved_change(txn, log_db, key: bytes, value) -> bytes:
    """A change outbox row's value with the data of a logged blob (change_blobs.stored_blob)
    put back from the ``doc_log`` record it refers to (change_blobs.resolve_stored;
    uncompressed), any other value as it is (bytes). ShardError when that record is
    missing or does not hold the data."""
    value = bytes(value)
    if len(key) != 16 or len(value) < 2 or not value[1] & BLOB_LOGGED:
        return value
    value = open_blob(value)  # LZ4 (if any) undone once, for both calls below
    lk = logged_key(value)
    record = txn.get(_U64.pack(lk), db=log_db) if log_db is not None else None
    if record is None:
        raise ShardError(f"change outbox blob {parse_change_key(key)[:2]}: its document log "
                         f"record {lk} is missing")
    try:
        return resolve_stored(value, doc_log_docs(record))
    except ValueError as e:
        raise ShardError(f"change outbox blob {parse_change_key(key)[:2]}: {e}") from e


def resolve_changes(txn, changes_db, log_db) -> int:
    """Rewrite every logged blob of the change outbox whole (`resolved_change`; compressed
    again if it was: changes.compress_blob), before the document log it refers to is
    emptied; returns how many. Most commits' blobs were delivered and pruned by then: this
    reads a few rows."""
    todo = []
    for k, v in txn.cursor(db=changes_db):
        if len(k) == 16 and len(v) > 1 and v[1] & BLOB_LOGGED:
            full = resolved_change(txn, log_db, bytes(k), v)
            todo.append((bytes(k), compress_blob(full) if v[1] & BLOB_LZ4 else full))
    for k, v in todo:
        txn.put(k, v, db=changes_db)
    return len(todo)


def parse_seq_value_v1(value: bytes) -> list:
    """[last, topic name, partition] of a format-1 ``seq`` row (msgpack)."""
    return list(_unpack(value))


def offset_value(through: int) -> bytes:
    return _I64.pack(through)


def parse_offset_value(value: bytes) -> int:
    return _I64.unpack(value)[0]


def change_range_key(first: int, last: int) -> bytes:
    """Key of a commit's blob of change events (seqs first..last)."""
    return _U64.pack(first) + _U64.pack(last)


def parse_change_key(key: bytes) -> tuple[int, int, bool]:
    """(first seq, last seq, blob?) of a change outbox key: a blob's range (16 bytes) or
    one change event of format 1 (8 bytes)."""
    if len(key) == 16:
        return _U64.unpack_from(key)[0], _U64.unpack_from(key, 8)[0], True
    seq = _U64.unpack(key)[0]
    return seq, seq, False


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
        writemap: bool = False,
        resident_bytes: int = 0,
    ):
        self.path = Path(path)
        self.map_size = map_size
        self.max_map_size = max_map_size
        self.readonly = readonly
        self.writemap = writemap and not readonly  # a writer's flag (readers never pass it)
        self.writer_epoch: int | None = None  # set by claim_writer; checked by every Batch
        # mode: the process umask decides (datadir.py; py-lmdb's default 0755 would make
        # data.mdb executable)
        self._options = dict(max_dbs=len(_DBS) + len(FORMAT1_DBS) + DEDUP_POOL + 2,
                             sync=sync, metasync=sync, readahead=False, readonly=readonly,
                             lock=True, max_readers=256, mode=FILE_MODE,
                             writemap=self.writemap)
        self._unsynced_mark: Path | None = None  # this writer's marker (`_mark_unsynced`)
        stale: list[Path] = []
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
            stale = _unsynced_marks(self.path)  # raises after an OS restart (see there)
            _allocate_lock_file(self.path / "lock.mdb")
        self.env = self._open_env()
        if stale:  # an unsynced writer of this boot died: the page cache has its commits
            self.env.sync(True)
            for mark in stale:
                mark.unlink(missing_ok=True)
        if not readonly and not sync:
            self._unsynced_mark = _mark_unsynced(self.path)
        self._open_dbs()
        # the unsealed dedup ids of each generation (format 4), once the worker opened them
        # (open_live_dedup); None: they are written under HOT (cluster mode, tools)
        self.live: dict[int, IdTable] | None = None
        self.live_seq = 0  # last dedup_live key written
        # a writer's budget for the map pages resident in this process (0: none; residency.py)
        self.residency: MapResidency | None = None
        if resident_bytes > 0 and not readonly:
            try:
                self.residency = MapResidency(self.path / "data.mdb", resident_bytes)
            except OSError as e:  # no /proc (not Linux): the pages stay mapped
                log.warning("%s: no resident budget for the map (%s)", self.path, e)

    def after_commit(self) -> None:
        """After each commit (`Batch`, `RawWrite`), between transactions: keep the map's
        resident pages under the budget (`MapResidency.after_commit`). Never raises: the
        transaction is committed, and a failed madvise only leaves the pages mapped."""
        if self.residency is not None:
            try:
                self.residency.after_commit()
            except (OSError, ValueError) as e:
                log.warning("%s: map pages not dropped (%s): residency budget off", self.path, e)
                self.residency.close()
                self.residency = None

    def _open_env(self) -> lmdb.Environment:
        """lmdb.open with the shard's options; with WRITEMAP, the data file's blocks are
        allocated (`_allocate_map`) before anything writes through the map."""
        env = lmdb.open(str(self.path), map_size=self.map_size, **self._options)
        self.psize = env.stat()["psize"]
        if self.writemap:
            try:
                _allocate_map(self.path / "data.mdb", env.info()["map_size"])
            except BaseException:
                env.close()
                raise
        return env

    def _open_dbs(self) -> None:
        """Handles of the layout's databases (read-only: those that exist), the dedup pool
        (`dedup_pool`, by pool index) and the shard's dedup index and topic table."""
        names = None
        if self.readonly:
            with self.env.begin() as txn:
                names = {bytes(name).decode() for name, _ in txn.cursor()}
        # the writer opens (and creates) every handle in one transaction; read-only, each
        # handle in a transaction of its own (one opened in a read transaction dies with it)
        with self.env.begin(write=True) if not self.readonly else _no_txn() as txn:
            self.db = {n: self.env.open_db(n.encode(), txn=txn) for n in (*_DBS, *FORMAT1_DBS)
                       if (names is None and n in _DBS) or (names is not None and n in names)}
            self.dedup_pool: dict[int, object] = {}
            for i in range(DEDUP_POOL):
                name = f"dedup.{i}"
                if names is None or name in names:
                    self.dedup_pool[i] = self.env.open_db(name.encode(), txn=txn,
                                                          dupsort=True, dupfixed=True)
        self.dedup_index: list[list[int]] = [list(e) for e in
                                             self.get_meta("dedup_index", [])]
        self.seq_topics: list[str] = list(self.get_meta("seq_topics", []))
        self.topic_ix = {t: i for i, t in enumerate(self.seq_topics)}
        # the sequence log (format 4): rows logged since the last checkpoint, in memory
        with self.env.begin() as txn:
            self.seq_pending, self.seq_log_last, self.seq_logged = seq_log_rows(
                txn, self.db.get("seq_log"))
            # the document log (format 5): documents logged since the last checkpoint
            self.doc_pending, self.doc_log_last, self.doc_logged = doc_log_rows(
                txn, self.db.get("doc_log"))

    def fold_seq_log(self) -> int:
        """Checkpoint the sequence log in a transaction of its own (for the writers of
        ``seq`` rows that bypass the log: cluster mode, `RawWrite.put_seq`); returns the
        streams written (0: the log was empty)."""
        if not self.seq_logged:
            return 0
        n = len(self.seq_pending)
        with self.env.begin(write=True) as txn:
            write_seq_checkpoint(txn, self.db["seq"], self.db["seq_log"], self.seq_pending)
        self.seq_pending, self.seq_log_last, self.seq_logged = {}, 0, 0
        return n

    def fold_doc_log(self) -> int:
        """Checkpoint the document log in a transaction of its own (for the writers of
        ``views`` that bypass the log: cluster mode); returns the documents written (0: the
        log was empty)."""
        if not self.doc_logged:
            return 0
        n = len(self.doc_pending)
        with self.env.begin(write=True) as txn:
            write_doc_checkpoint(txn, self.db["views"], self.db["doc_log"], self.db["meta"],
                                 self.doc_pending, self.db["changes"])
        self.doc_pending, self.doc_log_last, self.doc_logged = {}, 0, 0
        return n

    def seq_rows(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, SEQ_ROW) of every stream, in key order: ``seq`` with the log overlaid."""
        with self.env.begin() as txn:
            yield from Snapshot(txn, self.db, self.dedup_pool).seq_rows()

    def dedup_db(self, generation: int):
        """The database of a dedup generation (format 2)."""
        try:
            return self.dedup_pool[generation % DEDUP_POOL]
        except KeyError:
            raise ShardError(f"{self.path}: no dedup database for generation "
                             f"{generation}") from None

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
        if fmt in FORMATS_IN_PLACE:  # readable as it is (see the format notes)
            self.put_meta(format=FORMAT_VERSION)
            fmt = FORMAT_VERSION
        if fmt != FORMAT_VERSION:
            raise ShardError(
                f"{self.path}: data format {fmt}, this build reads {FORMAT_VERSION}"
                + (f"; migrate it first: aggregator migrate --config <config> --data-dir "
                   f"{self.path.parent}" if fmt == 1 else ""))
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

    def changes_after(self, after: int) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) rows of the change outbox, in order, from the one that holds change
        seq after + 1 (it may start before it: see `parse_change_key`); a logged blob with
        its data put back (`resolved_change`)."""
        log_db = self.db.get("doc_log")
        with self.env.begin(db=self.db["changes"]) as txn:
            cur = txn.cursor()
            if cur.set_range(_U64.pack(after + 1)):
                if cur.prev() and parse_change_key(cur.key())[1] <= after:
                    cur.next()
            elif not cur.last() or parse_change_key(cur.key())[1] <= after:
                return
            for k, v in cur:
                k = bytes(k)
                yield k, resolved_change(txn, log_db, k, v)

    def count_changes_after(self, after: int) -> int:
        """How many change events of the outbox have seq > after."""
        n = 0
        for k, _ in self.changes_after(after):
            first, last, _ = parse_change_key(k)
            n += last - max(first, after + 1) + 1
        return n

    def last_change_seq(self) -> int:
        with self.env.begin(db=self.db["changes"]) as txn:
            cur = txn.cursor()
            return parse_change_key(cur.key())[1] if cur.last() else 0

    def dedup_entries(self) -> Iterator[tuple[int, bytes]]:
        """(generation, identity hash) of the dedup index, oldest generation first (in a
        generation: sealed ids, then hot ones, then the unsealed ones of dedup_live)."""
        with self.env.begin() as txn:
            tables = _live_tables(txn, self.db.get("dedup_live"), self.dedup_index)
            for gen, below in self.dedup_index:
                cur = txn.cursor(db=self.dedup_db(gen))
                for key in (SEALED, HOT):
                    if cur.set_key(key):
                        for v in cur.iternext_dup():
                            yield gen, v[2:]
                if gen in tables:
                    hashes = tables[gen].hashes(below)
                    for i in range(0, len(hashes), 16):
                        yield gen, hashes[i:i + 16]

    def dedup_generations(self) -> Iterator[tuple[int, bytes]]:
        """(generation, its identity hashes joined, 16 bytes each): the boot's rebuild of the
        bloom filter, in one call per generation."""
        with self.env.begin() as txn:
            tables = (self.live if self.live is not None else
                      _live_tables(txn, self.db.get("dedup_live"), self.dedup_index))
            for gen, below in self.dedup_index:
                cur = txn.cursor(db=self.dedup_db(gen))
                parts = []
                for key in (SEALED, HOT):
                    if cur.set_key(key):
                        parts.extend(v[2:] for v in cur.iternext_dup())
                if gen in tables:
                    parts.append(tables[gen].hashes(below))
                if parts:
                    yield gen, b"".join(parts)

    def dedup_count(self) -> int:
        """Ids in the dedup index (the unsealed ids of dedup_live included)."""
        with self.env.begin() as txn:
            n = sum(txn.stat(self.dedup_db(g))["entries"] for g, _ in self.dedup_index)
            return n + _live_count(txn, self.db.get("dedup_live"), self.dedup_index)

    def open_live_dedup(self) -> tuple[int, int]:
        """The writer's switch to format 4's unsealed dedup ids (the worker, at boot): the
        ids still under HOT (a format-3 shard, a reshard's or restore's output) move into
        dedup_live entries in one transaction (a kill before its commit leaves them under
        HOT, and the next boot moves them), then every unsealed generation's ids are read
        into its `IdTable`. Returns (ids in the tables, ids moved from HOT)."""
        moved = 0
        live = self.db["dedup_live"]
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=live)
            seq = _U64.unpack(cur.key())[0] if cur.last() else 0
            for gen, below in self.dedup_index:
                dcur = txn.cursor(db=self.dedup_db(gen))
                if not dcur.set_key(HOT):
                    continue
                ids = [v for v in dcur.iternext_dup() if key_slot(v) >= below]
                for i in range(0, len(ids), LIVE_CHUNK):
                    seq += 1
                    txn.put(_U64.pack(seq), _U64.pack(gen) + b"".join(ids[i:i + LIVE_CHUNK]),
                            db=live, append=True)
                moved += len(ids)
                txn.delete(HOT, db=self.dedup_db(gen))  # the key with all its duplicates
            self.live_seq = seq
        with self.env.begin() as txn:
            self.live = _live_tables(txn, live, self.dedup_index)
        return sum(len(t) for t in self.live.values()), moved

    def close_live_dedup(self) -> int:
        """The way back for a writer of format 3's hot key (the cluster mode's task worker
        on a shard a worker wrote): the unsealed ids of dedup_live go under their
        generation's HOT key and dedup_live is emptied, in one transaction. Returns the ids
        moved."""
        live = self.db["dedup_live"]
        moved = 0
        with self.env.begin(write=True) as txn:
            if not txn.stat(live)["entries"]:
                return 0
            below = dict(self.dedup_index)
            for gen, ids in list(_live_entries(txn, live, self.dedup_index)):
                keys = [(HOT, k) for k in (ids[i:i + LIVE_REC]
                                           for i in range(0, len(ids), LIVE_REC))
                        if key_slot(k) >= below[gen]]
                txn.cursor(db=self.dedup_db(gen)).putmulti(keys, dupdata=True)
                moved += len(keys)
            txn.drop(live, delete=False)
        self.live = None
        return moved

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
            logged = seq_log_rows(txn, self.db.get("seq_log"))[0]  # the log overlaid
            for k, v in txn.cursor(db=self.db["parked"]):
                g, seq = bytes(k[:-8]), _U64.unpack(k[-8:])[0]
                parked_at, record = _unpack(v)
                entry = out.get(g)
                if entry is None:
                    raw = logged.get(g) or txn.get(g, db=self.db["seq"])
                    row = None if raw is None else parse_seq_value(raw, self.seq_topics)
                    entry = out[g] = (row, [], record[0])
                entry[1].append((seq, parked_at))
        return out

    def documents(self, views: list[str]) -> Iterator[tuple[str, str, dict]]:
        """(view, key, stored record) for every document in the shard, in key order
        (``views`` with the document log overlaid)."""
        with self.env.begin(buffers=False) as txn:
            snap = Snapshot(txn, self.db, self.dedup_pool)
            for k, v in snap.rows("views"):
                yield views[k[2]], k[3:].decode(), unpack_record(v)

    def meta_items(self) -> dict:
        """Every meta entry, decoded ({} for a shard without the meta database)."""
        db = self.db.get("meta")
        if db is None:
            return {}
        with self.env.begin(db=db) as txn:
            return {bytes(k).decode(): _unpack(v) for k, v in txn.cursor()}

    def snapshot(self) -> "Snapshot":
        """One read transaction over the whole shard, until `Snapshot.close`."""
        return Snapshot(self.env.begin(buffers=False), self.db, self.dedup_pool)

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
            if "views" in out and self.db.get("doc_log") is not None:  # the log overlaid
                out["views"] = Snapshot(txn, self.db, self.dedup_pool).entries("views")
            if "dedup" not in self.db:
                out["dedup"] = sum(txn.stat(self.dedup_db(g))["entries"]
                                   for g, _ in self.dedup_index) + _live_count(
                    txn, self.db.get("dedup_live"), self.dedup_index)
        return out

    def dedup_bytes(self) -> tuple[int, int]:
        """(ids, bytes of the pages that hold them) of the dedup index."""
        ids = pages = 0
        with self.env.begin() as txn:
            for g, _ in self.dedup_index:
                st = txn.stat(self.dedup_db(g))
                ids += st["entries"]
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            psize = txn.stat(self.db["meta"])["psize"]
        return ids, pages * psize

    def begin(self) -> "Batch":
        return Batch(self)

    def grow_ahead(self) -> bool:
        """Grow the map (`grow`) once its committed pages reach 3/4 of it: between two
        transactions, rather than by a MAP_FULL that rolls one back (which stays the
        backstop). True if it grew."""
        info = self.env.info()
        size = info["map_size"]
        if size >= self.max_map_size or (info["last_pgno"] + 1) * self.psize * 4 < size * 3:
            return False
        return self.grow()

    def grow(self) -> bool:
        """Double the map size up to the maximum. False when already at the maximum."""
        size = self.env.info()["map_size"]
        if size >= self.max_map_size:
            return False
        new = min(size * 2, self.max_map_size)
        if self.writemap:  # the blocks first: a full disk is an OSError here, the map unchanged
            _allocate_map(self.path / "data.mdb", new)
        self.env.set_mapsize(new)  # only valid with no write transaction open
        self.map_size = new
        if self.residency is not None:  # LMDB mapped it again: nothing of it resident now
            self.residency.rebase()
        log.info("%s: LMDB map grown from %d to %d bytes", self.path, size, new)  # routine
        return True

    def reopen(self) -> None:
        """Close and open the environment again, at its current map size: after MDB_PANIC
        (a failed write of the meta page), LMDB refuses every transaction until then."""
        self.env.close()
        self.env = self._open_env()
        self._open_dbs()
        if self.residency is not None:
            self.residency.rebase()
        log.warning("%s: LMDB environment reopened", self.path)

    def close(self) -> None:
        if self._unsynced_mark is not None:  # a clean close: every commit on disk
            self.env.sync(True)
            self._unsynced_mark.unlink(missing_ok=True)
            _fsync_dir(self.path)
            self._unsynced_mark = None
        self.env.close()
        if self.residency is not None:
            self.residency.close()


@contextlib.contextmanager
def _no_txn():
    yield None


UNSYNCED = "unsynced."  # + the writer's pid: a shard written without fsync per commit
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:  # not Linux: no way to tell an OS restart from a process restart
        return ""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mark_unsynced(path: Path) -> Path:
    """Before a writer with ``sync=False`` (service.lmdb_sync = false) commits anything: a
    durable marker holding this machine's boot id, removed by `Shard.close` after a sync.

    Without fsync a commit is in the page cache only. A process crash loses nothing (the
    kernel still writes the pages back), but an OS crash or power loss can lose the last
    commits and, with MDB_WRITEMAP, leave a meta page on disk that points at pages never
    written (LMDB's documentation of MDB_NOSYNC): the shard may be silently inconsistent.
    The marker is how the next open tells the two apart (`_unsynced_marks`)."""
    mark = path / f"{UNSYNCED}{os.getpid()}"
    with open(mark, "w") as f:
        f.write(_boot_id() + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path)
    return mark


def _unsynced_marks(path: Path) -> list[Path]:
    """The markers of unsynced writers of this boot that are gone (their commits are in the
    page cache: the caller syncs, then removes them); raises ShardError for a marker of an
    earlier boot: its writer did not close the shard before the machine went down."""
    now, stale = _boot_id(), []
    for mark in sorted(path.glob(UNSYNCED + "*")):
        try:
            boot = mark.read_text().strip()
        except OSError:
            continue
        if boot != now or not now:
            raise ShardError(
                f"{path}: written with service.lmdb_sync = false by a process that did not "
                f"close it before the machine restarted (boot id {boot or '?'}, now "
                f"{now or 'unknown'}): its last commits may be lost and, with lmdb_writemap, "
                "its pages inconsistent, so the exactly-once state cannot be trusted. "
                "Restore the shard from a copy, or remove the data directory to rebuild "
                "(cluster mode restores a removed shard from its changelog); to open it as it "
                f"is anyway, remove {mark}")
        pid = mark.name[len(UNSYNCED):]
        if not (pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid))):
            stale.append(mark)
    return stale


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


def _allocate_map(path: Path, size: int) -> None:
    """Allocate the disk blocks of an LMDB data file opened with WRITEMAP, up to `size`
    (the map size).

    With MDB_WRITEMAP LMDB extends data.mdb to the map size with ftruncate (a sparse file)
    and writes pages through a shared writable mapping (mdb.c, mdb_env_map): on a full disk
    the first store to a page without blocks is a SIGBUS, not an error code. Allocated here
    at open and before each `Shard.grow`, a full disk is an OSError (ENOSPC), which the
    worker's storage retry handles, and no later store through the map needs a new block
    (on a filesystem that overwrites in place: not btrfs/ZFS copy-on-write). The cost: the
    file takes its whole map size on disk. An allocation that fails part-way keeps what it
    got (the next attempt completes it).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in STORAGE_ERRORS:
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from None
        log.warning("%s: not preallocated (%s): on a full disk a store through the map is a "
                    "SIGBUS; service.lmdb_writemap = false avoids it", path, e)
    finally:
        os.close(fd)


def _live_entries(txn, db, index: list) -> Iterator[tuple[int, bytes]]:
    """(generation, S + hash ids joined) of the dedup_live entries of the unsealed generations
    of `index`."""
    if db is None:
        return
    unsealed = {g for g, below in index if below < SLOTS_ALL}
    for _, v in txn.cursor(db=db):
        gen = _U64.unpack(v[:8])[0]
        if gen in unsealed:
            yield gen, bytes(v[8:])


def _live_tables(txn, db, index: list) -> dict[int, IdTable]:
    """The unsealed ids of each generation of `index` (dedup_live) in an IdTable."""
    tables: dict[int, IdTable] = {}
    for gen, ids in _live_entries(txn, db, index):
        t = tables.get(gen)
        if t is None:
            t = tables[gen] = IdTable()
        t.add(ids)
    return tables


def _live_count(txn, db, index: list) -> int:
    """Unsealed ids of dedup_live not yet under SEALED (the slots from sealed_below on)."""
    below = dict(index)
    n = 0
    for gen, ids in _live_entries(txn, db, index):
        b = below[gen]
        n += sum(1 for i in range(0, len(ids), LIVE_REC) if key_slot(ids[i:i + 2]) >= b) \
            if b > 0 else len(ids) // LIVE_REC
    return n


class _IndexWrites:
    """What `Batch` and `RawWrite` share: the dedup index and the seq topic table of format 2,
    changed in the transaction and adopted by the shard when it commits."""

    __slots__ = ()

    def _init_index(self) -> None:
        self._dx: list[list[int]] | None = None  # dedup_index changed in this transaction
        self._topics: list[str] | None = None  # seq_topics grown in this transaction

    def _index(self) -> list[list[int]]:
        return self.shard.dedup_index if self._dx is None else self._dx

    def _index_w(self) -> list[list[int]]:
        if self._dx is None:
            self._dx = [list(e) for e in self.shard.dedup_index]
        return self._dx

    def _entry(self, generation: int) -> list[int]:
        """The dedup_index entry of a generation, added if new."""
        for e in self._index():
            if e[0] == generation:
                return e
        idx = self._index_w()
        for e in idx:
            if e[0] % DEDUP_POOL == generation % DEDUP_POOL:
                raise ShardError(f"{self.shard.path}: dedup generations {e[0]} and "
                                 f"{generation} would share a database")
        e = [generation, 0]
        idx.append(e)
        idx.sort()
        return e

    def _put_seen(self, skey: bytes, generation: int) -> None:
        e = self._entry(generation)
        key = SEALED if key_slot(skey) < e[1] else HOT
        self.txn.put(key, skey, db=self.shard.dedup_db(generation), dupdata=True)

    def _unset_seen(self, skey: bytes) -> bool:
        """Delete an id from every generation; True if it was there."""
        found = False
        for gen, _ in self._index():
            db = self.shard.dedup_db(gen)
            for key in (HOT, SEALED):
                found |= self.txn.delete(key, skey, db=db)
        return found

    def seen(self, skey: bytes) -> bool:
        slot = key_slot(skey)
        live = self.shard.live
        for gen, sealed_below in self._index():
            if live is not None and slot >= sealed_below:  # unsealed: the generation's table
                t = live.get(gen)
                if (t is not None and skey in t) or self._pending_has(gen, skey):
                    return True
                continue
            cur = self.txn.cursor(db=self.shard.dedup_db(gen))
            if cur.set_key_dup(SEALED if slot < sealed_below else HOT, skey):
                return True
        return False

    def _pending_has(self, generation: int, skey: bytes) -> bool:
        """Whether this transaction marked `skey` seen in `generation` (format 4's unsealed
        ids: the tables take them at the commit)."""
        return False

    def _topic_index(self, topic: str) -> int:
        if not topic:
            return NO_TOPIC
        ix = self.shard.topic_ix.get(topic)
        if ix is not None:
            return ix
        if self._topics is None:
            self._topics = list(self.shard.seq_topics)
        if topic not in self._topics:
            if len(self._topics) >= NO_TOPIC:
                raise ShardError(f"{self.shard.path}: more than {NO_TOPIC} topics")
            self._topics.append(topic)
        return self._topics.index(topic)

    def _write_index(self) -> None:
        """Before the commit: the changed dedup index and topic table into meta."""
        if self._dx is not None:
            self.txn.put(b"dedup_index", _pack(self._dx), db=self.shard.db["meta"])
        if self._topics is not None:
            self.txn.put(b"seq_topics", _pack(self._topics), db=self.shard.db["meta"])

    def _adopt_index(self) -> None:
        """After the commit: the shard takes the transaction's dedup index and topics."""
        if self._dx is not None:
            self.shard.dedup_index = self._dx
        if self._topics is not None:
            self.shard.seq_topics = self._topics
            self.shard.topic_ix = {t: i for i, t in enumerate(self._topics)}
        self._dx = self._topics = None


def _adopt_log(pending: dict, logged: int, txn_pending: dict, txn_logged: int,
               checkpointed: bool) -> tuple[dict, int]:
    """A shard's (pending entries, entries logged) of an appended log with checkpoints
    (``seq_log``, ``doc_log``) after a commit that logged `txn_pending` (`txn_logged`
    entries), after a checkpoint of its own if `checkpointed`."""
    if checkpointed:
        return txn_pending, txn_logged
    if txn_pending:
        pending.update(txn_pending)
        return pending, logged + txn_logged
    return pending, logged


class Batch(_IndexWrites):
    """One write transaction: everything a batch changes, committed at once or not at all."""

    __slots__ = ("shard", "txn", "_db", "_seen", "_live_new", "_live_seq", "_pending", "_dx",
                 "_topics", "_seqp", "_seq_next", "_seq_n", "_seq_ckpt", "_docp", "_doc_next",
                 "_doc_n", "_doc_ckpt")

    def __init__(self, shard: Shard):
        self.shard = shard
        self.txn = shard.env.begin(write=True)
        self._db = shard.db
        self._seen: dict[int, list[bytes]] = {}  # generation -> hashes marked seen (runs
        # of 16-byte hashes, in the order they were marked)
        self._live_new: dict[int, list[bytes]] = {}  # generation -> unsealed ids marked
        # seen (runs of S + hash), for dedup_live and the shard's tables (shard.live only)
        self._live_seq = shard.live_seq
        self._pending: dict[int, list] = {}  # _pending_has: this transaction's ids, as a set
        self._init_index()
        self._init_seq_log()
        self._init_doc_log()
        mine = shard.writer_epoch
        if mine is not None:  # fencing: one get per transaction (see Shard.claim_writer)
            raw = self.txn.get(WRITER_EPOCH, db=self._db["meta"])
            epoch = 0 if raw is None else _unpack(raw)
            if epoch != mine:
                self.txn.abort()
                raise Fenced(shard.path, mine, epoch)

    # documents (the log: see the format notes)
    def _init_doc_log(self) -> None:
        self._docp: dict[bytes, bytes | None] = {}  # documents logged in this transaction
        # (since its checkpoint, if it made one): key -> packed record, None: deleted
        self._doc_next = self.shard.doc_log_last  # last log key used
        self._doc_n = 0  # bytes logged in this transaction (since its checkpoint)
        self._doc_ckpt = False  # this transaction made a checkpoint

    def get_doc(self, dkey: bytes) -> dict | None:
        """The record {"v", "d", "s"} of a document (the log overlaid), or None."""
        raw = self.doc_raw(dkey)
        return None if raw is None else unpack_record(raw)

    def doc_raw(self, dkey: bytes) -> bytes | None:
        """The stored bytes of a document's record (the log overlaid), or None."""
        raw = self._docp.get(dkey, _ABSENT)
        if raw is _ABSENT:
            if not self._doc_ckpt:
                raw = self.shard.doc_pending.get(dkey, _ABSENT)
            if raw is _ABSENT:
                raw = self.txn.get(dkey, db=self._db["views"])
        return raw

    def put_doc(self, dkey: bytes, record: dict, body: bytes | None | bool = True) -> int:
        """Store a document's record {"v", "d", "s"} (logged: one appended ``doc_log``
        record per commit); returns its stored size in bytes. `body`: the document's
        `doc_codec.json_body` when the caller has it (bytes, or None: not JSON-exact); True
        (the default) decides here."""
        raw = pack_record(record, json_body(record["d"]) if body is True else body)
        self._log_doc(dkey, raw)
        return len(raw)

    def delete_doc(self, dkey: bytes) -> None:
        self._log_doc(dkey, None)

    def _log_doc(self, dkey: bytes, raw: bytes | None) -> None:
        """This transaction's latest record of a document (one entry per key in its log
        record); `_doc_n` counts the bytes of the record's entries."""
        docp = self._docp
        old = docp.get(dkey, _ABSENT)
        if old is not _ABSENT:
            self._doc_n -= _DOC_HEAD.size + len(dkey) + (0 if old is None else len(old))
        docp[dkey] = raw
        self._doc_n += _DOC_HEAD.size + len(dkey) + (0 if raw is None else len(raw))

    def write_doc(self, dkey: bytes, raw: bytes | None) -> None:
        """A packed record straight into ``views`` (None: the key deleted), bypassing the log
        (cluster mode: changelog.CapturingBatch; its shard's log is folded at boot)."""
        if self.shard.doc_logged or self._docp:
            raise ShardError(f"{self.shard.path}: documents written past a non-empty log")
        if raw is None:
            self.txn.delete(dkey, db=self._db["views"])
        else:
            self.txn.put(dkey, raw, db=self._db["views"])

    @property
    def doc_log_bytes(self) -> int:
        """Bytes in the document log with this transaction's (since the last checkpoint):
        they bound the shard's `doc_pending` as well."""
        return self._doc_n if self._doc_ckpt else self.shard.doc_logged + self._doc_n

    def checkpoint_docs(self) -> int:
        """A checkpoint in this transaction: the latest record of every document logged since
        the last one into ``views``, the log emptied (`write_doc_checkpoint`); returns how
        many documents."""
        docs = self._docp if self._doc_ckpt else {**self.shard.doc_pending, **self._docp}
        write_doc_checkpoint(self.txn, self._db["views"], self._db["doc_log"],
                             self._db["meta"], docs, self._db["changes"])
        self._docp, self._doc_next, self._doc_n, self._doc_ckpt = {}, 0, 0, True
        return len(docs)

    def logged_docs(self) -> dict[bytes, bytes | None]:
        """The documents this transaction's ``doc_log`` record will hold (key -> record,
        None: deleted; empty after a checkpoint in this transaction, which wrote them into
        ``views``): what a change blob may refer to (change_blobs.stored_blob)."""
        return self._docp

    @property
    def doc_log_txn_bytes(self) -> int:
        """Bytes this transaction logs (its part of `doc_log_bytes`)."""
        return self._doc_n

    def next_doc_log_key(self) -> int:
        """The key of this transaction's ``doc_log`` record, if it writes one."""
        return self._doc_next + 1

    def _write_doc_log(self) -> None:
        """Before the commit: this transaction's documents appended as one doc_log record."""
        if not self._docp:
            return
        self._doc_next += 1
        if not self.txn.put(_U64.pack(self._doc_next), pack_doc_log(self._docp),
                            db=self._db["doc_log"], append=True):
            raise ShardError(f"{self.shard.path}: doc_log key {self._doc_next} out of order")

    def _adopt_doc_log(self) -> None:
        """After the commit: the shard takes the transaction's log state."""
        shard = self.shard
        shard.doc_pending, shard.doc_logged = _adopt_log(
            shard.doc_pending, shard.doc_logged, self._docp, self._doc_n, self._doc_ckpt)
        shard.doc_log_last = self._doc_next
        self._docp, self._doc_n, self._doc_ckpt = {}, 0, False

    # dedup index (seen: _IndexWrites)
    def mark_seen(self, skey: bytes, generation: int) -> None:
        if self.shard.live is not None:
            self._mark_live([skey], generation)
        else:
            self._put_seen(skey, generation)
        seen = self._seen.get(generation)
        if seen is None:
            seen = self._seen[generation] = []
        seen.append(skey[2:])

    def mark_seen_many(self, skeys: list[bytes], generation: int,
                       hashes: bytes | None = None) -> None:
        """`mark_seen` of each of `skeys` (in order) in one cursor call per dedup key (HOT,
        SEALED) instead of a put per id; `hashes`: their 16-byte hashes joined, when the
        caller has them (core.dedup_keys)."""
        if not skeys:
            return
        if self.shard.live is not None:
            self._mark_live(skeys, generation)
        else:
            self._put_hot(skeys, generation)
        seen = self._seen.get(generation)
        if seen is None:
            seen = self._seen[generation] = []
        seen.append(b"".join([k[2:] for k in skeys]) if hashes is None else hashes)

    def _mark_live(self, skeys: list[bytes], generation: int) -> None:
        """Format 4: unsealed ids go to dedup_live at the commit (appended, `_write_live`)
        and into the generation's table after it; an id of a slot already sealed (not the
        current generation: a rare case) goes under SEALED at once, as `_put_seen`."""
        below = self._entry(generation)[1]
        if below > 0:
            sealed = [k for k in skeys if key_slot(k) < below]
            if sealed:
                self.txn.cursor(db=self.shard.dedup_db(generation)).putmulti(
                    [(SEALED, k) for k in sealed], dupdata=True)
                skeys = [k for k in skeys if key_slot(k) >= below]
        new = self._live_new.get(generation)
        if new is None:
            new = self._live_new[generation] = []
        new.append(b"".join(skeys))

    def _pending_has(self, generation: int, skey: bytes) -> bool:
        runs = self._live_new.get(generation)
        if not runs:
            return False
        pend = self._pending  # generation -> (runs read, their ids): built on demand
        got = pend.get(generation)
        if got is None:
            got = pend[generation] = [0, set()]
        if got[0] < len(runs):
            for run in runs[got[0]:]:
                got[1].update(run[i:i + LIVE_REC] for i in range(0, len(run), LIVE_REC))
            got[0] = len(runs)
        return skey in got[1]

    def _put_hot(self, skeys: list[bytes], generation: int) -> None:
        """Format 3's write of new ids: random inserts under HOT (cluster mode, tools)."""
        below = self._entry(generation)[1]
        if below <= 0:  # nothing sealed in this generation (the current one, as a rule)
            items = zip(itertools.repeat(HOT), skeys)
        else:  # under SEALED or HOT by slot, as _put_seen
            items = [(SEALED if key_slot(k) < below else HOT, k) for k in skeys]
        self.txn.cursor(db=self.shard.dedup_db(generation)).putmulti(items, dupdata=True)

    @property
    def seen_count(self) -> int:
        """Ids this transaction added to the dedup index."""
        return sum(len(h) for v in self._seen.values() for h in v) // 16

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

    def drop_generations(self, upto: int) -> int:
        """Drop the dedup generations <= upto whole (mdb_drop: their pages are freed without
        visiting the ids); returns the number of ids dropped."""
        idx = self._index()
        gone = [e for e in idx if e[0] <= upto]
        if not gone:
            return 0
        n = 0
        for gen, _ in gone:
            db = self.shard.dedup_db(gen)
            n += self.txn.stat(db)["entries"]
            self._dropping(gen, db)
            self.txn.drop(db, delete=False)
        self._dx = [e for e in self._index_w() if e[0] > upto]
        return n

    def _dropping(self, generation: int, db) -> None:
        """A dedup generation is about to be dropped (a hook for changelog.CapturingBatch)."""

    def seal_dedup(self, current: int, budget: int) -> int:
        """Move up to about `budget` ids (whole slots) of the oldest generation before
        `current` that is not sealed yet from its hot key to its sealed key, in slot order,
        with appends (full pages); returns the ids moved."""
        for e in self._index():
            if e[0] < current and e[1] < SLOTS_ALL:
                break
        else:
            return 0
        if self.shard.live is not None:
            return self._seal_live(e[0], budget)
        e = next(x for x in self._index_w() if x[0] == e[0])
        db = self.shard.dedup_db(e[0])
        cur = self.txn.cursor(db=db)
        vals: list[bytes] = []
        last = -1
        if cur.set_key(HOT):  # read the slice first: no cursor walks while the tree changes
            for v in cur.iternext_dup():
                slot = (v[0] << 8) | v[1]
                if len(vals) >= budget and slot != last:
                    break
                vals.append(v)
                last = slot
        for v in vals:
            if not cur.put(SEALED, v, dupdata=True, append=True):
                cur.put(SEALED, v, dupdata=True)  # a sealed-range id written out of order
        moved = len(vals)
        if moved and cur.set_key(HOT):
            for _ in range(moved):
                cur.delete()  # the first duplicate left: the next one moves up
        e[1] = last + 1 if cur.set_key(HOT) else SLOTS_ALL
        return moved

    def _seal_live(self, generation: int, budget: int) -> int:
        """seal_dedup of format 4: the slice comes from the generation's table (sorted);
        dedup_live keeps the ids until the generation is sealed whole (`_write_live`). A
        generation this transaction marked ids in waits for the next one (the tables take
        them at the commit)."""
        if generation in self._live_new:
            return 0
        table = self.shard.live.get(generation)
        e = next(x for x in self._index_w() if x[0] == generation)
        if table is None:
            e[1] = SLOTS_ALL
            return 0
        keys, e[1] = table.seal_slice(e[1], budget)
        cur = self.txn.cursor(db=self.shard.dedup_db(generation))
        for i in range(0, len(keys), LIVE_REC):
            v = keys[i:i + LIVE_REC]
            if not cur.put(SEALED, v, dupdata=True, append=True):
                cur.put(SEALED, v, dupdata=True)  # a sealed-range id written out of order
        return len(keys) // LIVE_REC

    def _write_live(self) -> None:
        """Before the commit: this transaction's unsealed ids appended to dedup_live (one
        entry per generation), and the entries of generations sealed or dropped pruned from
        the front (entries come in generation order, save those a boot moved from HOT)."""
        live = self._db["dedup_live"]
        seq = self.shard.live_seq
        for gen in sorted(self._live_new):
            ids = b"".join(self._live_new[gen])
            if ids:
                seq += 1
                self.txn.put(_U64.pack(seq), _U64.pack(gen) + ids, db=live, append=True)
        if self._dx is not None:
            unsealed = {g for g, below in self._dx if below < SLOTS_ALL}
            cur = self.txn.cursor(db=live)
            while cur.first() and _U64.unpack(cur.value()[:8])[0] not in unsealed:
                cur.delete()
        self._live_seq = seq

    def _adopt_live(self) -> None:
        """After the commit: the shard's tables take this transaction's unsealed ids; the
        tables of generations sealed whole or dropped are freed."""
        shard = self.shard
        shard.live_seq = self._live_seq
        tables = shard.live
        for gen, runs in self._live_new.items():
            t = tables.get(gen)
            if t is None:
                t = tables[gen] = IdTable()
            for run in runs:
                t.add(run)
        self._live_new, self._pending = {}, {}
        unsealed = {g for g, below in shard.dedup_index if below < SLOTS_ALL}
        for gen in [g for g in tables if g not in unsealed]:
            del tables[gen]

    # sequences (the log: see the format notes) and parked events
    def _init_seq_log(self) -> None:
        self._seqp: dict[bytes, bytes] = {}  # rows logged in this transaction (since its
        # checkpoint, if it made one)
        self._seq_next = self.shard.seq_log_last  # last log key used
        self._seq_n = 0  # rows logged in this transaction (since its checkpoint)
        self._seq_ckpt = False  # this transaction made a checkpoint

    def get_seq(self, gkey: bytes) -> list | None:
        """[last, topic, partition] of a stream's seq row (the log overlaid), or None."""
        raw = self._seqp.get(gkey)
        if raw is None and not self._seq_ckpt:
            raw = self.shard.seq_pending.get(gkey)
        if raw is None:
            raw = self.txn.get(gkey, db=self._db["seq"])
            if raw is None:
                return None
        return parse_seq_value(raw, self.shard.seq_topics if self._topics is None
                               else self._topics)

    def put_seq(self, gkey: bytes, last: int, topic: str, partition: int) -> None:
        self.put_seqs([(gkey, last, topic, partition)])

    def put_seqs(self, rows: list[tuple[bytes, int, str, int]]) -> None:
        """Log the rows ``(gkey, last, topic, partition)`` (one commit's dirty keys) as one
        appended ``seq_log`` record; `checkpoint_seqs` moves them into ``seq``."""
        if not rows:
            return
        pack, tix = SEQ_ROW.pack, self._topic_index
        keys = [r[0] for r in rows]
        if set(map(len, keys)) != {SEQ_KEY_BYTES}:
            raise ValueError(f"seq keys of {sorted(set(map(len, keys)))} bytes, not "
                             f"{SEQ_KEY_BYTES}")
        vals = [pack(last, tix(topic), partition) for _, last, topic, partition in rows]
        self._seqp.update(zip(keys, vals))
        self._seq_next += 1
        self._seq_n += len(rows)
        if not self.txn.put(_U64.pack(self._seq_next),
                            b"".join(itertools.chain.from_iterable(zip(keys, vals))),
                            db=self._db["seq_log"], append=True):
            raise ShardError(f"{self.shard.path}: seq_log key {self._seq_next} out of order")

    def write_seqs(self, rows: list[tuple[bytes, int, str, int]]) -> None:
        """The rows straight into ``seq``, in one cursor call, bypassing the log (cluster
        mode: changelog.CapturingBatch; its shard's log is folded at boot)."""
        if not rows:
            return
        if self.shard.seq_logged or self._seq_n:
            raise ShardError(f"{self.shard.path}: seq rows written past a non-empty log")
        pack, tix = SEQ_ROW.pack, self._topic_index
        self.txn.cursor(db=self._db["seq"]).putmulti(
            [(gkey, pack(last, tix(topic), partition)) for gkey, last, topic, partition in rows])

    @property
    def seq_log_rows(self) -> int:
        """Rows in the sequence log with this transaction's (since the last checkpoint)."""
        return self._seq_n if self._seq_ckpt else self.shard.seq_logged + self._seq_n

    def checkpoint_seqs(self) -> int:
        """A checkpoint in this transaction: the latest row of every stream logged since the
        last one into ``seq``, the log emptied (`write_seq_checkpoint`); returns how many
        streams."""
        rows = dict(self.shard.seq_pending) if not self._seq_ckpt else {}
        rows.update(self._seqp)
        write_seq_checkpoint(self.txn, self._db["seq"], self._db["seq_log"], rows)
        self._seqp, self._seq_next, self._seq_n, self._seq_ckpt = {}, 0, 0, True
        return len(rows)

    def _adopt_seq_log(self) -> None:
        """After the commit: the shard takes the transaction's log state."""
        shard = self.shard
        shard.seq_pending, shard.seq_logged = _adopt_log(
            shard.seq_pending, shard.seq_logged, self._seqp, self._seq_n, self._seq_ckpt)
        shard.seq_log_last = self._seq_next
        self._seqp, self._seq_n, self._seq_ckpt = {}, 0, False

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
        """One change event in format 1 (the reshard writes these)."""
        self.txn.put(_U64.pack(seq), entry, db=self._db["changes"])

    def put_changes(self, first: int, last: int, blob: bytes) -> None:
        """A commit's change events (seqs first..last) as one blob."""
        self.txn.put(change_range_key(first, last), blob, db=self._db["changes"])

    def prune_changes(self, upto: int) -> int:
        """Delete the rows of the change outbox whose events were all delivered (last seq
        <= upto); returns how many rows."""
        cur = self.txn.cursor(db=self._db["changes"])
        n = 0
        if not cur.first():
            return 0
        while parse_change_key(cur.key())[1] <= upto:
            if not cur.delete():
                break
            n += 1
            if not cur.key():
                break
        return n

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
        live = self.shard.live is not None
        if live:
            self._write_live()
        self._write_doc_log()
        self._write_index()
        self.txn.commit()
        self._adopt_index()
        self._adopt_seq_log()
        self._adopt_doc_log()
        if live:
            self._adopt_live()
        self.shard.after_commit()

    def abort(self) -> None:
        self._dx = self._topics = None
        self._seqp, self._seq_n, self._seq_ckpt = {}, 0, False
        self._docp, self._doc_n, self._doc_ckpt = {}, 0, False
        self._live_new, self._pending = {}, {}
        try:
            self.txn.abort()
        except lmdb.Error:
            pass


class RawWrite(_IndexWrites):
    """A write transaction of encoded rows, by database name, for the changelog's restore and
    task drop and the reshard's copy. Unlike `Batch` it does not check the writer epoch: its
    callers run in the shard's writer (the restore, before the worker's batches) or on a shard
    nobody else opened (the reshard). As a context manager it commits at the end of the block
    and aborts on an exception."""

    __slots__ = ("shard", "txn", "_db", "_dx", "_topics")

    def __init__(self, shard: Shard):
        self.shard = shard
        self.txn = shard.env.begin(write=True)
        self._db = shard.db
        self._init_index()

    def get(self, table: str, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self._db[table])

    def put(self, table: str, key: bytes, value: bytes, append: bool = False) -> bool:
        """False when `append` and the key is not after the table's last key."""
        return self.txn.put(key, value, db=self._db[table], append=append)

    def delete(self, table: str, key: bytes) -> bool:
        return self.txn.delete(key, db=self._db[table])

    def set_seen(self, skey: bytes, generation: int | None) -> None:
        """Put a dedup id into a generation, or with None delete it from every one."""
        if generation is None:
            self._unset_seen(skey)
        else:
            self._put_seen(skey, generation)

    def put_seq(self, gkey: bytes, last: int, topic: str, partition: int) -> None:
        """A seq row from its fields (the topic by name: see the shard's ``seq_topics``),
        straight into ``seq``: only on a shard whose sequence log is empty (a new shard of
        the reshard; cluster mode folds the log at boot, `Shard.fold_seq_log`)."""
        if self.shard.seq_logged:
            raise ShardError(f"{self.shard.path}: seq rows written past a non-empty log")
        self.txn.put(gkey, SEQ_ROW.pack(last, self._topic_index(topic), partition),
                     db=self._db["seq"])

    def delete_prefix(self, table: str, prefix: bytes) -> int:
        """Delete the rows whose key starts with `prefix` (``dedup``: the ids of every
        generation); returns the number of rows deleted."""
        if table == "dedup":
            return self._delete_seen_prefix(prefix)
        cur = self.txn.cursor(db=self._db[table])
        n = 0
        if not cur.set_range(prefix):
            return 0
        while True:
            k = cur.key()
            if not k or not k.startswith(prefix):
                break
            if not cur.delete():
                break
            n += 1
        return n

    def _delete_seen_prefix(self, prefix: bytes) -> int:
        n = 0
        for gen, _ in self._index():
            cur = self.txn.cursor(db=self.shard.dedup_db(gen))
            for key in (HOT, SEALED):
                if not (cur.set_range_dup(key, prefix) if prefix else cur.set_key(key)):
                    continue
                while cur.key() == key and cur.value().startswith(prefix):
                    cur.delete()
                    n += 1
        return n

    def commit(self) -> None:
        self._write_index()
        self.txn.commit()
        self._adopt_index()
        self.shard.after_commit()

    def abort(self) -> None:
        self._dx = self._topics = None
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
    does not exist (yet) reads as empty. Closed by its owner: it pins its pages. With the
    ``doc_log`` database (format 5), ``views`` reads (get, rows, entries, view_keys) see the
    document log overlaid, read once on first use."""

    __slots__ = ("txn", "_db", "_pool", "_index", "_logged", "_logged_slots", "_live", "_docs",
                 "_doc_keys", "_doc_db")

    def __init__(self, txn, dbs: dict, pool: dict | None = None, doc_log: bool = True):
        self.txn, self._db, self._pool = txn, dbs, pool or {}
        # the document log (format 5), read on first use when the snapshot has its database
        # and `doc_log`: ``views`` reads through get, rows, entries and view_keys overlay it
        # (query.py passes False and overlays its own index of the log)
        self._doc_db = dbs.get("doc_log") if doc_log else None
        self._docs: dict[bytes, bytes | None] | None = None
        self._doc_keys: list[bytes] | None = None  # its keys, sorted
        self._logged: dict[bytes, bytes] | None = None
        self._logged_slots: dict[bytes, list[tuple[bytes, bytes]]] | None = None
        raw = self.get("meta", b"dedup_index")
        self._index = [] if raw is None else _unpack(raw)
        self._live: dict[int, list[bytes]] | None = None  # dedup_rows: unsealed ids, sorted

    def _live_sorted(self) -> dict[int, list[bytes]]:
        """Per unsealed generation, its ids of dedup_live not yet under SEALED, sorted (read
        once, for dedup_rows' slot by slot calls)."""
        if self._live is None:
            below = dict(self._index)
            out: dict[int, set[bytes]] = {}
            for gen, ids in _live_entries(self.txn, self._db.get("dedup_live"), self._index):
                b = below[gen]
                out.setdefault(gen, set()).update(
                    k for k in (ids[i:i + LIVE_REC] for i in range(0, len(ids), LIVE_REC))
                    if key_slot(k) >= b)
            self._live = {g: sorted(ids) for g, ids in out.items()}
        return self._live

    def seq_topics(self) -> list[str]:
        raw = self.get("meta", b"seq_topics")
        return [] if raw is None else list(_unpack(raw))

    def dedup_rows(self, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """(S + identity hash, generation) of the dedup ids whose key starts with `prefix`:
        format 2's index, or format 1's ``dedup`` table (a shard being migrated)."""
        if "dedup" in self._db:
            for k, v in self.rows("dedup", prefix):
                yield bytes(k), parse_generation(v)
            return
        for gen, _ in self._index:
            db = self._pool.get(gen % DEDUP_POOL)
            if db is None:
                continue
            cur = self.txn.cursor(db=db)
            for key in (SEALED, HOT):
                if not (cur.set_range_dup(key, prefix) if prefix else cur.set_key(key)):
                    continue
                while cur.key() == key:
                    v = cur.value()
                    if not v.startswith(prefix):
                        break
                    yield bytes(v), gen
                    if not cur.next_dup():
                        break
            ids = self._live_sorted().get(gen)
            if ids:
                i = bisect.bisect_left(ids, prefix)
                while i < len(ids) and ids[i].startswith(prefix):
                    yield ids[i], gen
                    i += 1

    def get(self, table: str, key: bytes) -> bytes | None:
        db = self._db.get(table)
        if table == "views" and self._doc_db is not None:
            raw = self.doc_logged().get(key, _ABSENT)
            if raw is not _ABSENT:
                return raw
        return None if db is None else self.txn.get(key, db=db)

    def doc_logged(self) -> dict[bytes, bytes | None]:
        """{document key: latest record logged, None: deleted} of the documents logged since
        the last checkpoint (read once; empty without the log's database)."""
        if self._docs is None:
            self._docs = doc_log_rows(self.txn, self._doc_db)[0]
            self._doc_keys = sorted(self._docs)
        return self._docs

    def doc_log_after(self, after: int) -> Iterator[tuple[int, bytes]]:
        """(log key, record) of the ``doc_log`` records with key > after, in order."""
        db = self._db.get("doc_log")
        if db is None:
            return
        cur = self.txn.cursor(db=db)
        if not cur.set_range(_U64.pack(after + 1)):
            return
        for k, v in cur:
            yield _U64.unpack(k)[0], v

    def _doc_range(self, prefix: bytes, start: bytes | None) -> list[bytes]:
        """The logged document keys that start with `prefix` (and are >= `start`), sorted."""
        if not self.doc_logged():
            return []
        keys = self._doc_keys
        i = bisect.bisect_left(keys, prefix if start is None or start < prefix else start)
        j = i
        while j < len(keys) and keys[j].startswith(prefix):
            j += 1
        return keys[i:j]

    def _view_rows(self, prefix: bytes, start: bytes | None):
        """rows("views"): ``views`` merged with the logged documents (a deleted one left out,
        a logged one in place of its row), in key order."""
        docs = self.doc_logged()
        extra = self._doc_range(prefix, start)
        i, n = 0, len(extra)
        db = self._db.get("views")
        base = () if db is None else self._table_rows(db, prefix, start)
        for k, v in base:
            while i < n and extra[i] < k:
                raw = docs[extra[i]]
                if raw is not None:
                    yield extra[i], raw
                i += 1
            if i < n and extra[i] == k:
                raw = docs[extra[i]]
                if raw is not None:
                    yield extra[i], raw
                i += 1
            else:
                yield k, v
        for k in extra[i:]:
            raw = docs[k]
            if raw is not None:
                yield k, raw

    def seq_logged(self) -> dict[bytes, bytes]:
        """{seq key: SEQ_ROW} of the rows logged since the last checkpoint (read once)."""
        if self._logged is None:
            self._logged = seq_log_rows(self.txn, self._db.get("seq_log"))[0]
        return self._logged

    def seq_rows(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, SEQ_ROW) of the streams whose key starts with `prefix`, in key order:
        ``seq`` with the sequence log overlaid (what a worker reads)."""
        if len(prefix) == 2:  # a slot (the reshard): the logged rows indexed by slot once
            if self._logged_slots is None:
                self._logged_slots = {}
                for k, v in self.seq_logged().items():
                    self._logged_slots.setdefault(k[:2], []).append((k, v))
            extra = sorted(self._logged_slots.get(bytes(prefix), ()))
        else:
            extra = sorted((k, v) for k, v in self.seq_logged().items() if k.startswith(prefix))
        i = 0
        for k, v in self.rows("seq", prefix):
            k = bytes(k)
            while i < len(extra) and extra[i][0] < k:
                yield extra[i]
                i += 1
            if i < len(extra) and extra[i][0] == k:
                yield extra[i]
                i += 1
            else:
                yield k, bytes(v)
        yield from extra[i:]

    def seq_entries(self) -> int:
        """Streams in ``seq`` with the log overlaid."""
        seq = self._db.get("seq")
        logged = self.seq_logged()
        new = sum(1 for k in logged if seq is None or self.txn.get(k, db=seq) is None)
        return self.entries("seq") + new

    def rows(self, table: str, prefix: bytes = b"", start: bytes | None = None):
        """(key, value) of a table whose key starts with `prefix` (and is >= `start`), in
        key order (``changes``: a logged blob with its data put back, `resolved_change`)."""
        if table == "views" and self._doc_db is not None:
            yield from self._view_rows(prefix, start)
            return
        db = self._db.get(table)
        if db is None:
            return
        if table == "changes":
            log_db = self._db.get("doc_log")
            for k, v in self._table_rows(db, prefix, start):
                k = bytes(k)
                yield k, resolved_change(self.txn, log_db, k, v)
            return
        yield from self._table_rows(db, prefix, start)

    def _table_rows(self, db, prefix: bytes, start: bytes | None):
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
        """Rows of a table (``views``: the document log overlaid)."""
        db = self._db.get(table)
        if table == "views" and self._doc_db is not None and self.doc_logged():
            n = 0 if db is None else self.txn.stat(db)["entries"]
            for k, raw in self._docs.items():
                there = db is not None and self.txn.get(k, db=db) is not None
                n += (raw is not None) - there
            return n
        if db is None and table == "dedup":
            return sum(self.txn.stat(self._pool[g % DEDUP_POOL])["entries"]
                       for g, _ in self._index if g % DEDUP_POOL in self._pool) + _live_count(
                self.txn, self._db.get("dedup_live"), self._index)
        return 0 if db is None else self.txn.stat(db)["entries"]

    def dedup_entries(self) -> int:
        """Ids in the dedup index, from the databases this snapshot opened (format 2)."""
        return sum(self.txn.stat(db)["entries"] for name, db in self._db.items()
                   if name.startswith("dedup.") and db is not None) + _live_count(
            self.txn, self._db.get("dedup_live"), self._index)

    def entries_of(self) -> dict[str, int]:
        """Entries per database of this snapshot that exists (``seq``: the streams, the
        sequence log overlaid; ``seq_log``: its records; ``views``: the document log
        overlaid)."""
        out = {name: self.txn.stat(db)["entries"] for name, db in self._db.items()
               if db is not None}
        if "seq" in out and self._db.get("seq_log") is not None:
            out["seq"] = self.seq_entries()
        if "views" in out:
            out["views"] = self.entries("views")
        return out

    def names(self) -> list[str]:
        """The named databases of the shard (the main database's keys)."""
        return [bytes(k).decode() for k, _ in self.txn.cursor()]

    def view_keys(self, vid: int, after: bytes | None, limit: int,
                  serves: Callable[[int], bool] | None = None,
                  overlay: tuple[list[bytes], Callable[[bytes], bool]] | None = None
                  ) -> Iterator[bytes]:
        """Keys ``slot(2) + vid + key`` of live documents in LMDB order, strictly after
        ``after``, at most ``limit``; ``serves(slot)`` filters slots.

        ``overlay``: (sorted keys of logged documents, whether a logged one is live), which
        take the place of their ``views`` rows (query.py keeps its own from the document
        log); None: this snapshot's document log, if it has its database.
        """
        if limit <= 0:
            return
        if overlay is None and self._doc_db is not None and self.doc_logged():
            docs = self._docs

            def live(k: bytes) -> bool:
                raw = docs[k]
                return raw is not None and record_live(raw)
            overlay = (self._doc_keys, live)
        rows = self._view_rows_of(vid, after, serves)
        if overlay is None:
            n = 0
            for k, v in rows:
                if record_live(v):
                    yield k
                    n += 1
                    if n >= limit:
                        return
            return
        keys, live = overlay
        vb = bytes((vid,))
        start = bisect.bisect_right(keys, after) if after is not None else 0

        def pending() -> Iterator[bytes]:
            for i in range(start, len(keys)):
                k = keys[i]
                if len(k) >= 3 and k[2:3] == vb and (
                        serves is None or serves(int.from_bytes(k[:2], "big"))):
                    yield k
        pit = pending()
        p = next(pit, None)
        n = 0
        for k, v in rows:
            while p is not None and p < k:
                if live(p):
                    yield p
                    n += 1
                    if n >= limit:
                        return
                p = next(pit, None)
            if p is not None and p == k:
                ok = live(p)
                p = next(pit, None)
            else:
                ok = record_live(v)
            if ok:
                yield k
                n += 1
                if n >= limit:
                    return
        while p is not None:
            if live(p):
                yield p
                n += 1
                if n >= limit:
                    return
            p = next(pit, None)

    def _view_rows_of(self, vid: int, after: bytes | None,
                      serves: Callable[[int], bool] | None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of the ``views`` rows of view `vid` strictly after `after`, in LMDB
        order, of the slots `serves` takes.

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
        while found:
            k = cur.key()
            if len(k) < 3:
                found = cur.next()
                continue
            slot, kv = bytes(k[:2]), k[2]
            if kv == vid:
                if serves is None or serves(int.from_bytes(slot, "big")):
                    yield bytes(k), cur.value()
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


_READER_MAX_DBS = 16 + DEDUP_POOL  # >= the named databases above


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

    def snapshot(self, names: tuple[str, ...], buffers: bool = False,
                 doc_log: bool = True) -> Snapshot | None:
        """A read transaction over the databases `names` (one that does not exist reads as
        empty); None if the shard does not exist yet. The caller closes it. `buffers`:
        values as buffers into the map, valid until it closes; `doc_log`: see Snapshot."""
        env = self._open()
        if env is None:
            return None
        dbs = {name: self._db(env, name) for name in names}
        return Snapshot(self._retry_resized(env, lambda: env.begin(buffers=buffers)), dbs,
                        doc_log=doc_log)

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
