"""Tests for aggregator.ring: SPSC shared-memory rings and shared counters.

Single-process unit tests first, then tests with real separate processes
(``subprocess`` running small child scripts, and one ``multiprocessing``
'spawn' child): a 200k-message producer/consumer pair, a SIGKILLed consumer
replaced by a new one, leak clean-up after a SIGKILLed producer, and an
attaching child that must neither unlink the segment nor print warnings.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import xxhash

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aggregator.ring import (  # noqa: E402
    SHM_DIR,
    Ring,
    RingCorruptError,
    SharedCounters,
    cleanup_stale,
    segment_prefix,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="rings live in /dev/shm (Linux)"
)


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture
def prefix():
    """A unique segment prefix; every segment starting with it is removed after the test."""
    p = f"agg-test-{uuid.uuid4().hex[:12]}"
    yield p
    cleanup_stale(p)


@pytest.fixture
def ring_factory(prefix):
    made = []

    def make(capacity=4096, role="r"):
        ring = Ring.create(f"{prefix}-{role}{len(made)}", capacity)
        made.append(ring)
        return ring

    yield make
    for ring in made:
        ring.close()
        ring.unlink()


def shm_names(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_child(code: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def run_child(code: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


# Sequenced, self-checking messages used by the multi-process tests:
# u64 seq | u64 xxh64(body) | body (random bytes, 0..max_body long).
def make_msg(seq: int, rnd: random.Random, max_body: int) -> bytes:
    body = rnd.randbytes(rnd.randint(0, max_body))
    return seq.to_bytes(8, "little") + xxhash.xxh64_intdigest(body).to_bytes(8, "little") + body


def check_msg(msg: bytes) -> int:
    assert len(msg) >= 16, f"short message ({len(msg)} bytes)"
    body = msg[16:]
    assert xxhash.xxh64_intdigest(body) == int.from_bytes(msg[8:16], "little"), "torn message"
    return int.from_bytes(msg[:8], "little")


# ---------------------------------------------------------------------------
# single process: Ring


def test_fifo_order(ring_factory):
    ring = ring_factory(4096)
    msgs = [f"message {i}".encode() * (i % 7) for i in range(50)]
    for m in msgs:
        assert ring.try_put(m)
    assert [ring.try_get() for _ in msgs] == msgs
    assert ring.try_get() is None
    assert ring.used_bytes == 0


def test_accepts_bytes_like_payloads(ring_factory):
    ring = ring_factory(4096)
    assert ring.try_put(b"abc")
    assert ring.try_put(bytearray(b"defg"))
    assert ring.try_put(memoryview(b"xhijx")[1:4])
    words = memoryview(bytearray(range(8))).cast("I")  # 2 items, 8 bytes
    assert ring.try_put(words)
    assert ring.try_put(b"")
    assert ring.get_many(10) == [b"abc", b"defg", b"hij", bytes(range(8)), b""]


def test_capacity_rounding_and_properties(ring_factory):
    ring = ring_factory(3000)
    assert ring.capacity == 4096
    assert ring.max_message == 4096 // 2 - 4
    assert ring.name.endswith("-r0")
    assert (ring.used_bytes, ring.free_bytes, ring.fill) == (0, 4096, 0.0)
    assert ring.try_put(b"x" * 100)  # frame: 4 + 100 -> padded to 104
    assert ring.used_bytes == 104
    assert ring.free_bytes == 4096 - 104
    assert ring.fill == pytest.approx(104 / 4096)
    assert ring_factory(1).capacity == 64  # minimum


def test_wraparound_random_sizes_many_laps(ring_factory):
    ring = ring_factory(1024)
    rnd = random.Random(1234)
    model: collections.deque[bytes] = collections.deque()
    for _ in range(60_000):
        if rnd.random() < 0.52:
            # mostly small, sometimes up to the max message size
            size = rnd.randint(0, 40) if rnd.random() < 0.7 else rnd.randint(0, ring.max_message)
            payload = rnd.randbytes(size)
            frame = (size + 4 + 7) & ~7
            room = ring.capacity - ring.head % ring.capacity
            fits = frame <= ring.free_bytes if frame <= room else room + frame <= ring.free_bytes
            assert ring.try_put(payload) == fits
            if fits:
                model.append(payload)
        elif rnd.random() < 0.5:
            got = ring.try_get()
            assert got == (model.popleft() if model else None)
        else:
            k = rnd.randint(1, 8)
            got = ring.get_many(k)
            want = [model.popleft() for _ in range(min(k, len(model)))]
            assert got == want
        assert ring.used_bytes <= ring.capacity
    assert ring.get_many(10**6) == list(model)
    assert ring.head > 100 * ring.capacity, "expected many laps around the ring"
    assert ring.head == ring.tail


def test_empty_ring_accepts_max_message_at_every_offset(ring_factory):
    ring = ring_factory(256)
    big = bytes(range(256))[: ring.max_message]
    for step in range(ring.capacity // 8 + 1):
        assert ring.try_put(big), f"empty ring refused a max-size message at step {step}"
        assert ring.try_get() == big
        assert ring.try_put(b"")  # advance the indices by one 8-byte frame
        assert ring.try_get() == b""


def test_full_ring_returns_false(ring_factory):
    ring = ring_factory(1024)
    payload = b"p" * 60  # frame = 64 bytes -> exactly 16 fit
    n = 0
    while ring.try_put(payload):
        n += 1
        assert n <= 1024
    assert n == 16
    assert ring.free_bytes == 0 and ring.fill == 1.0
    assert not ring.try_put(b"")
    assert not ring.put(payload, timeout=0.02)
    assert ring.try_get() == payload
    assert ring.try_put(payload)  # space again
    assert not ring.try_put(payload)
    assert len(ring.get_many(100)) == 16


def test_full_ring_whole_message_or_nothing(ring_factory):
    ring = ring_factory(256)
    assert ring.try_put(b"a" * 100)  # 104
    assert ring.try_put(b"b" * 100)  # 208
    before = (ring.head, ring.tail)
    assert not ring.try_put(b"c" * 60)  # needs 64, 48 free
    assert (ring.head, ring.tail) == before
    assert ring.get_many(5) == [b"a" * 100, b"b" * 100]


def test_too_large_raises(ring_factory):
    ring = ring_factory(1024)
    assert ring.try_put(b"x" * ring.max_message)
    with pytest.raises(ValueError):
        ring.try_put(b"x" * (ring.max_message + 1))
    with pytest.raises(ValueError):
        ring.put(b"x" * 5000, timeout=1)
    assert ring.try_get() == b"x" * ring.max_message


def test_get_many_limits(ring_factory):
    ring = ring_factory(8192)
    msgs = [bytes([i]) * (10 * i) for i in range(1, 21)]
    for m in msgs:
        assert ring.try_put(m)
    assert ring.get_many(0) == []
    assert ring.get_many(3) == msgs[:3]
    # 40 + 50 = 90 <= 100 < 150
    assert ring.get_many(100, max_bytes=100) == msgs[3:5]
    # first message alone exceeds max_bytes: still returned
    assert ring.get_many(100, max_bytes=1) == msgs[5:6]
    assert ring.get_many(100, max_bytes=0) == msgs[6:7]
    assert ring.get_many(100) == msgs[7:]
    assert ring.get_many(100) == []


def test_reset_consumer_discards(ring_factory):
    ring = ring_factory(4096)
    for i in range(10):
        assert ring.try_put(b"old%d" % i)
    dropped = ring.reset_consumer()
    assert dropped == 10 * 8
    assert ring.try_get() is None
    assert ring.used_bytes == 0
    assert ring.try_put(b"new")
    assert ring.try_get() == b"new"


def test_reset_zeroes_indices(ring_factory):
    ring = ring_factory(256)
    for _ in range(100):
        assert ring.try_put(b"z" * 50)
        assert ring.try_get() == b"z" * 50
    assert ring.try_put(b"left over")
    assert ring.head > ring.capacity
    ring.reset()
    assert (ring.head, ring.tail, ring.used_bytes) == (0, 0, 0)
    assert ring.try_get() is None
    assert ring.try_put(b"fresh")
    assert ring.try_get() == b"fresh"


def test_wait(ring_factory):
    ring = ring_factory(4096)
    assert not ring.wait(0)
    t0 = time.monotonic()
    assert not ring.wait(0.05)
    assert 0.04 <= time.monotonic() - t0 < 1.0
    ring.try_put(b"x")
    assert ring.wait(0)
    assert ring.wait(10)


def test_attach_shares_memory_and_close(ring_factory):
    ring = ring_factory(4096)
    other = Ring.attach(ring.name)
    assert (other.capacity, other.max_message) == (ring.capacity, ring.max_message)
    assert ring.try_put(b"hello")
    assert other.try_get() == b"hello"
    assert ring.used_bytes == 0
    other.close()
    other.close()  # idempotent
    assert other.closed
    assert ring.try_put(b"still here")
    assert Ring.attach(ring.name).try_get() == b"still here"


def test_create_existing_and_attach_errors(ring_factory, prefix):
    ring = ring_factory(4096)
    with pytest.raises(FileExistsError):
        Ring.create(ring.name, 4096)
    with pytest.raises(FileNotFoundError):
        Ring.attach(f"{prefix}-missing")
    with pytest.raises(ValueError):
        Ring.create("bad/name", 4096)
    with pytest.raises(ValueError):
        Ring.create(f"{prefix}-zero", 0)
    ctrs = SharedCounters.create(f"{prefix}-ctl", 4)
    with pytest.raises(ValueError):
        Ring.attach(ctrs.name)
    with pytest.raises(ValueError):
        SharedCounters.attach(ring.name)
    ctrs.close()
    # no temporary files are left behind
    assert shm_names(prefix) == sorted([ring.name, ctrs.name])


def test_corrupt_frame_detected(ring_factory):
    ring = ring_factory(256)
    assert ring.try_put(b"abc")
    with open(os.path.join(SHM_DIR, ring.name), "r+b") as f:
        f.seek(512)  # first frame's length field
        f.write((1000).to_bytes(4, "little"))
    with pytest.raises(RingCorruptError):
        ring.try_get()


# ---------------------------------------------------------------------------
# single process: SharedCounters, naming, clean-up


def test_counters(prefix):
    ctrs = SharedCounters.create(f"{prefix}-ctl", 5)
    try:
        assert len(ctrs) == 5
        assert ctrs.snapshot() == [0] * 5
        ctrs.set(0, 42)
        ctrs.set(4, 2**64 - 1)
        assert ctrs.add(1, 3) == 3
        assert ctrs.add(1) == 4
        assert ctrs.add(1, -4) == 0
        assert ctrs.get(0) == 42 and ctrs.get(-1) == 2**64 - 1
        with pytest.raises(IndexError):
            ctrs.get(5)
        with pytest.raises(ValueError):
            ctrs.set(2, -1)
        with pytest.raises(ValueError):
            ctrs.add(4, 1)
        other = SharedCounters.attach(ctrs.name)
        assert other.snapshot() == [42, 0, 0, 0, 2**64 - 1]
        other.set(2, 7)
        assert ctrs.get(2) == 7
        other.close()
        with pytest.raises(FileExistsError):
            SharedCounters.create(ctrs.name, 5)
        assert len(SharedCounters.create(f"{prefix}-empty", 0)) == 0
    finally:
        ctrs.close()
        ctrs.unlink()
    assert not os.path.exists(os.path.join(SHM_DIR, f"{prefix}-ctl"))


def test_segment_prefix(tmp_path):
    p = segment_prefix(str(tmp_path))
    assert p.startswith("agg-") and len(p) == 16
    int(p[4:], 16)
    assert segment_prefix(str(tmp_path) + "/") == p
    assert segment_prefix(str(tmp_path / "other")) != p
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    assert segment_prefix(str(link)) == p
    old = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert segment_prefix(".") == p
    finally:
        os.chdir(old)


def test_cleanup_stale_only_touches_prefix(prefix):
    other = f"agg-test-{uuid.uuid4().hex[:12]}"
    a = Ring.create(f"{prefix}-w0", 4096)
    b = SharedCounters.create(f"{prefix}-ctl", 3)
    c = Ring.create(f"{other}-w0", 4096)
    try:
        assert cleanup_stale(prefix) == sorted([a.name, b.name])
        assert shm_names(prefix) == []
        assert shm_names(other) == [c.name]
        assert cleanup_stale(prefix) == []
        # existing mappings stay usable after the name is gone
        assert a.try_put(b"x") and a.try_get() == b"x"
    finally:
        for seg in (a, b, c):
            seg.close()
        cleanup_stale(other)
    with pytest.raises(ValueError):
        cleanup_stale("")


# ---------------------------------------------------------------------------
# real processes

PRODUCER = """
import random, sys
from aggregator.ring import Ring
sys.path.insert(0, sys.argv[4])
from test_ring import make_msg

