"""deploy/: every artefact checked against the real service.

- the Grafana dashboard and the Prometheus alert rules: every metric their PromQL names is
  exposed by `/metrics` of a running service (started here, fed a small shop workload),
  and every label they group by is on one of the metrics of that query; the rules file is
  YAML with the rule schema Prometheus loads (no promtool here: checked by hand);
- the compose file: YAML, a real Kafka broker image, every file it mounts exists;
- the Dockerfile: two stages, the wheel built from exactly what it copies into the build
  stage, installed offline from the wheel directory into a fresh environment as the run
  stage does, and that `aggregator run` (the image's command) serving /healthz against the
  test broker, as the non-root user's data dir would be.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from aggregator.devtools import simulate
from tests.support.service import ROOT, Service, produce_prefixed, write_config

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "aggregator-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "aggregator-alerts.yml"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
TOKEN = "deploy-kit-test-token"
METRIC_RE = re.compile(r"\baggregator_[a-z0-9_]+\b")
BY_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
FOREIGN_LABELS = {"instance", "job", "le"}  # added by Prometheus, or the histogram's own


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict):
            exprs.append(q["query"])
    assert len(exprs) >= 10
    return exprs


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def scrape(url: str) -> dict[str, list[dict[str, str]]]:
    """`/metrics` as {sample name: [labels of each sample]}."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    out: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*?)\})?\s", line)
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out.setdefault(m.group(1), []).append(labels)
    return out


def test_dashboard_and_alerts_query_what_the_service_exposes(tmp_path, shop_prefix, bootstrap,
                                                             group_id):
    produced = produce_prefixed(bootstrap, shop_prefix, simulate.generate(2, 2000))
    path = write_config(tmp_path / "svc.toml", bootstrap=bootstrap, prefix=shop_prefix,
                        group=group_id, data_dir=tmp_path / "data", workers=2,
                        http_token=TOKEN)
    svc = Service(path, tmp_path / "svc.log").start()
    try:
        svc.wait_committed(produced.ends, timeout=120)
        samples = scrape(svc.http_url())
    finally:
        svc.discard()

    queries = dashboard_queries() + [r["expr"] for r in alert_rules()]
    used = {n for q in queries for n in METRIC_RE.findall(q)}
    assert {"aggregator_consumer_lag", "aggregator_batch_commit_seconds_bucket",
            "aggregator_worker_restarts_total", "aggregator_change_events_backlog",
            "aggregator_storage_blocked", "aggregator_gaps_skipped_total"} <= used
    missing = sorted(n for n in used if not samples.get(n))
    assert not missing, f"queried but not in /metrics: {missing}"
    for q in queries:
        names = METRIC_RE.findall(q)
        have = {k for n in names for s in samples[n] for k in s}
        for group in BY_RE.findall(q):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                assert label in have or label in FOREIGN_LABELS, (q, label)
    for p in json.loads(DASHBOARD.read_text())["panels"]:  # legends name real labels too
        for t in p["targets"]:
            have = {k for n in METRIC_RE.findall(t["expr"]) for s in samples[n] for k in s}
            for label in re.findall(r"\{\{(\w+)\}\}", t["legendFormat"]):
                assert label in have | FOREIGN_LABELS, (t["expr"], label)


DURATION_RE = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def test_alert_rules_file_follows_the_rule_schema():
    """What `promtool check rules` would check of the structure (it is not installed)."""
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    names = set()
    want = {"AggregatorLagGrowing", "AggregatorStorageBlocked", "AggregatorGapsSkipped",
            "AggregatorDeadLettersRising", "AggregatorWorkerRestarts", "AggregatorChangeBacklog"}
    for g in doc["groups"]:
        assert set(g) <= {"name", "interval", "limit", "rules"} and g["name"] and g["rules"]
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert isinstance(r["alert"], str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*",
                                                                r["alert"])
            assert r["alert"] not in names
            names.add(r["alert"])
            assert isinstance(r["expr"], str) and r["expr"].strip()
            assert r["expr"].count("(") == r["expr"].count(")")
            if "for" in r:
                assert DURATION_RE.match(r["for"]), r["for"]
            assert r["labels"]["severity"] in ("warning", "critical")
            assert all(isinstance(v, str) for v in r["labels"].values())
            assert {"summary", "description"} <= set(r["annotations"])
            for text in r["annotations"].values():  # Go templates: balanced, known vars
                assert text.count("{{") == text.count("}}")
                for var in re.findall(r"\$labels\.(\w+)", text):
                    assert var in FOREIGN_LABELS | set(re.findall(r"\w+", r["expr"])) | \
                        {"worker", "topic", "partition"}, (r["alert"], var)
    assert names >= want


