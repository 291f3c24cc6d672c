"""The user's first contact from a wheel: `pip install 'aggregator[demo]'` into a new virtual
environment, then `aggregator demo` in an empty directory (issue 11, bug 4: the example
config was not in the package)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.support.cliproc import ROOT


def _run(argv, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_from_a_wheel_in_an_empty_directory(tmp_path):
    dist, venv, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    src = tmp_path / "src"
    empty.mkdir()
    # the wheel, built as a release would be (isolated build: setuptools + Cython), from a
    # copy of the sources: no build products of the checkout (build/, *.so) get in
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.so",
        "*.c", "*.html", "tests", "bench", "docs"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src],
         timeout=240)
    (wheel,) = dist.glob("aggregator-*.whl")
    _run([sys.executable, "-m", "venv", venv], timeout=120)
    _run([venv / "bin" / "pip", "install", "-q", f"{wheel}[demo]"], timeout=240)
    r = _run([venv / "bin" / "aggregator", "demo", "--events", "2000"], cwd=empty,
             timeout=120)
    assert "CHECK PASSED" in r.stdout, r.stdout
    assert list(empty.iterdir()) == []  # the demo's views went to a temporary dir
    r = _run([venv / "bin" / "aggregator", "run", "--help"], cwd=empty)
    assert "--config" in r.stdout
