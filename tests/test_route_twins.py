"""The compiled route stage (`aggregator._route`) against the reference methods of
stages/route.py: in-process workers on real LMDB shards fed the same records, once with each,
must store the same views, publish the same change events, forward the same updates, send
the same dead letters, count the same stats and log the same lines.

The records are the shop workload with events that take every rare path mixed in: a view key
from a data field that is missing, not a string or an integer (bool, float, None, object), an
integer, a non-dict on the path, too long; a merge error in the second view of an event
whose first view was merged (undone by replay), a merge error of a document that the
same batch changed before, and a document that is not JSON-exact (its change event encoded by
the fallback).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from aggregator.control import Slot
from aggregator.devtools import simulate
from aggregator.devtools.encoder import to_binary
from aggregator.protocol import Forwarded
from aggregator.stages import route
from aggregator.store import Shard
from tests import test_worker as tw
from tests.test_worker import make_cluster  # noqa: F401 - the fixture

_jdoc = pytest.importorskip("aggregator._jdoc")

pytestmark = pytest.mark.skipif(route.IMPLEMENTATION != "cython",
                                reason="AGGREGATOR_PURE_CORE=1: no compiled route stage")


def _review(i: int, customer, product, rating, data_extra: dict | None = None) -> tuple:
    data = {"review_id": f"rv-x{i}", "product_id": product, "rating": rating}
    if customer is not _ABSENT:
        data["customer_id"] = customer
    data.update(data_extra or {})
    return tw._event("reviews", "shop.review.posted", f"rv-x{i}", 1, data, f"rv-ev-x{i}")


_ABSENT = object()


def _rare_events() -> list[tuple]:
    """Reviews (customer view keyed by data.customer_id, then product view keyed by
    data.product_id whose `add` from data.rating fails on a string)."""
    ev = []
    n = 0

    def add(*a, **kw):
        nonlocal n
        n += 1
        ev.append(_review(n, *a, **kw))

    add(_ABSENT, "p-1", 4)  # key field missing
    add(True, "p-1", 4)  # bool: not a key
    add(1.5, "p-1", 4)
    add(None, "p-1", 4)
    add({"id": "c-1"}, "p-1", 4)
    add(["c-1"], "p-1", 4)
    add(12345, "p-2", 3)  # an integer key: "12345"
    add("c-" + "x" * 500, "p-1", 4)  # key too long
    add("c-1", "p-" + "y" * 500, 4)  # second view's key too long
    add("c-1", 7, 5)  # integer product key
    add("c-1", "p-1", "bad")  # merge error in the second view: the first is undone
    add("c-2", "p-3", 2)
    add("c-2", "p-3", "bad")  # merge error on a document changed in this batch
    add("c-2", "p-3", 1)
    add("c-ü", "p-ö", 5)  # non-ASCII keys
    # a document that is not JSON-exact (an infinite float: the fallback encoder)
    topic, key, _, _ = _review(99, "c-3", "p-4", 0)
    attrs = {"id": "rv-ev-inf", "source": simulate.SOURCES["reviews"].uri,
             "type": "shop.review.posted", "partitionkey": "rv-inf", "sequence": 1}
    headers, value = to_binary(attrs, {"review_id": "rv-inf", "product_id": "p-4",
                                       "customer_id": "c-3", "rating": float("inf")},
                               "application/msgpack")
    ev.append((topic, b"rv-inf", value, headers))
    for i in range(40):
        add(f"c-{i % 7}", f"p-{i % 5}", "bad" if i % 9 == 4 else i % 5)
    # a path through a non-dict: data.order_id of a payment (order view) is a list
    ev.append(tw._event("payments", "shop.payment.captured", "pay-x1", 1,
                        {"payment_id": "pay-x1", "order_id": ["o-1"], "customer_id": "c-1",
                         "amount_cents": 5, "status": "captured"}, "pay-ev-x1"))
    return ev


class RecordingCluster(tw.Cluster):
    """A Cluster that keeps every forwarded update message the workers exchanged."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.forwarded: list = []

    def pump(self) -> None:
        before = {i: len(p) for i, p in self.pending.items()}
        super().pump()
        for i, p in self.pending.items():
            self.forwarded.extend((i, _plain(m)) for m in p[before[i]:])


def _plain(msg) -> tuple:
    """A decoded link message with its updates' `Forwarded` objects as tuples of fields."""
    *head, updates = msg
    return (*head, [(feed, key, slot, tuple(getattr(fwd, a) for a in Forwarded.__slots__))
                    for feed, key, slot, fwd in updates])


def _stored_records(data_dir) -> dict[bytes, bytes]:
    """Every document's stored record, as bytes (the document log overlaid)."""
    out = {}
    for path in sorted(Path(data_dir).glob("shard-*")):
        shard = Shard(path, readonly=True)
        try:
            snap = shard.snapshot()
            try:
                out.update((bytes(k), bytes(v)) for k, v in snap.rows("views"))
            finally:
                snap.close()
        finally:
            shard.close()
    return out


