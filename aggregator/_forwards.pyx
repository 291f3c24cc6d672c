# cython: language_level=3
"""Compiled encoder and decoder of forwarded view updates, format 2.

The fast twin of ``forwards.encode_ref``/``forwards.decode_ref`` (read them first: they are
the specification; the tests compare both byte for byte). ``forwards.py`` chooses, and cuts
messages to the peer ring's size around `encode_frames`.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy

from aggregator.protocol import FORWARD_HEAD as HEAD
from aggregator.protocol import FORWARD_MAGIC as MAGIC
from aggregator.protocol import FORWARD_NO_SEQUENCE as NO_SEQUENCE
from aggregator.protocol import FORWARD_UPDATE as UPDATE
from aggregator.protocol import FORWARD_VERSION as VERSION
from aggregator.protocol import MSG_FORWARD, Forwarded, unpack

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    object PyUnicode_DecodeUTF8(const char*, Py_ssize_t, const char*)
    object PyLong_FromLongLong(long long)

assert HEAD.size == 24 and UPDATE.size == 36

cdef int _MAGIC = MAGIC
cdef int _VERSION = VERSION
cdef int _NO_SEQUENCE = NO_SEQUENCE
cdef object _MSG_FORWARD = MSG_FORWARD
cdef int[7] _STR = [1, 3, 4, 5, 6, 7, 10]  # view key, id, source, type, time, subject, pk


@cython.final
cdef class _Buf:
    """A growing C buffer."""
    cdef char* p
    cdef Py_ssize_t n, cap

    def __cinit__(self, Py_ssize_t cap):
        self.p = <char*>PyMem_Malloc(cap)
        if self.p == NULL:
            raise MemoryError()
        self.cap = cap
        self.n = 0

    def __dealloc__(self):
        PyMem_Free(self.p)

    cdef char* room(self, Py_ssize_t k) except NULL:
        cdef Py_ssize_t cap = self.cap
        cdef char* q
        if self.n + k > cap:
            while self.n + k > cap:
                cap *= 2
            q = <char*>PyMem_Realloc(self.p, cap)
            if q == NULL:
                raise MemoryError()
            self.p = q
            self.cap = cap
        return self.p + self.n


cdef inline bint _is_int(object o):
    return type(o) is int


cdef bint _put_update(_Buf b, list u) except -1:
    """Append one update's fixed part and strings; False: it does not fit format 2."""
    cdef Py_ssize_t i, n
    cdef long long seq = 0
    cdef uint16_t flags = 0
    cdef const char* s
    cdef char* w
    cdef object o
    cdef long long feed, slot, ti, part, off
    if PyList_GET_SIZE(u) != 14:
        return False
    for i in (0, 2, 11, 12, 13):
        if not _is_int(u[i]):
            return False
    try:
        feed = u[0]
        slot = u[2]
        ti = u[11]
        part = u[12]
        off = u[13]
        o = u[8]
        if o is None:
            flags = _NO_SEQUENCE
        elif _is_int(o):
            seq = o
        else:
            return False
    except OverflowError:
        return False
    if (feed < 0 or feed > 0xFFFFFFFF or slot < 0 or slot > 0xFFFF or ti < -0x80000000 or
            ti > 0x7FFFFFFF or part < -0x80000000 or part > 0x7FFFFFFF):
        return False
    w = b.room(36)
    (<uint32_t*>w)[0] = <uint32_t>feed
    (<uint16_t*>(w + 4))[0] = <uint16_t>slot
    (<uint16_t*>(w + 6))[0] = flags
    (<int32_t*>(w + 8))[0] = <int32_t>ti
    (<int32_t*>(w + 12))[0] = <int32_t>part
    memcpy(w + 16, &off, 8)
    memcpy(w + 24, &seq, 8)
    (<int32_t*>(w + 32))[0] = 0
    b.n += 36
    for i in range(7):
        o = <object>PyList_GET_ITEM(u, _STR[i])
        if o is None and i != 0:
            w = b.room(4)
            (<int32_t*>w)[0] = -1
            b.n += 4
            continue
        if type(o) is not str:
            return False
        try:
            s = PyUnicode_AsUTF8AndSize(o, &n)
        except UnicodeEncodeError:
            return False
        if n > 0x7FFFFFFF:
            return False
        w = b.room(4 + n)
        (<int32_t*>w)[0] = <int32_t>n
        memcpy(w + 4, s, n)
        b.n += 4 + n
    return True


