# Strict UTF-8 validation for the compiled modules (_frames.pyx: routing keys and header
# names; _fresh.pyx: the strings of a stored freshness map), compiled into each: what
# bytes.decode("utf-8") accepts. No overlong forms, no surrogates, nothing beyond U+10FFFF.

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy


cdef inline bint utf8_ok(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """Whether s[:n] is UTF-8 as Python's strict decoder accepts it."""
    cdef Py_ssize_t i = 0, k
    cdef uint8_t c, c1
    cdef uint64_t w
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            while i + 8 <= n:  # ASCII, eight bytes at a time
                memcpy(&w, s + i, 8)
                if w & 0x8080808080808080ULL:
                    break
                i += 8
            continue
        if c < 0xC2:
            return False
        if c < 0xE0:  # two bytes
            if i + 2 > n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
            continue
        if c >= 0xF5:
            return False
        # three bytes (E0..EF) or four (F0..F4): continuation bytes, then the ranges of the
        # second byte that are overlong, surrogates or beyond U+10FFFF
        k = 3 if c < 0xF0 else 4
        if i + k > n:
            return False
        c1 = s[i + 1]
        if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80 or \
                (k == 4 and (s[i + 3] & 0xC0) != 0x80):
            return False
        if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0) or \
                (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):
            return False
        i += k
    return True
