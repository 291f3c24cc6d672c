"""segments.py: owner files of shared-memory prefixes, and the sweep of dead owners' segments.
Real processes and real files in /dev/shm (prefixes of random hex, removed at teardown)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from aggregator import segments
from aggregator.ring import SHM_DIR, cleanup_stale
from aggregator.segments import SegmentOwner, process_start_time, sweep_orphans


@pytest.fixture
def prefix():
    p = "agg-" + secrets.token_hex(6)
    yield p
    cleanup_stale(p)


def _segments(prefix: str) -> list[str]:
    return sorted(e for e in os.listdir(SHM_DIR) if e.startswith(prefix))


def _fake_instance(prefix: str, record: dict | None, names=("-ctl", "-s0", "-s1")) -> None:
    """An owner file with `record` (nobody holds its lock) and some segments."""
    for n in names:
        with open(os.path.join(SHM_DIR, prefix + n), "wb") as f:
            f.write(b"x" * 64)
    with open(segments.owner_path(prefix), "w") as f:
        if record is not None:
            f.write(json.dumps(record))


def _dead_pid() -> tuple[int, int]:
    """The pid and start time of a process that ran and is gone."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = process_start_time(p.pid)
    p.kill()
    p.wait()
    return p.pid, start


def test_start_time_is_field_22():
    with open("/proc/self/stat") as f:
        want = int(f.read().rsplit(")", 1)[1].split()[19])
    assert process_start_time(os.getpid()) == want
    pid, _ = _dead_pid()
    assert process_start_time(pid) is None


def test_dead_owner_swept_live_owner_kept(prefix):
    dead = prefix
    live = "agg-" + secrets.token_hex(6)
    try:
        pid, start = _dead_pid()
        _fake_instance(dead, {"pid": pid, "start": start, "data_dir": "/x"})
        owner = SegmentOwner.acquire(live, "/y")
        for n in ("-ctl", "-s0"):
            open(os.path.join(SHM_DIR, live + n), "wb").close()
        swept = sweep_orphans(keep="agg-000000000000")
        assert swept[dead]["removed"] == [dead + "-ctl", dead + "-s0", dead + "-s1"]
        assert swept[dead]["pid"] == pid
        assert _segments(dead) == []  # the owner file too
        assert live not in swept
        assert _segments(live) == [live + "-ctl", live + "-s0", live + ".owner"]
        owner.release()
        assert _segments(live) == [live + "-ctl", live + "-s0"]
    finally:
        cleanup_stale(live)


def test_reused_pid_is_told_apart(prefix):
    """The recorded pid runs, but it is another process (another start time): swept. With
    the same start time: kept, even with the lock free."""
    me, start = os.getpid(), process_start_time(os.getpid())
    _fake_instance(prefix, {"pid": me, "start": start - 1, "data_dir": "/x"})
    assert prefix in sweep_orphans(keep="agg-000000000000")
    assert _segments(prefix) == []
    _fake_instance(prefix, {"pid": me, "start": start, "data_dir": "/x"})
    assert prefix not in sweep_orphans(keep="agg-000000000000")
    assert len(_segments(prefix)) == 4


def test_locked_owner_file_is_never_swept(prefix):
    """A live owner holds the lock: its segments stay even if its record were wrong; and an
    owner file without a record (an owner about to write it) is left alone."""
    pid, start = _dead_pid()
    _fake_instance(prefix, {"pid": pid, "start": start, "data_dir": "/x"})
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({segments.owner_path(prefix)!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert prefix not in sweep_orphans(keep="agg-000000000000")
        assert len(_segments(prefix)) == 4
    finally:
        holder.kill()
        holder.wait()
    assert prefix in sweep_orphans(keep="agg-000000000000")  # the lock went with it
    _fake_instance(prefix, None)
    assert prefix not in sweep_orphans(keep="agg-000000000000")
    assert len(_segments(prefix)) == 4


def test_acquire_waits_for_a_sweep_and_takes_a_new_file(prefix):
    """A start on the same data dir while a sweep holds the old owner file: it waits, then
    finds the file unlinked and takes a fresh one (never the swept inode)."""
    pid, start = _dead_pid()
    _fake_instance(prefix, {"pid": pid, "start": start, "data_dir": "/x"})
    path = segments.owner_path(prefix)
    sweeper = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, time\n"
         f"fd = os.open({path!r}, os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\ntime.sleep(0.5)\n"
         f"os.unlink({path!r})\n"],
        stdout=subprocess.PIPE)
    try:
        assert sweeper.stdout.readline().strip() == b"locked"
        t0 = time.monotonic()
        owner = SegmentOwner.acquire(prefix, "/z")
        assert time.monotonic() - t0 >= 0.3
        assert segments._still_linked(owner.fd, path)  # not the swept (unlinked) file
        rec = json.loads(open(path).read())
        assert rec == {"pid": os.getpid(), "start": process_start_time(os.getpid()),
                       "data_dir": "/z"}
        owner.release()
        assert not os.path.exists(path)
    finally:
        sweeper.wait(10)
