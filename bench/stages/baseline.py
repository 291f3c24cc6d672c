"""Baseline (b): what a user would hand-write — one process, plain dicts, nothing durable.

The same semantics as the service on the same records, written from scratch (it uses
`aggregator.config` only to read the views of shop.toml):

- consume with `consume()` batches (the aggregator's consumer settings, `assign()` of every
  partition from the beginning, no group);
- parse CloudEvents: binary mode (``ce_*`` headers, JSON or msgpack data) and structured
  mode (``application/cloudevents+json``, ``data`` or ``data_base64``);
- dedup by ``(source, id)`` in a set;
- gate per ``(source, partitionkey)``: "latest" drops a sequence at or below the last one,
  "strict" applies ``last + 1`` and then the parked successors, parks what is ahead (bounded
  per stream and in total; on overflow or after the gap timeout the gap is skipped);
- merge into dict documents per view: set, merge, unset, upsert, remove, add, delete, with
  ``from``/``value``, ``fields`` and ``negate``; keys from the partition key or a data field.

Malformed events are counted by reason and dropped (no dead-letter topic here).
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter

import msgpack

STRUCTURED = "application/cloudevents+json"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
_MISSING = object()


class BadEvent(Exception):
    """A record that cannot be used; args[0] is the reason."""


class Event:
    __slots__ = ("id", "source", "type", "time", "subject", "partitionkey", "sequence", "data")

    def get(self, selector: tuple[str, ...]):
        """Value of a `from`/`id` selector (``("data", "a", "b")`` or ``("id",)``)."""
        head = selector[0]
        if head != "data":
            v = getattr(self, head)
            if v is None:
                raise BadEvent("merge_error")
            return v
        v = self.data
        for part in selector[1:]:
            if not isinstance(v, dict) or part not in v:
                raise BadEvent("merge_error")
            v = v[part]
        return v


def _decode_data(raw: bytes | None, ct: str | None):
    if not raw:
        return None
    media = (ct or "").split(";", 1)[0].strip().lower()
    if not media or media.endswith("/json") or media.endswith("+json"):
        return json.loads(raw)
    if media in MSGPACK_TYPES:
        return msgpack.unpackb(raw, raw=False)
    if media.startswith("text/"):
        return raw.decode()
    raise BadEvent("unsupported_content_type")


def parse(key: bytes | None, value: bytes | None, headers) -> Event:
    h: dict[str, bytes] = {}
    for name, v in headers or ():
        name = name.lower()
        if name not in h:
            h[name] = v
    ev = Event()
    ct = h.get("content-type")
    ct = ct.decode() if ct is not None else None
    if ct is not None and ct.lower().startswith(STRUCTURED):
        try:
            body = json.loads(value)
        except ValueError:
            raise BadEvent("bad_json") from None
        if not isinstance(body, dict) or body.get("specversion") != "1.0":
            raise BadEvent("bad_specversion")
        if "data_base64" in body:
            ev.data = _decode_data(base64.b64decode(body["data_base64"]),
                                   body.get("datacontenttype"))
        else:
            ev.data = body.get("data")
        attrs = body
        get = attrs.get
    else:
        if h.get("ce_specversion") != b"1.0":
            raise BadEvent("bad_specversion")
        attrs = {k[3:]: v.decode() for k, v in h.items() if k.startswith("ce_")}
        get = attrs.get
        ev.data = _decode_data(value, ct or get("datacontenttype"))
    ev.id, ev.source, ev.type = get("id"), get("source"), get("type")
    if not ev.id or not ev.source or not ev.type:
        raise BadEvent("missing_attribute")
    ev.time, ev.subject = get("time"), get("subject")
    pk = get("partitionkey") or (key.decode() if key else None)
    if not pk:
        raise BadEvent("no_partition_key")
    ev.partitionkey = pk
    seq = get("sequence")
    ev.sequence = int(seq) if seq is not None else None
    return ev


# ---- merge ops ---------------------------------------------------------------------------------


def _selector(s: str) -> tuple[str, ...]:
    return tuple(s.split("."))


def _walk(doc: dict, parts: list[str]) -> dict:
    """The parent object of a dotted path, copying (and creating) objects on the way, so that
    values shared with event data are never changed in place."""
    obj = doc
    for p in parts[:-1]:
        child = obj.get(p)
        child = dict(child) if isinstance(child, dict) else {}
        obj[p] = child
        obj = child
    return obj


def _lookup(doc: dict, parts: list[str]):
    obj = doc
    for p in parts:
        if not isinstance(obj, dict) or p not in obj:
            return _MISSING
        obj = obj[p]
    return obj


class Op:
    """One compiled op of a feed."""

    __slots__ = ("kind", "path", "src", "value", "id", "fields", "negate")

    def __init__(self, spec) -> None:
        self.kind = spec.op
        self.path = spec.path.split(".") if spec.path else []
        self.src = _selector(spec.from_) if spec.from_ is not None else None
        self.value = spec.value
        self.id = _selector(spec.id) if spec.id is not None else None
        self.fields = list(spec.fields) if spec.fields else None
        self.negate = bool(spec.negate)

    def input(self, ev: Event):
        v = ev.get(self.src) if self.src is not None else self.value
        if self.fields is not None:
            if not isinstance(v, dict):
                raise BadEvent("merge_error")
            v = {f: v[f] for f in self.fields if f in v}
        return v

    def apply(self, doc: dict | None, ev: Event) -> dict | None:
        kind = self.kind
        if kind == "delete":
            return None
        if doc is None:
            if kind in ("unset", "remove"):
                return None
            doc = {}
        path = self.path
        if kind == "set":
            _walk(doc, path)[path[-1]] = self.input(ev)
        elif kind == "add":
            v = self.input(ev)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise BadEvent("merge_error")
            parent = _walk(doc, path)
            old = parent.get(path[-1])
            if old is None:
                old = 0
            elif isinstance(old, bool) or not isinstance(old, (int, float)):
                raise BadEvent("merge_error")
            parent[path[-1]] = old - v if self.negate else old + v
        elif kind == "upsert" or kind == "remove":
            ident = ev.get(self.id)
            if isinstance(ident, bool) or not isinstance(ident, (str, int, float)):
                raise BadEvent("merge_error")
            parent = _walk(doc, path)
            coll = parent.get(path[-1])
            coll = dict(coll) if isinstance(coll, dict) else {}
            if kind == "upsert":
                coll[str(ident)] = self.input(ev)
            else:
                coll.pop(str(ident), None)
            parent[path[-1]] = coll
        elif kind == "unset":
            if _lookup(doc, path[:-1]) is not _MISSING:
                _walk(doc, path).pop(path[-1], None)
        elif kind == "merge":
            v = self.input(ev)
            if not isinstance(v, dict):
                raise BadEvent("merge_error")
            if path:
                parent = _walk(doc, path)
                target = parent.get(path[-1])
                parent[path[-1]] = {**(target if isinstance(target, dict) else {}), **v}
            else:
                doc.update(v)
        return doc


class Feed:
    __slots__ = ("view", "key", "ops")

    def __init__(self, view: str, spec) -> None:
        self.view = view
        self.key = None if spec.key == "partitionkey" else _selector(spec.key)
        self.ops = [Op(o) for o in spec.ops]


# ---- the aggregator ----------------------------------------------------------------------------


class InMemoryAggregator:
    """Dedup, sequence gate and merge over plain dicts."""

    def __init__(self, cfg) -> None:
        self.views: dict[str, dict[str, dict | None]] = {v: {} for v in cfg.views}
        self.feeds: dict[tuple[str, str], list[Feed]] = {}  # (topic, type) -> feeds
        self.any_type: dict[str, list[Feed]] = {}
        topic_of = {name: s.topic for name, s in cfg.sources.items()}
        for view, vc in cfg.views.items():
            for fc in vc.feeds:
                feed = Feed(view, fc)
                for t in fc.types:
                    if t == "*":
                        self.any_type.setdefault(topic_of[fc.source], []).append(feed)
                    else:
                        self.feeds.setdefault((topic_of[fc.source], t), []).append(feed)
        self.strict = {s.topic: s.ordering == "strict" for s in cfg.sources.values()}
        self.initial = {s.topic: s.initial_sequence for s in cfg.sources.values()}
        g = cfg.gate
        self.max_per_key, self.max_total = g.max_parked_per_key, g.max_parked_total
        self.gap_timeout = g.gap_timeout_ms / 1000.0
        self.seen: set[tuple[str, str]] = set()
        self.last: dict[tuple[str, str], int] = {}
        self.parked: dict[tuple[str, str], dict[int, tuple[str, Event]]] = {}
        self.parked_since: dict[tuple[str, str], float] = {}
        self.parked_total = 0
        self.counts: Counter[str] = Counter()

    def handle(self, topic: str, key, value, headers) -> None:
        self.counts["records"] += 1
        try:
            ev = parse(key, value, headers)
        except (BadEvent, ValueError, UnicodeDecodeError, msgpack.ExtraData) as e:
            self.counts["bad:" + (e.args[0] if isinstance(e, BadEvent) else "bad_data")] += 1
            return
        ident = (ev.source, ev.id)
        if ident in self.seen:
            self.counts["duplicates"] += 1
            return
        self.seen.add(ident)
        if ev.sequence is None:
            self._apply(topic, ev)
            return
        stream = (ev.source, ev.partitionkey)
        last = self.last.get(stream)
        if last is None:
            last = self.initial[topic] - 1
        seq = ev.sequence
        if seq <= last:
            self.counts["stale"] += 1
        elif not self.strict[topic]:
            self.last[stream] = seq
            self._apply(topic, ev)
        elif seq == last + 1:
            self.last[stream] = seq
            self._apply(topic, ev)
            if stream in self.parked:
                self._drain(stream)
        else:
            self._park(stream, topic, ev)

    def _park(self, stream, topic: str, ev: Event) -> None:
        parked = self.parked.setdefault(stream, {})
        if ev.sequence in parked:
            self.counts["stale"] += 1
            return
        if len(parked) >= self.max_per_key or self.parked_total >= self.max_total:
            self._skip_gap(stream)  # gap policy "skip", then decide again
            self._reprocess(topic, ev)
            return
        if not parked:
            self.parked_since[stream] = time.time()
        parked[ev.sequence] = (topic, ev)
        self.parked_total += 1

    def _reprocess(self, topic: str, ev: Event) -> None:
        stream = (ev.source, ev.partitionkey)
        last = self.last.get(stream, self.initial[topic] - 1)
        if ev.sequence <= last:
            self.counts["stale"] += 1
        elif ev.sequence == last + 1:
            self.last[stream] = ev.sequence
            self._apply(topic, ev)
            self._drain(stream)
        else:
            self.parked.setdefault(stream, {})[ev.sequence] = (topic, ev)
            self.parked_since.setdefault(stream, time.time())
            self.parked_total += 1

    def _drain(self, stream) -> None:
        parked = self.parked[stream]
        nxt = self.last[stream] + 1
        while nxt in parked:
            topic, ev = parked.pop(nxt)
            self.parked_total -= 1
            self.last[stream] = nxt
            self._apply(topic, ev)
            nxt += 1
        if not parked:
            del self.parked[stream]
            self.parked_since.pop(stream, None)

    def _skip_gap(self, stream) -> None:
        parked = self.parked.get(stream)
        if not parked:
            return
        self.counts["gaps_skipped"] += 1
        self.last[stream] = min(parked) - 1
        self._drain(stream)

    def expire_gaps(self, now: float) -> None:
        if not self.parked_since:
            return
        for stream, since in list(self.parked_since.items()):
            if now - since >= self.gap_timeout:
                self._skip_gap(stream)

    def _apply(self, topic: str, ev: Event) -> None:
        self.counts["applied"] += 1
        feeds = self.feeds.get((topic, ev.type)) or self.any_type.get(topic)
        if not feeds:
            return
        targets = []
        try:
            for f in feeds:
                if f.key is None:
                    k = ev.partitionkey
                else:
                    k = ev.get(f.key)
                    if isinstance(k, bool) or not isinstance(k, (str, int)):
                        raise BadEvent("merge_error")
                    k = str(k)
                targets.append((f, k))
        except BadEvent:
            self.counts["bad:merge_error"] += 1
            return
        for f, k in targets:
            docs = self.views[f.view]
            doc = docs.get(k)
            new = dict(doc) if doc is not None else {}  # a missing or deleted doc enters as {}
            try:
                for op in f.ops:
                    new = op.apply(new, ev)
            except BadEvent:
                self.counts["bad:merge_error"] += 1
                continue
            docs[k] = new

    def result(self) -> dict[str, dict[str, dict]]:
        """The views without tombstones."""
        return {v: {k: d for k, d in docs.items() if d is not None}
                for v, docs in self.views.items()}


def run(overrides: dict, targets: dict, batch: int, conn) -> None:
    """Child process: consume every record up to `targets` and aggregate in memory."""
    from aggregator.config import load_config
    from bench import workload as wl
    from bench.stages.raw import assigned_consumer

    cfg = load_config(wl.CONFIG_PATH, overrides, env={})
    agg = InMemoryAggregator(cfg)
    handle = agg.handle
    c = assigned_consumer(overrides["kafka.bootstrap_servers"], targets, "bench-baseline")
    left = dict(targets)
    t_first = 0.0
    t0 = time.monotonic()
    try:
        while left:
            msgs = c.consume(batch, 0.1)
            if not msgs:
                if time.monotonic() - t0 > 1800:
                    raise TimeoutError(f"stalled with {len(left)} partitions left")
                agg.expire_gaps(time.time())
                continue
            if not t_first:
                t_first = time.monotonic()
                cpu_first = time.process_time()
            for m in msgs:
                if m.error() is not None:
                    continue
                topic = m.topic()
                handle(topic, m.key(), m.value(), m.headers())
                tp = (topic, m.partition())
                if tp in left and m.offset() >= left[tp]:
                    del left[tp]
            agg.expire_gaps(time.time())
        t_last = time.monotonic()
        cpu = time.process_time() - cpu_first
    finally:
        c.close()
    conn.send({"records": agg.counts["records"], "counts": dict(agg.counts),
               "t_first": t_first, "cpu_window_s": cpu, "t_last": t_last, "views": agg.result()})
