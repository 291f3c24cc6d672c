# cython: language_level=3
"""Compiled route-and-frame (supervisor) and frame reader (worker).

The fast twin of ``frames.FrameRouterRef`` and ``protocol.read_frames`` (read them first:
they are the specification; the tests compare both byte for byte). ``frames.py`` chooses.

Routing follows ``envelope.routing_key`` on the records it can decide exactly in C: str
header names in ASCII, bytes values, and for a structured event a strict JSON scan of the
top-level object (UTF-8 checked like ``bytes.decode``, the grammar of the stdlib's C
scanner, the last ``"partitionkey"`` member wins as in a dict). Anything else — a name
outside ASCII, a key or partition key written with escapes, an integer of more than 640
digits (Python's int limit is configurable above that), nesting deeper than 200 — is
handed to ``routing_key`` itself, so the outcome is the same by construction. The slot is
``XXH3_64bits(key) % 4096``, called in the xxhash library the ``xxhash`` package ships
(checked against ``xxhash.xxh3_64_intdigest`` at import).

Frames are written into one growing C buffer per worker and cut into ring messages at the
end of the round. Inner loops run on raw pointers whose bounds are checked explicitly.

A consumed confluent-kafka ``Message`` is read at its C fields (topic, key, value,
partition, offset, timestamp; `agg_cfl_message`, the layout of confluent-kafka 2.x) and its
headers where librdkafka holds them until ``headers()`` is called (``rd_kafka_header_get_all``
of the library confluent-kafka loaded): no accessor call and none of the ~25 objects
``headers()`` makes per record (a list, a tuple, a str and a bytes per header). The router
trusts the layout in two steps (`_cfl_check`, `reads_messages_in_place`): the fields, once
one consumed message's fields equalled what its accessors return; the headers too, once the
first message that has headers gave, read through librdkafka, the list ``headers()`` then
made of them (a message checked, or one whose header names ``headers()`` cannot decode, is
framed from the list ``headers()`` made). Otherwise, and for any other message type, a
record whose headers are taken already, a header name outside ASCII, an oversized value or
a mapped topic, it calls the accessors as before. tests/integration/test_route_in_place.py
holds the frames of both ways to each other on a real broker.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM

from aggregator._gc cimport PyObject_GC_UnTrack
from aggregator._utf8 cimport utf8_ok
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

import ctypes

import xxhash
import xxhash._xxhash

from aggregator.envelope import _JSON, _classify, _hstr_or_none, routing_key
from aggregator.protocol import (
    FRAME_HEAD,
    FRAME_HEADER,
    FRAMES_HEAD,
    FRAMES_MAGIC,
    FRAMES_THROUGH,
    FRAMES_VERSION,
    MSG_RECORDS,
)

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    bint PyUnicode_IS_ASCII(object)
    object PyUnicode_DecodeUTF8(const char*, Py_ssize_t, const char*)
    object PyLong_FromLongLong(long long)

cdef extern from "string.h" nogil:
    void* memmem(const void*, size_t, const void*, size_t)

ctypedef uint64_t (*xxh3_fn)(const void*, size_t) noexcept nogil

cdef xxh3_fn _xxh3 = NULL

cdef extern from "string.h" nogil:
    size_t strlen(const char*)

# confluent-kafka's Message object (confluent_kafka.h, 2.x): the fields `FrameRouter.route`
# reads where they lie instead of calling the accessors; `_cfl_check` holds a consumed
# message's fields to the accessors' answers before the router relies on them.
cdef extern from *:
    """
    typedef struct {
        PyObject_HEAD
        PyObject *topic;
        PyObject *value;
        PyObject *key;
        PyObject *headers;      /* the Python list, once headers() made it */
        void *c_headers;        /* librdkafka's rd_kafka_headers_t until then */
        PyObject *error;        /* None or NULL: no error */
        int32_t partition;
        int64_t offset;
        int32_t leader_epoch;
        int64_t timestamp;
        int tstype;
    } agg_cfl_message;
    """
    ctypedef struct agg_cfl_message:
        PyObject* topic
        PyObject* value
        PyObject* key
        PyObject* headers
        void* c_headers
        PyObject* error
        int32_t partition
        int64_t offset
        int64_t timestamp
        int tstype

# librdkafka's rd_kafka_header_get_all and rd_kafka_header_cnt (rdkafka.h), taken from the
# library confluent-kafka loaded (`_bind_headers`)
ctypedef int (*hdr_get_all_fn)(const void*, size_t, const char**, const void**,
                               size_t*) noexcept nogil
ctypedef size_t (*hdr_cnt_fn)(const void*) noexcept nogil
cdef hdr_get_all_fn _hdr_get_all = NULL
cdef hdr_cnt_fn _hdr_cnt = NULL


def _bind_headers():
    """The Message type of confluent-kafka, with librdkafka's header readers bound; None
    when either is missing (the router then calls the accessors)."""
    global _hdr_get_all, _hdr_cnt
    try:
        from confluent_kafka import Message
        from aggregator._publish import library_path
        lib = ctypes.CDLL(library_path())
        get_all = ctypes.cast(lib.rd_kafka_header_get_all, ctypes.c_void_p).value
        cnt = ctypes.cast(lib.rd_kafka_header_cnt, ctypes.c_void_p).value
    except (ImportError, OSError, AttributeError):
        return None
    cdef size_t a = get_all, c = cnt
    _hdr_get_all = <hdr_get_all_fn>a
    _hdr_cnt = <hdr_cnt_fn>c
    return Message


cdef inline bint _no_error(agg_cfl_message* cm) noexcept:
    return cm.error == NULL or cm.error == <PyObject*>None


cdef bint _ascii(const char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if <uint8_t>p[i] >= 0x80:
            return False
    return True


cdef list _c_headers_list(const void* hdrs):
    """The (name, value) list confluent-kafka's headers() makes of librdkafka's headers (names
    as UTF-8 str, a null value as None)."""
    cdef list out = []
    cdef size_t idx = 0, size = 0
    cdef const char* name = NULL
    cdef const void* val = NULL
    while _hdr_get_all(hdrs, idx, &name, &val, &size) == 0:
        idx += 1
        out.append((PyUnicode_DecodeUTF8(name, strlen(name), NULL),
                    None if val == NULL else PyBytes_FromStringAndSize(<const char*>val,
                                                                       size)))
    return out


def _bind_xxh3():
    """Find XXH3_64bits in the extension of the ``xxhash`` package (loaded already)."""
    global _xxh3
    lib = ctypes.CDLL(xxhash._xxhash.__file__)
    cdef size_t addr = ctypes.cast(lib.XXH3_64bits, ctypes.c_void_p).value
    _xxh3 = <xxh3_fn>addr
    for probe in (b"", b"a", b"customer-000001", bytes(range(256)) * 3):
        if xxh3_64(probe) != xxhash.xxh3_64_intdigest(probe):
            raise ImportError("aggregator._frames: XXH3_64bits of the xxhash package does not "
                              "match xxhash.xxh3_64_intdigest")


def xxh3_64(bytes b) -> int:
    """XXH3_64bits of `b` through the bound library function (tests compare)."""
    return _xxh3(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


_bind_xxh3()

assert FRAMES_HEAD.size == 24 and FRAMES_THROUGH.size == 16
assert FRAME_HEAD.size == 44 and FRAME_HEADER.size == 8

cdef enum:
    MSG_HEAD = 24
    THR_SIZE = 16
    FRAME_HEAD_SIZE = 44
    HDR_ITEM = 8
    NSLOTS = 4096
    KEEP_BYTES = 32 << 20  # a worker's frame buffer above this is freed after its round
    SCAN_BYTES = 1 << 20  # routing_key's default max_bytes: the JSON scan's limit
    MAX_DEPTH = 200
    MAX_INT_DIGITS = 640
    MAGIC = 0xC1
    VERSION = 1

# routing outcomes of the C path
cdef enum:
    RK_NONE = 0
    RK_FOUND = 1
    RK_DEFER = 2

# ---- little-endian stores and loads (x86-64: unaligned memcpy is one move) ---------------

assert FRAMES_MAGIC == MAGIC and FRAMES_VERSION == VERSION


cdef inline void _st32(char* p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)

cdef inline void _st16(char* p, uint16_t v) noexcept nogil:
    memcpy(p, &v, 2)

cdef inline void _st64(char* p, int64_t v) noexcept nogil:
    memcpy(p, &v, 8)

cdef inline uint32_t _ld32(const char* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v

cdef inline int32_t _ldi32(const char* p) noexcept nogil:
    cdef int32_t v
    memcpy(&v, p, 4)
    return v

cdef inline uint16_t _ld16(const char* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v

cdef inline int64_t _ld64(const char* p) noexcept nogil:
    cdef int64_t v
    memcpy(&v, p, 8)
    return v


# ---- JSON: what the stdlib's C scanner accepts (UTF-8: _utf8.pxd) ------------------------

cdef inline bint _hex(uint8_t c) noexcept nogil:
    return (c >= 48 and c <= 57) or (c >= 65 and c <= 70) or (c >= 97 and c <= 102)


cdef inline bint _digit(uint8_t c) noexcept nogil:
    return c >= 48 and c <= 57


cdef inline Py_ssize_t _ws(const uint8_t* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (s[i] == 32 or s[i] == 9 or s[i] == 10 or s[i] == 13):
        i += 1
    return i


cdef struct Scan:
    const uint8_t* s
    Py_ssize_t n
    bint defer  # a case the C path leaves to Python (see the module docstring)


cdef Py_ssize_t _string(Scan* sc, Py_ssize_t i, bint* escaped) noexcept nogil:
    """At the opening quote: the index after the closing quote, or -1 (invalid)."""
    cdef const uint8_t* s = sc.s
    cdef Py_ssize_t n = sc.n
    cdef uint8_t c
    escaped[0] = False
    i += 1
    while i < n:
        c = s[i]
        if c == 34:  # "
            return i + 1
        if c == 92:  # backslash
            escaped[0] = True
            if i + 1 >= n:
                return -1
            c = s[i + 1]
            if c == 117:  # u
                if i + 5 >= n or not (_hex(s[i + 2]) and _hex(s[i + 3]) and _hex(s[i + 4])
                                      and _hex(s[i + 5])):
                    return -1
                i += 6
                continue
            if (c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110
                    or c == 114 or c == 116):
                i += 2
                continue
            return -1
        if c < 32:
            return -1
        i += 1
    return -1


cdef Py_ssize_t _number(Scan* sc, Py_ssize_t i) noexcept nogil:
    """A JSON number at i: the index after it, or -1."""
    cdef const uint8_t* s = sc.s
    cdef Py_ssize_t n = sc.n
    cdef Py_ssize_t start, e
    cdef bint is_float = False
    if s[i] == 45:  # -
        i += 1
        if i >= n:
            return -1
    start = i
    if s[i] >= 49 and s[i] <= 57:
        i += 1
        while i < n and _digit(s[i]):
            i += 1
    elif s[i] == 48:
        i += 1
    else:
        return -1
    if i + 1 < n and s[i] == 46 and _digit(s[i + 1]):  # .digit
        is_float = True
        i += 2
        while i < n and _digit(s[i]):
            i += 1
    if i < n and (s[i] == 101 or s[i] == 69):  # e E
        e = i
        i += 1
        if i < n and (s[i] == 45 or s[i] == 43):
            i += 1
        if i < n and _digit(s[i]):
            is_float = True
            while i < n and _digit(s[i]):
                i += 1
        else:
            i = e
    if not is_float and i - start > MAX_INT_DIGITS:
        sc.defer = True
    return i


cdef Py_ssize_t _value(Scan* sc, Py_ssize_t i, int depth) noexcept nogil:
    """A JSON value at i (no leading whitespace): the index after it, or -1."""
    cdef const uint8_t* s = sc.s
    cdef Py_ssize_t n = sc.n
    cdef uint8_t c
    cdef bint esc
    if i >= n:
        return -1
    c = s[i]
    if c == 34:
        return _string(sc, i, &esc)
    if c == 123 or c == 91:  # { [
        if depth >= MAX_DEPTH:
            sc.defer = True
            return -1
        return _container(sc, i, depth + 1)
    if c == 116:  # true
        return i + 4 if i + 4 <= n and memcmp(s + i, b"true", 4) == 0 else -1
    if c == 102:
        return i + 5 if i + 5 <= n and memcmp(s + i, b"false", 5) == 0 else -1
    if c == 110:
        return i + 4 if i + 4 <= n and memcmp(s + i, b"null", 4) == 0 else -1
    if c == 45 or _digit(c):
        return _number(sc, i)
    return -1  # NaN, Infinity (parse_constant rejects them) and everything else


cdef Py_ssize_t _container(Scan* sc, Py_ssize_t i, int depth) noexcept nogil:
    cdef const uint8_t* s = sc.s
    cdef Py_ssize_t n = sc.n
    cdef bint obj = s[i] == 123
    cdef uint8_t close = 125 if obj else 93
    cdef bint esc
    i = _ws(s, i + 1, n)
    if i < n and s[i] == close:
        return i + 1
    while True:
        if obj:
            if i >= n or s[i] != 34:
                return -1
            i = _string(sc, i, &esc)
            if i < 0:
                return -1
            i = _ws(s, i, n)
            if i >= n or s[i] != 58:  # :
                return -1
            i = _ws(s, i + 1, n)
        i = _value(sc, i, depth)
        if i < 0:
            return -1
        i = _ws(s, i, n)
        if i >= n:
            return -1
        if s[i] == close:
            return i + 1
        if s[i] != 44:  # ,
            return -1
        i = _ws(s, i + 1, n)


cdef int _scan_partitionkey(const uint8_t* s, Py_ssize_t n, Py_ssize_t* pk_at,
                            Py_ssize_t* pk_len) noexcept nogil:
    """The ``partitionkey`` of a structured event (the whole value, already known to hold
    ``"partitionkey"`` or ``\\u``): RK_FOUND with the string's bytes, RK_NONE (not a JSON
    object, no such member, not a non-empty string: the Kafka key applies), or RK_DEFER."""
    cdef Scan sc
    cdef Py_ssize_t i, k0, k1, v0, v1
    cdef bint esc, have = False, pk_esc = False
    if n == 0 or s[0] != 123:
        return RK_NONE
    if not utf8_ok(s, n):
        return RK_NONE
    sc.s, sc.n, sc.defer = s, n, False
    i = _ws(s, 1, n)
    if i < n and s[i] == 125:
        return RK_NONE
    while True:
        if i >= n or s[i] != 34:
            return RK_DEFER if sc.defer else RK_NONE
        k0 = i
        i = _string(&sc, i, &esc)
        if i < 0:
            return RK_NONE
        k1 = i
        if esc:
            sc.defer = True  # the name may spell partitionkey with escapes
        i = _ws(s, i, n)
        if i >= n or s[i] != 58:
            return RK_DEFER if sc.defer else RK_NONE
        i = _ws(s, i + 1, n)
        v0 = i
        i = _value(&sc, i, 1)
        if i < 0:
            return RK_DEFER if sc.defer else RK_NONE
        if k1 - k0 == 14 and memcmp(s + k0, b'"partitionkey"', 14) == 0:
            if s[v0] == 34:
                have = True
                pk_at[0] = v0 + 1
                pk_len[0] = i - v0 - 2
                pk_esc = memchr_backslash(s + v0 + 1, i - v0 - 2)
            else:
                have = False
        i = _ws(s, i, n)
        if i >= n:
            return RK_DEFER if sc.defer else RK_NONE
        if s[i] == 125:
            break
        if s[i] != 44:
            return RK_DEFER if sc.defer else RK_NONE
        i = _ws(s, i + 1, n)
    if sc.defer:
        return RK_DEFER
    if not have or pk_len[0] == 0:
        return RK_NONE
    if pk_esc:
        return RK_DEFER  # escapes: Python decodes them (and rejects lone surrogates)
    return RK_FOUND


cdef inline bint memchr_backslash(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if s[i] == 92:
            return True
    return False


# ---- header names -----------------------------------------------------------------------

cdef inline bint _ieq(const char* a, const char* lower, Py_ssize_t n) noexcept nogil:
    """ASCII case-insensitive equality of a with the lower-case `lower` (n bytes)."""
    cdef Py_ssize_t i
    cdef char c
    for i in range(n):
        c = a[i]
        if c >= 65 and c <= 90:
            c = c + 32
        if c != lower[i]:
            return False
    return True


# ---- the per-worker buffers ----------------------------------------------------------------

cdef struct Buf:
    char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int _reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap
    cdef char* p
    if b.n + extra <= b.cap:
        return 0
    cap = max(b.cap * 2, b.n + extra, 1 << 16)
    p = <char*>PyMem_Realloc(b.p, cap)
    if p == NULL:
        raise MemoryError()
    b.p = p
    b.cap = cap
    return 0


cdef Py_ssize_t _field_len(object o, str what) except -2:
    """The length of a record's key or value: -1 for None (TypeError unless bytes)."""
    if o is None:
        return -1
    if type(o) is not bytes:
        raise TypeError(f"record {what} must be bytes or None")
    return PyBytes_GET_SIZE(o)


