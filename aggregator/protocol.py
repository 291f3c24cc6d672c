"""The supervisor↔worker contract: shared-memory segments, ring messages, records, exit codes.

Everything both sides (and the tests and benches that play one side) must agree on lives
here, so that neither imports the other to learn it.

Segments (created by the supervisor, `create_segments`, before any worker starts; attached
by the workers, the HTTP server and the CLI by name, `ring_names`/`hist_segment_name`):

- ``{prefix}-ctl``: the control block (control.py), one row per worker;
- ``{prefix}-s{w}``: supervisor → worker w, records (``service.ring_bytes``);
- ``{prefix}-p{a}-{b}``: worker a → worker b, forwarded view updates (`peer_ring_bytes`);
- ``{prefix}-hist``: the commit-latency histogram (metrics.record_commit has the row layout).

Ring messages are msgpack arrays (`pack`/`unpack`), the first element their kind, except
the records message of normal mode, which is binary frames (below):

- ``[MSG_RECORDS, batch id, through-offsets, records]``: supervisor → worker. The
  through-offsets ``[[topic index, partition, offset], ...]`` are the last offsets of the
  round, whatever worker their records went to; only the last message of a round carries
  them (`frame_records`). The worker acknowledges the highest batch id it committed
  (control block, Slot.ACK_BATCH).
- ``[MSG_FORWARD, from worker, link seq, [update, ...]]``: worker → worker (peer ring).
- ``[MSG_RESTORE, request id, [task, ...]]``, ``[MSG_DROP, request id, [task, ...]]``:
  cluster mode, supervisor → worker (task_worker.py).
- ``[MSG_STOP]``: supervisor → worker: commit what came before, then exit 0.

Frames (normal mode's records message; its first byte, `FRAMES_MAGIC` = 0xC1, is one no
msgpack message starts with). Little-endian, no padding:

- message head (`FRAMES_HEAD`, 24 bytes): magic u8, version u8 (`FRAMES_VERSION`), 0 u16,
  record count u32, batch id i64, through-offset count u32, 0 u32;
- the through-offsets (`FRAMES_THROUGH`, 16 bytes each): topic index i32, partition i32,
  offset i64;
- one frame per record: a fixed head (`FRAME_HEAD`, 44 bytes): frame length u32 (head
  included), topic index i32, partition i32, slot u16, 0 u16, offset i64, timestamp i64, key
  length i32, value length i32, header count i32 (-1 for None: no key, value, header list),
  then the key bytes, the value bytes, and per header (`FRAME_HEADER`, 8 bytes) name length
  i32, value length i32 (-1: None), name (UTF-8; a name that is not UTF-8 travels as
  ``surrogateescape`` decodes it), value.

A reader turns a frames message into the msgpack message's list, `read_frames` here
(struct-based: the reference) or its compiled twin (frames.py chooses), with each header
a ``(name, value)`` tuple. The supervisor writes frames with frames.FrameRouter; tests and
benches that play the supervisor with records at hand use `frame_messages`.

Records are positional lists (no object per record on the hot path); the field positions are
the ``REC_*`` constants: 8 fields in normal mode, 10 in cluster mode (the tasks-topic task
and offset after the origin's fields; a forwarded update there is ``[-1, task, task offset,
None, packed update, ...]``). A forwarded view update is a list of 14, the ``UPD_*``
constants (`Forwarded`).

Exit codes of a worker process: 0 stopped, 1 crashed (respawned), `FATAL_EXIT` (not
respawned: the service stops), `FENCED_EXIT` (a newer worker of the shard booted).
"""

from __future__ import annotations

import json
import struct

import msgpack

from .control import ControlBlock
from .ring import Ring, SharedCounters

# ---- ring message kinds -----------------------------------------------------------------
MSG_RECORDS = 1
MSG_FORWARD = 2
MSG_RESTORE = 3  # cluster mode: [3, request id, [task, ...]] restore these tasks, then own them
MSG_DROP = 4  # cluster mode: [4, request id, [task, ...]] delete these tasks' state
MSG_STOP = 9

