"""A SIGKILLed instance's shared memory is removed by the next instance started on the
machine, whatever its data dir; a live instance's is never touched (segments.py)."""

from __future__ import annotations

import json
import os
import time

from aggregator.ring import SHM_DIR


def _inodes(svc) -> dict[str, int]:
    return {n: os.stat(os.path.join(SHM_DIR, n)).st_ino for n in svc.shm_segments()}


def test_killed_instance_segments_swept_by_another_data_dir(tmp_path, shop_prefix,
                                                            service_factory):
    dead = service_factory(shop_prefix, 2, data_dir=tmp_path / "a", name="a").start()
    live = service_factory(shop_prefix, 2, data_dir=tmp_path / "b", name="b").start()
    pids = dead.wait_workers(2)
    live.wait_workers(2)
    left = dead.shm_segments()
    # 2 inbound rings, 2 peer rings, control block, histogram, owner file
    assert len(left) == 7, left
    owner = [n for n in left if n.endswith(".owner")]
    rec = json.loads(open(os.path.join(SHM_DIR, owner[0])).read())
    assert rec["pid"] == dead.proc.pid and rec["data_dir"] == str((tmp_path / "a").resolve())
    before = _inodes(live)
    assert len(before) == 7

    dead.kill()  # SIGKILL: nothing unlinked
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead.shm_segments() == left, "the killed run's segments should still be there"

    third = service_factory(shop_prefix, 2, data_dir=tmp_path / "c", name="c").start()
    third.wait_workers(2)
    assert dead.shm_segments() == [], "the dead instance's segments were not swept"
    log = third.log()
    assert f"removed 6 shared-memory segments ({left[0][:16]}*) of a dead instance " \
           f"(pid {dead.proc.pid}" in log, log[-3000:]
    assert _inodes(live) == before, "a live instance's segments were touched"
    assert live.proc.poll() is None and len(live.worker_pids()) == 2

    assert live.stop() == 0, live.log()[-3000:]
    assert live.shm_segments() == [], "a clean stop leaves its owner file or segments"
    assert third.stop() == 0
    assert third.shm_segments() == []
