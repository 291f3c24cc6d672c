"""The user's first contact from a wheel: `pip install 'aggregator[demo]'` into a new virtual
environment, then `aggregator demo` in an empty directory (issue 11, bug 4: the example
config was not in the package).

The whole path (an isolated wheel build with its Cython compile, a new virtual environment,
the dependencies installed from the index) takes about a minute: it runs in long mode
(``AGGREGATOR_LONG_TESTS=1``). CI runs `test_demo_from_the_package_tree_in_an_empty_directory`
instead: the package tree exactly as the wheel lays it out (setuptools' ``build_py`` from
pyproject.toml's package list and package data, outside the checkout), with the compiled
modules of this checkout, and `aggregator demo` run from it in an empty directory. That is
what bug 4 was about (a file the package needs but does not ship); what it leaves to the long
test is the wheel's own build and the dependency metadata."""

from __future__ import annotations

import os
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
@pytest.mark.long
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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_from_the_package_tree_in_an_empty_directory(tmp_path):
    src, lib, empty = tmp_path / "src", tmp_path / "lib", tmp_path / "empty"
    empty.mkdir()
    # a copy of the sources without tests, bench, docs or build products; setuptools alone
    # (pyproject.toml's [tool.setuptools]), not setup.py: the test environment has no Cython
    # (the editable install built the extensions in an isolated environment)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.so",
        "*.c", "*.html", "tests", "bench", "docs"))
    _run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
          "-d", lib], cwd=src, timeout=120)
    pkg = lib / "aggregator"
    assert (pkg / "examples" / "shop.toml").is_file()  # bug 4
    assert not list(pkg.glob("*.c"))  # a build product: not shipped
    built = sorted(p.name.split(".")[0] for p in (ROOT / "aggregator").glob("_*.so"))
    assert built and sorted(p.stem for p in pkg.glob("_*.pyx")) == built
    for so in (ROOT / "aggregator").glob("_*.so"):  # what the wheel's build compiles
        shutil.copy(so, pkg / so.name)
    env = {"PYTHONPATH": str(lib), "PATH": os.environ.get("PATH", "")}
    r = _run([sys.executable, "-c", "import aggregator, aggregator.cli as c; "
              "print(aggregator.__file__); print(callable(c.main))"], cwd=empty, env=env)
    assert r.stdout.split() == [str(pkg / "__init__.py"), "True"]  # not the checkout's
    r = _run([sys.executable, "-m", "aggregator", "demo", "--events", "2000"], cwd=empty,
             env=env, timeout=120)
    assert "CHECK PASSED" in r.stdout, r.stdout
    assert list(empty.iterdir()) == []  # the demo's views went to a temporary dir
