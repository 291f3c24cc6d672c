# cython: language_level=3
"""A stored document's freshness map, kept as the msgpack bytes it was stored as.

A view document's record is ``{"v": version, "j": JSON bytes, "s": freshness}``
(doc_codec.py), ``"s"`` a map of source -> ``[sequence, time]`` with one entry per source
that ever fed the document. The compiled route stage reads a record for each document a
transaction updates, sets one source's entry, and writes the record back at the commit.
Decoding ``"s"`` into a dict and packing it again made ~3 objects per source, ~30 per
document read from the shard (0.48 reads per record of the shop workload at 150k events:
about a fifth of the ~66 objects a record costs the worker).

`read_record(raw)` reads a record of the form this build writes (a map of three: ``"v"`` a
non-negative integer, ``"j"`` bin, ``"s"`` a map with string keys) as
``{"v": int, "j": bytes, "s": Fresh}``, checking ``"s"`` as msgpack would decode it
(structure, UTF-8 of every string, no container as a map key) without decoding it. Any
other record (the ``"d"`` form, earlier builds', anything unusual) is read by msgpack, as
``doc_codec.unpack_stored`` reads it. A map is taken as msgpack packs a dict: no key twice
(msgpack would keep the last value at the first place; the bytes kept here keep both).

A `Fresh` keeps the map's bytes and the entries set since (`put`). Packed
(`packed`: _loops.pyx writes the record with it), the entries replace those of the same
source where they stand and the new ones follow in the order they were first set: a dict's
``update``. Anything that wants the map as a mapping (``s[source]``, ``items()``, ``==``,
``doc_codec.pack_record``) gets the dict msgpack decodes, with the entries set applied,
and the `Fresh` holds that dict from then on. tests/test_fresh.py compares both ways with
msgpack on generated maps and entries; the worker's differential tests (test_loops,
test_route_twins) compare the stored bytes with the reference's.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_FromUnsignedLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcmp, memcpy

from aggregator._utf8 cimport utf8_ok

import msgpack

from aggregator.doc_codec import unpack_stored

__all__ = ["Fresh", "read", "stats"]

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    long long PyLong_AsLongLongAndOverflow(object v, int* overflow) except? -1

cdef object _unpackb = msgpack.unpackb
cdef object _UNSET = object()  # `Fresh.swap`: no entry set before
cdef object _pack = msgpack.Packer(use_bin_type=True).pack  # doc_codec's packer's options
cdef object _unpack_stored = unpack_stored
cdef Py_ssize_t _MAX_DEPTH = 32  # deeper "s" values: read by msgpack
cdef Py_ssize_t _MAX_PENDING = 64  # more entries set in one document: packed by msgpack

cdef Py_ssize_t _n_read = 0      # records read here
cdef Py_ssize_t _n_deferred = 0  # records read by msgpack


# ---------------------------------------------------------------------------------------
# reading msgpack without decoding it


cdef inline uint64_t _be(const uint8_t* p, int n) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef Py_ssize_t _str_at(const uint8_t* p, Py_ssize_t n, Py_ssize_t i,
                        Py_ssize_t* start) noexcept:
    """A msgpack str at `i`: its length (its bytes at `start`), or -1 (not a str, or
    truncated)."""
    cdef uint8_t c
    cdef Py_ssize_t h, ln
    if i >= n:
        return -1
    c = p[i]
    if 0xA0 <= c <= 0xBF:
        h, ln = 1, c & 0x1F
    elif c == 0xD9 or c == 0xDA or c == 0xDB:
        h = 2 if c == 0xD9 else (3 if c == 0xDA else 5)
        if i + h > n:
            return -1
        ln = <Py_ssize_t>_be(p + i + 1, <int>(h - 1))
    else:
        return -1
    if ln > n - i - h:
        return -1
    start[0] = i + h
    return ln


# _skip's checks: strings are UTF-8 and no map key is a container (what msgpack's decoding
# needs); the keys of the outermost map are strings (what `_merged` needs)
cdef enum:
    CHECK = 1
    STR_KEYS = 2


cdef Py_ssize_t _skip(const uint8_t* p, Py_ssize_t n, Py_ssize_t i, Py_ssize_t depth,
                      int flags) noexcept:
    """The index after the msgpack value at `i`, or -1 where this reader does not go
    (truncated, a reserved byte, ext types, nesting past _MAX_DEPTH) or, with CHECK, where
    msgpack's decoding (``raw=False, strict_map_key=False``) would fail (a string that is not
    UTF-8, a container as a map key); with STR_KEYS, -1 as well if a key of this map is not
    a string."""
    cdef uint8_t c
    cdef Py_ssize_t count = 0, ln = 0, h = 0, k, s
    cdef bint is_map = False
    cdef bint str_keys = (flags & STR_KEYS) != 0
    if i >= n or depth > _MAX_DEPTH:
        return -1
    c = p[i]
    if str_keys and not (0x80 <= c <= 0x8F or c == 0xDE or c == 0xDF):
        return -1  # not a map
    if c <= 0x7F or c >= 0xE0 or c == 0xC0 or c == 0xC2 or c == 0xC3:
        return i + 1
    if 0xA0 <= c <= 0xBF or c == 0xD9 or c == 0xDA or c == 0xDB:
        ln = _str_at(p, n, i, &s)
        if ln < 0 or ((flags & CHECK) and not utf8_ok(p + s, ln)):
            return -1
        return s + ln
    if 0x80 <= c <= 0x8F:
        count, h, is_map = c & 0x0F, 1, True
    elif 0x90 <= c <= 0x9F:
        count, h = c & 0x0F, 1
    elif c == 0xDC or c == 0xDD or c == 0xDE or c == 0xDF:
        h = 3 if (c == 0xDC or c == 0xDE) else 5
        if i + h > n:
            return -1
        count = <Py_ssize_t>_be(p + i + 1, <int>(h - 1))
        is_map = c == 0xDE or c == 0xDF
    elif c == 0xC4 or c == 0xC5 or c == 0xC6:  # bin
        h = 2 if c == 0xC4 else (3 if c == 0xC5 else 5)
        if i + h > n:
            return -1
        ln = <Py_ssize_t>_be(p + i + 1, <int>(h - 1))
        return i + h + ln if ln <= n - i - h else -1
    elif c == 0xC7 or c == 0xC8 or c == 0xC9:  # ext: read by msgpack
        return -1
    elif 0xD4 <= c <= 0xD8:  # fixext: read by msgpack
        return -1
    elif c == 0xCA:
        ln = 5
    elif c == 0xCB:
        ln = 9
    elif c == 0xCC or c == 0xD0:
        ln = 2
    elif c == 0xCD or c == 0xD1:
        ln = 3
    elif c == 0xCE or c == 0xD2:
        ln = 5
    elif c == 0xCF or c == 0xD3:
        ln = 9
    else:  # 0xC1, reserved
        return -1
    if ln:
        return i + ln if ln <= n - i else -1
    if count > n - i:  # each element takes a byte at least
        return -1
    i += h
    flags &= CHECK  # STR_KEYS: the outermost map's keys only
    for k in range(count):
        if is_map:
            if i >= n:
                return -1
            c = p[i]
            if (flags & CHECK) and ((0x80 <= c <= 0x9F) or 0xDC <= c <= 0xDF):
                return -1  # a container as a key: unhashable, msgpack raises
            if (str_keys and not (0xA0 <= c <= 0xBF or 0xD9 <= c <= 0xDB)):
                return -1
            i = _skip(p, n, i, depth + 1, flags)
            if i < 0:
                return -1
        i = _skip(p, n, i, depth + 1, flags)
        if i < 0:
            return -1
    return i


cdef Py_ssize_t _map_head(const uint8_t* p, Py_ssize_t n, Py_ssize_t i,
                          Py_ssize_t* count) noexcept:
    """The length of a msgpack map's header at `i` (its entries in `count`), or -1."""
    cdef uint8_t c
    if i >= n:
        return -1
    c = p[i]
    if 0x80 <= c <= 0x8F:
        count[0] = c & 0x0F
        return 1
    if c == 0xDE and i + 3 <= n:
        count[0] = <Py_ssize_t>_be(p + i + 1, 2)
        return 3
    if c == 0xDF and i + 5 <= n:
        count[0] = <Py_ssize_t>_be(p + i + 1, 4)
        return 5
    return -1


