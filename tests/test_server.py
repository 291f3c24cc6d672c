"""The HTTP API (server.py) on shards and shared counters made by the test: documents,
listing, errors, the token, readiness, metrics, size limits, OpenAPI, the server process."""

from __future__ import annotations

import errno
import json
import socket
import time

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from aggregator.config import ConfigError, load_config
from aggregator.control import Slot
from aggregator.metrics import (
    COMMIT_BUCKETS_MS,
    STATUS_FILE,
    prefix_of,
    read_commit_histogram,
    record_commit,
    write_status,
)
from aggregator.protocol import create_segments
from aggregator.server import (
    MAX_URL_BYTES,
    ServerStartError,
    create_app,
    start_server_process,
)

from .support.viewdata import record, write_docs

TOKEN = "s3cret-token"


def config(data_dir, workers=2, **http):
    overrides = {"service.data_dir": str(data_dir), "service.workers": workers,
                 "service.ready_max_lag": 10}
    overrides.update({f"http.{k}": v for k, v in http.items()})
    return load_config(None, overrides, env={})


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    docs = {("customer", f"c{i}"): record({"name": f"n{i}"}, i + 1,
                                          {"/shop/customers": [i, "2024-01-01T00:00:00Z"]})
            for i in range(25)}
    docs[("customer", "deleted")] = record(None, 9)
    docs[("order", "o/1 x")] = record({"total": 12, "blob": b"\x00\x01"})
    write_docs(d, 2, docs)
    return d


@pytest.fixture
def client(data_dir):
    with TestClient(create_app(config(data_dir))) as c:
        yield c


@pytest.fixture
def segments(data_dir):
    """The shared memory a running service would have: control block, rings, histogram."""
    with create_segments(prefix_of(data_dir), 2, 4096, 4096) as seg:
        yield seg.ctl, seg.inbound, seg.hist


def metrics(client, **kw) -> dict[str, dict[tuple, float]]:
    r = client.get("/metrics", **kw)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


# ---- documents and listing --------------------------------------------------------------


def test_get_document(client):
    r = client.get("/views/customer/c3")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"view": "customer", "key": "c3", "version": 4,
                        "document": {"name": "n3"},
                        "freshness": {"/shop/customers": {"sequence": 3,
                                                          "time": "2024-01-01T00:00:00Z"}}}
    # keys with '/' and spaces, percent-encoded; msgpack bytes come out as base64
    r = client.get("/views/order/o%2F1%20x")
    assert r.status_code == 200 and r.json()["document"] == {"total": 12, "blob": "AAE="}
    assert client.head("/views/customer/c3").status_code == 200


def test_not_found(client):
    for path, error in (("/views/customer/nope", "not_found"),
                        ("/views/customer/deleted", "not_found"),  # tombstone
                        ("/views/nope/c1", "unknown_view"),
                        ("/views/nope", "unknown_view"),
                        ("/nothing", "not_found")):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"] == error, path
    assert client.post("/views/customer/c1").status_code == 405


def test_list_with_cursor(client):
    keys, cursor, pages = [], None, 0
    while True:
        params = {"limit": 4} | ({"cursor": cursor} if cursor else {})
        r = client.get("/views/customer", params=params)
        assert r.status_code == 200
        body = r.json()
        assert body["view"] == "customer" and len(body["keys"]) <= 4
        keys += body["keys"]
        cursor = body["next_cursor"]
        pages += 1
        if cursor is None:
            break
    assert sorted(keys) == sorted(f"c{i}" for i in range(25)) and pages == 7
    assert len(client.get("/views/customer").json()["keys"]) == 25  # default limit 100


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "limit=-1",
                                   "cursor=garbage"])
def test_list_bad_parameters(client, query):
    r = client.get(f"/views/customer?{query}")
    assert r.status_code == 400
    assert r.json()["error"] in ("bad_request", "bad_cursor")


def test_list_max_limit(client):
    assert client.get("/views/customer?limit=1000").status_code == 200