ring = Ring.attach(sys.argv[1])
count, seed = int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
for seq in range(count):
    # mostly small messages, some up to 3 KiB
    msg = make_msg(seq, rnd, 3000 if rnd.random() < 0.1 else 200)
    if not ring.put(msg, timeout=30):
        sys.exit("producer timed out")
ring.close()
"""


def test_two_processes_200k_messages(ring_factory):
    count, seed = 200_000, 7
    ring = ring_factory(1 << 16)
    prod = spawn_child(PRODUCER, ring.name, count, seed, Path(__file__).parent)
    try:
        rnd = random.Random(seed)
        expected_seq = 0
        deadline = time.monotonic() + 120
        pick = random.Random(1)
        while expected_seq < count:
            assert time.monotonic() < deadline, f"stalled at {expected_seq}"
            if not ring.wait(1.0):
                assert prod.poll() is None, prod.communicate()[1]
                continue
            if pick.random() < 0.5:
                batch = ring.get_many(pick.randint(1, 500))
            else:
                m = ring.try_get()
                batch = [m] if m is not None else []
            for msg in batch:
                # regenerate exactly what the producer sent
                want = make_msg(expected_seq, rnd, 3000 if rnd.random() < 0.1 else 200)
                assert msg == want, f"message {expected_seq} differs"
                expected_seq += 1
        _, err = prod.communicate(timeout=30)
        assert prod.returncode == 0, err
        assert err == ""
        assert ring.try_get() is None
        assert ring.head > 10 * ring.capacity
    finally:
        kill(prod)


LOOP_PRODUCER = """
import random, sys
from aggregator.ring import Ring, SharedCounters
sys.path.insert(0, sys.argv[3])
from test_ring import make_msg

