"""The seven simulated shop services of ``examples/shop.toml`` and the oracle of their views.

`generate(seed, n_events)` runs a seeded, causally consistent shop (customers sign up,
order products, pay, get shipments, write reviews; inventory moves) and returns a
`Workload`:

- ``workload.events`` -- the ground truth: every distinct event once, in causal order, so
  the events of one ``(source, partitionkey)`` stream appear in sequence order 1, 2, 3, ...
- ``workload.records`` -- what is sent to Kafka: ``(topic, key, value, headers)`` in emission
  order, with re-sent duplicates (same id, sequence and bytes, later) and late events (an
  event emitted after its successor in the same stream). The Kafka key is the partitionkey,
  so a stream always lives in one partition.

`expected_views(workload)` is the oracle: the final customer, order and product documents
computed directly from the ground truth with the semantics of ``shop.toml`` -- it does not
use the service's merge code.

Encoding: about 80 % binary mode (``ce_*`` headers; 70 % JSON data, 30 % msgpack) and 20 %
structured mode (``application/cloudevents+json``), encoded by `aggregator.devtools.encoder`.
Money is integer cents; there are no floats in any payload, so every sum is exact.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from .encoder import to_binary, to_structured

log = logging.getLogger(__name__)

__all__ = [
    "DEAD_LETTER_TOPIC",
    "MIXED_SOURCES",
    "SOURCES",
    "TOPICS",
    "BadRecord",
    "Record",
    "SimEvent",
    "Source",
    "Workload",
    "bad_records",
    "decode_record",
    "ensure_topics",
    "expected_views",
    "generate",
    "produce",
    "shop_topics",
]

Record = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]
"""One Kafka record: ``(topic, key, value, headers)``."""


class Source(NamedTuple):
    name: str  # the [sources.<name>] table of shop.toml
    topic: str
    uri: str  # CloudEvents `source`
    ordering: str  # "latest" or "strict"
    types: tuple[str, ...]


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("customers", "shop.customers", "/shop/customers", "latest",
               ("shop.customer.upserted", "shop.customer.deleted")),
        Source("orders", "shop.orders", "/shop/orders", "latest",
               ("shop.order.placed", "shop.order.updated")),
        Source("payments", "shop.payments", "/shop/payments", "strict",
               ("shop.payment.authorized", "shop.payment.captured", "shop.payment.refunded")),
        Source("shipments", "shop.shipments", "/shop/shipments", "latest",
               ("shop.shipment.created", "shop.shipment.dispatched", "shop.shipment.delivered")),
        Source("inventory", "shop.inventory", "/shop/inventory", "strict",
               ("shop.inventory.adjusted",)),
        Source("products", "shop.products", "/shop/products", "latest",
               ("shop.product.upserted",)),
        Source("reviews", "shop.reviews", "/shop/reviews", "strict",
               ("shop.review.posted", "shop.review.deleted")),
    )
}
TOPICS: tuple[str, ...] = tuple(s.topic for s in SOURCES.values())
DEAD_LETTER_TOPIC = "shop.deadletter"
SPECVERSION = "1.0"

JSON = "application/json"
MSGPACK = "application/msgpack"
STRUCTURED = "application/cloudevents+json"

# Fields the views copy out of `data` (shop.toml `fields = [...]`).
ORDER_SUMMARY_FIELDS = ("status", "amount_cents")
PAYMENT_FIELDS = ("payment_id", "status", "amount_cents")
SHIPMENT_FIELDS = ("shipment_id", "carrier", "status")
REVIEW_FIELDS = ("rating", "customer_id")

EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z


def shop_topics(prefix: str = "") -> list[str]:
    """The seven source topics, each with `prefix` in front."""
    return [prefix + t for t in TOPICS]


# ---- events and workloads ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One distinct event of the ground truth."""

    id: str
    source_name: str  # key of SOURCES
    type: str
    time: str  # RFC 3339, UTC, milliseconds
    partitionkey: str
    sequence: int  # per (source, partitionkey), from 1
    data: dict[str, Any]

    @property
    def source(self) -> str:
        return SOURCES[self.source_name].uri

    @property
    def topic(self) -> str:
        return SOURCES[self.source_name].topic

    @property
    def stream(self) -> tuple[str, str]:
        return (self.source_name, self.partitionkey)

    def attributes(self) -> dict[str, Any]:
        """The CloudEvents context attributes (without data)."""
        return {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "partitionkey": self.partitionkey,
            "sequence": self.sequence,
        }


@dataclass(slots=True)
class Workload:
    """A generated event stream: the ground truth and the records that carry it."""

    seed: int
    events: list[SimEvent]
    records: list[Record]
    record_events: list[int]  # records[i] carries events[record_events[i]]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def unique_events(self) -> int:
        return len(self.events)

    @property
    def topics(self) -> list[str]:
        return list(TOPICS)

    def streams(self) -> dict[tuple[str, str], list[SimEvent]]:
        """``(source_name, partitionkey) -> events`` in sequence order (the clean history)."""
        out: dict[tuple[str, str], list[SimEvent]] = defaultdict(list)
        for ev in self.events:
            out[ev.stream].append(ev)
        return dict(out)

    def __repr__(self) -> str:
        return (
            f"<Workload seed={self.seed} events={len(self.events)} records={len(self.records)} "
            f"duplicates={self.stats.get('duplicates')} reordered={self.stats.get('reordered')}>"
        )


# ---- text and value helpers -------------------------------------------------------------

