# cython: language_level=3
"""Compiled twin of the common path of ``stages/route.py``: an applied event into its views.

``apply_event(worker, batch, ev, rec)`` does what ``RouteStage._apply_event`` →
``_targets`` → ``_route`` → ``_merge_targets`` → ``_apply_local`` do, in one typed call:
the feeds of (topic, type), each view key (the partition key, or a string/integer at a
path of plain dicts below ``data``) and its slot, the owner of the slot, the forwarded
updates (protocol.UPD_* fields) for other owners, the document (the attempt's ``docs``,
then the worker's doc cache, then the shard), ``plan.apply_update``, the update log and the
change event. A JSON-exact document is merged as its JSON bytes (_jdoc.pyx): its record
stays ``{"v", "j", "s"}`` (read without decoding ``"j"``, and ``"s"`` kept as its msgpack
bytes: _fresh.pyx), and the new bytes are both the change event's body and the stored
``"j"``; an update the byte engine refuses (counted)
takes the dict path, as do all updates when change events are not JSON. ``merge_targets``
and ``apply_local`` are the twins of the methods of the same names (cluster mode's
``_route`` and the forwarded updates call them).

Every rare path is the reference's own method, called unchanged: a key that is not a
string/integer found through dicts, or is too long, goes to ``RouteStage._targets`` (which
computes all keys again, nothing has changed yet, and dead-letters); a merge error to
``_merge_failed`` then ``_undo_event``; an overridden ``_route`` (cluster mode,
task_worker.py) is called with the targets. stages/route.py installs these functions on
``RouteStage`` unless ``AGGREGATOR_PURE_CORE=1``; tests/test_route_twins.py compares the
two on stores, change events, forwards, dead letters and stats.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8String
from libc.string cimport memcpy

from aggregator._gc cimport untracked

import logging
from copy import deepcopy

import orjson
import xxhash

cimport aggregator._jdoc as _jdoc
from aggregator._fresh cimport Fresh, read_record
from aggregator._merge cimport MergePlan as CMergePlan
from aggregator._slots cimport slot_attr, slot_offset
from aggregator.batch_state import BatchState
from aggregator._jdoc import REFUSED
from aggregator.doc_codec import json_body
from aggregator.envelope import Event
from aggregator.plan import Feed
from aggregator.merge import MergeError
from aggregator.protocol import REC_OFFSET, REC_PARTITION, REC_SLOT, REC_TOPIC
from aggregator.routing import SLOTS

__all__ = ["apply_event", "apply_local", "merge_targets", "set_reference"]

cdef object _hash64 = xxhash.xxh3_64_intdigest
cdef object _MergeError = MergeError
cdef object _json_body = json_body
cdef object _loads = orjson.loads
cdef object _REFUSED = REFUSED
cdef Py_ssize_t _TOPIC = REC_TOPIC
cdef Py_ssize_t _PARTITION = REC_PARTITION
cdef Py_ssize_t _OFFSET = REC_OFFSET
cdef Py_ssize_t _SLOT = REC_SLOT
cdef unsigned long long _SLOTS = SLOTS
cdef object _MISSING = object()
cdef object _base_route = None  # RouteStage._route: an override (cluster mode) is called
cdef object _BatchState = BatchState
cdef object _log = logging.getLogger("aggregator.worker")  # stages/route.py's lines
cdef object _deepcopy = deepcopy
cdef object _NONE_BEFORE = object()  # _Undo: no entry before

# Event and Feed attributes read at their slot offsets (_slots.pxd) when the type is exact
cdef type _Event = Event
cdef type _Feed = Feed
cdef Py_ssize_t _EV_ID = slot_offset(Event, "id")
cdef Py_ssize_t _EV_SOURCE = slot_offset(Event, "source")
cdef Py_ssize_t _EV_TYPE = slot_offset(Event, "type")
cdef Py_ssize_t _EV_TIME = slot_offset(Event, "time")
cdef Py_ssize_t _EV_SUBJECT = slot_offset(Event, "subject")
cdef Py_ssize_t _EV_SEQUENCE = slot_offset(Event, "sequence")
cdef Py_ssize_t _EV_DATA = slot_offset(Event, "data")
cdef Py_ssize_t _EV_PK = slot_offset(Event, "partitionkey")
cdef Py_ssize_t _F_ID = slot_offset(Feed, "feed_id")
cdef Py_ssize_t _F_VIEW_ID = slot_offset(Feed, "view_id")
cdef Py_ssize_t _F_PATH = slot_offset(Feed, "key_path")
cdef Py_ssize_t _F_MERGE = slot_offset(Feed, "merge")
cdef Py_ssize_t _F_VIEW = slot_offset(Feed, "view")


cdef inline object _ev(object ev, Py_ssize_t offset, str name):
    return slot_attr(ev, _Event, offset, name)  # ``ev.<name>``


cdef inline object _fd(object f, Py_ssize_t offset, str name):
    return slot_attr(f, _Feed, offset, name)  # ``f.<name>``


def set_reference(route):
    """Note the reference ``RouteStage._route`` (subclasses that override it get theirs)."""
    global _base_route
    _base_route = route


@cython.final
cdef class _Ctx:
    """What the route stage reads of the worker and of its attempt, read once per attempt
    (kept in the attempt's ``route`` slot, batch_state.py) instead of once per event: none
    of these attributes is reassigned during an attempt (worker.py sets them at boot,
    BatchState at its creation; a test that changes one between batches gets a new
    attempt, hence a new context)."""
    cdef dict docs, log, bodies, stats, out
    cdef list changes
    cdef object cache       # worker.doc_cache (None: off)
    cdef object plan
    cdef list plan_cache    # plan._cache
    cdef Py_ssize_t max_key
    cdef object me          # worker.index
    cdef object owners      # worker.key_owners
    cdef object chg         # worker.changes (ChangeEncoder)
    cdef bint chg_on        # chg.enabled and not chg.coalesce
    cdef object chg_topics  # chg.topics: view id -> topic or None
    cdef bint chg_json
    cdef bint jbytes        # documents merged as their JSON bytes (_jdoc.pyx): unless the
                            # change events encode documents otherwise (ChangeEncoder.encode)
    cdef bint override      # type(worker)._route is not the reference's (cluster mode)

    def __cinit__(self, object stage, object at):
        self.docs = at.docs
        self.log = at.log
        self.bodies = at.bodies
        self.stats = at.stats
        self.out = at.out
        self.changes = at.changes
        self.cache = stage.doc_cache
        self.plan = stage.plan
        self.plan_cache = self.plan._cache
        self.max_key = stage.max_key
        self.me = stage.index
        self.owners = stage.key_owners
        chg = stage.changes
        self.chg = chg
        self.chg_on = chg.enabled and not chg.coalesce
        self.chg_topics = chg.topics if self.chg_on else None
        self.chg_json = chg.json if self.chg_on else False
        self.jbytes = not chg.enabled or chg.json
        self.override = type(stage)._route is not _base_route


cdef inline _Ctx _context(object stage, object at):
    """The attempt's `_Ctx` (made at its first event)."""
    cdef object c = getattr(at, "route", None)
    if c is None:
        c = _Ctx(stage, at)
        if isinstance(at, _BatchState):
            at.route = c
    return <_Ctx>c


cdef object _view_key(object slot, object view_id, object key):
    """store.view_key(routing.slot_prefix(slot), view_id, key)."""
    cdef bytes kb = PyUnicode_AsUTF8String(key)
    cdef long s = slot
    cdef long v = view_id
    if s < 0 or s > 0xFFFF or v < 0 or v > 0xFF:  # the reference's struct/bytes errors
        from aggregator.routing import slot_prefix
        from aggregator.store import view_key
        return view_key(slot_prefix(slot), view_id, key)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(kb)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n + 3)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = <char>((s >> 8) & 0xFF)
    p[1] = <char>(s & 0xFF)
    p[2] = <char>v
    memcpy(p + 3, PyBytes_AS_STRING(kb), n)
    return out