ring = Ring.attach(sys.argv[1])
ctl = SharedCounters.attach(sys.argv[2])   # 0: stop flag, 1: last seq put + 1
rnd = random.Random(3)
seq = 0
while not ctl.get(0):
    msg = make_msg(seq, rnd, 1500)
    if ring.put(msg, timeout=0.01):
        seq += 1
        ctl.set(1, seq)
"""

CONSUMER = """
import sys, time
from aggregator.ring import Ring, SharedCounters
sys.path.insert(0, sys.argv[4])
from test_ring import check_msg

ring = Ring.attach(sys.argv[1])
ctl = SharedCounters.attach(sys.argv[2])
slot = int(sys.argv[3])    # this consumer's progress slot: messages received
reset = slot == 3
first = None
if reset:
    boundary = ctl.get(1)       # every seq < boundary has already been put ...
    ring.reset_consumer()       # ... so it must be discarded here
n = 0
last = None
deadline = time.monotonic() + 60
while time.monotonic() < deadline and (not reset or n < 20000):
    if not ring.wait(0.5):
        continue
    for msg in ring.get_many(64):
        seq = check_msg(msg)
        if last is None:
            first = seq
        elif seq != last + 1:
            sys.exit(f"gap: {last} -> {seq}")
        last = seq
        n += 1
        ctl.set(slot, n)