def outcome(c: RecordingCluster) -> dict:
    """What a fed cluster did: views, change events (pumped), forwards, dead letters,
    counters and stored records (its workers are stopped for the views)."""
    for w in c.workers:
        w.publisher.pump()
    stats = {s.name: c.total(s) for s in (Slot.RECORDS, Slot.APPLIED, Slot.DUPLICATES,
                                           Slot.STALE, Slot.PARKED, Slot.GAPS_SKIPPED,
                                           Slot.DEADLETTERED, Slot.FORWARDED)}
    dlq = [(q_i, rec[:3], reason, msg) for q_i, q in enumerate(c.dlqs)
           for rec, reason, msg in q.sent]
    return {"views": c.views(), "published": c.published, "forwarded": c.forwarded,
            "dlq": dlq, "stats": stats, "stored": _stored_records(c.data_dir)}


def _run(tmp_path, sub: str, n: int, records: list) -> dict:
    c = RecordingCluster(tmp_path / sub, n)
    try:
        c.boot()
        c.feed(c.ring_records(records), random.Random(9), max_batch=120)
        return outcome(c)
    finally:
        c.close()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_compiled_route_stores_publishes_forwards_and_dead_letters_as_the_reference(
        tmp_path, monkeypatch, caplog, n):
    w = simulate.generate(13, 1500)
    records = list(w.records)
    rare = _rare_events()
    rng = random.Random(n)
    for r in rare:  # spread through the workload
        records.insert(rng.randrange(len(records) + 1), r)
    caplog.set_level(logging.WARNING, logger="aggregator.worker")
    _jdoc.reset_stats()
    got = _run(tmp_path, "compiled", n, records)
    jdoc = _jdoc.stats()
    logs = [r.getMessage() for r in caplog.records]
    caplog.clear()
    for name, fn in route.REFERENCE.items():
        monkeypatch.setattr(route.RouteStage, name, fn)
    ref = _run(tmp_path, "reference", n, records)
    ref_logs = [r.getMessage() for r in caplog.records]
    assert got["dlq"] == ref["dlq"]
    reasons = {(reason, msg.split(":")[1].strip()) for _, _, reason, msg in got["dlq"]}
    assert ("merge_error", "key field data.customer_id missing") in reasons
    assert ("merge_error", "key must be a string or integer") in reasons
    assert ("key_too_long", "key too long") in reasons
    assert ("merge_error", "merge failed") in reasons
    assert got["stats"] == ref["stats"]
    assert got["forwarded"] == ref["forwarded"]
    assert (n == 1) == (not got["forwarded"])
    assert got["published"] == ref["published"] and got["published"]
    assert got["views"] == ref["views"]
    assert got["stored"] == ref["stored"] and got["stored"]  # the same bytes, record forms
    # the documents were merged as JSON bytes; the rare ones (not JSON-exact) were not
    assert jdoc["applied"] > 1000 and 0 < jdoc["refused"] < 20, jdoc
    assert "12345" in got["views"]["customer"] and "7" in got["views"]["product"]
    assert got["views"]["product"]["p-4"]["rating_sum"] == float("inf")
    assert logs == ref_logs and any("merge error in view" in m for m in logs)


def test_the_shop_workload_takes_the_byte_path(tmp_path):
    """On the shop workload every update of a worker's own documents is merged into the
    document's JSON bytes (_jdoc.pyx): none refused."""
    w = simulate.generate(21, 3000)
    _jdoc.reset_stats()
    c = tw.Cluster(tmp_path / "data", 1)
    try:
        c.boot()
        c.feed(c.ring_records(list(w.records)), random.Random(3), max_batch=500)
        applied = c.total(Slot.APPLIED)
        c.views()
    finally:
        c.close()
    jdoc = _jdoc.stats()
    assert jdoc["refused"] == 0 and jdoc["applied"] >= applied > 2000, (jdoc, applied)


def test_the_compiled_twins_are_installed():
    """Unless AGGREGATOR_PURE_CORE=1, the worker runs the compiled route stage; the
    reference methods stay reachable for the comparison."""
    from aggregator import _route
    from aggregator.worker import Worker

    assert Worker._apply_event is _route.apply_event
    assert Worker._merge_targets is _route.merge_targets
    assert Worker._apply_local is _route.apply_local
    assert route.REFERENCE["_apply_event"] is not _route.apply_event


_PAIR_VIEW = """
[views.pair]
changes_topic = "shop.pair.changes"

[[views.pair.feeds]]
source = "reviews"
types = ["shop.review.posted"]
key = "data.customer_id"
ops = [{ op = "add", path = "n", value = 1 }]

[[views.pair.feeds]]
source = "reviews"
types = ["shop.review.posted"]
key = "data.product_id"
ops = [{ op = "set", path = "w", from = "data.weight" }, { op = "add", path = "w", value = 1 }]
"""