cdef char* _frame_start(Buf* b, Py_ssize_t size, int32_t ti, int32_t part, int64_t off,
                        uint16_t slot, int64_t ts, object key, Py_ssize_t klen, object value,
                        Py_ssize_t vlen, Py_ssize_t nh) except NULL:
    """Room for a frame of `size` bytes in `b`, its head, key and value written: where its
    headers go (the caller ends with ``b.n += size``)."""
    _reserve(b, size)
    cdef char* p = b.p + b.n
    _st32(p, <uint32_t>size)
    _st32(p + 4, <uint32_t>ti)
    _st32(p + 8, <uint32_t>part)
    _st16(p + 12, slot)
    _st16(p + 14, 0)
    _st64(p + 16, off)
    _st64(p + 24, ts)
    _st32(p + 32, <uint32_t><int32_t>klen)
    _st32(p + 36, <uint32_t><int32_t>vlen)
    _st32(p + 40, <uint32_t><int32_t>nh)
    p += FRAME_HEAD_SIZE
    if klen > 0:
        memcpy(p, PyBytes_AS_STRING(key), klen)
        p += klen
    if vlen > 0:
        memcpy(p, PyBytes_AS_STRING(value), vlen)
        p += vlen
    return p


cdef struct Thr:
    int32_t ti
    int32_t part
    int64_t off


