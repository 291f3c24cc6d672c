"""Merge-and-route stage of a worker's batch: an event into the view documents it feeds.

Each feed of the event's (topic, type) names a view key (the partition key or a data field)
and so a slot; the slot's owner (routing.worker_of over `key_owners`: workers, or tasks in
cluster mode) merges it. Keys this worker owns are merged into documents held in the
attempt's `docs` (batch_state.py) for the whole transaction; the others become forwarded
updates (protocol.UPD_*) for their owners. An event changes all its views here or none: on
a merge error the views it changed are rebuilt from the stored version and the attempt's
log, it is dead-lettered and nothing is forwarded.
"""

from __future__ import annotations

import logging

from .. import core
from ..merge import MergeError, get_path
from ..plan import Feed
from ..protocol import (
    REC_OFFSET,
    REC_PARTITION,
    REC_SLOT,
    REC_TOPIC,
)
from ..routing import slot_of, slot_prefix, worker_of
from ..store import Batch, view_key

log = logging.getLogger("aggregator.worker")  # the worker's log lines, as before the split


class RouteStage:
    """Worker methods of the merge-and-route stage (`_route` is cluster mode's hook)."""

    def _apply_event(self, batch: Batch, ev, rec) -> None:
        feeds = self.plan.feeds_for(rec[REC_TOPIC], ev.type)
        self.attempt.stats["applied"] += 1
        if not feeds:
            return
        targets = self._targets(ev, rec, feeds)
        if targets is not None:
            self._route(batch, ev, rec, targets)

    def _targets(self, ev, rec, feeds) -> list | None:
        """(feed, view key, slot) of each feed, or None when a key is missing, not a
        string or an integer, or too long (the event is dead-lettered)."""
        targets = []
        for f in feeds:
            if f.key_path is None:
                key, slot = ev.partitionkey, rec[REC_SLOT]
            else:
                try:
                    key = get_path(ev.data, f.key_path)
                except (KeyError, TypeError, IndexError):
                    self._dead_letter(rec, "merge_error",
                                      f"view {f.view}: key field data.{'.'.join(f.key_path)} "
                                      "missing")
                    return None
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    self._dead_letter(rec, "merge_error",
                                      f"view {f.view}: key must be a string or integer")
                    return None
                key = str(key)
                kb = key.encode()
                if len(kb) > self.max_key:
                    self._dead_letter(rec, "key_too_long", f"view {f.view}: key too long")
                    return None
                slot = slot_of(kb)
            targets.append((f, key, slot))
        return targets

    def _route(self, batch: Batch, ev, rec, targets: list) -> None:
        """Merge into the view keys this worker owns; the others go to their workers."""
        forwards = self._merge_targets(batch, ev, rec, targets, self.index)
        for owner, update in forwards or ():
            self.attempt.stats["forwarded"] += 1
            self.attempt.out.setdefault(owner, []).append(update)

    def _merge_targets(self, batch: Batch, ev, rec, targets: list, me: int
                       ) -> list[tuple[int, list]] | None:
        """Merge the event into its view keys owned by `me` (a worker; in cluster mode a
        task); returns the updates for the others as (owner, update). All of the event or
        none of it: on a merge error its other views here are undone, it is dead-lettered
        and nothing is forwarded (None)."""
        applied: list[bytes] = []
        forwards = []
        owners = self.key_owners  # workers, or in cluster mode tasks (slot % tasks)
        for f, key, slot in targets:
            owner = worker_of(slot, owners)
            if owner != me:
                # a forwarded update: the UPD_* fields (protocol.py)
                forwards.append((owner, [f.feed_id, key, slot, ev.id, ev.source, ev.type,
                                         ev.time, ev.subject, ev.sequence, ev.data,
                                         ev.partitionkey, rec[REC_TOPIC], rec[REC_PARTITION],
                                         rec[REC_OFFSET]]))
                continue
            dkey = self._apply_local(batch, f, key, slot, ev)
            if dkey is None:
                self._undo_event(batch, rec, f, applied)
                return None
            applied.append(dkey)
        return forwards

    def _undo_event(self, batch: Batch, rec, f: Feed, applied: list[bytes]) -> None:
        """A merge into view `f` failed: undo the event's updates of the documents in
        `applied` and dead-letter it."""
        for d in applied:
            self.attempt.log[d].pop()
            self._drop_last_change(d)
        for d in set(applied):
            self._replay(batch, d)
        self._dead_letter(rec, "merge_error", f"view {f.view}: merge failed")

    def _apply_local(self, batch: Batch, f: Feed, key: str, slot: int, ev) -> bytes | None:
        """Merge one event into a document of this shard: its key, or None (and the document
        as it was before this event) on a merge error.

        Documents live in the attempt's `docs` for the whole transaction and are changed in
        place; the updates applied to each are logged so that a failing merge, which may have
        changed the document before it failed, is undone by replaying them on the stored
        version. A document comes from the worker's cache of committed documents (taken out
        of it: a rollback leaves nothing there) or from the shard.
        """
        dkey = view_key(slot_prefix(slot), f.view_id, key)
        at = self.attempt
        stored = at.docs.get(dkey)
        if stored is None:
            cache = self.doc_cache  # committed documents (doc_cache.py): the attempt owns
            stored = cache.take(dkey) if cache is not None else None  # what it takes
            if stored is None:
                stored = batch.get_doc(dkey) or {"v": 0, "d": None, "s": {}}
        try:  # the document, its version and the source's freshness, in one call
            doc = f.merge.apply_update(stored, ev)
        except MergeError as e:
            self._merge_failed(batch, f, dkey, e)
            return None
        at.docs[dkey] = stored
        at.log.setdefault(dkey, []).append((f, ev))
        chg = self.changes
        if chg.enabled and not chg.coalesce and chg.topics[f.view_id] is not None:
            if chg.json:  # the data is the stored body too, if the document is JSON-exact
                data, body = chg.encode_json(doc)
                at.bodies[dkey] = (stored["v"], body)
            else:
                data = chg.encode(doc)
            at.changes.append((dkey, f.view_id, key, stored["v"], data))
        return dkey

    def _merge_failed(self, batch: Batch, f: Feed, dkey: bytes, e: MergeError) -> None:
        """Log a failed merge and rebuild the document as it was before the event."""
        log.warning("worker %d: merge error in view %s: %s", self.index, f.view, e)
        self._replay(batch, dkey)

    def _drop_last_change(self, dkey: bytes) -> None:
        """Forget the change event of an update that was undone."""
        changes = self.attempt.changes
        for i in range(len(changes) - 1, -1, -1):
            if changes[i][0] == dkey:
                del changes[i]
                return

    def _replay(self, batch: Batch, dkey: bytes) -> None:
        """Rebuild a document from its stored version and this transaction's updates (the
        object the failed merge changed, perhaps taken from the cache, is dropped; so is
        its JSON body: the store encodes the rebuilt document)."""
        self.attempt.bodies.pop(dkey, None)
        updates = self.attempt.log.get(dkey)
        if not updates:
            self.attempt.docs.pop(dkey, None)
            return
        stored = batch.get_doc(dkey) or {"v": 0, "d": None, "s": {}}
        for f, ev in updates:
            f.merge.apply_update(stored, ev)
        self.attempt.docs[dkey] = stored


# The reference methods (what AGGREGATOR_PURE_CORE=1 runs; the twin tests compare with them).
REFERENCE = {name: getattr(RouteStage, name)
             for name in ("_apply_event", "_merge_targets", "_apply_local")}
IMPLEMENTATION = "python"

if core.IMPLEMENTATION == "cython":  # the compiled twins (_route.pyx), as core.py chooses
    _route = core.compiled("_route", "the compiled route stage")
    _route.set_reference(RouteStage._route)
    COMPILED = {"_apply_event": _route.apply_event, "_merge_targets": _route.merge_targets,
                "_apply_local": _route.apply_local}
    for _name, _fn in COMPILED.items():
        setattr(RouteStage, _name, _fn)
    IMPLEMENTATION = "cython"
