"""Storage faults (chaos items 10 and 12): a tiny LMDB map, a full data disk, a read-only one.

Real files on real filesystems mounted for the test (tmpfs and ext4 on a loop device: the
tests need root and skip otherwise), the real service against the real broker.

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
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aggregator import simulate
from aggregator.store import Shard
from tests.integration.service import Service, produce_tracked, write_config

EVENTS = 24_000
FIRST_PART = 0.3  # of the records, applied before the fault


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
        f.truncate(256 << 20)
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


@pytest.fixture(scope="module")
def expected(workload):
    return simulate.expected_views(workload), simulate.expected_versions(workload)


@pytest.fixture
def services():
    started: list[Service] = []
    yield started
    for svc in started:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill()


def start(services, tmp_path, bootstrap, prefix, group, data_dir, *, name="svc", workers=2,
          service: str = "") -> Service:
    """`aggregator run` with extra [service] settings (TOML lines)."""
    path = write_config(tmp_path / f"{name}.toml", bootstrap=bootstrap, prefix=prefix,
                        group=group, data_dir=data_dir, workers=workers,
                        extra=f"[service]\n{service}\n")
    svc = Service(path, tmp_path / f"{name}.log").start()
    services.append(svc)
    return svc


class Producer:
    """Produces records to the test's topics and notes every partition's end offset from
    the delivery reports (the test broker may under-report high watermarks)."""

    def __init__(self, bootstrap: str, prefix: str):
        self.bootstrap, self.prefix = bootstrap, prefix
        self.ends = {(t, p): 0 for t in simulate.shop_topics(prefix) for p in range(4)}

    def produce(self, records: list) -> dict[tuple[str, int], int]:
        """Produce, then return the end offsets of everything produced so far."""
        records = [(self.prefix + t, k, v, h) for t, k, v, h in records]
        return dict(produce_tracked(self.bootstrap, records, self.ends))


def split(workload) -> tuple[list, list]:
    cut = int(len(workload.records) * FIRST_PART)
    return workload.records[:cut], workload.records[cut:]


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


def read_documents(data_dir: Path) -> dict[str, dict[str, dict]]:
    """{view: {key: {"v": version, "d": document or None}}} from every shard."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(Path(data_dir).glob("shard-*")):
        s = Shard(path, readonly=True)
        try:
            for view, key, rec in s.documents(s.get_meta("views")):
                out.setdefault(view, {})[key] = rec
        finally:
            s.close()
    return out


def assert_exact(data_dir: Path, expected) -> None:
    """Views equal the oracle, and every document's version (its count of updates) equals
    the number of events that update it: nothing lost, nothing applied twice."""
    views, versions = expected
    docs = read_documents(data_dir)
    for view, want in views.items():
        got = {k: r["d"] for k, r in docs.get(view, {}).items() if r["d"] is not None}
        wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        assert not wrong, f"{view}: {len(wrong)} documents differ, e.g. {wrong[0]}"
    for view, want in versions.items():
        got = {k: r["v"] for k, r in docs.get(view, {}).items()}
        wrong = sorted(k for k in want if got.get(k) != want[k])
        assert not wrong, (f"{view}: {len(wrong)} versions differ, e.g. {wrong[0]}: "
                           f"{got.get(wrong[0])} != {want[wrong[0]]}")


def metric(text: str, name: str) -> dict[str, float]:
    """{worker: value} of a per-worker metric in Prometheus text format."""
    return {m[1]: float(m[2]) for m in re.finditer(
        rf'^{name}{{worker="(\d+)"}} (\S+)$', text, re.M)}


# ---- 12. the data disk full, then space again ---------------------------------------------------