# ---- auth -------------------------------------------------------------------------------


def test_token(data_dir):
    with TestClient(create_app(config(data_dir, token=TOKEN))) as c:
        for path in ("/views/customer/c1", "/views/customer", "/metrics",
                     "/openapi.json", "/nothing"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": TOKEN}).status_code == 401
        ok = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/views/customer/c1", headers=ok).status_code == 200
        assert c.get("/views/customer/c1", headers={"Authorization": f"bearer {TOKEN}"}
                     ).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200  # liveness stays open
        assert c.get("/readyz").status_code == 503  # and readiness: no status file, no 401
        spec = c.get("/openapi.json", headers=ok).json()
        assert spec["security"] == [{"bearer": []}]


def test_non_loopback_without_token_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, host="0.0.0.0")
    assert str(info.value).startswith("config error: http.host: '0.0.0.0' is not a loopback")
    with pytest.raises(ConfigError, match="http.host"):
        config(tmp_path, host="192.168.1.10")
    assert config(tmp_path, host="0.0.0.0", token=TOKEN).http.host == "0.0.0.0"
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert config(tmp_path, host=host).http.host == host
    assert config(tmp_path, host="0.0.0.0", enabled=False).http.enabled is False
    with pytest.raises(ConfigError, match="http.port"):
        config(tmp_path, port=70000)


def test_token_is_kept_secret(tmp_path):
    cfg = config(tmp_path, token=TOKEN)
    assert TOKEN not in repr(cfg) and TOKEN not in json.dumps(cfg.redacted())


# ---- size limits --------------------------------------------------------------------------


def test_oversized_requests(data_dir):
    with TestClient(create_app(config(data_dir, max_request_bytes=100))) as c:
        r = c.request("GET", "/views/customer/c1", content=b"x" * 101)
        assert r.status_code == 413 and r.json()["error"] == "request_too_large"
        assert c.request("GET", "/views/customer/c1", content=b"x" * 100).status_code == 200
        r = c.get("/views/customer/" + "k" * MAX_URL_BYTES)
        assert r.status_code == 414
        r = c.get("/views/customer?cursor=" + "A" * MAX_URL_BYTES)
        assert r.status_code == 414

        def chunks():
            yield b"abc"

        r = c.request("GET", "/views/customer/c1", content=chunks())
        assert r.status_code == 411


# ---- health and readiness ----------------------------------------------------------------


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readiness_from_the_status_file(client, data_dir):
    r = client.get("/readyz")
    assert r.status_code == 503 and "no status file" in r.json()["reasons"][0]
    status = {"pid": 1, "workers": 2, "ready": True,
              "assigned": ["shop.orders[0]", "shop.orders[1]"],
              "lag": {"shop.orders[0]": 3, "shop.orders[1]": 10},
              "events_in": {"orders": 100}}
    write_status(data_dir, status)
    r = client.get("/readyz")
    assert r.status_code == 200, r.json()
    assert r.json()["ready"] is True and r.json()["reasons"] == []

    write_status(data_dir, {**status, "lag": {"shop.orders[0]": 3, "shop.orders[1]": 11}})
    r = client.get("/readyz")
    assert r.status_code == 503 and "lag more than 10" in r.json()["reasons"][0]

    write_status(data_dir, {**status, "lag": {"shop.orders[0]": 3}})
    assert "lag unknown" in client.get("/readyz").json()["reasons"][0]

    write_status(data_dir, {**status, "ready": False})
    assert client.get("/readyz").status_code == 503

    write_status(data_dir, {**status, "time": time.time() - 6})
    r = client.get("/readyz")
    assert r.status_code == 503 and "old" in r.json()["reasons"][0]

    (data_dir / STATUS_FILE).write_text("{not json")
    assert client.get("/readyz").status_code == 503


