# cython: language_level=3
"""Compiled twin of ``aggregator.envelope.parse``: one Kafka record -> ``Event``.

``aggregator.envelope`` is the specification (read its docstring first) and stays the
reference; ``aggregator.parser`` chooses between the two. This module returns the same
``Event`` type and raises the same ``EnvelopeError`` type, imported from there.

How it is fast:

* the headers are walked once, backwards (so the first occurrence of a name wins, as in
  the reference), and their names are matched by C comparisons of the ASCII bytes
  (case-insensitive) into fixed slots, with no dict and no ``str.lower()``;
* attribute values are decoded straight from the header bytes; ``ce_sequence`` is read by a
  C digit loop;
* JSON data: a C scan with stride 19 looks for runs of 19 or more digits (what the
  reference's ``_LONG_DIGITS`` regex finds; if there is one, a second scan tells numbers
  from strings) and the bytes are parsed by one call of ``orjson.loads``, unless a number
  holds such a run; structured-mode events are parsed by orjson too, guarded the same way;
* content types are looked up in a bounded cache keyed by the header's bytes.

How it stays identical: this module decides only the records it accepts. The moment a
check fails (a missing or malformed attribute, a limit, invalid UTF-8, a header that is
not a ``(str, bytes)`` pair, anything unusual), it stops and returns
``envelope.parse(...)`` on the same arguments instead, so every rejection carries the
reference's reason code and message by construction, and rare inputs take the reference's
code path. Where the reference itself switches to a slower path (a 19-digit run, an
orjson failure, a msgpack error, a depth beyond the limit), this module calls the same
reference helper at the same point. ``tests/test_envelope_compiled.py`` compares both on
generated valid and malformed records.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_FromLongLong
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE

from aggregator._gc cimport PyObject_GC_UnTrack
from libc.string cimport memcmp

from aggregator._slots cimport plain_layout

import base64
import binascii

import msgpack
import orjson

from aggregator import envelope as _ref
from aggregator.envelope import MAX_DEPTH, EnvelopeError, Event

__all__ = ["parse"]

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    unsigned char* PyUnicode_1BYTE_DATA(object o)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    # NULL with an exception set on invalid UTF-8: the caller clears it and falls back
    PyObject* _decode_utf8 "PyUnicode_DecodeUTF8"(const char* s, Py_ssize_t n,
                                                   const char* errors)
    void PyErr_Clear()
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1

# ---- the reference's pieces this module calls (same objects, same behaviour)
cdef object _ref_parse = _ref.parse
cdef object _ref_content_type = _ref._content_type
cdef object _ref_classify = _ref._classify
cdef object _ref_decode_json = _ref._decode_json
cdef object _ref_decode_msgpack = _ref._decode_msgpack
cdef object _ref_parse_structured_json = _ref._parse_structured_json
cdef object _ref_too_deep = _ref._too_deep
cdef object _orjson_loads = orjson.loads
cdef object _orjson_error = orjson.JSONDecodeError
cdef object _unpackb = msgpack.unpackb
cdef object _b64decode = base64.b64decode
cdef object _b64_error = binascii.Error
cdef object _Event = Event

cdef int _KIND_JSON = _ref._JSON
cdef int _KIND_MSGPACK = _ref._MSGPACK
cdef int _KIND_TEXT = _ref._TEXT
cdef Py_ssize_t _MAX_DEPTH = MAX_DEPTH
cdef bytes _STRUCTURED_JSON = _ref._STRUCTURED_JSON.encode("ascii")
cdef str _SPECVERSION = "1.0"
cdef long long _SEQ_LIMIT = 0x7FFFFFFFFFFFFFFF  # the largest accepted sequence (2**63 - 1)

# Header slots. A header name maps to one of these (or to an extension, or is ignored).
cdef enum:
    H_IGNORE = -1
    H_ID = 0
    H_SOURCE
    H_TYPE
    H_SPECVERSION
    H_TIME
    H_SUBJECT
    H_DATASCHEMA
    H_DCT
    H_PK
    H_SEQ
    H_CT
    H_EXT
    N_SLOTS = 11


cdef unsigned long long _deferred = 0  # see deferred()


class _Defer(Exception):
    """Internal: this record is for the reference implementation to decide (raised as a
    class, never as a shared instance, whose traceback would grow with every raise)."""


# ---------------------------------------------------------------------------------------
# small C helpers


cdef inline bint _ieq(const unsigned char* p, const char* lit, Py_ssize_t n) noexcept:
    """ASCII case-insensitive comparison of n bytes with a lower-case literal."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char>lit[i]:
            return False
    return True


