# cython: language_level=3
"""Compiled twins of the worker's per-record loops (normal mode).

- ``read_records(worker, records, events)`` is ``Worker._read_records``: the records of one
  supervisor message that were not applied before a rewind (their offset above the
  attempt's, else the worker's, through-offset of their partition), each parsed, the
  (event, record) pairs appended to `events`, a malformed record dead-lettered;
- ``apply_gated(worker, batch, kept, codes, gk_of, ready)`` is ``GateStage._apply_gated``:
  the events the sequence gate decided on, applied, parked or counted stale in their order,
  with the parked successors a gap-filler made ready right after it; returns the positions
  of the events whose park was full (the gap policy handles them after the loop);
- ``store_docs(worker, batch)`` is ``Worker._store_docs``: the attempt's documents into the
  batch. With the shard's own ``Batch.put_doc`` (not cluster mode's), the record bytes are
  written here (`_record_bytes`: msgpack's bytes of ``{"v", "j", "s"}``, as
  ``doc_codec.pack_record`` packs them; a `Fresh` ``"s"``, _fresh.pyx, gives its own bytes)
  and logged as ``Batch._log_doc`` logs them;
- ``seq_rows(worker, batch)`` is ``Worker._seq_rows``: the gate's dirty keys as sequence
  rows;
- ``apply_updates(worker, batch, updates)`` is ``Worker._apply_updates``: the forwarded
  view updates of one link message merged (the route stage's `_apply_local` called as a C
  function when it is the installed one), a merge error dead-lettered.

Each keeps its reference's order of calls and effects; what they save is the interpreter's
per-record work (the loop, the attribute reads, the bound-method calls). An overridden
``_parse``, ``_apply_event`` or ``_apply_local`` is called as the reference calls it; the
compiled route stage (_route.pyx) is called directly when it is the installed one. worker.py and
stages/gate.py install these unless ``AGGREGATOR_PURE_CORE=1``; tests/test_loops.py runs a
worker through both and compares what it stored, published and counted.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.string cimport memcpy

from aggregator._fresh cimport Fresh
from aggregator._gc cimport untracked

import time

import msgpack

from aggregator._core import APPLY, PARK, STALE
from aggregator._route cimport apply_event_c, apply_local_c
from aggregator._route import apply_event as _compiled_apply_event
from aggregator._route import apply_local as _compiled_apply_local
from aggregator.doc_codec import json_body, pack_record
from aggregator.envelope import EnvelopeError
from aggregator.store import _DOC_HEAD, Batch
from aggregator.protocol import (
    REC_HEADERS, REC_KEY, REC_OFFSET, REC_PARTITION, REC_TOPIC, REC_VALUE,
)

__all__ = ["apply_gated", "apply_updates", "read_records", "record_bytes", "seq_rows",
           "set_reference", "store_docs"]

cdef object _EnvelopeError = EnvelopeError
cdef Py_ssize_t _TOPIC = REC_TOPIC
cdef Py_ssize_t _PARTITION = REC_PARTITION
cdef Py_ssize_t _OFFSET = REC_OFFSET
cdef Py_ssize_t _KEY = REC_KEY
cdef Py_ssize_t _VALUE = REC_VALUE
cdef Py_ssize_t _HEADERS = REC_HEADERS
cdef object _time = time.time
cdef object _ref_parse = None  # Worker._parse (the reference): an override is called
cdef object _parse = None  # parser.parse (the compiled envelope parser)
cdef object _compiled = _compiled_apply_event
cdef object _compiled_local = _compiled_apply_local
cdef object _json_body = json_body
cdef object _pack_record = pack_record
cdef object _pack = msgpack.Packer(use_bin_type=True).pack  # doc_codec's packer
cdef object _put_doc = Batch.put_doc
cdef Py_ssize_t _HEAD = _DOC_HEAD.size
cdef object _ABSENT = object()

# the gate's codes (core.APPLY, STALE, PARK; anything else is FULL)
cdef int _APPLY = APPLY
cdef int _STALE = STALE
cdef int _PARK = PARK


def set_reference(ref_parse, parse):
    """Note ``Worker._parse`` (the reference; subclasses that override it get theirs) and
    the envelope parser it calls (parser.parse)."""
    global _ref_parse, _parse
    _ref_parse = ref_parse
    _parse = parse


def read_records(self, list records, list events):
    """Worker._read_records (see the module docstring)."""
    at = self.attempt
    cdef dict through = at.through
    cdef dict wthrough = self.through
    cdef dict stats = at.stats
    cdef list maps = self.maps
    cdef bint own_parse = type(self)._parse is _ref_parse
    cdef object detect = self.detect
    cdef object max_bytes = self.max_bytes
    cdef object max_key = self.max_key
    cdef Py_ssize_t counted = 0
    cdef object last_ti = None, last_part = None
    cdef object limit = -1
    cdef object ti, part, tp, ev, plan
    cdef PyObject *hit
    try:
        for rec in records:
            ti = rec[_TOPIC]
            part = rec[_PARTITION]
            # the through-offsets do not change during one message (_advance_through runs
            # after it): consecutive records of one partition share the lookup
            if last_ti is None or ti != last_ti or part != last_part:
                tp = (ti, part)
                hit = PyDict_GetItem(through, tp)
                if hit is NULL:
                    hit = PyDict_GetItem(wthrough, tp)
                limit = <object>hit if hit is not NULL else -1
                last_ti = ti
                last_part = part
            if rec[_OFFSET] <= limit:
                continue  # already applied before a rewind
            counted += 1
            if not own_parse:
                ev = self._parse(rec)
            else:
                plan = maps[ti]
                if plan is not None:
                    ev = self._parse(rec)  # a mapped topic (mapping.py)
                else:
                    try:
                        ev = _parse(rec[_VALUE], rec[_HEADERS], rec[_KEY], max_bytes, max_key,
                                    ti in detect)
                    except _EnvelopeError as e:
                        self._dead_letter(rec, e.reason, str(e))
                        ev = None
            if ev is not None:
                events.append(untracked((ev, rec)))  # _gc.pxd
    finally:
        stats["records"] += counted


def apply_gated(self, batch, list kept, codes, gk_of, list ready):
    """GateStage._apply_gated (see the module docstring)."""
    cdef Py_ssize_t i, n = len(kept)
    cdef Py_ssize_t rp = 0, nready = len(ready)
    cdef list full = []
    cdef const unsigned char[:] cv = codes
    cdef int code
    cdef tuple r
    cdef bint direct = type(self)._apply_event is _compiled
    now = _time()
    attempt = self.attempt
    cdef dict stats = attempt.stats
    cdef dict parked = attempt.parked
    for i in range(n):
        ev, rec = kept[i]
        code = cv[i]
        if code == _APPLY:
            if direct:
                apply_event_c(self, batch, ev, rec)
            else:
                self._apply_event(batch, ev, rec)
        elif code == _PARK:
            g = gk_of[i]
            seq = ev.sequence
            batch.park(g, seq, now, rec)
            parked[(g, seq)] = (ev, rec)
        elif code == _STALE:
            stats["stale"] += 1
        else:
            full.append(i)
        while rp < nready:
            r = <tuple>ready[rp]
            if r[0] != i:
                break
            self._apply_parked(batch, r[1], r[2])
            rp += 1
    return full


cdef inline Py_ssize_t _uint_size(unsigned long long v):
    """Bytes of msgpack's encoding of a non-negative integer (its smallest form)."""
    if v < 0x80:
        return 1
    if v <= 0xFF:
        return 2
    if v <= 0xFFFF:
        return 3
    if v <= 0xFFFFFFFF:
        return 5
    return 9