def test_a_worker_blocked_by_its_data_disk_is_not_ready(client, data_dir, segments):
    """Read from the control block: a full disk cannot take a fresh status file either."""
    ctl = segments[0]
    write_status(data_dir, {"pid": 1, "workers": 2, "ready": True, "assigned": ["a.b[0]"],
                            "lag": {"a.b[0]": 0}})
    assert client.get("/readyz").status_code == 200
    w0, w1 = (("worker", "0"),), (("worker", "1"),)
    assert metrics(client)["aggregator_storage_blocked"] == {w0: 0, w1: 0}

    ctl.set(1, Slot.STORAGE_BLOCKED, errno.ENOSPC)
    ctl.add(1, Slot.STORAGE_ERRORS, 3)
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["reasons"] == ["worker 1: the data disk refuses its writes (ENOSPC: No "
                                   "space left on device); it retries"]
    m = metrics(client)
    assert m["aggregator_storage_blocked"] == {w0: 0, w1: 1}
    assert m["aggregator_storage_errors_total"] == {w0: 0, w1: 3}

    ctl.set(1, Slot.STORAGE_BLOCKED, 0)  # the retry committed
    assert client.get("/readyz").status_code == 200


# ---- metrics ------------------------------------------------------------------------------


def test_metrics_without_a_running_service(client):
    m = metrics(client)
    assert set(m["aggregator_core_info"]) in ({(("implementation", "cython"),)},
                                              {(("implementation", "python"),)})
    assert m["aggregator_lmdb_file_bytes"][(("shard", "0"),)] > 0
    assert m["aggregator_lmdb_entries"][(("db", "views"), ("shard", "0"))] > 0
    assert "aggregator_events_applied_total" not in m  # no control block: nothing to say


def test_metrics_follow_the_shared_counters(client, data_dir, segments):
    ctl, rings, hist = segments
    m = metrics(client)
    w0 = (("worker", "0"),)
    w1 = (("worker", "1"),)
    for name in ("aggregator_events_applied_total", "aggregator_duplicates_dropped_total",
                 "aggregator_stale_dropped_total", "aggregator_parked",
                 "aggregator_gaps_skipped_total", "aggregator_deadlettered_total",
                 "aggregator_forwarded_total", "aggregator_records_in_total",
                 "aggregator_lmdb_commits_total", "aggregator_lmdb_commit_seconds_total",
                 "aggregator_ring_fill_ratio"):
        assert m[name] == {w0: 0, w1: 0}, name
    assert m["aggregator_batch_commit_seconds_count"] == {w0: 0, w1: 0}

    ctl.add(0, Slot.APPLIED, 41)
    ctl.add(1, Slot.APPLIED, 1)
    ctl.add(1, Slot.RECORDS, 50)
    ctl.add(0, Slot.DUPLICATES, 5)
    ctl.add(0, Slot.STALE, 6)
    ctl.set(1, Slot.PARKED, 7)
    ctl.add(0, Slot.GAPS_SKIPPED, 2)
    ctl.add(1, Slot.DEADLETTERED, 8)
    ctl.add(0, Slot.FORWARDED, 9)
    ctl.add(0, Slot.COMMIT_NS, 1_500_000_000)
    ctl.heartbeat(0)
    assert rings[1].try_put(b"x" * 1000)
    for ms in (0.5, 3, 3, 70, 9000):
        record_commit(hist, 1, ms)
    m = metrics(client)
    assert m["aggregator_events_applied_total"] == {w0: 41, w1: 1}
    assert m["aggregator_records_in_total"][w1] == 50
    assert m["aggregator_duplicates_dropped_total"][w0] == 5
    assert m["aggregator_stale_dropped_total"][w0] == 6
    assert m["aggregator_parked"][w1] == 7
    assert m["aggregator_gaps_skipped_total"][w0] == 2
    assert m["aggregator_deadlettered_total"][w1] == 8
    assert m["aggregator_forwarded_total"][w0] == 9
    assert m["aggregator_lmdb_commit_seconds_total"][w0] == 1.5
    assert 0 <= m["aggregator_worker_heartbeat_age_seconds"][w0] < 5
    assert m["aggregator_ring_fill_ratio"][w0] == 0
    assert m["aggregator_ring_fill_ratio"][w1] == 1008 / 4096
    buckets = {dict(k)["le"]: v for k, v in m["aggregator_batch_commit_seconds_bucket"].items()
               if dict(k)["worker"] == "1"}
    assert buckets["0.001"] == 1 and buckets["0.002"] == 1 and buckets["0.005"] == 3
    assert buckets["0.1"] == 4 and buckets["5.0"] == 4 and buckets["+Inf"] == 5
    assert m["aggregator_batch_commit_seconds_count"][w1] == 5
    assert m["aggregator_batch_commit_seconds_sum"][w1] == pytest.approx(9.0765)

    ctl.add(0, Slot.APPLIED, 1)  # values move between scrapes
    assert metrics(client)["aggregator_events_applied_total"][w0] == 42


