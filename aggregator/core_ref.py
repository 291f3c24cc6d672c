"""Pure-Python reference twin of the compiled core (``aggregator._core``).

Same API and bit-identical behaviour as the Cython module; it is the readable specification
of the hot path and the fallback a developer can force with ``AGGREGATOR_PURE_CORE=1``
(see ``aggregator.core``). Tests run every case over both implementations and compare.

Two objects live here:

``BloomFilter``
    A generational bloom filter used to drop duplicate event ids. Items arrive as
    pre-computed hash pairs (h1, h2) — the two uint64 halves of xxh3_128 — packed into a
    buffer in native byte order. Item bit indices are ``(h1 + j*h2) mod 2**64 mod m`` for
    ``j in range(k)`` (Kirsch–Mitzenmacher double hashing with uint64 wrap-around).

``SequenceGate``
    Per-key ordering of events by a sequence number: decides for each event whether to
    apply it, drop it as stale, park it until the gap before it is filled, or report that
    the parking space is full. Keys are bytes of at most ``GATE_KEY_MAX`` bytes (the
    compiled gate stores them in fixed-size table entries).

``gate_keys``
    The gate keys of a batch, ``routing.slot_prefix(slot) + routing.gate_hash(source, pk)``.

``json_lossless``
    Whether a document that orjson encodes without error decodes back to itself (no NaN or
    infinite float, no tuple, bounded nesting): doc_codec.py's check of JSON-exact documents.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Iterable

import xxhash

__all__ = [
    "APPLY",
    "FULL",
    "GATE_KEY_MAX",
    "JSON_DEPTH",
    "PARK",
    "STALE",
    "BloomFilter",
    "SequenceGate",
    "bloom_size",
    "dedup_keys",
    "gate_batch",
    "gate_keys",
    "json_lossless",
]

APPLY = 0
STALE = 1
PARK = 2
FULL = 3
GATE_KEY_MAX = 22  # longest gate key (a slot prefix + a gate hash is 18)

_MASK64 = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def _int64(value: object, what: str) -> int:
    """Return ``value`` as an int in the C ``long long`` range (the compiled core's type)."""
    v = operator.index(value)
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise OverflowError(f"{what} out of int64 range: {v}")
    return v


def bloom_size(capacity: int, fp_rate: float) -> tuple[int, int]:
    """Return ``(bits, hash_count)`` of one bloom generation for ``capacity`` items.

    ``bits = ceil(-n ln p / ln(2)**2)`` rounded up to a multiple of 64 and
    ``hash_count = round(bits / n * ln 2)``, at least 1.
    """
    capacity = operator.index(capacity)
    fp_rate = float(fp_rate)
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if not 0.0 < fp_rate < 1.0:
        raise ValueError(f"fp_rate must be in (0, 1), got {fp_rate}")
    bits = math.ceil(-capacity * math.log(fp_rate) / (math.log(2) ** 2))
    bits = (bits + 63) // 64 * 64
    hash_count = max(1, round(bits / capacity * math.log(2)))
    return bits, hash_count


def _byte_view(obj: object) -> memoryview:
    """View any C-contiguous buffer as unsigned bytes (like ``PyBUF_SIMPLE``)."""
    mv = memoryview(obj)
    if not mv.c_contiguous:
        raise BufferError("buffer is not C-contiguous")
    return mv.cast("B")


def _pairs(hashes: object) -> memoryview:
    """View a hash-pair buffer as native uint64 values h1, h2, h1, h2, ..."""
    raw = _byte_view(hashes)
    if len(raw) % 16:
        raise ValueError(
            f"hash buffer length {len(raw)} is not a multiple of 16 bytes (uint64 pairs)"
        )
    return raw.cast("Q")


class BloomFilter:
    """Generational bloom filter over pre-hashed items (see the module docstring).

    Each generation is a standard bloom filter sized for ``capacity`` items at ``fp_rate``.
    At most ``generations`` generations are live; the bit arrays of all of them are
    allocated up front, so memory is fixed at ``generations * bits_per_generation`` bits.
    A lookup reports an item as maybe present if any live generation holds it, so with
    several full generations the false-positive rate is up to ``generations * fp_rate``.
    """

    def __init__(
        self,
        capacity: int,
        fp_rate: float = 0.01,
        generations: int = 3,
        *,
        start_generation: int = 0,
    ) -> None:
        bits, k = bloom_size(capacity, fp_rate)
        generations = operator.index(generations)
        if generations < 1:
            raise ValueError(f"generations must be >= 1, got {generations}")
        self._capacity = operator.index(capacity)
        self._fp_rate = float(fp_rate)
        self._max_gens = generations
        self._m = bits
        self._k = k
        self._nbytes = bits // 8
        # Fixed pool of bit arrays; live generations occupy slots.
        self._slots = [bytearray(self._nbytes) for _ in range(generations)]
        self._free = list(range(generations - 1, 0, -1))  # slot 0 taken below
        # Live generations, oldest first: [generation id, slot, count].
        self._live: list[list[int]] = [[_int64(start_generation, "generation"), 0, 0]]

    # ----------------------------------------------------------------- properties
    @property
    def capacity(self) -> int:
        """Items per generation the filter is sized for."""
        return self._capacity

    @property
    def fp_rate(self) -> float:
        """Configured false-positive rate of one generation at capacity."""
        return self._fp_rate

    @property
    def generations(self) -> int:
        """Maximum number of live generations."""
        return self._max_gens

    @property
    def generation(self) -> int:
        """Id of the current generation (the one items are added to)."""
        return self._live[-1][0]

    @property
    def oldest_generation(self) -> int:
        """Id of the oldest live generation."""
        return self._live[0][0]

    @property
    def live_generations(self) -> list[int]:
        """Ids of the live generations, oldest first."""
        return [g[0] for g in self._live]

    @property
    def count(self) -> int:
        """Items added to the current generation."""
        return self._live[-1][2]

    @property
    def full(self) -> bool:
        """True when the current generation holds ``capacity`` items or more."""
        return self._live[-1][2] >= self._capacity

    @property
    def bits_per_generation(self) -> int:
        """Size of one generation's bit array, in bits (a multiple of 64)."""
        return self._m

    @property
    def hash_count(self) -> int:
        """Number of bit indices per item (k)."""
        return self._k

    @property
    def memory_bytes(self) -> int:
        """Bytes of bit arrays held (all generation slots, allocated up front)."""
        return self._nbytes * self._max_gens

    # ----------------------------------------------------------------- internals
    def _indices(self, h1: int, h2: int) -> list[int]:
        m = self._m
        out = []
        h = h1
        for _ in range(self._k):
            out.append(h % m)
            h = (h + h2) & _MASK64
        return out

    @staticmethod
    def _has(bits: bytearray, idx: list[int]) -> bool:
        for b in idx:
            if not (bits[b >> 3] >> (b & 7)) & 1:
                return False
        return True

    @staticmethod
    def _set(bits: bytearray, idx: list[int]) -> None:
        for b in idx:
            bits[b >> 3] |= 1 << (b & 7)

    def _insert(self, entry: list[int], hashes: object) -> None:
        q = _pairs(hashes)
        bits = self._slots[entry[1]]
        for i in range(0, len(q), 2):
            self._set(bits, self._indices(q[i], q[i + 1]))
            entry[2] += 1

    # ----------------------------------------------------------------- batch API
    def check_and_add(self, hashes: object) -> bytearray:
        """Flag each item (1 = maybe seen before, in any live generation, including
        earlier in this batch; 0 = new), then add it to the current generation.

        ``hashes`` is a buffer of native uint64 pairs; every item increments ``count``.
        """
        q = _pairs(hashes)
        n = len(q) // 2
        out = bytearray(n)
        cur = self._live[-1]
        cur_bits = self._slots[cur[1]]
        older = [self._slots[e[1]] for e in reversed(self._live[:-1])]
        for i in range(n):
            idx = self._indices(q[2 * i], q[2 * i + 1])
            seen = self._has(cur_bits, idx)
            if not seen:
                self._set(cur_bits, idx)
                for bits in older:
                    if self._has(bits, idx):
                        seen = True
                        break
            out[i] = seen
            cur[2] += 1
        return out

    def contains(self, hashes: object) -> bytearray:
        """Flag each item: 1 if maybe present in any live generation, else 0."""
        q = _pairs(hashes)
        n = len(q) // 2
        out = bytearray(n)
        gens = [self._slots[e[1]] for e in reversed(self._live)]
        for i in range(n):
            idx = self._indices(q[2 * i], q[2 * i + 1])
            for bits in gens:
                if self._has(bits, idx):
                    out[i] = 1
                    break
        return out

    def add(self, hashes: object) -> None:
        """Add every item to the current generation."""
        self._insert(self._live[-1], hashes)

    def load(self, generation: int, hashes: object) -> int:
        """Add items to generation ``generation``, creating it if it is not live.

        Used to rebuild the filter at boot from the stored index. A new generation must
        be newer than the current one (ValueError otherwise); creating it may drop the
        oldest live generation. Returns the dropped generation id, or -1.
        """
        gen = _int64(generation, "generation")
        _pairs(hashes)  # validate before changing anything
        for entry in self._live:
            if entry[0] == gen:
                self._insert(entry, hashes)
                return -1
        if gen < self._live[-1][0]:
            raise ValueError(
                f"generation {gen} is not live and older than the current generation "
                f"{self._live[-1][0]}; load generations in increasing order"
            )
        dropped = self._new_generation(gen)
        self._insert(self._live[-1], hashes)
        return dropped

    def rotate(self) -> int:
        """Start generation ``generation + 1``.

        Returns the id of the generation dropped to stay within ``generations``, or -1.
        """
        cur = self._live[-1][0]
        if cur == _INT64_MAX:
            raise OverflowError("generation id overflow")
        return self._new_generation(cur + 1)

    def _new_generation(self, gen: int) -> int:
        dropped = -1
        if len(self._live) == self._max_gens:
            old = self._live.pop(0)
            dropped = old[0]
            self._slots[old[1]][:] = bytes(self._nbytes)
            self._free.append(old[1])
        self._live.append([gen, self._free.pop(), 0])
        return dropped

    # ----------------------------------------------------------------- snapshots
    def dumps(self) -> bytes:
        """The filter as bytes (see `_SNAP_HEAD`): its parameters, the live generations
        (id, count) oldest first, then their bit arrays. `restore` reads it back."""
        out = [_SNAP_HEAD.pack(_SNAP_MAGIC, _SNAP_VERSION, self._capacity, self._fp_rate,
                               self._max_gens, self._k, self._m, len(self._live))]
        out += [_SNAP_GEN.pack(gen, count) for gen, _, count in self._live]
        out += [bytes(self._slots[slot]) for _, slot, _ in self._live]
        return b"".join(out)

    def restore(self, data: object) -> None:
        """Replace the filter's content with a `dumps` of a filter of the same parameters
        (capacity, fp_rate, generations); ValueError if they differ or `data` is malformed
        (the filter is then left unchanged)."""
        view = _byte_view(data)
        nlive, gens = _snapshot_layout(view, self._capacity, self._fp_rate, self._max_gens,
                                       self._k, self._m)
        base = _SNAP_HEAD.size + nlive * _SNAP_GEN.size
        for i in range(self._max_gens):
            if i < nlive:
                off = base + i * self._nbytes
                self._slots[i][:] = view[off:off + self._nbytes]
            else:
                self._slots[i][:] = bytes(self._nbytes)
        self._live = [[gen, i, count] for i, (gen, count) in enumerate(gens)]
        self._free = list(range(self._max_gens - 1, nlive - 1, -1))

    def __repr__(self) -> str:
        return (
            f"BloomFilter(capacity={self._capacity}, fp_rate={self._fp_rate}, "
            f"generations={self._max_gens}, live={self.live_generations}, count={self.count})"
        )


# Snapshot layout (little-endian): magic, version, capacity, fp_rate, generations, k,
# bits per generation, live generations; then (id, count) per live generation, oldest first;
# then their bit arrays (bits // 8 bytes each; bit b is bit b % 8 of byte b // 8).
_SNAP_HEAD = struct.Struct("<4sIQdIIQI")
_SNAP_GEN = struct.Struct("<qQ")
_SNAP_MAGIC = b"AGBF"
_SNAP_VERSION = 1


def _snapshot_layout(view, capacity: int, fp_rate: float, generations: int, k: int,
                     m: int) -> tuple[int, list[tuple[int, int]]]:
    """Check a snapshot against a filter's parameters: (live count, [(id, count)])."""
    if len(view) < _SNAP_HEAD.size:
        raise ValueError("bloom snapshot: truncated header")
    magic, version, cap, fp, gens, kk, mm, nlive = _SNAP_HEAD.unpack_from(view, 0)
    if magic != _SNAP_MAGIC or version != _SNAP_VERSION:
        raise ValueError(f"bloom snapshot: not a snapshot (magic {magic!r}, version {version})")
    if (cap, fp, gens, kk, mm) != (capacity, fp_rate, generations, k, m):
        raise ValueError(f"bloom snapshot: made for capacity={cap}, fp_rate={fp}, "
                         f"generations={gens} (k={kk}, bits={mm}), not capacity={capacity}, "
                         f"fp_rate={fp_rate}, generations={generations}")
    if not 1 <= nlive <= generations:
        raise ValueError(f"bloom snapshot: {nlive} live generations")
    if len(view) != _SNAP_HEAD.size + nlive * (_SNAP_GEN.size + m // 8):
        raise ValueError(f"bloom snapshot: {len(view)} bytes, not the size its header says")
    live = [_SNAP_GEN.unpack_from(view, _SNAP_HEAD.size + i * _SNAP_GEN.size)
            for i in range(nlive)]
    if any(a[0] >= b[0] for a, b in zip(live, live[1:])):
        raise ValueError("bloom snapshot: generation ids not increasing")
    return nlive, live


def gate_keys(
    slots: Iterable[int], sources: Iterable[str], partitionkeys: Iterable[str]
) -> list[bytes]:
    """Gate keys of a batch: ``slot.to_bytes(2, "big") + xxh3_128(f"{source}\\0{pk}")``
    per event, i.e. ``routing.slot_prefix(slot) + routing.gate_hash(source, pk)``.

    One call per batch; returns a list of 18-byte ``bytes``. ValueError if the three
    sequences differ in length, OverflowError for a slot outside 0..65535, TypeError for a
    source or partition key that is not a str.
    """
    slots, sources, partitionkeys = list(slots), list(sources), list(partitionkeys)
    n = len(slots)
    if len(sources) != n or len(partitionkeys) != n:
        raise ValueError(
            f"slots, sources and partitionkeys differ in length: "
            f"{n}, {len(sources)}, {len(partitionkeys)}"
        )
    keys = []
    for slot, source, pk in zip(slots, sources, partitionkeys):
        slot = _int64(slot, "slot")
        if not 0 <= slot <= 0xFFFF:
            raise OverflowError(f"slot out of range 0..65535: {slot}")
        for s in (source, pk):
            if not isinstance(s, str):
                raise TypeError(f"expected str, not {type(s).__name__}")
        joined = source.encode() + b"\x00" + pk.encode()
        keys.append(slot.to_bytes(2, "big") + xxhash.xxh3_128_digest(joined))
    return keys


def dedup_keys(events: Iterable, slot_index: int) -> tuple[list[bytes], bytes]:
    """Dedup keys of a batch of ``(event, record)`` pairs: per pair
    ``routing.slot_prefix(record[slot_index]) + routing.identity_hash(event.source,
    event.id)`` (the gate key's layout, over the event id), and the 16-byte hashes joined
    (the bloom filter's input, and the dedup log's when every id is new).

    One call per batch; returns (list of 18-byte ``bytes``, ``bytes`` of 16 * n).
    OverflowError for a slot outside 0..65535, TypeError for a source or id not a str.
    """
    keys = []
    for ev, rec in events:
        slot = _int64(rec[slot_index], "slot")
        if not 0 <= slot <= 0xFFFF:
            raise OverflowError(f"slot out of range 0..65535: {slot}")
        source, event_id = ev.source, ev.id
        for s in (source, event_id):
            if not isinstance(s, str):
                raise TypeError(f"expected str, not {type(s).__name__}")
        joined = source.encode() + b"\x00" + event_id.encode()
        keys.append(slot.to_bytes(2, "big") + xxhash.xxh3_128_digest(joined))
    return keys, b"".join(k[2:] for k in keys)


def gate_batch(events: Iterable, slot_index: int, topic_index: int, partition_index: int,
               topics: list[str], strict: list) -> tuple:
    """The sequence gate's inputs of a batch of ``(event, record)`` pairs, for the events
    with a sequence (``event.sequence is not None``), in one call: returns
    ``(at, gkeys, seqs, topic_ix, modes, streams)`` —

    - ``at``: their positions in `events`;
    - ``gkeys``: their gate keys, ``gate_keys`` of (record[slot_index], event.source,
      event.partitionkey);
    - ``seqs``: their sequences; ``topic_ix``: their record[topic_index];
    - ``modes``: ``bytes`` of strict[topic index] per event (SequenceGate.decide's `strict`);
    - ``streams``: ``(topics[topic index], record[partition_index])`` per event.

    Errors as gate_keys; IndexError for a topic index outside `topics`/`strict`,
    ValueError for a strict value outside 0..255.
    """
    gated = [(i, ev, rec) for i, (ev, rec) in enumerate(events) if ev.sequence is not None]
    streams = [(topics[rec[topic_index]], rec[partition_index]) for _, _, rec in gated]
    gkeys = gate_keys([rec[slot_index] for _, _, rec in gated],
                      [ev.source for _, ev, _ in gated],
                      [ev.partitionkey for _, ev, _ in gated])
    tix = [rec[topic_index] for _, _, rec in gated]
    return ([i for i, _, _ in gated], gkeys, [ev.sequence for _, ev, _ in gated], tix,
            bytes(strict[t] for t in tix), streams)


class _KeyState:
    """Gate state of one key: last applied sequence and parked sequences."""

    __slots__ = ("last", "parked", "oldest_at", "oldest_stale", "dirty")

    def __init__(self, last: int) -> None:
        self.last = last
        self.parked: dict[int, float] = {}  # seq -> parked_at
        self.oldest_at = 0.0
        self.oldest_stale = False
        self.dirty = False


class SequenceGate:
    """Per-key sequence gating (decisions ``APPLY``, ``STALE``, ``PARK``, ``FULL``).

    Keys (``bytes``) must be loaded before they are decided: ask ``missing()`` which keys
    the gate does not hold, read their state from storage and ``load()`` it. The gate
    holds ``last`` (last applied sequence) and the parked sequences of every key; the
    caller persists ``last`` from ``dirty()`` and the parked payloads itself.

    Invariant: every parked sequence is greater than ``last + 1`` (a latest-mode event may
    jump ``last`` past parked sequences; those become stale and ``skip_gap`` discards them).
    """

    def __init__(self, max_parked_per_key: int, max_parked_total: int) -> None:
        self._max_per_key = _int64(max_parked_per_key, "max_parked_per_key")
        self._max_total = _int64(max_parked_total, "max_parked_total")
        if self._max_per_key < 0 or self._max_total < 0:
            raise ValueError("parking limits must be >= 0")
        self._states: dict[bytes, _KeyState] = {}
        self._parking: dict[bytes, _KeyState] = {}  # keys with parked seqs
        self._dirty: dict[bytes, _KeyState] = {}
        self._parked_total = 0

    # ----------------------------------------------------------------- properties
    @property
    def max_parked_per_key(self) -> int:
        """Parking bound per key."""
        return self._max_per_key

    @property
    def max_parked_total(self) -> int:
        """Parking bound over all keys."""
        return self._max_total

    @property
    def parked_total(self) -> int:
        """Number of parked sequences over all keys."""
        return self._parked_total

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, gkey: object) -> bool:
        return gkey in self._states

    # ----------------------------------------------------------------- loading
    def missing(self, gkeys: Iterable[bytes]) -> list[bytes]:
        """Distinct keys of ``gkeys`` (first-seen order) the gate holds no state for."""
        states = self._states
        seen: set[bytes] = set()
        out = []
        for g in gkeys:
            if g not in states and g not in seen:
                seen.add(g)
                out.append(g)
        return out

    def load(self, gkey: bytes, last: int, parked: Iterable[tuple[int, float]] = ()) -> None:
        """Set the state of ``gkey``: ``last`` applied sequence and ``(seq, parked_at)``
        pairs. Parked sequences ``<= last`` are stale and ignored. Replaces any state held
        for the key (and forgets that it was dirty).
        """
        if type(gkey) is not bytes:
            raise TypeError(f"gkey must be bytes, not {type(gkey).__name__}")
        if len(gkey) > GATE_KEY_MAX:
            raise ValueError(f"gate key of {len(gkey)} bytes; at most {GATE_KEY_MAX}")
        st = _KeyState(_int64(last, "last"))
        for seq, at in parked:
            s = _int64(seq, "parked sequence")
            at = float(at)
            if s > st.last:
                st.parked[s] = at
        self._forget(gkey)
        self._states[gkey] = st
        if st.parked:
            st.oldest_stale = True
            self._parking[gkey] = st
            self._parked_total += len(st.parked)

    def _forget(self, gkey: bytes) -> None:
        old = self._states.pop(gkey, None)
        if old is not None:
            self._parked_total -= len(old.parked)
            self._parking.pop(gkey, None)
            self._dirty.pop(gkey, None)

    # ----------------------------------------------------------------- decisions
    def decide(
        self, gkeys: list[bytes], seqs: list[int], strict: bytes, now: float
    ) -> tuple[bytearray, list[tuple[int, bytes, int]]]:
        """Decide events in order; returns ``(codes, ready)``.

        ``strict[i]`` (a byte buffer) selects strict (non-zero) or latest (0) mode for
        event i. ``ready`` lists ``(i, gkey, seq)`` parked events that became applicable
        right after event i, in apply order. Every key must be loaded (KeyError); on an
        error, the events before the failing one have been decided.
        """
        if type(gkeys) is not list:
            gkeys = list(gkeys)
        if type(seqs) is not list:
            seqs = list(seqs)
        flags = _byte_view(strict)
        n = len(gkeys)
        if len(seqs) != n or len(flags) != n:
            raise ValueError(
                f"gkeys, seqs and strict differ in length: {n}, {len(seqs)}, {len(flags)}"
            )
        now = float(now)
        codes = bytearray(n)
        ready: list[tuple[int, bytes, int]] = []
        states = self._states
        for i in range(n):
            g = gkeys[i]
            st = states[g]
            s = _int64(seqs[i], "sequence")
            last = st.last
            if s <= last:
                codes[i] = STALE
            elif not flags[i]:  # latest mode
                st.last = s
                self._mark(g, st)
            elif st.parked and s in st.parked:
                codes[i] = STALE
            elif s == last + 1:
                st.last = s
                self._mark(g, st)
                if st.parked:
                    self._drain(g, st, i, ready)
            elif len(st.parked) < self._max_per_key and self._parked_total < self._max_total:
                codes[i] = PARK
                self._park(g, st, s, now)
            else:
                codes[i] = FULL
        return codes, ready

    def _mark(self, g: bytes, st: _KeyState) -> None:
        if not st.dirty:
            st.dirty = True
            self._dirty[g] = st

    def _park(self, g: bytes, st: _KeyState, s: int, now: float) -> None:
        if not st.parked:
            self._parking[g] = st
            st.oldest_at = now
            st.oldest_stale = False
        elif not st.oldest_stale and now < st.oldest_at:
            st.oldest_at = now
        st.parked[s] = now
        self._parked_total += 1

    def _unpark(self, g: bytes, st: _KeyState, s: int) -> None:
        del st.parked[s]
        self._parked_total -= 1
        if not st.parked:
            del self._parking[g]
        else:
            st.oldest_stale = True

    def _drain(self, g: bytes, st: _KeyState, i: int, ready: list) -> None:
        while st.parked and st.last + 1 in st.parked:
            st.last += 1
            self._unpark(g, st, st.last)
            ready.append((i, g, st.last))

    # ----------------------------------------------------------------- gaps
    def expired(self, now: float, timeout: float) -> list[bytes]:
        """Keys whose oldest parked event was parked at or before ``now - timeout``."""
        limit = float(now) - float(timeout)
        out = []
        for g, st in self._parking.items():
            if st.oldest_stale:
                st.oldest_at = min(st.parked.values())
                st.oldest_stale = False
            if st.oldest_at <= limit:
                out.append(g)
        return out

    def skip_gap(self, gkey: bytes) -> list[int]:
        """Give up on the gap before the parked sequences of ``gkey``: set ``last`` to
        ``min(parked) - 1`` and apply the contiguous run of parked sequences from there.

        Returns the sequences applied, in order (they are no longer parked); empty if
        nothing is parked. Stale parked sequences (``<= last``) are discarded first.
        """
        st = self._states[gkey]
        if not st.parked:
            return []
        for s in sorted(st.parked):
            if s > st.last:
                break
            self._unpark(gkey, st, s)
        if not st.parked:
            return []
        st.last = min(st.parked) - 1
        out: list = []
        self._drain(gkey, st, 0, out)
        self._mark(gkey, st)
        return [r[2] for r in out]

    def drop_parked(self, gkey: bytes) -> list[int]:
        """Remove every parked sequence of ``gkey``; returns them ascending and sets
        ``last = max(last, max(them))`` (dead-letter policy)."""
        st = self._states[gkey]
        if not st.parked:
            return []
        out = sorted(st.parked)
        self._parked_total -= len(out)
        st.parked.clear()
        del self._parking[gkey]
        if out[-1] > st.last:
            st.last = out[-1]
            self._mark(gkey, st)
        return out

    # ----------------------------------------------------------------- inspection
    def parked(self, gkey: bytes) -> list[int]:
        """Parked sequences of ``gkey``, ascending."""
        return sorted(self._states[gkey].parked)

    def last(self, gkey: bytes) -> int:
        """Last applied sequence of ``gkey``."""
        return self._states[gkey].last

    def dirty(self) -> list[tuple[bytes, int]]:
        """``(gkey, last)`` of keys whose ``last`` changed since the previous call, in the
        order they first changed; clears the dirty set."""
        out = []
        for g, st in self._dirty.items():
            st.dirty = False
            out.append((g, st.last))
        self._dirty.clear()
        return out

    # ----------------------------------------------------------------- housekeeping
    def clear(self) -> None:
        """Forget every key (e.g. after an aborted transaction)."""
        self._states.clear()
        self._parking.clear()
        self._dirty.clear()
        self._parked_total = 0

    def evict(self, max_keys: int) -> int:
        """Drop clean keys without parked events, oldest-loaded first, until at most
        ``max_keys`` keys are held. Returns how many were dropped."""
        excess = len(self._states) - operator.index(max_keys)
        if excess <= 0:
            return 0
        victims = []
        for g, st in self._states.items():
            if not st.dirty and not st.parked:
                victims.append(g)
                if len(victims) == excess:
                    break
        for g in victims:
            del self._states[g]
        return len(victims)

    def __repr__(self) -> str:
        return (
            f"SequenceGate(keys={len(self._states)}, parked_total={self._parked_total}, "
            f"max_parked_per_key={self._max_per_key}, max_parked_total={self._max_total})"
        )


# ---------------------------------------------------------------------- JSON-exact documents
JSON_DEPTH = 256  # containers nested deeper than this: json_lossless says False


def json_lossless(value: object) -> bool:
    """False when orjson would encode `value` without error but decoding would not give it
    back: a NaN or infinite float (written as ``null``) or a tuple (read back as a list),
    anywhere in dict values and list items; also False for containers nested deeper than
    JSON_DEPTH. Anything else is True (what orjson refuses is not looked at here)."""
    return _lossless(value, 0)


def _lossless(v: object, depth: int) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return depth < JSON_DEPTH and all(_lossless(x, depth + 1) for x in v.values())
    if isinstance(v, list):
        return depth < JSON_DEPTH and all(_lossless(x, depth + 1) for x in v)
    return not isinstance(v, tuple)