# ---------------------------------------------------------------------------------------
# writing msgpack as msgpack.Packer(use_bin_type=True) writes it


cdef inline char* _put_be(char* o, uint64_t v, int n) noexcept:
    cdef int i
    for i in range(n - 1, -1, -1):
        o[i] = <char>(v & 0xFF)
        v >>= 8
    return o + n


cdef char* _put_str_head(char* o, Py_ssize_t ln) noexcept:
    if ln < 32:
        o[0] = <char>(0xA0 | ln)
        return o + 1
    if ln < 256:
        o[0] = <char>0xD9
        return _put_be(o + 1, ln, 1)
    if ln < 65536:
        o[0] = <char>0xDA
        return _put_be(o + 1, ln, 2)
    o[0] = <char>0xDB
    return _put_be(o + 1, ln, 4)


cdef char* _put_int(char* o, long long v) noexcept:
    if v >= 0:
        if v < 0x80:
            o[0] = <char>v
            return o + 1
        if v <= 0xFF:
            o[0] = <char>0xCC
            return _put_be(o + 1, v, 1)
        if v <= 0xFFFF:
            o[0] = <char>0xCD
            return _put_be(o + 1, v, 2)
        if v <= 0xFFFFFFFF:
            o[0] = <char>0xCE
            return _put_be(o + 1, v, 4)
        o[0] = <char>0xCF
        return _put_be(o + 1, v, 8)
    if v >= -32:
        o[0] = <char>v
        return o + 1
    if v >= -128:
        o[0] = <char>0xD0
        return _put_be(o + 1, <uint64_t>v, 1)
    if v >= -32768:
        o[0] = <char>0xD1
        return _put_be(o + 1, <uint64_t>v, 2)
    if v >= -2147483648:
        o[0] = <char>0xD2
        return _put_be(o + 1, <uint64_t>v, 4)
    o[0] = <char>0xD3
    return _put_be(o + 1, <uint64_t>v, 8)