cdef inline char* _put_uint(char* p, unsigned long long v):
    """msgpack's encoding of a non-negative integer at `p`; returns the end."""
    cdef int n, i
    if v < 0x80:
        p[0] = <char>v
        return p + 1
    if v <= 0xFF:
        p[0] = <char>0xCC
        n = 1
    elif v <= 0xFFFF:
        p[0] = <char>0xCD
        n = 2
    elif v <= 0xFFFFFFFF:
        p[0] = <char>0xCE
        n = 4
    else:
        p[0] = <char>0xCF
        n = 8
    for i in range(n):
        p[n - i] = <char>(v >> (8 * i))
    return p + 1 + n


cdef object _record_bytes(dict stored, object body):
    """``doc_codec.pack_record(stored, body)``: written here for a record of three keys with
    JSON bytes (``{"v": int >= 0, "j"/"d": ..., "s": dict or Fresh}`` and `body` bytes: "s"
    packed by msgpack itself, or a Fresh's bytes with its entries, _fresh.pyx), else
    pack_record's."""
    if type(body) is not bytes or len(stored) != 3:
        return _pack_record(stored, body)
    cdef PyObject* hv = PyDict_GetItem(stored, "v")
    cdef PyObject* hs = PyDict_GetItem(stored, "s")
    if hv is NULL or hs is NULL or type(<object>hv) is not int \
            or (type(<object>hs) is not dict and type(<object>hs) is not Fresh) \
            or <object>hv < 0 or <object>hv > 0xFFFFFFFFFFFFFFFF:
        return _pack_record(stored, body)
    cdef unsigned long long v = <object>hv
    cdef bytes sb = (<Fresh>hs).packed() if type(<object>hs) is Fresh else _pack(<object>hs)
    cdef Py_ssize_t nb = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t ns = PyBytes_GET_SIZE(sb)
    cdef Py_ssize_t binh = 2 if nb <= 0xFF else (3 if nb <= 0xFFFF else 5)
    cdef Py_ssize_t size = 3 + _uint_size(v) + 2 + binh + nb + 2 + ns
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = <char>0x83  # a map of 3
    p[1] = <char>0xA1  # "v"
    p[2] = <char>0x76
    p = _put_uint(p + 3, v)
    p[0] = <char>0xA1  # "j"
    p[1] = <char>0x6A
    if nb <= 0xFF:
        p[2] = <char>0xC4
        p[3] = <char>nb
    elif nb <= 0xFFFF:
        p[2] = <char>0xC5
        p[3] = <char>(nb >> 8)
        p[4] = <char>nb
    else:
        p[2] = <char>0xC6
        p[3] = <char>(nb >> 24)
        p[4] = <char>(nb >> 16)
        p[5] = <char>(nb >> 8)
        p[6] = <char>nb
    p += 2 + binh
    memcpy(p, PyBytes_AS_STRING(body), nb)
    p += nb
    p[0] = <char>0xA1  # "s"
    p[1] = <char>0x73
    memcpy(p + 2, PyBytes_AS_STRING(sb), ns)
    return out


