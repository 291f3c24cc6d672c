"""The shop simulator and its oracle (no broker needed)."""

from __future__ import annotations

import json
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

import msgpack
import pytest

from aggregator.devtools.simulate import (
    SOURCES,
    TOPICS,
    SimEvent,
    Workload,
    bad_records,
    decode_record,
    expected_views,
    generate,
)

SHOP_TOML = Path(__file__).resolve().parents[1] / "examples" / "shop.toml"
BINARY_HEADERS = {"ce_id", "ce_source", "ce_type", "ce_specversion", "ce_time",
                  "ce_partitionkey", "ce_sequence", "content-type"}


@pytest.fixture(scope="module")
def workload() -> Workload:
    return generate(11, 6000)


def first_emissions(w: Workload) -> list[int]:
    """Event indices in the order of their first record (duplicates skipped)."""
    seen: set[int] = set()
    out = []
    for i in w.record_events:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


# ---- determinism and rates --------------------------------------------------------------------


def test_same_seed_same_workload():
    a, b = generate(5, 3000), generate(5, 3000)
    assert a.events == b.events
    assert a.records == b.records
    assert a.stats == b.stats


def test_other_seed_other_workload():
    a, b = generate(5, 500), generate(6, 500)
    assert [e.id for e in a.events] != [e.id for e in b.events]
    assert a.records != b.records


def test_exact_event_count_and_unique_ids(workload):
    assert workload.unique_events == len(workload.events) == 6000
    assert len({(e.source, e.id) for e in workload.events}) == 6000
    assert len({e.id for e in workload.events}) == 6000
    assert sorted(set(workload.record_events)) == list(range(6000))


@pytest.mark.parametrize(("dup_rate", "reorder_rate"), [(0.05, 0.02), (0.2, 0.1), (0.01, 0.0)])
def test_duplicate_and_reorder_rates_are_met(dup_rate, reorder_rate):
    w = generate(3, 5000, dup_rate=dup_rate, reorder_rate=reorder_rate)
    n_records = len(w.records)
    # Recount from the records themselves, not from the generator's bookkeeping.
    ids = Counter(decode_record(r)[0]["id"] for r in w.records)
    duplicates = sum(c - 1 for c in ids.values())
    assert duplicates == w.stats["duplicates"] == n_records - 5000
    assert duplicates >= dup_rate * n_records
    late = 0
    top: dict[tuple[str, str], int] = {}
    seen: set[str] = set()
    for r in w.records:
        attrs, _ = decode_record(r)
        if attrs["id"] in seen:
            continue
        seen.add(attrs["id"])
        stream = (attrs["source"], attrs["partitionkey"])
        if attrs["sequence"] < top.get(stream, 0):
            late += 1
        top[stream] = max(top.get(stream, 0), attrs["sequence"])
    assert late == w.stats["reordered"]
    assert late >= reorder_rate * n_records


def test_no_noise_means_clean_order():
    w = generate(9, 2000, dup_rate=0.0, reorder_rate=0.0)
    assert w.record_events == list(range(2000))
    assert w.stats["duplicates"] == w.stats["reordered"] == 0


def test_duplicates_are_byte_identical_and_later(workload):
    first_at: dict[int, int] = {}
    for pos, i in enumerate(workload.record_events):
        if i in first_at:
            assert workload.records[pos] == workload.records[first_at[i]]
            assert pos > first_at[i]
        else:
            first_at[i] = pos


def test_late_events_arrive_soon_after_their_successor(workload):
    position = {i: p for p, i in enumerate(first_emissions(workload))}
    events = workload.events
    by_stream: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, ev in enumerate(events):
        by_stream[ev.stream].append(i)
    late = 0
    for idx in by_stream.values():
        for a, b in zip(idx, idx[1:], strict=False):
            if position[a] > position[b]:
                late += 1
                # a small window: a strict-ordered source parks the successor only briefly
                assert position[a] - position[b] <= 8
    assert late == workload.stats["reordered"] > 0


# ---- the records carry the ground truth -------------------------------------------------------