# ---- worker exit codes ------------------------------------------------------------------
FATAL_EXIT = 3  # the supervisor does not respawn a worker that exits with this code
FENCED_EXIT = 4  # a newer worker of this shard booted: this one stopped without writing

# ---- record fields (supervisor → worker) ------------------------------------------------
REC_TOPIC = 0  # topic index: position in the config's topics (cluster: -1 = a forward)
REC_PARTITION = 1
REC_OFFSET = 2
REC_KEY = 3  # Kafka key (bytes or None)
REC_VALUE = 4  # Kafka value (bytes or None)
REC_HEADERS = 5  # [(name, bytes), ...] or None
REC_TIMESTAMP = 6  # Kafka timestamp, ms
REC_SLOT = 7  # routing slot of the partition key (routing.slot_of)
REC_TASK = 8  # cluster mode: the tasks-topic partition
REC_TASK_OFFSET = 9  # cluster mode: the offset in that partition
RECORD_FIELDS = 8
TASK_RECORD_FIELDS = 10

# ---- forwarded view update fields (worker → worker, or through the tasks topic) ---------
UPD_FEED = 0  # feed id (plan.Feed.feed_id)
UPD_KEY = 1  # view key
UPD_SLOT = 2  # slot of the view key
UPD_ID = 3
UPD_SOURCE = 4
UPD_TYPE = 5
UPD_TIME = 6
UPD_SUBJECT = 7
UPD_SEQUENCE = 8
UPD_DATA = 9
UPD_PARTITIONKEY = 10
UPD_ORIGIN = 11  # 11, 12, 13: topic index, partition, offset of the event's record
UPDATE_FIELDS = 14

# ---- forwarded updates, format 2 (forwards.py has the layout) ---------------------------
FORWARD_MAGIC = 0xC7  # a format 1 message starts with 0x94 (a msgpack array of 4)
FORWARD_VERSION = 2
FORWARD_HEAD = struct.Struct("<BBHIqII")  # magic, version, 0, from, link seq, count, 0
FORWARD_UPDATE = struct.Struct("<IHHiiqqi")  # feed, slot, flags, topic, part, offset, seq, 0
FORWARD_NO_SEQUENCE = 1  # flag: the update's sequence is None

# ---- framing ----------------------------------------------------------------------------
pack = msgpack.Packer(use_bin_type=True).pack


def unpack(b):
    return msgpack.unpackb(b, raw=False, strict_map_key=False, use_list=True)


def frame_records(packer, records: list, thr: list, first_bid: int, max_message: int):
    """(batch id, message, is last) for one worker's records of a consume round: one
    ``MSG_RECORDS`` message, or halves until each fits `max_message`. Batch ids count from
    `first_bid`; only the last message carries the through-offsets `thr`."""
    pack_ = packer.pack
    pending = [records]
    bid = first_bid
    while pending:
        chunk = pending.pop(0)
        last = not pending
        msg = pack_([MSG_RECORDS, bid, thr if last else [], chunk])
        if len(msg) > max_message and len(chunk) > 1:
            mid = len(chunk) // 2
            pending[:0] = [chunk[:mid], chunk[mid:]]
            continue
        yield bid, msg, last
        bid += 1


FRAMES_MAGIC = 0xC1  # never the first byte of a msgpack message
FRAMES_VERSION = 1
FRAMES_HEAD = struct.Struct("<BBHIqII")
FRAMES_THROUGH = struct.Struct("<iiq")
FRAME_HEAD = struct.Struct("<IiiHHqqiii")
FRAME_HEADER = struct.Struct("<ii")
_NONE_LEN = -1


def pack_frame(ti: int, part: int, off: int, key, value, headers, ts: int, slot: int) -> bytes:
    """One record's frame (the module docstring has the layout)."""
    parts = [b"", b"" if key is None else bytes(key), b"" if value is None else bytes(value)]
    if headers is not None:
        for name, hv in headers:
            nb = name.encode("utf-8", "surrogateescape")
            vb = b"" if hv is None else bytes(hv)
            parts.append(FRAME_HEADER.pack(len(nb), _NONE_LEN if hv is None else len(vb)))
            parts.append(nb)
            parts.append(vb)
    size = FRAME_HEAD.size + sum(len(p) for p in parts)
    parts[0] = FRAME_HEAD.pack(
        size, ti, part, slot, 0, off, ts, _NONE_LEN if key is None else len(parts[1]),
        _NONE_LEN if value is None else len(parts[2]),
        _NONE_LEN if headers is None else len(headers))
    return b"".join(parts)


