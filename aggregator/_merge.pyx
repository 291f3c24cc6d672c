# cython: language_level=3
"""Compiled twin of ``aggregator.merge``: a feed's ops as a table of typed rows, applied in
one call.

``compile_ops(specs, context)`` checks the ops with the reference (``merge.compile_ops``:
same `MergeConfigError` and message) and turns ``merge.op_table`` into `_Op` rows: op code,
path segments, where a value comes from (literal, event attribute, path below ``data``),
entry id, ``fields``, ``negate``, clone. `MergePlan.apply(doc, event)` then runs in two
phases:

1. *check*: every value the ops take from the event (and every entry id) is read, projected,
   type-checked and copied if needed, before the document is touched. A missing or
   wrong-typed event value therefore leaves the document as it was. In an *atomic* plan
   (`MergePlan.atomic`: one op, or no ``delete`` and no op's path a prefix of another's, as
   in every feed of the example config) the document is checked here too (a path through
   a non-object, adding to a string, merging into a list): no op sees what an earlier one
   wrote, so the checks on the document as it came give the reference's errors, and a
   `MergeError` always leaves the document as it was.
2. *mutate*: the ops run in order on the document (intermediate objects created on write,
   tombstones, numeric add). In a plan that is not atomic, errors that depend on the
   document can still stop this phase part-way, as in the reference: the caller
   (stages/route.py) rebuilds the document by replay, whichever plan failed.

Errors are the reference's, in the reference's order: if phase 1 fails at op k, the ops
before k run on a copy of the document first, so a document error of an earlier op is
the one raised. The semantics (copying of event values and mutable literals, bool is not a
number, int/float results, ``fields``) are merge.py's docstring; tests/test_merge_twins.py
compares the two on generated plans, documents and events.
"""

cimport cython
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF

import orjson

from aggregator import merge as _ref
from aggregator._slots cimport slot_attr, slot_offset
from aggregator.envelope import Event
from aggregator.merge import MergeError

__all__ = ["MergePlan", "compile_ops"]

cdef object _MergeError = MergeError
cdef object _dumps = orjson.dumps


cdef bytes _key_json(str k):
    """orjson's bytes of a key string, quotes included (raises TypeError if it has a lone
    surrogate)."""
    return memoryview(_dumps(k)).tobytes()

# Event attributes read at their slot offsets (_slots.pxd) when the type is exact
cdef type _Event = Event
cdef dict _EV_OFFSETS = {name: slot_offset(Event, name) for name in Event.__slots__}
cdef Py_ssize_t _EV_SOURCE = _EV_OFFSETS["source"]
cdef Py_ssize_t _EV_SEQUENCE = _EV_OFFSETS["sequence"]
cdef Py_ssize_t _EV_TIME = _EV_OFFSETS["time"]
cdef Py_ssize_t _EV_DATA = _EV_OFFSETS["data"]


cdef inline object _ev(object ev, Py_ssize_t offset, str name):
    return slot_attr(ev, _Event, offset, name)  # ``ev.<name>``

cdef dict _CODES = {"set": OP_SET, "merge": OP_MERGE, "unset": OP_UNSET, "upsert": OP_UPSERT,
                    "remove": OP_REMOVE, "add": OP_ADD, "delete": OP_DELETE}

cdef object _clone(object v):
    """merge._clone: dicts and lists deep, everything else shared."""
    cdef dict d, out
    cdef list l, lo
    cdef Py_ssize_t i, n
    if type(v) is dict:
        d = <dict>v
        out = {}
        for k, x in d.items():
            out[k] = _clone(x)
        return out
    if type(v) is list:
        l = <list>v
        n = len(l)
        lo = PyList_New(n)
        for i in range(n):
            x = _clone(l[i])
            Py_INCREF(x)
            PyList_SET_ITEM(lo, i, x)
        return lo
    return v