def test_compose_file():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    agg = services["aggregator"]
    assert (DEPLOY / agg["build"]["context"] / agg["build"]["dockerfile"]).resolve() == \
        DOCKERFILE.resolve()
    assert agg["environment"]["AGGREGATOR_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert any(v.endswith(":/var/lib/aggregator") for v in agg["volumes"])
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), (name, src)
            else:
                assert src in doc["volumes"], (name, src)
        if svc.get("entrypoint") == ["python", "-c"]:  # one-shot helpers: valid Python
            compile(svc["command"][0], f"compose service {name}", "exec")
    for secret in doc["secrets"].values():
        assert (DEPLOY / secret["file"]).is_file()
    prom = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["aggregator:8080"]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (instruction, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        if instr == "FROM":
            stages.append([])
        stages[-1].append((instr, args.strip()))
    return stages


def test_dockerfile_shape():
    build, run = dockerfile_stages()
    assert build[0][1].endswith(" AS build")
    for instr, args in build:
        if instr == "COPY":
            for src in shlex.split(args)[:-1]:
                assert (ROOT / src).exists(), src
    final = dict(run)
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert final["ENV"] == "AGGREGATOR_DATA_DIR=/var/lib/aggregator"
    assert json.loads(final["VOLUME"]) == ["/var/lib/aggregator"]
    assert json.loads(final["ENTRYPOINT"]) == ["aggregator"]
    assert json.loads(final["CMD"])[0] == "run"
    assert any(i == "COPY" and a.startswith("--from=build ") for i, a in run)


@pytest.mark.slow
@pytest.mark.long  # CI builds and installs the wheel in tests/integration/test_packaging.py
@pytest.mark.timeout(600)
def test_dockerfile_build_commands_make_a_service_that_runs(tmp_path, shop_prefix, bootstrap,
                                                            group_id):
    """No container engine here: the Dockerfile's own build and install commands, run on
    what it copies, then its command against the test broker."""
    build, run = dockerfile_stages()
    ctx = tmp_path / "src"
    ctx.mkdir()
    for instr, args in build:
        if instr == "COPY":
            *srcs, dest = shlex.split(args)
            for src in srcs:
                target = ctx / dest if dest.endswith("/") and dest != "./" else ctx
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, ctx / dest.rstrip("/"), ignore=shutil.
                                    ignore_patterns("__pycache__", "*.so", "*.c"))
                else:
                    shutil.copy(ROOT / src, target)
    wheels = tmp_path / "wheels"
    (wheel_cmd,) = [a for i, a in build if i == "RUN" and a.startswith("pip wheel")]
    argv = [sys.executable, "-m"] + shlex.split(wheel_cmd.replace("/wheels", str(wheels)))
    subprocess.run(argv, cwd=ctx, check=True, capture_output=True, timeout=480)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    (install,) = [a for i, a in run if i == "RUN" and a.startswith("pip install")]
    install = install.split("&&")[0].replace("/wheels", str(wheels))
    subprocess.run([venv / "bin" / "python", "-m"] + shlex.split(install), check=True,
                   capture_output=True, timeout=240)

    cfg = write_config(tmp_path / "aggregator.toml", bootstrap=bootstrap, prefix=shop_prefix,
                       group=group_id, data_dir=tmp_path / "unused", workers=2)
    data = tmp_path / "var-lib-aggregator"
    data.mkdir(mode=0o700)
    entry = json.loads(dict(run)["ENTRYPOINT"])
    cmd = [c if c != "/etc/aggregator/aggregator.toml" else str(cfg)
           for c in json.loads(dict(run)["CMD"])]
    env = dict(os.environ, AGGREGATOR_DATA_DIR=str(data))
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(venv / "bin" / entry[0])] + entry[1:] + cmd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"HTTP API listening on (http://\S+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        body = urllib.request.urlopen(m.group(1) + "/healthz", timeout=5).read()
        assert body
        assert [p.name for p in data.iterdir() if p.name.startswith("shard")], \
            list(data.iterdir())  # the data dir came from AGGREGATOR_DATA_DIR
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()[-3000:]