cdef int _slot_of(const unsigned char* p, Py_ssize_t n) noexcept:
    """The slot of an ASCII header name (case-insensitive), H_EXT or H_IGNORE."""
    if n == 12 and _ieq(p, b"content-type", 12):
        return H_CT
    if n <= 3 or not _ieq(p, b"ce_", 3):
        return H_IGNORE
    p += 3
    n -= 3
    if n == 2:
        if _ieq(p, b"id", 2):
            return H_ID
    elif n == 4:
        if _ieq(p, b"type", 4):
            return H_TYPE
        if _ieq(p, b"time", 4):
            return H_TIME
    elif n == 6:
        if _ieq(p, b"source", 6):
            return H_SOURCE
    elif n == 7:
        if _ieq(p, b"subject", 7):
            return H_SUBJECT
    elif n == 8:
        if _ieq(p, b"sequence", 8):
            return H_SEQ
    elif n == 10:
        if _ieq(p, b"dataschema", 10):
            return H_DATASCHEMA
    elif n == 11:
        if _ieq(p, b"specversion", 11):
            return H_SPECVERSION
    elif n == 12:
        if _ieq(p, b"partitionkey", 12):
            return H_PK
    elif n == 15:
        if _ieq(p, b"datacontenttype", 15):
            return H_DCT
    return H_EXT


cdef str _lower_ascii(const unsigned char* p, Py_ssize_t n):
    """A new str: the n ASCII bytes at p, lower-cased."""
    cdef object s = PyUnicode_New(n, 127)
    cdef unsigned char* out = PyUnicode_1BYTE_DATA(s)
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        out[i] = c + 32 if 65 <= c <= 90 else c
    return <str>s


cdef str _utf8(object b):
    """bytes -> str (strict UTF-8, as ``bytes.decode("utf-8")``); defers if invalid."""
    cdef PyObject* r = _decode_utf8(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b), NULL)
    if r == NULL:
        PyErr_Clear()
        raise _Defer
    cdef object s = <object>r
    Py_DECREF(s)  # <object> took a second reference
    return <str>s


cdef inline bint _is_digit(unsigned char c) noexcept:
    return <unsigned char>(c - 48) <= 9


@cython.boundscheck(False)
@cython.wraparound(False)
cdef bint _long_digits(const unsigned char* p, Py_ssize_t n) noexcept:
    """True if p[:n] holds a run of 19 or more ASCII digits (``[0-9]{19}``).

    Every such run covers one of the positions 18, 37, 56, ... (stride 19): only there is
    the run measured."""
    cdef Py_ssize_t j, a, b
    j = 18
    while j < n:
        if _is_digit(p[j]):
            a = j
            while a > 0 and _is_digit(p[a - 1]):
                a -= 1
            b = j + 1
            while b < n and _is_digit(p[b]):
                b += 1
            if b - a >= 19:
                return True
            j = b + 18  # the next run starts after b; its 19th digit is at b + 19 or later
        else:
            j += 19
    return False


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _count_brackets(const unsigned char* p, Py_ssize_t n) noexcept:
    """Number of b"[" and b"{" (``raw.count(b"[") + raw.count(b"{")``)."""
    cdef Py_ssize_t i, c = 0
    cdef unsigned int part
    while n > 0:  # blocks of at most 2**24 bytes: a 32-bit count per block (vectorises)
        part = 0
        for i in range(min(n, 1 << 24)):
            part += (p[i] == 91) | (p[i] == 123)
        c += part
        p += 1 << 24
        n -= 1 << 24
    return c


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _count_msgpack_containers(const unsigned char* p, Py_ssize_t n) noexcept:
    """Bytes that can start a msgpack map/array (0x80-0x9f, 0xdc-0xdf): the reference's
    ``len(raw.translate(None, _NOT_CONTAINER_BYTES))``."""
    cdef Py_ssize_t i, c = 0
    cdef unsigned int part
    cdef unsigned char b
    while n > 0:  # blocks of at most 2**24 bytes: a 32-bit count per block (vectorises)
        part = 0
        for i in range(min(n, 1 << 24)):
            b = p[i]
            part += (<unsigned char>(b - 0x80) < 0x20) | (<unsigned char>(b - 0xDC) < 4)
        c += part
        p += 1 << 24
        n -= 1 << 24
    return c