def _undo_events() -> list[tuple]:
    """Failing events in the batch that changed their documents before (one transaction):
    the updates set back are of documents the attempt holds, not ones it drops. Reviews go
    to customer (data.customer_id), product (data.product_id) and the two feeds of `pair`,
    which name one document when customer_id == product_id."""
    ev = []

    def add(customer, product, rating, weight=1, fmt="application/json"):
        i = len(ev)
        attrs = {"id": f"rv-ev-u{i}", "source": simulate.SOURCES["reviews"].uri,
                 "type": "shop.review.posted", "partitionkey": f"rv-u{i}", "sequence": 1,
                 "time": f"2025-01-01T00:00:{i:02d}Z"}  # each its own freshness entry
        data = {"review_id": f"rv-u{i}", "product_id": product, "customer_id": customer,
                "rating": rating, "weight": weight}
        headers, value = to_binary(attrs, data, fmt)
        ev.append((simulate.SOURCES["reviews"].topic, f"rv-u{i}".encode(), value, headers))

    add("z", "z", 3)  # pair/z twice by one event
    add("z", "z", 3, "heavy")  # pair/z's second update fails after its first: all four undone
    add("z", "z", 2)
    add("z", "z", 1, "heavy")
    add("y", "p-inf", float("inf"), fmt="application/msgpack")  # product p-inf: not JSON
    add("y", "p-inf", 1)  # the dict path on a document of this transaction
    add("y", "p-inf", "bad")  # the dict path fails on it: customer y undone, p-inf set back
    add("y", "p-inf", 2, "heavy")  # fails in pair after the dict path changed p-inf
    add("y", "p-inf", 4)
    # customer w made by another source in this transaction: the failing review's entry
    # in its freshness map is taken out again
    ev.append(tw._event("customers", "shop.customer.upserted", "w", 1, {"name": "W"},
                        "cu-ev-w"))
    add("w", "p-2", "bad")
    add("x", "p-1", "bad")  # documents new to the transaction
    add("x", "p-1", 5)
    # pair/q not JSON (w infinite): both of its updates take the dict path; the second sets
    # w to a string, then fails adding to it (a document changed before the merge fails)
    add("q", "q", 1, float("inf"), fmt="application/msgpack")
    add("q", "q", 1, "heavy")
    add("q", "q", 2, float("inf"), fmt="application/msgpack")
    add("q", "q", 3, "heavy")  # the last event of q's documents fails
    return ev


class ConfigCluster(RecordingCluster):
    """A RecordingCluster on a config file of its own."""

    def __init__(self, data_dir, n: int, config, overrides: dict) -> None:
        super().__init__(data_dir, n, overrides)
        from aggregator.config import load_config
        opts = {"service.data_dir": str(data_dir), "service.workers": n,
                "service.lmdb_sync": False, "service.lmdb_map_size": 64 << 20,
                "service.ring_bytes": tw.INBOUND_RING, "gate.gap_timeout_ms": 600_000,
                **overrides}
        self.cfg = load_config(config, opts, env={})
        self.tindex = {t: i for i, t in enumerate(self.cfg.topics())}


@pytest.mark.parametrize("n,coalesce,fmt", [(1, False, "json"), (2, False, "json"),
                                            (1, True, "json"), (3, True, "json"),
                                            (2, False, "msgpack")])
def test_a_failing_event_sets_back_what_its_transaction_changed_as_the_reference(
        tmp_path, monkeypatch, caplog, n, coalesce, fmt):
    """The compiled stage keeps no update log (_route.pyx `_Undo`); the reference rebuilds
    each document by replaying the transaction's updates. In one transaction, with the
    documents of every failing event changed earlier in it: the same stores, change events
    (one per update, or coalesced; JSON or msgpack), dead letters, stats and log lines."""
    config = tmp_path / "shop-pair.toml"
    config.write_text((Path(__file__).parents[1] / "examples" / "shop.toml").read_text()
                      + _PAIR_VIEW)
    overrides = {"changes.coalesce": coalesce, "changes.format": fmt}  # msgpack: the
    # compiled stage's dict path with the reference's log and replay

    def run(sub: str) -> dict:
        c = ConfigCluster(tmp_path / sub, n, config, overrides)
        try:
            c.boot()
            records = c.ring_records(_undo_events())
            c.feed(records, random.Random(1), max_batch=len(records))  # one batch
            return outcome(c)
        finally:
            c.close()

    caplog.set_level(logging.WARNING, logger="aggregator.worker")
    got = run("compiled")
    logs = [r.getMessage() for r in caplog.records]
    caplog.clear()
    for name, fn in route.REFERENCE.items():
        monkeypatch.setattr(route.RouteStage, name, fn)
    ref = run("reference")
    ref_logs = [r.getMessage() for r in caplog.records]
    assert got["dlq"] == ref["dlq"] and len(got["dlq"]) == 8
    assert got["stats"] == ref["stats"]
    assert got["published"] == ref["published"] and got["published"]
    assert got["views"] == ref["views"]
    if n == 1:  # (with more workers, a view key may be another worker's: the event's
        # updates of it are forwarded, and merged one by one there)
        assert got["views"]["pair"]["z"] == {"n": 2, "w": 2}  # two good events
        assert got["views"]["pair"]["q"] == {"n": 2, "w": float("inf")}
        assert got["views"]["product"]["p-inf"]["review_count"] == 3
    assert got["stored"] == ref["stored"]
    assert logs == ref_logs and len(logs) == 8
