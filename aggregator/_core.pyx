# cython: language_level=3
"""Compiled hot path of the aggregator: ``BloomFilter``, ``SequenceGate`` and
``json_lossless`` (the stored documents' JSON check, doc_codec.py).

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
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.long cimport PyLong_AsLongLong, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from libc.math cimport isfinite

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

import ctypes
import math
import struct
import sys

import xxhash._xxhash
from xxhash import xxh3_128_digest as _xxh3_128_digest

from aggregator._slots cimport slot_attr, slot_offset
from aggregator.envelope import Event

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
GATE_KEY_MAX = C_GATE_KEY_MAX  # longest gate key the table holds (slot prefix + hash = 18)

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


# ===================================================================== gate keys
# XXH3_128bits called in the xxhash library the ``xxhash`` package ships (as _frames.pyx
# calls XXH3_64bits): no Python call, no joined bytes and no digest object per key. Bound
# at import and checked against ``xxhash.xxh3_128_digest``; where it cannot be bound the
# package's function is called instead.
ctypedef struct _XXH128:
    uint64_t low64
    uint64_t high64

ctypedef _XXH128 (*_xxh3_128_fn)(const void*, size_t) noexcept nogil

cdef _xxh3_128_fn _xxh128 = NULL
cdef char* _scratch = NULL  # first + NUL + second, hashed in place (grows)
cdef Py_ssize_t _scratch_size = 0


cdef inline void _put_be64(unsigned char* p, uint64_t v) noexcept:
    cdef int i
    for i in range(8):
        p[i] = <unsigned char>(v >> (56 - 8 * i))


def _bind_xxh128():
    """Find XXH3_128bits in the extension of the ``xxhash`` package; None when it matches
    ``xxh3_128_digest`` on the probes, else the reason it is not used."""
    global _xxh128
    try:
        lib = ctypes.CDLL(xxhash._xxhash.__file__)
        addr = ctypes.cast(lib.XXH3_128bits, ctypes.c_void_p).value
    except (OSError, AttributeError) as e:
        return f"XXH3_128bits not found ({e})"
    cdef size_t a = addr
    _xxh128 = <_xxh3_128_fn>a
    cdef _XXH128 h
    cdef unsigned char out[16]
    for probe in (b"", b"a", b"src\x00id-1", bytes(range(256)) * 3):
        h = _xxh128(PyBytes_AS_STRING(probe), PyBytes_GET_SIZE(probe))
        _put_be64(out, h.high64)
        _put_be64(out + 8, h.low64)
        if out[:16] != _xxh3_128_digest(probe):
            _xxh128 = NULL
            return "XXH3_128bits does not match xxhash.xxh3_128_digest"
    return None


XXH128_UNBOUND = _bind_xxh128()  # None: bound (tests/test_batch_twins.py checks)


cdef inline const char* _utf8(object s, Py_ssize_t* n) except NULL:
    """UTF-8 of a str, like ``str.encode()`` (same errors); TypeError for a non-str."""
    if not PyUnicode_Check(s):
        raise TypeError(f"expected str, not {type(s).__name__}")
    return PyUnicode_AsUTF8AndSize(s, n)


@cython.wraparound(False)
cdef bytes _slot_hash_key(object h128, long long slot, object first, object second,
                          unsigned char* digest_out):
    """``slot_prefix(slot) + xxh3_128(first + NUL + second)`` (18 bytes): a gate key over
    (source, partition key), a dedup key over (source, id); the 16-byte digest is also
    copied to `digest_out` unless it is NULL."""
    cdef Py_ssize_t a, b
    cdef const char* ps
    cdef const char* pp
    cdef char* sp
    cdef unsigned char* out
    global _scratch, _scratch_size
    cdef bytes joined, digest, key
    cdef _XXH128 h
    cdef char* grown
    if slot < 0 or slot > 0xFFFF:
        raise OverflowError(f"slot out of range 0..65535: {slot}")
    ps = _utf8(first, &a)
    pp = _utf8(second, &b)
    if _xxh128 != NULL:
        if a + 1 + b > _scratch_size:
            grown = <char*>PyMem_Realloc(_scratch, a + 1 + b + 256)
            if grown == NULL:
                raise MemoryError()
            _scratch = grown
            _scratch_size = a + 1 + b + 256
        memcpy(_scratch, ps, a)
        _scratch[a] = 0
        memcpy(_scratch + a + 1, pp, b)
        h = _xxh128(_scratch, a + 1 + b)
        key = PyBytes_FromStringAndSize(NULL, 18)
        out = <unsigned char*>PyBytes_AS_STRING(key)
        out[0] = <unsigned char>(slot >> 8)
        out[1] = <unsigned char>(slot & 0xFF)
        _put_be64(out + 2, h.high64)
        _put_be64(out + 10, h.low64)
        if digest_out != NULL:
            memcpy(digest_out, out + 2, 16)
        return key
    joined = PyBytes_FromStringAndSize(NULL, a + 1 + b)
    sp = PyBytes_AS_STRING(joined)
    memcpy(sp, ps, a)
    sp[a] = 0
    memcpy(sp + a + 1, pp, b)
    digest = h128(joined)
    if PyBytes_GET_SIZE(digest) != 16:  # pragma: no cover - xxh3_128 is 16 bytes
        raise RuntimeError("xxh3_128_digest did not return 16 bytes")
    key = PyBytes_FromStringAndSize(NULL, 18)
    out = <unsigned char*>PyBytes_AS_STRING(key)
    out[0] = <unsigned char>(slot >> 8)
    out[1] = <unsigned char>(slot & 0xFF)
    memcpy(out + 2, PyBytes_AS_STRING(digest), 16)
    if digest_out != NULL:
        memcpy(digest_out, PyBytes_AS_STRING(digest), 16)
    return key


def gate_keys(slots, sources, partitionkeys):
    """Gate keys of a batch: ``slot.to_bytes(2, "big") + xxh3_128(f"{source}\\0{pk}")``
    per event, i.e. ``routing.slot_prefix(slot) + routing.gate_hash(source, pk)``.

    One call per batch; returns a list of 18-byte ``bytes``. ValueError if the three
    sequences differ in length, OverflowError for a slot outside 0..65535, TypeError for a
    source or partition key that is not a str.
    """
    cdef list sl = slots if type(slots) is list else list(slots)
    cdef list so = sources if type(sources) is list else list(sources)
    cdef list pk = partitionkeys if type(partitionkeys) is list else list(partitionkeys)
    cdef Py_ssize_t i, n = len(sl)
    cdef list keys
    if len(so) != n or len(pk) != n:
        raise ValueError(
            f"slots, sources and partitionkeys differ in length: {n}, {len(so)}, {len(pk)}"
        )
    keys = [None] * n
    h128 = _xxh3_128_digest
    for i in range(n):
        keys[i] = _slot_hash_key(h128, _as_ll(sl[i]), so[i], pk[i], NULL)
    return keys


# Event attributes read at their slot offsets (_slots.pxd) when the type is exact
cdef type _Event = Event
cdef Py_ssize_t _EV_ID = slot_offset(Event, "id")
cdef Py_ssize_t _EV_SOURCE = slot_offset(Event, "source")
cdef Py_ssize_t _EV_PK = slot_offset(Event, "partitionkey")
cdef Py_ssize_t _EV_SEQUENCE = slot_offset(Event, "sequence")


cdef inline object _ev(object ev, Py_ssize_t offset, str name):
    return slot_attr(ev, _Event, offset, name)  # ``ev.<name>``


@cython.wraparound(False)
def dedup_keys(events, Py_ssize_t slot_index):
    """Dedup keys of a batch of ``(event, record)`` pairs: per pair
    ``routing.slot_prefix(record[slot_index]) + routing.identity_hash(event.source,
    event.id)`` (the gate key's layout, over the event id), and the 16-byte hashes joined
    (the bloom filter's input, and the dedup log's when every id is new).

    One call per batch; returns (list of 18-byte ``bytes``, ``bytes`` of 16 * n).
    OverflowError for a slot outside 0..65535, TypeError for a source or id not a str.
    """
    cdef list ev = events if type(events) is list else list(events)
    cdef Py_ssize_t i, n = len(ev)
    cdef unsigned char* hp
    cdef bytes hashes
    cdef list keys = [None] * n
    cdef object pair, e
    hashes = PyBytes_FromStringAndSize(NULL, 16 * n)
    hp = <unsigned char*>PyBytes_AS_STRING(hashes)
    h128 = _xxh3_128_digest
    for i in range(n):
        pair = ev[i]
        e = pair[0]
        keys[i] = _slot_hash_key(h128, _as_ll(pair[1][slot_index]),
                                 _ev(e, _EV_SOURCE, "source"), _ev(e, _EV_ID, "id"),
                                 hp + 16 * i)
    return keys, hashes


@cython.wraparound(False)
def gate_batch(events, Py_ssize_t slot_index, Py_ssize_t topic_index,
               Py_ssize_t partition_index, topics, strict):
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
    cdef list ev = events if type(events) is list else list(events)
    cdef list tl = topics if type(topics) is list else list(topics)
    cdef list sl = strict if type(strict) is list else list(strict)
    cdef Py_ssize_t i, n = len(ev), m
    cdef list at = [], slots = [], sources = [], pks = [], seqs = [], tix = [], streams = []
    cdef object pair, e, rec, seq, ti
    cdef long long t, v
    cdef bytes modes
    cdef unsigned char* mp
    for i in range(n):
        pair = ev[i]
        e = pair[0]
        seq = _ev(e, _EV_SEQUENCE, "sequence")
        if seq is None:
            continue
        rec = pair[1]
        ti = rec[topic_index]
        at.append(i)
        slots.append(rec[slot_index])
        sources.append(_ev(e, _EV_SOURCE, "source"))
        pks.append(_ev(e, _EV_PK, "partitionkey"))
        seqs.append(seq)
        tix.append(ti)
        streams.append((tl[ti], rec[partition_index]))
    m = len(at)
    modes = PyBytes_FromStringAndSize(NULL, m)
    mp = <unsigned char*>PyBytes_AS_STRING(modes)
    for i in range(m):
        t = _as_ll(tix[i])
        if t < 0:
            t += len(sl)  # a negative index as the list takes it
        v = _as_ll(sl[t])
        if v < 0 or v > 255:
            raise ValueError("bytes must be in range(0, 256)")
        mp[i] = <unsigned char>v
    return at, gate_keys(slots, sources, pks), seqs, tix, modes, streams


# ===================================================================== SequenceGate
# The gate's state is an insertion-ordered open-addressing table (the layout of CPython's
# compact dict): ``_entries`` holds one 32-byte GateEntry per loaded key in load order (a
# removed key leaves a dead entry, flags 0, until the next rebuild compacts the array);
# ``_index`` maps a key's hash to its entry number by linear probing (-1 empty, -2 removed).
# At most 2/3 of the index is used (live + removed <= _cap), so a probe always ends.
# ``_dirty`` lists entry numbers in the order their ``last`` first changed. Parked
# sequences are rare: a key with some has F_PARKED set and a ``_Parked`` in ``_parking``.

cdef enum:
    _EMPTY = -1
    _REMOVED = -2
    _MIN_SIZE = 8

cdef inline uint64_t _key_hash(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """A 64-bit mix of a short key (gate keys end with an xxh3 digest already)."""
    cdef uint64_t h = <uint64_t>n * <uint64_t>0x9E3779B97F4A7C15ULL
    cdef uint64_t w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        h = (h ^ _load64(p + i)) * <uint64_t>0xFF51AFD7ED558CCDULL
        h ^= h >> 32
        i += 8
    if i < n:
        w = 0
        memcpy(&w, p + i, n - i)
        h = (h ^ w) * <uint64_t>0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= <uint64_t>0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return h


@cython.final
cdef class _Parked:
    """Parked sequences of one key (the rare side structure of the table)."""

    def __cinit__(self, dict seqs, double oldest_at, bint oldest_stale):
        self.seqs = seqs
        self.oldest_at = oldest_at
        self.oldest_stale = oldest_stale


@cython.final
cdef class SequenceGate:
    """Per-key sequence gating (decisions ``APPLY``, ``STALE``, ``PARK``, ``FULL``).

    ``SequenceGate(max_parked_per_key, max_parked_total)``. Keys (``bytes`` of at most
    ``GATE_KEY_MAX`` bytes) must be loaded before they are decided: ask ``missing()`` which
    keys the gate does not hold, read their state from storage and ``load()`` it. The caller
    persists ``last`` from ``dirty()`` and the parked payloads itself.

    Invariant: every parked sequence is greater than ``last + 1`` (a latest-mode event may
    jump ``last`` past parked sequences; those become stale and ``skip_gap`` discards them).
    """

    def __cinit__(self, max_parked_per_key, max_parked_total):
        self._entries = NULL
        self._index = NULL
        self._dirty = NULL
        self._max_per_key = _as_ll(max_parked_per_key)
        self._max_total = _as_ll(max_parked_total)
        if self._max_per_key < 0 or self._max_total < 0:
            raise ValueError("parking limits must be >= 0")
        self._parking = {}
        self._parked_total = 0
        self._reset(_MIN_SIZE)

    def __dealloc__(self):
        PyMem_Free(self._entries)
        PyMem_Free(self._index)
        PyMem_Free(self._dirty)

    # ----------------------------------------------------------------- the table
    cdef int _reset(self, Py_ssize_t size) except -1:
        """Empty table with ``size`` index slots (a power of two)."""
        cdef Py_ssize_t cap = size * 2 // 3
        cdef GateEntry* entries = <GateEntry*>PyMem_Malloc(cap * sizeof(GateEntry))
        cdef int32_t* index = <int32_t*>PyMem_Malloc(size * sizeof(int32_t))
        cdef int32_t* dirty = <int32_t*>PyMem_Malloc(cap * sizeof(int32_t))
        if entries == NULL or index == NULL or dirty == NULL:
            PyMem_Free(entries)
            PyMem_Free(index)
            PyMem_Free(dirty)
            raise MemoryError()
        memset(index, 0xFF, size * sizeof(int32_t))  # all _EMPTY
        PyMem_Free(self._entries)
        PyMem_Free(self._index)
        PyMem_Free(self._dirty)
        self._entries, self._index, self._dirty = entries, index, dirty
        self._size, self._cap = size, cap
        self._used = self._live = self._ndirty = 0
        return 0

    cdef Py_ssize_t _probe(self, const unsigned char* p, Py_ssize_t n) noexcept:
        """Index slot holding key ``p[:n]``, or -1."""
        cdef size_t mask = self._size - 1
        cdef size_t i = _key_hash(p, n) & mask
        cdef int32_t ix
        cdef GateEntry* e
        while True:
            ix = self._index[i]
            if ix == _EMPTY:
                return -1
            if ix >= 0:
                e = &self._entries[ix]
                if e.klen == n and memcmp(e.key, p, n) == 0:
                    return i
            i = (i + 1) & mask

    cdef Py_ssize_t _find(self, object g) except -2:
        """Entry number of key ``g``, or -1 (TypeError if ``g`` is unhashable)."""
        cdef Py_ssize_t pos
        if PyBytes_Check(g):
            pos = self._probe(<const unsigned char*>PyBytes_AS_STRING(g), PyBytes_GET_SIZE(g))
            return -1 if pos < 0 else self._index[pos]
        hash(g)  # a dict lookup would raise TypeError for an unhashable key
        return -1

    cdef Py_ssize_t _get(self, object g) except -1:
        """Entry number of key ``g``; KeyError if it is not loaded."""
        cdef Py_ssize_t ix = self._find(g)
        if ix < 0:
            raise KeyError(g)
        return ix

    cdef int _rebuild(self) except -1:
        """Compact the entries (order kept) into a table with room for twice the live keys."""
        cdef GateEntry* old = self._entries
        cdef int32_t* old_dirty = self._dirty
        cdef Py_ssize_t old_used = self._used, old_ndirty = self._ndirty
        cdef Py_ssize_t size = _MIN_SIZE, j, k = 0, nd = 0
        cdef size_t i, mask
        cdef int32_t* remap = <int32_t*>PyMem_Malloc(max(old_used, 1) * sizeof(int32_t))
        if remap == NULL:
            raise MemoryError()
        while size * 2 // 3 < 2 * self._live + 1:
            size *= 2
        if size > 0x40000000:
            PyMem_Free(remap)
            raise MemoryError("sequence gate: more than 2**29 keys")
        self._entries = NULL
        self._dirty = NULL
        try:
            self._reset(size)
        except MemoryError:
            self._entries, self._dirty = old, old_dirty
            PyMem_Free(remap)
            raise
        mask = size - 1
        for j in range(old_used):
            if old[j].flags & F_LIVE:
                self._entries[k] = old[j]
                remap[j] = k
                i = _key_hash(old[j].key, old[j].klen) & mask
                while self._index[i] != _EMPTY:
                    i = (i + 1) & mask
                self._index[i] = k
                k += 1
            else:
                remap[j] = -1
        for j in range(old_ndirty):
            if remap[old_dirty[j]] >= 0 and old[old_dirty[j]].flags & F_DIRTY:
                self._dirty[nd] = remap[old_dirty[j]]
                nd += 1
        self._used = self._live = k
        self._ndirty = nd
        PyMem_Free(old)
        PyMem_Free(old_dirty)
        PyMem_Free(remap)
        return 0

    cdef Py_ssize_t _insert(self, const unsigned char* p, Py_ssize_t n,
                            long long last) except -1:
        """Append a new entry for an absent key; returns its number."""
        cdef size_t mask, i
        cdef Py_ssize_t ix
        cdef GateEntry* e
        if self._used == self._cap:
            self._rebuild()
        mask = self._size - 1
        i = _key_hash(p, n) & mask
        while self._index[i] >= 0:  # the key is absent: the first free slot takes it
            i = (i + 1) & mask
        ix = self._used
        e = &self._entries[ix]
        memset(e, 0, sizeof(GateEntry))
        e.last = last
        e.klen = <uint8_t>n
        e.flags = F_LIVE
        memcpy(e.key, p, n)
        self._index[i] = <int32_t>ix
        self._used += 1
        self._live += 1
        return ix

    cdef int _remove_at(self, Py_ssize_t pos) noexcept:
        """Drop the key in index slot ``pos`` (its parked sequences are the caller's)."""
        self._entries[self._index[pos]].flags = 0
        self._index[pos] = _REMOVED
        self._live -= 1
        return 0

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
        return self._live

    def __contains__(self, gkey):
        return self._find(gkey) >= 0

    # ----------------------------------------------------------------- loading
    def missing(self, gkeys):
        """Distinct keys of ``gkeys`` (first-seen order) the gate holds no state for."""
        cdef set seen = set()
        cdef list out = []
        for g in gkeys:
            if self._find(g) < 0 and g not in seen:
                seen.add(g)
                out.append(g)
        return out

    def load(self, gkey, last, parked=()):
        """Set the state of ``gkey``: ``last`` applied sequence and ``(seq, parked_at)``
        pairs. Parked sequences ``<= last`` are stale and ignored. Replaces any state held
        for the key (and forgets that it was dirty). ValueError for a key longer than
        ``GATE_KEY_MAX`` bytes.
        """
        if type(gkey) is not bytes:
            raise TypeError(f"gkey must be bytes, not {type(gkey).__name__}")
        cdef Py_ssize_t n = PyBytes_GET_SIZE(gkey), ix
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(gkey)
        if n > C_GATE_KEY_MAX:
            raise ValueError(f"gate key of {n} bytes; at most {C_GATE_KEY_MAX}")
        cdef long long lst = _as_ll(last)
        cdef long long s
        cdef dict seqs = {}
        for seq, at in parked:
            s = _as_ll(seq)
            at = float(at)
            if s > lst:
                seqs[s] = at
        self._forget(gkey)
        ix = self._insert(p, n, lst)
        if seqs:
            self._parking[gkey] = _Parked(seqs, 0.0, True)
            self._entries[ix].flags |= F_PARKED
            self._parked_total += len(seqs)

    cdef int _forget(self, bytes g) except -1:
        cdef Py_ssize_t pos = self._probe(<const unsigned char*>PyBytes_AS_STRING(g),
                                          PyBytes_GET_SIZE(g))
        cdef _Parked pk
        if pos < 0:
            return 0
        if self._entries[self._index[pos]].flags & F_PARKED:
            pk = <_Parked>self._parking.pop(g)
            self._parked_total -= len(pk.seqs)
        self._remove_at(pos)
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
        cdef Py_ssize_t i, ix, n = len(keys)
        cdef const unsigned char* flags
        cdef unsigned char* c
        cdef long long s, last
        cdef GateEntry* e
        cdef list ready = []
        cdef double t
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
                ix = self._get(g)
                s = _as_ll(sq[i])
                # Entries move only when a load grows the table; the pointer is not kept
                # across a dict operation keyed by g (a bytes subclass could run code).
                e = &self._entries[ix]
                last = e.last
                if s <= last:
                    c[i] = C_STALE
                elif not flags[i]:  # latest mode
                    e.last = s
                    self._mark(ix)
                elif e.flags & F_PARKED and s in (<_Parked>self._parking[g]).seqs:
                    c[i] = C_STALE
                elif s == last + 1:
                    e = &self._entries[ix]
                    e.last = s
                    self._mark(ix)
                    if e.flags & F_PARKED:
                        self._drain(g, ix, i, ready)
                elif (self._nparked(g, ix) < self._max_per_key
                        and self._parked_total < self._max_total):
                    c[i] = C_PARK
                    self._park(g, ix, s, t)
                else:
                    c[i] = C_FULL
        finally:
            PyBuffer_Release(&fb)
        return codes, ready

    cdef inline void _mark(self, Py_ssize_t ix) noexcept:
        cdef GateEntry* e = &self._entries[ix]
        if not e.flags & F_DIRTY:
            e.flags |= F_DIRTY
            self._dirty[self._ndirty] = <int32_t>ix  # an entry is listed once: ndirty <= used
            self._ndirty += 1

    cdef Py_ssize_t _nparked(self, object g, Py_ssize_t ix) except -1:
        if not self._entries[ix].flags & F_PARKED:
            return 0
        return len((<_Parked>self._parking[g]).seqs)

    cdef int _park(self, object g, Py_ssize_t ix, long long s, double now) except -1:
        cdef _Parked pk
        if not self._entries[ix].flags & F_PARKED:
            pk = _Parked({}, now, False)
            self._parking[g] = pk
            self._entries[ix].flags |= F_PARKED
        else:
            pk = <_Parked>self._parking[g]
            if not pk.oldest_stale and now < pk.oldest_at:
                pk.oldest_at = now
        pk.seqs[s] = now
        self._parked_total += 1
        return 0

    cdef int _unpark(self, object g, Py_ssize_t ix, _Parked pk, long long s) except -1:
        del pk.seqs[s]
        self._parked_total -= 1
        if not pk.seqs:
            del self._parking[g]
            self._entries[ix].flags &= ~F_PARKED
        else:
            pk.oldest_stale = True
        return 0

    cdef int _drain(self, object g, Py_ssize_t ix, Py_ssize_t i, list ready) except -1:
        cdef _Parked pk = <_Parked>self._parking[g]
        cdef long long s
        while self._entries[ix].flags & F_PARKED and (self._entries[ix].last + 1) in pk.seqs:
            s = self._entries[ix].last + 1
            self._entries[ix].last = s
            self._unpark(g, ix, pk, s)
            ready.append((i, g, s))
        return 0

    # ----------------------------------------------------------------- gaps
    def expired(self, now, timeout):
        """Keys whose oldest parked event was parked at or before ``now - timeout``."""
        cdef double limit = float(now) - float(timeout)
        cdef _Parked pk
        cdef list out = []
        for g, obj in self._parking.items():
            pk = <_Parked>obj
            if pk.oldest_stale:
                pk.oldest_at = min(pk.seqs.values())
                pk.oldest_stale = False
            if pk.oldest_at <= limit:
                out.append(g)
        return out

    def skip_gap(self, gkey):
        """Give up on the gap before the parked sequences of ``gkey``: set ``last`` to
        ``min(parked) - 1`` and apply the contiguous run of parked sequences from there.

        Returns the sequences applied, in order (they are no longer parked); empty if
        nothing is parked. Stale parked sequences (``<= last``) are discarded first.
        """
        cdef Py_ssize_t ix = self._get(gkey)
        cdef list out = []
        cdef _Parked pk
        if not self._entries[ix].flags & F_PARKED:
            return []
        pk = <_Parked>self._parking[gkey]
        for s in sorted(pk.seqs):
            if s > self._entries[ix].last:
                break
            self._unpark(gkey, ix, pk, s)
        if not self._entries[ix].flags & F_PARKED:
            return []
        self._entries[ix].last = min(pk.seqs) - 1
        self._drain(gkey, ix, 0, out)
        self._mark(ix)
        return [r[2] for r in out]

    def drop_parked(self, gkey):
        """Remove every parked sequence of ``gkey``; returns them ascending and sets
        ``last = max(last, max(them))`` (dead-letter policy)."""
        cdef Py_ssize_t ix = self._get(gkey)
        cdef _Parked pk
        if not self._entries[ix].flags & F_PARKED:
            return []
        pk = <_Parked>self._parking.pop(gkey)
        self._entries[ix].flags &= ~F_PARKED
        cdef list out = sorted(pk.seqs)
        self._parked_total -= len(out)
        if out[-1] > self._entries[ix].last:
            self._entries[ix].last = out[-1]
            self._mark(ix)
        return out

    # ----------------------------------------------------------------- inspection
    def parked(self, gkey):
        """Parked sequences of ``gkey``, ascending."""
        cdef Py_ssize_t ix = self._get(gkey)
        if not self._entries[ix].flags & F_PARKED:
            return []
        return sorted((<_Parked>self._parking[gkey]).seqs)

    def last(self, gkey):
        """Last applied sequence of ``gkey``."""
        return self._entries[self._get(gkey)].last

    def dirty(self):
        """``(gkey, last)`` of keys whose ``last`` changed since the previous call, in the
        order they first changed; clears the dirty set."""
        cdef list out = []
        cdef Py_ssize_t j
        cdef GateEntry* e
        for j in range(self._ndirty):
            e = &self._entries[self._dirty[j]]
            if e.flags & F_DIRTY:  # a removed entry has flags 0
                e.flags &= ~F_DIRTY
                out.append((PyBytes_FromStringAndSize(<char*>e.key, e.klen), e.last))
        self._ndirty = 0
        return out

    # ----------------------------------------------------------------- housekeeping
    def clear(self):
        """Forget every key (e.g. after an aborted transaction)."""
        self._reset(_MIN_SIZE)
        self._parking = {}
        self._parked_total = 0

    def evict(self, max_keys):
        """Drop clean keys without parked events, oldest-loaded first, until at most
        ``max_keys`` keys are held. Returns how many were dropped."""
        cdef Py_ssize_t excess = self._live - PyNumber_Index(max_keys)
        cdef Py_ssize_t j, done = 0
        cdef GateEntry* e
        if excess <= 0:
            return 0
        for j in range(self._used):
            e = &self._entries[j]
            if e.flags == F_LIVE:  # live, clean, nothing parked
                self._remove_at(self._probe(e.key, e.klen))
                done += 1
                if done == excess:
                    break
        return done

    def __repr__(self):
        return (
            f"SequenceGate(keys={self._live}, parked_total={self._parked_total}, "
            f"max_parked_per_key={self._max_per_key}, max_parked_total={self._max_total})"
        )


# ------------------------------------------------------------------ JSON-exact documents
JSON_DEPTH = 256  # containers nested deeper than this: json_lossless says False
cdef int _JSON_DEPTH = JSON_DEPTH


def json_lossless(value):
    """False when orjson would encode `value` without error but decoding would not give it
    back: a NaN or infinite float (written as ``null``) or a tuple (read back as a list),
    anywhere in dict values and list items; also False for containers nested deeper than
    JSON_DEPTH. Anything else is True (what orjson refuses is not looked at here)."""
    return _lossless(<PyObject*>value, 0) == 1


# The walk runs no Python code (exact type compares, then the C type checks, which do not
# call __instancecheck__), so nothing can change the document under it: borrowed references.
cdef extern from "Python.h":
    ctypedef struct _PyTypeObj "PyTypeObject":
        pass
    _PyTypeObj* _type_of "Py_TYPE" (PyObject* o)
    _PyTypeObj _str_type "PyUnicode_Type"
    _PyTypeObj _int_type "PyLong_Type"
    _PyTypeObj _bool_type "PyBool_Type"
    _PyTypeObj _float_type "PyFloat_Type"
    _PyTypeObj _dict_type "PyDict_Type"
    _PyTypeObj _list_type "PyList_Type"
    PyObject* _none "Py_None"
    int _dict_next "PyDict_Next" (PyObject* d, Py_ssize_t* pos, PyObject** key,
                                  PyObject** value)
    Py_ssize_t _list_size "PyList_GET_SIZE" (PyObject* o)
    PyObject* _list_item "PyList_GET_ITEM" (PyObject* o, Py_ssize_t i)
    double _float_value "PyFloat_AS_DOUBLE" (PyObject* o)
    bint _is_float "PyFloat_Check" (PyObject* o)
    bint _is_dict "PyDict_Check" (PyObject* o)
    bint _is_list "PyList_Check" (PyObject* o)
    bint _is_tuple "PyTuple_Check" (PyObject* o)


cdef int _lossless(PyObject* v, int depth) noexcept:
    cdef _PyTypeObj* t = _type_of(v)
    cdef Py_ssize_t pos = 0, i, n
    cdef PyObject* x
    # the exact types of decoded documents first; then, for subclasses, the twin's checks
    if t is &_str_type or t is &_int_type or t is &_bool_type or v is _none:
        return 1
    if t is &_float_type:
        return 1 if isfinite(_float_value(v)) else 0
    if t is &_dict_type or (t is not &_list_type and _is_dict(v)):
        if depth >= _JSON_DEPTH:
            return 0
        while _dict_next(v, &pos, NULL, &x):
            if _lossless(x, depth + 1) == 0:
                return 0
        return 1
    if t is &_list_type or _is_list(v):
        if depth >= _JSON_DEPTH:
            return 0
        n = _list_size(v)
        for i in range(n):
            if _lossless(_list_item(v, i), depth + 1) == 0:
                return 0
        return 1
    if _is_float(v):
        return 1 if isfinite(_float_value(v)) else 0
    if _is_tuple(v):
        return 0
    return 1
