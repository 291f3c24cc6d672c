"""logs.py: the two log formats, and the umask setting's parsing (config.parse_umask)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from aggregator import logs
from aggregator.config import ConfigError, load_config

from .support.cliproc import SHOP


def _emit(fmt: str, role: str, worker=None, exc: bool = False) -> str:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("INFO", fmt, role, worker, stream=stream)
        assert len(root.handlers) == 1
        lg = logging.getLogger("aggregator.test")
        if exc:
            try:
                raise ValueError("boom\nsecond line")
            except ValueError:
                lg.exception("failed: %s", "x")
        else:
            lg.info("hello %s", "wörld")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    return stream.getvalue()


def test_json_one_object_per_line():
    out = _emit("json", "worker", 3)
    (line,) = out.splitlines()
    doc = json.loads(line)
    assert doc["message"] == "hello wörld" and doc["level"] == "INFO"
    assert (doc["role"], doc["worker"], doc["logger"]) == ("worker", 3, "aggregator.test")
    assert doc["time"].endswith("Z") and "exception" not in doc


def test_json_exception_stays_on_the_line():
    out = _emit("json", "supervisor", exc=True)
    (line,) = out.splitlines()
    doc = json.loads(line)
    assert doc["worker"] is None and doc["message"] == "failed: x"
    assert "Traceback" in doc["exception"] and "ValueError: boom\nsecond line" in doc["exception"]


def test_text_names_the_process():
    assert " worker-2 INFO aggregator.test: hello wörld" in _emit("text", "worker", 2)
    assert " http INFO aggregator.test: " in _emit("text", "http")
    with pytest.raises(ValueError):
        logs.formatter("xml", "http")


@pytest.mark.parametrize("value, mask", [("0077", 0o77), ("027", 0o27), ("0", 0), ("777", 0o777)])
def test_umask_octal_string(value, mask):
    cfg = load_config(SHOP, {"service.umask": value})
    assert cfg.service.umask == mask


def test_umask_default_and_refused():
    assert load_config(SHOP).service.umask == 0o077
    for bad in (27, "0999", "rw", "01777", True):
        with pytest.raises(ConfigError, match=r"service\.umask: .*octal string"):
            load_config(SHOP, {"service.umask": bad})
    with pytest.raises(ConfigError, match=r"service\.umask: .*\(got '9'\)"):
        load_config(SHOP, env={"AGGREGATOR__SERVICE__UMASK": "9"})