cdef object _digits_value(const unsigned char* p, Py_ssize_t n):
    """A sequence: a string of ASCII digits whose value is below 2**63 -> int; None if it
    is anything else (the caller defers: empty, a non-digit, out of range).

    Up to 640 characters (leading zeros included): no limit of ``int(str)`` can be set
    lower (``sys.int_info.str_digits_check_threshold``), so ``int()`` in the reference
    never refuses such a string."""
    cdef Py_ssize_t i = 0
    cdef unsigned long long v = 0
    if n < 1 or n > 640:
        return None
    while i < n - 1 and p[i] == 48:  # leading zeros
        i += 1
    if n - i > 19:  # 20+ significant digits: >= 10**19 > 2**63 (or not digits at all)
        return None
    while i < n:
        if not _is_digit(p[i]):
            return None
        v = v * 10 + (p[i] - 48)  # 19 digits < 2**64: no overflow
        i += 1
    if v > <unsigned long long>_SEQ_LIMIT:
        return None
    return PyLong_FromLongLong(<long long>v)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef bint _long_number(const unsigned char* p, Py_ssize_t n) noexcept:
    """True if a run of 19 or more digits lies outside the JSON strings of p[:n], i.e. in
    a number: what orjson could read differently from the standard library (an integer
    beyond 64 bits, a long fraction). Exact for valid JSON; on invalid JSON any answer does,
    since orjson then fails and the reference decides."""
    cdef Py_ssize_t i = 0, run = 0
    cdef bint in_str = False
    cdef unsigned char c
    while i < n:
        c = p[i]
        if in_str:
            if c == 92:  # backslash: skip the escaped byte (\uXXXX holds no quote)
                i += 1
            elif c == 34:
                in_str = False
        elif c == 34:
            in_str = True
            run = 0
        elif _is_digit(c):
            run += 1
            if run >= 19:
                return True
        else:
            run = 0
        i += 1
    return False


cdef inline bint _needs_stdlib(const unsigned char* p, Py_ssize_t n) noexcept:
    """Whether JSON p[:n] must be read by the reference's standard-library path: a number
    with a run of 19+ digits. The stride scan finds every 19-digit run, in numbers or in
    strings, cheaply; only then are strings told apart from numbers."""
    return _long_digits(p, n) and _long_number(p, n)


# ---------------------------------------------------------------------------------------
# content types: header bytes -> (str, structured mode, kind, charset, structured JSON ok)

cdef dict _ct_cache = {}


cdef tuple _ct_info(object raw):
    """The content type of a header value (bytes): cached; defers if the reference
    would reject it (not UTF-8)."""
    cdef PyObject* hit = PyDict_GetItem(_ct_cache, raw)
    if hit != NULL:
        return <tuple>hit
    try:
        ct, structured = _ref_content_type(raw)
    except EnvelopeError:
        raise _Defer
    kind, charset = _ref_classify(ct)
    low = ct.lower()
    sjson = low.startswith(_ref._STRUCTURED_JSON) and low[28:29] in ("", ";", " ", "\t")
    res = (ct, bool(structured), kind, charset, sjson)
    if len(_ct_cache) < 256:
        _ct_cache[raw] = res
    return res


# ---------------------------------------------------------------------------------------
# data