def encode_frames(list updates, bint each=False):
    """The fixed parts and strings of `updates` (format 2): [all of them] or, `each`, one
    bytes per update; None if one of them does not fit format 2."""
    cdef _Buf b = _Buf(4096)
    cdef Py_ssize_t k, start
    cdef list out = []
    for k in range(PyList_GET_SIZE(updates)):
        start = b.n
        if not _put_update(b, <list>PyList_GET_ITEM(updates, k)):
            return None
        if each:
            out.append(PyBytes_FromStringAndSize(b.p + start, b.n - start))
    if each:
        return out
    return [PyBytes_FromStringAndSize(b.p, b.n)]


cdef inline object _str_at(const char* p, Py_ssize_t* pos, Py_ssize_t end):
    cdef int32_t n
    if pos[0] + 4 > end:
        raise ValueError("forwarded updates: truncated message")
    memcpy(&n, p + pos[0], 4)
    pos[0] += 4
    if n < 0:
        return None
    if pos[0] + n > end:
        raise ValueError("forwarded updates: truncated message")
    s = PyUnicode_DecodeUTF8(p + pos[0], n, NULL)
    pos[0] += n
    return s


def decode(bytes msg):
    """``[MSG_FORWARD, from worker, link seq, updates]`` of a message of either format, each
    update ``(feed id, view key, slot, Forwarded)``."""
    cdef Py_ssize_t end = PyBytes_GET_SIZE(msg), pos, k
    cdef const char* p = PyBytes_AS_STRING(msg)
    cdef uint32_t src, count, feed
    cdef int64_t seq, off, sequence
    cdef uint16_t slot, flags
    cdef int32_t ti, part
    cdef list updates
    if end == 0 or <uint8_t>p[0] != _MAGIC:
        m = unpack(msg)
        m[3] = [(u[0], u[1], u[2], Forwarded(u)) for u in m[3]]
        return m
    if end < 24:
        raise ValueError("forwarded updates: truncated message")
    if <uint8_t>p[1] != _VERSION:
        raise ValueError(f"forwarded updates: format version {<uint8_t>p[1]} is not "
                         f"{_VERSION}")
    memcpy(&src, p + 4, 4)
    memcpy(&seq, p + 8, 8)
    memcpy(&count, p + 16, 4)
    pos = 24
    updates = PyList_New(count)
    new = Forwarded.__new__
    for k in range(count):
        if pos + 36 > end:
            raise ValueError("forwarded updates: truncated message")
        memcpy(&feed, p + pos, 4)
        memcpy(&slot, p + pos + 4, 2)
        memcpy(&flags, p + pos + 6, 2)
        memcpy(&ti, p + pos + 8, 4)
        memcpy(&part, p + pos + 12, 4)
        memcpy(&off, p + pos + 16, 8)
        memcpy(&sequence, p + pos + 24, 8)
        pos += 36
        fwd = new(Forwarded)
        key = _str_at(p, &pos, end)
        fwd.id = _str_at(p, &pos, end)
        fwd.source = _str_at(p, &pos, end)
        fwd.type = _str_at(p, &pos, end)
        fwd.time = _str_at(p, &pos, end)
        fwd.subject = _str_at(p, &pos, end)
        fwd.partitionkey = _str_at(p, &pos, end)
        fwd.sequence = None if flags & _NO_SEQUENCE else PyLong_FromLongLong(sequence)
        fwd.origin = [ti, part, PyLong_FromLongLong(off)]
        u = (feed, key, slot, fwd)
        Py_INCREF(u)
        PyList_SET_ITEM(updates, k, u)
    datas = unpack(msg[pos:])
    if type(datas) is not list or len(datas) != count:
        raise ValueError("forwarded updates: data count does not match the updates")
    for k in range(count):
        (<tuple>PyList_GET_ITEM(updates, k))[3].data = datas[k]
    return [_MSG_FORWARD, src, seq, updates]