cdef list _targets(object self, object ev, object rec, object feeds, Py_ssize_t max_key):
    """RouteStage._targets: (feed, key, slot) per feed; None when dead-lettered. The
    lists and tuples made per event here and below are untracked by the cyclic collector
    (_gc.pxd)."""
    cdef list targets = untracked([])
    cdef object f, path, v, k, key
    cdef object data = _MISSING
    cdef bytes kb
    for f in feeds:
        path = _fd(f, _F_PATH, "key_path")
        if path is None:
            targets.append(untracked((f, _ev(ev, _EV_PK, "partitionkey"), rec[_SLOT])))
            continue
        if data is _MISSING:
            data = _ev(ev, _EV_DATA, "data")
        v = data
        for k in <tuple>path:
            if type(v) is not dict:
                return self._targets(ev, rec, feeds)
            v = (<dict>v).get(k, _MISSING)
            if v is _MISSING:
                return self._targets(ev, rec, feeds)
        if type(v) is str:
            key = v
        elif type(v) is int:
            key = str(v)
        else:  # bool, None, containers, floats, subclasses: the reference decides
            return self._targets(ev, rec, feeds)
        kb = PyUnicode_AsUTF8String(key)
        if PyBytes_GET_SIZE(kb) > max_key:
            return self._targets(ev, rec, feeds)
        targets.append(untracked((f, key, <unsigned long long>_hash64(kb) % _SLOTS)))
    return targets