@cython.final
cdef class FrameRouter:
    """Compiled twin of frames.FrameRouterRef (same constructor, same `route`)."""

    cdef int workers
    cdef int ntopics
    cdef Py_ssize_t max_bytes
    cdef dict tindex
    cdef list detect
    cdef list route_fns
    cdef bint* detect_c
    cdef bint* mapped_c
    cdef Buf* bufs
    cdef Thr* thr
    cdef Py_ssize_t nthr
    cdef Py_ssize_t thr_cap
    cdef dict ct_json  # content-type bytes -> reads as JSON (routing_key's detect rule)
    # confluent-kafka Messages read at their fields (see agg_cfl_message): -1 not checked
    # yet, 0 no (the accessors), 2 the fields but not yet the headers (no message with
    # headers was checked), 1 fields and headers; `cfl_type` their type (None: not available)
    cdef int cfl
    cdef object cfl_type

    def __cinit__(self, int workers, dict tindex, detect, route_fns, Py_ssize_t max_bytes):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.tindex = dict(tindex)
        self.detect = list(detect)
        self.route_fns = list(route_fns)
        self.ntopics = len(self.detect)
        if len(self.route_fns) != self.ntopics:
            raise ValueError("detect and route_fns differ in length")
        self.max_bytes = max_bytes
        self.ct_json = {}
        self.cfl = -1
        self.cfl_type = None
        self.detect_c = <bint*>PyMem_Malloc(max(self.ntopics, 1) * sizeof(bint))
        self.mapped_c = <bint*>PyMem_Malloc(max(self.ntopics, 1) * sizeof(bint))
        self.bufs = <Buf*>PyMem_Malloc(workers * sizeof(Buf))
        self.thr_cap = 64
        self.thr = <Thr*>PyMem_Malloc(self.thr_cap * sizeof(Thr))
        if (self.detect_c == NULL or self.mapped_c == NULL or self.bufs == NULL
                or self.thr == NULL):
            raise MemoryError()
        memset(self.bufs, 0, workers * sizeof(Buf))
        for i in range(self.ntopics):
            self.detect_c[i] = bool(self.detect[i])
            self.mapped_c[i] = self.route_fns[i] is not None

    def __dealloc__(self):
        if self.bufs != NULL:
            for w in range(self.workers):
                PyMem_Free(self.bufs[w].p)
            PyMem_Free(self.bufs)
        PyMem_Free(self.detect_c)
        PyMem_Free(self.mapped_c)
        PyMem_Free(self.thr)

    cdef int _through(self, int32_t ti, int32_t part, int64_t off, Py_ssize_t* hint) except -1:
        cdef Py_ssize_t i = hint[0]
        cdef Thr* t
        if i < self.nthr and self.thr[i].ti == ti and self.thr[i].part == part:
            self.thr[i].off = off
            return 0
        for i in range(self.nthr):
            if self.thr[i].ti == ti and self.thr[i].part == part:
                self.thr[i].off = off
                hint[0] = i
                return 0
        if self.nthr == self.thr_cap:
            t = <Thr*>PyMem_Realloc(self.thr, 2 * self.thr_cap * sizeof(Thr))
            if t == NULL:
                raise MemoryError()
            self.thr = t
            self.thr_cap *= 2
        self.thr[self.nthr].ti = ti
        self.thr[self.nthr].part = part
        self.thr[self.nthr].off = off
        hint[0] = self.nthr
        self.nthr += 1
        return 0

    cdef bint _reads_as_json(self, object ct) except -1:
        hit = self.ct_json.get(ct)
        if hit is None:
            text = _hstr_or_none(ct)
            hit = text is not None and _classify(text)[0] == _JSON
            if len(self.ct_json) < 256:
                self.ct_json[ct] = hit
        return hit

    cdef int _route_c(self, object value, object headers, object key, bint detect,
                      const char** rk, Py_ssize_t* rklen) except -1:
        """routing_key in C: RK_FOUND (rk points into a live bytes object), RK_NONE, or
        RK_DEFER (let routing_key decide)."""
        cdef bint pk_seen = False, has_ce = False, structured
        cdef object ct = None
        cdef object item, name, hv
        cdef Py_ssize_t nlen, i, nh, vlen
        cdef const char* np
        cdef const uint8_t* vp
        cdef Py_ssize_t pk_at = 0, pk_len = 0
        cdef int r
        if headers is not None:
            if type(headers) is not list:
                return RK_DEFER
            nh = PyList_GET_SIZE(headers)
            for i in range(nh):
                item = <object>PyList_GET_ITEM(headers, i)
                if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
                    return RK_DEFER
                name = <object>PyTuple_GET_ITEM(item, 0)
                if type(name) is not str or not PyUnicode_IS_ASCII(name):
                    return RK_DEFER
                np = PyUnicode_AsUTF8AndSize(name, &nlen)
                if nlen == 15 and _ieq(np, b"ce_partitionkey", 15):
                    if not pk_seen:
                        pk_seen = True
                        hv = <object>PyTuple_GET_ITEM(item, 1)
                        if hv is None:
                            continue
                        if type(hv) is not bytes:
                            return RK_DEFER
                        if PyBytes_GET_SIZE(hv):
                            rk[0] = PyBytes_AS_STRING(hv)
                            rklen[0] = PyBytes_GET_SIZE(hv)
                            return RK_FOUND
                elif nlen == 12 and _ieq(np, b"content-type", 12):
                    if ct is None:
                        ct = <object>PyTuple_GET_ITEM(item, 1)
                elif nlen > 3 and _ieq(np, b"ce_", 3):
                    has_ce = True
        if ct is not None:
            if type(ct) is not bytes:
                return RK_DEFER
            structured = PyBytes_GET_SIZE(ct) >= 28 and _ieq(
                PyBytes_AS_STRING(ct), b"application/cloudevents+json", 28)
            if not structured and detect and not has_ce:
                structured = self._reads_as_json(ct)
        else:
            structured = detect and not has_ce
        return self._route_tail(value, key, structured, rk, rklen)

    cdef int _route_h(self, object value, const void* hdrs, object key, bint detect,
                      const char** rk, Py_ssize_t* rklen) except -1:
        """`_route_c` of a message whose headers are still librdkafka's (`hdrs`): the same
        answer, read from them in place. RK_DEFER for a header name outside ASCII."""
        cdef bint pk_seen = False, has_ce = False, structured
        cdef size_t idx = 0, size = 0
        cdef const char* name = NULL
        cdef const void* val = NULL
        cdef const char* ctp = NULL  # the first content-type with a value (None: NULL)
        cdef Py_ssize_t ctn = 0, nlen
        while _hdr_get_all(hdrs, idx, &name, &val, &size) == 0:
            idx += 1
            nlen = strlen(name)
            if not _ascii(name, nlen):
                return RK_DEFER
            if nlen == 15 and _ieq(name, b"ce_partitionkey", 15):
                if not pk_seen:
                    pk_seen = True
                    if val == NULL:
                        continue
                    if size:
                        rk[0] = <const char*>val
                        rklen[0] = size
                        return RK_FOUND
            elif nlen == 12 and _ieq(name, b"content-type", 12):
                if ctp == NULL:
                    ctp = <const char*>val
                    ctn = size
            elif nlen > 3 and _ieq(name, b"ce_", 3):
                has_ce = True
        if ctp != NULL:
            structured = ctn >= 28 and _ieq(ctp, b"application/cloudevents+json", 28)
            if not structured and detect and not has_ce:
                structured = self._reads_as_json(PyBytes_FromStringAndSize(ctp, ctn))
        else:
            structured = detect and not has_ce
        return self._route_tail(value, key, structured, rk, rklen)

    cdef int _route_tail(self, object value, object key, bint structured, const char** rk,
                         Py_ssize_t* rklen) except -1:
        """The end of `_route_c`: the partition key of a structured event's value, else
        the Kafka key."""
        cdef const uint8_t* vp
        cdef Py_ssize_t pk_at = 0, pk_len = 0, vlen
        cdef int r
        if structured and value is not None:
            if type(value) is not bytes:
                return RK_DEFER
            vp = <const uint8_t*>PyBytes_AS_STRING(value)
            vlen = PyBytes_GET_SIZE(value)
            if vlen and vlen <= SCAN_BYTES and (
                    memmem(vp, vlen, b'"partitionkey"', 14) != NULL
                    or memmem(vp, vlen, b"\\u", 2) != NULL):
                r = _scan_partitionkey(vp, vlen, &pk_at, &pk_len)
                if r == RK_DEFER:
                    return RK_DEFER
                if r == RK_FOUND:
                    rk[0] = <const char*>vp + pk_at
                    rklen[0] = pk_len
                    return RK_FOUND
        if key is None:
            return RK_NONE
        if type(key) is not bytes:
            return RK_DEFER
        if PyBytes_GET_SIZE(key) == 0:
            return RK_NONE
        rk[0] = PyBytes_AS_STRING(key)
        rklen[0] = PyBytes_GET_SIZE(key)
        return RK_FOUND

    cdef int _put(self, Buf* b, int32_t ti, int32_t part, int64_t off, uint16_t slot,
                  int64_t ts, object key, object value, object headers) except -1:
        cdef Py_ssize_t klen = -1, vlen = -1, size = FRAME_HEAD_SIZE, nh = -1, i
        cdef Py_ssize_t nlen, hvlen
        cdef object item, name, hv
        cdef const char* np
        cdef char* p
        cdef list encoded = None  # names outside ASCII, UTF-8 with surrogateescape
        klen = _field_len(key, "key")
        vlen = _field_len(value, "value")
        size += (klen if klen > 0 else 0) + (vlen if vlen > 0 else 0)
        if headers is not None:
            if type(headers) is not list:
                headers = [tuple(h) for h in headers]
            nh = PyList_GET_SIZE(headers)
            for i in range(nh):
                item = <object>PyList_GET_ITEM(headers, i)
                if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
                    item = tuple(item)
                    if PyTuple_GET_SIZE(item) != 2:
                        raise ValueError("a header is a (name, value) pair")
                    headers = list(headers)
                    headers[i] = item
                name = <object>PyTuple_GET_ITEM(item, 0)
                hv = <object>PyTuple_GET_ITEM(item, 1)
                if type(name) is not str:
                    raise TypeError("header name must be str")
                if PyUnicode_IS_ASCII(name):
                    PyUnicode_AsUTF8AndSize(name, &nlen)
                else:
                    if encoded is None:
                        encoded = [None] * nh
                    encoded[i] = (<str>name).encode("utf-8", "surrogateescape")
                    nlen = PyBytes_GET_SIZE(encoded[i])
                size += HDR_ITEM + nlen
                if hv is not None:
                    if type(hv) is not bytes:
                        raise TypeError("header value must be bytes or None")
                    size += PyBytes_GET_SIZE(hv)
        if size > 0xFFFFFFFF:
            raise ValueError("record too large for a frame")
        p = _frame_start(b, size, ti, part, off, slot, ts, key, klen, value, vlen, nh)
        for i in range(nh if nh > 0 else 0):
            item = <object>PyList_GET_ITEM(headers, i)
            hv = <object>PyTuple_GET_ITEM(item, 1)
            if encoded is not None and encoded[i] is not None:
                np = PyBytes_AS_STRING(encoded[i])
                nlen = PyBytes_GET_SIZE(encoded[i])
            else:
                np = PyUnicode_AsUTF8AndSize(<object>PyTuple_GET_ITEM(item, 0), &nlen)
            hvlen = -1 if hv is None else PyBytes_GET_SIZE(hv)
            _st32(p, <uint32_t>nlen)
            _st32(p + 4, <uint32_t><int32_t>hvlen)
            p += HDR_ITEM
            memcpy(p, np, nlen)
            p += nlen
            if hvlen > 0:
                memcpy(p, PyBytes_AS_STRING(hv), hvlen)
                p += hvlen
        b.n += size
        return 0

    cdef int _put_h(self, Buf* b, int32_t ti, int32_t part, int64_t off, uint16_t slot,
                    int64_t ts, object key, object value, const void* hdrs) except -1:
        """`_put` of a message whose headers are still librdkafka's (`hdrs`): the same frame,
        written from them in place. Returns 1 without writing when a header name is outside
        ASCII (the caller takes the headers() list and `_put`)."""
        cdef Py_ssize_t klen = -1, vlen = -1, size = FRAME_HEAD_SIZE, nh = 0, nlen
        cdef size_t idx = 0, hsize = 0
        cdef const char* name = NULL
        cdef const void* val = NULL
        cdef char* p
        klen = _field_len(key, "key")
        vlen = _field_len(value, "value")
        size += (klen if klen > 0 else 0) + (vlen if vlen > 0 else 0)
        while _hdr_get_all(hdrs, idx, &name, &val, &hsize) == 0:
            idx += 1
            nlen = strlen(name)
            if not _ascii(name, nlen):
                return 1
            size += HDR_ITEM + nlen + (<Py_ssize_t>hsize if val != NULL else 0)
        nh = idx
        if size > 0xFFFFFFFF:
            raise ValueError("record too large for a frame")
        p = _frame_start(b, size, ti, part, off, slot, ts, key, klen, value, vlen, nh)
        idx = 0
        while _hdr_get_all(hdrs, idx, &name, &val, &hsize) == 0:
            idx += 1
            nlen = strlen(name)
            _st32(p, <uint32_t>nlen)
            _st32(p + 4, <uint32_t><int32_t>(-1 if val == NULL else <Py_ssize_t>hsize))
            p += HDR_ITEM
            memcpy(p, name, nlen)
            p += nlen
            if val != NULL and hsize > 0:
                memcpy(p, val, hsize)
                p += hsize
        b.n += size
        return 0

    cdef int _cfl_check(self, object m) except -1:
        """Hold the fields of a consumed confluent-kafka Message `m`, read where
        agg_cfl_message says they are, to what its accessors answer: `cfl` becomes 1 when
        all agree (the headers too: librdkafka's, read here, against the list headers()
        then makes of them), 0 when one does not, 2 when the fields agree and `m` cannot
        tell about the headers (it has none, or a name headers() cannot decode); it is
        left as it was for a message that cannot tell at all (an error, headers taken)."""
        cdef agg_cfl_message* cm = <agg_cfl_message*><PyObject*>m
        if m.error() is not None or cm.headers != NULL:
            return 0
        topic, value, key = m.topic(), m.value(), m.key()
        if (cm.topic != <PyObject*>topic or
                (cm.value == NULL and value is not None) or
                (cm.value != NULL and cm.value != <PyObject*>value) or
                (cm.key == NULL and key is not None) or
                (cm.key != NULL and cm.key != <PyObject*>key) or
                cm.partition != m.partition() or cm.offset != m.offset() or
                (cm.tstype, cm.timestamp) != m.timestamp() or not _no_error(cm)):
            self.cfl = 0
            return 0
        if cm.c_headers == NULL:
            self.cfl = 2  # no headers: a message with some tells
            return 0
        try:
            mine = _c_headers_list(cm.c_headers)
        except UnicodeDecodeError:
            self.cfl = 2  # a name headers() cannot make a str of: the next message tells
            return 0
        if _hdr_cnt(cm.c_headers) != <size_t>len(mine):
            self.cfl = 0
            return 0
        theirs = m.headers()
        self.cfl = 1 if (cm.headers == <PyObject*>theirs and cm.c_headers == NULL
                         and theirs == mine) else 0
        return 0

    @property
    def reads_messages_in_place(self):
        """1: confluent-kafka Messages are read at their fields and headers (checked), 2: at
        their fields (the headers not checked yet), 0: through their accessors, -1: not
        decided yet (tests)."""
        return self.cfl

    def routing_key(self, value, headers, key, int ti):
        """(routing key or None, decided in C?) of one record of topic index `ti` (tests)."""
        cdef const char* rk = NULL
        cdef Py_ssize_t rklen = 0
        if self.mapped_c[ti]:
            return self.route_fns[ti](value, headers, key), False
        r = self._route_c(value, headers, key, self.detect_c[ti], &rk, &rklen)
        if r == RK_DEFER:
            return routing_key(value, headers, key, detect=self.detect[ti]), False
        return (PyBytes_FromStringAndSize(rk, rklen) if r == RK_FOUND else None), True

    def route(self, msgs, list next_bids, Py_ssize_t max_message):
        """The round of `msgs` (see frames.Round)."""
        from aggregator.frames import Round
        cdef int n = self.workers, w
        cdef Py_ssize_t hint = 0, rklen = 0, i
        cdef const char* rk = NULL
        cdef object m, err, topic, last_topic = None, value, key, headers, fn, pyrk
        cdef int32_t ti = -1, part
        cdef int64_t off, ts = 0
        cdef int r
        cdef uint16_t slot
        cdef list errors = [], oversized = []
        cdef list counts = [0] * self.ntopics
        cdef const void* hdrs
        cdef agg_cfl_message* cm
        cdef int64_t* cnt = <int64_t*>PyMem_Malloc(max(self.ntopics, 1) * sizeof(int64_t))
        if cnt == NULL:
            raise MemoryError()
        memset(cnt, 0, max(self.ntopics, 1) * sizeof(int64_t))
        self.nthr = 0
        for w in range(n):
            self.bufs[w].n = 0
        if self.cfl < 0 and self.cfl_type is None:
            self.cfl_type = _bind_headers()
            if self.cfl_type is None:
                self.cfl = 0
        try:
            for m in msgs:
                # a consumed Message is read at its fields (agg_cfl_message), its headers
                # where librdkafka holds them: no call, no header tuples (`_cfl_check`)
                hdrs = NULL
                if self.cfl != 0 and type(m) is self.cfl_type:
                    cm = <agg_cfl_message*><PyObject*>m
                    if self.cfl < 0 or (self.cfl == 2 and cm.c_headers != NULL
                                        and cm.headers == NULL):
                        self._cfl_check(m)
                    if self.cfl > 0 and _no_error(cm) and cm.topic != NULL:
                        topic = <object>cm.topic
                        part = cm.partition
                        off = cm.offset
                        value = <object>cm.value if cm.value != NULL else None
                        key = <object>cm.key if cm.key != NULL else None
                        ts = cm.timestamp
                        if cm.headers != NULL:
                            headers = <object>cm.headers
                        elif cm.c_headers == NULL:
                            headers = None
                        elif self.cfl == 1:
                            hdrs = cm.c_headers
                            headers = None
                        else:  # headers not checked yet (a name headers() cannot decode)
                            headers = m.headers()
                    else:
                        cm = NULL
                else:
                    cm = NULL
                if cm == NULL:
                    err = m.error()
                    if err is not None:
                        errors.append(err)
                        continue
                    topic = m.topic()
                    part = m.partition()
                    off = m.offset()
                    value = m.value()
                    key = m.key()
                    headers = m.headers()
                # confluent-kafka makes a new str per Message: equal to the last one, no
                # hash of it and no lookup
                if topic is not last_topic and (last_topic is None or topic != last_topic):
                    ti = self.tindex[topic]
                    if ti < 0 or ti >= self.ntopics:
                        raise ValueError(f"topic index {ti} of {topic!r} out of range")
                    last_topic = topic
                cnt[ti] += 1
                self._through(ti, part, off, &hint)
                if hdrs != NULL:
                    if self.mapped_c[ti] or (value is not None and
                                             len(value) > self.max_bytes):
                        headers = m.headers()  # rare paths: the list
                        hdrs = NULL
                    else:
                        r = self._route_h(value, hdrs, key, self.detect_c[ti], &rk, &rklen)
                        if r == RK_DEFER:
                            headers = m.headers()
                            hdrs = NULL
                        else:
                            slot = <uint16_t>(_xxh3(rk, rklen) % NSLOTS) \
                                if r == RK_FOUND else 0
                            if self._put_h(&self.bufs[slot % n], ti, part, off, slot, ts, key,
                                           value, hdrs) == 0:
                                continue
                            headers = m.headers()  # a name outside ASCII: the list
                            hdrs = NULL
                            self._put(&self.bufs[slot % n], ti, part, off, slot, ts, key,
                                      value, headers)
                            continue
                if value is not None and len(value) > self.max_bytes:
                    oversized.append([ti, part, off, key, value, headers])
                    continue
                if self.mapped_c[ti]:
                    fn = self.route_fns[ti]
                    pyrk = fn(value, headers, key)
                    r = RK_DEFER
                else:
                    r = self._route_c(value, headers, key, self.detect_c[ti], &rk, &rklen)
                    if r == RK_DEFER:
                        pyrk = routing_key(value, headers, key, detect=self.detect[ti])
                if r == RK_DEFER:
                    if pyrk is None:
                        r = RK_NONE
                    else:
                        if type(pyrk) is not bytes:
                            pyrk = bytes(pyrk)
                        rk = PyBytes_AS_STRING(pyrk)
                        rklen = PyBytes_GET_SIZE(pyrk)
                        r = RK_FOUND
                slot = <uint16_t>(_xxh3(rk, rklen) % NSLOTS) if r == RK_FOUND else 0
                if cm == NULL:
                    ts = m.timestamp()[1]
                self._put(&self.bufs[slot % n], ti, part, off, slot, ts, key, value, headers)
            for i in range(self.ntopics):
                counts[i] = cnt[i]
        finally:
            PyMem_Free(cnt)
        through = {}
        for i in range(self.nthr):
            through[(self.thr[i].ti, self.thr[i].part)] = self.thr[i].off
        messages = [self._messages(w, next_bids[w], max_message) if self.nthr else []
                    for w in range(n)]
        for w in range(n):  # a round of big records does not keep its memory for good
            if self.bufs[w].cap > KEEP_BYTES:
                PyMem_Free(self.bufs[w].p)
                self.bufs[w].p = NULL
                self.bufs[w].cap = 0
            self.bufs[w].n = 0
        return Round(messages, through, counts, errors, oversized)

    cdef list _messages(self, int w, int64_t first_bid, Py_ssize_t max_message):
        """The worker's buffer cut into ring messages (protocol.frame_messages' rule)."""
        cdef Buf* b = &self.bufs[w]
        cdef Py_ssize_t room = max_message - MSG_HEAD - THR_SIZE * self.nthr
        cdef Py_ssize_t pos = 0, start = 0, size = 0, flen
        cdef uint32_t count = 0
        cdef list out = []
        while pos < b.n:
            flen = _ld32(b.p + pos)
            if count and size + flen > room:
                out.append(self._message(b.p + start, pos - start, count,
                                         first_bid + len(out), False))
                start, size, count = pos, 0, 0
            size += flen
            count += 1
            pos += flen
        out.append(self._message(b.p + start, pos - start, count, first_bid + len(out), True))
        return out

    cdef bytes _message(self, const char* frames, Py_ssize_t nbytes, uint32_t count,
                        int64_t bid, bint last):
        cdef Py_ssize_t nthr = self.nthr if last else 0, i
        cdef bytes msg = PyBytes_FromStringAndSize(NULL, MSG_HEAD + THR_SIZE * nthr + nbytes)
        cdef char* p = PyBytes_AS_STRING(msg)
        (<uint8_t*>p)[0] = MAGIC
        (<uint8_t*>p)[1] = VERSION
        _st16(p + 2, 0)
        _st32(p + 4, count)
        _st64(p + 8, bid)
        _st32(p + 16, <uint32_t>nthr)
        _st32(p + 20, 0)
        p += MSG_HEAD
        for i in range(nthr):
            _st32(p, <uint32_t>self.thr[i].ti)
            _st32(p + 4, <uint32_t>self.thr[i].part)
            _st64(p + 8, self.thr[i].off)
            p += THR_SIZE
        if nbytes:
            memcpy(p, frames, nbytes)
        return msg