_WORDS = (
    "parcel fragile gift wrap express leave neighbour porch signature weekend morning "
    "evening invoice company address door code blue green red large small cotton wool "
    "steel glass oak walnut linen bamboo recycled organic handmade vintage classic modern "
    "quality great fast slow friendly packaging arrived damaged perfect exactly described "
    "would recommend again price value colour size fits runs small large comfortable sturdy "
    "battery lasts charger cable manual instructions assembly easy quick difficult missing "
    "screw replacement support helpful answered question warranty return exchange"
).split()
_FIRST = ("Ada", "Zoë", "José", "Łukasz", "Søren", "Aiko", "Noor", "Chen", "Maya", "Olu",
          "Ines", "Ravi", "Freya", "Tomás", "Yara", "Hugo", "Lena", "Kofi", "Mei", "Omar")
_LAST = ("Lovelace", "Müller", "García", "Kowalski", "Jensen", "Tanaka", "Haddad", "Wang",
         "Okafor", "Silva", "Dubois", "Rossi", "Novak", "Smith", "Nakamura", "Berg")
_CITIES = (("Amsterdam", "NL"), ("Berlin", "DE"), ("Lisbon", "PT"), ("Kraków", "PL"),
           ("Aarhus", "DK"), ("Lyon", "FR"), ("Milan", "IT"), ("Leeds", "GB"))
_CATEGORIES = ("kitchen", "garden", "books", "toys", "audio", "office", "outdoor", "bath")
_ADJ = ("Classic", "Compact", "Deluxe", "Eco", "Folding", "Heavy-duty", "Mini", "Smart")
_NOUN = ("Kettle", "Lamp", "Backpack", "Speaker", "Planter", "Notebook", "Chair", "Towel")
_COLORS = ("black", "white", "blue", "green", "red", "oak", "grey")
_TIERS = ("bronze", "silver", "gold", "platinum")
_WAREHOUSES = ("ams-1", "fra-2", "waw-1", "lis-1")
_CARRIERS = ("dhl", "ups", "postnl", "dpd", "gls")
_METHODS = ("card", "ideal", "paypal", "sepa", "klarna")


