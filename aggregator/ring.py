"""Shared-memory transport between the supervisor and the worker processes.

Two primitives, both plain files in ``/dev/shm`` mapped with :mod:`mmap`:

* :class:`Ring` -- a single-producer / single-consumer ring of byte messages.
* :class:`SharedCounters` -- a small array of 64-bit unsigned counters (acks,
  heartbeats, epochs), one writer per slot.

Why not ``multiprocessing.shared_memory.SharedMemory``: on Python 3.11 every
``SharedMemory`` -- including one that merely *attaches* -- is registered with
``multiprocessing.resource_tracker``, which unlinks the segment and prints
"leaked shared_memory objects" warnings when the attaching process exits.
A plain ``open`` + ``mmap`` of ``/dev/shm/<name>`` is the same POSIX shared
memory (``shm_open`` is exactly that on Linux) without any tracker: nothing is
ever unlinked behind our back, and the owner (the supervisor) removes segments
explicitly with :meth:`Ring.unlink` / :func:`cleanup_stale`.

Segments are published atomically: they are created and initialised under a
temporary name (which still starts with the instance prefix, so
:func:`cleanup_stale` catches leftovers) and then hard-linked to the final
name, so :meth:`Ring.attach` never sees a half-initialised header.

Ring layout (all integers native = little-endian on the supported hosts)::

    offset   0  u64 magic b"AGGRING1", u64 layout version, u64 capacity,
                u64 data offset, u64 max message size
    offset 128  u64 head   -- bytes ever written   (producer-owned)
    offset 256  u64 tail   -- bytes ever consumed  (consumer-owned)
    offset 512  data area, ``capacity`` bytes (a power of two)

``head`` and ``tail`` sit on different cache lines (128 bytes apart, so the
adjacent-line prefetcher does not pair them either).  They are monotonic byte
counters that only ever increase; the position in the data area is
``counter & (capacity - 1)`` and ``head - tail`` is the number of used bytes.
Because ``head`` is only ever published on a message boundary, a restarted
consumer can resynchronise with ``tail := head`` (:meth:`Ring.reset_consumer`).

Each message is a frame: u32 length + payload, padded to a multiple of 8
bytes, so frames always start 8-byte aligned and at least 8 bytes remain
before the end of the data area.  When a frame does not fit before the end,
the producer writes the wrap marker ``0xFFFFFFFF`` as the length and the
frame starts again at offset 0 (the skipped bytes count as consumed by the
same message).  The largest payload is ``capacity // 2 - 4`` bytes, which
guarantees that an empty ring accepts any legal message wherever the indices
currently are.

Memory ordering: the producer copies the frame into the data area and only
then stores the new ``head``; the consumer loads ``head`` and only then reads
the frame, and copies the payload out before it stores the new ``tail``.
This relies on the x86-64 (TSO) memory model, where stores are not reordered
with other stores and loads are not reordered with other loads, plus the fact
that CPython executes each of these steps as a separate opaque C call.  The
8-byte counters are read and written through a ``memoryview`` cast to ``'Q'``,
which CPython implements as an aligned 8-byte ``memcpy`` -- a single, atomic
``mov`` on x86-64 (``struct`` with ``'<Q'`` writes byte by byte and must not
be used for them).  On weakly ordered CPUs (aarch64, POWER) this module would
need real release/acquire barriers (a small C helper); it is not safe there
as is.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import time
from typing import Self

import xxhash

__all__ = [
    "SHM_DIR",
    "Ring",
    "RingCorruptError",
    "SharedCounters",
    "cleanup_stale",
    "segment_prefix",
]

SHM_DIR = "/dev/shm"

_RING_MAGIC = int.from_bytes(b"AGGRING1", "little")
_CTRS_MAGIC = int.from_bytes(b"AGGCTRS1", "little")
_LAYOUT_VERSION = 1

# Ring header, in u64 slots of the header view.
_HDR_BYTES = 512
_Q_MAGIC, _Q_VERSION, _Q_CAPACITY, _Q_DATA_OFF, _Q_MAX_MSG = 0, 1, 2, 3, 4
_Q_HEAD = 128 // 8
_Q_TAIL = 256 // 8

_WRAP = 0xFFFFFFFF
_MIN_CAPACITY = 64
_MAX_CAPACITY = 1 << 32  # u32 frame lengths; max message is capacity // 2 - 4

# Waiting: spin this many checks, then sleep 50us doubling up to 2ms.
_SPIN_CHECKS = 200
_SLEEP_MIN = 50e-6
_SLEEP_MAX = 2e-3

_U64_MAX = (1 << 64) - 1


class RingCorruptError(RuntimeError):
    """The ring's indices or frames are inconsistent (should never happen)."""