cdef object _decode_json(object raw, str what):
    """As the reference's ``_decode_json``; its own slow path when that one takes it."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef bint ok = False
    # The reference looks for 19-digit runs anywhere; orjson's result for JSON whose long
    # runs are all inside strings is the standard library's (both read strings exactly).
    if not _needs_stdlib(p, n):
        try:
            obj = _orjson_loads(raw)
            ok = True
        except _orjson_error:
            pass
    global _deferred
    if not ok:  # outside the except block: no chained context on its errors
        _deferred += 1
        return _ref_decode_json(raw, what)
    if (type(obj) is dict or type(obj) is list) and n > _MAX_DEPTH and \
            _count_brackets(p, n) > _MAX_DEPTH and _ref_too_deep(obj, _MAX_DEPTH):
        _deferred += 1
        return _ref_decode_json(raw, what)  # raises the depth error
    return obj


cdef object _decode_msgpack(object raw, str what):
    """As the reference's ``_decode_msgpack``; errors come from it.

    The reference's explicit limits (``max_str_len=len(raw)``, ...) are left out: they are
    msgpack's defaults for `unpackb`, and input that unpacks at all never reaches them (a
    string in n bytes is shorter than n, ...). Whatever fails here, the reference decodes
    again with its limits and says why."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef bint ok = False
    try:
        obj = _unpackb(raw, raw=False, strict_map_key=False)
        ok = True
    except Exception:
        pass
    global _deferred
    if not ok:
        _deferred += 1
        return _ref_decode_msgpack(raw, what)
    if (type(obj) is dict or type(obj) is list) and n > _MAX_DEPTH and \
            _count_msgpack_containers(<const unsigned char*>PyBytes_AS_STRING(raw), n) \
            > _MAX_DEPTH and _ref_too_deep(obj, _MAX_DEPTH):
        _deferred += 1
        return _ref_decode_msgpack(raw, what)  # raises the depth error
    return obj


cdef object _decode_data(object raw, object ct, int kind, object charset, str what):
    """Data bytes by media type (`kind`/`charset` of `ct`; ct None: JSON)."""
    if ct is None or kind == _KIND_JSON:
        return _decode_json(raw, what)
    if kind == _KIND_MSGPACK:
        return _decode_msgpack(raw, what)
    if kind == _KIND_TEXT:
        try:
            return raw.decode(charset)
        except UnicodeDecodeError:
            pass
    raise _Defer  # invalid text, or an unsupported content type


# ---------------------------------------------------------------------------------------
# keys


cdef str _key_from_kafka(object key, Py_ssize_t max_key):
    """The Kafka key as the partition key (bytes of 1..max_key valid UTF-8), else defer.

    Its UTF-8 length is len(key), so the reference's second length check always passes."""
    if type(key) is not bytes or PyBytes_GET_SIZE(key) == 0 or \
            PyBytes_GET_SIZE(key) > max_key:
        raise _Defer
    return _utf8(key)


cdef str _check_pk(object pk, Py_ssize_t max_key):
    """A structured-mode partitionkey (as the reference's ``_check_pk``), else defer."""
    if type(pk) is not str or PyUnicode_GET_LENGTH(pk) > max_key:
        raise _Defer
    if not PyUnicode_IS_ASCII(pk):
        try:
            n = len((<str>pk).encode("utf-8"))
        except UnicodeEncodeError:
            raise _Defer
        if n > max_key:
            raise _Defer
    return <str>pk


cdef object _sequence_json(object v):
    """A structured-mode sequence (str of digits or int), as the reference's ``_sequence``."""
    cdef int overflow = 0
    cdef long long n
    if type(v) is str:
        if not PyUnicode_IS_ASCII(v):
            raise _Defer
        r = _digits_value(PyUnicode_1BYTE_DATA(v), PyUnicode_GET_LENGTH(v))
        if r is None:
            raise _Defer
        return r
    if type(v) is int:
        n = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow or n < 0:
            raise _Defer
        return v
    raise _Defer


# ---------------------------------------------------------------------------------------
# parse


def _has_long_digits(bytes raw):
    """Test hook: the stride-19 scan (``_LONG_DIGITS.search(raw) is not None``)."""
    return _long_digits(<const unsigned char*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))


def _has_long_number(bytes raw):
    """Test hook: a 19-digit run outside the strings of JSON `raw`."""
    return _needs_stdlib(<const unsigned char*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))


def deferred() -> int:
    """How many records this process handed, wholly or in part, to the reference code so
    far: the rejected ones, the unusual ones, and the data the reference itself reads on
    its slower path (19-digit runs). Tests check that valid records are not among them."""
    return _deferred