cdef class _Op:
    """One row of the table (see merge.OpEntry); its fields are in _merge.pxd."""

    def __init__(self, entry):
        self.code = _CODES[entry.op]
        self.where = entry.where
        path = tuple(entry.path)
        self.root = not path
        self.parents = path[:-1]
        self.last = path[-1] if path else ""
        self.src = SRC_NONE
        self.src_attr = None
        self.src_path = ()
        self.src_missing = ""
        self.literal = None
        if entry.source == "value":
            self.literal = entry.literal
            self.src = SRC_LITERAL_COPY if type(entry.literal) in (dict, list) else SRC_LITERAL
        elif entry.source is not None:
            self.src_attr = entry.source
            self.src_path = tuple(entry.source_path)
            self.src = SRC_DATA if self.src_path else SRC_ATTR
            self.src_missing = f"{entry.where}: event has no {entry.source_text!r}"
        self.has_id = entry.id_attr is not None
        self.id_attr = entry.id_attr
        self.id_path = tuple(entry.id_path)
        self.id_src = SRC_DATA if self.id_path else SRC_ATTR
        self.id_missing = f"{entry.where}: event has no {entry.id_text!r}" if self.has_id else ""
        self.src_off = _EV_OFFSETS.get(self.src_attr, -1) if self.src == SRC_ATTR else -1
        self.id_off = _EV_OFFSETS.get(self.id_attr, -1) if self.id_src == SRC_ATTR else -1
        self.fields = tuple(entry.fields) if entry.fields is not None else None
        self.negate = entry.negate
        self.clone = entry.clone
        # the path's segments as orjson writes them as keys (_jdoc.pyx); None: one is not
        # encodable (a lone surrogate), the byte engine refuses the op
        try:
            self.jparents = tuple(_key_json(k) for k in self.parents)
            self.jlast = _key_json(self.last)
        except TypeError:
            self.jparents = None
            self.jlast = None


cdef object _event_value(object ev, int src, str attr, Py_ssize_t off, tuple path,
                         str missing):
    """merge._event_getter: an event attribute (None is missing) or a path below data
    (`off`: the attribute's Event slot offset, -1 if it is none)."""
    cdef object v
    cdef PyObject* hit
    if src == SRC_ATTR:
        if off >= 0 and type(ev) is _Event:
            hit = (<PyObject**>(<char*><PyObject*>ev + off))[0]
            v = <object>hit if hit is not NULL else None
        else:
            v = getattr(ev, attr, None)
        if v is None:
            raise _MergeError(missing)
        return v
    v = _ev(ev, _EV_DATA, "data")
    for k in path:
        if not isinstance(v, dict):
            raise _MergeError(missing)
        hit = PyDict_GetItem(v, k)
        if hit is NULL:
            raise _MergeError(missing)
        v = <object>hit
    return v


cdef object _value(_Op op, object ev):
    """Phase 1 for a writing op: the value it puts (merge._producer, plus add's and merge's
    checks of an event value)."""
    cdef object v
    cdef dict d, out
    cdef PyObject* hit
    if op.src == SRC_LITERAL:
        return op.literal
    if op.src == SRC_LITERAL_COPY:
        return _clone(op.literal)
    v = _event_value(ev, op.src, op.src_attr, op.src_off, op.src_path, op.src_missing)
    if op.fields is not None:
        if not isinstance(v, dict):
            raise _MergeError(f"{op.where}: 'fields' needs an object, got {type(v).__name__}")
        d = <dict>v
        out = {}
        for f in op.fields:
            hit = PyDict_GetItem(d, f)
            if hit is not NULL:
                out[f] = <object>hit
        v = out
    if op.clone:
        v = _clone(v)
    if op.code == OP_ADD:
        if type(v) is not int and type(v) is not float:
            raise _MergeError(f"{op.where}: event value is {type(v).__name__}, not a number")
        if op.negate:
            v = -v
    elif op.code == OP_MERGE:
        if not isinstance(v, dict):
            raise _MergeError(f"{op.where}: merge needs an object, got {type(v).__name__}")
    return v