def frame_messages(frames: list, thr: list, first_bid: int, max_message: int) -> list:
    """One worker's frames of a round as ring messages: as many frames per message as fit in
    `max_message` with the through-offsets' room kept (a frame alone may not fit; at least one
    message, even without frames). Batch ids count from `first_bid`; only the last message
    carries the through-offsets `thr` ([[topic index, partition, offset], ...])."""
    room = max_message - FRAMES_HEAD.size - FRAMES_THROUGH.size * len(thr)
    chunks: list = [[]]
    size = 0
    for f in frames:
        if chunks[-1] and size + len(f) > room:
            chunks.append([])
            size = 0
        chunks[-1].append(f)
        size += len(f)
    out = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        t = thr if last else ()
        head = FRAMES_HEAD.pack(FRAMES_MAGIC, FRAMES_VERSION, 0, len(chunk), first_bid + i,
                                len(t), 0)
        out.append(b"".join([head, *(FRAMES_THROUGH.pack(*x) for x in t), *chunk]))
    return out


def read_frames(msg) -> list:
    """A frames message as ``[MSG_RECORDS, batch id, through-offsets, records]``, the
    records REC_* lists (the reference reader; ValueError if the message is malformed)."""
    mv = memoryview(msg).cast("B")
    if len(mv) < FRAMES_HEAD.size:
        raise ValueError("frames message: truncated head")
    magic, version, _, count, bid, nthr, _ = FRAMES_HEAD.unpack_from(mv, 0)
    if magic != FRAMES_MAGIC or version != FRAMES_VERSION:
        raise ValueError(f"frames message: magic {magic:#x} version {version}")
    pos = FRAMES_HEAD.size
    if pos + nthr * FRAMES_THROUGH.size > len(mv):
        raise ValueError("frames message: truncated through-offsets")
    thr = []
    for _ in range(nthr):
        thr.append(list(FRAMES_THROUGH.unpack_from(mv, pos)))
        pos += FRAMES_THROUGH.size
    records = []
    for _ in range(count):
        if pos + FRAME_HEAD.size > len(mv):
            raise ValueError("frames message: truncated frame head")
        size, ti, part, slot, _, off, ts, klen, vlen, hcount = FRAME_HEAD.unpack_from(mv, pos)
        end = pos + size
        if size < FRAME_HEAD.size or end > len(mv):
            raise ValueError("frames message: bad frame length")
        p = pos + FRAME_HEAD.size

        def take(n):
            nonlocal p
            if n == _NONE_LEN:
                return None
            if n < 0 or p + n > end:
                raise ValueError("frames message: field beyond its frame")
            b = bytes(mv[p:p + n])
            p += n
            return b

        key = take(klen)
        value = take(vlen)
        headers = None
        if hcount != _NONE_LEN:
            if hcount < 0:
                raise ValueError("frames message: bad header count")
            headers = []
            for _ in range(hcount):
                if p + FRAME_HEADER.size > end:
                    raise ValueError("frames message: field beyond its frame")
                nlen, hvlen = FRAME_HEADER.unpack_from(mv, p)
                p += FRAME_HEADER.size
                name = take(nlen)
                if name is None:
                    raise ValueError("frames message: header without a name")
                headers.append((name.decode("utf-8", "surrogateescape"), take(hvlen)))
        if p != end:
            raise ValueError("frames message: frame length does not match its fields")
        records.append([ti, part, off, key, value, headers, ts, slot])
        pos = end
    if pos != len(mv):
        raise ValueError("frames message: bytes after the last frame")
    return [MSG_RECORDS, bid, thr, records]


def through_list(through: dict) -> list:
    """The through-offsets of a round, {(topic index, partition): offset}, as framed."""
    return [[ti, p, o] for (ti, p), o in through.items()]