cdef bytes _pack_entry(object e):
    """msgpack's bytes of a freshness entry: written here for a list of None, int (64-bit)
    and str items (at most 15), else by msgpack itself (its bytes, its errors)."""
    cdef Py_ssize_t k, ln, size = 1
    cdef int overflow = 0
    cdef const char* s
    cdef char buf[160]
    cdef char* o
    cdef list items
    if type(e) is not list or len(<list>e) > 15:
        return _pack(e)
    items = <list>e
    for x in items:  # the size, and whether this writer takes every item
        if x is None:
            size += 1
        elif type(x) is int:
            PyLong_AsLongLongAndOverflow(x, &overflow)
            if overflow:
                return _pack(e)
            size += 9
        elif type(x) is str:
            try:
                PyUnicode_AsUTF8AndSize(x, &ln)
            except UnicodeEncodeError:
                return _pack(e)  # a lone surrogate: msgpack's error
            size += 5 + ln
        else:
            return _pack(e)
    if size > 160:
        return _pack(e)
    o = buf
    o[0] = <char>(0x90 | len(items))
    o += 1
    for x in items:
        if x is None:
            o[0] = <char>0xC0
            o += 1
        elif type(x) is int:
            o = _put_int(o, PyLong_AsLongLongAndOverflow(x, &overflow))
        else:
            s = PyUnicode_AsUTF8AndSize(x, &ln)
            o = _put_str_head(o, ln)
            memcpy(o, s, ln)
            o += ln
    return PyBytes_FromStringAndSize(buf, o - buf)


# ---------------------------------------------------------------------------------------