# ---- the worker's reader --------------------------------------------------------------------

cdef enum:
    NAME_CACHE = 128  # a power of two
    NAME_MAX = 40

# Decoded header names by their bytes: producers repeat a few names ("ce_id", ...), so the
# reader hands out the same str objects instead of decoding each (an entry is replaced on a
# collision; the cache holds a reference to its str).
cdef PyObject* _name_obj[NAME_CACHE]
cdef Py_ssize_t _name_len[NAME_CACHE]
cdef char _name_raw[NAME_CACHE][NAME_MAX]
memset(_name_obj, 0, sizeof(_name_obj))


cdef object _name(const char* p, Py_ssize_t n):
    cdef size_t h
    cdef Py_ssize_t i
    cdef object s
    if n > NAME_MAX:
        return PyUnicode_DecodeUTF8(p, n, "surrogateescape")
    h = <size_t>n * 2654435761u
    for i in range(n):
        h = (h ^ <uint8_t>p[i]) * 16777619u
    h = (h ^ (h >> 15)) & (NAME_CACHE - 1)
    if _name_obj[h] != NULL and _name_len[h] == n and memcmp(_name_raw[h], p, n) == 0:
        return <object>_name_obj[h]
    s = PyUnicode_DecodeUTF8(p, n, "surrogateescape")
    Py_INCREF(s)
    Py_XDECREF(_name_obj[h])
    _name_obj[h] = <PyObject*>s
    _name_len[h] = n
    memcpy(_name_raw[h], p, n)
    return s


