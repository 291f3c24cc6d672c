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
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from aggregator.protocol import FORWARD_HEAD as HEAD
from aggregator.protocol import FORWARD_MAGIC as MAGIC
from aggregator.protocol import FORWARD_NO_SEQUENCE as NO_SEQUENCE
from aggregator.protocol import FORWARD_UPDATE as UPDATE
from aggregator.protocol import FORWARD_VERSION as VERSION
from aggregator.protocol import MSG_FORWARD, Forwarded, unpack

from aggregator._slots cimport plain_layout

cdef extern from "Python.h":
    ctypedef struct PyTypeObject:
        PyObject* (*tp_alloc)(PyTypeObject*, Py_ssize_t)
    void Py_XDECREF(PyObject*)
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    object PyUnicode_DecodeUTF8(const char*, Py_ssize_t, const char*)
    object PyLong_FromLongLong(long long)

assert HEAD.size == 24 and UPDATE.size == 36

cdef int _MAGIC = MAGIC
cdef int _VERSION = VERSION
cdef int _NO_SEQUENCE = NO_SEQUENCE
cdef object _MSG_FORWARD = MSG_FORWARD
cdef int[7] _STR = [1, 3, 4, 5, 6, 7, 10]  # view key, id, source, type, time, subject, pk


# protocol.Forwarded, made and filled at its slots' offsets (as _envelope.pyx makes Events)
cdef enum:
    _F_ID, _F_SOURCE, _F_TYPE, _F_TIME, _F_SUBJECT, _F_SEQUENCE, _F_DATA, _F_PK, _F_ORIGIN, \
        _F_RAW
cdef Py_ssize_t _FW[10]
cdef PyTypeObject* _FWD_TYPE = <PyTypeObject*>Forwarded


plain_layout(Forwarded, ("id", "source", "type", "time", "subject", "sequence", "data",
                         "partitionkey", "origin", "raw"), "_forwards", _FW)


cdef inline object _new_forwarded():
    """``Forwarded.__new__(Forwarded)``: every slot empty."""
    cdef PyObject* o = _FWD_TYPE.tp_alloc(_FWD_TYPE, 0)
    if o == NULL:
        raise MemoryError()
    cdef object f = <object>o
    Py_DECREF(f)  # <object> took a second reference
    return f


cdef inline void _fset(object f, int i, object v) noexcept:
    """``f.<slot i> = v``."""
    cdef PyObject** at = <PyObject**>(<char*><PyObject*>f + _FW[i])
    cdef PyObject* old = at[0]
    Py_INCREF(v)
    at[0] = <PyObject*>v
    Py_XDECREF(old)


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


# ---- the updates' data, msgpack as protocol.pack writes it ---------------------------------
# `protocol.pack` is ``msgpack.Packer(use_bin_type=True).pack``; `_pack` writes the same bytes
# for the exact types the events' data holds (None, bool, int, float, str, bytes, list,
# tuple, dict) and returns False for anything else, a string msgpack would not encode, an int
# out of 64 bits or nesting deeper than _MAX_DEPTH: that data is then packed by msgpack
# whole (`pack_data`, or every update's data of `encode_message`), so every value, and every
# error, is msgpack's own.

cdef enum:
    _MAX_DEPTH = 64  # msgpack's own limit is 511 levels (DEFAULT_RECURSE_LIMIT)

cdef extern from "Python.h":
    bint PyUnicode_CheckExact(object)
    bint PyLong_CheckExact(object)
    bint PyFloat_CheckExact(object)
    bint PyBytes_CheckExact(object)
    bint PyDict_CheckExact(object)
    bint PyList_CheckExact(object)
    bint PyTuple_CheckExact(object)
    double PyFloat_AS_DOUBLE(object)
    int PyDict_Next(object, Py_ssize_t*, PyObject**, PyObject**)
    Py_ssize_t PyDict_GET_SIZE(object)
    Py_ssize_t PyTuple_GET_SIZE(object)
    PyObject* PyTuple_GET_ITEM(object, Py_ssize_t)
    # no `except`: the errors are looked at here (PyErr_Occurred) and cleared
    long long PyLong_AsLongLongAndOverflow(object, int*)
    unsigned long long PyLong_AsUnsignedLongLong(object)
    const char* PyUnicode_AsUTF8AndSize_NoErr "PyUnicode_AsUTF8AndSize"(object, Py_ssize_t*)
    PyObject* PyErr_Occurred()
    void PyErr_Clear()

