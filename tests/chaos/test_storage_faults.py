"""Storage faults (chaos items 10 and 12): a tiny LMDB map, a full data disk, a read-only one.

Real files on real filesystems mounted for the test (tmpfs and ext4 on a loop device: the
tests need root and skip otherwise), the real service against the real broker, started by a
`ChaosRun`; the runs that go to the end are verified by the harness (views and per-document
versions against the oracle, change events, dead letters, /dev/shm) and reported as a row of
its table.

- Full disk (tmpfs): the workload's first part is applied, a filler file takes every free
  block, the second part arrives. Every worker commit fails with ENOSPC: the workers say so
  once, keep heartbeating and retry; the metric and /readyz show it; nothing is
  acknowledged, so the group's Kafka offsets stay within what the shards hold. The filler
  is removed: the retries commit and the views equal the oracle, each event applied once.
- Read-only disk (ext4 `errors=remount-ro`, an error triggered through sysfs): the same
  while it lasts. Linux refuses ``mount -o remount,ro`` while LMDB holds its files open for
  writing (EBUSY), and an ext4 forced read-only by an error cannot be made writable again
  without unmounting it; so the recovery here is what an operator does: stop the service
  (it stops although a worker is blocked), fsck, mount, start again.
- Full map at service.lmdb_max_map_size: a fatal error naming the setting; nothing of the
  batch is kept; a restart with a larger maximum ends with exact views.
- Full disk when a shard is created: a clear error at boot (not a SIGBUS).

"Time to recover" is from the moment the space returns (the filler removed) or the service
is started again until the group's committed offsets move again.

Sizes are short for CI; `AGGREGATOR_CHAOS_STORAGE_EVENTS` raises them (the file systems and
the larger map grow with it, so that the first part fits and the disk still fills up).
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aggregator.devtools import simulate
from aggregator.store import Shard
from tests.support.chaos import Fault
from tests.support.service import Service

EVENTS = int(os.environ.get("AGGREGATOR_CHAOS_STORAGE_EVENTS", "24000"))
FIRST_PART = 0.3  # of the records, applied before the fault
# The shards take about 1 KiB an event (31 MiB at 24,000, 106 MiB at 100,000). The tmpfs
# (RAM, which the filler takes) gets twice that, at least 96 MiB: the first part fits before
# the filler and everything after it is removed. The ext4 image (a sparse file) and the map
# maximum of the restart that finishes grow from their CI sizes with the events.
SCALE = max(1.0, EVENTS / 24_000)
DISK_MB = max(96, math.ceil(EVENTS * 2 / 1024))
EXT4_MB = math.ceil(256 * SCALE)
BIG_MAP = math.ceil(256 * SCALE) << 20  # bytes
# With service.lmdb_writemap a shard allocates its whole map on disk (store._allocate_map):
# on these small file systems the maps start small and grow with the data (each grow
# allocates first: on the full disk it is the grow that fails)
SMALL_MAP = "lmdb_map_size = 4194304"


# ---- mounts ----------------------------------------------------------------------------------


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


def _umount(path: Path) -> None:
    if _run("umount", str(path), check=False).returncode != 0:
        _run("umount", "-l", str(path), check=False)


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: ``tmpfs(size_mb) -> mount point``; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(size_mb: int) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        r = _run("mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt),
                 check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        _umount(mnt)


class Ext4:
    """An ext4 file system in an image file on a loop device, `errors=remount-ro`."""

    def __init__(self, image: Path, mnt: Path):
        self.image, self.mnt = image, mnt
        self.device = ""

    def mount(self) -> None:
        r = _run("mount", "-t", "ext4", "-o", "loop,errors=remount-ro", str(self.image),
                 str(self.mnt), check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot mount an ext4 image on a loop device: {r.stderr.strip()}")
        self.device = _run("findmnt", "-n", "-o", "SOURCE", str(self.mnt)).stdout.strip()

    def trigger_error(self) -> None:
        """An ext4 error: with errors=remount-ro every write fails with EROFS from now on."""
        Path(f"/sys/fs/ext4/{os.path.basename(self.device)}/trigger_fs_error").write_text("1")

    def repair(self) -> None:
        """What the operator does: unmount, fsck, mount again."""
        _umount(self.mnt)
        r = _run("e2fsck", "-f", "-y", str(self.image), check=False)
        assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: errors corrected
        self.mount()


@pytest.fixture
def ext4(tmp_path):
    for tool in ("mkfs.ext4", "e2fsck", "findmnt", "losetup"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    image, mnt = tmp_path / "ext4.img", tmp_path / "ext4"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(EXT4_MB << 20)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    fs = Ext4(image, mnt)
    fs.mount()
    if not Path(f"/sys/fs/ext4/{os.path.basename(fs.device)}/trigger_fs_error").exists():
        _umount(mnt)
        pytest.skip("this kernel has no /sys/fs/ext4/<dev>/trigger_fs_error")
    yield fs
    _umount(mnt)


def fill(mnt: Path) -> Path:
    """A file taking every free block of the file system."""
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    _run("fallocate", "-l", str(st.f_bavail * st.f_frsize), str(filler))
    with open(filler, "ab", buffering=0) as f:  # whatever fallocate's rounding left
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    return filler


# ---- the service ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workload():
    return simulate.generate(11, EVENTS)


def service_config(*lines: str) -> str:
    """Extra [service] settings (TOML lines) for a ChaosRun's config."""
    return "[service]\n" + "".join(f"{line}\n" for line in lines)