def test_metrics_from_the_status_file(client, data_dir):
    write_status(data_dir, {"ready": True, "assigned": ["a.b[0]", "a.b[1]"],
                            "lag": {"a.b[0]": 5, "a.b[1]": None},
                            "events_in": {"orders": 10, "payments": 3}, "workers": 2,
                            "restarts": 4})
    m = metrics(client)
    assert m["aggregator_worker_restarts_total"] == {(): 4}
    assert m["aggregator_consumer_lag"] == {(("partition", "0"), ("topic", "a.b")): 5}
    assert m["aggregator_source_events_in_total"] == {(("source", "orders"),): 10,
                                                      (("source", "payments"),): 3}
    assert m["aggregator_partitions_assigned"] == {(): 2}
    assert 0 <= m["aggregator_status_age_seconds"][()] < 5


def test_commit_histogram_layout():
    from aggregator.ring import SharedCounters

    name = f"agg-test-hist-{time.monotonic_ns()}"
    hist = SharedCounters.create(name, 2 * (len(COMMIT_BUCKETS_MS) + 2))
    try:
        record_commit(hist, 1, 1.0)  # the bounds are inclusive (le)
        record_commit(hist, 1, 5000.5)  # beyond the last bound: only +Inf
        buckets, count, total = read_commit_histogram(hist, 1)
        assert buckets == [1] * len(COMMIT_BUCKETS_MS) and count == 2
        assert total == 1000 + 5_000_500
        assert read_commit_histogram(hist, 0) == ([0] * len(COMMIT_BUCKETS_MS), 0, 0)
    finally:
        hist.close()
        hist.unlink()


# ---- OpenAPI ------------------------------------------------------------------------------


def test_openapi(client):
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert {"/views/{view}/{key}", "/views/{view}", "/healthz", "/readyz", "/metrics",
            "/openapi.json"} <= set(spec["paths"])
    params = spec["paths"]["/views/{view}"]["get"]["parameters"]
    assert params[0]["schema"]["enum"] == ["customer", "order", "product"]
    assert params[1]["schema"]["maximum"] == 1000
    assert spec["security"] == []


# ---- the server process -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_process_serves_and_stops(data_dir):
    port = free_port()
    proc = start_server_process(config(data_dir, port=port, token=TOKEN))
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx2.get(f"{base}/healthz").json() == {"status": "ok"}
        r = httpx2.get(f"{base}/views/customer/c1", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["document"] == {"name": "n1"}
        assert httpx2.get(f"{base}/views/customer/c1").status_code == 401
        r = httpx2.get(f"{base}/views/customer/" + "k" * (20 * 1024))  # beyond the head limit
        assert r.status_code in (400, 414)
    finally:
        proc.terminate()
        proc.join(10)
    assert proc.exitcode == 0  # SIGTERM is a graceful stop


def test_server_process_reports_a_taken_port(data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServerStartError, match=f"127.0.0.1:{port}"):
            start_server_process(config(data_dir, port=port))


def test_server_process_disabled(data_dir):
    assert start_server_process(config(data_dir, enabled=False)) is None
