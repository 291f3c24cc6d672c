"""Hostile and mistaken input on the command line, as real `aggregator` processes: one line
saying what is wrong and the documented exit code, never a traceback. No broker needed: every
case here is refused before one would be started or contacted."""

from __future__ import annotations

import json
import re
import socket
import subprocess

import pytest

from .support.cliproc import ROOT, SHOP, aggregator, one_error_line
from .support.viewdata import record, write_docs

UNREACHABLE = "127.0.0.1:1"  # nothing listens: a test that got as far as Kafka would hang


@pytest.mark.parametrize("bad", ["/proc/x", "/dev/null/x"])
@pytest.mark.parametrize("command", ["run", "demo"])
def test_data_dir_that_cannot_be_created(tmp_path, command, bad):
    r = aggregator(command, "-c", SHOP, "--bootstrap", UNREACHABLE, "--data-dir", bad,
                   cwd=tmp_path, timeout=30)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r)
    assert line.startswith(f"data dir {bad}: cannot create it: "), line
    assert "embedded" not in r.stdout


def test_log_level_is_a_choice(tmp_path):
    r = aggregator("run", "-c", SHOP, "--log-level", "LOUD", cwd=tmp_path)
    assert r.returncode == 2
    assert "Invalid value for '--log-level': 'LOUD' is not one of" in one_error_line(r)
    r = aggregator("run", "-c", SHOP, "--log-format", "xml", cwd=tmp_path)
    assert r.returncode == 2 and "'--log-format'" in one_error_line(r)


@pytest.mark.parametrize("events", ["-5", "0", "many"])
def test_demo_events_checked_before_the_broker_starts(tmp_path, events):
    r = aggregator("demo", "--events", events, cwd=tmp_path, timeout=30)
    assert r.returncode == 2
    assert "Invalid value for '--events'" in one_error_line(r)
    assert r.stdout == ""  # no "embedded Kafka-protocol broker on ..." line
    assert list(tmp_path.iterdir()) == []


def test_demo_serve_refuses_a_taken_port_before_starting(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = aggregator("demo", "--serve", "--events", "10", cwd=tmp_path, timeout=30,
                       env={"AGGREGATOR__HTTP__PORT": str(port)})
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line, line
    assert "serving" not in r.stdout and "embedded" not in r.stdout


def test_get_key_that_is_not_utf8(tmp_path):
    write_docs(tmp_path, 2, {("customer", "c1"): record({"name": "Ada"})})
    r = aggregator("get", "customer", b"\xff\xfe", "--data-dir", tmp_path)
    assert r.returncode == 2
    assert "Invalid value for 'KEY': is not valid UTF-8" in one_error_line(r)


def test_run_requires_a_config(tmp_path):
    r = aggregator("run", "--bootstrap", UNREACHABLE, cwd=tmp_path, timeout=30)
    assert r.returncode == 2
    assert "Missing option '--config'" in one_error_line(r)
    assert list(tmp_path.iterdir()) == []  # no ./data


def test_get_and_stats_read_the_worker_count_from_the_data_dir(tmp_path):
    write_docs(tmp_path, 3, {("customer", f"c{i}"): record({"i": i}) for i in range(20)})
    for i in (0, 7, 19):  # shop.toml says 2 workers: the data dir's 3 win
        r = aggregator("get", "customer", f"c{i}", "--data-dir", tmp_path)
        assert r.returncode == 0 and json.loads(r.stdout) == {"i": i}, r.stderr
    r = aggregator("stats", "--data-dir", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    shards = json.loads(r.stdout)["shards"]
    assert len(shards) == 3 and sum(s["entries"]["views"] for s in shards) == 20
    r = aggregator("get", "customer", "c1", "--data-dir", tmp_path, "--workers", 3)
    assert r.returncode == 0
    r = aggregator("stats", "--data-dir", tmp_path, "--workers", 2)
    assert r.returncode == 2
    assert "was written by 3 workers, not 2 (--workers)" in one_error_line(r)


@pytest.mark.parametrize("command", [("get", "customer", "c1"), ("stats",)])
def test_a_directory_without_shards_is_an_error(tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = aggregator(*command, "--data-dir", empty)
    assert r.returncode == 2
    assert "holds no shards" in one_error_line(r)
    r = aggregator(*command, "--data-dir", tmp_path / "missing")
    assert r.returncode == 2
    assert "no such directory" in one_error_line(r)
    assert not (tmp_path / "missing").exists()


def test_help_names_the_environment_variables_and_exit_codes():
    sources = "".join(p.read_text() for p in (ROOT / "aggregator").glob("*.py"))
    names = {n for n in re.findall(r'"(AGGREGATOR_[A-Z_]*[A-Z])"', sources)}
    assert {"AGGREGATOR_PURE_CORE", "AGGREGATOR_DATA_DIR", "AGGREGATOR_FAULTS"} <= names
    for command in ((), ("run",), ("demo",)):
        out = aggregator(*command, "--help").stdout
        missing = [n for n in sorted(names) if n not in out]
        assert not missing, f"{command}: --help does not name {missing}"
        assert "AGGREGATOR__SECTION__FIELD" in out
        codes = out[out.index("Exit codes:"):]
        for code in ("0", "1", "2"):
            assert re.search(rf"^\s+{code}\s+\S", codes, re.M), codes


@pytest.mark.parametrize("args", [[], ["help"], ["--help"], ["-h"]])
def test_dev_sh_usage_sets_nothing_up(tmp_path, args):
    # a copy of dev.sh alone: any set-up would create .venv next to it
    script = tmp_path / "dev.sh"
    script.write_text((ROOT / "dev.sh").read_text())
    script.chmod(0o755)
    r = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": "/nonexistent/python"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: ./dev.sh COMMAND"), r.stdout
    assert "set -euo" not in r.stdout and "cd " not in r.stdout and r.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.sh"]
    r = subprocess.run([str(script), "nonsense"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown command 'nonsense'" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.sh"]


def test_run_warns_about_a_data_dir_more_open_than_the_umask(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    # shop.toml has no bootstrap servers: the service stops with exit 2 after its checks
    r = aggregator("run", "-c", SHOP, "--data-dir", data, cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert f"data dir {data} has mode 0755, more open than service.umask 0077" in r.stderr
    r = aggregator("run", "-c", SHOP, "--data-dir", data, cwd=tmp_path, timeout=60,
                   env={"AGGREGATOR__SERVICE__UMASK": "0022"})
    assert r.returncode == 2 and "more open than" not in r.stderr