cdef object _pack_whole = None  # protocol.pack, bound at first use


cdef inline void _be_put16(char* w, uint32_t v) noexcept:
    w[0] = <char>(v >> 8)
    w[1] = <char>v


cdef inline void _be_put32(char* w, uint32_t v) noexcept:
    w[0] = <char>(v >> 24)
    w[1] = <char>(v >> 16)
    w[2] = <char>(v >> 8)
    w[3] = <char>v


cdef inline void _be_put64(char* w, uint64_t v) noexcept:
    _be_put32(w, <uint32_t>(v >> 32))
    _be_put32(w + 4, <uint32_t>v)


cdef int _head(_Buf b, Py_ssize_t n, unsigned char fix, unsigned char fixmax,
               unsigned char c8, unsigned char c16, unsigned char c32) except -1:
    """A msgpack length head: fix|n below `fixmax`, else the 8 (c8 != 0), 16 or 32 bit form."""
    cdef char* w = b.room(5)
    if n < fixmax:
        w[0] = <char>(fix | n)
        b.n += 1
    elif c8 != 0 and n < 0x100:
        w[0] = <char>c8
        w[1] = <char>n
        b.n += 2
    elif n < 0x10000:
        w[0] = <char>c16
        _be_put16(w + 1, <uint32_t>n)
        b.n += 3
    else:
        w[0] = <char>c32
        _be_put32(w + 1, <uint32_t>n)
        b.n += 5
    return 0


