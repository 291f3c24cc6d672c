# cython: language_level=3
"""The compiled twin of idtable_ref.IdTable: a set of 18-byte dedup keys (2-byte slot +
16-byte identity hash) in one malloc'd open-addressing array, no Python object per id.

The identity hash is an xxhash-128 output, so its first 8 bytes are the table's hash (the
position is `fastrange` of them: any capacity, grown x1.5 at 80 % load). An all-zero key
marks an empty cell; the one genuine all-zero key is a flag. `seal_slice` sorts the keys once
(counting sort by slot, then each slot's few keys by memcmp) and keeps the sorted copy until
the next `add`.
"""

cimport cython
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, calloc, qsort
from libc.string cimport memcmp, memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

cdef enum:
    REC = 18
    SLOTS = 65536

cdef unsigned char ZERO[18]  # static: all zero


cdef extern from *:
    """
    static inline unsigned long long idt_fastrange(unsigned long long h, unsigned long long n) {
        return (unsigned long long)(((unsigned __int128)h * n) >> 64);
    }
    """
    unsigned long long idt_fastrange(unsigned long long h, unsigned long long n) nogil


cdef inline uint64_t _pos(const unsigned char* k, Py_ssize_t cap) noexcept nogil:
    cdef uint64_t h
    memcpy(&h, k + 2, 8)
    return idt_fastrange(h, <uint64_t>cap)


cdef int _cmp(const void* a, const void* b) noexcept nogil:
    return memcmp(a, b, REC)


cdef inline uint32_t _slot(const unsigned char* k) noexcept nogil:
    return (<uint32_t>k[0] << 8) | k[1]


