"""`aggregator run` meeting bad Kafka settings, no broker, missing topics and a worker that
crashes the same way every time: each ends in one clear line and the documented exit code
(2), never in a silent respawn loop or a flood of librdkafka lines."""

from __future__ import annotations

import re
import subprocess
import time
import uuid

import pytest

from aggregator.devtools import simulate
from tests.support.service import Service, produce_prefixed, write_config

SECRET = f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def workload_small():
    return simulate.generate(7, 2000)


def config(tmp_path, bootstrap, prefix, extra="", workers=2):
    return write_config(tmp_path / "svc.toml", bootstrap=bootstrap, prefix=prefix,
                        group=f"g-{uuid.uuid4().hex[:8]}", data_dir=tmp_path / "data",
                        workers=workers, extra=extra)


def run_until_exit(svc: Service, timeout: float, env: dict | None = None) -> tuple[int, float]:
    t0 = time.monotonic()
    svc.start(env=env)
    try:
        code = svc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        svc.discard()
        raise AssertionError(f"still running after {timeout} s:\n{svc.log()[-4000:]}") from None
    return code, time.monotonic() - t0


def test_misspelt_producer_key_stops_the_start_with_exit_2(tmp_path, shop_prefix, bootstrap):
    path = config(tmp_path, bootstrap, shop_prefix,
                  extra=f'[kafka.producer]\n"sasl.pasword" = "{SECRET}"\n')
    svc = Service(path, tmp_path / "svc.log")
    code, _ = run_until_exit(svc, 60)
    out = svc.log()
    assert code == 2, out
    assert ('config error: kafka.producer."sasl.pasword": librdkafka refused the settings of '
            'the dead-letter producer: No such configuration property: "sasl.pasword"') in out
    assert SECRET not in out  # the config line the CLI logs shows it as ***
    assert "'sasl.pasword': '***'" in out
    assert "worker 0 booted" not in out and "stopped cleanly" not in out


def test_a_worker_crashing_the_same_way_stops_the_service(tmp_path, shop_prefix, bootstrap,
                                                          workload_small):
    path = config(tmp_path, bootstrap, shop_prefix,
                  extra="[service]\nmax_worker_crashes = 3\n")
    produce_prefixed(bootstrap, shop_prefix, workload_small, with_bad=False)
    svc = Service(path, tmp_path / "svc.log")
    # every worker process raises at its first commit: a bug that meets each respawn
    code, took = run_until_exit(svc, 90, env={"AGGREGATOR_FAULTS": "worker_before_commit=1:raise"})
    out = svc.log()
    assert code == 2, out[-4000:]
    assert re.search(r"worker \d crashed 3 times in a row after booting, each time with the "
                     r"same error and no batch committed: InjectedFault: fault injected at "
                     r"worker_before_commit; stopping \(service.max_worker_crashes = 3\)", out)
    assert "stopped cleanly" not in out
    assert len(re.findall(r"worker \d \(pid \d+\) exited with code 1", out)) <= 2 * 3


def test_no_broker_says_so_once_and_exits_2_after_the_startup_timeout(tmp_path):
    path = config(tmp_path, "127.0.0.1:1", "nobroker.",
                  extra="[kafka]\nstartup_timeout_s = 3\n")
    svc = Service(path, tmp_path / "svc.log")
    code, took = run_until_exit(svc, 45)
    out = svc.log()
    assert code == 2, out
    assert took < 30, out
    assert len(re.findall("Kafka unreachable", out)) == 1, out
    assert ("no Kafka broker answered at 127.0.0.1:1 within 3 s (kafka.startup_timeout_s)"
            in out)
    assert "Connection refused" in out  # in the one warning and the fatal line, that's all
    assert len(re.findall("Connection refused", out)) <= 3, out
    assert "stopped cleanly" not in out


def test_missing_source_topics_are_named_once(tmp_path, broker, bootstrap):
    prefix = f"m{uuid.uuid4().hex[:8]}."
    topics = simulate.shop_topics(prefix)
    broker.create_topics(topics[:5] + [prefix + simulate.DEAD_LETTER_TOPIC], 2)
    path = config(tmp_path, bootstrap, prefix)
    svc = Service(path, tmp_path / "svc.log").start()
    try:
        svc.http_url()
        deadline = time.monotonic() + 30
        while "source topics missing" not in svc.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)
        out = svc.log()
        lines = [ln for ln in out.splitlines() if "source topics missing" in ln]
        assert len(lines) == 1, out
        missing = sorted(topics[5:])
        assert all(t in lines[0] for t in missing) and "waits for them" in lines[0]
        assert not any(t in lines[0] for t in topics[:5])
        assert len(re.findall("Unknown topic", out)) <= 1, out  # librdkafka's, deduplicated
        assert svc.stop() == 0
    finally:
        svc.discard()