# ---------------------------------------------------------------------------
# segment files


def _path(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or len(name) > 200:
        raise ValueError(f"invalid shared-memory segment name: {name!r}")
    return os.path.join(SHM_DIR, name)


def _create_segment(name: str, size: int, init) -> mmap.mmap:
    """Create ``/dev/shm/<name>`` of ``size`` bytes, run ``init(mm)`` on it,
    then publish it atomically.  Raises FileExistsError if the name exists."""
    final = _path(name)
    tmp = _path(f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            # Reserve the pages now: a full /dev/shm then fails here with
            # ENOSPC instead of a SIGBUS on some later write.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    try:
        init(mm)
        os.link(tmp, final)  # atomic; EEXIST if the name is taken
    except BaseException:
        mm.close()
        raise
    finally:
        _unlink_quiet(tmp)
    return mm


def _attach_segment(name: str) -> mmap.mmap:
    fd = os.open(_path(name), os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise ValueError(f"shared-memory segment {name!r} is empty")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def segment_prefix(data_dir: str) -> str:
    """``"agg-"`` + the first 12 hex digits of xxh3_64 of the data dir's
    absolute path (symlinks resolved, so one directory = one prefix)."""
    path = os.path.realpath(os.path.abspath(data_dir))
    return "agg-" + xxhash.xxh3_64_hexdigest(os.fsencode(path))[:12]


def cleanup_stale(prefix: str, keep: tuple[str, ...] = ()) -> list[str]:
    """Unlink every ``/dev/shm/<prefix>*`` segment but the names in ``keep``;
    return the names removed.

    Only call this when nothing live uses the prefix (the supervisor holds the
    data dir's exclusive lock).  Processes that still have a segment mapped
    keep their mapping; the memory is freed when the last one unmaps it.
    """
    if not prefix or "/" in prefix:
        raise ValueError(f"invalid segment prefix: {prefix!r}")
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for entry in names:
        if (entry.startswith(prefix) and entry not in keep
                and _unlink_quiet(os.path.join(SHM_DIR, entry))):
            removed.append(entry)
    removed.sort()
    return removed


# ---------------------------------------------------------------------------
# Ring


class Ring:
    """Single-producer single-consumer ring of byte messages in shared memory.

    Exactly one process (and one thread in it) may call the producer methods
    (:meth:`try_put`, :meth:`put`) and exactly one the consumer methods
    (:meth:`try_get`, :meth:`get_many`, :meth:`wait`, :meth:`reset_consumer`)
    at any time; there are no locks.
    Messages are copied in and copied out; nothing is pickled.
    """

    __slots__ = (
        "_base",
        "_cap",
        "_hdr",
        "_mask",
        "_max",
        "_mm",
        "_mv",
        "_name",
        "_u32",
    )

    def __init__(self, name: str, mm: mmap.mmap):
        self._name = name
        self._mm = mm
        if len(mm) < _HDR_BYTES + _MIN_CAPACITY:
            mm.close()
            raise ValueError(f"{name!r} is not a ring segment")
        mv = memoryview(mm)
        hdr = mv[:_HDR_BYTES].cast("Q")
        try:
            if hdr[_Q_MAGIC] != _RING_MAGIC:
                raise ValueError(f"{name!r} is not a ring segment")
            if hdr[_Q_VERSION] != _LAYOUT_VERSION:
                raise ValueError(f"ring {name!r} has layout version {hdr[_Q_VERSION]}")
            cap = hdr[_Q_CAPACITY]
            base = hdr[_Q_DATA_OFF]
            if cap & (cap - 1) or base != _HDR_BYTES or len(mm) != base + cap:
                raise ValueError(f"ring {name!r} has an inconsistent header")
        except BaseException:
            hdr.release()
            mv.release()
            mm.close()
            raise
        self._mv = mv
        self._hdr = hdr
        self._u32 = mv[base : base + cap].cast("I")
        self._cap = cap
        self._mask = cap - 1
        self._max = hdr[_Q_MAX_MSG]
        self._base = base

    # -- construction -------------------------------------------------------

    @classmethod
    def create(cls, name: str, capacity: int) -> Ring:
        """Create a new ring segment; ``capacity`` is rounded up to a power of
        two (minimum 64 bytes, maximum 4 GiB).  Raises FileExistsError if the
        name is taken."""
        capacity = int(capacity)
        if capacity <= 0 or capacity > _MAX_CAPACITY:
            raise ValueError(f"ring capacity out of range: {capacity}")
        cap = max(_MIN_CAPACITY, 1 << (capacity - 1).bit_length())

        def init(mm: mmap.mmap) -> None:
            with memoryview(mm) as mv, mv[:_HDR_BYTES].cast("Q") as hdr:
                hdr[_Q_VERSION] = _LAYOUT_VERSION
                hdr[_Q_CAPACITY] = cap
                hdr[_Q_DATA_OFF] = _HDR_BYTES
                hdr[_Q_MAX_MSG] = cap // 2 - 4
                hdr[_Q_HEAD] = 0
                hdr[_Q_TAIL] = 0
                hdr[_Q_MAGIC] = _RING_MAGIC

        return cls(name, _create_segment(name, _HDR_BYTES + cap, init))

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Map an existing ring.  Attaching never registers anything for
        cleanup: closing or exiting leaves the segment in place."""
        return cls(name, _attach_segment(name))

    # -- producer -----------------------------------------------------------

    def try_put(self, payload) -> bool:
        """Append one message; False (nothing written) if there is not enough
        free space.  ValueError if it can never fit (> :attr:`max_message`)."""
        n = payload.nbytes if type(payload) is memoryview else len(payload)
        if n > self._max:
            raise ValueError(
                f"message of {n} bytes exceeds the ring's max message size {self._max}"
            )
        hdr = self._hdr
        head = hdr[_Q_HEAD]
        frame = (n + 11) & ~7
        cap = self._cap
        off = head & self._mask
        room = cap - off
        if frame <= room:
            if head + frame - hdr[_Q_TAIL] > cap:
                return False
        else:
            # Skip the rest of the data area and start over at offset 0.
            if head + room + frame - hdr[_Q_TAIL] > cap:
                return False
            self._u32[off >> 2] = _WRAP
            head += room
            off = 0
        self._u32[off >> 2] = n
        start = self._base + off + 4
        self._mm[start : start + n] = payload
        # Publish only after the frame is fully written (x86-64 TSO: the
        # stores above become visible before this one).
        hdr[_Q_HEAD] = head + frame
        return True

    def put(self, payload, timeout: float | None = None) -> bool:
        """Like :meth:`try_put` but waits (short, growing sleeps) for space.
        Returns False if ``timeout`` seconds pass first; None waits forever."""
        if self.try_put(payload):
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _SLEEP_MIN
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                time.sleep(min(delay, left))
            else:
                time.sleep(delay)
            if self.try_put(payload):
                return True
            delay = min(delay * 2, _SLEEP_MAX)

    # -- consumer -----------------------------------------------------------

    def _corrupt(self, what: str, tail: int, head: int) -> RingCorruptError:
        return RingCorruptError(
            f"ring {self._name!r}: {what} (tail={tail}, head={head}, capacity={self._cap})"
        )

    def try_get(self) -> bytes | None:
        """Remove and return the oldest message (a copy), or None if empty."""
        hdr = self._hdr
        tail = hdr[_Q_TAIL]
        head = hdr[_Q_HEAD]
        if tail == head:
            return None
        off = tail & self._mask
        u32 = self._u32
        n = u32[off >> 2]
        if n == _WRAP:
            tail += self._cap - off
            off = 0
            n = u32[0]
        frame = (n + 11) & ~7
        if n > self._max or tail + frame > head or off + frame > self._cap:
            raise self._corrupt(f"bad frame length {n}", tail, head)
        start = self._base + off + 4
        msg = self._mm[start : start + n]
        hdr[_Q_TAIL] = tail + frame  # after the copy: the space may be reused now
        return msg

    def get_many(self, max_messages: int, max_bytes: int | None = None) -> list[bytes]:
        """Remove and return up to ``max_messages`` messages (copies), oldest
        first.  With ``max_bytes``, stop before the payloads would exceed it
        (but always return at least one message if any is available).  The
        tail is published once, after the whole batch is copied out."""
        hdr = self._hdr
        tail = hdr[_Q_TAIL]
        head = hdr[_Q_HEAD]
        out: list[bytes] = []
        if tail == head or max_messages <= 0:
            return out
        u32 = self._u32
        mm = self._mm
        cap = self._cap
        mask = self._mask
        base = self._base + 4
        limit = self._max
        budget = max_bytes
        append = out.append
        while tail != head:
            off = tail & mask
            n = u32[off >> 2]
            skip = 0
            if n == _WRAP:
                skip = cap - off
                off = 0
                n = u32[0]
            frame = (n + 11) & ~7
            if n > limit or tail + skip + frame > head or off + frame > cap:
                hdr[_Q_TAIL] = tail
                raise self._corrupt(f"bad frame length {n}", tail, head)
            if budget is not None:
                if n > budget and out:
                    break
                budget -= n
            start = base + off
            append(mm[start : start + n])
            tail += skip + frame
            if len(out) >= max_messages:
                break
        hdr[_Q_TAIL] = tail
        return out

    def wait(self, timeout: float) -> bool:
        """True as soon as at least one message is available, False after
        ``timeout`` seconds.  Spins briefly, then sleeps 50us doubling to 2ms:
        low latency when busy, little CPU when idle."""
        hdr = self._hdr
        for _ in range(_SPIN_CHECKS):
            if hdr[_Q_HEAD] != hdr[_Q_TAIL]:
                return True
        if timeout <= 0:
            return False
        deadline = time.monotonic() + timeout
        delay = _SLEEP_MIN
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return hdr[_Q_HEAD] != hdr[_Q_TAIL]
            time.sleep(min(delay, left))
            if hdr[_Q_HEAD] != hdr[_Q_TAIL]:
                return True
            delay = min(delay * 2, _SLEEP_MAX)

    def reset_consumer(self) -> int:
        """Consumer side: discard everything currently in the ring (tail :=
        head).  Used by a restarted consumer; ``head`` is always on a message
        boundary, so the next message read is a complete one.  Returns the
        number of bytes discarded."""
        hdr = self._hdr
        head = hdr[_Q_HEAD]
        dropped = head - hdr[_Q_TAIL]
        hdr[_Q_TAIL] = head
        return dropped

    def reset(self) -> None:
        """Owner only, with no producer or consumer active: empty the ring and
        set both counters back to 0."""
        hdr = self._hdr
        hdr[_Q_TAIL] = 0
        hdr[_Q_HEAD] = 0

    # -- introspection ------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def capacity(self) -> int:
        """Size of the data area in bytes (a power of two)."""
        return self._cap

    @property
    def max_message(self) -> int:
        """Largest payload :meth:`try_put` accepts (``capacity // 2 - 4``)."""
        return self._max

    @property
    def used_bytes(self) -> int:
        """Bytes occupied by unread frames (headers, padding, wrap gaps)."""
        hdr = self._hdr
        tail = hdr[_Q_TAIL]
        return hdr[_Q_HEAD] - tail

    @property
    def free_bytes(self) -> int:
        return self._cap - self.used_bytes

    @property
    def fill(self) -> float:
        return self.used_bytes / self._cap

    @property
    def head(self) -> int:
        """Producer counter: total bytes ever written (monotonic)."""
        return self._hdr[_Q_HEAD]

    @property
    def tail(self) -> int:
        """Consumer counter: total bytes ever consumed (monotonic)."""
        return self._hdr[_Q_TAIL]

    # -- lifetime -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Unmap (detach).  Never removes the segment.  Idempotent."""
        if self._mm is None:
            return
        self._u32.release()
        self._hdr.release()
        self._mv.release()
        self._mm.close()
        self._mm = None

    def unlink(self) -> None:
        """Remove the segment name (owner only).  Mappings that exist stay
        valid until closed.  Missing is not an error."""
        _unlink_quiet(_path(self._name))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._mm is None:
            return f"<Ring {self._name!r} closed>"
        return f"<Ring {self._name!r} capacity={self._cap} used={self.used_bytes}>"


# ---------------------------------------------------------------------------
# SharedCounters

_CTR_STRIDE = 8  # u64 slots per counter: one 64-byte cache line each
_CTR_HDR_Q = 8  # header: u64 magic, u64 version, u64 n, padding to 64 bytes


class SharedCounters:
    """An array of 64-bit unsigned counters in shared memory.

    Each counter sits on its own cache line.  Reads and writes of one counter
    are single aligned 8-byte accesses (atomic on x86-64), so readers never
    see a torn value.  :meth:`add` is a plain read-modify-write, NOT atomic
    across processes: every slot must have a single writer (e.g. worker ``i``
    writes its own ack/heartbeat slot, the supervisor writes the epochs).
    """

    __slots__ = ("_mm", "_mv", "_n", "_name", "_q")

    def __init__(self, name: str, mm: mmap.mmap):
        self._name = name
        self._mm = mm
        mv = memoryview(mm)
        try:
            if len(mm) % 64 or len(mm) < 64:
                raise ValueError(f"{name!r} is not a counters segment")
            q = mv.cast("Q")
        except BaseException:
            mv.release()
            mm.close()
            raise
        n = q[2]
        if q[0] != _CTRS_MAGIC or q[1] != _LAYOUT_VERSION or len(mm) != 64 * (n + 1):
            q.release()
            mv.release()
            mm.close()
            raise ValueError(f"{name!r} is not a counters segment")
        self._mv = mv
        self._q = q
        self._n = n

    @classmethod
    def create(cls, name: str, n: int) -> SharedCounters:
        """Create ``n`` counters, all 0.  FileExistsError if the name is taken."""
        n = int(n)
        if n < 0:
            raise ValueError(f"counter count must be >= 0: {n}")

        def init(mm: mmap.mmap) -> None:
            with memoryview(mm) as mv, mv.cast("Q") as q:
                q[1] = _LAYOUT_VERSION
                q[2] = n
                q[0] = _CTRS_MAGIC

        return cls(name, _create_segment(name, 64 * (n + 1), init))

    @classmethod
    def attach(cls, name: str) -> SharedCounters:
        return cls(name, _attach_segment(name))

    def _slot(self, i: int) -> int:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"counter index out of range: {i}")
        return _CTR_HDR_Q + i * _CTR_STRIDE

    def get(self, i: int) -> int:
        return self._q[self._slot(i)]

    def set(self, i: int, v: int) -> None:
        if not 0 <= v <= _U64_MAX:
            raise ValueError(f"counter value out of range: {v}")
        self._q[self._slot(i)] = v

    def add(self, i: int, d: int = 1) -> int:
        """``counter[i] += d``; returns the new value.  Single writer per slot
        only (not an atomic RMW).  ValueError if the result leaves 0..2**64-1."""
        s = self._slot(i)
        v = self._q[s] + d
        if not 0 <= v <= _U64_MAX:
            raise ValueError(f"counter value out of range: {v}")
        self._q[s] = v
        return v

    def snapshot(self) -> list[int]:
        """All counters (each read atomically, not as one consistent cut)."""
        q = self._q
        return [q[_CTR_HDR_Q + i * _CTR_STRIDE] for i in range(self._n)]

    def __len__(self) -> int:
        return self._n

    @property
    def name(self) -> str:
        return self._name

    def close(self) -> None:
        """Unmap (detach); never removes the segment.  Idempotent."""
        if self._mm is None:
            return
        self._q.release()
        self._mv.release()
        self._mm.close()
        self._mm = None

    def unlink(self) -> None:
        """Remove the segment name (owner only).  Missing is not an error."""
        _unlink_quiet(_path(self._name))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SharedCounters {self._name!r} n={self._n}>"