def test_streams_after_dedup_and_sort_equal_ground_truth(workload):
    received: dict[tuple[str, str], dict[str, tuple[dict, object]]] = defaultdict(dict)
    for record in workload.records:
        topic, key, _, _ = record
        attrs, data = decode_record(record)
        assert key == attrs["partitionkey"].encode()  # one stream -> one partition
        stream = (attrs["source"], attrs["partitionkey"])
        if attrs["id"] in received[stream]:
            assert received[stream][attrs["id"]] == (attrs, data)  # same content re-sent
        received[stream][attrs["id"]] = (attrs, data)
        src = next(s for s in SOURCES.values() if s.uri == attrs["source"])
        assert topic == src.topic and attrs["type"] in src.types
    truth = workload.streams()
    assert {(SOURCES[s].uri, pk) for s, pk in truth} == set(received)
    for (source_name, pk), history in truth.items():
        got = sorted(received[(SOURCES[source_name].uri, pk)].values(),
                     key=lambda ad: ad[0]["sequence"])
        assert [a["sequence"] for a, _ in got] == list(range(1, len(history) + 1))
        for (attrs, data), ev in zip(got, history, strict=True):
            assert attrs["id"] == ev.id and attrs["type"] == ev.type
            assert attrs["time"] == ev.time and attrs["specversion"] == "1.0"
            assert data == ev.data


def test_content_modes(workload):
    modes = Counter()
    for record in workload.records:
        _, _, value, headers = record
        names = [k for k, _ in headers]
        ctype = dict(headers)["content-type"]
        if ctype == b"application/cloudevents+json":
            assert names == ["content-type"]
            body = json.loads(value)
            assert body["specversion"] == "1.0" and "data" in body
            assert body["sequence"] == str(int(body["sequence"]))
            modes["structured"] += 1
        else:
            assert set(names) == BINARY_HEADERS and len(names) == len(BINARY_HEADERS)
            assert all(isinstance(v, bytes) for _, v in headers)
            assert int(dict(headers)["ce_sequence"]) >= 1
            if ctype == b"application/msgpack":
                msgpack.unpackb(value)
                modes["msgpack"] += 1
            else:
                assert ctype == b"application/json"
                json.loads(value)
                modes["json"] += 1
    total = sum(modes.values())
    assert 0.15 < modes["structured"] / total < 0.25
    binary = modes["json"] + modes["msgpack"]
    assert 0.25 < modes["msgpack"] / binary < 0.35


def walk(value):
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)


