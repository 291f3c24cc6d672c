"""`aggregator run` as a real process on a real broker: what its command-line options do to
the files it writes (service.umask) and to its log lines (--log-format json)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from aggregator.devtools import simulate
from tests.support.service import produce_prefixed

JSON_KEYS = {"time", "level", "logger", "role", "worker", "pid", "message"}


def modes(data_dir: Path) -> dict[str, int]:
    """Permission bits of the data dir ("."), and of everything below it."""
    out = {".": stat.S_IMODE(data_dir.stat().st_mode)}
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            p = Path(root, name)
            out[str(p.relative_to(data_dir))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def check_modes(data_dir: Path, dir_mode: int, file_mode: int) -> None:
    got = modes(data_dir)
    names = {Path(p).name for p in got}
    # not vacuous: the files of every kind the service writes are there
    assert {"LOCK", "status.json", "data.mdb", "lock.mdb", "shard-0", "shard-1"} <= names, got
    wrong = {p: oct(m) for p, m in got.items()
             if m != (dir_mode if (data_dir / p).is_dir() else file_mode)}
    assert not wrong, f"want dirs {oct(dir_mode)}, files {oct(file_mode)}; got {wrong}"


def test_run_logs_json_and_keeps_its_files_private(bootstrap, shop_prefix, service_factory):
    svc = service_factory(shop_prefix, 2)
    svc.start(args=("--log-format", "json"))
    workload = simulate.generate(5, 600)
    produced = produce_prefixed(bootstrap, shop_prefix, workload)  # 8 dead letters: warnings
    svc.wait_committed(produced.ends)
    data_dir = Path(svc.config.service.data_dir)
    check_modes(data_dir, 0o700, 0o600)  # while it runs (status.json exists only then)
    assert svc.stop() == 0, svc.log()[-3000:]

    lines = svc.log().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"log line {n} is not JSON: {line!r}")
    assert records and all(isinstance(r, dict) and JSON_KEYS <= r.keys() for r in records)
    roles = {(r["role"], r["worker"]) for r in records}
    assert {("supervisor", None), ("http", None), ("worker", 0), ("worker", 1)} <= roles, roles
    dead = [r for r in records if r["logger"] == "aggregator.deadletter"]
    assert len(dead) == len(produced.bad) and all(r["level"] == "WARNING" for r in dead)
    assert any("HTTP API listening on" in r["message"] for r in records)
    assert all(r["time"].endswith("Z") and "T" in r["time"] for r in records)


def test_service_umask_option(bootstrap, shop_prefix, service_factory):
    """service.umask "0027": the owner's group may read (0750 directories, 0640 files)."""
    svc = service_factory(shop_prefix, 2)
    svc.start(env={"AGGREGATOR__SERVICE__UMASK": "0027"})
    svc.wait_workers(2)
    data_dir = Path(svc.config.service.data_dir)
    deadline = time.monotonic() + 60
    while not (data_dir / "status.json").exists():  # written once the service consumes
        assert time.monotonic() < deadline and svc.proc.poll() is None, svc.log()[-3000:]
        time.sleep(0.1)
    try:
        check_modes(data_dir, 0o750, 0o640)
    finally:
        assert svc.stop() == 0