cdef int _int(_Buf b, object o) except -1:
    """An int as msgpack's pack_long_long/pack_unsigned_long_long write it; 0: too large."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(o, &overflow)
    cdef unsigned long long u
    cdef char* w = b.room(9)
    if overflow != 0:
        if overflow < 0:
            return 0
        u = PyLong_AsUnsignedLongLong(o)  # above 2**63 - 1
        if u == <unsigned long long>-1 and PyErr_Occurred() != NULL:
            PyErr_Clear()
            return 0
        w[0] = <char>0xcf
        _be_put64(w + 1, u)
        b.n += 9
        return 1
    if v >= 0:
        u = <unsigned long long>v
        if u < 0x80:
            w[0] = <char>u
            b.n += 1
        elif u < 0x100:
            w[0] = <char>0xcc
            w[1] = <char>u
            b.n += 2
        elif u < 0x10000:
            w[0] = <char>0xcd
            _be_put16(w + 1, <uint32_t>u)
            b.n += 3
        elif u < 0x100000000:
            w[0] = <char>0xce
            _be_put32(w + 1, <uint32_t>u)
            b.n += 5
        else:
            w[0] = <char>0xcf
            _be_put64(w + 1, u)
            b.n += 9
    elif v >= -32:
        w[0] = <char>v
        b.n += 1
    elif v >= -128:
        w[0] = <char>0xd0
        w[1] = <char>v
        b.n += 2
    elif v >= -32768:
        w[0] = <char>0xd1
        _be_put16(w + 1, <uint32_t>v)
        b.n += 3
    elif v >= -2147483648:
        w[0] = <char>0xd2
        _be_put32(w + 1, <uint32_t>v)
        b.n += 5
    else:
        w[0] = <char>0xd3
        _be_put64(w + 1, <uint64_t>v)
        b.n += 9
    return 1


cdef int _pack(_Buf b, object o, int depth) except -1:
    """Append `o` as msgpack; 0 (the buffer's end undefined): msgpack must pack it."""
    cdef Py_ssize_t n, i, pos
    cdef const char* s
    cdef char* w
    cdef PyObject* k
    cdef PyObject* v
    cdef double d
    cdef uint64_t bits
    if o is None:
        b.room(1)[0] = <char>0xc0
        b.n += 1
        return 1
    if o is True:
        b.room(1)[0] = <char>0xc3
        b.n += 1
        return 1
    if o is False:
        b.room(1)[0] = <char>0xc2
        b.n += 1
        return 1
    if PyUnicode_CheckExact(o):
        s = PyUnicode_AsUTF8AndSize_NoErr(o, &n)
        if s == NULL:  # not encodable (a lone surrogate): msgpack's error
            PyErr_Clear()
            return 0
        if n > 0xFFFFFFFF:
            return 0
        _head(b, n, 0xa0, 32, 0xd9, 0xda, 0xdb)
        memcpy(b.room(n), s, n)
        b.n += n
        return 1
    if PyLong_CheckExact(o):
        return _int(b, o)
    if PyFloat_CheckExact(o):
        d = PyFloat_AS_DOUBLE(o)
        memcpy(&bits, &d, 8)
        w = b.room(9)
        w[0] = <char>0xcb
        _be_put64(w + 1, bits)
        b.n += 9
        return 1
    if depth >= _MAX_DEPTH:
        return 0
    if PyDict_CheckExact(o):
        n = PyDict_GET_SIZE(o)
        if n > 0xFFFFFFFF:
            return 0
        _head(b, n, 0x80, 16, 0, 0xde, 0xdf)
        pos = 0
        while PyDict_Next(o, &pos, &k, &v):
            if not _pack(b, <object>k, depth + 1) or not _pack(b, <object>v, depth + 1):
                return 0
        return 1
    if PyList_CheckExact(o):
        n = PyList_GET_SIZE(o)
        if n > 0xFFFFFFFF:
            return 0
        _head(b, n, 0x90, 16, 0, 0xdc, 0xdd)
        for i in range(n):  # the list is not changed meanwhile: nothing here runs Python
            if not _pack(b, <object>PyList_GET_ITEM(o, i), depth + 1):
                return 0
        return 1
    if PyTuple_CheckExact(o):
        n = PyTuple_GET_SIZE(o)
        _head(b, n, 0x90, 16, 0, 0xdc, 0xdd)
        for i in range(n):
            if not _pack(b, <object>PyTuple_GET_ITEM(o, i), depth + 1):
                return 0
        return 1
    if PyBytes_CheckExact(o):
        n = PyBytes_GET_SIZE(o)
        if n > 0xFFFFFFFF:
            return 0
        _head(b, n, 0, 0, 0xc4, 0xc5, 0xc6)
        memcpy(b.room(n), PyBytes_AS_STRING(o), n)
        b.n += n
        return 1
    return 0


cdef object _msgpack_pack(object o):
    global _pack_whole
    if _pack_whole is None:
        from aggregator.protocol import pack
        _pack_whole = pack
    return _pack_whole(o)


cdef int _put_bytes(_Buf b, bytes data) except -1:
    memcpy(b.room(PyBytes_GET_SIZE(data)), PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    b.n += PyBytes_GET_SIZE(data)
    return 0


def pack_data(object o):
    """`protocol.pack(o)` (its bytes; its error), packed here for the common types."""
    cdef _Buf b = _Buf(256)
    if not _pack(b, o, 0):
        return _msgpack_pack(o)
    return PyBytes_FromStringAndSize(b.p, b.n)


def encode_message(object src_, object seq_, list updates):
    """The whole format 2 message of `updates` (``forwards._message_ref`` of their frames
    and ``pack([u[UPD_DATA] ...])``), or None if one of them does not fit format 2."""
    cdef Py_ssize_t k, j, start, count = PyList_GET_SIZE(updates)
    cdef _Buf b
    cdef char* w
    cdef long long src, seq
    if not (type(src_) is int and type(seq_) is int and 0 <= src_ <= 0xFFFFFFFF and
            -0x8000000000000000 <= seq_ <= 0x7FFFFFFFFFFFFFFF and count <= 0xFFFFFFFF):
        HEAD.pack(_MAGIC, _VERSION, 0, src_, seq_, count, 0)  # its error, as the reference
        return None
    src = src_
    seq = seq_
    b = _Buf(512 * count + 64)
    w = b.room(24)
    w[0] = <char>_MAGIC
    w[1] = <char>_VERSION
    (<uint16_t*>(w + 2))[0] = 0
    (<uint32_t*>(w + 4))[0] = <uint32_t>src
    memcpy(w + 8, &seq, 8)
    (<uint32_t*>(w + 16))[0] = <uint32_t>count
    (<uint32_t*>(w + 20))[0] = 0
    b.n += 24
    for k in range(count):
        if not _put_update(b, <list>PyList_GET_ITEM(updates, k)):
            return None
    start = b.n
    _head(b, count, 0x90, 16, 0, 0xdc, 0xdd)
    for k in range(count):
        if not _pack(b, (<list>PyList_GET_ITEM(updates, k))[9], 1):
            b.n = start  # msgpack packs the data array whole: its bytes, its errors
            _put_bytes(b, _msgpack_pack([(<list>PyList_GET_ITEM(updates, j))[9]
                                         for j in range(count)]))
            break
    return PyBytes_FromStringAndSize(b.p, b.n)


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



cdef inline uint32_t _be16(const unsigned char* q) noexcept:
    return (<uint32_t>q[0] << 8) | q[1]


cdef inline uint32_t _be32(const unsigned char* q) noexcept:
    return (<uint32_t>q[0] << 24) | (<uint32_t>q[1] << 16) | (<uint32_t>q[2] << 8) | q[3]


cdef inline uint64_t _be64(const unsigned char* q) noexcept:
    return (<uint64_t>_be32(q) << 32) | _be32(q + 4)


cdef Py_ssize_t _skip(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end) except -1:
    """The position after the msgpack object at `pos` (nested ones included)."""
    cdef Py_ssize_t n = 1, need
    cdef unsigned char b
    while n > 0:
        if pos >= end:
            raise ValueError("forwarded updates: truncated data")
        b = p[pos]
        n -= 1
        if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3:
            pos += 1
            continue
        if b <= 0x8f:
            n += 2 * (b & 0x0f)
            pos += 1
            continue
        if b <= 0x9f:
            n += b & 0x0f
            pos += 1
            continue
        if b <= 0xbf:
            pos += 1 + (b & 0x1f)
            continue
        need = 1 if b in (0xc4, 0xc7, 0xd9) else 2 if b in (0xc5, 0xc8, 0xda, 0xdc, 0xde) \
            else 4 if b in (0xc6, 0xc9, 0xdb, 0xdd, 0xdf) else 0
        if pos + 1 + need > end:
            raise ValueError("forwarded updates: truncated data")
        if b == 0xc4 or b == 0xd9:
            pos += 2 + p[pos + 1]
        elif b == 0xc5 or b == 0xda:
            pos += 3 + _be16(p + pos + 1)
        elif b == 0xc6 or b == 0xdb:
            pos += 5 + _be32(p + pos + 1)
        elif b == 0xc7:
            pos += 3 + p[pos + 1]
        elif b == 0xc8:
            pos += 4 + _be16(p + pos + 1)
        elif b == 0xc9:
            pos += 6 + _be32(p + pos + 1)
        elif b == 0xca or b == 0xce or b == 0xd2:
            pos += 5
        elif b == 0xcb or b == 0xcf or b == 0xd3:
            pos += 9
        elif b == 0xcc or b == 0xd0:
            pos += 2
        elif b == 0xcd or b == 0xd1:
            pos += 3
        elif b == 0xd4:
            pos += 3
        elif b == 0xd5:
            pos += 4
        elif b == 0xd6:
            pos += 6
        elif b == 0xd7:
            pos += 10
        elif b == 0xd8:
            pos += 18
        elif b == 0xdc:
            n += _be16(p + pos + 1)
            pos += 3
        elif b == 0xdd:
            n += _be32(p + pos + 1)
            pos += 5
        elif b == 0xde:
            n += 2 * <Py_ssize_t>_be16(p + pos + 1)
            pos += 3
        elif b == 0xdf:
            n += 2 * <Py_ssize_t>_be32(p + pos + 1)
            pos += 5
        else:  # 0xc1: never used
            raise ValueError("forwarded updates: invalid msgpack in the data")
    if pos > end:
        raise ValueError("forwarded updates: truncated data")
    return pos


cdef inline bint _str_head(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                           Py_ssize_t* start, Py_ssize_t* n) noexcept:
    """A msgpack str at `pos`: its bytes' start and length (False: not a str)."""
    cdef unsigned char b = p[pos]
    if 0xa0 <= b <= 0xbf:
        start[0] = pos + 1
        n[0] = b & 0x1f
    elif b == 0xd9 and pos + 2 <= end:
        start[0] = pos + 2
        n[0] = p[pos + 1]
    elif b == 0xda and pos + 3 <= end:
        start[0] = pos + 3
        n[0] = _be16(p + pos + 1)
    elif b == 0xdb and pos + 5 <= end:
        start[0] = pos + 5
        n[0] = _be32(p + pos + 1)
    else:
        return False
    return start[0] + n[0] <= end


cdef object _value(bytes msg, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end):
    """The msgpack object at p[pos:end], as `protocol.unpack` reads it: scalars here, the
    rest through msgpack."""
    cdef unsigned char b = p[pos]
    cdef Py_ssize_t start, n
    cdef uint64_t u
    cdef double d
    if b <= 0x7f:
        return PyLong_FromLongLong(b)
    if b >= 0xe0:
        return PyLong_FromLongLong(<signed char>b)
    if _str_head(p, pos, end, &start, &n) and start + n == end:
        return PyUnicode_DecodeUTF8(<const char*>p + start, n, NULL)
    if b == 0xc0:
        return None
    if b == 0xc2:
        return False
    if b == 0xc3:
        return True
    if b == 0xcb and end - pos == 9:
        u = _be64(p + pos + 1)
        memcpy(&d, &u, 8)
        return d
    if b == 0xcc and end - pos == 2:
        return PyLong_FromLongLong(p[pos + 1])
    if b == 0xcd and end - pos == 3:
        return PyLong_FromLongLong(_be16(p + pos + 1))
    if b == 0xce and end - pos == 5:
        return PyLong_FromLongLong(_be32(p + pos + 1))
    if b == 0xd0 and end - pos == 2:
        return PyLong_FromLongLong(<signed char>p[pos + 1])
    if b == 0xd1 and end - pos == 3:
        return PyLong_FromLongLong(<int16_t>_be16(p + pos + 1))
    if b == 0xd2 and end - pos == 5:
        return PyLong_FromLongLong(<int32_t>_be32(p + pos + 1))
    if b == 0xd3 and end - pos == 9:
        return PyLong_FromLongLong(<int64_t>_be64(p + pos + 1))
    return unpack(msg[pos:end])


cdef object _projected(bytes msg, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                       tuple want, tuple names):
    """The map at p[pos:end] with only its str keys in `want` (UTF-8 bytes; `names` the
    same as str), in the map's order; None if it is not a map."""
    cdef unsigned char b = p[pos]
    cdef Py_ssize_t count, i, j, ks, kn, kend, vend, nw = len(want)
    cdef dict d
    cdef bytes w
    if 0x80 <= b <= 0x8f:
        count = b & 0x0f
        pos += 1
    elif b == 0xde and pos + 3 <= end:
        count = _be16(p + pos + 1)
        pos += 3
    elif b == 0xdf and pos + 5 <= end:
        count = _be32(p + pos + 1)
        pos += 5
    else:
        return None
    d = {}
    for i in range(count):
        if pos >= end:
            raise ValueError("forwarded updates: truncated data")
        kend = _skip(p, pos, end)
        vend = _skip(p, kend, end)
        if _str_head(p, pos, end, &ks, &kn) and ks + kn == kend:
            for j in range(nw):
                w = <bytes>want[j]
                if PyBytes_GET_SIZE(w) == kn and memcmp(PyBytes_AS_STRING(w), p + ks, kn) == 0:
                    d[names[j]] = _value(msg, p, kend, vend)
                    break
        pos = vend
    if pos != end:
        raise ValueError("forwarded updates: bytes after a data map")
    return d


def decode(bytes msg, list keys=None):
    """``[MSG_FORWARD, from worker, link seq, updates]`` of a message of either format, each
    update ``(feed id, view key, slot, Forwarded)``. `keys`: per feed id None, or the
    top-level data fields its merge ops read, ``(UTF-8 bytes, str)`` (forwards.data_keys):
    the data of a format 2 update is then read as that projection (its whole bytes kept in
    ``Forwarded.raw`` for a dead letter)."""
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
        fwd = _new_forwarded()  # its data is set below, from the message's data array
        key = _str_at(p, &pos, end)
        _fset(fwd, _F_ID, _str_at(p, &pos, end))
        _fset(fwd, _F_SOURCE, _str_at(p, &pos, end))
        _fset(fwd, _F_TYPE, _str_at(p, &pos, end))
        _fset(fwd, _F_TIME, _str_at(p, &pos, end))
        _fset(fwd, _F_SUBJECT, _str_at(p, &pos, end))
        _fset(fwd, _F_PK, _str_at(p, &pos, end))
        _fset(fwd, _F_SEQUENCE,
              None if flags & _NO_SEQUENCE else PyLong_FromLongLong(sequence))
        _fset(fwd, _F_ORIGIN, [ti, part, PyLong_FromLongLong(off)])
        _fset(fwd, _F_RAW, None)
        u = (feed, key, slot, fwd)
        Py_INCREF(u)
        PyList_SET_ITEM(updates, k, u)
    if keys is None:
        datas = unpack(msg[pos:])
        if type(datas) is not list or len(datas) != count:
            raise ValueError("forwarded updates: data count does not match the updates")
        for k in range(count):
            _fset((<tuple>PyList_GET_ITEM(updates, k))[3], _F_DATA, datas[k])
        return [_MSG_FORWARD, src, seq, updates]
    _project_all(msg, <const unsigned char*>p, pos, end, count, updates, keys)
    return [_MSG_FORWARD, src, seq, updates]


cdef _project_all(bytes msg, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                  uint32_t count, list updates, list keys):
    """Each update's data from the msgpack array at p[pos:end]: projected where its feed
    reads only some top-level fields, else whole."""
    cdef Py_ssize_t n, k, vend
    cdef unsigned char b
    cdef tuple u, kw
    if pos >= end:
        raise ValueError("forwarded updates: truncated message")
    b = p[pos]
    if 0x90 <= b <= 0x9f:
        n = b & 0x0f
        pos += 1
    elif b == 0xdc and pos + 3 <= end:
        n = _be16(p + pos + 1)
        pos += 3
    elif b == 0xdd and pos + 5 <= end:
        n = _be32(p + pos + 1)
        pos += 5
    else:
        raise ValueError("forwarded updates: data count does not match the updates")
    if n != count:
        raise ValueError("forwarded updates: data count does not match the updates")
    for k in range(count):
        vend = _skip(p, pos, end)
        u = <tuple>PyList_GET_ITEM(updates, k)
        fwd = u[3]
        feed = u[0]
        kw = keys[feed] if feed < len(keys) else None
        d = None
        if kw is not None:
            d = _projected(msg, p, pos, vend, kw[0], kw[1])
        if d is None:
            _fset(fwd, _F_DATA, _value(msg, p, pos, vend))
        else:
            _fset(fwd, _F_DATA, d)
            _fset(fwd, _F_RAW, PyBytes_FromStringAndSize(<const char*>p + pos, vend - pos))
        pos = vend
    if pos != end:
        raise ValueError("forwarded updates: bytes after the data")
