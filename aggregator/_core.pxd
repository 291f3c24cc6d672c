# Declarations of the compiled core (see _core.pyx; the reference twin is core_ref.py).

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t


@cython.final
cdef class BloomFilter:
    cdef Py_ssize_t _capacity
    cdef double _fp_rate
    cdef Py_ssize_t _max_gens
    cdef uint64_t _m              # bits per generation (multiple of 64)
    cdef Py_ssize_t _k            # hash count
    cdef Py_ssize_t _nwords       # uint64 words per generation
    cdef uint64_t* _bits          # _max_gens * _nwords words, one slot per generation
    cdef uint64_t* _idx           # scratch: the k bit indices of one item
    cdef int64_t* _live_ids       # live generation ids, oldest first
    cdef Py_ssize_t* _live_slots  # slot of each live generation
    cdef Py_ssize_t* _counts      # items added, per slot
    cdef Py_ssize_t* _free        # stack of free slots
    cdef Py_ssize_t _nlive
    cdef Py_ssize_t _nfree

    cdef inline uint64_t* _words(self, Py_ssize_t live_pos) noexcept
    cdef void _insert(self, Py_ssize_t live_pos, const unsigned char* p, Py_ssize_t n) noexcept
    cdef void _check_and_add(self, const unsigned char* p, Py_ssize_t n,
                             unsigned char* out) noexcept
    cdef void _contains(self, const unsigned char* p, Py_ssize_t n,
                        unsigned char* out) noexcept
    cdef int64_t _new_generation(self, int64_t gen) noexcept


cdef enum:
    C_GATE_KEY_MAX = 22   # GATE_KEY_MAX: an entry is 32 bytes
    F_LIVE = 1            # GateEntry.flags
    F_DIRTY = 2
    F_PARKED = 4


ctypedef struct GateEntry:
    int64_t last          # last applied sequence
    uint8_t klen
    uint8_t flags         # F_*; 0 = removed
    unsigned char key[C_GATE_KEY_MAX]   # zero-padded


@cython.final
cdef class _Parked:
    cdef dict seqs          # seq -> parked_at
    cdef double oldest_at   # min parked_at, valid unless oldest_stale
    cdef bint oldest_stale


@cython.final
cdef class SequenceGate:
    cdef long long _max_per_key
    cdef long long _max_total
    cdef GateEntry* _entries   # _cap entries, in load order; _used appended so far
    cdef int32_t* _index       # _size slots: entry number, -1 empty, -2 removed
    cdef int32_t* _dirty       # entry numbers in order of first change (_ndirty of _cap)
    cdef Py_ssize_t _size
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _used
    cdef Py_ssize_t _live
    cdef Py_ssize_t _ndirty
    cdef dict _parking         # gkey -> _Parked, keys with parked sequences, in order
    cdef Py_ssize_t _parked_total

    cdef int _reset(self, Py_ssize_t size) except -1
    cdef Py_ssize_t _probe(self, const unsigned char* p, Py_ssize_t n) noexcept
    cdef Py_ssize_t _find(self, object g) except -2
    cdef Py_ssize_t _get(self, object g) except -1
    cdef int _rebuild(self) except -1
    cdef Py_ssize_t _insert(self, const unsigned char* p, Py_ssize_t n,
                            long long last) except -1
    cdef int _remove_at(self, Py_ssize_t pos) noexcept
    cdef int _forget(self, bytes g) except -1
    cdef inline void _mark(self, Py_ssize_t ix) noexcept
    cdef Py_ssize_t _nparked(self, object g, Py_ssize_t ix) except -1
    cdef int _park(self, object g, Py_ssize_t ix, long long s, double now) except -1
    cdef int _unpark(self, object g, Py_ssize_t ix, _Parked pk, long long s) except -1
    cdef int _drain(self, object g, Py_ssize_t ix, Py_ssize_t i, list ready) except -1
