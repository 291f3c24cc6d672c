# cython: language_level=3
"""A compiled merge plan applied to a view document held as its JSON bytes.

A JSON-exact document is stored as orjson's bytes of it (doc_codec.py, the ``"j"`` record
form), and those bytes are also its change event's body. `apply(plan, j, event)` runs the
plan's ops (_merge.pyx's `_Op` rows) on those bytes and returns the new document's bytes,
byte-identical to ``doc_codec.json_body(<the document merged by the reference>)``, without
building the document as Python objects:

- orjson's output is canonical: no whitespace, each string escaped one way. A key is found by
  comparing its orjson bytes (quotes included) with the keys of an object scanned in place
  (a string ends at the next quote not escaped; a nested value at depth 0, strings skipped);
- a write replaces a member's value in place (a dict keeps a key's position), or appends
  ``,"key":value`` at the object's end; ``unset``/``remove`` cut the member and its comma;
  missing or null intermediate objects of a write are created as ``{}``, as the reference
  does;
- the values written come from the event as in _merge.pyx (`_value`, `_entry_id`: the same
  projections, checks and MergeErrors) and are serialized by orjson with `json_body`'s
  options; ``add`` adds two int64 in C and anything else with Python objects (the reference's
  arithmetic) and orjson for the result.

Errors are the reference's, in its order: the ops run one after the other, each reading its
event values and then its document, as merge.py's ops do. Nothing is changed in place: the
caller gets new bytes or an exception, so a `MergeError` leaves the document as it was.

What the engine does not do exactly it refuses, and the caller (_route.pyx) runs the dict
path for that update: a value that is not JSON-exact (NaN, an integer beyond 64 bits, bytes,
a non-str key, a lone surrogate), a sum beyond 64 bits or not finite, a path segment orjson
cannot encode. `stats()` counts the updates applied here and those refused (tests read it).
The differential test is tests/test_jdoc.py.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp, memcpy

import orjson

from aggregator._merge cimport (
    OP_ADD,
    OP_DELETE,
    OP_MERGE,
    OP_REMOVE,
    OP_SET,
    OP_UNSET,
    SRC_NONE,
    MergePlan,
    _entry_id,
    _Op,
    _value,
)
from aggregator.core import json_lossless
from aggregator.doc_codec import _STRICT
from aggregator.merge import MergeError

__all__ = ["REFUSED", "apply", "reset_stats", "stats"]

cdef extern from *:
    """
    static inline int jdoc_add_overflow(long long a, long long b, long long *r) {
        return __builtin_add_overflow(a, b, r);
    }
    """
    int jdoc_add_overflow(long long a, long long b, long long *r)

cdef object _dumps = orjson.dumps
cdef object _loads = orjson.loads
cdef object _lossless = json_lossless
cdef object _OPT = _STRICT
cdef object _MergeError = MergeError

REFUSED = object()  # apply's answer when the update must take the dict path
cdef object _REFUSED = REFUSED

cdef Py_ssize_t _n_applied = 0   # updates applied to the bytes
cdef Py_ssize_t _n_refused = 0   # updates refused (the caller's dict path ran)

# bytes of the JSON grammar
cdef enum:
    QUOTE = 34
    BACKSLASH = 92
    COMMA = 44
    LBRACE = 123
    RBRACE = 125
    LBRACKET = 91
    RBRACKET = 93
    NUL_N = 110   # null
    TRUE_T = 116
    FALSE_F = 102


class _Refuse(Exception):
    """Raised inside the engine for an update it does not do exactly."""


cdef object _Refused = _Refuse


cdef struct _Member:
    Py_ssize_t key    # found: index of the key's opening quote
    Py_ssize_t value  # found: first byte of its value
    Py_ssize_t end    # found: index after its value
    Py_ssize_t close  # not found: index of the object's closing brace


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline Py_ssize_t _str_end(const char* p, Py_ssize_t n, Py_ssize_t i) noexcept:
    """`p[i]` opens a string: the index after its closing quote (the first quote not
    preceded by an odd number of backslashes)."""
    cdef const char* q
    cdef Py_ssize_t j, k
    i += 1
    while True:
        q = <const char*>memchr(p + i, QUOTE, n - i)
        j = q - p
        k = j - 1
        while p[k] == BACKSLASH:
            k -= 1
        if (j - 1 - k) % 2 == 0:
            return j + 1
        i = j + 1


# the bytes a nested value's scan stops at: 1 a quote, 2 an opening bracket, 3 a closing one
cdef unsigned char _STOP[256]
_STOP[:] = [0] * 256
_STOP[QUOTE] = 1
_STOP[LBRACE] = 2
_STOP[LBRACKET] = 2
_STOP[RBRACE] = 3
_STOP[RBRACKET] = 3


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _value_end(const char* p, Py_ssize_t n, Py_ssize_t i) noexcept:
    """`p[i]` starts a value: the index after it."""
    cdef char c = p[i]
    cdef Py_ssize_t depth = 1
    cdef unsigned char k
    cdef const unsigned char* u = <const unsigned char*>p
    if c == QUOTE:
        return _str_end(p, n, i)
    if c == LBRACE or c == LBRACKET:
        i += 1
        while True:
            k = _STOP[u[i]]
            if k == 0:
                i += 1
            elif k == 1:
                i = _str_end(p, n, i)
            elif k == 2:
                depth += 1
                i += 1
            else:
                depth -= 1
                i += 1
                if depth == 0:
                    return i
    while i < n:
        c = p[i]
        if c == COMMA or c == RBRACE or c == RBRACKET:
            return i
        i += 1
    return i


@cython.boundscheck(False)
@cython.wraparound(False)
cdef bint _find(const char* p, Py_ssize_t n, Py_ssize_t o, const char* k, Py_ssize_t kn,
                _Member* m) noexcept:
    """Look up the key `k` (orjson bytes, quotes included) in the object opening at `p[o]`:
    True and its member in `m`, or False and the object's closing brace in `m.close`."""
    cdef Py_ssize_t i = o + 1
    cdef Py_ssize_t ke, ve
    if p[i] == RBRACE:
        m.close = i
        return False
    while True:
        ke = _str_end(p, n, i)
        ve = _value_end(p, n, ke + 1)
        if ke - i == kn and memcmp(p + i, k, kn) == 0:
            m.key = i
            m.value = ke + 1
            m.end = ve
            return True
        if p[ve] == COMMA:
            i = ve + 1
        else:
            m.close = ve
            return False


