"""Change events against a real broker: complete, in per-key order, equal to the views.

A consumer that knows nothing of the service rebuilds every document from the change topics
the way this service treats its own input: dedup by CloudEvents id, gate by `sequence`.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request

import pytest

from aggregator.devtools import simulate
from tests.support.service import produce_prefixed, read_topic

VIEWS = ("customer", "order", "product")


@pytest.fixture(scope="module")
def small():
    return simulate.generate(11, 20_000)


@pytest.fixture
def changes_prefix(broker, shop_prefix):
    broker.create_topics([f"{shop_prefix}shop.{v}.changes" for v in VIEWS], 4)
    return shop_prefix


def rebuild(bootstrap, prefix):
    """{view: {key: document}} from the change topics; asserts completeness and order."""
    out = {}
    for view in VIEWS:
        msgs = read_topic(bootstrap, f"{prefix}shop.{view}.changes", timeout=60)
        assert msgs, f"no change events for {view}"
        first_value: dict[str, bytes | None] = {}
        versions: dict[str, list[int]] = {}
        docs = {}
        for m in msgs:  # one key lives in one partition: its events arrive in offset order
            h = dict(m.headers())
            cid, seq, key = h["ce_id"].decode(), int(h["ce_sequence"]), m.key().decode()
            assert cid == f"{view}:{seq}:{key}"
            assert h["ce_partitionkey"].decode() == key
            if cid in first_value:  # a re-publication after a crash: must be identical
                assert first_value[cid] == m.value(), f"{cid}: duplicate id, different data"
                continue
            first_value[cid] = m.value()
            seen = versions.setdefault(key, [])
            assert not seen or seq > seen[-1], f"{view}/{key}: version {seq} after {seen[-1]}"
            seen.append(seq)
            if m.value() is None:
                assert h["ce_type"] == b"aggregator.view.deleted"
                docs.pop(key, None)
            else:
                assert h["content-type"] == b"application/json"
                docs[key] = json.loads(m.value())
        for key, seen in versions.items():  # nothing lost: every version, from 1
            assert seen == list(range(1, len(seen) + 1)), f"{view}/{key}: versions {seen}"
        out[view] = docs
    return out


def run_to_end(svc, produced, fraction_hook=None):
    targets = produced.ends
    if fraction_hook is not None:
        svc.wait_committed(targets, fraction=0.3)
        fraction_hook()
    svc.wait_committed(targets)
    return targets


def test_change_events_rebuild_what_the_api_serves(small, changes_prefix, bootstrap,
                                                   service_factory):
    produced = produce_prefixed(bootstrap, changes_prefix, small, with_bad=False)
    svc = service_factory(changes_prefix, 2).start()
    run_to_end(svc, produced)
    url = svc.http_url()
    served = {}
    keys = random.Random(1).sample(sorted(simulate.expected_views(small)["customer"]), 40)
    for key in keys:
        with urllib.request.urlopen(f"{url}/views/customer/{key}") as r:
            served[key] = json.loads(r.read())["document"]
    assert svc.stop() == 0, svc.log()[-3000:]
    rebuilt = rebuild(bootstrap, changes_prefix)
    views = svc.views()
    assert rebuilt == views
    assert {k: rebuilt["customer"][k] for k in keys} == served


def test_sigkill_between_state_commit_and_publish(small, changes_prefix, bootstrap,
                                                  service_factory, tmp_path):
    produced = produce_prefixed(bootstrap, changes_prefix, small, with_bad=False)
    svc = service_factory(changes_prefix, 2).start(env={
        "AGGREGATOR_FAULTS": "worker_after_commit=3",
        "AGGREGATOR_FAULTS_ONCE": str(tmp_path / "fault-fired"),
    })
    run_to_end(svc, produced)
    assert (tmp_path / "fault-fired").exists()
    assert "exited with code -9" in svc.log()
    assert svc.stop() == 0, svc.log()[-3000:]
    assert rebuild(bootstrap, changes_prefix) == svc.views()


def test_broker_frozen_while_publishing(small, broker, changes_prefix, bootstrap,
                                        service_factory):
    produced = produce_prefixed(bootstrap, changes_prefix, small, with_bad=False)
    svc = service_factory(changes_prefix, 2).start()

    def freeze():
        broker.freeze()
        time.sleep(5)
        broker.thaw()

    run_to_end(svc, produced, freeze)
    assert svc.stop() == 0, svc.log()[-3000:]
    assert rebuild(bootstrap, changes_prefix) == svc.views()