if reset:
    print(boundary, first, last, n)
"""


def test_consumer_sigkilled_then_new_consumer_resets(ring_factory, prefix):
    ring = ring_factory(1 << 15)
    ctl = SharedCounters.create(f"{prefix}-ctl", 4)
    here = Path(__file__).parent
    prod = spawn_child(LOOP_PRODUCER, ring.name, ctl.name, here)
    cons1 = spawn_child(CONSUMER, ring.name, ctl.name, 2, here)
    cons2 = None
    try:
        wait_until(lambda: ctl.get(2) >= 5000 or cons1.poll() is not None, 60, "consumer 1")
        assert cons1.poll() is None, cons1.communicate()[1]
        os.kill(cons1.pid, signal.SIGKILL)  # mid-stream
        cons1.wait(10)
        assert cons1.returncode == -signal.SIGKILL
        # the producer keeps going and fills the ring while nobody consumes
        wait_until(lambda: ring.fill > 0.8, 30, "ring to fill up")
        cons2 = spawn_child(CONSUMER, ring.name, ctl.name, 3, here)
        out, err = cons2.communicate(timeout=90)
        assert cons2.returncode == 0, err
        assert err == ""
        boundary, first, last, n = map(int, out.split())
        assert first >= boundary, "received a message put before reset_consumer()"
        assert n >= 20000 and last == first + n - 1
    finally:
        ctl.set(0, 1)
        try:
            prod.communicate(timeout=10)
        finally:
            for p in (prod, cons1, cons2):
                if p is not None:
                    kill(p)
            ctl.close()
    assert prod.returncode == 0


LEAKY_PRODUCER = """
import sys
from aggregator.ring import Ring, SharedCounters
prefix = sys.argv[1]
rings = [Ring.create(f"{prefix}-w{i}", 1 << 16) for i in range(2)]
ctl = SharedCounters.create(f"{prefix}-ctl", 8)
print("ready", flush=True)
while True:
    for r in rings:
        if not r.try_put(b"x" * 100):
            r.reset_consumer()
    ctl.add(0)