cdef str _entry_id(_Op op, object ev):
    """merge._entry_id: a string, or a number as its string."""
    cdef object x = _event_value(ev, op.id_src, op.id_attr, op.id_off, op.id_path,
                                 op.id_missing)
    t = type(x)
    if t is str:
        return <str>x
    if t is int or t is float:
        return str(x)
    raise _MergeError(f"{op.where}: entry id must be a string or number, got {t.__name__}")


cdef dict _container(_Op op, dict doc, bint create):
    """The parent object of the op's path (created on the way when `create`); None if it
    is missing (or not an object) and not `create`."""
    cdef dict c = doc
    cdef object n
    cdef PyObject* hit
    for k in op.parents:
        hit = PyDict_GetItem(c, k)
        if hit is NULL or <object>hit is None:
            if not create:
                return None
            n = {}
            PyDict_SetItem(c, k, n)
        else:
            n = <object>hit
            if not isinstance(n, dict):
                if not create:
                    return None
                raise _MergeError(f"{op.where}: {k!r} is not an object in the document")
        c = <dict>n
    return c


cdef int _check_doc(_Op op, dict doc) except -1:
    """Phase 1 of an atomic plan: the document errors `_mutate` would raise for this op on
    `doc` as it is (a missing or null object on the way is created on write: nothing
    below it can fail)."""
    cdef dict c = doc
    cdef PyObject* hit
    cdef object t
    cdef int code = op.code
    if code == OP_UNSET or code == OP_REMOVE or code == OP_DELETE or op.root:
        return 0  # these never fail on the document (merge into the root: doc is a dict)
    for k in op.parents:
        hit = PyDict_GetItem(c, k)
        if hit is NULL or <object>hit is None:
            return 0
        if not isinstance(<object>hit, dict):
            raise _MergeError(f"{op.where}: {k!r} is not an object in the document")
        c = <dict>hit
    hit = PyDict_GetItem(c, op.last)
    if hit is NULL or <object>hit is None:
        return 0
    t = <object>hit
    if code == OP_ADD:
        if type(t) is not int and type(t) is not float:
            raise _MergeError(
                f"{op.where}: document value is {type(t).__name__}, not a number")
    elif code == OP_MERGE:
        if not isinstance(t, dict):
            raise _MergeError(f"{op.where}: target is not an object in the document")
    elif code == OP_UPSERT:
        if not isinstance(t, dict):
            raise _MergeError(f"{op.where}: collection is not an object in the document")
    return 0


cdef bint _atomic(tuple table):
    """One op, or no delete and no op's path a prefix of (or equal to) another's."""
    cdef Py_ssize_t i, j, n = len(table)
    if n == 1:
        return True
    paths = [tuple(e.path) for e in table]
    for e in table:
        if e.op == "delete":
            return False
    for i in range(n):
        for j in range(i + 1, n):
            a, b = paths[i], paths[j]
            m = min(len(a), len(b))
            if a[:m] == b[:m]:
                return False
    return True


cdef object _mutate(_Op op, object doc, object v, object eid):
    """Phase 2 of one op on `doc` (a dict or None), with its phase-1 value and entry id;
    returns the document (None: tombstone)."""
    cdef dict c, dd
    cdef object t
    cdef int code = op.code
    if code == OP_DELETE:
        return None
    if code == OP_UNSET or code == OP_REMOVE:
        if doc is None:
            return None
        c = _container(op, <dict>doc, False)
        if c is not None:
            if code == OP_UNSET:
                c.pop(op.last, None)
            else:
                t = c.get(op.last)
                if isinstance(t, dict):
                    (<dict>t).pop(eid, None)
        return doc
    if doc is None:
        doc = {}
    dd = <dict>doc
    if code == OP_MERGE and op.root:
        dd.update(<dict>v)
        return doc
    c = _container(op, dd, True)
    if code == OP_SET:
        c[op.last] = v
    elif code == OP_ADD:
        t = c.get(op.last)
        if t is None:
            c[op.last] = v
        elif type(t) is int or type(t) is float:
            c[op.last] = t + v
        else:
            raise _MergeError(
                f"{op.where}: document value is {type(t).__name__}, not a number")
    elif code == OP_MERGE:
        t = c.get(op.last)
        if t is None:
            c[op.last] = dict(<dict>v)
        elif isinstance(t, dict):
            (<dict>t).update(<dict>v)
        else:
            raise _MergeError(f"{op.where}: target is not an object in the document")
    else:  # OP_UPSERT
        t = c.get(op.last)
        if t is None:
            c[op.last] = {eid: v}
        elif isinstance(t, dict):
            (<dict>t)[eid] = v
        else:
            raise _MergeError(f"{op.where}: collection is not an object in the document")
    return doc