cdef object _read_doc(_Ctx c, object batch, bytes dkey):
    """A document's record for an update: the attempt's, else `_load_doc`."""
    stored = c.docs.get(dkey)
    return stored if stored is not None else _load_doc(c, batch, dkey)


cdef object _load_doc(_Ctx c, object batch, bytes dkey):
    """A record the attempt does not hold: the doc cache's (taken), else the shard's (as
    stored, the JSON bytes not decoded, when the byte engine may take it), else a new
    one."""
    stored = None
    cache = c.cache
    if cache is not None:
        stored = cache.take(dkey)
    if stored is None:
        if c.jbytes:  # "s" kept as stored (_fresh.pyx)
            raw = batch.doc_raw(dkey)
            stored = read_record(raw) if raw is not None else None
        else:
            stored = batch.get_doc(dkey)
        if not stored:
            stored = {"v": 0, "d": None, "s": {}}
    return stored


cdef object _apply_bytes(_Ctx c, CMergePlan m, dict stored, object ev, _Undo u):
    """The update on the record's JSON bytes (_jdoc.pyx): the new bytes (``"j"``), None (a
    tombstone, ``"d": None``) or REFUSED; the record is changed only on success, as
    `MergePlan.apply_update` changes it (version + 1, the source's freshness), and then `u`
    (unless None) notes what it was. Raises MergeError (the record unchanged)."""
    cdef object j
    cdef bint held_j = True  # the record has "j" (else "d")
    cdef PyObject* hit = PyDict_GetItem(stored, "j")
    if hit is not NULL:
        j = <object>hit
    else:
        held_j = False
        hit = PyDict_GetItem(stored, "d")
        if hit is NULL:  # (no record has neither)
            _jdoc.count_refused()
            return _REFUSED
        if <object>hit is not None:
            # a document held as objects (rebuilt by a replay, or not JSON-exact): its
            # bytes, if it has any, take the byte path from now on
            j = _json_body(<object>hit)
            if j is None:
                _jdoc.count_refused()
                return _REFUSED
        else:
            j = None
    body = _jdoc.apply(m, j, ev)
    if body is _REFUSED:
        return body
    if u is not None:
        u.snap = stored.copy()
    if body is None:  # a tombstone: "d" where it is, or last (as unpack_record puts it)
        if held_j:
            del stored["j"]
        stored["d"] = None
    else:
        if not held_j:
            del stored["d"]
        stored["j"] = body
    stored["v"] = stored["v"] + 1
    fresh = stored["s"]
    entry = untracked([_ev(ev, _EV_SEQUENCE, "sequence"), _ev(ev, _EV_TIME, "time")])
    source = _ev(ev, _EV_SOURCE, "source")
    if type(fresh) is Fresh:
        old = (<Fresh>fresh).swap(source, entry)
    else:
        old = fresh.get(source, _NONE_BEFORE) if u is not None else None
        fresh[source] = entry
    if u is not None:
        u.source = source
        u.old = old
    return body


