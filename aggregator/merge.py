"""How an event changes a view document: compiled merge operations.

``compile_ops(specs)`` validates a feed's ``ops`` (dicts as in the config: ``op``, ``path``,
``from`` | ``value``, ``id``, ``fields``, ``negate``) once and returns a `MergePlan` whose
``apply(doc, event)`` runs a tuple of small closures: no string splitting or spec lookups
per event.

Ops (paths are dotted, e.g. ``stats.total``; intermediate objects are created on write):

* ``set``     path <- value
* ``merge``   shallow-merge an object into path (``path = ""`` merges into the root)
* ``unset``   delete path if present
* ``upsert``  path is an object used as a collection; entry ``str(<id>)`` <- value
* ``remove``  delete entry ``str(<id>)`` from the collection at path if present
* ``add``     numeric add (int/float, bool is not numeric) to path, missing/null = 0;
              ``negate = true`` subtracts
* ``delete``  tombstone: the result becomes None. Later ops of the same plan start again
              from ``{}`` if they write (set/merge/upsert/add); unset/remove keep None.

Values come from ``from`` (an event path: ``data``, ``data.a.b``, ``id``, ``time``,
``source``, ``type``, ``subject``, ``partitionkey``, ``sequence``) or ``value`` (a literal).
``fields = [...]`` projects an object value to those keys (missing keys omitted). A
missing ``from``/``id`` value (absent key, ``data`` not an object, attribute None) or a
value of the wrong type raises `MergeError`; the caller dead-letters the event with reason
``merge_error``. A document that is None going into the plan starts as ``{}`` (unless the
first op is ``delete``).

Mutation and sharing: ``apply`` mutates ``doc`` in place (nested containers included), so
the caller must pass a private *deep* copy (e.g. freshly unpacked from storage). The
returned document may share sub-objects with ``event.data``; ``apply`` never mutates
``event.data`` (a value taken from the event is copied when a later op of the same plan
could write inside it) and never lets a literal ``value`` of the plan be mutated (mutable
literals are copied on every use). Treat the result as read-only until it is serialized.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "OP_GRAMMAR",
    "OPS",
    "MergeConfigError",
    "MergeError",
    "MergePlan",
    "OpEntry",
    "compile_ops",
    "op_table",
    "compile_path",
    "get_path",
]


class MergeError(Exception):
    """An event cannot be merged (missing source value, wrong type). Dead-letter it."""

    reason = "merge_error"


class MergeConfigError(ValueError):
    """A merge op spec is invalid; the message names the op index and field.

    ``index``: the position of the op in the list given to `compile_ops` (None when the
    list itself is wrong)."""

    index: int | None = None


#: The op grammar, the one table of it (config.OpSpec checks a config's ops against it too):
#: op -> (path required, takes 'from' or 'value', the other keys it accepts). merge without
#: a path merges into the root; delete takes no path.
OP_GRAMMAR: dict[str, tuple[bool, bool, frozenset[str]]] = {
    "set": (True, True, frozenset({"fields"})),
    "merge": (False, True, frozenset({"fields"})),
    "unset": (True, False, frozenset()),
    "upsert": (True, True, frozenset({"id", "fields"})),
    "remove": (True, False, frozenset({"id"})),
    "add": (True, True, frozenset({"negate"})),
    "delete": (False, False, frozenset()),
}
OPS = tuple(OP_GRAMMAR)
_WRITES = frozenset(op for op, (_, takes_input, _) in OP_GRAMMAR.items() if takes_input)
_KEYS = frozenset({"op", "path", "from", "value", "id", "fields", "negate"})
_EVENT_ATTRS = frozenset(
    {"data", "id", "time", "source", "type", "subject", "partitionkey", "sequence"}
)

_Op = Callable[[Any, Any], Any]


# ---------------------------------------------------------------------------------------
# paths


def compile_path(dotted: str | Sequence[str]) -> tuple[str, ...]:
    """``"a.b"`` -> ``("a", "b")``; a tuple/list of segments is returned as a tuple."""
    if isinstance(dotted, str):
        return tuple(dotted.split(".")) if dotted else ()
    return tuple(dotted)


def get_path(obj: Any, dotted: str | Sequence[str]) -> Any:
    """The value at a dotted path (or a pre-split tuple of segments); KeyError if absent.

    Dicts are indexed; a non-dict *root* (an Event) is read by attribute, so both
    ``get_path(event, "data.customer_id")`` and ``get_path(event.data, ("customer_id",))``
    work. Returns the raw value: convert view keys with ``str()`` (after rejecting None /
    containers as the caller sees fit).
    """
    path = dotted.split(".") if isinstance(dotted, str) else dotted
    v = obj
    for i, k in enumerate(path):
        if isinstance(v, dict):
            try:
                v = v[k]
            except (KeyError, TypeError):
                raise KeyError(k) from None
        elif i == 0 and not isinstance(v, _PLAIN) and not k.startswith("_"):
            try:
                v = getattr(v, k)
            except AttributeError:
                raise KeyError(k) from None
        else:
            raise KeyError(k)
    return v


# Values whose attributes are never document fields (``"abc".upper`` is not a path).
_PLAIN = (str, bytes, bytearray, int, float, list, tuple, type(None))


def _clone(v: Any) -> Any:
    t = type(v)
    if t is dict:
        return {k: _clone(x) for k, x in v.items()}
    if t is list:
        return [_clone(x) for x in v]
    return v


def _is_mutable(v: Any) -> bool:
    return type(v) is dict or type(v) is list


def _check_literal(v: Any, where: str, depth: int = 0) -> None:
    if depth > 64:
        raise MergeConfigError(f"{where}: 'value' is nested too deeply")
    if isinstance(v, float) and not math.isfinite(v):
        raise MergeConfigError(f"{where}: 'value' must be a finite number, not {v!r}")
    if v is None or isinstance(v, (bool, int, float, str)):
        return
    if isinstance(v, list):
        for x in v:
            _check_literal(x, where, depth + 1)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise MergeConfigError(f"{where}: 'value' object keys must be strings")
            _check_literal(x, where, depth + 1)
        return
    raise MergeConfigError(
        f"{where}: 'value' of type {type(v).__name__} is not JSON-like "
        "(use null/bool/number/string/array/table)"
    )


# ---------------------------------------------------------------------------------------
# compile


def _parse_doc_path(spec: dict, where: str, allow_root: bool) -> tuple[str, ...]:
    if "path" not in spec:
        raise MergeConfigError(f"{where}: missing 'path'")
    p = spec["path"]
    if not isinstance(p, str):
        raise MergeConfigError(f"{where}: 'path' must be a string")
    if p == "":
        if allow_root:
            return ()
        raise MergeConfigError(f"{where}: 'path' must not be empty")
    parts = tuple(p.split("."))
    if any(not s for s in parts):
        raise MergeConfigError(f"{where}: 'path' {p!r} has an empty segment")
    return parts


def _parse_event_path(p: Any, where: str, field: str) -> tuple[str, tuple[str, ...]]:
    if not isinstance(p, str) or not p:
        raise MergeConfigError(f"{where}: {field!r} must be a non-empty event path")
    parts = p.split(".")
    if any(not s for s in parts):
        raise MergeConfigError(f"{where}: {field!r} path {p!r} has an empty segment")
    root, rest = parts[0], tuple(parts[1:])
    if root not in _EVENT_ATTRS:
        raise MergeConfigError(
            f"{where}: {field!r} must start with one of {sorted(_EVENT_ATTRS)}, got {p!r}"
        )
    if rest and root != "data":
        raise MergeConfigError(f"{where}: {field!r} path {p!r}: only 'data' has sub-fields")
    return root, rest


def _event_getter(p: str, where: str, field: str) -> Callable[[Any], Any]:
    root, rest = _parse_event_path(p, where, field)
    if not rest:

        def get_attr(ev: Any) -> Any:
            v = getattr(ev, root, None)
            if v is None:
                raise MergeError(f"{where}: event has no {p!r}")
            return v

        return get_attr

    if len(rest) == 1:
        (k1,) = rest

        def get_one(ev: Any) -> Any:
            d = ev.data
            if isinstance(d, dict):
                try:
                    return d[k1]
                except KeyError:
                    pass
            raise MergeError(f"{where}: event has no {p!r}")

        return get_one

    def get_deep(ev: Any) -> Any:
        v = ev.data
        for k in rest:
            if not isinstance(v, dict) or k not in v:
                raise MergeError(f"{where}: event has no {p!r}")
            v = v[k]
        return v

    return get_deep


def _mutated_containers(op: str, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Paths of the containers an op writes into (in place)."""
    if op in ("set", "add", "unset"):
        return [path[:i] for i in range(len(path))]  # root .. parent
    if op in ("merge", "upsert", "remove"):
        return [path[:i] for i in range(len(path) + 1)]  # root .. the target itself
    return []