cdef class MergePlan:
    """Compiled ops of one feed: the table and the two-phase apply (module docstring).
    Its fields are declared in _merge.pxd."""

    def __init__(self, table):
        table = tuple(table)
        self.atomic = _atomic(table)
        self._rows = tuple(_Op(e) for e in table)
        self._n = len(self._rows)
        self.ops = tuple((e.op, ".".join(e.path)) for e in table)
        self.writes = any(e.source is not None for e in table)
        self.deletes = any(e.op == "delete" for e in table)

    cpdef object apply(self, object doc, object event):
        """Run the ops on ``doc`` (mutated in place; pass a private deep copy) and return
        the new document, or None for a tombstone. Raises `MergeError`."""
        cdef Py_ssize_t i, k, n = self._n
        cdef _Op op
        cdef list vals = PyList_New(2 * n)  # (value, entry id) per op
        cdef object v, eid
        for i in range(2 * n):
            Py_INCREF(None)
            PyList_SET_ITEM(vals, i, None)
        if doc is None:
            doc = {}
        # phase 1: every event value and entry id, checked; in an atomic plan the document
        # too, in the reference's order (each op's event values, then its document)
        if self.atomic:
            for i in range(n):
                op = <_Op>self._rows[i]
                if op.has_id:
                    vals[2 * i + 1] = _entry_id(op, event)
                if op.src != SRC_NONE:
                    vals[2 * i] = _value(op, event)
                _check_doc(op, <dict>doc)
            for i in range(n):  # phase 2 (no error left)
                doc = _mutate(<_Op>self._rows[i], doc, vals[2 * i], vals[2 * i + 1])
            return doc
        for i in range(n):
            op = <_Op>self._rows[i]
            try:
                if op.has_id:
                    vals[2 * i + 1] = _entry_id(op, event)
                if op.src != SRC_NONE:
                    vals[2 * i] = _value(op, event)
            except _MergeError:
                # the reference would meet a document error of an earlier op first
                v = _clone(doc)
                for k in range(i):
                    v = _mutate(<_Op>self._rows[k], v, vals[2 * k], vals[2 * k + 1])
                raise
        # phase 2: mutate
        for i in range(n):
            doc = _mutate(<_Op>self._rows[i], doc, vals[2 * i], vals[2 * i + 1])
        return doc

    cpdef object apply_update(self, dict stored, object event):
        """Apply the event to a stored document ``{"v", "d", "s"}`` in place: the new
        document, the version + 1 and the source's freshness ``[sequence, time]``; returns
        the new document. On `MergeError` ``stored`` keeps its version and freshness (its
        document may be part-changed: see merge.MergePlan.apply_update)."""
        doc = self.apply(stored["d"], event)
        stored["d"] = doc
        stored["v"] = stored["v"] + 1
        fresh = [_ev(event, _EV_SEQUENCE, "sequence"), _ev(event, _EV_TIME, "time")]
        stored["s"][_ev(event, _EV_SOURCE, "source")] = fresh
        return doc

    def __len__(self):
        return self._n

    def __repr__(self):
        return f"MergePlan({', '.join(f'{op} {p!r}' for op, p in self.ops)})"


def compile_ops(specs, context=None):
    """merge.compile_ops, compiled: same checks and `MergeConfigError`s, a `MergePlan` of
    this module."""
    return MergePlan(_ref.op_table(specs, context))