@cython.final
cdef class _Undo:
    """One update of a document by an event, as it can be set back when a later view of the
    same event fails (or, on the dict path, when the update itself fails: the merge may
    have changed the document before it raised). Lives as long as the event's pass."""
    cdef bytes dkey
    cdef dict record   # the document's record, changed in place
    cdef dict snap     # its items before the update (a shallow copy: None until it changes)
    cdef bint whole    # the dict path: snap's "d" and "s" are copies to put back; else the
                       # byte path: "s" stays and `source`'s entry is set back to `old`
    cdef bint in_docs  # the record was in the attempt's documents before
    cdef object body   # the attempt's `bodies` entry before (_NONE_BEFORE: none)
    cdef object source, old


cdef _Undo _undo_for(_Ctx c, bytes dkey, dict stored, bint in_docs):
    cdef _Undo u = _Undo.__new__(_Undo)
    u.dkey = dkey
    u.record = stored
    u.in_docs = in_docs
    cdef PyObject* hit = PyDict_GetItem(c.bodies, dkey)
    u.body = <object>hit if hit is not NULL else _NONE_BEFORE
    return u


cdef int _restore(_Ctx c, _Undo u, bint counted) except -1:
    """Set the document of `u` back to what it was before its update (`counted`: the update
    was done and logged)."""
    cdef dict rec = u.record
    cdef object s
    if u.snap is not None:
        rec.clear()
        rec.update(u.snap)
        if not u.whole:
            s = rec["s"]
            if type(s) is Fresh:
                (<Fresh>s).unswap(u.source, u.old)
            elif u.old is _NONE_BEFORE:
                del s[u.source]
            else:
                s[u.source] = u.old
    if u.body is _NONE_BEFORE:
        c.bodies.pop(u.dkey, None)
    else:
        c.bodies[u.dkey] = u.body
    if counted:
        c.log[u.dkey] = c.log[u.dkey] - 1
    if not u.in_docs:
        c.docs.pop(u.dkey, None)
    return 0


