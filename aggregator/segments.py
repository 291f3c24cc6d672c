"""Who owns an instance's shared-memory segments, and removing those whose owner is gone.

An instance's segments are `/dev/shm/<prefix>*` (`ring.segment_prefix`: the hash of its data
dir). A supervisor that exits unlinks them; one that is SIGKILLed cannot, and an instance
started again on the same data dir removes them (`ring.cleanup_stale`, under the data dir's
LOCK). An instance replaced on a fresh disk never starts there again: without this module its
segments (about 67 MB with 2 workers) stay until reboot.

The owner file `/dev/shm/<prefix>.owner` says who owns a prefix: JSON `{"pid", "start",
"data_dir"}`, `start` being field 22 of `/proc/<pid>/stat` (the process's start time in clock
ticks since boot), so that a pid reused by another process is told apart.

Invariants:
- A supervisor holds an exclusive `flock` on its owner file from before it removes or creates
  any segment of its prefix until after it unlinked the last one (`SegmentOwner`). The lock
  goes with the process, whatever kills it.
- `sweep_orphans` (run by every supervisor at start, whatever its data dir) removes a
  prefix's segments only while it holds that owner file's lock *and* the recorded owner is
  gone (no such pid, a zombie, or a pid with another start time). It unlinks the owner file
  last, still holding the lock.
- A new owner of the prefix takes the same lock first and checks that the file it locked is
  still the linked one (else a sweep removed it: it opens the new name again). So a sweep and
  a start on the same data dir never interleave: a sweep never removes a live owner's segment.
- Segments of a prefix without an owner file (a version before this one, a test's own rings)
  are never touched by a sweep.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time

from .ring import SHM_DIR

log = logging.getLogger(__name__)

OWNER_SUFFIX = ".owner"
_OWNER_NAME = re.compile(r"^(agg-[0-9a-f]{12})\.owner$")
_LOCK_WAIT_S = 10.0  # a sweep holds a lock for milliseconds; a live owner never shares one


class SegmentOwnerError(RuntimeError):
    """The owner file of a prefix could not be taken."""


def owner_path(prefix: str) -> str:
    return os.path.join(SHM_DIR, prefix + OWNER_SUFFIX)


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time, clock ticks since boot), or None if there is
    no such process or it is a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()  # the name may hold spaces and parentheses
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # fields[0] is field 3 (state)


def owner_alive(record: dict) -> bool:
    """Whether the process an owner record names still runs (same pid, same start time)."""
    pid, start = record.get("pid"), record.get("start")
    if not isinstance(pid, int) or not isinstance(start, int):
        return False
    return process_start_time(pid) == start


def _read_record(fd: int) -> dict | None:
    try:
        rec = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _still_linked(fd: int, path: str) -> bool:
    try:
        cur = os.stat(path)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino)


class SegmentOwner:
    """This process's claim on a prefix (see the module docstring)."""

    def __init__(self, prefix: str, fd: int):
        self.prefix, self.fd, self.path = prefix, fd, owner_path(prefix)

    @classmethod
    def acquire(cls, prefix: str, data_dir: str) -> SegmentOwner:
        """Lock the prefix's owner file (waiting out a sweep that holds it) and record this
        process in it. Call before removing or creating any segment of the prefix."""
        path = owner_path(prefix)
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise SegmentOwnerError(f"{path} stays locked by another process") from None
                time.sleep(0.01)
                continue
            if _still_linked(fd, path):
                break
            os.close(fd)  # a sweep unlinked it while we waited: take the new one
        start = process_start_time(os.getpid())
        record = json.dumps({"pid": os.getpid(), "start": start, "data_dir": data_dir})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return cls(prefix, fd)

    def release(self) -> None:
        """After the last segment is unlinked: remove the owner file, then let go of it."""
        if self.fd < 0:
            return
        try:
            if _still_linked(self.fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(self.fd)
            self.fd = -1


def sweep_orphans(keep: str) -> dict[str, dict]:
    """Remove the segments of every prefix (but `keep`, this instance's) whose owner is gone;
    returns {prefix: its owner record + "removed": [names]} for those swept."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return {}
    swept = {}
    for entry in entries:
        m = _OWNER_NAME.match(entry)
        if m is None or m.group(1) == keep:
            continue
        rec = _sweep_one(m.group(1))
        if rec is not None:
            swept[m.group(1)] = rec
    return swept


def _sweep_one(prefix: str) -> dict | None:
    path = owner_path(prefix)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # its owner runs (or another sweep is at it)
        if not _still_linked(fd, path):
            return None  # swept or released meanwhile
        rec = _read_record(fd)
        if rec is None or owner_alive(rec):
            # no record: an owner between creating the file and writing it (or one that
            # died there, before it created any segment): left alone
            return None
        removed = []
        for entry in sorted(os.listdir(SHM_DIR)):
            if entry.startswith(prefix) and entry != prefix + OWNER_SUFFIX:
                try:
                    os.unlink(os.path.join(SHM_DIR, entry))
                    removed.append(entry)
                except FileNotFoundError:
                    pass
        os.unlink(path)  # last, still holding the lock
        return {**rec, "removed": removed}
    finally:
        os.close(fd)