def _rfc3339(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


# ---- the simulated shop -------------------------------------------------------------------


class _Pool:
    """A set with O(1) add, discard and uniform random choice."""

    __slots__ = ("items", "_pos")

    def __init__(self) -> None:
        self.items: list[str] = []  # truthy when the pool is not empty
        self._pos: dict[str, int] = {}

    def add(self, item: str) -> None:
        if item not in self._pos:
            self._pos[item] = len(self.items)
            self.items.append(item)

    def discard(self, item: str) -> None:
        i = self._pos.pop(item, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self._pos[last] = i

    def choice(self, rng: random.Random) -> str:
        return self.items[rng.randrange(len(self.items))]

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: object) -> bool:
        return item in self._pos


class _Shop:
    """The world model. Each action emits the events of one business step."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock_ms = EPOCH_MS
        self.events: list[SimEvent] = []
        self.seq: dict[tuple[str, str], int] = {}
        self.ids: Counter[str] = Counter()
        # entity state
        self.customers: dict[str, dict] = {}  # id -> profile (last upserted data)
        self.customer_orders: Counter[str] = Counter()
        self.products: dict[str, dict] = {}
        self.stock: Counter[str] = Counter()
        self.orders: dict[str, dict] = {}
        self.payments: dict[str, dict] = {}  # id -> order, status, captured, refunded, ...
        self.order_payment: dict[str, str] = {}
        self.shipments: dict[str, dict] = {}
        self.reviews: dict[str, dict] = {}
        # pools of ids by state
        self.active_customers = _Pool()
        self.deletable_customers = _Pool()  # active and with at least one order
        self.deleted_customers = _Pool()
        self.all_products = _Pool()
        self.open_orders = _Pool()  # placed, no payment yet
        self.authorized = _Pool()  # payments authorized, not captured
        self.paid_orders = _Pool()  # captured, no shipment yet
        self.created_shipments = _Pool()
        self.dispatched_shipments = _Pool()
        self.refundable = _Pool()  # payments of delivered orders, not fully refunded
        self.delivered_orders = _Pool()
        self.live_reviews = _Pool()
        # (weight, pools that must be non-empty, action)
        c, p = self.active_customers, self.all_products
        self.actions: list[tuple[float, tuple[_Pool, ...], Callable[[], None]]] = [
            (6.0, (), self.new_customer),
            (4.0, (c,), self.update_customer),
            (0.6, (self.deletable_customers,), self.delete_customer),
            (0.2, (self.deleted_customers,), self.reactivate_customer),
            (1.0, (), self.new_product),
            (1.5, (p,), self.update_product),
            (4.0, (p,), self.restock),
            (2.0, (p,), self.correct_stock),
            (14.0, (c, p), self.place_order),
            (3.0, (self.open_orders,), self.modify_order),
            (12.0, (self.open_orders,), self.authorize_payment),
            (1.5, (self.open_orders,), self.cancel_order),
            (12.0, (self.authorized,), self.capture_payment),
            (10.0, (self.paid_orders,), self.create_shipment),
            (9.0, (self.created_shipments,), self.dispatch_shipment),
            (8.0, (self.dispatched_shipments,), self.deliver_shipment),
            (1.5, (self.refundable,), self.refund_payment),
            (5.0, (c, p), self.post_review),
            (1.0, (self.live_reviews,), self.delete_review),
        ]

    # -- plumbing ---------------------------------------------------------------------------

    def run(self, n_events: int) -> list[SimEvent]:
        rng = self.rng
        actions = [(w, tuple(pool.items for pool in pools), act) for w, pools, act in self.actions]
        while len(self.events) < n_events:
            feasible = [(w, act) for w, lists, act in actions if all(lists)]
            rng.choices(feasible, [w for w, _ in feasible])[0][1]()
        return self.events[:n_events]

    def next_id(self, prefix: str) -> str:
        self.ids[prefix] += 1
        return f"{prefix}-{self.ids[prefix]:06d}"

    def now(self) -> str:
        return _rfc3339(self.clock_ms)

    def text(self, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, hi)
        return " ".join(self.rng.choices(_WORDS, k=n // 6 + 2))[:n].rstrip()

    def emit(self, source_name: str, type_: str, pk: str, data: dict[str, Any]) -> None:
        rng = self.rng
        self.clock_ms += rng.randint(1, 400)
        stream = (source_name, pk)
        seq = self.seq.get(stream, 0) + 1
        self.seq[stream] = seq
        assert type_ in SOURCES[source_name].types, type_
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        self.events.append(SimEvent(event_id, source_name, type_, self.now(), pk, seq, data))

    # -- customers ------------------------------------------------------------------------

    def _profile(self, cid: str) -> dict[str, Any]:
        rng = self.rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        city, country = rng.choice(_CITIES)
        return {
            "customer_id": cid,
            "name": f"{first} {last}",
            "email": f"{cid}@example.com",
            "tier": rng.choice(_TIERS),
            "address": {
                "street": f"{rng.randint(1, 250)} {rng.choice(_LAST)}straat",
                "city": city,
                "postcode": f"{rng.randint(1000, 9999)}",
                "country": country,
            },
            "marketing_opt_in": rng.random() < 0.4,
            "updated_at": self.now(),
            "notes": self.text(40, 150),
        }

    def new_customer(self) -> None:
        cid = self.next_id("c")
        profile = self._profile(cid)
        self.customers[cid] = profile
        self.active_customers.add(cid)
        self.emit("customers", "shop.customer.upserted", cid, profile)

    def update_customer(self) -> None:
        cid = self.active_customers.choice(self.rng)
        profile = dict(self.customers[cid])
        profile["tier"] = self.rng.choice(_TIERS)
        profile["marketing_opt_in"] = not profile["marketing_opt_in"]
        profile["updated_at"] = self.now()
        profile["notes"] = self.text(40, 150)
        self.customers[cid] = profile
        self.emit("customers", "shop.customer.upserted", cid, profile)

    def delete_customer(self) -> None:
        # Only customers with an order are deleted: their view document keeps `orders`, so
        # the oracle never has to decide whether an emptied document still exists.
        cid = self.deletable_customers.choice(self.rng)
        self.active_customers.discard(cid)
        self.deletable_customers.discard(cid)
        self.deleted_customers.add(cid)
        self.emit("customers", "shop.customer.deleted", cid, {
            "customer_id": cid,
            "reason": self.rng.choice(("gdpr_request", "account_closed", "fraud")),
            "deleted_at": self.now(),
            "notes": self.text(120, 220),
        })

    def reactivate_customer(self) -> None:
        cid = self.deleted_customers.choice(self.rng)
        self.deleted_customers.discard(cid)
        self.active_customers.add(cid)
        if self.customer_orders[cid]:
            self.deletable_customers.add(cid)
        profile = self._profile(cid)
        self.customers[cid] = profile
        self.emit("customers", "shop.customer.upserted", cid, profile)

    # -- products and inventory --------------------------------------------------------------

    def new_product(self) -> None:
        rng = self.rng
        pid = self.next_id("p")
        product = {
            "product_id": pid,
            "sku": f"SKU-{rng.randint(100000, 999999)}",
            "name": f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}",
            "category": rng.choice(_CATEGORIES),
            "price_cents": rng.randint(199, 49999),
            "currency": "EUR",
            "attributes": {"weight_g": rng.randint(50, 20000), "color": rng.choice(_COLORS)},
            "active": True,
            "description": self.text(60, 180),
        }
        self.products[pid] = product
        self.all_products.add(pid)
        self.emit("products", "shop.product.upserted", pid, product)
        self.adjust(pid, rng.randint(20, 200), "initial_stock")

    def update_product(self) -> None:
        pid = self.all_products.choice(self.rng)
        product = dict(self.products[pid])
        product["price_cents"] = max(99, product["price_cents"] + self.rng.randint(-500, 500))
        product["description"] = self.text(60, 180)
        self.products[pid] = product
        self.emit("products", "shop.product.upserted", pid, product)

    def adjust(self, pid: str, delta: int, reason: str) -> None:
        self.stock[pid] += delta
        self.emit("inventory", "shop.inventory.adjusted", pid, {
            "product_id": pid,
            "warehouse": self.rng.choice(_WAREHOUSES),
            "delta": delta,
            "on_hand": self.stock[pid],
            "reason": reason,
            "adjusted_at": self.now(),
            "note": self.text(90, 220),
        })

    def restock(self) -> None:
        self.adjust(self.all_products.choice(self.rng), self.rng.randint(10, 200), "restock")

    def correct_stock(self) -> None:
        delta = self.rng.choice((-1, 1)) * self.rng.randint(1, 5)
        self.adjust(self.all_products.choice(self.rng), delta, "stock_count")

    # -- orders, payments, shipments -------------------------------------------------------

    def _order_event(self, oid: str, type_: str) -> None:
        order = self.orders[oid]
        order["updated_at"] = self.now()
        order["notes"] = self.text(40, 120)
        self.emit("orders", type_, oid, dict(order))

    def place_order(self) -> None:
        rng = self.rng
        cid = self.active_customers.choice(rng)
        pid = self.all_products.choice(rng)
        oid = self.next_id("o")
        price = self.products[pid]["price_cents"]
        quantity = rng.randint(1, 5)
        address = self.customers[cid]["address"]
        self.orders[oid] = {
            "order_id": oid,
            "customer_id": cid,
            "product_id": pid,
            "quantity": quantity,
            "unit_price_cents": price,
            "amount_cents": price * quantity,
            "currency": "EUR",
            "status": "placed",
            "ship_to": {"city": address["city"], "country": address["country"]},
            "placed_at": self.now(),
        }
        self.customer_orders[cid] += 1
        self.deletable_customers.add(cid)
        self.open_orders.add(oid)
        self._order_event(oid, "shop.order.placed")

    def modify_order(self) -> None:
        oid = self.open_orders.choice(self.rng)
        order = self.orders[oid]
        order["quantity"] = self.rng.randint(1, 5)
        order["amount_cents"] = order["unit_price_cents"] * order["quantity"]
        self._order_event(oid, "shop.order.updated")

    def cancel_order(self) -> None:
        oid = self.open_orders.choice(self.rng)
        self.open_orders.discard(oid)
        self.orders[oid]["status"] = "cancelled"
        self._order_event(oid, "shop.order.updated")

    def _payment_event(self, pay_id: str, type_: str, amount: int) -> None:
        payment = self.payments[pay_id]
        order = self.orders[payment["order"]]
        self.emit("payments", type_, pay_id, {
            "payment_id": pay_id,
            "order_id": order["order_id"],
            "customer_id": order["customer_id"],
            "amount_cents": amount,
            "currency": "EUR",
            "status": payment["status"],
            "method": payment["method"],
            "psp_reference": payment["psp_reference"],
            "notes": self.text(60, 160),
        })

    def authorize_payment(self) -> None:
        oid = self.open_orders.choice(self.rng)
        self.open_orders.discard(oid)
        pay_id = self.next_id("pay")
        self.payments[pay_id] = {
            "order": oid, "status": "authorized", "captured": 0, "refunded": 0, "refunds": 0,
            "method": self.rng.choice(_METHODS),
            "psp_reference": f"psp_{self.rng.getrandbits(64):016x}",
        }
        self.order_payment[oid] = pay_id
        self.authorized.add(pay_id)
        self._payment_event(pay_id, "shop.payment.authorized", self.orders[oid]["amount_cents"])

    def capture_payment(self) -> None:
        pay_id = self.authorized.choice(self.rng)
        self.authorized.discard(pay_id)
        payment = self.payments[pay_id]
        oid = payment["order"]
        order = self.orders[oid]
        payment["status"] = "captured"
        payment["captured"] = order["amount_cents"]
        self._payment_event(pay_id, "shop.payment.captured", payment["captured"])
        order["status"] = "paid"
        self._order_event(oid, "shop.order.updated")
        self.adjust(order["product_id"], -order["quantity"], "sale")
        self.paid_orders.add(oid)

    def _shipment_event(self, sid: str, type_: str) -> None:
        shipment = self.shipments[sid]
        self.emit("shipments", type_, sid, {
            "shipment_id": sid,
            "order_id": shipment["order"],
            "carrier": shipment["carrier"],
            "status": shipment["status"],
            "tracking_number": shipment["tracking"],
            "ship_to": self.orders[shipment["order"]]["ship_to"],
            "notes": self.text(60, 180),
        })

    def create_shipment(self) -> None:
        oid = self.paid_orders.choice(self.rng)
        self.paid_orders.discard(oid)
        sid = self.next_id("s")
        self.shipments[sid] = {
            "order": oid, "status": "created", "carrier": self.rng.choice(_CARRIERS),
            "tracking": f"TRK{self.rng.getrandbits(48):012X}",
        }
        self.created_shipments.add(sid)
        self._shipment_event(sid, "shop.shipment.created")

    def dispatch_shipment(self) -> None:
        sid = self.created_shipments.choice(self.rng)
        self.created_shipments.discard(sid)
        self.shipments[sid]["status"] = "dispatched"
        self._shipment_event(sid, "shop.shipment.dispatched")
        oid = self.shipments[sid]["order"]
        self.orders[oid]["status"] = "shipped"
        self._order_event(oid, "shop.order.updated")
        self.dispatched_shipments.add(sid)

    def deliver_shipment(self) -> None:
        sid = self.dispatched_shipments.choice(self.rng)
        self.dispatched_shipments.discard(sid)
        self.shipments[sid]["status"] = "delivered"
        self._shipment_event(sid, "shop.shipment.delivered")
        oid = self.shipments[sid]["order"]
        self.orders[oid]["status"] = "delivered"
        self._order_event(oid, "shop.order.updated")
        self.delivered_orders.add(oid)
        self.refundable.add(self.order_payment[oid])

    def refund_payment(self) -> None:
        rng = self.rng
        pay_id = self.refundable.choice(rng)
        payment = self.payments[pay_id]
        order = self.orders[payment["order"]]
        left = payment["captured"] - payment["refunded"]
        full = payment["refunds"] >= 1 or left < 2 or rng.random() < 0.5
        amount = left if full else rng.randint(1, left - 1)
        payment["refunded"] += amount
        payment["refunds"] += 1
        payment["status"] = "refunded"
        self._payment_event(pay_id, "shop.payment.refunded", amount)
        order["status"] = "refunded" if full else "partially_refunded"
        self._order_event(order["order_id"], "shop.order.updated")
        if full:
            self.refundable.discard(pay_id)
            self.adjust(order["product_id"], order["quantity"], "return")

    # -- reviews ------------------------------------------------------------------------------

    def post_review(self) -> None:
        rng = self.rng
        cid = pid = None
        if len(self.delivered_orders) and rng.random() < 0.8:
            order = self.orders[self.delivered_orders.choice(rng)]
            if order["customer_id"] in self.active_customers:
                cid, pid = order["customer_id"], order["product_id"]
        if cid is None:
            cid = self.active_customers.choice(rng)
            pid = self.all_products.choice(rng)
        rid = self.next_id("r")
        review = {
            "review_id": rid,
            "product_id": pid,
            "customer_id": cid,
            "rating": rng.choices((1, 2, 3, 4, 5), (1, 1, 2, 4, 5))[0],
            "text": self.text(120, 300),
        }
        self.reviews[rid] = review
        self.live_reviews.add(rid)
        self.emit("reviews", "shop.review.posted", rid, review)

    def delete_review(self) -> None:
        rid = self.live_reviews.choice(self.rng)
        self.live_reviews.discard(rid)
        # The same data as the post, so the product's rating_sum can be decremented.
        self.emit("reviews", "shop.review.deleted", rid, dict(self.reviews[rid]))


# ---- encoding -------------------------------------------------------------------------------


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _encode(ev: SimEvent, mode: str) -> Record:
    """Encode one event as a Kafka record. `mode`: "json", "msgpack" or "structured"."""
    src = SOURCES[ev.source_name]
    attrs = {
        "id": ev.id,
        "source": src.uri,
        "type": ev.type,
        "time": ev.time,
        "partitionkey": ev.partitionkey,
        # The CloudEvents sequence extension is a String: a decimal string here too.
        "sequence": ev.sequence,
    }
    if mode == "structured":
        headers, value = to_structured({**attrs, "datacontenttype": JSON}, ev.data,
                                       content_type=STRUCTURED.encode())
    else:
        headers, value = to_binary(attrs, ev.data, MSGPACK if mode == "msgpack" else JSON)
    return (src.topic, ev.partitionkey.encode(), value, headers)


#: `generate(mixed=True)`: two services that don't speak CloudEvents, and the source
#: settings (format and mapping, see aggregator/mapping.py) that read what they publish.
MIXED_SOURCES: dict[str, dict[str, Any]] = {
    # the orders service writes an outbox table; the outbox event router relays it
    "orders": {"format": "outbox", "mapping": {"type": "header:eventType"}},
    # the payments service publishes plain JSON with an id and a version in the body
    "payments": {"format": "json", "mapping": {
        "id": "data.event_id", "type": "data.event_type", "time": "data.occurred_at",
        "partitionkey": "data.payment_id", "sequence": "data.version"}},
}


def _encode_outbox(ev: SimEvent, as_string: bool) -> Record:
    """An outbox row as the outbox event router relays it: the aggregate id as the key, the
    event id in header ``id``, the type column in header ``eventType`` (additional
    placement ``type:header:eventType``), the payload column as the value -- a JSON object
    (``table.expand.json.payload``) or, by default, a JSON string holding one."""
    src = SOURCES[ev.source_name]
    text = _json(ev.data).decode()
    value = _json(text) if as_string else text.encode()
    headers = [("id", ev.id.encode()), ("eventType", ev.type.encode()),
               ("aggregatetype", ev.source_name.encode())]
    return (src.topic, ev.partitionkey.encode(), value, headers)


def _encode_plain_json(ev: SimEvent) -> Record:
    """Plain JSON: the data with the event's id, type, version and time in the body."""
    src = SOURCES[ev.source_name]
    body = {**ev.data, "event_id": ev.id, "event_type": ev.type, "version": ev.sequence,
            "occurred_at": ev.time}
    return (src.topic, ev.partitionkey.encode(), _json(body),
            [("content-type", JSON.encode())])


def decode_record(record: Record) -> tuple[dict[str, Any], Any]:
    """The inverse of this module's encoder: ``(attributes, data)`` of a record.

    A minimal decoder for tests and tools; the service parses with `aggregator.envelope`.
    ``attributes["sequence"]`` is an int.
    """
    _topic, key, value, headers = record
    hdrs = {k: v for k, v in headers or ()}
    content_type = hdrs.get("content-type", b"").decode()
    if content_type.startswith(STRUCTURED):
        body = json.loads(value)
        data = body.pop("data", None)
        attrs = body
    else:
        attrs = {k[3:]: v.decode() for k, v in hdrs.items() if k.startswith("ce_")}
        attrs["datacontenttype"] = content_type
        data = msgpack.unpackb(value, raw=False) if content_type == MSGPACK else json.loads(value)
    if "partitionkey" not in attrs and key is not None:
        attrs["partitionkey"] = key.decode()
    if "sequence" in attrs:
        attrs["sequence"] = int(attrs["sequence"])
    return attrs, data


# ---- generation -----------------------------------------------------------------------------


def generate(
    seed: int,
    n_events: int,
    dup_rate: float = 0.05,
    reorder_rate: float = 0.02,
    *,
    structured_rate: float = 0.2,
    msgpack_rate: float = 0.3,
    mixed: bool = False,
) -> Workload:
    """Simulate the shop and return `n_events` distinct events and their records.

    - duplicates: ``ceil(dup_rate * records)`` extra records re-send an earlier record
      unchanged (same bytes) 1-50 records later, sometimes up to 5000 later; `dup_rate` is
      therefore met both against the records and against the distinct events;
    - reordering: ``ceil(reorder_rate * records)`` events (when the streams allow) are
      emitted 0-3 records after their successor in the same stream, instead of before it;
    - content modes: `structured_rate` of events in structured mode, the rest in binary
      mode, of which `msgpack_rate` carry msgpack data and the others JSON;
    - `mixed`: the services of `MIXED_SOURCES` don't speak CloudEvents: orders are relayed
      from an outbox table (half the payloads as JSON strings; never reordered, since the
      relay follows the commit order and the offset is their sequence), payments are plain
      JSON. Duplicates are re-sent for them too.

    The same arguments always give the same workload.
    """
    if n_events < 0:
        raise ValueError("n_events must be >= 0")
    if not (0.0 <= dup_rate < 1.0 and 0.0 <= reorder_rate <= 0.5):
        raise ValueError("need 0 <= dup_rate < 1 and 0 <= reorder_rate <= 0.5")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of young, long-lived objects: collections only cost time
    try:
        return _generate(seed, n_events, dup_rate, reorder_rate, structured_rate, msgpack_rate,
                         mixed)
    finally:
        if gc_was_enabled:
            gc.enable()


def _generate(seed: int, n_events: int, dup_rate: float, reorder_rate: float,
              structured_rate: float, msgpack_rate: float, mixed: bool = False) -> Workload:
    events = _Shop(seed).run(n_events)
    n = len(events)
    n_dups = math.ceil(dup_rate * n / (1.0 - dup_rate)) if n else 0
    n_total = n + n_dups

    # Each rule has its own RNG, so changing one rate does not change the others' choices.
    mode_rng = random.Random(f"{seed}:modes")
    reorder_rng = random.Random(f"{seed}:reorder")
    dup_rng = random.Random(f"{seed}:duplicates")

    modes = []
    for _ in range(n):
        if mode_rng.random() < structured_rate:
            modes.append("structured")
        else:
            modes.append("msgpack" if mode_rng.random() < msgpack_rate else "json")
    encoded = [_encode(ev, mode) for ev, mode in zip(events, modes, strict=True)]
    if mixed:
        for i, ev in enumerate(events):
            if ev.source_name == "orders":
                encoded[i] = _encode_outbox(ev, as_string=i % 2 == 0)
                modes[i] = "outbox"
            elif ev.source_name == "payments":
                encoded[i] = _encode_plain_json(ev)
                modes[i] = "plain_json"

    # 1. Reordering: sort keys start as the causal position; a late event moves to just
    #    behind its stream successor. Pairs are disjoint, so exactly one event per pair is
    #    late and the successor stays in place.
    sort_key: list[float] = [float(i) for i in range(n)]
    next_in_stream: dict[int, int] = {}
    last_of: dict[tuple[str, str], int] = {}
    for i, ev in enumerate(events):
        prev = last_of.get(ev.stream)
        if prev is not None:
            next_in_stream[prev] = i
        last_of[ev.stream] = i
    candidates = sorted(i for i in next_in_stream
                        if not (mixed and events[i].source_name == "orders"))
    reorder_rng.shuffle(candidates)
    want = math.ceil(reorder_rate * n_total) if n else 0
    used: set[int] = set()
    moved = 0
    for i in candidates:
        if moved >= want:
            break
        j = next_in_stream[i]
        if i in used or j in used:
            continue
        used.update((i, j))
        sort_key[i] = j + reorder_rng.randint(0, 3) + 0.5
        moved += 1
    order = sorted(range(n), key=sort_key.__getitem__)

    # 2. Duplicates: a copy of a record, re-sent later.
    emitted: list[tuple[float, int, int]] = [(float(pos), 0, i) for pos, i in enumerate(order)]
    position = {i: pos for pos, i in enumerate(order)}
    for i in dup_rng.sample(range(n), min(n_dups, n)):
        gap = dup_rng.randint(1, 50) if dup_rng.random() < 0.8 else dup_rng.randint(51, 5000)
        emitted.append((position[i] + gap + 0.5, 1, i))
    emitted.sort()
    record_events = [i for _, _, i in emitted]
    records = [encoded[i] for i in record_events]

    stats = _stats(events, records, record_events, modes)
    if stats["reordered"] != moved:  # pragma: no cover - construction invariant
        raise AssertionError(f"reordered {stats['reordered']} != moved {moved}")
    return Workload(seed, events, records, record_events, stats)


def _stats(events: list[SimEvent], records: list[Record], record_events: list[int],
           modes: list[str]) -> dict[str, Any]:
    seen: set[int] = set()
    max_seq: dict[tuple[str, str], int] = {}
    duplicates = reordered = 0
    for i in record_events:
        if i in seen:
            duplicates += 1
            continue
        seen.add(i)
        ev = events[i]
        top = max_seq.get(ev.stream, 0)
        if ev.sequence < top:
            reordered += 1
        else:
            max_seq[ev.stream] = ev.sequence
    mode_counts = Counter(modes)
    data_sizes = sorted(len(_json(ev.data)) for ev in events[::50]) or [0]
    return {
        "unique_events": len(events),
        "records": len(records),
        "duplicates": duplicates,
        "reordered": reordered,
        "streams": len(max_seq),
        "binary_json": mode_counts["json"],
        "binary_msgpack": mode_counts["msgpack"],
        "structured": mode_counts["structured"],
        **({"outbox": mode_counts["outbox"], "plain_json": mode_counts["plain_json"]}
           if mode_counts["outbox"] or mode_counts["plain_json"] else {}),
        "value_bytes": sum(len(r[2]) for r in records),
        "data_json_bytes_p5_p50_p95_sampled": tuple(
            data_sizes[min(len(data_sizes) - 1, int(q * len(data_sizes)))]
            for q in (0.05, 0.5, 0.95)
        ),
        "by_type": dict(sorted(Counter(ev.type for ev in events).items())),
    }


# ---- the oracle -------------------------------------------------------------------------------


def _pick(data: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    return {f: copy.deepcopy(data[f]) for f in fields if f in data}


def expected_views(workload: Workload) -> dict[str, dict[str, dict[str, Any]]]:
    """The final documents of the three views of shop.toml, from the ground truth.

    Computed per view from the clean history of each stream (the last event of a
    "latest" stream is its final state; "strict" streams contribute every event), not by
    running the service's merge code. Returns ``{"customer": {key: doc}, "order": ...,
    "product": ...}``; a key that no event wrote has no document, a field that no event
    wrote is absent, and an `add` target stays present after it returns to 0.
    """
    streams = workload.streams()
    customer: dict[str, dict[str, Any]] = {}
    order: dict[str, dict[str, Any]] = {}
    product: dict[str, dict[str, Any]] = {}

    def doc(view: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
        return view.setdefault(key, {})

    for (source_name, pk), history in sorted(streams.items()):
        last = history[-1]
        if source_name == "customers":
            d = doc(customer, pk)  # set or unset: either way the key was written
            if last.type == "shop.customer.upserted":
                d["profile"] = copy.deepcopy(last.data)
        elif source_name == "orders":
            doc(order, pk)["order"] = copy.deepcopy(last.data)
            orders = doc(customer, last.data["customer_id"]).setdefault("orders", {})
            orders[last.data["order_id"]] = _pick(last.data, ORDER_SUMMARY_FIELDS)
        elif source_name == "payments":
            doc(order, last.data["order_id"])["payment"] = _pick(last.data, PAYMENT_FIELDS)
            for ev in history:
                field_ = {"shop.payment.captured": "total_paid_cents",
                          "shop.payment.refunded": "total_refunded_cents"}.get(ev.type)
                if field_:
                    d = doc(customer, ev.data["customer_id"])
                    d[field_] = d.get(field_, 0) + ev.data["amount_cents"]
        elif source_name == "shipments":
            doc(order, last.data["order_id"])["shipment"] = _pick(last.data, SHIPMENT_FIELDS)
        elif source_name == "products":
            doc(product, pk)["product"] = copy.deepcopy(last.data)
        elif source_name == "inventory":
            d = doc(product, pk)
            d["stock"] = sum(ev.data["delta"] for ev in history)
            d["adjustments"] = len(history)
        elif source_name == "reviews":
            posted = [ev for ev in history if ev.type == "shop.review.posted"]
            deleted = [ev for ev in history if ev.type == "shop.review.deleted"]
            for ev in posted:
                d = doc(customer, ev.data["customer_id"])
                d["reviews_written"] = d.get("reviews_written", 0) + 1
            for ev in posted + deleted:
                d = doc(product, ev.data["product_id"])
                reviews = d.setdefault("reviews", {})
                sign = 1 if ev.type == "shop.review.posted" else -1
                d["rating_sum"] = d.get("rating_sum", 0) + sign * ev.data["rating"]
                d["review_count"] = d.get("review_count", 0) + sign
                if sign > 0 and last.type == "shop.review.posted":
                    reviews[ev.data["review_id"]] = _pick(ev.data, REVIEW_FIELDS)
        else:  # pragma: no cover
            raise AssertionError(source_name)
    return {"customer": customer, "order": order, "product": product}


# Which documents each event type updates in shop.toml: (view, where the key comes from).
_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "shop.customer.upserted": (("customer", "partitionkey"),),
    "shop.customer.deleted": (("customer", "partitionkey"),),
    "shop.order.placed": (("customer", "customer_id"), ("order", "partitionkey")),
    "shop.order.updated": (("customer", "customer_id"), ("order", "partitionkey")),
    "shop.payment.authorized": (("order", "order_id"),),
    "shop.payment.captured": (("customer", "customer_id"), ("order", "order_id")),
    "shop.payment.refunded": (("customer", "customer_id"), ("order", "order_id")),
    "shop.shipment.created": (("order", "order_id"),),
    "shop.shipment.dispatched": (("order", "order_id"),),
    "shop.shipment.delivered": (("order", "order_id"),),
    "shop.product.upserted": (("product", "partitionkey"),),
    "shop.inventory.adjusted": (("product", "partitionkey"),),
    "shop.review.posted": (("customer", "customer_id"), ("product", "product_id")),
    "shop.review.deleted": (("product", "product_id"),),
}


def applied_events(workload: Workload) -> list[SimEvent]:
    """The events a correct service applies, each once: the first copy of every event, in
    record order (one stream lives in one partition, so record order is its arrival order);
    of a "latest" stream only those newer than everything applied before (an older one
    arriving late is stale), of a "strict" stream every event (reordered ones wait for
    their predecessors)."""
    seen: set[int] = set()
    top: dict[tuple[str, str], int] = {}
    out = []
    for i in workload.record_events:
        if i in seen:
            continue
        seen.add(i)
        ev = workload.events[i]
        if SOURCES[ev.source_name].ordering == "latest":
            if ev.sequence <= top.get(ev.stream, 0):
                continue
            top[ev.stream] = ev.sequence
        out.append(ev)
    return out


def expected_versions(workload: Workload) -> dict[str, dict[str, int]]:
    """``{view: {key: version}}``: how many updates each document of shop.toml receives when
    every applied event (see `applied_events`) changes it exactly once. A document's version
    counts its updates, so a lost event shows as a lower and a double apply as a higher one,
    also where the document's content would not tell (a "latest" state set twice)."""
    out: dict[str, dict[str, int]] = {"customer": {}, "order": {}, "product": {}}
    for ev in applied_events(workload):
        for view, key in targets(ev):
            docs = out[view]
            docs[key] = docs.get(key, 0) + 1
    return out


def targets(ev: SimEvent) -> list[tuple[str, str]]:
    """(view, key) of each document the event updates in shop.toml."""
    return [(view, ev.partitionkey if where == "partitionkey" else str(ev.data[where]))
            for view, where in _TARGETS[ev.type]]


# ---- malformed records ---------------------------------------------------------------------


class BadRecord(NamedTuple):
    """A malformed record; ``record[:4]`` is ``(topic, key, value, headers)``."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    reason: str  # the dead-letter reason the service should give (design.md)


def bad_records(topic_prefix: str = "", seed: int = 0) -> list[BadRecord]:
    """One record per defect, each otherwise valid, on the orders topic."""
    rng = random.Random(f"{seed}:bad")
    topic = topic_prefix + SOURCES["orders"].topic
    data = {"order_id": "o-bad", "customer_id": "c-bad", "product_id": "p-bad", "quantity": 1,
            "amount_cents": 100, "status": "placed"}

    def binary(pk: str | None, value: bytes, content_type: str = JSON,
               **override: bytes | None) -> list[tuple[str, bytes]]:
        attrs: dict[str, bytes | None] = {
            "ce_specversion": b"1.0",
            "ce_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode(),
            "ce_source": b"/shop/orders",
            "ce_type": b"shop.order.placed",
            "ce_time": b"2025-01-01T00:00:00.000Z",
            "ce_partitionkey": pk.encode() if pk else None,
            "ce_sequence": b"1",
        }
        attrs.update(override)
        return [(k, v) for k, v in attrs.items() if v is not None] + [
            ("content-type", content_type.encode())
        ]

    good = _json(data)
    packed = msgpack.packb(data, use_bin_type=True)
    structured = {"specversion": "1.0", "id": "bad-structured-1", "source": "/shop/orders",
                  "type": "shop.order.placed", "partitionkey": "o-bad-7", "sequence": "1"}
    return [
        BadRecord(topic, b"o-bad-1", good, binary("o-bad-1", good, ce_id=None),
                  "missing_attribute"),
        BadRecord(topic, b"o-bad-2", b'{"order_id": "o-bad-2", "quantity": ',
                  binary("o-bad-2", b""), "bad_json"),
        BadRecord(topic, b"o-bad-3", packed[: len(packed) // 2],
                  binary("o-bad-3", b"", MSGPACK), "bad_msgpack"),
        BadRecord(topic, b"o-bad-4", good, binary("o-bad-4", good, ce_specversion=b"0.3"),
                  "bad_specversion"),
        BadRecord(topic, None, good, binary(None, good), "no_partition_key"),
        BadRecord(topic, b"o-bad-6", good, binary("o-bad-6", good, ce_sequence=b"abc"),
                  "bad_sequence"),
        BadRecord(topic, b"o-bad-7", _json(structured)[:-1] + b',"data":{"order_id":',
                  [("content-type", STRUCTURED.encode())], "bad_json"),
        BadRecord(topic, b"o-bad-8", good, binary("o-bad-8", good, ce_type=b"shop.order.\xff"),
                  "bad_encoding"),
    ]


# ---- Kafka ------------------------------------------------------------------------------------


def ensure_topics(bootstrap: str, topics: Iterable[str] | None = None, partitions: int = 4,
                  *, timeout: float = 30.0) -> list[str]:
    """Create `topics` (default: the seven source topics) if missing and wait for them."""
    from aggregator.admin import create_topics

    return create_topics(bootstrap, list(TOPICS if topics is None else topics), partitions,
                         timeout=timeout)


def produce(
    workload: Workload | Iterable[Record],
    bootstrap: str,
    topic_prefix: str = "",
    *,
    config: Mapping[str, Any] | None = None,
    timeout: float = 120.0,
) -> int:
    """Produce every record, in order, with an idempotent producer; return the count.

    Records of one key keep their order (idempotence keeps it across retries). Raises
    `RuntimeError` if any delivery failed or the flush did not finish within `timeout`.
    """
    from confluent_kafka import KafkaError, Producer

    records = workload.records if isinstance(workload, Workload) else workload
    failures: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            failures.append(err)

    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "queue.buffering.max.messages": 200_000,
        # A Python callback per failed record only: per-record reports cost ~25 % here.
        "on_delivery": on_delivery,
        "delivery.report.only.error": True,
    }
    settings.update(config or {})
    producer = Producer(settings)
    deadline = time.monotonic() + timeout
    sent = 0
    for topic, key, value, headers in records:
        while True:
            try:
                producer.produce(topic_prefix + topic, value=value, key=key, headers=headers)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                producer.poll(0.05)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"produce timed out after {sent} records") from None
        sent += 1
        if sent % 1000 == 0:
            producer.poll(0)
            if failures:
                break
    remaining = producer.flush(max(0.0, deadline - time.monotonic()))
    if failures:
        raise RuntimeError(f"{len(failures)} deliveries failed, first: {failures[0]}")
    if remaining:
        raise RuntimeError(f"{remaining} records not delivered within {timeout} s")
    delivered = sent
    log.info("produced %d records to %s", delivered, bootstrap)
    return delivered