def wait_log(svc: Service, pattern: str, timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, svc.log())
        if m:
            return m
        assert svc.proc.poll() is None, f"service exited:\n{svc.log()[-5000:]}"
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in the log:\n{svc.log()[-5000:]}")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def durable_offsets(data_dir: Path) -> dict[tuple[str, int], list[int | None]]:
    """Per partition, each shard's stored through-offset (None: nothing stored)."""
    shards = []
    for path in sorted(Path(data_dir).glob("shard-*")):
        s = Shard(path, readonly=True)
        try:
            shards.append(s.offsets())
        finally:
            s.close()
    tps = {tp for offs in shards for tp in offs}
    return {tp: [offs.get(tp) for offs in shards] for tp in tps}


def assert_commits_within_durable(svc: Service, data_dir: Path) -> dict:
    """The group's committed offset of every partition is at most the first offset some
    shard has not applied: a restart (which starts from the shards) loses nothing."""
    durable = durable_offsets(data_dir)
    committed = svc.committed()
    for tp, off in committed.items():
        if off < 0:
            continue  # nothing committed
        shards = durable.get(tp)
        assert shards is not None and None not in shards, (tp, off, shards)
        assert off <= min(shards) + 1, f"{tp}: committed {off} beyond durable {shards}"
    return committed


def metric(text: str, name: str) -> dict[str, float]:
    """{worker: value} of a per-worker metric in Prometheus text format."""
    return {m[1]: float(m[2]) for m in re.finditer(
        rf'^{name}{{worker="(\d+)"}} (\S+)$', text, re.M)}


# ---- 12. the data disk full, or read-only ------------------------------------------------------


def block_the_disk(run, svc: Service, kind: str, action, code: int, detail: str) -> Fault:
    """Inject `action` (from then on the data disk refuses its writes with errno `code`;
    `kind` is how the service names it), produce the rest of the workload and check the
    blocked service: a worker says so, /readyz answers 503, the metrics show it; it stays
    alive past its heartbeat timeout, acknowledges nothing more, and the group's offsets stay
    within what the shards hold. Returns the fault, whose recovery the caller measures."""
    url = svc.http_url()
    fault = run.fault(kind, action, detail=detail, measure=False)
    t_fault = time.monotonic()
    run.produce(FIRST_PART, 1.0)
    m = wait_log(svc, rf"worker (\d): {kind}: (\S+) \({os.strerror(code)}\); "
                      r"nothing of the batch was kept")
    assert m[2] == str(run.data_dir / f"shard-{m[1]}")

    # blocked: alive, heartbeating, retrying, visible; nothing acknowledged
    status, body = http_get(url + "/readyz")
    assert status == 503 and f"data disk refuses its writes ({errno.errorcode[code]}" in body, \
        body
    text = http_get(url + "/metrics")[1]
    assert metric(text, "aggregator_storage_blocked")[m[1]] == 1.0
    assert metric(text, "aggregator_storage_errors_total")[m[1]] >= 1
    time.sleep(1)  # acks of batches committed before the fault are committed
    committed = assert_commits_within_durable(svc, run.data_dir)
    time.sleep(max(0.0, t_fault + 6 - time.monotonic()))  # > heartbeat_timeout_ms
    assert svc.proc.poll() is None
    assert svc.committed() == committed  # nothing more acknowledged while blocked
    assert_commits_within_durable(svc, run.data_dir)
    assert run.committed_total() < run.total()
    log = svc.log()
    assert "missed its heartbeat" not in log and "exited with code" not in log, log[-3000:]
    assert log.count(kind) <= 2 * 2  # once per worker (+ once if it changed)
    return fault


