"""The dedup bloom filter saved next to its shard, so that a worker boots without reading the
whole dedup index (which took 0.8-1.8 s at 160k-190k ids, longer for a full window).

File ``bloom.snap`` in the shard directory::

    magic b"AGGBSNAP" | header length (4, LE) | msgpack {"token", "seq"} | BloomFilter.dumps()
    | crc32 of everything before it (4, LE)

written to ``bloom.snap.tmp``, fsynced, renamed over the old file, the directory fsynced.

A bloom filter may only err toward "maybe seen" (the exact LMDB index decides): an id missing
from it is applied twice, an extra id costs one index lookup. Why a saved filter never
misses an id:

1. every batch writes the ids it adds to the dedup index to the dedup log (store.py table
   ``dedup_log``, seq -> generation + ids) in its own transaction; meta ``dedup_log_seq`` is
   the last seq used;
2. the filter is saved between batches, after the commit of log seq S: it holds every id of
   seqs <= S (and maybe ids of rolled-back attempts: extras) and records ``seq`` = S;
3. the log is pruned only up to the ``seq`` of a file that is durable (fsync + rename), in a
   batch transaction that also sets meta ``dedup_log_pruned``;
4. at boot the file is used only if it is whole (crc), has the shard's ``token`` (meta
   ``shard_token``: not a file copied from another shard), ``dedup_log_pruned <= seq <=
   dedup_log_seq`` (not older than what was pruned, e.g. written late by a fenced worker; not
   newer than the shard, e.g. a data.mdb restored from a backup) and the configured filter
   parameters; the log entries after ``seq`` are then added to it. Anything else means the
   full rebuild from the dedup index, as before;
5. ids written to the dedup index outside batches (cluster-mode restores, changelog.py) are
   not logged: the worker deletes the file before such a write (`discard`) and saves a new
   one once its filter holds them.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import msgpack

from .datadir import fsync_dir

log = logging.getLogger(__name__)

FILE = "bloom.snap"
_MAGIC = b"AGGBSNAP"
_LEN = struct.Struct("<I")


class SnapshotUnusable(Exception):
    """The saved filter cannot be used (the message says why): rebuild from the index."""


def path_of(shard_dir: str | os.PathLike) -> Path:
    return Path(shard_dir) / FILE


def save(shard_dir: str | os.PathLike, bloom, token: str, seq: int) -> int:
    """Write the filter, durable once this returns; the bytes written."""
    head = msgpack.packb({"token": token, "seq": seq})
    body = b"".join((_MAGIC, _LEN.pack(len(head)), head, bloom.dumps()))
    data = body + _LEN.pack(zlib.crc32(body))
    path = path_of(shard_dir)
    tmp = path.with_name(FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(data)


def load(shard_dir: str | os.PathLike, bloom, token: str, pruned: int, last_seq: int) -> int:
    """Restore `bloom` from the saved file: the log seq it covers. Raises SnapshotUnusable
    (the filter unchanged) unless every check of the module docstring (4.) passes."""
    path = path_of(shard_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotUnusable("no saved filter") from None
    if len(data) < len(_MAGIC) + 8 or not data.startswith(_MAGIC):
        raise SnapshotUnusable("not a saved filter")
    body, crc = data[:-4], _LEN.unpack(data[-4:])[0]
    if zlib.crc32(body) != crc:
        raise SnapshotUnusable("checksum mismatch (torn or damaged file)")
    (n,) = _LEN.unpack_from(body, len(_MAGIC))
    start = len(_MAGIC) + 4
    try:
        head = msgpack.unpackb(body[start:start + n])
        mine, seq = head["token"], int(head["seq"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
        raise SnapshotUnusable(f"bad header ({e})") from None
    if mine != token:
        raise SnapshotUnusable("written for another shard")
    if seq < pruned:
        raise SnapshotUnusable(f"covers the dedup log to {seq}, pruned to {pruned} (stale)")
    if seq > last_seq:
        raise SnapshotUnusable(f"covers the dedup log to {seq}, beyond the shard's {last_seq}")
    try:
        bloom.restore(memoryview(body)[start + n:])
    except ValueError as e:
        raise SnapshotUnusable(str(e)) from None
    return seq


def discard(shard_dir: str | os.PathLike) -> bool:
    """Delete the saved filter (durably); True if there was one."""
    path = path_of(shard_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