def test_disk_full_blocks_then_recovers(tmpfs, tmp_path, workload, expected, shop_prefix,
                                        bootstrap, group_id, services):
    mnt = tmpfs(96)
    data_dir = mnt / "data"
    first, second = split(workload)
    producer = Producer(bootstrap, shop_prefix)
    targets = producer.produce(first)
    svc = start(services, tmp_path, bootstrap, shop_prefix, group_id, data_dir,
                service="heartbeat_timeout_ms = 3000")
    url = svc.http_url()
    svc.wait_committed(targets, timeout=120)

    filler = fill(mnt)
    t_fault = time.monotonic()
    targets = producer.produce(second)
    m = wait_log(svc, r"worker (\d): data disk full: (\S+) \(No space left on device\); "
                      r"nothing of the batch was kept")
    assert m[2] == str(data_dir / f"shard-{m[1]}")

    # blocked: alive, heartbeating, retrying, visible; nothing acknowledged
    status, body = http_get(url + "/readyz")
    assert status == 503 and "data disk refuses its writes (ENOSPC" in body, body
    text = http_get(url + "/metrics")[1]
    assert metric(text, "aggregator_storage_blocked")[m[1]] == 1.0
    assert metric(text, "aggregator_storage_errors_total")[m[1]] >= 1
    time.sleep(1)  # acks of batches committed before the disk filled up are committed
    committed = assert_commits_within_durable(svc, data_dir)
    time.sleep(max(0.0, t_fault + 6 - time.monotonic()))  # > heartbeat_timeout_ms
    assert svc.proc.poll() is None
    assert svc.committed() == committed  # nothing more acknowledged while blocked
    assert_commits_within_durable(svc, data_dir)
    assert sum(committed.values()) < sum(targets.values())
    log = svc.log()
    assert "missed its heartbeat" not in log and "exited with code" not in log, log[-3000:]
    assert log.count("data disk full") <= 2 * 2  # once per worker (+ once if it changed)
    assert "cannot write the status file" in log

    filler.unlink()  # space again: the retries commit
    svc.wait_committed(targets, timeout=60)
    wait_log(svc, r"is writable again: the batch committed after \d+ retries")
    deadline = time.monotonic() + 15  # the status file is rewritten every 0.5 s
    while (got := http_get(url + "/readyz"))[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got[0] == 200, got[1]
    assert metric(http_get(url + "/metrics")[1], "aggregator_storage_blocked") == \
        {"0": 0.0, "1": 0.0}
    assert svc.stop() == 0, svc.log()[-3000:]
    assert svc.shm_segments() == []
    assert_exact(data_dir, expected)


# ---- 12. the data disk read-only ---------------------------------------------------------------


def test_read_only_disk_blocks_then_restart_after_repair(ext4, tmp_path, workload, expected,
                                                         shop_prefix, bootstrap, group_id,
                                                         services):
    data_dir = ext4.mnt / "data"
    first, second = split(workload)
    producer = Producer(bootstrap, shop_prefix)
    targets = producer.produce(first)
    svc = start(services, tmp_path, bootstrap, shop_prefix, group_id, data_dir,
                service="heartbeat_timeout_ms = 3000\nshutdown_timeout_ms = 3000")
    url = svc.http_url()
    svc.wait_committed(targets, timeout=120)

    ext4.trigger_error()
    targets = producer.produce(second)
    m = wait_log(svc, r"worker (\d): data disk read-only: (\S+) \(Read-only file system\); "
                      r"nothing of the batch was kept")
    assert m[2] == str(data_dir / f"shard-{m[1]}")
    status, body = http_get(url + "/readyz")
    assert status == 503 and "EROFS" in body, body
    assert metric(http_get(url + "/metrics")[1], "aggregator_storage_blocked")[m[1]] == 1.0
    time.sleep(1)  # acks of batches committed before the error are committed
    committed = assert_commits_within_durable(svc, data_dir)
    time.sleep(4)  # > heartbeat_timeout_ms
    assert svc.proc.poll() is None
    assert svc.committed() == committed
    assert "missed its heartbeat" not in svc.log()

    # the operator stops the service (a blocked worker does not hold the stop up for long)
    t0 = time.monotonic()
    assert svc.stop(timeout=60) == 0, svc.log()[-3000:]
    assert time.monotonic() - t0 < 30
    assert_commits_within_durable(svc, data_dir)
    assert sum(svc.committed().values()) < sum(targets.values())

    ext4.repair()
    again = start(services, tmp_path, bootstrap, shop_prefix, group_id, data_dir, name="again")
    again.wait_committed(targets, timeout=90)
    assert again.stop() == 0, again.log()[-3000:]
    assert_exact(data_dir, expected)


# ---- 10. the LMDB map full at its maximum -------------------------------------------------------


def test_map_full_at_the_maximum_then_restart_with_more(tmp_path, workload, expected,
                                                        shop_prefix, bootstrap, group_id,
                                                        services):
    data_dir = tmp_path / "data"
    targets = Producer(bootstrap, shop_prefix).produce(workload.records)
    small = "lmdb_map_size = 1048576\nlmdb_max_map_size = 8388608"  # some batches fit
    svc = start(services, tmp_path, bootstrap, shop_prefix, group_id, data_dir, service=small)
    assert svc.proc.wait(120) == 2, svc.log()[-3000:]
    log = svc.log()
    m = re.search(r"(\S+): LMDB map full at service\.lmdb_max_map_size \(8388608 bytes\): "
                  r"raise service\.lmdb_max_map_size and restart; nothing of the batch was "
                  r"kept", log)
    assert m, log[-3000:]
    assert "stopped with a fatal error" in log

    # offsets: the group's within what the shards hold; the shards short of the end
    assert_commits_within_durable(svc, data_dir)
    durable = durable_offsets(data_dir)
    applied = sum(min(-1 if o is None else o for o in durable.get(tp, [None])) + 1
                  for tp in targets)
    assert 0 < applied < sum(targets.values())

    again = start(services, tmp_path, bootstrap, shop_prefix, group_id, data_dir, name="again",
                  service="lmdb_map_size = 1048576\nlmdb_max_map_size = 268435456")
    again.wait_committed(targets, timeout=90)
    assert again.stop() == 0, again.log()[-3000:]
    assert "LMDB map grown" in again.log()
    assert_exact(data_dir, expected)


# ---- a full disk when a shard is created ---------------------------------------------------------


def test_disk_full_at_boot_is_a_clear_error(tmpfs, tmp_path, shop_prefix, bootstrap, group_id,
                                            services):
    mnt = tmpfs(8)
    data_dir = mnt / "data"
    data_dir.mkdir()
    fill(mnt)
    svc = start(services, tmp_path, bootstrap, shop_prefix, group_id, data_dir, workers=1,
                service="max_boot_failures = 2")
    assert svc.proc.wait(60) == 2, svc.log()[-3000:]
    log = svc.log()
    assert re.search(rf"worker 0 cannot start: data disk full: {data_dir}/shard-0\S* "
                     r"\(No space left on device\)", log), log[-3000:]
    assert "failed to boot 2 times in a row" in log
    assert "code -7" not in log  # SIGBUS