cdef object _apply_local(object self, _Ctx c, object batch, object f, object key,
                         object slot, object ev, list undo):
    """RouteStage._apply_local: the document key, or None after a merge error.

    When documents are merged as their bytes (`c.jbytes`), what an update changed is not
    kept for the transaction (the reference logs every event, to rebuild a document by
    replaying them): the byte engine does not change a document it fails on, the dict path
    takes a copy first and puts it back if it fails, and `undo` (a list, when a later view
    of the event may still fail) gets what each update changed (`_Undo`), for
    `_merge_targets` to set back. The log then counts the updates per document (coalesced
    change events read which documents changed). Otherwise the reference's log and
    replay."""
    if not c.jbytes:
        return _apply_local_logged(self, c, batch, f, key, slot, ev)
    vid = _fd(f, _F_VIEW_ID, "view_id")
    dkey = _view_key(slot, vid, key)
    cdef dict docs = c.docs
    cdef PyObject* hit = PyDict_GetItem(docs, dkey)
    cdef bint in_docs = hit is not NULL
    stored = <object>hit if in_docs else _load_doc(c, batch, dkey)
    m = _fd(f, _F_MERGE, "merge")
    cdef _Undo u = _undo_for(c, dkey, stored, in_docs) if undo is not None else None
    body = _REFUSED
    try:
        if type(m) is CMergePlan:
            body = _apply_bytes(c, <CMergePlan>m, <dict>stored, ev, u)
        if body is not _REFUSED:
            doc = None  # (the document is its bytes)
        else:
            # the dict path may change the document before it fails: a copy to put back
            if u is None:
                u = _undo_for(c, dkey, stored, in_docs)
            u.whole = True
            snap = (<dict>stored).copy()
            d = snap.get("d")
            if d is not None:
                snap["d"] = _deepcopy(d)
            s = snap["s"]
            snap["s"] = (<Fresh>s).clone() if type(s) is Fresh else s.copy()
            u.snap = snap
            doc = _merge_dict(m, <dict>stored, ev)
    except _MergeError as e:
        # RouteStage._merge_failed's line; the document as it was before the update
        _log.warning("worker %d: merge error in view %s: %s", self.index,
                     _fd(f, _F_VIEW, "view"), e)
        if u is not None and u.whole:
            _restore(c, u, False)
        return None
    docs[dkey] = stored
    cdef dict lg = c.log
    hit = PyDict_GetItem(lg, dkey)
    lg[dkey] = (<object>hit + 1) if hit is not NULL else 1
    if undo is not None:
        undo.append(u)
    if body is not _REFUSED:
        # the stored record's body (worker._finish) and the change event's data, one
        # encoding (a tombstone: None, as ChangeEncoder.encode_json(None) gives)
        c.bodies[dkey] = untracked((stored["v"], body))
        if c.chg_on and c.chg_topics[vid] is not None:
            c.changes.append(untracked((dkey, vid, key, stored["v"], body)))
        return dkey
    _dict_change(c, dkey, vid, key, stored, doc)
    return dkey


cdef object _merge_dict(object m, dict stored, object ev):
    """The update merged as objects (`apply_update`), the record turned to the dict form
    first (unpack_record); raises MergeError (the document perhaps part-changed)."""
    j = stored.pop("j", None)
    if j is not None:
        stored["d"] = _loads(j)
    if type(m) is CMergePlan:  # a C call (merger.py compiles every feed to it)
        return (<CMergePlan>m).apply_update(stored, ev)
    return m.apply_update(stored, ev)


cdef int _dict_change(_Ctx c, bytes dkey, object vid, object key, dict stored,
                      object doc) except -1:
    """The change event (and the stored body) of an update merged as objects."""
    if c.chg_on:
        if c.chg_topics[vid] is not None:
            chg = c.chg
            if c.chg_json:  # ChangeEncoder.encode_json; its other cases there
                body = _json_body(doc)
                if body is None:
                    data, body = chg.encode_json(doc)
                else:
                    data = body
                c.bodies[dkey] = (stored["v"], body)
            else:
                data = chg.encode(doc)
            c.changes.append((dkey, vid, key, stored["v"], data))
    return 0


cdef object _apply_local_logged(object self, _Ctx c, object batch, object f, object key,
                                object slot, object ev):
    """`_apply_local` with the reference's update log and its replay after a merge error
    (change events that are not JSON: every update takes the dict path)."""
    vid = _fd(f, _F_VIEW_ID, "view_id")
    dkey = _view_key(slot, vid, key)
    stored = _read_doc(c, batch, dkey)
    m = _fd(f, _F_MERGE, "merge")
    try:
        doc = _merge_dict(m, <dict>stored, ev)
    except _MergeError as e:
        self._merge_failed(batch, f, dkey, e)
        return None
    c.docs[dkey] = stored
    cdef dict lg = c.log
    entries = lg.get(dkey)
    if entries is None:
        entries = untracked([])
        lg[dkey] = entries
    (<list>entries).append(untracked((f, ev)))
    _dict_change(c, dkey, vid, key, stored, doc)
    return dkey


