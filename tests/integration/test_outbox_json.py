"""Sources that don't speak CloudEvents, through a real broker and the real service.

`orders` is fed exactly as the outbox event router relays an outbox table row: the
aggregate id as the Kafka key, the event id in header ``id``, the type column in header
``eventType`` (``table.fields.additional.placement=type:header:eventType``) next to other
additional header fields, and the payload column as the value — a JSON object (with
``table.expand.json.payload``) or, by default, a JSON string holding one. No version in the
payload: the Kafka offset orders each aggregate's events.

`customers` publishes plain JSON with an id and a version in the body, keyed by nothing
useful: the partition key comes from a data path, so the supervisor must route by it.
Both feed the customer view with the shop config's feeds, next to each other.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from contextlib import nullcontext

import pytest

from aggregator.deadletter import REASON_HEADER
from aggregator.query import Views
from tests.support.service import Service, produce_tracked, read_topic, write_config

MAPPING = """
[sources.orders]
format = "outbox"
[sources.orders.mapping]
type = "header:eventType"

[sources.customers]
format = "json"
[sources.customers.mapping]
id = "data.event_id"
type = "literal:shop.customer.upserted"
partitionkey = "data.customer_id"
sequence = "data.version"
"""


def wait_records_in(url: str, n: int, timeout: float = 120) -> None:
    """Until the workers together received `n` records (aggregator_records_in_total)."""
    deadline = time.monotonic() + timeout
    got = 0.0
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
        got = sum(float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("aggregator_records_in_total{"))
        if got >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"workers received {got} of {n} records")


def outbox_record(topic, aggregate_id, event_type, payload, as_string, event_id=None):
    """(topic, key, value, headers) as the relay writes one outbox row."""
    text = json.dumps(payload)
    value = json.dumps(text) if as_string else text
    headers = [("id", (event_id or str(uuid.uuid4())).encode()),
               ("eventType", event_type.encode()), ("aggregatetype", b"order"),
               ("tenant", b"shop-1")]
    return topic, aggregate_id.encode(), value.encode(), headers


@pytest.mark.parametrize("mode", ["normal", "cluster"])
def test_outbox_and_plain_json_sources(tmp_path, shop_prefix, bootstrap, group_id, mode):
    """In cluster mode the records go through the tasks topic first (cluster.Ingest routes
    them by the mapping, keeping their Kafka timestamps)."""
    orders, customers = shop_prefix + "shop.orders", shop_prefix + "shop.customers"
    records, want_orders, want_profiles = [], {}, {}
    for i in range(6):  # one event each; the first is at offset 0 (sequence 1: not stale)
        payload = {"order_id": f"s-{i}", "customer_id": "c-0", "status": "placed",
                   "amount_cents": i}
        records.append(outbox_record(orders, f"s-{i}", "shop.order.placed", payload, i % 2))
        want_orders[f"s-{i}"] = payload
    for i in range(30):
        oid, cid = f"o-{i}", f"c-{i % 7}"
        for n, (etype, status) in enumerate((("shop.order.placed", "placed"),
                                             ("shop.order.updated", "paid"))):
            payload = {"order_id": oid, "customer_id": cid, "status": status,
                       "amount_cents": 100 * i + n}
            records.append(outbox_record(orders, oid, etype, payload, as_string=(i + n) % 2))
            want_orders[oid] = payload
    # the relay delivered one row twice (at least once): the second copy has the same event
    # id and is dropped as a duplicate (its payload made different here to show it)
    records.append(outbox_record(orders, "o-0", "shop.order.updated", want_orders["o-0"],
                                 True, event_id="dup-1"))
    records.append(outbox_record(orders, "o-0", "shop.order.updated",
                                 {**want_orders["o-0"], "status": "not-applied"}, False,
                                 event_id="dup-1"))
    for i in range(7):
        cid = f"c-{i}"
        for version in (2, 1):  # version 1 arrives late: stale under ordering = "latest"
            body = {"event_id": f"{cid}-v{version}", "customer_id": cid, "version": version,
                    "name": f"name-{i}-v{version}"}
            records.append((customers, b"unrelated" if i % 2 else None,
                            json.dumps(body).encode(), [("content-type", b"application/json")]))
        want_profiles[cid] = {"event_id": f"{cid}-v2", "customer_id": cid, "version": 2,
                              "name": f"name-{i}-v2"}
    # unreadable by their mapping: dead-lettered with the attribute and the mapping named
    records.append((orders, b"o-x", b'{"order_id": "o-x"}', [("id", b"e-x")]))
    records.append((customers, b"c-x", json.dumps({"event_id": "e", "version": 1}).encode(),
                    None))

    ends = produce_tracked(bootstrap, records)
    path = write_config(tmp_path / "svc.toml", bootstrap=bootstrap, prefix=shop_prefix,
                        group=group_id, data_dir=tmp_path / "data", workers=2,
                        extra=MAPPING + ("[cluster]\nenabled = true\ntasks = 4\n"
                                         if mode == "cluster" else ""))
    svc = Service(path, tmp_path / "svc.log").start()
    try:
        svc.wait_committed(ends, timeout=120)
        if mode == "cluster":  # committed at ingest: wait for the workers to take them all
            wait_records_in(svc.http_url(), len(records))
        assert svc.stop() == 0, svc.log()[-3000:]
    finally:
        svc.discard()

    views = svc.views()
    assert {k: d["order"] for k, d in views["order"].items()} == want_orders
    got_profiles = {k: d["profile"] for k, d in views["customer"].items() if "profile" in d}
    assert got_profiles == want_profiles
    for cid in want_profiles:  # outbox orders and JSON customers meet in one document
        doc = views["customer"][cid]
        mine = {o: {"status": p["status"], "amount_cents": p["amount_cents"]}
                for o, p in want_orders.items() if p["customer_id"] == cid}
        assert doc["orders"] == mine, cid
    # each key is found where its slot says (normal mode; a stopped cluster-mode instance
    # owns no tasks, so its reader serves no key)
    with Views.from_config(svc.config) if mode == "normal" else nullcontext() as reader:
        for cid in want_profiles if reader else ():
            assert reader.get("customer", cid)["document"]["profile"] == want_profiles[cid]
        for oid in want_orders if reader else ():
            assert reader.get("order", oid)["document"]["order"] == want_orders[oid]

    dlq = read_topic(bootstrap, svc.config.service.dead_letter_topic, timeout=30, quiet=1.0)
    got = sorted((dict(m.headers())[REASON_HEADER].decode(),
                  dict(m.headers())["aggregator-dlq-error"].decode()) for m in dlq)
    assert got == [
        ("missing_attribute", "no value for attribute 'type' (type = \"header:eventType\", "
         "outbox mapping of source 'orders')"),
        ("no_partition_key", "no value for attribute 'partitionkey' (partitionkey = "
         "\"data.customer_id\", json mapping of source 'customers')"),
    ]
    assert "Traceback" not in svc.log()