@cython.final
cdef class IdTable:
    cdef unsigned char* cells
    cdef Py_ssize_t cap, count
    cdef bint has_zero
    cdef unsigned char* srt  # the keys sorted (None until seal_slice; dropped by add)
    cdef Py_ssize_t nsrt

    def __cinit__(self):
        self.cells = NULL
        self.srt = NULL
        self.cap = self.count = self.nsrt = 0
        self.has_zero = False

    def __dealloc__(self):
        free(self.cells)
        free(self.srt)

    def __len__(self):
        return self.count

    @property
    def nbytes(self) -> int:
        """Bytes malloc'd (the cells, plus the sorted copy while there is one)."""
        return REC * (self.cap + (self.nsrt if self.srt != NULL else 0))

    cdef int _grow(self) except -1:
        cdef Py_ssize_t old = self.cap, i
        cdef Py_ssize_t cap = old + old // 2 if old >= 1024 else 1024
        cdef unsigned char* cells = <unsigned char*>calloc(cap, REC)
        cdef unsigned char* prev = self.cells
        cdef uint64_t p
        if cells == NULL:
            raise MemoryError()
        for i in range(old):
            if memcmp(prev + i * REC, ZERO, REC) != 0:
                p = _pos(prev + i * REC, cap)
                while memcmp(cells + p * REC, ZERO, REC) != 0:
                    p += 1
                    if p == <uint64_t>cap:
                        p = 0
                memcpy(cells + p * REC, prev + i * REC, REC)
        self.cells, self.cap = cells, cap
        free(prev)
        return 0

    cdef bint _find(self, const unsigned char* k) noexcept nogil:
        cdef uint64_t p
        if self.cap == 0:
            return False
        p = _pos(k, self.cap)
        while memcmp(self.cells + p * REC, ZERO, REC) != 0:
            if memcmp(self.cells + p * REC, k, REC) == 0:
                return True
            p += 1
            if p == <uint64_t>self.cap:
                p = 0
        return False

    def add(self, bytes keys not None):
        """Add the 18-byte keys joined in `keys` (a key already there stays once)."""
        cdef Py_ssize_t n = len(keys), i
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(keys)
        cdef uint64_t p
        if n % REC:
            raise ValueError("keys: a multiple of 18 bytes")
        for i in range(0, n, REC):
            if memcmp(k + i, ZERO, REC) == 0:
                if not self.has_zero:
                    self.has_zero = True
                    self.count += 1
                    self._unsort()
                continue
            if (self.count + 1) * 5 > self.cap * 4:
                self._grow()
            p = _pos(k + i, self.cap)
            while True:
                if memcmp(self.cells + p * REC, ZERO, REC) == 0:
                    memcpy(self.cells + p * REC, k + i, REC)
                    self.count += 1
                    self._unsort()
                    break
                if memcmp(self.cells + p * REC, k + i, REC) == 0:
                    break
                p += 1
                if p == <uint64_t>self.cap:
                    p = 0

    cdef inline void _unsort(self) noexcept:
        if self.srt != NULL:
            free(self.srt)
            self.srt = NULL
            self.nsrt = 0

    def __contains__(self, bytes key not None):
        if len(key) != REC:
            raise ValueError("a key is 18 bytes")
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        if memcmp(k, ZERO, REC) == 0:
            return self.has_zero
        return self._find(k)

    cdef int _sort(self) except -1:
        cdef uint32_t* start = <uint32_t*>calloc(SLOTS + 1, sizeof(uint32_t))
        cdef unsigned char* out
        cdef Py_ssize_t i, j = 0
        cdef uint32_t s, acc = 0, c
        if start == NULL:
            raise MemoryError()
        out = <unsigned char*>malloc(max(self.count, 1) * REC)
        if out == NULL:
            free(start)
            raise MemoryError()
        if self.has_zero:
            memset(out, 0, REC)
            acc = 1
            start[0] = 0
        for i in range(self.cap):  # counting sort by slot
            if memcmp(self.cells + i * REC, ZERO, REC) != 0:
                start[_slot(self.cells + i * REC) + 1] += 1
        start[0] = acc
        for s in range(1, SLOTS + 1):
            start[s] += start[s - 1]
        for i in range(self.cap):
            if memcmp(self.cells + i * REC, ZERO, REC) != 0:
                s = _slot(self.cells + i * REC)
                memcpy(out + start[s] * REC, self.cells + i * REC, REC)
                start[s] += 1
        j = 0
        for s in range(SLOTS):  # start[s] is now the end of slot s
            c = start[s] - <uint32_t>j
            if c > 1:
                qsort(out + j * REC, c, REC, _cmp)
            j = start[s]
        free(start)
        self.srt, self.nsrt = out, self.count
        return 0

    def seal_slice(self, Py_ssize_t first_slot, Py_ssize_t budget):
        """(keys, next slot): the keys of slots >= first_slot in sorted order, at least
        `budget` of them unless fewer are left, whole slots; the next slot to seal after them,
        or 65536 when no key of a later slot is left."""
        cdef Py_ssize_t lo = 0, hi, mid, end
        cdef uint32_t last
        if self.srt == NULL:
            self._sort()
        hi = self.nsrt
        while lo < hi:  # the first key of a slot >= first_slot
            mid = (lo + hi) // 2
            if <Py_ssize_t>_slot(self.srt + mid * REC) < first_slot:
                lo = mid + 1
            else:
                hi = mid
        if lo == self.nsrt:
            return b"", SLOTS
        end = min(lo + max(budget, 1), self.nsrt)
        last = _slot(self.srt + (end - 1) * REC)
        while end < self.nsrt and _slot(self.srt + end * REC) == last:
            end += 1
        return (PyBytes_FromStringAndSize(<char*>self.srt + lo * REC, (end - lo) * REC),
                last + 1 if end < self.nsrt else SLOTS)

    def keys(self, Py_ssize_t first_slot=0):
        """The keys of slots >= first_slot, joined (in table order)."""
        return self._out(first_slot, 0)

    def hashes(self, Py_ssize_t first_slot=0):
        """The 16-byte identity hashes (the slot cut off) of the keys of slots >=
        first_slot, joined (in `keys` order)."""
        return self._out(first_slot, 2)

    cdef bytes _out(self, Py_ssize_t first_slot, Py_ssize_t cut):
        cdef Py_ssize_t size = REC - cut, i, j = 0
        cdef bytearray out = bytearray(self.count * size)
        cdef unsigned char* o = out
        cdef const unsigned char* c
        if self.has_zero and first_slot <= 0:
            j = size
        for i in range(self.cap):
            c = self.cells + i * REC
            if memcmp(c, ZERO, REC) != 0 and <Py_ssize_t>_slot(c) >= first_slot:
                memcpy(o + j, c + cut, size)
                j += size
        return bytes(out[:j])