def test_payloads_are_exact_and_sized(workload):
    sizes = []
    for ev in workload.events:
        assert not any(isinstance(v, float) for v in walk(ev.data))
        for money in ("amount_cents", "price_cents", "delta", "rating"):
            if money in ev.data:
                assert type(ev.data[money]) is int
        sizes.append(len(json.dumps(ev.data, separators=(",", ":"))))
    sizes.sort()
    assert 180 <= sizes[len(sizes) // 2] <= 420
    assert sizes[len(sizes) // 20] >= 120 and sizes[-len(sizes) // 20] <= 500


def test_causality(workload):
    customers: dict[str, str] = {}  # id -> last type
    products: set[str] = set()
    orders: dict[str, dict] = {}
    captured: set[str] = set()
    payment_of: dict[str, str] = {}
    shipment_of: dict[str, str] = {}
    posted: dict[str, dict] = {}
    for ev in workload.events:
        d, pk = ev.data, ev.partitionkey
        if ev.source_name == "customers":
            assert d["customer_id"] == pk
            customers[pk] = ev.type
        elif ev.source_name == "products":
            assert d["product_id"] == pk
            products.add(pk)
        elif ev.source_name == "inventory":
            assert d["product_id"] == pk and pk in products and d["delta"] != 0
        elif ev.source_name == "orders":
            assert d["order_id"] == pk
            if ev.type == "shop.order.placed":
                assert ev.sequence == 1
                assert customers.get(d["customer_id"]) == "shop.customer.upserted"
                assert d["product_id"] in products
            else:
                assert orders[pk]["customer_id"] == d["customer_id"]
                assert orders[pk]["product_id"] == d["product_id"]
            orders[pk] = d
        elif ev.source_name == "payments":
            assert d["payment_id"] == pk
            order = orders[d["order_id"]]
            assert d["customer_id"] == order["customer_id"]
            assert payment_of.setdefault(d["order_id"], pk) == pk  # one payment per order
            if ev.type == "shop.payment.captured":
                captured.add(d["order_id"])
        elif ev.source_name == "shipments":
            assert d["shipment_id"] == pk and d["order_id"] in captured
            assert shipment_of.setdefault(d["order_id"], pk) == pk  # one shipment per order
        elif ev.source_name == "reviews":
            assert d["review_id"] == pk
            if ev.type == "shop.review.posted":
                assert customers.get(d["customer_id"]) == "shop.customer.upserted"
                assert d["product_id"] in products and 1 <= d["rating"] <= 5
                posted[pk] = d
            else:
                assert posted.pop(pk) == d  # same rating: the product's sum can go down


def test_simulator_matches_shop_toml():
    config = tomllib.loads(SHOP_TOML.read_text())
    assert set(config["sources"]) == set(SOURCES)
    for name, table in config["sources"].items():
        assert SOURCES[name].topic == table["topic"]
        assert SOURCES[name].ordering == table["ordering"]
    assert set(TOPICS) == {t["topic"] for t in config["sources"].values()}
    used = set()
    for view in config["views"].values():
        for feed in view["feeds"]:
            assert set(feed["types"]) <= set(SOURCES[feed["source"]].types)
            used.update(feed["types"])
    assert used == {t for s in SOURCES.values() for t in s.types}
    # The oracle writes exactly the document fields the config's operations name.
    w = generate(2, 4000)
    views = expected_views(w)
    assert set(views) == set(config["views"])
    for name, view in config["views"].items():
        paths = {op["path"] for feed in view["feeds"] for op in feed["ops"]}
        written = {f for doc in views[name].values() for f in doc}
        assert written == paths, name


# ---- the oracle -----------------------------------------------------------------------------


def tiny_workload() -> Workload:
    """A hand-written history, in causal order."""
    seqs: Counter = Counter()
    events = []

    def ev(source, type_, pk, **data):
        seqs[(source, pk)] += 1
        events.append(SimEvent(f"id-{len(events)}", source, type_, "2025-01-01T00:00:00.000Z",
                               pk, seqs[(source, pk)], data))

    ev("customers", "shop.customer.upserted", "c-1", customer_id="c-1", name="Ada")
    ev("customers", "shop.customer.upserted", "c-2", customer_id="c-2", name="Bo")
    ev("customers", "shop.customer.upserted", "c-1", customer_id="c-1", name="Ada L")
    ev("products", "shop.product.upserted", "p-1", product_id="p-1", price_cents=500)
    ev("products", "shop.product.upserted", "p-2", product_id="p-2", price_cents=900)
    ev("inventory", "shop.inventory.adjusted", "p-1", product_id="p-1", delta=10, on_hand=10)
    ev("orders", "shop.order.placed", "o-1", order_id="o-1", customer_id="c-1",
       product_id="p-1", quantity=2, amount_cents=1000, status="placed")
    ev("orders", "shop.order.updated", "o-1", order_id="o-1", customer_id="c-1",
       product_id="p-1", quantity=3, amount_cents=1500, status="placed")
    ev("orders", "shop.order.placed", "o-2", order_id="o-2", customer_id="c-2",
       product_id="p-2", quantity=1, amount_cents=900, status="placed")
    ev("payments", "shop.payment.authorized", "pay-1", payment_id="pay-1", order_id="o-1",
       customer_id="c-1", amount_cents=1500, status="authorized")
    ev("payments", "shop.payment.captured", "pay-1", payment_id="pay-1", order_id="o-1",
       customer_id="c-1", amount_cents=1500, status="captured")
    ev("orders", "shop.order.updated", "o-1", order_id="o-1", customer_id="c-1",
       product_id="p-1", quantity=3, amount_cents=1500, status="paid")
    ev("inventory", "shop.inventory.adjusted", "p-1", product_id="p-1", delta=-3, on_hand=7)
    ev("shipments", "shop.shipment.created", "s-1", shipment_id="s-1", order_id="o-1",
       carrier="dhl", status="created", tracking_number="T1")
    ev("shipments", "shop.shipment.delivered", "s-1", shipment_id="s-1", order_id="o-1",
       carrier="dhl", status="delivered", tracking_number="T1")
    ev("payments", "shop.payment.refunded", "pay-1", payment_id="pay-1", order_id="o-1",
       customer_id="c-1", amount_cents=400, status="refunded")
    ev("reviews", "shop.review.posted", "r-1", review_id="r-1", product_id="p-1",
       customer_id="c-1", rating=4, text="ok")
    ev("reviews", "shop.review.posted", "r-2", review_id="r-2", product_id="p-2",
       customer_id="c-2", rating=2, text="meh")
    ev("reviews", "shop.review.deleted", "r-2", review_id="r-2", product_id="p-2",
       customer_id="c-2", rating=2, text="meh")
    ev("customers", "shop.customer.deleted", "c-2", customer_id="c-2", reason="gdpr")
    return Workload(seed=0, events=events, records=[], record_events=[])


def test_oracle_on_a_hand_checked_history():
    views = expected_views(tiny_workload())
    o1_paid = {"order_id": "o-1", "customer_id": "c-1", "product_id": "p-1", "quantity": 3,
               "amount_cents": 1500, "status": "paid"}
    o2 = {"order_id": "o-2", "customer_id": "c-2", "product_id": "p-2", "quantity": 1,
          "amount_cents": 900, "status": "placed"}
    assert views == {
        "customer": {
            "c-1": {
                "profile": {"customer_id": "c-1", "name": "Ada L"},
                "orders": {"o-1": {"status": "paid", "amount_cents": 1500}},
                "total_paid_cents": 1500,
                "total_refunded_cents": 400,
                "reviews_written": 1,
            },
            "c-2": {  # deleted: no profile, the rest stays
                "orders": {"o-2": {"status": "placed", "amount_cents": 900}},
                "reviews_written": 1,  # a deleted review still counts as written
            },
        },
        "order": {
            "o-1": {
                "order": o1_paid,
                "payment": {"payment_id": "pay-1", "status": "refunded", "amount_cents": 400},
                "shipment": {"shipment_id": "s-1", "carrier": "dhl", "status": "delivered"},
            },
            "o-2": {"order": o2},
        },
        "product": {
            "p-1": {
                "product": {"product_id": "p-1", "price_cents": 500},
                "stock": 7,
                "adjustments": 2,
                "reviews": {"r-1": {"rating": 4, "customer_id": "c-1"}},
                "rating_sum": 4,
                "review_count": 1,
            },
            "p-2": {  # post + delete: the adds are back at 0 and stay present
                "product": {"product_id": "p-2", "price_cents": 900},
                "reviews": {},
                "rating_sum": 0,
                "review_count": 0,
            },
        },
    }


def test_oracle_returns_copies():
    w = tiny_workload()
    views = expected_views(w)
    views["order"]["o-1"]["order"]["status"] = "mutated"
    assert expected_views(w)["order"]["o-1"]["order"]["status"] == "paid"


def test_oracle_invariants_on_a_generated_workload(workload):
    views = expected_views(workload)
    streams = workload.streams()
    last = {k: v[-1] for k, v in streams.items()}
    for cid, doc in views["customer"].items():
        final = last.get(("customers", cid))
        assert final is not None  # every customer key saw an upsert first
        assert ("profile" in doc) == (final.type == "shop.customer.upserted")
        assert doc, cid  # never an emptied document
        for oid, summary in doc.get("orders", {}).items():
            assert summary == {k: views["order"][oid]["order"][k]
                               for k in ("status", "amount_cents")}
    for oid, doc in views["order"].items():
        assert doc["order"] == last[("orders", oid)].data
        if "shipment" in doc:
            assert doc["order"]["status"] != "placed" and "payment" in doc
    for pid, doc in views["product"].items():
        if "stock" in doc:  # on_hand is the producer's running total
            assert doc["stock"] == last[("inventory", pid)].data["on_hand"]
        if "reviews" in doc:
            assert doc["review_count"] == len(doc["reviews"])
            assert doc["rating_sum"] == sum(r["rating"] for r in doc["reviews"].values())
    paid = sum(d.get("total_paid_cents", 0) for d in views["customer"].values())
    assert paid == sum(e.data["amount_cents"] for e in workload.events
                       if e.type == "shop.payment.captured")
    # the workload exercises the interesting cases
    assert any("profile" not in d for d in views["customer"].values())
    assert any(d.get("total_refunded_cents") for d in views["customer"].values())
    assert any(d.get("payment", {}).get("status") == "refunded" for d in views["order"].values())


# ---- malformed records -------------------------------------------------------------------------


def test_bad_records_have_one_defect_each():
    bad = bad_records("x.")
    reasons = Counter(b.reason for b in bad)
    assert set(reasons) == {"missing_attribute", "bad_json", "bad_msgpack", "bad_specversion",
                            "no_partition_key", "bad_sequence", "bad_encoding"}
    for b in bad:
        assert b.topic == "x.shop.orders"
        topic, key, value, headers = b[:4]
        hdrs = dict(headers)
        if b.reason == "no_partition_key":
            assert key is None and "ce_partitionkey" not in hdrs
        if b.reason == "missing_attribute":
            assert "ce_id" not in hdrs
        if b.reason == "bad_json":
            with pytest.raises(ValueError):
                json.loads(value)
        if b.reason == "bad_msgpack":
            with pytest.raises(ValueError):
                msgpack.unpackb(value)
        if b.reason == "bad_encoding":
            with pytest.raises(UnicodeDecodeError):
                hdrs["ce_type"].decode()
    assert bad_records("x.") == bad


def test_mixed_records_are_read_back_by_their_mapping():
    """generate(mixed=True): orders in the outbox relay's shape (both payload encodings),
    payments as plain JSON; the sources of MIXED_SOURCES map every record back to its
    ground-truth event; the other services are unchanged; orders are never reordered."""
    from aggregator.config import SourceConfig
    from aggregator.devtools.simulate import MIXED_SOURCES
    from aggregator.mapping import apply, route

    w = generate(5, 3000, mixed=True)
    plain = generate(5, 3000)
    assert w.events == plain.events
    plans = {n: SourceConfig.model_validate({"topic": SOURCES[n].topic, **s}).plan(n)
             for n, s in MIXED_SOURCES.items()}
    kinds: Counter = Counter()
    last_seq: dict = {}
    seen: set = set()
    for offset, (rec, i) in enumerate(zip(w.records, w.record_events, strict=True)):
        ev = w.events[i]
        if ev.source_name not in plans:
            assert rec == plain.records[plain.record_events.index(i)]
            continue
        topic, key, value, headers = rec
        assert not any(n.startswith("ce_") for n, _ in headers)
        kinds[(ev.source_name, value[:1])] += 1
        got = apply(plans[ev.source_name], value, headers, key, offset, 1)
        assert (got.id, got.type, got.partitionkey) == (ev.id, ev.type, ev.partitionkey)
        if ev.source_name == "payments":  # plain JSON: the body has the attributes too
            assert (got.sequence, got.time) == (ev.sequence, ev.time)
            assert {k: got.data[k] for k in ev.data} == ev.data
        else:
            assert got.data == ev.data and got.sequence == offset + 1
            if i not in seen:  # first copies arrive in stream order (no reordering)
                assert ev.sequence == last_seq.get(ev.stream, 0) + 1
                last_seq[ev.stream] = ev.sequence
        seen.add(i)
        assert route(plans[ev.source_name], value, headers, key) == ev.partitionkey.encode()
    assert kinds[("orders", b"{")] and kinds[("orders", b'"')] and kinds[("payments", b"{")]
    assert w.stats["outbox"] and w.stats["plain_json"]
