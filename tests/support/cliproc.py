"""Run the installed `aggregator` command as a real process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop.toml"
# the console script of the environment running the tests (.venv/bin/aggregator)
EXE = Path(sys.executable).with_name("aggregator")


def aggregator(*args, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
    """``aggregator ARGS`` with text output (undecodable bytes replaced), never raising on
    a non-zero exit."""
    argv = [str(EXE) if EXE.exists() else sys.executable]
    if not EXE.exists():
        argv += ["-m", "aggregator"]
    argv += [a if isinstance(a, (str, bytes)) else str(a) for a in args]
    return subprocess.run(argv, cwd=cwd, env=dict(os.environ, **(env or {})),
                          capture_output=True, timeout=timeout, text=True, errors="replace")


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The stderr of a refused command: no traceback, one line saying what is wrong
    (click's usage errors add a `Usage:`/`Try` preamble and a blank line before it)."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines()
             if ln.strip() and not ln.startswith(("Usage:", "Try "))]
    assert len(lines) == 1, r.stderr
    return lines[0]
