# cython: language_level=3
"""Compiled hot path of the aggregator: ``BloomFilter`` and ``SequenceGate``.

This is the fast twin of ``aggregator.core_ref`` (plain Python, same API, bit-identical
behaviour; read it first, it is the specification). ``aggregator.core`` chooses between
them. Both classes take one call per batch: hash pairs arrive as a buffer of native
uint64 (h1, h2) pairs and flags are returned as a ``bytearray``.

Inner loops run on raw pointers into buffers whose lengths are checked on entry, so they
need no Cython bounds checks. Directives are set per function: ``cdivision`` on the bloom
kernels (the modulus is never 0), ``wraparound=False`` in ``decide`` (indices are never
negative); list indexing keeps its bounds checks (a key's ``__eq__`` could mutate the list).
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.long cimport PyLong_AsLongLong, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.number cimport PyNumber_Index
from libc.stdint cimport INT64_MAX, int64_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

import math
import struct
import sys

__all__ = [
    "APPLY",
    "FULL",
    "PARK",
    "STALE",
    "BloomFilter",
    "SequenceGate",
    "bloom_size",
]

APPLY = 0
STALE = 1
PARK = 2
FULL = 3

cdef enum:
    C_APPLY = 0
    C_STALE = 1
    C_PARK = 2
    C_FULL = 3


cdef inline long long _as_ll(object x) except? -1:
    """Convert like ``operator.index`` to a C long long (OverflowError out of range)."""
    if PyLong_CheckExact(x):
        return PyLong_AsLongLong(x)
    return PyLong_AsLongLong(PyNumber_Index(x))


cdef inline uint64_t _load64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)  # unaligned-safe; compiles to one load
    return v


cdef int _get_bytes(object obj, Py_buffer* view) except -1:
    """Acquire a C-contiguous byte view of ``obj`` (caller releases it)."""
    PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    return 0


cdef int _get_pairs(object obj, Py_buffer* view) except -1:
    """Acquire a hash-pair buffer; ValueError unless its size is a multiple of 16."""
    cdef Py_ssize_t size
    PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    if view.len % 16:
        size = view.len
        PyBuffer_Release(view)
        raise ValueError(
            f"hash buffer length {size} is not a multiple of 16 bytes (uint64 pairs)"
        )
    return 0


def bloom_size(capacity, fp_rate):
    """Return ``(bits, hash_count)`` of one bloom generation for ``capacity`` items.

    ``bits = ceil(-n ln p / ln(2)**2)`` rounded up to a multiple of 64 and
    ``hash_count = round(bits / n * ln 2)``, at least 1.
    """
    capacity = PyNumber_Index(capacity)
    fp_rate = float(fp_rate)
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if not 0.0 < fp_rate < 1.0:
        raise ValueError(f"fp_rate must be in (0, 1), got {fp_rate}")
    bits = math.ceil(-capacity * math.log(fp_rate) / (math.log(2) ** 2))
    bits = (bits + 63) // 64 * 64
    hash_count = max(1, round(bits / capacity * math.log(2)))
    return bits, hash_count


# Snapshot layout (little-endian; the words are stored as they are in memory, so the
# compiled core reads and writes it on little-endian hosts only): magic, version, capacity,
# fp_rate, generations, k, bits per generation, live generations; then (id, count) per live
# generation, oldest first; then their bit arrays (bit b is bit b % 8 of byte b // 8).
_SNAP_HEAD = struct.Struct("<4sIQdIIQI")
_SNAP_GEN = struct.Struct("<qQ")
_SNAP_MAGIC = b"AGBF"
_SNAP_VERSION = 1
if sys.byteorder != "little":  # pragma: no cover - no such host here
    raise ImportError("aggregator._core: bloom snapshots assume a little-endian host")


def _snapshot_layout(view, capacity, fp_rate, generations, k, m):
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


# ===================================================================== BloomFilter
@cython.final
cdef class BloomFilter:
    """Generational bloom filter over pre-hashed items.

    ``BloomFilter(capacity, fp_rate=0.01, generations=3, *, start_generation=0)``.
    Each generation is a standard bloom filter sized for ``capacity`` items at
    ``fp_rate``; item bit indices are ``(h1 + j*h2) mod 2**64 mod m``, j < k. At most
    ``generations`` generations are live; their bit arrays are allocated up front, so
    memory is fixed at ``generations * bits_per_generation`` bits. A lookup reports an
    item as maybe present if any live generation holds it.
    """

    def __cinit__(self, capacity, fp_rate=0.01, generations=3, *, start_generation=0):
        cdef Py_ssize_t g
        m, k = bloom_size(capacity, fp_rate)
        generations = PyNumber_Index(generations)
        if generations < 1:
            raise ValueError(f"generations must be >= 1, got {generations}")
        cdef int64_t start = _as_ll(start_generation)
        self._capacity = capacity
        self._fp_rate = float(fp_rate)
        self._max_gens = generations
        self._m = m
        self._k = k
        self._nwords = m // 64
        self._bits = <uint64_t*>calloc(self._max_gens * self._nwords, sizeof(uint64_t))
        self._idx = <uint64_t*>PyMem_Malloc(self._k * sizeof(uint64_t))
        self._live_ids = <int64_t*>PyMem_Malloc(self._max_gens * sizeof(int64_t))
        self._live_slots = <Py_ssize_t*>PyMem_Malloc(self._max_gens * sizeof(Py_ssize_t))
        self._counts = <Py_ssize_t*>PyMem_Malloc(self._max_gens * sizeof(Py_ssize_t))
        self._free = <Py_ssize_t*>PyMem_Malloc(self._max_gens * sizeof(Py_ssize_t))
        if (self._bits == NULL or self._idx == NULL or self._live_ids == NULL
                or self._live_slots == NULL or self._counts == NULL or self._free == NULL):
            raise MemoryError()
        for g in range(self._max_gens):
            self._counts[g] = 0
        # Slot 0 holds the first generation; the others are free (popped from the end).
        self._nfree = 0
        for g in range(self._max_gens - 1, 0, -1):
            self._free[self._nfree] = g
            self._nfree += 1
        self._live_ids[0] = start
        self._live_slots[0] = 0
        self._nlive = 1

    def __dealloc__(self):
        free(self._bits)
        PyMem_Free(self._idx)
        PyMem_Free(self._live_ids)
        PyMem_Free(self._live_slots)
        PyMem_Free(self._counts)
        PyMem_Free(self._free)

    # ----------------------------------------------------------------- properties
    @property
    def capacity(self):
        """Items per generation the filter is sized for."""
        return self._capacity

    @property
    def fp_rate(self):
        """Configured false-positive rate of one generation at capacity."""
        return self._fp_rate

    @property
    def generations(self):
        """Maximum number of live generations."""
        return self._max_gens

    @property
    def generation(self):
        """Id of the current generation (the one items are added to)."""
        return self._live_ids[self._nlive - 1]

    @property
    def oldest_generation(self):
        """Id of the oldest live generation."""
        return self._live_ids[0]

    @property
    def live_generations(self):
        """Ids of the live generations, oldest first."""
        return [self._live_ids[g] for g in range(self._nlive)]

    @property
    def count(self):
        """Items added to the current generation."""
        return self._counts[self._live_slots[self._nlive - 1]]

    @property
    def full(self):
        """True when the current generation holds ``capacity`` items or more."""
        return self._counts[self._live_slots[self._nlive - 1]] >= self._capacity

    @property
    def bits_per_generation(self):
        """Size of one generation's bit array, in bits (a multiple of 64)."""
        return self._m

    @property
    def hash_count(self):
        """Number of bit indices per item (k)."""
        return self._k

    @property
    def memory_bytes(self):
        """Bytes of bit arrays held (all generation slots, allocated up front)."""
        return self._max_gens * self._nwords * 8

    # ----------------------------------------------------------------- kernels
    cdef inline uint64_t* _words(self, Py_ssize_t live_pos) noexcept:
        return self._bits + self._live_slots[live_pos] * self._nwords

    @cython.cdivision(True)  # m > 0 by construction
    cdef void _insert(self, Py_ssize_t live_pos, const unsigned char* p,
                      Py_ssize_t n) noexcept:
        cdef uint64_t* words = self._words(live_pos)
        cdef uint64_t m = self._m, h, h2, b
        cdef Py_ssize_t i, j, k = self._k
        for i in range(n):
            h = _load64(p + 16 * i)
            h2 = _load64(p + 16 * i + 8)
            for j in range(k):
                b = h % m
                h += h2
                words[b >> 6] |= (<uint64_t>1) << (b & 63)
        self._counts[self._live_slots[live_pos]] += n

    @cython.cdivision(True)  # m > 0 by construction
    cdef void _check_and_add(self, const unsigned char* p, Py_ssize_t n,
                             unsigned char* out) noexcept:
        cdef uint64_t* cur = self._words(self._nlive - 1)
        cdef const uint64_t* words
        cdef uint64_t* idx = self._idx
        cdef uint64_t m = self._m, h, h2, b, bit
        cdef Py_ssize_t i, j, g, k = self._k
        cdef bint seen, hit
        for i in range(n):
            h = _load64(p + 16 * i)
            h2 = _load64(p + 16 * i + 8)
            # Set the bits in the current generation, noting whether all were set.
            seen = 1
            for j in range(k):
                b = h % m
                h += h2
                idx[j] = b
                bit = (<uint64_t>1) << (b & 63)
                if not (cur[b >> 6] & bit):
                    seen = 0
                    cur[b >> 6] |= bit
            if not seen:
                for g in range(self._nlive - 2, -1, -1):
                    words = self._words(g)
                    hit = 1
                    for j in range(k):
                        b = idx[j]
                        if not (words[b >> 6] >> (b & 63)) & 1:
                            hit = 0
                            break
                    if hit:
                        seen = 1
                        break
            out[i] = seen
        self._counts[self._live_slots[self._nlive - 1]] += n

    @cython.cdivision(True)  # m > 0 by construction
    cdef void _contains(self, const unsigned char* p, Py_ssize_t n,
                        unsigned char* out) noexcept:
        cdef const uint64_t* words
        cdef uint64_t* idx = self._idx
        cdef uint64_t m = self._m, h, h2, b
        cdef Py_ssize_t i, j, g, have, k = self._k
        cdef bint hit, found
        for i in range(n):
            h = _load64(p + 16 * i)
            h2 = _load64(p + 16 * i + 8)
            have = 0  # indices computed so far (lazily: most misses stop early)
            found = 0
            for g in range(self._nlive - 1, -1, -1):
                words = self._words(g)
                hit = 1
                for j in range(k):
                    if j == have:
                        idx[j] = h % m
                        h += h2
                        have += 1
                    b = idx[j]
                    if not (words[b >> 6] >> (b & 63)) & 1:
                        hit = 0
                        break
                if hit:
                    found = 1
                    break
            out[i] = found

    cdef int64_t _new_generation(self, int64_t gen) noexcept:
        cdef int64_t dropped = -1
        cdef Py_ssize_t slot, g
        if self._nlive == self._max_gens:
            dropped = self._live_ids[0]
            slot = self._live_slots[0]
            memset(self._bits + slot * self._nwords, 0, self._nwords * sizeof(uint64_t))
            self._counts[slot] = 0
            self._free[self._nfree] = slot
            self._nfree += 1
            for g in range(1, self._nlive):
                self._live_ids[g - 1] = self._live_ids[g]
                self._live_slots[g - 1] = self._live_slots[g]
            self._nlive -= 1
        self._nfree -= 1
        self._live_ids[self._nlive] = gen
        self._live_slots[self._nlive] = self._free[self._nfree]
        self._nlive += 1
        return dropped

    # ----------------------------------------------------------------- batch API
    def check_and_add(self, hashes):
        """Flag each item (1 = maybe seen before, in any live generation, including
        earlier in this batch; 0 = new), then add it to the current generation.

        ``hashes`` is a buffer of native uint64 pairs; every item increments ``count``.
        """
        cdef Py_buffer view
        cdef Py_ssize_t n
        _get_pairs(hashes, &view)
        try:
            n = view.len // 16
            out = PyByteArray_FromStringAndSize(NULL, n)
            self._check_and_add(<const unsigned char*>view.buf, n,
                                <unsigned char*>PyByteArray_AS_STRING(out))
        finally:
            PyBuffer_Release(&view)
        return out

    def contains(self, hashes):
        """Flag each item: 1 if maybe present in any live generation, else 0."""
        cdef Py_buffer view
        cdef Py_ssize_t n
        _get_pairs(hashes, &view)
        try:
            n = view.len // 16
            out = PyByteArray_FromStringAndSize(NULL, n)
            self._contains(<const unsigned char*>view.buf, n,
                           <unsigned char*>PyByteArray_AS_STRING(out))
        finally:
            PyBuffer_Release(&view)
        return out

    def add(self, hashes):
        """Add every item to the current generation."""
        cdef Py_buffer view
        _get_pairs(hashes, &view)
        self._insert(self._nlive - 1, <const unsigned char*>view.buf, view.len // 16)
        PyBuffer_Release(&view)

    def load(self, generation, hashes):
        """Add items to generation ``generation``, creating it if it is not live.

        Used to rebuild the filter at boot from the stored index. A new generation must
        be newer than the current one (ValueError otherwise); creating it may drop the
        oldest live generation. Returns the dropped generation id, or -1.
        """
        cdef int64_t gen = _as_ll(generation)
        cdef int64_t dropped = -1
        cdef Py_ssize_t g, pos = -1
        cdef Py_buffer view
        _get_pairs(hashes, &view)
        try:
            for g in range(self._nlive):
                if self._live_ids[g] == gen:
                    pos = g
                    break
            if pos < 0:
                if gen < self._live_ids[self._nlive - 1]:
                    raise ValueError(
                        f"generation {gen} is not live and older than the current "
                        f"generation {self._live_ids[self._nlive - 1]}; load generations "
                        f"in increasing order"
                    )
                dropped = self._new_generation(gen)
                pos = self._nlive - 1
            self._insert(pos, <const unsigned char*>view.buf, view.len // 16)
        finally:
            PyBuffer_Release(&view)
        return dropped

    def rotate(self):
        """Start generation ``generation + 1``.

        Returns the id of the generation dropped to stay within ``generations``, or -1.
        """
        cdef int64_t cur = self._live_ids[self._nlive - 1]
        if cur == INT64_MAX:
            raise OverflowError("generation id overflow")
        return self._new_generation(cur + 1)

    # ----------------------------------------------------------------- snapshots
    def dumps(self):
        """The filter as bytes (see `_SNAP_HEAD`): its parameters, the live generations
        (id, count) oldest first, then their bit arrays. `restore` reads it back."""
        cdef Py_ssize_t g, nbytes = self._nwords * 8
        out = [_SNAP_HEAD.pack(_SNAP_MAGIC, _SNAP_VERSION, self._capacity, self._fp_rate,
                               self._max_gens, self._k, self._m, self._nlive)]
        for g in range(self._nlive):
            out.append(_SNAP_GEN.pack(self._live_ids[g],
                                      self._counts[self._live_slots[g]]))
        for g in range(self._nlive):
            out.append(PyBytes_FromStringAndSize(<char*>self._words(g), nbytes))
        return b"".join(out)

    def restore(self, data):
        """Replace the filter's content with a `dumps` of a filter of the same parameters
        (capacity, fp_rate, generations); ValueError if they differ or `data` is malformed
        (the filter is then left unchanged)."""
        cdef Py_buffer view
        cdef Py_ssize_t g, nlive, base, nbytes = self._nwords * 8
        _get_bytes(data, &view)
        try:
            mv = PyMemoryView_FromObject(data)
            nlive, live = _snapshot_layout(mv, self._capacity, self._fp_rate, self._max_gens,
                                           self._k, self._m)
            base = _SNAP_HEAD.size + nlive * _SNAP_GEN.size
            memset(self._bits, 0, self._max_gens * nbytes)
            for g in range(nlive):
                memcpy(self._bits + g * self._nwords,
                       <const unsigned char*>view.buf + base + g * nbytes, nbytes)
                self._live_ids[g] = live[g][0]
                self._live_slots[g] = g
            for g in range(self._max_gens):
                self._counts[g] = live[g][1] if g < nlive else 0
            self._nlive = nlive
            self._nfree = 0
            for g in range(self._max_gens - 1, nlive - 1, -1):
                self._free[self._nfree] = g
                self._nfree += 1
        finally:
            PyBuffer_Release(&view)

    def __repr__(self):
        return (
            f"BloomFilter(capacity={self._capacity}, fp_rate={self._fp_rate}, "
            f"generations={self._max_gens}, live={self.live_generations}, count={self.count})"
        )


# ===================================================================== SequenceGate
@cython.final
cdef class _KeyState:
    """Gate state of one key: last applied sequence and parked sequences."""

    def __cinit__(self, long long last):
        self.last = last
        self.parked = None
        self.oldest_at = 0.0
        self.oldest_stale = False
        self.dirty = False


cdef inline Py_ssize_t _nparked(_KeyState st) noexcept:
    return 0 if st.parked is None else len(st.parked)


@cython.final
cdef class SequenceGate:
    """Per-key sequence gating (decisions ``APPLY``, ``STALE``, ``PARK``, ``FULL``).

    ``SequenceGate(max_parked_per_key, max_parked_total)``. Keys (``bytes``) must be
    loaded before they are decided: ask ``missing()`` which keys the gate does not hold,
    read their state from storage and ``load()`` it. The caller persists ``last`` from
    ``dirty()`` and the parked payloads itself.

    Invariant: every parked sequence is greater than ``last + 1`` (a latest-mode event may
    jump ``last`` past parked sequences; those become stale and ``skip_gap`` discards them).
    """

    def __cinit__(self, max_parked_per_key, max_parked_total):
        self._max_per_key = _as_ll(max_parked_per_key)
        self._max_total = _as_ll(max_parked_total)
        if self._max_per_key < 0 or self._max_total < 0:
            raise ValueError("parking limits must be >= 0")
        self._states = {}
        self._parking = {}
        self._dirty = {}
        self._parked_total = 0

    # ----------------------------------------------------------------- properties
    @property
    def max_parked_per_key(self):
        """Parking bound per key."""
        return self._max_per_key

    @property
    def max_parked_total(self):
        """Parking bound over all keys."""
        return self._max_total

    @property
    def parked_total(self):
        """Number of parked sequences over all keys."""
        return self._parked_total

    def __len__(self):
        return len(self._states)

    def __contains__(self, gkey):
        return gkey in self._states

    # ----------------------------------------------------------------- loading
    def missing(self, gkeys):
        """Distinct keys of ``gkeys`` (first-seen order) the gate holds no state for."""
        cdef dict states = self._states
        cdef set seen = set()
        cdef list out = []
        for g in gkeys:
            if g not in states and g not in seen:
                seen.add(g)
                out.append(g)
        return out

    def load(self, gkey, last, parked=()):
        """Set the state of ``gkey``: ``last`` applied sequence and ``(seq, parked_at)``
        pairs. Parked sequences ``<= last`` are stale and ignored. Replaces any state held
        for the key (and forgets that it was dirty).
        """
        if type(gkey) is not bytes:
            raise TypeError(f"gkey must be bytes, not {type(gkey).__name__}")
        cdef _KeyState st = _KeyState(_as_ll(last))
        cdef long long s
        cdef dict p = {}
        for seq, at in parked:
            s = _as_ll(seq)
            at = float(at)
            if s > st.last:
                p[s] = at
        self._forget(gkey)
        self._states[gkey] = st
        if p:
            st.parked = p
            st.oldest_stale = True
            self._parking[gkey] = st
            self._parked_total += len(p)

    cdef int _forget(self, object g) except -1:
        cdef _KeyState old = self._states.pop(g, None)
        if old is not None:
            self._parked_total -= _nparked(old)
            self._parking.pop(g, None)
            self._dirty.pop(g, None)
        return 0

    # ----------------------------------------------------------------- decisions
    @cython.wraparound(False)  # i in range(n); list bounds stay checked
    def decide(self, gkeys, seqs, strict, now):
        """Decide events in order; returns ``(codes, ready)``.

        ``strict[i]`` (a byte buffer) selects strict (non-zero) or latest (0) mode for
        event i. ``ready`` lists ``(i, gkey, seq)`` parked events that became applicable
        right after event i, in apply order. Every key must be loaded (KeyError); on an
        error, the events before the failing one have been decided.
        """
        cdef list keys = gkeys if type(gkeys) is list else list(gkeys)
        cdef list sq = seqs if type(seqs) is list else list(seqs)
        cdef Py_buffer fb
        cdef Py_ssize_t i, n = len(keys)
        cdef const unsigned char* flags
        cdef unsigned char* c
        cdef long long s, last
        cdef _KeyState st
        cdef dict states = self._states
        cdef list ready = []
        _get_bytes(strict, &fb)
        try:
            if len(sq) != n or fb.len != n:
                raise ValueError(
                    f"gkeys, seqs and strict differ in length: {n}, {len(sq)}, {fb.len}"
                )
            t = float(now)
            codes = PyByteArray_FromStringAndSize(NULL, n)
            c = <unsigned char*>PyByteArray_AS_STRING(codes)
            memset(c, C_APPLY, n)
            flags = <const unsigned char*>fb.buf
            for i in range(n):
                g = keys[i]
                st = <_KeyState>states[g]
                s = _as_ll(sq[i])
                last = st.last
                if s <= last:
                    c[i] = C_STALE
                elif not flags[i]:  # latest mode
                    st.last = s
                    if not st.dirty:
                        self._mark(g, st)
                elif st.parked and s in st.parked:
                    c[i] = C_STALE
                elif s == last + 1:
                    st.last = s
                    if not st.dirty:
                        self._mark(g, st)
                    if st.parked:
                        self._drain(g, st, i, ready)
                elif _nparked(st) < self._max_per_key and self._parked_total < self._max_total:
                    c[i] = C_PARK
                    self._park(g, st, s, t)
                else:
                    c[i] = C_FULL
        finally:
            PyBuffer_Release(&fb)
        return codes, ready

    cdef int _mark(self, object g, _KeyState st) except -1:
        if not st.dirty:
            st.dirty = True
            self._dirty[g] = st
        return 0

    cdef int _park(self, object g, _KeyState st, long long s, double now) except -1:
        if st.parked is None:
            st.parked = {}
        if not st.parked:
            self._parking[g] = st
            st.oldest_at = now
            st.oldest_stale = False
        elif not st.oldest_stale and now < st.oldest_at:
            st.oldest_at = now
        st.parked[s] = now
        self._parked_total += 1
        return 0

    cdef int _unpark(self, object g, _KeyState st, long long s) except -1:
        del st.parked[s]
        self._parked_total -= 1
        if not st.parked:
            del self._parking[g]
        else:
            st.oldest_stale = True
        return 0

    cdef int _drain(self, object g, _KeyState st, Py_ssize_t i, list ready) except -1:
        while st.parked and (st.last + 1) in st.parked:
            st.last += 1
            self._unpark(g, st, st.last)
            ready.append((i, g, st.last))
        return 0

    # ----------------------------------------------------------------- gaps
    def expired(self, now, timeout):
        """Keys whose oldest parked event was parked at or before ``now - timeout``."""
        cdef double limit = float(now) - float(timeout)
        cdef _KeyState st
        cdef list out = []
        for g, obj in self._parking.items():
            st = <_KeyState>obj
            if st.oldest_stale:
                st.oldest_at = min(st.parked.values())
                st.oldest_stale = False
            if st.oldest_at <= limit:
                out.append(g)
        return out

    def skip_gap(self, gkey):
        """Give up on the gap before the parked sequences of ``gkey``: set ``last`` to
        ``min(parked) - 1`` and apply the contiguous run of parked sequences from there.

        Returns the sequences applied, in order (they are no longer parked); empty if
        nothing is parked. Stale parked sequences (``<= last``) are discarded first.
        """
        cdef _KeyState st = <_KeyState>self._states[gkey]
        cdef list out = []
        if not st.parked:
            return []
        for s in sorted(st.parked):
            if s > st.last:
                break
            self._unpark(gkey, st, s)
        if not st.parked:
            return []
        st.last = min(st.parked) - 1
        self._drain(gkey, st, 0, out)
        self._mark(gkey, st)
        return [r[2] for r in out]

    def drop_parked(self, gkey):
        """Remove every parked sequence of ``gkey``; returns them ascending and sets
        ``last = max(last, max(them))`` (dead-letter policy)."""
        cdef _KeyState st = <_KeyState>self._states[gkey]
        if not st.parked:
            return []
        cdef list out = sorted(st.parked)
        self._parked_total -= len(out)
        st.parked.clear()
        del self._parking[gkey]
        if out[-1] > st.last:
            st.last = out[-1]
            self._mark(gkey, st)
        return out

    # ----------------------------------------------------------------- inspection
    def parked(self, gkey):
        """Parked sequences of ``gkey``, ascending."""
        cdef _KeyState st = <_KeyState>self._states[gkey]
        return [] if st.parked is None else sorted(st.parked)

    def last(self, gkey):
        """Last applied sequence of ``gkey``."""
        return (<_KeyState>self._states[gkey]).last

    def dirty(self):
        """``(gkey, last)`` of keys whose ``last`` changed since the previous call, in the
        order they first changed; clears the dirty set."""
        cdef list out = []
        cdef _KeyState st
        for g, obj in self._dirty.items():
            st = <_KeyState>obj
            st.dirty = False
            out.append((g, st.last))
        self._dirty.clear()
        return out

    # ----------------------------------------------------------------- housekeeping
    def clear(self):
        """Forget every key (e.g. after an aborted transaction)."""
        self._states.clear()
        self._parking.clear()
        self._dirty.clear()
        self._parked_total = 0

    def evict(self, max_keys):
        """Drop clean keys without parked events, oldest-loaded first, until at most
        ``max_keys`` keys are held. Returns how many were dropped."""
        cdef Py_ssize_t excess = len(self._states) - PyNumber_Index(max_keys)
        cdef list victims = []
        cdef _KeyState st
        if excess <= 0:
            return 0
        for g, obj in self._states.items():
            st = <_KeyState>obj
            if not st.dirty and not st.parked:
                victims.append(g)
                if len(victims) == excess:
                    break
        for g in victims:
            del self._states[g]
        return len(victims)

    def __repr__(self):
        return (
            f"SequenceGate(keys={len(self._states)}, parked_total={self._parked_total}, "
            f"max_parked_per_key={self._max_per_key}, max_parked_total={self._max_total})"
        )
