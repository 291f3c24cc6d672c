"""A shard written with ``service.lmdb_sync = false`` (no fsync per commit): a process crash
loses nothing, an OS restart before a clean close is refused at the next open (store.py,
`_mark_unsynced`). Real LMDB files, real processes killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from aggregator import store
from aggregator.store import Shard, ShardError

WRITER = textwrap.dedent("""
    import os, sys
    from aggregator.store import Shard
    s = Shard(sys.argv[1], map_size=16 << 20, sync=False, writemap=sys.argv[2] == "1")
    b = s.begin()
    b.put_meta("crashed_writer", int(sys.argv[3]))
    b.commit()
    print("committed", flush=True)
    sys.stdin.read()  # killed here, never closed
""")


@pytest.fixture
def boot_id(tmp_path, monkeypatch):
    """This machine's boot id, in a file the test can change (a simulated OS restart)."""
    path = tmp_path / "boot_id"
    path.write_text("boot-1\n")
    monkeypatch.setattr(store, "BOOT_ID", path)
    return path


def crash_a_writer(path, writemap: bool, value: int, boot_id) -> None:
    """A process that commits without fsync and is SIGKILLed before it closes the shard."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    code = f"import aggregator.store as st, pathlib; st.BOOT_ID = pathlib.Path({str(boot_id)!r})\n"
    p = subprocess.Popen([sys.executable, "-c", code + WRITER, str(path), str(int(writemap)),
                          str(value)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert p.stdout.readline().strip() == b"committed"
        marks = list(path.glob(store.UNSYNCED + "*"))
        assert [m.name for m in marks] == [f"{store.UNSYNCED}{p.pid}"]
        assert marks[0].read_text().strip() == boot_id.read_text().strip()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


@pytest.mark.parametrize("writemap", [False, True])
def test_a_clean_close_leaves_no_marker(tmp_path, boot_id, writemap):
    s = Shard(tmp_path / "s", map_size=16 << 20, sync=False, writemap=writemap)
    assert [m.name for m in (tmp_path / "s").glob("unsynced.*")] == [f"unsynced.{os.getpid()}"]
    s.put_meta(x=1)
    s.close()
    assert list((tmp_path / "s").glob("unsynced.*")) == []
    boot_id.write_text("boot-2\n")  # a restart after a clean close: nothing to fear
    s = Shard(tmp_path / "s", map_size=16 << 20, sync=False, writemap=writemap)
    assert s.get_meta("x") == 1
    s.close()


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("writemap", [False, True])
def test_a_process_crash_keeps_every_commit(tmp_path, boot_id, writemap, sync):
    crash_a_writer(tmp_path / "s", writemap, 7, boot_id)
    s = Shard(tmp_path / "s", map_size=16 << 20, sync=sync, writemap=writemap)
    assert s.get_meta("crashed_writer") == 7
    mine = [] if sync else [f"unsynced.{os.getpid()}"]  # the dead writer's marker is gone
    assert [m.name for m in (tmp_path / "s").glob("unsynced.*")] == mine
    s.close()
    assert list((tmp_path / "s").glob("unsynced.*")) == []


@pytest.mark.parametrize("writemap", [False, True])
def test_an_os_restart_after_unsynced_commits_is_refused(tmp_path, boot_id, writemap):
    crash_a_writer(tmp_path / "s", writemap, 3, boot_id)
    boot_id.write_text("boot-2\n")  # the machine restarted before the shard was closed
    for sync in (False, True):
        with pytest.raises(ShardError, match="lmdb_sync = false.*restarted.*boot-1.*boot-2"):
            Shard(tmp_path / "s", map_size=16 << 20, sync=sync, writemap=writemap)
    # readers are not refused (the API can still show what is there), and the refusal
    # left no marker of its own
    r = Shard(tmp_path / "s", readonly=True)
    assert r.get_meta("crashed_writer") == 3
    r.close()
    marks = list((tmp_path / "s").glob("unsynced.*"))
    assert len(marks) == 1
    marks[0].unlink()  # the operator checked it and takes it as it is
    s = Shard(tmp_path / "s", map_size=16 << 20, sync=True, writemap=writemap)
    assert s.get_meta("crashed_writer") == 3
    s.close()


def test_a_live_writers_marker_is_left_alone(tmp_path, boot_id):
    """A fenced writer still running beside its replacement keeps its marker until it
    closes: the replacement does not take it for a dead one."""
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        (tmp_path / "s").mkdir()
        mark = tmp_path / "s" / f"unsynced.{live.pid}"
        mark.write_text("boot-1\n")
        s = Shard(tmp_path / "s", map_size=16 << 20, sync=True)
        assert mark.exists()
        s.close()
    finally:
        live.kill()
        live.wait()


def test_a_worker_refuses_the_shard_in_one_line(tmp_path, capfd):
    """The real worker process (worker_main) on a shard left unsynced before an OS restart:
    one error line naming the setting and the way out, no traceback, and FATAL_EXIT (the
    supervisor does not respawn it: the service stops, exit 2)."""
    import logging
    import multiprocessing

    from aggregator.protocol import FATAL_EXIT
    from aggregator.worker_process import worker_main
    from tests.test_worker import Cluster

    c = Cluster(tmp_path / "data", 1)
    try:
        shard = Shard(tmp_path / "data" / "shard-0", map_size=16 << 20, sync=False)
        shard.put_meta(x=1)
        shard.close()  # a clean close; then a marker of an earlier boot, as a crash leaves it
        (tmp_path / "data" / "shard-0" / "unsynced.4242").write_text("an-earlier-boot\n")
        p = multiprocessing.get_context("spawn").Process(
            target=worker_main, args=(c.cfg, 0, c.prefix, logging.INFO))
        p.start()
        p.join(120)
        assert p.exitcode == FATAL_EXIT
        err = capfd.readouterr().err
        lines = [ln for ln in err.splitlines() if "cannot start" in ln]
        assert len(lines) == 1, err[-3000:]
        assert "service.lmdb_sync = false" in lines[0] and "unsynced.4242" in lines[0]
        assert "Traceback" not in err
    finally:
        c.close()