cdef class Fresh:
    """A freshness map as its msgpack bytes plus the entries set since (see the module
    docstring); a mapping on demand."""

    cdef int put(self, object source, object entry) except -1:
        """``s[source] = entry``."""
        if self.d is not None:
            self.d[source] = entry
            return 0
        if self.pending is None:
            self.pending = {}
        self.pending[source] = entry
        return 0

    cdef object swap(self, object source, object entry):
        """``s[source] = entry``; returns what `unswap` takes to set it back: the entry it
        replaced among those set since the map was read (or in the dict), else `_UNSET`
        (the map's own entry, if any, shows again)."""
        cdef dict m = self.d
        if m is None:
            m = self.pending
            if m is None:
                m = self.pending = {}
        old = m.get(source, _UNSET)
        m[source] = entry
        return old

    cdef int unswap(self, object source, object old) except -1:
        """Undo `swap(source, ...)` that returned `old` (nothing set since but what later
        swaps, undone first, set)."""
        cdef dict m = self.d if self.d is not None else self.pending
        if old is _UNSET:
            del m[source]
        else:
            m[source] = old
        return 0

    cdef Fresh clone(self):
        """A copy that later changes of either do not reach (the map's bytes shared)."""
        cdef Fresh f = Fresh.__new__(Fresh)
        f.raw = self.raw
        f.off = self.off
        f.end = self.end
        f.pending = dict(self.pending) if self.pending is not None else None
        f.d = dict(self.d) if self.d is not None else None
        return f

    cdef dict as_dict_c(self):
        """The map as msgpack decodes its bytes, the entries set since applied; held from
        now on."""
        cdef dict d
        if self.d is None:
            d = _unpackb(self.raw[self.off:self.end], raw=False, strict_map_key=False)
            if self.pending:
                d.update(self.pending)
            self.d = d
            self.raw = None
            self.pending = None
        return self.d

    cdef bytes packed(self):
        """msgpack's bytes of the map (as ``msgpack.Packer(use_bin_type=True)`` packs the
        dict `as_dict` gives)."""
        cdef bytes out
        if self.d is not None:
            return _pack(self.d)
        if self.pending:
            out = self._merged()
            if out is None:
                return _pack(self.as_dict_c())
        elif self.off == 0 and self.end == PyBytes_GET_SIZE(self.raw):
            return <bytes>self.raw
        else:
            out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(self.raw) + self.off,
                                            self.end - self.off)
        self.raw = out  # the entries are in it now: the next packing copies nothing
        self.off = 0
        self.end = PyBytes_GET_SIZE(out)
        self.pending = None
        return out

    cdef bytes _merged(self):
        """The map's bytes with the pending entries: each replaces the value of its key where
        it stands, or follows the others (in the order set). One pass over the map (its bytes
        were checked when read, or written here). None: msgpack must do it (a key that is
        not a str, too many entries, an entry msgpack refuses)."""
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(self.raw) + self.off
        cdef Py_ssize_t n = self.end - self.off
        cdef Py_ssize_t np = len(self.pending)
        cdef Py_ssize_t count = 0, h, i, k, j, ks, kl, ve, size, total
        cdef const char* kp[64]
        cdef Py_ssize_t kn[64]
        cdef char used[64]
        cdef list vals
        cdef bytes vb
        cdef char* buf
        cdef char* o
        cdef char* head
        if np > _MAX_PENDING:
            return None
        vals = []
        size = n + 5
        for key, entry in self.pending.items():
            j = len(vals)
            if type(key) is not str:
                return None
            try:
                kp[j] = PyUnicode_AsUTF8AndSize(key, &kn[j])  # kept alive by `pending`
                vb = _pack_entry(entry)
            except Exception:
                return None  # msgpack raises for the dict, in its order
            used[j] = 0
            vals.append(vb)
            size += 5 + kn[j] + PyBytes_GET_SIZE(vb)
        h = _map_head(p, n, 0, &count)
        if h < 0:
            return None
        buf = <char*>PyMem_Malloc(size)
        if buf == NULL:
            raise MemoryError()
        try:
            o = buf + 5  # the entries; the map's header goes right before them
            i = h
            total = count
            for k in range(count):
                kl = _str_at(p, n, i, &ks)
                if kl < 0:
                    return None
                ve = _skip(p, n, ks + kl, 0, 0)
                if ve < 0:
                    return None
                for j in range(np):
                    if kn[j] == kl and memcmp(kp[j], p + ks, kl) == 0:
                        used[j] = 1
                        memcpy(o, p + i, ks + kl - i)  # the key as it was
                        o += ks + kl - i
                        vb = <bytes>vals[j]
                        memcpy(o, PyBytes_AS_STRING(vb), PyBytes_GET_SIZE(vb))
                        o += PyBytes_GET_SIZE(vb)
                        break
                else:
                    memcpy(o, p + i, ve - i)
                    o += ve - i
                i = ve
            for j in range(np):
                if not used[j]:
                    total += 1
                    o = _put_str_head(o, kn[j])
                    memcpy(o, kp[j], kn[j])
                    o += kn[j]
                    vb = <bytes>vals[j]
                    memcpy(o, PyBytes_AS_STRING(vb), PyBytes_GET_SIZE(vb))
                    o += PyBytes_GET_SIZE(vb)
            if total < 16:
                head = buf + 4
                head[0] = <char>(0x80 | total)
            elif total < 65536:
                head = buf + 2
                head[0] = <char>0xDE
                _put_be(head + 1, total, 2)
            else:
                head = buf
                head[0] = <char>0xDF
                _put_be(head + 1, total, 4)
            return PyBytes_FromStringAndSize(head, o - head)
        finally:
            PyMem_Free(buf)

    # ---- a mapping, for everything else (the dict path, pack_record, tests) ------------
    def as_dict(self):
        """The map as a dict (held from now on: changes to it are the map's)."""
        return self.as_dict_c()

    def pack(self):
        """`packed` (tests)."""
        return self.packed()

    def __setitem__(self, key, value):
        self.put(key, value)

    def __getitem__(self, key):
        return self.as_dict_c()[key]

    def __delitem__(self, key):
        del self.as_dict_c()[key]

    def get(self, key, default=None):
        return self.as_dict_c().get(key, default)

    def items(self):
        return self.as_dict_c().items()

    def keys(self):
        return self.as_dict_c().keys()

    def values(self):
        return self.as_dict_c().values()

    def copy(self):
        return self.as_dict_c().copy()

    def __iter__(self):
        return iter(self.as_dict_c())

    def __len__(self):
        return len(self.as_dict_c())

    def __contains__(self, key):
        return key in self.as_dict_c()

    def __eq__(self, other):
        if isinstance(other, Fresh):
            other = (<Fresh>other).as_dict_c()
        return self.as_dict_c() == other

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return f"Fresh({self.as_dict_c()!r})"