def parse(value, headers, key, Py_ssize_t max_bytes=1 << 20, Py_ssize_t max_key_bytes=400,
          bint detect=False):
    """Parse one Kafka record into an `Event`; raise `EnvelopeError` if it is not usable.

    Same arguments, result and errors as ``aggregator.envelope.parse``."""
    global _deferred
    try:
        return _parse(value, headers, key, max_bytes, max_key_bytes, detect)
    except _Defer:
        pass
    _deferred += 1
    return _ref_parse(value, headers, key, max_bytes, max_key_bytes, detect)


# ---- Event construction: straight into its __slots__
#
# `Event` is a plain class with __slots__, so each slot is a member descriptor of a fixed
# offset in the instance (the same offsets ``ev.id = ...`` writes through). They are read
# once here, after checking that nothing else could intercept an attribute write (no
# __dict__, no __setattr__, object.__new__); an incompatible `Event` fails the import.

cdef extern from "Python.h":
    ctypedef struct PyTypeObject:
        PyObject* (*tp_alloc)(PyTypeObject*, Py_ssize_t)
    void Py_INCREF(object o)

cdef Py_ssize_t _SLOT_OFFSET[12]
cdef PyTypeObject* _EVENT_TYPE = <PyTypeObject*>Event


plain_layout(Event, ("id", "source", "type", "specversion", "time", "subject",
                     "datacontenttype", "dataschema", "partitionkey", "sequence", "data",
                     "extensions"), "_envelope", _SLOT_OFFSET)


cdef inline void _put(object ev, int i, object v) noexcept:
    """Fill slot i of a new Event (empty: no reference to drop)."""
    Py_INCREF(v)
    (<PyObject**>(<char*><PyObject*>ev + _SLOT_OFFSET[i]))[0] = <PyObject*>v


cdef object _new_event(str eid, str source, str etype, object time, object subject,
                       object dct, object dataschema, str pk, object seq, object data,
                       dict ext):
    """``Event.__new__(Event)`` and its 12 slots, as the reference fills them."""
    cdef PyObject* o = _EVENT_TYPE.tp_alloc(_EVENT_TYPE, 0)
    if o == NULL:
        raise MemoryError()
    cdef object ev = <object>o
    Py_DECREF(ev)  # <object> took a second reference
    PyObject_GC_UnTrack(o)  # a per-record container (_gc.pxd)
    _put(ev, 0, eid)
    _put(ev, 1, source)
    _put(ev, 2, etype)
    _put(ev, 3, _SPECVERSION)
    _put(ev, 4, time)
    _put(ev, 5, subject)
    _put(ev, 6, dct)
    _put(ev, 7, dataschema)
    _put(ev, 8, pk)
    _put(ev, 9, seq)
    _put(ev, 10, data)
    _put(ev, 11, ext)
    return ev


