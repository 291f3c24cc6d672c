"""The supervisor↔worker contract: shared-memory segments, ring messages, records, exit codes.

Everything both sides (and the tests and benches that play one side) must agree on lives
here, so that neither imports the other to learn it.

Segments (created by the supervisor, `create_segments`, before any worker starts; attached
by the workers, the HTTP server and the CLI by name, `ring_names`/`hist_segment_name`):

- ``{prefix}-ctl``: the control block (control.py), one row per worker;
- ``{prefix}-s{w}``: supervisor → worker w, records (``service.ring_bytes``);
- ``{prefix}-p{a}-{b}``: worker a → worker b, forwarded view updates (`peer_ring_bytes`);
- ``{prefix}-hist``: the commit-latency histogram (metrics.record_commit has the row layout).

Ring messages are msgpack arrays (`pack`/`unpack`), the first element their kind:

- ``[MSG_RECORDS, batch id, through-offsets, records]``: supervisor → worker. The
  through-offsets ``[[topic index, partition, offset], ...]`` are the last offsets of the
  round, whatever worker their records went to; only the last message of a round carries
  them (`frame_records`). The worker acknowledges the highest batch id it committed
  (control block, Slot.ACK_BATCH).
- ``[MSG_FORWARD, from worker, link seq, [update, ...]]``: worker → worker (peer ring).
- ``[MSG_RESTORE, request id, [task, ...]]``, ``[MSG_DROP, request id, [task, ...]]``:
  cluster mode, supervisor → worker (task_worker.py).
- ``[MSG_STOP]``: supervisor → worker: commit what came before, then exit 0.

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


def through_list(through: dict) -> list:
    """The through-offsets of a round, {(topic index, partition): offset}, as framed."""
    return [[ti, p, o] for (ti, p), o in through.items()]


class Forwarded:
    """The part of an event a view update needs, as carried between shards.

    Update layout: [feed id, view key, slot, id, source, type, time, subject, sequence, data,
    partitionkey, topic index, partition, offset] (the ``UPD_*`` constants).
    """

    __slots__ = ("id", "source", "type", "time", "subject", "sequence", "data", "partitionkey",
                 "origin")

    def __init__(self, u):
        (_, _, _, self.id, self.source, self.type, self.time, self.subject,
         self.sequence, self.data, self.partitionkey) = u[:UPD_ORIGIN]
        self.origin = u[UPD_ORIGIN:UPDATE_FIELDS]

    def record(self) -> list:
        """A dead-letter record for this update: the event in structured JSON mode."""
        attrs = {"specversion": "1.0", "id": self.id, "source": self.source, "type": self.type,
                 "time": self.time, "subject": self.subject, "partitionkey": self.partitionkey,
                 "sequence": None if self.sequence is None else str(self.sequence),
                 "data": self.data}
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