# Whole (name, value) header pairs by their bytes, for the headers whose values repeat by
# design (the CloudEvents specversion, source and type, the content types): the reader hands
# out the same immutable tuple instead of a new tuple and bytes per record (an entry is
# replaced on a collision). Per-event values (id, time, partition key, sequence, subject)
# are not looked up: they would only evict the others.
cdef enum:
    PAIR_CACHE = 256  # a power of two
    PAIR_VALUE_MAX = 96

cdef PyObject* _pair_obj[PAIR_CACHE]
cdef Py_ssize_t _pair_nlen[PAIR_CACHE]
cdef Py_ssize_t _pair_vlen[PAIR_CACHE]
cdef char _pair_raw[PAIR_CACHE][NAME_MAX + PAIR_VALUE_MAX]
memset(_pair_obj, 0, sizeof(_pair_obj))


cdef inline bint _repeating(const char* p, Py_ssize_t n) noexcept:
    """Whether a header name (as sent, case included) is one whose values repeat."""
    if n == 14:
        return memcmp(p, b"ce_specversion", 14) == 0
    if n == 9:
        return memcmp(p, b"ce_source", 9) == 0
    if n == 7:
        return memcmp(p, b"ce_type", 7) == 0
    if n == 12:
        return memcmp(p, b"content-type", 12) == 0
    if n == 18:
        return memcmp(p, b"ce_datacontenttype", 18) == 0
    return False