cdef object _parse(object value, object headers, object key, Py_ssize_t max_bytes,
                   Py_ssize_t max_key, bint detect):
    cdef Py_ssize_t i, nh, n
    cdef int slot
    cdef object item, name, hv, low
    cdef object h_id = None, h_source = None, h_type = None, h_sv = None, h_time = None
    cdef object h_subject = None, h_schema = None, h_dct = None, h_pk = None, h_seq = None
    cdef object h_ct = None
    cdef dict ext_raw = None
    cdef bint is_list
    cdef const unsigned char* np

    if value is not None:
        if type(value) is not bytes:
            raise _Defer
        if PyBytes_GET_SIZE(value) > max_bytes:
            raise _Defer

    # ---- headers: one pass backwards, so that the first occurrence of a name wins
    if headers is not None:
        if type(headers) is list:
            is_list = True
            nh = PyList_GET_SIZE(headers)
        elif type(headers) is tuple:
            is_list = False
            nh = PyTuple_GET_SIZE(headers)
        else:
            raise _Defer
        for i in range(nh - 1, -1, -1):
            item = <object>(PyList_GET_ITEM(headers, i) if is_list
                            else PyTuple_GET_ITEM(headers, i))
            if type(item) is tuple and PyTuple_GET_SIZE(item) == 2:
                name = <object>PyTuple_GET_ITEM(item, 0)
                hv = <object>PyTuple_GET_ITEM(item, 1)
            elif type(item) is list and PyList_GET_SIZE(item) == 2:
                name = <object>PyList_GET_ITEM(item, 0)
                hv = <object>PyList_GET_ITEM(item, 1)
            else:
                raise _Defer
            if type(name) is not str:
                raise _Defer
            if not PyUnicode_IS_ASCII(name):
                low = (<str>name).lower()  # may turn ASCII (KELVIN SIGN -> "k")
                if not PyUnicode_IS_ASCII(low):
                    if (<str>low).startswith("ce_") and PyUnicode_GET_LENGTH(low) > 3:
                        if type(hv) is not bytes:
                            raise _Defer
                        if ext_raw is None:
                            ext_raw = {}
                        ext_raw[low[3:]] = hv
                    continue
                name = low
            np = PyUnicode_1BYTE_DATA(name)
            n = PyUnicode_GET_LENGTH(name)
            slot = _slot_of(np, n)
            if slot == H_IGNORE:
                continue
            if type(hv) is not bytes:  # None or str values: the reference's business
                raise _Defer
            if slot == H_ID:
                h_id = hv
            elif slot == H_SOURCE:
                h_source = hv
            elif slot == H_TYPE:
                h_type = hv
            elif slot == H_SPECVERSION:
                h_sv = hv
            elif slot == H_TIME:
                h_time = hv
            elif slot == H_SUBJECT:
                h_subject = hv
            elif slot == H_DATASCHEMA:
                h_schema = hv
            elif slot == H_DCT:
                h_dct = hv
            elif slot == H_PK:
                h_pk = hv
            elif slot == H_SEQ:
                h_seq = hv
            elif slot == H_CT:
                h_ct = hv
            else:
                if ext_raw is None:
                    ext_raw = {}
                PyDict_SetItem(ext_raw, _lower_ascii(np + 3, n - 3), hv)

    cdef object ct = None
    cdef int kind = _KIND_JSON
    cdef object charset = None
    cdef tuple info
    if h_ct is not None:
        info = _ct_info(h_ct)
        ct = info[0]
        if info[1]:  # structured mode
            if not info[4]:
                raise _Defer  # another event format (+avro, -batch+json, ...)
            return _parse_structured(value, key, max_key)
        kind = info[2]
        charset = info[3]

    # ---- binary mode: attributes from headers
    if h_sv is None:
        if (h_id is not None or h_source is not None or h_type is not None
                or h_time is not None or h_subject is not None or h_schema is not None
                or h_dct is not None or h_pk is not None or h_seq is not None
                or ext_raw is not None):
            raise _Defer
        if value is None or PyBytes_GET_SIZE(value) == 0 or b'"specversion"' not in value:
            raise _Defer
        if detect and (ct is None or kind == _KIND_JSON):
            return _parse_structured(value, key, max_key)
        raise _Defer
    if PyBytes_GET_SIZE(h_sv) != 3 or memcmp(PyBytes_AS_STRING(h_sv), b"1.0", 3) != 0:
        raise _Defer
    if h_id is None or h_source is None or h_type is None:
        raise _Defer
    cdef str eid = _utf8(h_id)
    cdef str source = _utf8(h_source)
    cdef str etype = _utf8(h_type)
    if PyUnicode_GET_LENGTH(eid) == 0 or PyUnicode_GET_LENGTH(source) == 0 or \
            PyUnicode_GET_LENGTH(etype) == 0:
        raise _Defer

    cdef object time = None, subject = None, dataschema = None, seq = None
    cdef str pk = None
    cdef dict ext = {}
    if h_time is not None:
        time = _utf8(h_time)
    if h_subject is not None:
        subject = _utf8(h_subject)
    if h_schema is not None:
        dataschema = _utf8(h_schema)
    if h_pk is not None and PyBytes_GET_SIZE(h_pk) > 0:
        if PyBytes_GET_SIZE(h_pk) > max_key:
            raise _Defer
        pk = _utf8(h_pk)  # its UTF-8 length is the header's: within the limit
    if h_seq is not None:
        seq = _digits_value(<const unsigned char*>PyBytes_AS_STRING(h_seq),
                            PyBytes_GET_SIZE(h_seq))
        if seq is None:
            raise _Defer
    if ct is None and h_dct is not None:
        info = _ct_info(h_dct)
        ct = info[0]
        kind = info[2]
        charset = info[3]
    if ext_raw is not None:
        for n_, v_ in ext_raw.items():
            ext[n_] = _utf8(v_)
    if pk is None:
        pk = _key_from_kafka(key, max_key)

    data = None
    if value is not None and PyBytes_GET_SIZE(value) > 0:
        data = _decode_data(value, ct, kind, charset, "data")
    return _new_event(eid, source, etype, time, subject, ct, dataschema, pk, seq, data, ext)