def test_disk_full_blocks_then_recovers(tmpfs, workload, chaos):
    mnt = tmpfs(DISK_MB)
    run = chaos(workload, name="data disk full, then space returns", data_dir=mnt / "data")
    run.produce(0, FIRST_PART)
    svc = run.start(extra=service_config("heartbeat_timeout_ms = 3000", SMALL_MAP))
    run.wait_fraction(1.0, timeout=120)

    fault = block_the_disk(run, svc, "data disk full", lambda: fill(mnt), errno.ENOSPC,
                           detail=f"tmpfs {DISK_MB} MiB")
    assert "cannot write the status file" in svc.log()

    before = run.committed_total()
    fault.at = time.monotonic()  # space again: the retries commit
    (mnt / "filler").unlink()
    run.measure_recovery(fault, before)
    wait_log(svc, r"is writable again: the batch committed after \d+ retries")
    url = svc.http_url()
    deadline = time.monotonic() + 15  # the status file is rewritten every 0.5 s
    while (got := http_get(url + "/readyz"))[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got[0] == 200, got[1]
    assert metric(http_get(url + "/metrics")[1], "aggregator_storage_blocked") == \
        {"0": 0.0, "1": 0.0}
    report = run.finish(timeout=120)
    report.assert_ok()


def test_read_only_disk_blocks_then_restart_after_repair(ext4, workload, chaos):
    run = chaos(workload, name="data disk read-only, then fsck and restart",
                data_dir=ext4.mnt / "data")
    run.produce(0, FIRST_PART)
    svc = run.start(extra=service_config("heartbeat_timeout_ms = 3000",
                                         "shutdown_timeout_ms = 3000", SMALL_MAP))
    run.wait_fraction(1.0, timeout=120)

    fault = block_the_disk(run, svc, "data disk read-only", ext4.trigger_error, errno.EROFS,
                           detail=f"ext4 errors=remount-ro, {EXT4_MB} MiB")

    # the operator stops the service (a blocked worker does not hold the stop up for long)
    t0 = time.monotonic()
    assert svc.stop(timeout=60) == 0, svc.log()[-3000:]
    assert time.monotonic() - t0 < 30
    assert_commits_within_durable(svc, run.data_dir)
    before = run.committed_total()
    assert before < run.total()

    ext4.repair()
    fault.at = time.monotonic()  # the service started again on the repaired disk
    run.start(extra=service_config(SMALL_MAP))
    run.measure_recovery(fault, before)
    report = run.finish(timeout=90)
    report.assert_ok()


# ---- 10. the LMDB map full at its maximum -------------------------------------------------------


def test_map_full_at_the_maximum_then_restart_with_more(workload, chaos):
    run = chaos(workload, name="LMDB map full at its maximum, then restart with more")
    run.produce()
    # some batches fit; the workload takes ~6 MiB per shard (format 5: documents appended,
    # dedup ids appended), so 4 MiB runs full part-way
    svc = run.start(extra=service_config("lmdb_map_size = 1048576",
                                         "lmdb_max_map_size = 4194304"))
    assert svc.proc.wait(120) == 2, svc.log()[-3000:]
    fault = run.fault("LMDB map full", lambda: None, detail="lmdb_max_map_size = 4 MiB",
                      measure=False)
    log = svc.log()
    m = re.search(r"(\S+): LMDB map full at service\.lmdb_max_map_size \(4194304 bytes\): "
                  r"raise service\.lmdb_max_map_size and restart; nothing of the batch was "
                  r"kept", log)
    assert m, log[-3000:]
    assert "stopped with a fatal error" in log

    # offsets: the group's within what the shards hold; the shards short of the end
    assert_commits_within_durable(svc, run.data_dir)
    durable = durable_offsets(run.data_dir)
    applied = sum(min(-1 if o is None else o for o in durable.get(tp, [None])) + 1
                  for tp in run.targets)
    assert 0 < applied < run.total()

    before = run.committed_total()
    fault.at = time.monotonic()  # started again with a larger maximum
    run.start(extra=service_config("lmdb_map_size = 1048576", f"lmdb_max_map_size = {BIG_MAP}"))
    run.measure_recovery(fault, before)
    report = run.finish(timeout=90)
    assert "LMDB map grown" in run.svc.log()
    report.assert_ok()


# ---- a full disk when a shard is created ---------------------------------------------------------


def test_disk_full_at_boot_is_a_clear_error(tmpfs, workload, chaos):
    mnt = tmpfs(8)
    data_dir = mnt / "data"
    data_dir.mkdir()
    fill(mnt)
    run = chaos(workload, name="data disk full at boot", data_dir=data_dir, workers=1,
                extra_config=service_config("max_boot_failures = 2")).produce(0, 0)
    svc = run.start()
    assert svc.proc.wait(60) == 2, svc.log()[-3000:]
    log = svc.log()
    assert re.search(rf"worker 0 cannot start: data disk full: {data_dir}/shard-0\S* "
                     r"\(No space left on device\)", log), log[-3000:]
    assert "failed to boot 2 times in a row" in log
    assert "code -7" not in log  # SIGBUS