cdef object _pair(object name, const char* np, Py_ssize_t nlen, const char* vp,
                  Py_ssize_t vlen):
    """The (name, value) tuple of a repeating header, shared between records."""
    cdef size_t h = <size_t>nlen * 2654435761u
    cdef Py_ssize_t i
    cdef tuple t
    for i in range(nlen):
        h = (h ^ <uint8_t>np[i]) * 16777619u
    for i in range(vlen):
        h = (h ^ <uint8_t>vp[i]) * 16777619u
    h = (h ^ (h >> 15)) & (PAIR_CACHE - 1)
    if _pair_obj[h] != NULL and _pair_nlen[h] == nlen and _pair_vlen[h] == vlen and \
            memcmp(_pair_raw[h], np, nlen) == 0 and \
            memcmp(_pair_raw[h] + nlen, vp, vlen) == 0:
        return <object>_pair_obj[h]
    t = (name, PyBytes_FromStringAndSize(vp, vlen))
    PyObject_GC_UnTrack(<void*>t)
    Py_INCREF(t)
    Py_XDECREF(_pair_obj[h])
    _pair_obj[h] = <PyObject*>t
    _pair_nlen[h] = nlen
    _pair_vlen[h] = vlen
    memcpy(_pair_raw[h], np, nlen)
    memcpy(_pair_raw[h] + nlen, vp, vlen)
    return t