cdef object _parse_structured(object value, object key, Py_ssize_t max_key):
    """A structured-mode event in the JSON event format (the content type is checked), as
    the reference's ``_parse_structured_json``."""
    if value is None or PyBytes_GET_SIZE(value) == 0:
        raise _Defer
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    cdef bint ok = False
    if not _needs_stdlib(p, n):
        try:
            d = _orjson_loads(value)
            ok = True
        except _orjson_error:
            pass
    global _deferred
    if not ok:
        # beyond what orjson reads exactly (19+ digit runs), or invalid: the reference's
        # standard-library path decides
        _deferred += 1
        return _ref_parse_structured_json(value, key, max_key)
    if type(d) is not dict:
        raise _Defer
    # +1: the event object itself is one level above its data
    if n > _MAX_DEPTH + 1 and _count_brackets(p, n) > _MAX_DEPTH + 1 and \
            _ref_too_deep(d, _MAX_DEPTH + 1):
        raise _Defer
    cdef dict ev = <dict>d

    sv = ev.pop("specversion", None)
    if type(sv) is not str or sv != _SPECVERSION:
        raise _Defer
    eid = ev.pop("id", None)
    source = ev.pop("source", None)
    etype = ev.pop("type", None)
    if type(eid) is not str or type(source) is not str or type(etype) is not str or \
            PyUnicode_GET_LENGTH(eid) == 0 or PyUnicode_GET_LENGTH(source) == 0 or \
            PyUnicode_GET_LENGTH(etype) == 0:
        raise _Defer
    time = ev.pop("time", None)
    subject = ev.pop("subject", None)
    dataschema = ev.pop("dataschema", None)
    dct = ev.pop("datacontenttype", None)
    if (time is not None and type(time) is not str) or \
            (subject is not None and type(subject) is not str) or \
            (dataschema is not None and type(dataschema) is not str) or \
            (dct is not None and type(dct) is not str):
        raise _Defer

    pk = ev.pop("partitionkey", None)
    if pk is None or (type(pk) is str and PyUnicode_GET_LENGTH(pk) == 0):
        pk = _key_from_kafka(key, max_key)
    else:
        pk = _check_pk(pk, max_key)
    seq = ev.pop("sequence", None)
    if seq is not None:
        seq = _sequence_json(seq)

    has_data = "data" in ev
    data = ev.pop("data", None)
    b64 = ev.pop("data_base64", None)
    cdef int kind
    if b64 is not None:
        if has_data or type(b64) is not str:
            raise _Defer
        ok = False
        try:
            raw = _b64decode(b64, validate=True)
            ok = True
        except (_b64_error, ValueError):
            pass
        if not ok:
            raise _Defer
        if PyBytes_GET_SIZE(raw) == 0:
            data = None
        elif dct is None:
            data = _decode_json(raw, "data_base64")
        else:
            kind, charset = _ref_classify(dct)
            data = _decode_data(raw, dct, kind, charset, "data_base64")
    elif data is not None and dct is not None:
        kind, charset = _ref_classify(dct)
        if kind == _KIND_TEXT:
            if type(data) is not str:
                raise _Defer
        elif kind != _KIND_JSON:  # msgpack outside data_base64, unsupported types
            raise _Defer

    ext = {}
    for k_, v_ in ev.items():
        if v_ is not None:
            ext[k_] = v_
    return _new_event(eid, source, etype, time, subject, dct, dataschema, pk, seq, data, ext)