cdef list _merge_targets(object self, _Ctx c, object batch, object ev, object rec,
                         list targets, object me):
    """RouteStage._merge_targets: the forwards as (owner, update), or None (undone: with
    the byte engine (`c.jbytes`) the event's updates before the failing view are set back
    from their `_Undo`s and its change events dropped, as the reference's replay and
    `_drop_last_change` leave them; else the reference's `_undo_event`)."""
    cdef list applied = None
    cdef list undo = None
    cdef list forwards = untracked([])
    cdef Py_ssize_t i = 0, last = -1, nchg = 0
    owners = c.owners
    if c.jbytes:
        for f, key, slot in targets:  # the last view of this worker's: nothing after it
            if slot % owners == me:   # can fail, so it needs no undo
                last = i
            i += 1
        nchg = len(c.changes)
    else:
        applied = untracked([])
    i = 0
    for f, key, slot in targets:
        owner = slot % owners  # routing.worker_of
        if owner != me:
            forwards.append(untracked((owner, untracked([
                _fd(f, _F_ID, "feed_id"), key, slot, _ev(ev, _EV_ID, "id"),
                _ev(ev, _EV_SOURCE, "source"), _ev(ev, _EV_TYPE, "type"),
                _ev(ev, _EV_TIME, "time"), _ev(ev, _EV_SUBJECT, "subject"),
                _ev(ev, _EV_SEQUENCE, "sequence"), _ev(ev, _EV_DATA, "data"),
                _ev(ev, _EV_PK, "partitionkey"), rec[_TOPIC], rec[_PARTITION],
                rec[_OFFSET]]))))
            i += 1
            continue
        if applied is not None:
            dkey = _apply_local(self, c, batch, f, key, slot, ev, None)
            if dkey is None:
                self._undo_event(batch, rec, f, applied)
                return None
            applied.append(dkey)
        else:
            if i < last and undo is None:
                undo = untracked([])
            dkey = _apply_local(self, c, batch, f, key, slot, ev, undo if i < last else None)
            if dkey is None:
                if undo is not None:
                    for k in range(len(undo) - 1, -1, -1):
                        _restore(c, <_Undo>undo[k], True)
                    del c.changes[nchg:]
                self._dead_letter(rec, "merge_error",
                                  f"view {_fd(f, _F_VIEW, 'view')}: merge failed")
                return None
        i += 1
    return forwards


def apply_event(self, batch, ev, rec):
    """RouteStage._apply_event (see the module docstring)."""
    apply_event_c(self, batch, ev, rec)


cdef object apply_event_c(object self, object batch, object ev, object rec):
    """`apply_event` as a C call (_loops.pyx calls it)."""
    cdef _Ctx c = _context(self, self.attempt)
    ti = rec[_TOPIC]
    etype = _ev(ev, _EV_TYPE, "type")
    feeds = (<dict>c.plan_cache[ti]).get(etype)
    if feeds is None:
        feeds = c.plan.feeds_for(ti, etype)
    cdef dict stats = c.stats
    stats["applied"] += 1
    if not feeds:
        return
    targets = _targets(self, ev, rec, feeds, c.max_key)
    if targets is None:
        return
    if c.override:  # cluster mode's _route
        self._route(batch, ev, rec, targets)
        return
    forwards = _merge_targets(self, c, batch, ev, rec, targets, c.me)
    if not forwards:
        return
    cdef dict out = c.out
    for owner, update in forwards:
        stats["forwarded"] += 1
        lst = out.get(owner)
        if lst is None:
            lst = []
            out[owner] = lst
        (<list>lst).append(update)


def merge_targets(self, batch, ev, rec, list targets, me):
    """RouteStage._merge_targets."""
    return _merge_targets(self, _context(self, self.attempt), batch, ev, rec, targets, me)


def apply_local(self, batch, f, key, slot, ev):
    """RouteStage._apply_local."""
    return _apply_local(self, _context(self, self.attempt), batch, f, key, slot, ev, None)


cdef object apply_local_c(object self, object batch, object f, object key, object slot,
                          object ev):
    """`apply_local` as a C call (_loops.pyx calls it)."""
    return _apply_local(self, _context(self, self.attempt), batch, f, key, slot, ev, None)