cdef inline object _field(const char* base, Py_ssize_t* p, Py_ssize_t end, int32_t n):
    if n == -1:
        return None
    if n < 0 or p[0] + n > end:
        raise ValueError("frames message: field beyond its frame")
    o = PyBytes_FromStringAndSize(base + p[0], n)
    p[0] += n
    return o


cdef Py_ssize_t _field_end(Py_ssize_t p, Py_ssize_t end, int32_t n) except -1:
    """Where a field of `n` bytes (-1: None) at `p` ends; raises if beyond its frame."""
    if n == -1:
        return p
    if n < 0 or p + n > end:
        raise ValueError("frames message: field beyond its frame")
    return p + n


cdef inline bint _shared_pair(const char* base, Py_ssize_t p, Py_ssize_t end, int32_t nlen,
                              int32_t hvlen) noexcept:
    """Whether the header at `p` (name, then value) is read as a shared `_pair`."""
    return 0 <= hvlen <= PAIR_VALUE_MAX and nlen <= NAME_MAX and \
        p + nlen + hvlen <= end and _repeating(base + p, nlen)


cdef Py_ssize_t _walk(const char* base, Py_ssize_t total, Py_ssize_t pos, uint32_t count,
                      Py_ssize_t* starts) except -1:
    """Check the `count` frames from `pos` as `read_frames` reads them (the same errors, in
    the same order), their starts into `starts`; nothing is made."""
    cdef uint32_t j, size
    cdef Py_ssize_t end, p, k
    cdef int32_t nlen, hvlen, hcount
    for j in range(count):
        if pos + FRAME_HEAD_SIZE > total:
            raise ValueError("frames message: truncated frame head")
        size = _ld32(base + pos)
        end = pos + size
        if size < FRAME_HEAD_SIZE or end > total:
            raise ValueError("frames message: bad frame length")
        p = pos + FRAME_HEAD_SIZE
        p = _field_end(p, end, _ldi32(base + pos + 32))
        p = _field_end(p, end, _ldi32(base + pos + 36))
        hcount = _ldi32(base + pos + 40)
        if hcount != -1:
            if hcount < 0 or <Py_ssize_t>hcount * HDR_ITEM > end - p:
                raise ValueError("frames message: bad header count")
            for k in range(hcount):
                if p + HDR_ITEM > end:
                    raise ValueError("frames message: field beyond its frame")
                nlen = _ldi32(base + p)
                hvlen = _ldi32(base + p + 4)
                p += HDR_ITEM
                if nlen < 0 or p + nlen > end:
                    raise ValueError("frames message: field beyond its frame")
                if _shared_pair(base, p, end, nlen, hvlen):
                    p += nlen + hvlen
                else:
                    p = _field_end(p + nlen, end, hvlen)
        if p != end:
            raise ValueError("frames message: frame length does not match its fields")
        starts[j] = pos
        pos = end
    if pos != total:
        raise ValueError("frames message: bytes after the last frame")
    return 0


