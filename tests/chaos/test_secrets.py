"""Fault 14: SASL settings and an HTTP token, with every debug output on: no secret may show in
the logs (the service's and librdkafka's, of every process), the metrics, the HTTP API, the
status file, the shards (LMDB meta and all), shared memory or any process's command line or
environment.

librdkafka marks sasl.username/sasl.password (and the other credentials) _RK_SENSITIVE and
prints them as "[redacted]" in its `debug=conf` dump; its SASL PLAIN debug lines do not carry
the token. The test broker (Tansu) refuses the SASL handshake, so the service never connects:
it retries (and logs) for a few seconds, serves the API, and stops on SIGTERM.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from aggregator.ring import SHM_DIR, segment_prefix
from tests.support.service import Service, write_config

RUN_S = 6


def _get(url: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, str(resp.headers) + resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, str(e.headers) + e.read().decode(errors="replace")


def _family(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout
        todo.extend(int(k) for k in kids.split())
    return out


def test_no_secret_in_logs_metrics_api_files_or_processes(broker, tmp_path):
    password = f"pw-{uuid.uuid4().hex}"
    token = f"tok-{uuid.uuid4().hex}"
    markers = [password.encode(), token.encode()]
    data_dir = tmp_path / "data"
    path = write_config(
        tmp_path / "secrets.toml", bootstrap=broker.bootstrap_servers,
        prefix=f"s{uuid.uuid4().hex[:8]}.", group=f"secrets-{uuid.uuid4().hex[:8]}",
        data_dir=data_dir, workers=2, http_token=token,
        extra=(
            '[kafka.common]\n"security.protocol" = "SASL_PLAINTEXT"\n'
            '"sasl.mechanism" = "PLAIN"\n"sasl.username" = "aggregator"\n'
            f'"sasl.password" = "{password}"\ndebug = "all"\n'))
    assert password in path.read_text()  # the file itself holds it, of course
    svc = Service(path, tmp_path / "secrets.log").start(args=("--log-level", "DEBUG"))
    try:
        base = svc.http_url()
        t0 = time.monotonic()
        seen: dict[str, str] = {}  # what -> text, checked below

        # the HTTP API: every route, with, without and with a wrong token
        for route in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/views/customer",
                      "/views/customer/c-1", "/views/nope/x", "/nope"):
            for name, tok in (("token", token), ("none", None), ("wrong", "x" + token[1:])):
                status, text = _get(base + route, tok)
                seen[f"GET {route} ({name} token) -> {status}"] = text
        assert _get(base + "/metrics", token)[0] == 200
        assert _get(base + "/metrics", None)[0] == 401
        assert _get(base + "/healthz", None)[0] == 200

        # let librdkafka try (and log) for a while
        time.sleep(max(0.0, RUN_S - (time.monotonic() - t0)))
        assert svc.proc.poll() is None, svc.log()[-3000:]
        seen["/metrics, later"] = _get(base + "/metrics", token)[1]

        status_file = data_dir / "status.json"
        assert status_file.exists()
        seen["status.json"] = status_file.read_text()
        shm = segment_prefix(str(data_dir.resolve()))
        for name in os.listdir(SHM_DIR):
            if name.startswith(shm):
                seen[f"{SHM_DIR}/{name}"] = Path(SHM_DIR, name).read_bytes().decode("latin-1")
        pids = _family(svc.proc.pid)
        assert len(pids) >= 4  # supervisor, 2 workers, HTTP server (+ resource tracker)
        for pid in pids:
            for what in ("cmdline", "environ"):
                try:
                    raw = Path(f"/proc/{pid}/{what}").read_bytes()
                except OSError:
                    continue
                seen[f"/proc/{pid}/{what}"] = raw.decode("latin-1")
    finally:
        code = svc.stop(timeout=60)
    assert code == 0, svc.log()[-3000:]

    # the shards and whatever else the service left in its data dir, byte for byte
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "data.mdb" for p in files)
    for p in files:
        seen[str(p)] = p.read_bytes().decode("latin-1")

    log = svc.log()
    seen["service log"] = log
    leaks = [what for what, text in seen.items() if any(m.decode() in text for m in markers)]
    assert not leaks, f"a secret shows in: {leaks}"

    # ... and the test did what it says: debug output of librdkafka and of the service, with
    # the SASL settings in effect
    lines = log.splitlines()
    assert len(lines) > 1000, len(lines)
    assert "sasl.password = [redacted]" in log  # librdkafka's debug=conf dump
    assert "'sasl.password': '***'" in log  # the service's "config:" line
    assert any("SASL" in line and "rdkafka#consumer" in line for line in lines)
    assert " DEBUG " in log
    assert json.loads(seen["status.json"])["pid"] == svc.proc.pid
