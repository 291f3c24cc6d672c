"""The HTTP API against the real running service: `aggregator run` as a child process on a
real broker, and the HTTP server as another process on the same config and data dir.

A second server is started here on its own (``serve`` in a separate `python` process): that
shows reads need nothing from the workers and keep working after the service stopped. The
supervisor's own server (``start_server_process``) is checked too, with a bearer token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.devtools import simulate
from tests.support.service import ROOT, Service, produce_prefixed, write_config

EVENTS = int(os.environ.get("AGGREGATOR_TEST_HTTP_EVENTS", "4000"))
SERVE = ("import logging, sys\n"
         "from aggregator.config import load_config\n"
         "from aggregator.server import serve\n"
         "logging.basicConfig(level='INFO', format='%(asctime)s http %(message)s')\n"
         "sys.exit(serve(load_config(sys.argv[1], {'http.port': int(sys.argv[2]),"
         " 'http.token': ''})))\n")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, port: int):
        self.client = httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return True
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
        return False

    def metrics(self) -> dict[str, float]:
        """Each metric name summed over its label sets."""
        r = self.client.get("/metrics")
        assert r.status_code == 200
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out[s.name] = out.get(s.name, 0) + s.value
        return out

    def all_keys(self, view: str, limit: int) -> list[str]:
        keys, cursor = [], None
        while True:
            params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
            body = self.client.get(f"/views/{view}", params=params).json()
            keys += body["keys"]
            cursor = body["next_cursor"]
            if cursor is None:
                return keys


@pytest.fixture
def http_server(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(config_path: Path, port: int) -> Api:
        log = open(tmp_path / "http.log", "ab")
        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(config_path), str(port)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        log.close()
        procs.append(proc)
        api = Api(port)
        assert api.up(30), (tmp_path / "http.log").read_text()
        return api

    yield start
    for proc in procs:
        proc.terminate()
        try:
            assert proc.wait(10) == 0, "the server did not stop cleanly on SIGTERM"
        finally:
            if proc.poll() is None:
                proc.kill()


def test_reads_over_http_equal_the_oracle(tmp_path, shop_prefix, bootstrap, group_id,
                                          http_server):
    workload = simulate.generate(5, EVENTS)
    expected = simulate.expected_views(workload)
    service_port, own_port = free_port(), free_port()
    cfg = write_config(tmp_path / "svc.toml", bootstrap=bootstrap, prefix=shop_prefix,
                       group=group_id, data_dir=tmp_path / "data", workers=2,
                       http_port=service_port, http_token="s3cret-token")
    svc = Service(cfg, tmp_path / "svc.log").start()
    try:
        svc.wait_workers(2)
        api = http_server(cfg, own_port)
        before = api.metrics()
        assert before["aggregator_core_info"] == 1
        assert before.get("aggregator_events_applied_total", 0) == 0

        produced = produce_prefixed(bootstrap, shop_prefix, workload, with_bad=False)
        svc.wait_committed(produced.ends)

        # every document the oracle expects, over HTTP, equal to the oracle's
        for view, docs in expected.items():
            assert docs, view
            for key, doc in docs.items():
                r = api.client.get(f"/views/{view}/{key}")
                assert r.status_code == 200, (view, key, r.text)
                body = r.json()
                assert body["document"] == doc, (view, key)
                assert body["version"] >= 1 and body["freshness"]
            # listing covers every key exactly once
            keys = api.all_keys(view, 37)
            assert len(keys) == len(set(keys))
            assert set(keys) == set(docs), view
        assert api.client.get("/views/customer/no-such-key").status_code == 404

        after = api.metrics()
        assert after["aggregator_events_applied_total"] > 0
        assert after["aggregator_records_in_total"] >= len(workload.records)
        assert after["aggregator_lmdb_commits_total"] > before.get(
            "aggregator_lmdb_commits_total", 0)
        assert after["aggregator_duplicates_dropped_total"] > 0  # the workload re-sends 5 %
        assert "aggregator_ring_fill_ratio" in after
        assert after["aggregator_lmdb_file_bytes"] > 0

        # the supervisor writes the status file: readiness follows the consumer lag
        assert (Path(svc.config.service.data_dir) / "status.json").exists()
        deadline = time.monotonic() + 15
        while api.client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, api.client.get("/readyz").json()
            time.sleep(0.2)
        assert api.metrics().get("aggregator_consumer_lag", 0) == 0

        # the supervisor's own server: bearer token required, except for liveness
        own = Api(service_port)
        assert own.up(5)
        key, doc = next(iter(expected["order"].items()))
        assert own.client.get(f"/views/order/{key}").status_code == 401
        assert own.client.get("/metrics").status_code == 401
        auth = {"Authorization": "Bearer s3cret-token"}
        assert own.client.get(f"/views/order/{key}", headers=auth).json()["document"] == doc
        assert own.client.get("/readyz", headers=auth).status_code == 200
        assert "s3cret-token" not in svc.log()

        assert svc.stop() == 0, svc.log()[-5000:]
        # the service is gone: documents are still served from the shards
        key, doc = next(iter(expected["customer"].items()))
        assert api.client.get(f"/views/customer/{key}").json()["document"] == doc
        assert "aggregator_events_applied_total" not in api.metrics()
        assert api.client.get("/readyz").status_code == 503
    finally:
        svc.discard()
