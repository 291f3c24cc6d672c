"""Records made by the official CloudEvents Python SDK 1.x (`cloudevents.kafka`), through a
real broker and the real service.

Its `to_structured` sets no ``ce_`` headers and the content-type to the event's
``datacontenttype`` (``application/json``) or none: by the Kafka binding that is binary
mode, so a source in the default ``structured = "binding"`` dead-letters such records,
with a reason that says so; a source with ``structured = "detect"`` reads them as the
structured-mode events they are, and routes them by their JSON ``partitionkey``.
"""

from __future__ import annotations

import pytest

from aggregator.deadletter import REASON_HEADER
from aggregator.query import Views
from tests.support.service import Service, produce_tracked, read_topic, write_config

ce_http = pytest.importorskip("cloudevents.http")
ce_kafka = pytest.importorskip("cloudevents.kafka")


def sdk_record(topic: str, mode: str, attrs: dict, data: dict, key_mapper=None) -> tuple:
    """(topic, key, value, headers) exactly as the SDK's Kafka binding makes them."""
    event = ce_http.CloudEvent(attrs, data)
    convert = ce_kafka.to_structured if mode == "structured" else ce_kafka.to_binary
    msg = convert(event, key_mapper=key_mapper)
    key = msg.key.encode() if isinstance(msg.key, str) else msg.key
    return topic, key, msg.value, list(msg.headers.items())


def test_sdk_records_binding_and_detect(tmp_path, shop_prefix, bootstrap, group_id):
    customers, orders = shop_prefix + "shop.customers", shop_prefix + "shop.orders"
    records, want_customers, want_orders = [], {}, {}
    for i in range(40):  # detect: structured records, half without a content-type
        cid = f"c-{i}"
        attrs = {"type": "shop.customer.upserted", "source": "/sdk/customers",
                 "partitionkey": cid, "sequence": "1"}
        if i % 2:
            attrs["datacontenttype"] = "application/json"
        # a third with another Kafka key: the JSON partitionkey still routes them
        mapper = (lambda e: "unrelated-key") if i % 3 == 0 else None
        records.append(sdk_record(customers, "structured", attrs, {"name": f"n{i}"}, mapper))
        want_customers[cid] = {"name": f"n{i}"}
    for i in range(5):  # detect: binary records are read as before
        cid = f"b-{i}"
        records.append(sdk_record(customers, "binary", {
            "type": "shop.customer.upserted", "source": "/sdk/customers", "partitionkey": cid,
            "sequence": "1", "datacontenttype": "application/json"}, {"name": cid}))
        want_customers[cid] = {"name": cid}
    for i in range(6):  # the binding (default): structured records are dead-lettered
        attrs = {"type": "shop.order.placed", "source": "/sdk/orders",
                 "partitionkey": f"o-{i}", "sequence": "1"}
        if i % 2:
            attrs["datacontenttype"] = "application/json"
        records.append(sdk_record(orders, "structured", attrs,
                                  {"order_id": f"o-{i}", "customer_id": "c-0"}))
    for i in range(4):  # the binding: binary records are fine
        oid = f"ob-{i}"
        data = {"order_id": oid, "customer_id": "c-1", "status": "placed", "amount_cents": i}
        records.append(sdk_record(orders, "binary", {
            "type": "shop.order.placed", "source": "/sdk/orders", "partitionkey": oid,
            "sequence": "1", "datacontenttype": "application/json"}, data))
        want_orders[oid] = data
    assert not any(n.startswith("ce_") for r in records[:40] for n, _ in r[3])

    ends = produce_tracked(bootstrap, records)
    path = write_config(tmp_path / "svc.toml", bootstrap=bootstrap, prefix=shop_prefix,
                        group=group_id, data_dir=tmp_path / "data", workers=2,
                        extra='[sources.customers]\nstructured = "detect"\n')
    svc = Service(path, tmp_path / "svc.log").start()
    try:
        svc.wait_committed(ends, timeout=120)
        assert svc.stop() == 0, svc.log()[-3000:]
    finally:
        svc.discard()

    views = svc.views()
    assert {k: d["profile"] for k, d in views["customer"].items() if "profile" in d} == \
        want_customers
    assert {k: d["order"] for k, d in views["order"].items()} == want_orders
    # a key's document is found where its key says (slot of the partitionkey): the records
    # with another Kafka key were routed by their structured partitionkey
    with Views.from_config(svc.config) as reader:
        for cid, profile in want_customers.items():
            doc = reader.get("customer", cid)
            assert doc is not None and doc["document"]["profile"] == profile, cid

    dlq = read_topic(bootstrap, svc.config.service.dead_letter_topic, timeout=30, quiet=1.0)
    assert len(dlq) == 6
    for m in dlq:
        h = dict(m.headers())
        assert h["aggregator-dlq-topic"].decode() == orders
        assert h[REASON_HEADER] == b"missing_attribute"
        why = ("its content-type is 'application/json'" if "content-type" in h
               else "the record has no content-type header")
        assert h["aggregator-dlq-error"].decode() == (
            "missing required attribute 'specversion': read in binary mode (no ce_ headers) "
            f"because {why}; structured mode needs content-type 'application/cloudevents+json' "
            "(or set structured = \"detect\" on the source to read a JSON value with "
            "specversion and no ce_ headers as structured)")