class Forwarded:
    """The part of an event a view update needs, as carried between shards.

    Update layout: [feed id, view key, slot, id, source, type, time, subject, sequence, data,
    partitionkey, topic index, partition, offset] (the ``UPD_*`` constants).
    `raw`: None, or the msgpack bytes of the whole data when `data` holds only the top-level
    fields the feed's merge ops read (forwards.py, the compiled reader): the dead-letter
    record still carries the whole event.
    """

    __slots__ = ("id", "source", "type", "time", "subject", "sequence", "data", "partitionkey",
                 "origin", "raw")

    def __init__(self, u):
        (_, _, _, self.id, self.source, self.type, self.time, self.subject,
         self.sequence, self.data, self.partitionkey) = u[:UPD_ORIGIN]
        self.origin = u[UPD_ORIGIN:UPDATE_FIELDS]
        self.raw = None

    def record(self) -> list:
        """A dead-letter record for this update: the event in structured JSON mode."""
        attrs = {"specversion": "1.0", "id": self.id, "source": self.source, "type": self.type,
                 "time": self.time, "subject": self.subject, "partitionkey": self.partitionkey,
                 "sequence": None if self.sequence is None else str(self.sequence),
                 "data": self.data if self.raw is None else unpack(self.raw)}
        value = json.dumps({k: v for k, v in attrs.items() if v is not None},
                           default=repr).encode()
        ti, part, off = self.origin
        return [ti, part, off, (self.partitionkey or "").encode(), value,
                [("content-type", b"application/cloudevents+json")]]


# ---- segments ---------------------------------------------------------------------------
PEER_RING_DIVISOR = 4  # worker→worker rings are a quarter of the supervisor→worker ring
# commit-latency histogram: bucket upper bounds in ms (metrics.record_commit: the row)
COMMIT_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
HIST_SLOTS = len(COMMIT_BUCKETS_MS) + 2  # per worker: buckets, +Inf, sum in µs


def ring_names(prefix: str, workers: int) -> dict:
    """Names of the control block and the rings of a service with `workers` workers."""
    return {
        "control": f"{prefix}-ctl",
        "inbound": [f"{prefix}-s{w}" for w in range(workers)],
        "peer": {(a, b): f"{prefix}-p{a}-{b}" for a in range(workers) for b in range(workers)
                 if a != b},
    }


def hist_segment_name(prefix: str) -> str:
    """Name of the commit-latency histogram segment (removed with the prefix's others)."""
    return f"{prefix}-hist"


def peer_ring_bytes(ring_bytes: int, max_record_bytes: int) -> int:
    """Size of a worker→worker ring: room for a few of the largest updates."""
    return max(ring_bytes // PEER_RING_DIVISOR, 4 * max_record_bytes + (1 << 20))


class Segments:
    """The shared-memory segments of one service instance (see the module docstring)."""

    __slots__ = ("prefix", "ctl", "hist", "inbound", "peer")

    def __init__(self, prefix: str, ctl: ControlBlock, hist: SharedCounters,
                 inbound: list, peer: dict) -> None:
        self.prefix = prefix
        self.ctl = ctl
        self.hist = hist
        self.inbound: list[Ring] = inbound  # per worker
        self.peer: dict[tuple[int, int], Ring] = peer  # (from, to) -> ring

    @property
    def rings(self) -> list[Ring]:
        return self.inbound + list(self.peer.values())

    def close(self, unlink: bool = True) -> None:
        """Close every segment (and remove it: the creator's part)."""
        for seg in [*self.rings, self.hist, self.ctl.counters]:
            seg.close()
            if unlink:
                seg.unlink()

    def __enter__(self) -> Segments:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_segments(prefix: str, workers: int, ring_bytes: int, peer_bytes: int) -> Segments:
    """Create the control block, the histogram and the rings for `workers` workers."""
    names = ring_names(prefix, workers)
    ctl = ControlBlock.create(names["control"], workers)
    hist = SharedCounters.create(hist_segment_name(prefix), workers * HIST_SLOTS)
    inbound = [Ring.create(name, ring_bytes) for name in names["inbound"]]
    peer = {ab: Ring.create(name, peer_bytes) for ab, name in names["peer"].items()}
    return Segments(prefix, ctl, hist, inbound, peer)