def record_bytes(dict stored, body):
    """`_record_bytes` (tests/test_loops.py compares it with doc_codec.pack_record)."""
    return _record_bytes(stored, body)


def store_docs(self, batch):
    """Worker._store_docs (see the module docstring)."""
    at = self.attempt
    cdef dict sizes = at.doc_bytes
    cdef dict bodies = at.bodies
    cdef dict docs = at.docs
    cdef bint inline = type(batch).put_doc is _put_doc
    cdef dict docp = batch._docp if inline else None
    cdef object n = batch._doc_n if inline else 0
    cdef PyObject* hit
    cdef tuple known
    try:
        for dkey, stored in docs.items():
            v = stored["v"]
            hit = PyDict_GetItem(bodies, dkey)
            if hit is NULL or (<tuple>hit)[0] != v:
                known = (v, _json_body(stored["d"]))
                bodies[dkey] = known
            else:
                known = <tuple>hit
            if not inline:
                sizes[dkey] = batch.put_doc(dkey, stored, known[1])
                continue
            raw = _record_bytes(<dict>stored, known[1])
            # Batch._log_doc: this transaction's latest record of the document
            old = docp.get(dkey, _ABSENT)
            if old is not _ABSENT:
                n -= _HEAD + len(dkey) + (0 if old is None else len(old))
            docp[dkey] = raw
            n += _HEAD + len(dkey) + len(raw)
            sizes[dkey] = len(raw)
    finally:
        if inline:
            batch._doc_n = n


def seq_rows(self, batch):
    """Worker._seq_rows (see the module docstring)."""
    cdef dict seqpart = self.attempt.seqpart
    cdef list rows = []
    cdef PyObject* hit
    for g, last in self.gate.dirty():
        hit = PyDict_GetItem(seqpart, g)
        if hit is not NULL:
            tp = <object>hit
        else:  # a gap expired on a key without events in this batch
            row = batch.get_seq(g)
            tp = (row[1], row[2]) if row is not None else ("", -1)
        rows.append((g, last, tp[0], tp[1]))
    return rows


def apply_updates(self, batch, list updates):
    """Worker._apply_updates (see the module docstring)."""
    cdef list feeds = self.plan.feeds
    cdef bint direct = type(self)._apply_local is _compiled_local
    for feed_id, key, slot, fwd in updates:
        feed = feeds[feed_id]
        if direct:
            done = apply_local_c(self, batch, feed, key, slot, fwd)
        else:
            done = self._apply_local(batch, feed, key, slot, fwd)
        if done is None:
            self._dead_letter(fwd.record(), "merge_error", f"view {feed.view}: merge failed")
