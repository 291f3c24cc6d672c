"""Route-and-frame (supervisor) and the frame reader (worker), compiled or pure Python.

The supervisor of normal mode hands each `consume()` batch to a `FrameRouter`: for every
record it finds the routing key (the rules of envelope.routing_key, or the input mapping's
`route` for a non-CloudEvents source), hashes it to a slot (routing.slot_of) and appends
the record's binary frame (protocol.py has the format) to its worker's buffer; then it cuts
each worker's buffer into ring messages. The worker turns a frames message back into the
list the rest of it reads (`decode`; `decode_lazy`, the worker's: its records made as they
are read).

``aggregator._frames`` is the compiled implementation; `FrameRouterRef` below and
protocol.read_frames are the readable reference, run when ``AGGREGATOR_PURE_CORE=1``
selects the pure-Python core (core.py), and the tests compare the two byte for byte.

Routing is exactly what it was before frames: routing_key with its default `max_bytes`
(1 MiB), so a structured event is scanned for its ``partitionkey`` up to 1 MiB whatever
``service.max_record_bytes`` says (a larger record keeps routing by its Kafka key); records
over ``max_record_bytes`` are not routed but returned as oversized (dead-lettered).
"""

from __future__ import annotations

from . import core
from .envelope import routing_key
from .protocol import FRAMES_MAGIC, frame_messages, pack_frame, read_frames, unpack
from .routing import SLOTS, slot_of

__all__ = ["IMPLEMENTATION", "FrameRouter", "FrameRouterRef", "Round", "decode", "decode_lazy",
           "read", "read_lazy"]


class Round:
    """What a consume round gave: per worker its ring messages (batch ids from the
    `next_bids` given, the last message carries the through-offsets), the through-offsets
    {(topic index, partition): offset}, records per topic index, the error events, and the
    records over `max_bytes` ([topic index, partition, offset, key, value, headers])."""

    __slots__ = ("messages", "through", "counts", "errors", "oversized")

    def __init__(self, messages: list, through: dict, counts: list, errors: list,
                 oversized: list) -> None:
        self.messages = messages
        self.through = through
        self.counts = counts
        self.errors = errors
        self.oversized = oversized


class FrameRouterRef:
    """The reference route-and-frame step (see the module docstring).

    `tindex`: topic name → topic index; `detect`: per topic index, its source reads
    structured = "detect"; `route_fns`: per topic index None (a CloudEvents source) or a
    function (value, headers, key) → routing key or None (an input mapping's route)."""

    def __init__(self, workers: int, tindex: dict, detect: list, route_fns: list,
                 max_bytes: int) -> None:
        self.workers = workers
        self.tindex = tindex
        self.detect = list(detect)
        self.route_fns = list(route_fns)
        self.max_bytes = max_bytes

    def route(self, msgs: list, next_bids: list, max_message: int) -> Round:
        n, max_bytes = self.workers, self.max_bytes
        per: list[list] = [[] for _ in range(n)]
        through: dict = {}
        counts = [0] * len(self.detect)
        errors: list = []
        oversized: list = []
        for m in msgs:
            err = m.error()
            if err is not None:
                errors.append(err)
                continue
            ti = self.tindex[m.topic()]
            counts[ti] += 1
            part, off = m.partition(), m.offset()
            through[(ti, part)] = off
            value, key, headers = m.value(), m.key(), m.headers()
            if value is not None and len(value) > max_bytes:
                oversized.append([ti, part, off, key, value, headers])
                continue
            fn = self.route_fns[ti]
            rk = (routing_key(value, headers, key, detect=self.detect[ti]) if fn is None
                  else fn(value, headers, key))
            slot = slot_of(rk) if rk is not None else 0
            per[slot % n].append(pack_frame(ti, part, off, key, value, headers,
                                            m.timestamp()[1], slot))
        thr = [[ti, p, o] for (ti, p), o in through.items()]
        messages = [frame_messages(per[w], thr, next_bids[w], max_message) if through else []
                    for w in range(n)]
        return Round(messages, through, counts, errors, oversized)


assert SLOTS == 4096  # the compiled router hashes modulo 4096

if core.IMPLEMENTATION == "python":
    FrameRouter = FrameRouterRef
    read = read_lazy = read_frames
    IMPLEMENTATION = "python"
else:
    from ._frames import FrameRouter  # noqa: F401 - re-exported
    from ._frames import read_frames as read
    from ._frames import read_frames_lazy as read_lazy

    IMPLEMENTATION = "cython"


def decode(msg) -> list:
    """A supervisor → worker ring message as a list: frames (`read`) or msgpack."""
    return read(msg) if msg[0] == FRAMES_MAGIC else unpack(msg)


def decode_lazy(msg) -> list:
    """`decode`, but a frames message's records are a sequence that makes each record when
    it is read (compiled: `_frames.FrameRecords`; the message is checked whole first, with
    `read`'s errors), so the worker makes a pass's records right before the pass."""
    return read_lazy(msg) if msg[0] == FRAMES_MAGIC else unpack(msg)