def _inserted_region(op: str, path: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """Where an op puts a value taken from outside: (prefix, strict). Any container at a
    path that starts with prefix (strictly longer if `strict`) is foreign."""
    if op == "set":
        return path, False
    return path, True  # merge: values at path.<k>; upsert: entry at path.<id>


# One compiler per op kind (`_COMPILERS`): each takes the op's spec, the op's label for
# messages (``where``) and whether event values must be cloned, and returns
# ``(path, closure)``. `_compile_one` checks what every op shares first (a table, a known op,
# known keys), then `_parse_common` the fields ops share, in a fixed order so that the
# first problem found is always the same one.


def _compile_one(i: int, spec: Any, need_clone: bool) -> tuple[str, tuple[str, ...], _Op]:
    if not isinstance(spec, dict):
        raise MergeConfigError(f"op #{i}: must be a table/dict, got {type(spec).__name__}")
    op = spec.get("op")
    if op is None:
        raise MergeConfigError(f"op #{i}: missing 'op'")
    if op not in OPS:
        raise MergeConfigError(f"op #{i}: unknown op {op!r} (expected one of {', '.join(OPS)})")
    unknown = set(spec) - _KEYS
    if unknown:
        raise MergeConfigError(
            f"op #{i} ({op}): unknown field(s) {', '.join(sorted(map(str, unknown)))}"
        )
    if op == "delete":
        return op, *_compile_delete(i, spec)
    where = f"op #{i} ({op} {spec.get('path', '')!r})"
    parsed = _parse_common(op, spec, where)
    produce = _producer(op, spec, where, parsed, need_clone) if op in _WRITES else None
    return op, *_COMPILERS[op](spec, where, parsed, produce)


def _compile_delete(i: int, spec: dict) -> tuple[tuple[str, ...], _Op]:
    for f in ("from", "value", "id", "fields"):
        if f in spec:
            raise MergeConfigError(f"op #{i} (delete): {f!r} is not allowed")
    if spec.get("path", ""):
        raise MergeConfigError(
            f"op #{i} (delete): 'path' is not allowed (delete drops the document)"
        )
    if spec.get("negate", False):
        raise MergeConfigError(f"op #{i} (delete): 'negate' is only allowed for add")

    def op_delete(doc: Any, ev: Any) -> Any:
        return None

    return (), op_delete


class _Parsed:
    """The fields every op but delete shares, checked: path, negate, id getter, fields."""

    __slots__ = ("path", "negate", "has_value", "get_id", "fields")

    def __init__(self, path: tuple[str, ...], negate: bool, has_value: bool,
                 get_id: Callable[[Any], Any] | None, fields: tuple[str, ...] | None):
        self.path = path
        self.negate = negate
        self.has_value = has_value
        self.get_id = get_id
        self.fields = fields


def _parse_common(op: str, spec: dict, where: str) -> _Parsed:
    extras = OP_GRAMMAR[op][2]
    path = _parse_doc_path(spec, where, allow_root=(op == "merge"))
    negate = spec.get("negate", False)
    if not isinstance(negate, bool):
        raise MergeConfigError(f"{where}: 'negate' must be true or false")
    if negate and "negate" not in extras:
        raise MergeConfigError(f"{where}: 'negate' is only allowed for add")

    has_from, has_value = "from" in spec, "value" in spec
    if op in _WRITES:
        if has_from == has_value:
            raise MergeConfigError(f"{where}: exactly one of 'from' or 'value' is required")
    else:
        for f in ("from", "value"):
            if f in spec:
                raise MergeConfigError(f"{where}: {f!r} is not allowed for {op}")

    get_id = None
    if "id" in extras:
        if "id" not in spec:
            raise MergeConfigError(f"{where}: missing 'id' (an event path such as 'data.order_id')")
        get_id = _event_getter(spec["id"], where, "id")
    elif "id" in spec:
        raise MergeConfigError(f"{where}: 'id' is only allowed for upsert/remove")

    fields = spec.get("fields")
    if fields is not None:
        if "fields" not in extras:
            raise MergeConfigError(f"{where}: 'fields' is only allowed for set/merge/upsert")
        if (
            not isinstance(fields, (list, tuple))
            or not fields
            or not all(isinstance(f, str) and f for f in fields)
        ):
            raise MergeConfigError(f"{where}: 'fields' must be a non-empty list of strings")
        fields = tuple(dict.fromkeys(fields))
    return _Parsed(path, negate, has_value, get_id, fields)


def _producer(op: str, spec: dict, where: str, parsed: _Parsed,
              need_clone: bool) -> Callable[[Any], Any]:
    """The value a writing op (set/merge/upsert/add) puts: a literal or an event value."""
    fields = parsed.fields
    if parsed.has_value:
        lit = spec["value"]
        _check_literal(lit, where)
        if op == "add":
            if type(lit) not in (int, float):
                raise MergeConfigError(f"{where}: 'value' must be a number for add")
            if parsed.negate:
                lit = -lit
        if fields is not None:
            if not isinstance(lit, dict):
                raise MergeConfigError(f"{where}: 'fields' needs an object 'value'")
            lit = {f: lit[f] for f in fields if f in lit}
        if op == "merge" and not isinstance(lit, dict):
            raise MergeConfigError(f"{where}: 'value' must be a table/object for merge")
        if _is_mutable(lit):

            def produce_copy(ev: Any, _lit: Any = lit) -> Any:
                return _clone(_lit)

            return produce_copy

        def produce_lit(ev: Any, _lit: Any = lit) -> Any:
            return _lit

        return produce_lit

    produce = _event_getter(spec["from"], where, "from")
    if fields is not None:
        get, fs = produce, fields

        def produce(ev: Any) -> Any:
            v = get(ev)
            if not isinstance(v, dict):
                raise MergeError(
                    f"{where}: 'fields' needs an object, got {type(v).__name__}"
                )
            return {f: v[f] for f in fs if f in v}

    if need_clone:
        get2 = produce

        def produce(ev: Any) -> Any:
            return _clone(get2(ev))

    return produce


def _container(path: tuple[str, ...], where: str) -> Callable[[dict, bool], dict | None]:
    """The parent object of `path` in a document (created on the way when `create`)."""
    parents = path[:-1]

    def container(doc: dict, create: bool) -> dict | None:
        c = doc
        for k in parents:
            n = c.get(k)
            if n is None:
                if not create:
                    return None
                n = c[k] = {}
            elif not isinstance(n, dict):
                if not create:
                    return None
                raise MergeError(f"{where}: {k!r} is not an object in the document")
            c = n
        return c

    return container


def _compile_set(spec: dict, where: str, parsed: _Parsed,
                 p: Callable[[Any], Any]) -> tuple[tuple[str, ...], _Op]:
    path = parsed.path
    last = path[-1]
    if len(path) == 1:

        def op_set(doc: Any, ev: Any) -> Any:
            v = p(ev)
            if doc is None:
                doc = {}
            doc[last] = v
            return doc

    else:
        container = _container(path, where)

        def op_set(doc: Any, ev: Any) -> Any:
            v = p(ev)
            if doc is None:
                doc = {}
            container(doc, True)[last] = v  # type: ignore[index]
            return doc

    return path, op_set


def _compile_merge(spec: dict, where: str, parsed: _Parsed,
                   p: Callable[[Any], Any]) -> tuple[tuple[str, ...], _Op]:
    path = parsed.path
    last = path[-1] if path else ""
    container = _container(path, where)

    def op_merge(doc: Any, ev: Any) -> Any:
        v = p(ev)
        if not isinstance(v, dict):
            raise MergeError(f"{where}: merge needs an object, got {type(v).__name__}")
        if doc is None:
            doc = {}
        if not path:
            doc.update(v)
            return doc
        c = container(doc, True)
        t = c.get(last)  # type: ignore[union-attr]
        if t is None:
            c[last] = dict(v)  # type: ignore[index]
        elif isinstance(t, dict):
            t.update(v)
        else:
            raise MergeError(f"{where}: target is not an object in the document")
        return doc

    return path, op_merge


def _compile_unset(spec: dict, where: str, parsed: _Parsed,
                   p: None) -> tuple[tuple[str, ...], _Op]:
    path = parsed.path
    last = path[-1]
    container = _container(path, where)

    def op_unset(doc: Any, ev: Any) -> Any:
        if doc is None:
            return None
        c = container(doc, False)
        if c is not None:
            c.pop(last, None)
        return doc

    return path, op_unset


def _entry_id(parsed: _Parsed, where: str) -> Callable[[Any], str]:
    """The entry id of an upsert/remove: a string, or a number as its string."""
    get_id = parsed.get_id
    assert get_id is not None

    def entry_id(ev: Any) -> str:
        x = get_id(ev)
        t = type(x)
        if t is str:
            return x
        if t is int or t is float:
            return str(x)
        raise MergeError(f"{where}: entry id must be a string or number, got {t.__name__}")

    return entry_id


def _compile_upsert(spec: dict, where: str, parsed: _Parsed,
                    p: Callable[[Any], Any]) -> tuple[tuple[str, ...], _Op]:
    path = parsed.path
    last = path[-1]
    container = _container(path, where)
    entry_id = _entry_id(parsed, where)

    def op_upsert(doc: Any, ev: Any) -> Any:
        eid = entry_id(ev)
        v = p(ev)
        if doc is None:
            doc = {}
        c = container(doc, True)
        coll = c.get(last)  # type: ignore[union-attr]
        if coll is None:
            c[last] = {eid: v}  # type: ignore[index]
        elif isinstance(coll, dict):
            coll[eid] = v
        else:
            raise MergeError(f"{where}: collection is not an object in the document")
        return doc

    return path, op_upsert


def _compile_remove(spec: dict, where: str, parsed: _Parsed,
                    p: None) -> tuple[tuple[str, ...], _Op]:
    path = parsed.path
    last = path[-1]
    container = _container(path, where)
    entry_id = _entry_id(parsed, where)

    def op_remove(doc: Any, ev: Any) -> Any:
        eid = entry_id(ev)
        if doc is None:
            return None
        c = container(doc, False)
        if c is not None:
            coll = c.get(last)
            if isinstance(coll, dict):
                coll.pop(eid, None)
        return doc

    return path, op_remove


def _compile_add(spec: dict, where: str, parsed: _Parsed,
                 p: Callable[[Any], Any]) -> tuple[tuple[str, ...], _Op]:
    path = parsed.path
    last = path[-1]
    container = _container(path, where)
    negate = parsed.negate
    if parsed.has_value:
        lit_n = spec["value"] if not negate else -spec["value"]

        def op_add_lit(doc: Any, ev: Any) -> Any:
            if doc is None:
                doc = {}
            c = container(doc, True)
            cur = c.get(last)  # type: ignore[union-attr]
            if cur is None:
                c[last] = lit_n  # type: ignore[index]
            elif type(cur) is int or type(cur) is float:
                c[last] = cur + lit_n  # type: ignore[index]
            else:
                raise MergeError(f"{where}: document value is {type(cur).__name__}, not a number")
            return doc

        return path, op_add_lit

    def op_add(doc: Any, ev: Any) -> Any:
        v = p(ev)
        if type(v) is not int and type(v) is not float:
            raise MergeError(f"{where}: event value is {type(v).__name__}, not a number")
        if negate:
            v = -v
        if doc is None:
            doc = {}
        c = container(doc, True)
        cur = c.get(last)  # type: ignore[union-attr]
        if cur is None:
            c[last] = v  # type: ignore[index]
        elif type(cur) is int or type(cur) is float:
            c[last] = cur + v  # type: ignore[index]
        else:
            raise MergeError(f"{where}: document value is {type(cur).__name__}, not a number")
        return doc

    return path, op_add


_COMPILERS: dict[str, Callable[..., tuple[tuple[str, ...], _Op]]] = {
    "set": _compile_set,
    "merge": _compile_merge,
    "unset": _compile_unset,
    "upsert": _compile_upsert,
    "remove": _compile_remove,
    "add": _compile_add,
}


def _needs_clone(specs: list[dict], i: int, context: list[dict] | None = None) -> bool:
    """Whether a value op i takes from the event could be written into by a later op.

    With `context` (every op of every feed of the view), any of those ops counts: they run
    on later events against the same documents, so an event value stored by reference could
    otherwise be mutated later through the document — and with it every other document or
    forwarded update that shares the event's data.
    """
    spec = specs[i]
    op = spec.get("op")
    if op not in ("set", "merge", "upsert") or "from" not in spec:
        return False
    path = compile_path(spec.get("path", "") or "")
    prefix, strict = _inserted_region(op, path)
    n = len(prefix)
    for later in (specs[i + 1 :] if context is None else context):
        lop = later.get("op")
        if lop == "delete":
            if context is None:
                return False  # the document (and everything inserted) is dropped
            continue
        for m in _mutated_containers(lop, compile_path(later.get("path", "") or "")):
            if m[:n] == prefix and (len(m) > n if strict else True):
                return True
    return False


class MergePlan:
    """Compiled ops of one feed. ``apply(doc, event) -> doc | None`` (None = tombstone)."""

    __slots__ = ("_ops", "ops", "writes", "deletes")

    def __init__(self, compiled: list[tuple[str, tuple[str, ...], _Op]]):
        self._ops: tuple[_Op, ...] = tuple(fn for _, _, fn in compiled)
        self.ops: tuple[tuple[str, str], ...] = tuple((op, ".".join(p)) for op, p, _ in compiled)
        self.writes = any(op in _WRITES for op, _, _ in compiled)
        self.deletes = any(op == "delete" for op, _, _ in compiled)

    def apply(self, doc: dict | None, event: Any) -> dict | None:
        """Run the ops on ``doc`` (mutated in place; pass a private deep copy) and return
        the new document, or None for a tombstone. Raises `MergeError`."""
        if doc is None:
            doc = {}
        for fn in self._ops:
            doc = fn(doc, event)
        return doc

    def apply_update(self, stored: dict, event: Any) -> dict | None:
        """Apply the event to a stored document ``{"v": version, "d": document, "s":
        freshness}`` in place: the new document, the version + 1 and the source's
        freshness entry ``[sequence, time]``; returns the new document. On `MergeError`
        the version and freshness are unchanged but the document may be part-changed (the
        caller rebuilds it: stages/route.py replays)."""
        doc = self.apply(stored["d"], event)
        stored["d"] = doc
        stored["v"] += 1
        stored["s"][event.source] = [event.sequence, event.time]
        return doc

    def __len__(self) -> int:
        return len(self._ops)

    def __repr__(self) -> str:
        return f"MergePlan({', '.join(f'{op} {p!r}' for op, p in self.ops)})"


def compile_ops(specs: list[dict], context: list[dict] | None = None) -> MergePlan:
    """Validate and compile a feed's ops; raises `MergeConfigError` naming the op.

    `context`: all op specs of the view this feed belongs to (see `_needs_clone`); without
    it only this plan's later ops are considered, which is safe for one application only.
    """
    if not isinstance(specs, (list, tuple)) or not specs:
        raise MergeConfigError("ops must be a non-empty list")
    specs = list(specs)
    compiled = []
    for i, spec in enumerate(specs):
        # validate first (so _needs_clone can trust the later specs' shapes)
        try:
            compiled.append(_compile_one(i, spec, False))
        except MergeConfigError as e:
            e.index = i
            raise
    compiled = [
        _compile_one(i, spec, True) if _needs_clone(specs, i, context) else compiled[i]
        for i, spec in enumerate(specs)
    ]
    return MergePlan(compiled)


# ---------------------------------------------------------------------------------------
# the op table: what the compiled twin (_merge.pyx) runs


class OpEntry(NamedTuple):
    """One checked op as data (the compiled twin's table row; this module runs closures).

    ``source``: ``"value"`` (``literal`` holds the value, negated for add and projected to
    ``fields``), or the event attribute a value is read from (``source_path`` below it, for
    ``data``; ``source_text`` is the configured string for messages). ``id_*`` likewise
    for the entry id of upsert/remove (``id_attr`` None: no id). ``clone``: an event value
    is deep-copied before it is stored (see `_needs_clone`).
    """

    op: str
    where: str
    path: tuple[str, ...]
    source: str | None
    source_path: tuple[str, ...]
    source_text: str
    literal: Any
    id_attr: str | None
    id_path: tuple[str, ...]
    id_text: str
    fields: tuple[str, ...] | None
    negate: bool
    clone: bool


def op_table(specs: list[dict], context: list[dict] | None = None) -> tuple[OpEntry, ...]:
    """The table of a feed's ops, after `compile_ops` (same arguments) checked them; each
    row holds what the op's closures hold, computed the same way."""
    compile_ops(specs, context)  # the checks and their messages
    specs = list(specs)
    rows = []
    for i, spec in enumerate(specs):
        op = spec["op"]
        if op == "delete":
            rows.append(OpEntry(op, f"op #{i} (delete)", (), None, (), "", None, None, (), "",
                                None, False, False))
            continue
        where = f"op #{i} ({op} {spec.get('path', '')!r})"
        parsed = _parse_common(op, spec, where)
        source, source_path, source_text, literal = None, (), "", None
        if op in _WRITES:
            if parsed.has_value:
                source, literal = "value", spec["value"]
                if op == "add" and parsed.negate:
                    literal = -literal
                if parsed.fields is not None:
                    literal = {f: literal[f] for f in parsed.fields if f in literal}
            else:
                source_text = spec["from"]
                source, source_path = _parse_event_path(source_text, where, "from")
        id_attr, id_path, id_text = None, (), ""
        if parsed.get_id is not None:
            id_text = spec["id"]
            id_attr, id_path = _parse_event_path(id_text, where, "id")
        rows.append(OpEntry(op, where, parsed.path, source, source_path, source_text, literal,
                            id_attr, id_path, id_text, parsed.fields, parsed.negate,
                            _needs_clone(specs, i, context)))
    return tuple(rows)
