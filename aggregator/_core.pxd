# Declarations of the compiled core (see _core.pyx; the reference twin is core_ref.py).

cimport cython
from libc.stdint cimport int64_t, uint64_t


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


@cython.final
cdef class _KeyState:
    cdef long long last
    cdef dict parked        # seq -> parked_at; None until the key first parks
    cdef double oldest_at   # min parked_at, valid unless oldest_stale
    cdef bint oldest_stale
    cdef bint dirty


@cython.final
cdef class SequenceGate:
    cdef long long _max_per_key
    cdef long long _max_total
    cdef dict _states       # gkey -> _KeyState, in load order
    cdef dict _parking      # gkey -> _KeyState, keys that have parked sequences
    cdef dict _dirty        # gkey -> _KeyState, keys whose last changed
    cdef Py_ssize_t _parked_total

    cdef int _mark(self, object g, _KeyState st) except -1
    cdef int _park(self, object g, _KeyState st, long long s, double now) except -1
    cdef int _unpark(self, object g, _KeyState st, long long s) except -1
    cdef int _drain(self, object g, _KeyState st, Py_ssize_t i, list ready) except -1
    cdef int _forget(self, object g) except -1
