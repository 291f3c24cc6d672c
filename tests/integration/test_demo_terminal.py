"""`aggregator demo` in a terminal (a pseudo-terminal here), as a user runs it first: the
live table is not broken up by log lines, and the printed hint is a command that works."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shlex
import struct
import subprocess
import termios
import time

import pytest

from tests.support.cliproc import EXE, aggregator

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
LOG_LINE = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (worker-\d|supervisor|http) ")


def run_in_terminal(argv: list[str], cwd, timeout: float = 120) -> tuple[int, bytes]:
    """Run ``argv`` with stdin, stdout and stderr on one 100x40 pseudo-terminal; its exit
    code and every byte it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                            env=dict(os.environ, TERM="xterm-256color"))
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(10), bytes(out)


@pytest.fixture(scope="module")
def demo_in_terminal(tmp_path_factory):
    """One `demo --keep` run (its workers log the dead letters as warnings mid-run)."""
    cwd = tmp_path_factory.mktemp("demo-terminal")
    code, out = run_in_terminal([str(EXE), "demo", "--events", "2000", "--keep"], cwd)
    assert code == 0, out.decode(errors="replace")[-3000:]
    return cwd, out


@pytest.mark.slow
def test_log_lines_do_not_break_the_live_table(demo_in_terminal):
    _, out = demo_in_terminal
    starts = [m.start() for m in LOG_LINE.finditer(out)]
    assert len(starts) >= 8, out.decode(errors="replace")  # the 8 dead letters at least
    # Printed through the table's console, a line starts after the table was erased
    # (ESC[2K) or after a newline; written past it, it starts right after the table's
    # bottom-right corner.
    broken = [out[max(0, s - 30):s + 40] for s in starts if out[s - 1:s] not in (b"K", b"\n")]
    assert not broken, broken


@pytest.mark.slow
def test_the_printed_hint_is_a_working_command(demo_in_terminal):
    cwd, out = demo_in_terminal
    text = ANSI.sub(b"", out).replace(b"\r", b"").decode()
    m = re.search(r"\(try: (.+ get customer c-000001 --data-dir \S+)\)\n", text)
    assert m, text[-2000:]
    argv = shlex.split(m.group(1))
    assert argv[0] == str(EXE)  # the executable that ran, not a bare `aggregator`
    r = aggregator(*argv[1:], cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("{")