cdef object read_record(object raw):
    """``doc_codec.unpack_stored(raw)``, with ``"s"`` a `Fresh` for a record of the form
    this build writes (see the module docstring)."""
    global _n_read, _n_deferred
    cdef const uint8_t* p
    cdef Py_ssize_t n, i, jl, h, s_at
    cdef uint64_t v
    cdef uint8_t c
    cdef Fresh f
    if type(raw) is not bytes:
        _n_deferred += 1
        return _unpack_stored(raw)
    p = <const uint8_t*>PyBytes_AS_STRING(raw)
    n = PyBytes_GET_SIZE(raw)
    if n < 9 or p[0] != 0x83 or p[1] != 0xA1 or p[2] != 0x76:  # {"v": ...
        _n_deferred += 1
        return _unpack_stored(raw)
    c = p[3]
    if c <= 0x7F:
        v, i = c, 4
    elif 0xCC <= c <= 0xCF:
        h = 1 << (c - 0xCC)  # 1, 2, 4, 8
        if 4 + h > n:
            _n_deferred += 1
            return _unpack_stored(raw)
        v, i = _be(p + 4, <int>h), 4 + h
    else:
        _n_deferred += 1
        return _unpack_stored(raw)
    if i + 4 > n or p[i] != 0xA1 or p[i + 1] != 0x6A:  # "j": bin
        _n_deferred += 1
        return _unpack_stored(raw)
    c = p[i + 2]
    if c == 0xC4 or c == 0xC5 or c == 0xC6:
        h = 1 if c == 0xC4 else (2 if c == 0xC5 else 4)
    else:
        _n_deferred += 1
        return _unpack_stored(raw)
    i += 3
    if i + h > n:
        _n_deferred += 1
        return _unpack_stored(raw)
    jl = <Py_ssize_t>_be(p + i, <int>h)
    i += h
    if jl > n - i - 3:
        _n_deferred += 1
        return _unpack_stored(raw)
    j = PyBytes_FromStringAndSize(<const char*>p + i, jl)
    i += jl
    if p[i] != 0xA1 or p[i + 1] != 0x73:  # "s": a map with str keys, nothing after it
        _n_deferred += 1
        return _unpack_stored(raw)
    s_at = i + 2
    if _skip(p, n, s_at, 0, CHECK | STR_KEYS) != n:
        _n_deferred += 1
        return _unpack_stored(raw)
    f = Fresh.__new__(Fresh)
    # its own copy of the map: the record's bytes (the old "j" in them) are freed now, not
    # kept with the document until the commit
    f.raw = PyBytes_FromStringAndSize(<const char*>p + s_at, n - s_at)
    f.off = 0
    f.end = n - s_at
    _n_read += 1
    return {"v": PyLong_FromUnsignedLongLong(v), "j": j, "s": f}


def read(raw):
    """`read_record` (tests)."""
    return read_record(raw)


def stats():
    """{"read": records read here, "deferred": records read by msgpack} (tests)."""
    return {"read": _n_read, "deferred": _n_deferred}