cdef bytes _splice(bytes s, Py_ssize_t a, Py_ssize_t b, const char* x1, Py_ssize_t n1,
                   const char* x2, Py_ssize_t n2, const char* x3, Py_ssize_t n3,
                   const char* x4, Py_ssize_t n4):
    """``s[:a] + x1 + x2 + x3 + x4 + s[b:]``, in one allocation."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(s)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n - (b - a) + n1 + n2 + n3 + n4)
    cdef char* o = PyBytes_AS_STRING(out)
    cdef const char* p = PyBytes_AS_STRING(s)
    memcpy(o, p, a)
    o += a
    if n1:
        memcpy(o, x1, n1)
        o += n1
    if n2:
        memcpy(o, x2, n2)
        o += n2
    if n3:
        memcpy(o, x3, n3)
        o += n3
    if n4:
        memcpy(o, x4, n4)
        o += n4
    memcpy(o, p + b, n - b)
    return out


cdef bytes _json(object v):
    """orjson's bytes of an event or computed value, as `json_body` writes it inside the
    document; refused unless JSON-exact."""
    cdef object t = type(v)
    cdef bytes b
    cdef const char* q
    cdef Py_ssize_t n
    try:
        b = <bytes>_dumps(v, None, _OPT)
    except TypeError:  # orjson.JSONEncodeError: > 64-bit int, bytes, lone surrogate, ...
        raise _Refused()
    if t is str or t is int or t is bool or v is None:
        return b
    # json_lossless: NaN/inf are written as null, tuples as arrays; bytes without either
    # (and strings with neither inside) need no walk
    q = PyBytes_AS_STRING(b)
    n = PyBytes_GET_SIZE(b)
    if (_has_null(q, n) or memchr(q, LBRACKET, n) != NULL) and not _lossless(v):
        raise _Refused()
    return b


cdef bint _has_null(const char* q, Py_ssize_t n) noexcept:
    """Whether ``null`` occurs in `q` (glibc's memmem costs ~700 instructions on short
    strings; most values have few n's)."""
    cdef const char* h
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        h = <const char*>memchr(q + i, NUL_N, n - i - 3)
        if h is NULL:
            return False
        if memcmp(h, "null", 4) == 0:
            return True
        i = h - q + 1
    return False


cdef enum:
    MAX_NESTING = 254  # orjson 3's recursion limit: containers nested deeper are refused


cdef int _fits(bytes vb, Py_ssize_t outer) except -1:
    """Refuse a value whose containers, `outer` containers deep in the document, would nest
    deeper than orjson writes (`json_body` would give None: the dict path stores the "d"
    form)."""
    cdef const char* q = PyBytes_AS_STRING(vb)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(vb)
    cdef Py_ssize_t i = 0, depth = 0, top = 0
    cdef char c
    if (q[0] != LBRACE and q[0] != LBRACKET) or n // 2 + outer <= MAX_NESTING:
        return 0  # a container nested k deep takes at least 2k bytes
    while i < n:
        c = q[i]
        if c == QUOTE:
            i = _str_end(q, n, i)
            continue
        if c == LBRACE or c == LBRACKET:
            depth += 1
            if depth > top:
                top = depth
        elif c == RBRACE or c == RBRACKET:
            depth -= 1
        i += 1
    if top + outer > MAX_NESTING:
        raise _Refused()
    return 0


cdef bytes _key(object k):
    """orjson's bytes of an entry id (a str) as a key."""
    try:
        return <bytes>_dumps(k)
    except TypeError:  # a lone surrogate
        raise _Refused()


cdef str _type_name(char c):
    """The reference's type name of a document value starting with `c`."""
    if c == QUOTE:
        return "str"
    if c == LBRACE:
        return "dict"
    if c == LBRACKET:
        return "list"
    if c == TRUE_T or c == FALSE_F:
        return "bool"
    return "NoneType"


@cython.final
cdef class _Doc:
    """The document being merged: its JSON bytes, None once deleted (a tombstone)."""
    cdef bytes b

    cdef Py_ssize_t put(self, Py_ssize_t o, bytes k, const char* v, Py_ssize_t vn) except -1:
        """Set member `k` of the object opening at `o` to the value bytes `v` (in place if
        it exists, else appended); returns the index of the value."""
        cdef _Member m
        cdef const char* p = PyBytes_AS_STRING(self.b)
        cdef Py_ssize_t kn = PyBytes_GET_SIZE(k)
        if _find(p, PyBytes_GET_SIZE(self.b), o, PyBytes_AS_STRING(k), kn, &m):
            self.b = _splice(self.b, m.value, m.end, v, vn, NULL, 0, NULL, 0, NULL, 0)
            return m.value
        if m.close == o + 1:  # {}
            self.b = _splice(self.b, m.close, m.close, PyBytes_AS_STRING(k), kn, ":", 1,
                             v, vn, NULL, 0)
            return m.close + kn + 1
        self.b = _splice(self.b, m.close, m.close, ",", 1, PyBytes_AS_STRING(k), kn,
                         ":", 1, v, vn)
        return m.close + kn + 2

    cdef int drop(self, _Member* m) except -1:
        """Cut a found member and its comma."""
        cdef const char* p = PyBytes_AS_STRING(self.b)
        if p[m.end] == COMMA:
            self.b = _splice(self.b, m.key, m.end + 1, NULL, 0, NULL, 0, NULL, 0, NULL, 0)
        elif p[m.key - 1] == COMMA:
            self.b = _splice(self.b, m.key - 1, m.end, NULL, 0, NULL, 0, NULL, 0, NULL, 0)
        else:
            self.b = _splice(self.b, m.key, m.end, NULL, 0, NULL, 0, NULL, 0, NULL, 0)
        return 0

    cdef Py_ssize_t container(self, _Op op, bint create) except -2:
        """merge._container: the index of the op's parent object (intermediate objects
        created when `create`, as ``{}`` in place of a null or appended), -1 if it is
        missing or not an object and not `create`."""
        cdef Py_ssize_t o = 0, i
        cdef _Member m
        cdef bytes k
        cdef const char* p
        cdef char c
        for i in range(len(op.jparents)):
            k = <bytes>op.jparents[i]
            p = PyBytes_AS_STRING(self.b)
            if _find(p, PyBytes_GET_SIZE(self.b), o, PyBytes_AS_STRING(k),
                     PyBytes_GET_SIZE(k), &m):
                c = p[m.value]
                if c == LBRACE:
                    o = m.value
                    continue
                if not create:
                    return -1
                if c == NUL_N:
                    self.b = _splice(self.b, m.value, m.end, "{}", 2, NULL, 0, NULL, 0, NULL,
                                     0)
                    o = m.value
                    continue
                raise _MergeError(
                    f"{op.where}: {op.parents[i]!r} is not an object in the document")
            if not create:
                return -1
            o = self.put(o, k, "{}", 2)
        return o

    cdef int merge_into(self, Py_ssize_t o, object v, Py_ssize_t outer) except -1:
        """``target.update(v)`` on the object opening at `o` (`outer` containers deep, its
        own brace excluded): each member of orjson's bytes of `v`, in order, set in place
        or appended."""
        cdef bytes vb = _json(v)
        _fits(vb, outer)
        cdef const char* q = PyBytes_AS_STRING(vb)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(vb)
        cdef Py_ssize_t i = 1, ke, ve
        if q[i] == RBRACE:
            return 0
        while True:
            ke = _str_end(q, n, i)
            ve = _value_end(q, n, ke + 1)
            self.put(o, PyBytes_FromStringAndSize(q + i, ke - i), q + ke + 1, ve - ke - 1)
            if q[ve] != COMMA:
                return 0
            i = ve + 1

    cdef int add(self, _Op op, _Member* m, object v) except -1:
        """``c[last] = c[last] + v`` on a found member holding a number (or a MergeError)."""
        cdef const char* p = PyBytes_AS_STRING(self.b)
        cdef char c = p[m.value]
        cdef Py_ssize_t i, n = m.end - m.value
        cdef long long acc = 0, iv, r
        cdef bint neg = False, is_int = True
        cdef char buf[24]
        cdef char* w
        cdef unsigned long long u
        if c == NUL_N:
            vb = _json(v)
            self.b = _splice(self.b, m.value, m.end, PyBytes_AS_STRING(vb),
                             PyBytes_GET_SIZE(vb), NULL, 0, NULL, 0, NULL, 0)
            return 0
        if not (c == 45 or 48 <= c <= 57):  # '-' or a digit
            raise _MergeError(f"{op.where}: document value is {_type_name(c)}, not a number")
        for i in range(n):
            c = p[m.value + i]
            if c == 46 or c == 101 or c == 69:  # . e E
                is_int = False
                break
        if p[m.value] == 45:
            neg = True
        if is_int and type(v) is int and n - neg <= 18:  # 18 digits: no overflow
            i = neg
            while i < n:
                acc = acc * 10 + (p[m.value + i] - 48)
                i += 1
            if neg:
                acc = -acc
            if -0x7FFFFFFFFFFFFFFF <= v <= 0x7FFFFFFFFFFFFFFF:
                iv = v
                if not jdoc_add_overflow(acc, iv, &r):
                    u = (<unsigned long long>0) - <unsigned long long>r if r < 0 else \
                        <unsigned long long>r
                    w = buf + 24
                    while True:
                        w -= 1
                        w[0] = <char>(48 + u % 10)
                        u //= 10
                        if u == 0:
                            break
                    if r < 0:
                        w -= 1
                        w[0] = 45
                    self.b = _splice(self.b, m.value, m.end, w, buf + 24 - w, NULL, 0, NULL,
                                     0, NULL, 0)
                    return 0
        # the reference's arithmetic (float, int and float, beyond int64)
        vb = _json(_loads(PyBytes_FromStringAndSize(p + m.value, n)) + v)
        self.b = _splice(self.b, m.value, m.end, PyBytes_AS_STRING(vb), PyBytes_GET_SIZE(vb),
                         NULL, 0, NULL, 0, NULL, 0)
        return 0

    cdef int run(self, _Op op, object v, object eid) except -1:
        """One op with its event value and entry id (merge.py's op functions)."""
        cdef int code = op.code
        cdef Py_ssize_t o
        cdef _Member m, e
        cdef const char* p
        cdef char c
        cdef bytes kb, vb
        cdef Py_ssize_t outer
        if code == OP_DELETE:
            self.b = None
            return 0
        if code == OP_UNSET or code == OP_REMOVE:
            if self.b is None:
                return 0
            o = self.container(op, False)
            if o < 0:
                return 0
            p = PyBytes_AS_STRING(self.b)
            if not _find(p, PyBytes_GET_SIZE(self.b), o, PyBytes_AS_STRING(op.jlast),
                         PyBytes_GET_SIZE(op.jlast), &m):
                return 0
            if code == OP_UNSET:
                return self.drop(&m)
            if p[m.value] != LBRACE:
                return 0
            kb = _key(eid)
            if _find(p, PyBytes_GET_SIZE(self.b), m.value, PyBytes_AS_STRING(kb),
                     PyBytes_GET_SIZE(kb), &e):
                self.drop(&e)
            return 0
        if self.b is None:
            self.b = b"{}"
        if code == OP_MERGE and op.root:
            return self.merge_into(0, v, 0)
        outer = 1 + len(op.parents)  # containers around the op's target value
        o = self.container(op, True)
        p = PyBytes_AS_STRING(self.b)
        if not _find(p, PyBytes_GET_SIZE(self.b), o, PyBytes_AS_STRING(op.jlast),
                     PyBytes_GET_SIZE(op.jlast), &m):
            c = NUL_N  # missing: as null
        else:
            c = p[m.value]
        if code == OP_SET or ((code == OP_ADD or code == OP_MERGE) and c == NUL_N):
            vb = _json(v)
            _fits(vb, outer)
            self.put(o, op.jlast, PyBytes_AS_STRING(vb), PyBytes_GET_SIZE(vb))
        elif code == OP_ADD:
            self.add(op, &m, v)
        elif code == OP_MERGE:
            if c != LBRACE:
                raise _MergeError(f"{op.where}: target is not an object in the document")
            self.merge_into(m.value, v, outer)
        else:  # OP_UPSERT
            kb = _key(eid)
            vb = _json(v)
            _fits(vb, outer + 1)
            if c == NUL_N:
                vb = b"{" + kb + b":" + vb + b"}"
                self.put(o, op.jlast, PyBytes_AS_STRING(vb), PyBytes_GET_SIZE(vb))
            elif c == LBRACE:
                self.put(m.value, kb, PyBytes_AS_STRING(vb), PyBytes_GET_SIZE(vb))
            else:
                raise _MergeError(
                    f"{op.where}: collection is not an object in the document")
        return 0


cpdef object apply(MergePlan plan, object j, object event):
    """The plan's ops on the document whose JSON bytes are `j` (None: no document, or a
    tombstone): the new document's bytes, None for a tombstone, or `REFUSED` (counted) when
    this update must take the dict path. Raises the reference's `MergeError`."""
    global _n_applied, _n_refused
    cdef _Doc d = _Doc.__new__(_Doc)
    cdef Py_ssize_t i
    cdef _Op op
    cdef object v, eid
    d.b = <bytes>j if j is not None else b"{}"
    try:
        for i in range(plan._n):
            op = <_Op>plan._rows[i]
            if op.jparents is None:
                raise _Refused()
            eid = _entry_id(op, event) if op.has_id else None
            v = _value(op, event) if op.src != SRC_NONE else None
            d.run(op, v, eid)
    except _Refuse:
        _n_refused += 1
        return _REFUSED
    _n_applied += 1
    return d.b


cpdef void count_refused():
    """Count an update the caller sent to the dict path without asking (a document not
    held as JSON bytes)."""
    global _n_refused
    _n_refused += 1


def stats():
    """{"applied": updates applied to JSON bytes, "refused": updates that took the dict
    path} since the process started (or `reset_stats`)."""
    return {"applied": _n_applied, "refused": _n_refused}


def reset_stats():
    global _n_applied, _n_refused
    _n_applied = 0
    _n_refused = 0