"""


def test_cleanup_stale_after_producer_sigkill(tmp_path):
    prefix = segment_prefix(str(tmp_path))
    assert cleanup_stale(prefix) == []
    proc = spawn_child(LEAKY_PRODUCER, prefix)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ctl = SharedCounters.attach(f"{prefix}-ctl")
        wait_until(lambda: ctl.get(0) > 1000, 30, "producer to run")
        ctl.close()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        leaked = [f"{prefix}-ctl", f"{prefix}-w0", f"{prefix}-w1"]
        assert shm_names(prefix) == leaked
        assert cleanup_stale(prefix) == leaked
        assert shm_names(prefix) == []
        assert not any(n.startswith(prefix) for n in os.listdir("/dev/shm"))
    finally:
        kill(proc)
        cleanup_stale(prefix)


ATTACHER = """
import sys
from aggregator.ring import Ring, SharedCounters
ring = Ring.attach(sys.argv[1])
ctl = SharedCounters.attach(sys.argv[2])
assert ring.try_get() == b"from parent"
assert ring.try_put(b"from child")
ctl.add(0, 5)
if sys.argv[3] == "close":
    ring.close()
    ctl.close()
# otherwise exit with the segments still mapped
"""


@pytest.mark.parametrize("mode", ["close", "no-close"])
def test_attaching_child_exit_leaves_segment_and_no_warnings(ring_factory, prefix, mode):
    ring = ring_factory(4096)
    ctl = SharedCounters.create(f"{prefix}-ctl", 2)
    try:
        for round_ in range(1, 3):  # a second child must still find everything
            assert ring.try_put(b"from parent")
            res = run_child(ATTACHER, ring.name, ctl.name, mode)
            assert res.returncode == 0, res.stderr
            assert res.stderr == ""  # no resource_tracker warnings
            assert os.path.exists(os.path.join(SHM_DIR, ring.name))
            assert os.path.exists(os.path.join(SHM_DIR, ctl.name))
            assert ring.try_get() == b"from child"
            assert ctl.get(0) == 5 * round_
    finally:
        ctl.close()


SPAWN_PARENT = """
import multiprocessing as mp
import os
import sys

from aggregator.ring import Ring, SharedCounters


def child(ring_name, ctl_name):
    ring = Ring.attach(ring_name)
    ctl = SharedCounters.attach(ctl_name)
    ring.try_put(b"hi from spawn child")
    ctl.set(0, os.getpid())
    # exit without closing


if __name__ == "__main__":
    prefix = sys.argv[1]
    ring = Ring.create(prefix + "-w0", 4096)
    ctl = SharedCounters.create(prefix + "-ctl", 1)
    ctx = mp.get_context("spawn")
    for _ in range(2):
        p = ctx.Process(target=child, args=(ring.name, ctl.name))
        p.start()
        p.join(30)
        assert p.exitcode == 0, p.exitcode
        assert ring.try_get() == b"hi from spawn child"
        assert ctl.get(0) == p.pid
    assert os.path.exists("/dev/shm/" + ring.name)
    assert os.path.exists("/dev/shm/" + ctl.name)
    ring.close()
    ctl.close()
    print("ok")
"""


def test_spawn_children_attach_without_resource_tracker_noise(prefix, tmp_path):
    script = tmp_path / "spawn_parent.py"
    script.write_text(SPAWN_PARENT)
    res = subprocess.run(
        [sys.executable, str(script), prefix],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert res.stderr == ""  # no resource_tracker "leaked shared_memory" warnings
    assert shm_names(prefix) == [f"{prefix}-ctl", f"{prefix}-w0"]