cdef list _record(const char* base, Py_ssize_t pos):
    """The record of the frame at `pos` (checked by `_walk`): [topic index, partition,
    offset, key, value, headers, timestamp, slot]."""
    cdef Py_ssize_t end = pos + _ld32(base + pos)
    cdef Py_ssize_t p = pos + FRAME_HEAD_SIZE, k
    cdef int32_t nlen, hvlen, hcount
    cdef list hl, rec
    cdef object name, hval
    key = _field(base, &p, end, _ldi32(base + pos + 32))
    value = _field(base, &p, end, _ldi32(base + pos + 36))
    hcount = _ldi32(base + pos + 40)
    if hcount == -1:
        headers = None
    else:
        hl = PyList_New(hcount)
        PyObject_GC_UnTrack(<void*>hl)  # see _gc.pxd
        for k in range(hcount):
            nlen = _ldi32(base + p)
            hvlen = _ldi32(base + p + 4)
            p += HDR_ITEM
            name = _name(base + p, nlen)
            if _shared_pair(base, p, end, nlen, hvlen):
                pair = _pair(name, base + p, nlen, base + p + nlen, hvlen)
                p += nlen + hvlen
            else:
                p += nlen
                hval = _field(base, &p, end, hvlen)
                pair = (name, hval)
                PyObject_GC_UnTrack(<void*>pair)
            Py_INCREF(pair)
            PyList_SET_ITEM(hl, k, pair)
        headers = hl
    rec = [_ldi32(base + pos + 4), _ldi32(base + pos + 8), _ld64(base + pos + 16), key,
           value, headers, _ld64(base + pos + 24), _ld16(base + pos + 12)]
    PyObject_GC_UnTrack(<void*>rec)
    return rec


cdef Py_ssize_t _head(const char* base, Py_ssize_t total, uint32_t* count, list thr
                      ) except -1:
    """The message head and through-offsets (into `thr`): where the frames start (the
    batch id is the int64 at 8)."""
    cdef uint32_t nthr, j
    cdef Py_ssize_t pos
    if total < MSG_HEAD:
        raise ValueError("frames message: truncated head")
    if (<const uint8_t*>base)[0] != MAGIC or (<const uint8_t*>base)[1] != VERSION:
        raise ValueError(f"frames message: magic {<uint8_t>base[0]:#x} version "
                         f"{<uint8_t>base[1]}")
    count[0] = _ld32(base + 4)
    nthr = _ld32(base + 16)
    pos = MSG_HEAD
    if pos + <Py_ssize_t>nthr * THR_SIZE > total:
        raise ValueError("frames message: truncated through-offsets")
    for j in range(nthr):
        thr.append([_ldi32(base + pos), _ldi32(base + pos + 4), _ld64(base + pos + 8)])
        pos += THR_SIZE
    if count[0] > <uint32_t>(total // FRAME_HEAD_SIZE):
        raise ValueError("frames message: truncated frame head")
    return pos


cdef Py_ssize_t* _starts(uint32_t count) except NULL:
    cdef Py_ssize_t* starts = <Py_ssize_t*>PyMem_Malloc((count or 1) * sizeof(Py_ssize_t))
    if starts == NULL:
        raise MemoryError()
    return starts


def read_frames(msg):
    """Compiled twin of protocol.read_frames."""
    cdef const unsigned char[::1] view = msg
    cdef Py_ssize_t total = view.shape[0], pos
    cdef const char* base = NULL
    cdef uint32_t count, j
    cdef list thr = [], records
    if total:
        base = <const char*>&view[0]
    pos = _head(base, total, &count, thr)
    bid = PyLong_FromLongLong(_ld64(base + 8))
    cdef Py_ssize_t* starts = _starts(count)
    try:
        _walk(base, total, pos, count, starts)
        records = PyList_New(count)
        for j in range(count):
            rec = _record(base, starts[j])
            Py_INCREF(rec)
            PyList_SET_ITEM(records, j, rec)
    finally:
        PyMem_Free(starts)
    return [MSG_RECORDS, bid, thr, records]


@cython.final
cdef class FrameRecords:
    """The records of a frames message, made when they are read (`read_frames_lazy`): the
    message was checked whole, as `read_frames` checks it, so making one cannot fail. A
    sequence: ``len``, an index or a slice (a new list of new records each time), and
    iteration."""
    cdef bytes msg
    cdef Py_ssize_t* starts
    cdef Py_ssize_t n

    def __dealloc__(self):
        PyMem_Free(self.starts)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        cdef Py_ssize_t k, start, stop, step, count
        cdef const char* base = PyBytes_AS_STRING(self.msg)
        cdef list out
        if isinstance(i, slice):
            start, stop, step = i.indices(self.n)
            out = []
            for k in range(start, stop, step):
                out.append(_record(base, self.starts[k]))
            return out
        k = i
        if k < 0:
            k += self.n
        if k < 0 or k >= self.n:
            raise IndexError("frame record index out of range")
        return _record(base, self.starts[k])

    def __iter__(self):
        cdef Py_ssize_t k
        for k in range(self.n):
            yield _record(PyBytes_AS_STRING(self.msg), self.starts[k])

    def __repr__(self):
        return f"<FrameRecords of {self.n}>"


def read_frames_lazy(msg):
    """`read_frames`, the records made as they are read (`FrameRecords`) for a bytes
    message (else `read_frames`): the worker reads a message's records a pass at a time
    (worker._apply), each made just before its pass and freed after it, instead of all of
    them up front."""
    if type(msg) is not bytes:
        return read_frames(msg)
    cdef Py_ssize_t total = PyBytes_GET_SIZE(msg), pos
    cdef const char* base = PyBytes_AS_STRING(msg)
    cdef uint32_t count
    cdef list thr = []
    pos = _head(base, total, &count, thr)
    bid = PyLong_FromLongLong(_ld64(base + 8))
    cdef FrameRecords fr = FrameRecords.__new__(FrameRecords)
    fr.starts = _starts(count)
    fr.msg = msg
    _walk(base, total, pos, count, fr.starts)
    fr.n = count
    return [MSG_RECORDS, bid, thr, fr]
