"""Unit and parity tests of the core: ``BloomFilter`` and ``SequenceGate``.

Every test runs over both implementations (the compiled ``aggregator._core`` and the
pure-Python twin ``aggregator.core_ref``); the discrepancy tests at the end run the same
random operation sequences on both and compare every output, like msgpack's
``test_discrepancy.py``.
"""

from __future__ import annotations

import array
import importlib
import math
import os
import random
import subprocess
import sys

import pytest
import xxhash

from aggregator import core_ref

try:
    from aggregator import _core
except ImportError:  # only acceptable when the pure core is forced
    _core = None

PURE = os.environ.get("AGGREGATOR_PURE_CORE", "") == "1"

IMPLS = [pytest.param(core_ref, id="python")]
if _core is not None:
    IMPLS.insert(0, pytest.param(_core, id="cython"))

needs_both = pytest.mark.skipif(_core is None, reason="compiled core not built")


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


# ----------------------------------------------------------------------------- helpers
def rand_pairs(n: int, seed: int) -> bytes:
    """n random (h1, h2) uint64 pairs as a native-endian buffer."""
    rng = random.Random(seed)
    return array.array("Q", [rng.getrandbits(64) for _ in range(2 * n)]).tobytes()


def id_pairs(ids, source: str = "shop.orders") -> bytes:
    """Hash pairs the way the worker makes them: the halves of xxh3_128(source \\0 id)."""
    out = array.array("Q")
    for i in ids:
        d = xxhash.xxh3_128_intdigest(f"{source}\x00{i}".encode())
        out.append(d & 0xFFFFFFFFFFFFFFFF)
        out.append(d >> 64)
    return out.tobytes()


def item(buf: bytes, i: int) -> bytes:
    return buf[16 * i : 16 * i + 16]


# ----------------------------------------------------------------------------- selection
def test_core_selects_implementation():
    from aggregator import core

    if PURE:
        assert core.IMPLEMENTATION == "python"
        assert core.BloomFilter is core_ref.BloomFilter
        assert core.SequenceGate is core_ref.SequenceGate
    else:
        assert core.IMPLEMENTATION == "cython"
        assert core.BloomFilter is _core.BloomFilter
        assert core.SequenceGate is _core.SequenceGate
    assert (core.APPLY, core.STALE, core.PARK, core.FULL) == (0, 1, 2, 3)


def _import_core_without_extension(pure: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; sys.modules['aggregator._core'] = None\n"
        "import aggregator.core as c; print(c.IMPLEMENTATION)\n"
    )
    env = dict(os.environ, AGGREGATOR_PURE_CORE=pure)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_core_import_fails_loudly_without_extension():
    res = _import_core_without_extension("")
    assert res.returncode != 0
    assert "ImportError" in res.stderr
    assert "AGGREGATOR_PURE_CORE=1" in res.stderr


def test_core_pure_env_needs_no_extension():
    res = _import_core_without_extension("1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "python"


def test_constants(impl):
    assert (impl.APPLY, impl.STALE, impl.PARK, impl.FULL) == (0, 1, 2, 3)


@needs_both
def test_same_public_api():
    for name in ("BloomFilter", "SequenceGate"):
        ref = {a for a in dir(getattr(core_ref, name)) if not a.startswith("_")}
        fast = {a for a in dir(getattr(_core, name)) if not a.startswith("_")}
        assert ref == fast, name
    assert set(core_ref.__all__) == set(_core.__all__)


def test_public_docstrings(impl):
    assert impl.__doc__
    for cls in (impl.BloomFilter, impl.SequenceGate):
        assert cls.__doc__
        for a in dir(cls):
            if not a.startswith("_"):
                assert getattr(cls, a).__doc__, f"{cls.__name__}.{a}"


# ----------------------------------------------------------------------------- bloom sizing
@pytest.mark.parametrize(
    "capacity,fp_rate",
    [
        (1, 0.5),
        (1, 0.01),
        (7, 0.2),
        (1000, 0.01),
        (100_000, 0.01),
        (1_000_000, 0.001),
        (12345, 1e-9),
        (3, 0.999),
    ],
)
def test_bloom_size(impl, capacity, fp_rate):
    m, k = impl.bloom_size(capacity, fp_rate)
    assert (m, k) == core_ref.bloom_size(capacity, fp_rate)
    assert m % 64 == 0 and m >= -capacity * math.log(fp_rate) / math.log(2) ** 2
    assert m - 64 < math.ceil(-capacity * math.log(fp_rate) / math.log(2) ** 2)
    assert k == max(1, round(m / capacity * math.log(2)))
    b = impl.BloomFilter(capacity, fp_rate, 2)
    assert (b.bits_per_generation, b.hash_count) == (m, k)
    assert b.memory_bytes == 2 * m // 8


def test_bloom_size_known_values(impl):
    assert impl.bloom_size(1000, 0.01) == (9600, 7)  # ceil(9585.06) -> 9600
    b = impl.BloomFilter(1000)
    assert (b.capacity, b.fp_rate, b.generations) == (1000, 0.01, 3)


@pytest.mark.parametrize(
    "args", [(0,), (-5,), (10, 0.0), (10, 1.0), (10, -0.1), (10, 0.01, 0), (10, 0.01, -1)]
)
def test_bloom_bad_arguments(impl, args):
    with pytest.raises(ValueError):
        impl.BloomFilter(*args)


# ----------------------------------------------------------------------------- bloom behaviour
def test_bloom_no_false_negatives(impl):
    b = impl.BloomFilter(5000, 0.01, 3)
    batches = [rand_pairs(1000, seed) for seed in range(5)]
    for buf in batches[:3]:
        b.check_and_add(buf)
    b.add(batches[3])
    b.load(b.generation, batches[4])
    for buf in batches:
        assert b.contains(buf) == bytearray([1]) * 1000
        assert b.check_and_add(buf) == bytearray([1]) * 1000


def test_bloom_false_positive_rate_at_capacity(impl):
    capacity, p = 100_000, 0.01
    b = impl.BloomFilter(capacity, p)
    flags = b.check_and_add(id_pairs(range(capacity)))
    assert b.count == capacity and b.full
    # All inserted: the flags of the insert itself are early false positives.
    assert sum(flags) < 2 * p * capacity
    probes = b.contains(id_pairs(range(capacity, 2 * capacity)))
    rate = sum(probes) / capacity
    assert p / 2 <= rate <= 2 * p, rate


def test_bloom_check_and_add_flags(impl):
    b = impl.BloomFilter(1000, 0.01)
    x, y = rand_pairs(2, 1), rand_pairs(1, 2)
    # Duplicates inside one batch: flagged from the second occurrence on.
    batch = item(x, 0) + item(x, 1) + item(x, 0) + item(x, 0) + item(x, 1)
    assert b.check_and_add(batch) == bytearray([0, 0, 1, 1, 1])
    assert b.count == 5  # every item added counts
    assert b.check_and_add(x + y) == bytearray([1, 1, 0])
    assert b.count == 8
    assert b.contains(y + x) == bytearray([1, 1, 1])
    assert b.count == 8


def test_bloom_count_and_full(impl):
    b = impl.BloomFilter(10, 0.01)
    b.add(rand_pairs(9, 3))
    assert b.count == 9 and not b.full
    b.check_and_add(rand_pairs(1, 4))
    assert b.count == 10 and b.full
    assert b.rotate() == -1
    assert b.count == 0 and not b.full


def test_bloom_rotation_drops_oldest(impl):
    b = impl.BloomFilter(1000, 0.01, 3)
    mem = b.memory_bytes
    assert mem == 3 * b.bits_per_generation // 8
    sets = [rand_pairs(500, 100 + g) for g in range(6)]
    assert (b.generation, b.oldest_generation, b.live_generations) == (0, 0, [0])
    b.check_and_add(sets[0])
    assert b.rotate() == -1
    b.check_and_add(sets[1])
    assert b.rotate() == -1
    b.check_and_add(sets[2])
    assert b.live_generations == [0, 1, 2]
    for g in range(3, 6):
        assert b.rotate() == g - 3  # the oldest is dropped
        assert b.live_generations == [g - 2, g - 1, g]
        assert (b.generation, b.oldest_generation) == (g, g - 2)
        assert b.memory_bytes == mem  # fixed memory
        # the dropped generation's items are gone (up to false positives)
        assert sum(b.contains(sets[g - 3])) < 25
        for live in (g - 2, g - 1):
            assert b.contains(sets[live]) == bytearray([1]) * 500
        b.check_and_add(sets[g])
    assert b.memory_bytes == mem


def test_bloom_single_generation(impl):
    b = impl.BloomFilter(100, 0.01, 1)
    x = rand_pairs(50, 7)
    b.add(x)
    assert b.rotate() == 0
    assert b.live_generations == [1]
    assert sum(b.contains(x)) == 0


def test_bloom_start_generation(impl):
    b = impl.BloomFilter(100, start_generation=41)
    assert (b.generation, b.oldest_generation, b.live_generations) == (41, 41, [41])
    assert b.rotate() == -1 and b.generation == 42
    with pytest.raises(TypeError):
        impl.BloomFilter(100, 0.01, 3, 5)  # start_generation is keyword-only
    top = impl.BloomFilter(100, start_generation=2**63 - 1)
    with pytest.raises(OverflowError):
        top.rotate()


def test_bloom_load_rebuild_equals_original(impl):
    cap = 2000
    orig = impl.BloomFilter(cap, 0.01, 3, start_generation=5)
    log = []  # (generation, batch) as the dedup index would store it
    for seed in range(12):
        buf = rand_pairs(400, 1000 + seed)
        orig.check_and_add(buf)
        log.append((orig.generation, buf))
        if orig.full:
            orig.rotate()
    live = set(orig.live_generations)
    rebuilt = impl.BloomFilter(cap, 0.01, 3)
    for gen, buf in log:  # stored index, oldest generation first
        if gen in live:
            rebuilt.load(gen, buf)
    while rebuilt.generation < orig.generation:
        rebuilt.rotate()
    assert rebuilt.live_generations == orig.live_generations
    assert rebuilt.count == orig.count
    probes = b"".join(buf for _, buf in log) + rand_pairs(5000, 77)
    assert rebuilt.contains(probes) == orig.contains(probes)


def test_bloom_load_generations(impl):
    b = impl.BloomFilter(100, 0.01, 2)
    x = [rand_pairs(10, 300 + g) for g in range(6)]
    assert b.load(0, x[0]) == -1
    assert b.live_generations == [0]
    assert b.load(1, x[1]) == -1
    assert b.load(3, x[3]) == 0  # ids may skip; the oldest is dropped
    assert b.live_generations == [1, 3]
    assert (b.generation, b.oldest_generation, b.count) == (3, 1, 10)
    # a live generation can be loaded again
    assert b.load(1, x[2]) == -1
    assert b.contains(x[2]) == bytearray([1]) * 10
    assert b.count == 10
    # an absent generation older than the current one is an error
    for gen in (2, 0, -1):
        with pytest.raises(ValueError):
            b.load(gen, x[4])
    assert b.live_generations == [1, 3]
    assert b.rotate() == 1 and b.live_generations == [3, 4]


def test_bloom_load_into_fresh_filter(impl):
    """At boot the stored generations need not start at the filter's first id."""
    b = impl.BloomFilter(100, 0.01, 3)
    x = [rand_pairs(10, 400 + g) for g in range(3)]
    assert [b.load(5 + g, x[g]) for g in range(3)] == [-1, -1, 0]
    assert b.live_generations == [5, 6, 7]
    assert b.contains(b"".join(x)) == bytearray([1]) * 30


def test_bloom_load_count(impl):
    b = impl.BloomFilter(100, 0.01, 3)
    b.load(0, rand_pairs(5, 1))
    b.load(1, rand_pairs(7, 2))
    assert b.count == 7
    b.load(0, rand_pairs(3, 3))
    assert b.count == 7
    b.load(1, rand_pairs(3, 4))
    assert b.count == 10


def _filled(impl, cap: int = 2000, gens: int = 3, batches: int = 12, start: int = 5):
    b = impl.BloomFilter(cap, 0.01, gens, start_generation=start)
    bufs = []
    for seed in range(batches):
        buf = rand_pairs(400, 2000 + seed)
        b.check_and_add(buf)
        bufs.append(buf)
        if b.full:
            b.rotate()
    return b, bufs


def test_bloom_dumps_restore_round_trip(impl):
    """A restored filter answers, counts and rotates exactly as the one dumped."""
    orig, bufs = _filled(impl)
    data = orig.dumps()
    assert isinstance(data, bytes)
    copy = impl.BloomFilter(2000, 0.01, 3)
    copy.check_and_add(rand_pairs(50, 9))  # content that the restore replaces
    copy.restore(data)
    assert copy.dumps() == data
    assert (copy.live_generations, copy.count, copy.full) == \
        (orig.live_generations, orig.count, orig.full)
    probes = b"".join(bufs) + rand_pairs(5000, 78)
    assert copy.contains(probes) == orig.contains(probes)
    for b in (orig, copy):  # the free slots were rebuilt: rotations behave alike
        for seed in range(3):
            b.check_and_add(rand_pairs(900, 3000 + seed))
            b.rotate()
    assert copy.dumps() == orig.dumps()


def test_bloom_dumps_is_the_same_bytes_in_both_cores():
    """The snapshot layout is one format: either core restores the other's."""
    if len(IMPLS) < 2:
        pytest.skip("compiled core not built")
    (c, bufs), (r, _) = _filled(_core), _filled(core_ref)
    assert c.dumps() == r.dumps()
    x = core_ref.BloomFilter(2000, 0.01, 3)
    x.restore(c.dumps())
    probes = b"".join(bufs) + rand_pairs(3000, 79)
    assert x.contains(probes) == c.contains(probes)


def test_bloom_restore_refuses_other_parameters_and_damage(impl):
    orig, _ = _filled(impl)
    data = orig.dumps()
    for other in (impl.BloomFilter(2001, 0.01, 3), impl.BloomFilter(2000, 0.02, 3),
                  impl.BloomFilter(2000, 0.01, 4)):
        with pytest.raises(ValueError):
            other.restore(data)
    b = impl.BloomFilter(2000, 0.01, 3)
    b.add(rand_pairs(10, 5))
    before = b.dumps()
    bad_magic = b"XXXX" + data[4:]
    for damaged in (data[:-1], data + b"\0", data[:10], b"", bad_magic):
        with pytest.raises(ValueError):
            b.restore(damaged)
    assert b.dumps() == before  # unchanged


@pytest.mark.parametrize("method", ["check_and_add", "contains", "add", "load"])
def test_bloom_batch_edge_cases(impl, method):
    b = impl.BloomFilter(100, 0.01)

    def call(buf):
        if method == "load":
            return b.load(0, buf)
        return getattr(b, method)(buf)

    res = call(b"")
    if method in ("check_and_add", "contains"):
        assert res == bytearray() and type(res) is bytearray
    assert b.count == 0
    for n in (1, 8, 15, 17, 24, 33):
        with pytest.raises(ValueError):
            call(b"\0" * n)
    with pytest.raises(TypeError):
        call([1, 2])
    with pytest.raises(TypeError):
        call("0123456789abcdef")
    with pytest.raises(BufferError):
        call(memoryview(b"\0" * 64)[::2])  # not contiguous
    assert b.count == 0


def test_bloom_buffer_types(impl):
    raw = rand_pairs(100, 9)
    arr = array.array("Q")
    arr.frombytes(raw)
    results = []
    for buf in (
        raw,
        bytearray(raw),
        memoryview(raw),
        arr,
        memoryview(arr),
        memoryview(b"xx" + raw)[2:],
    ):  # unaligned view
        b = impl.BloomFilter(1000)
        results.append((bytes(b.check_and_add(buf)), bytes(b.contains(buf))))
    assert all(r == results[0] for r in results)
    assert results[0][1] == b"\x01" * 100


def test_bloom_hash_arithmetic_wraps(impl):
    """Pairs near 2**64 exercise uint64 wrap-around; both twins must agree bit for bit."""
    top = 2**64 - 1
    vals = [0, 1, 2, top, top - 1, 2**63, 2**63 - 1, 2**32, 12345678901234567890]
    pairs = array.array("Q", [v for h1 in vals for h2 in vals for v in (h1, h2)]).tobytes()
    b = impl.BloomFilter(50, 0.05, 2)
    flags = b.check_and_add(pairs)
    assert b.contains(pairs) == bytearray([1]) * (len(pairs) // 16)
    ref = core_ref.BloomFilter(50, 0.05, 2)
    assert ref.check_and_add(pairs) == flags
    probes = rand_pairs(3000, 11)
    assert ref.contains(probes) == b.contains(probes)


def test_bloom_repr(impl):
    assert "BloomFilter(capacity=10" in repr(impl.BloomFilter(10))


# ----------------------------------------------------------------------------- gate
APPLY, STALE, PARK, FULL = 0, 1, 2, 3
S, L = b"\x01", b"\x00"  # strict / latest flag bytes


def decide(gate, events, now=0.0):
    """events: [(gkey, seq, strict: bool)] -> (list of codes, ready)."""
    keys = [e[0] for e in events]
    seqs = [e[1] for e in events]
    flags = bytes(1 if e[2] else 0 for e in events)
    codes, ready = gate.decide(keys, seqs, flags, now)
    assert type(codes) is bytearray
    return list(codes), ready


def test_gate_missing_and_load(impl):
    g = impl.SequenceGate(10, 100)
    assert len(g) == 0
    assert g.missing([b"b", b"a", b"b", b"c", b"a"]) == [b"b", b"a", b"c"]
    g.load(b"a", 3)
    assert g.missing([b"b", b"a", b"b", b"c", b"a"]) == [b"b", b"c"]
    assert g.missing([]) == []
    assert len(g) == 1 and b"a" in g and b"b" not in g
    assert g.last(b"a") == 3 and g.parked(b"a") == []
    with pytest.raises(TypeError):
        g.load("a", 3)
    with pytest.raises(TypeError):
        g.load(None, 3)
    with pytest.raises(TypeError):
        g.load(b"x", 1.5)


def test_gate_decide_requires_loaded_keys(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"a", 0)
    with pytest.raises(KeyError) as info:
        decide(g, [(b"a", 1, True), (b"zz", 1, True)])
    assert info.value.args == (b"zz",)
    assert g.last(b"a") == 1  # events before the failing one were decided


def test_gate_decide_length_mismatch(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"a", 0)
    with pytest.raises(ValueError):
        g.decide([b"a"], [1, 2], b"\x01", 0.0)
    with pytest.raises(ValueError):
        g.decide([b"a"], [1], b"\x01\x01", 0.0)
    with pytest.raises(TypeError):
        g.decide([b"a"], [1], [1], 0.0)
    assert g.decide([], [], b"", 0.0) == (bytearray(), [])
    assert g.last(b"a") == 0


def test_gate_latest_mode(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"k", 5)
    codes, ready = decide(
        g,
        [
            (b"k", 5, False),
            (b"k", 4, False),
            (b"k", 9, False),
            (b"k", 7, False),
            (b"k", 10, False),
            (b"k", 10, False),
        ],
    )
    assert codes == [STALE, STALE, APPLY, STALE, APPLY, STALE]
    assert ready == []
    assert g.last(b"k") == 10 and g.parked_total == 0


def test_gate_latest_mode_leaves_parked_untouched(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"k", 1, [(5, 1.0), (9, 2.0)])
    codes, ready = decide(g, [(b"k", 6, False)])
    assert codes == [APPLY] and ready == []
    assert g.last(b"k") == 6 and g.parked(b"k") == [5, 9]
    codes, ready = decide(g, [(b"k", 7, True), (b"k", 8, True)])
    assert codes == [APPLY, APPLY]
    assert ready == [(1, b"k", 9)]
    assert g.parked(b"k") == [5]  # stale leftover, discarded by skip_gap
    assert g.skip_gap(b"k") == []
    assert g.parked(b"k") == [] and g.parked_total == 0 and g.last(b"k") == 9


def test_gate_strict_mode_branches(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"k", 10)
    codes, ready = decide(
        g,
        [
            (b"k", 10, True),  # s == last: stale
            (b"k", 3, True),  # s < last: stale
            (b"k", 13, True),  # gap: park
            (b"k", 13, True),  # duplicate of a parked one: stale
            (b"k", 11, True),  # next: apply
            (b"k", 12, True),  # next: apply, then 13 is ready
            (b"k", 13, True),  # now applied: stale
            (b"k", 14, True),  # next: apply
        ],
        now=5.0,
    )
    assert codes == [STALE, STALE, PARK, STALE, APPLY, APPLY, STALE, APPLY]
    assert ready == [(5, b"k", 13)]
    assert g.last(b"k") == 14 and g.parked(b"k") == [] and g.parked_total == 0


def test_gate_ready_order(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"a", 0)
    g.load(b"b", 100)
    codes, ready = decide(
        g,
        [
            (b"a", 5, True),
            (b"a", 3, True),
            (b"b", 102, True),
            (b"a", 4, True),
            (b"a", 7, True),
            (b"b", 101, True),
            (b"a", 2, True),
            (b"a", 1, True),
        ],
    )
    assert codes == [PARK, PARK, PARK, PARK, PARK, APPLY, PARK, APPLY]
    assert ready == [(5, b"b", 102), (7, b"a", 2), (7, b"a", 3), (7, b"a", 4), (7, b"a", 5)]
    assert g.last(b"a") == 5 and g.parked(b"a") == [7]  # the run stops at the gap (6)
    assert g.parked_total == 1
    codes, ready = decide(g, [(b"a", 6, True)])
    assert codes == [APPLY] and ready == [(0, b"a", 7)]
    assert g.parked_total == 0


def test_gate_per_key_bound(impl):
    g = impl.SequenceGate(2, 100)
    g.load(b"a", 0)
    g.load(b"b", 0)
    codes, _ = decide(
        g, [(b"a", 3, True), (b"a", 4, True), (b"a", 5, True), (b"b", 3, True), (b"a", 4, True)]
    )
    assert codes == [PARK, PARK, FULL, PARK, STALE]
    assert g.parked(b"a") == [3, 4] and g.parked_total == 3
    # FULL is not parked; latest mode is unaffected by the bound
    codes, _ = decide(g, [(b"a", 9, True), (b"a", 6, False)])
    assert codes == [FULL, APPLY]
    assert g.parked(b"a") == [3, 4]


def test_gate_total_bound(impl):
    g = impl.SequenceGate(10, 3)
    for k in (b"a", b"b", b"c"):
        g.load(k, 0)
    codes, _ = decide(
        g, [(b"a", 2, True), (b"b", 2, True), (b"a", 3, True), (b"c", 5, True), (b"c", 1, True)]
    )
    assert codes == [PARK, PARK, PARK, FULL, APPLY]
    assert g.parked_total == 3
    codes, ready = decide(g, [(b"a", 1, True), (b"c", 5, True)])
    assert codes == [APPLY, PARK]  # room again after a's run drained
    assert ready == [(0, b"a", 2), (0, b"a", 3)]
    assert g.parked_total == 2


def test_gate_zero_bounds(impl):
    g = impl.SequenceGate(0, 0)
    g.load(b"a", 0)
    assert decide(g, [(b"a", 2, True), (b"a", 1, True)])[0] == [FULL, APPLY]
    with pytest.raises(ValueError):
        impl.SequenceGate(-1, 5)


def test_gate_expired(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"a", 0)
    g.load(b"b", 0)
    g.load(b"c", 0, [(9, 50.0), (7, 30.0)])
    decide(g, [(b"a", 3, True)], now=100.0)
    decide(g, [(b"b", 5, True), (b"a", 4, True)], now=110.0)
    assert g.expired(100.0, 60.0) == [b"c"]  # 30 <= 40
    assert g.expired(130.0, 30.0) == [b"c", b"a"]  # at or before the limit
    assert g.expired(139.999, 30.0) == [b"c", b"a"]
    assert g.expired(140.0, 30.0) == [b"c", b"a", b"b"]
    assert g.expired(1000.0, 0.0) == [b"c", b"a", b"b"]
    # once the oldest leaves, the next oldest counts
    decide(g, [(b"a", 1, True), (b"a", 2, True)], now=200.0)
    assert g.parked(b"a") == [] and g.expired(130.0, 30.0) == [b"c"]
    g.load(b"c", 7, [(9, 50.0), (12, 90.0)])
    assert g.expired(100.0, 40.0) == [b"c"]
    assert g.skip_gap(b"c") == [9]
    assert g.expired(100.0, 40.0) == []
    assert g.expired(130.0, 40.0) == [b"c"]  # 12 was parked at 90
    assert g.expired(150.0, 40.0) == [b"b", b"c"]  # c was reloaded: it moved last


def test_gate_skip_gap(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"k", 2)
    assert g.skip_gap(b"k") == []
    assert g.dirty() == []
    decide(g, [(b"k", 8, True), (b"k", 5, True), (b"k", 6, True), (b"k", 11, True)])
    assert g.parked_total == 4
    assert g.skip_gap(b"k") == [5, 6]
    assert g.last(b"k") == 6 and g.parked(b"k") == [8, 11] and g.parked_total == 2
    assert g.skip_gap(b"k") == [8]
    assert g.skip_gap(b"k") == [11]
    assert g.last(b"k") == 11 and g.parked_total == 0
    assert g.dirty() == [(b"k", 11)]
    with pytest.raises(KeyError):
        g.skip_gap(b"nope")


def test_gate_drop_parked(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"k", 2, [(9, 1.0), (4, 1.0), (7, 1.0), (2, 1.0), (1, 1.0)])
    assert g.parked(b"k") == [4, 7, 9] and g.parked_total == 3  # <= last: stale, ignored
    assert g.drop_parked(b"k") == [4, 7, 9]
    assert g.last(b"k") == 9 and g.parked_total == 0 and g.parked(b"k") == []
    assert g.dirty() == [(b"k", 9)]
    assert g.drop_parked(b"k") == []
    # last never goes back (stale parked after a latest-mode jump)
    g.load(b"j", 0, [(5, 1.0)])
    decide(g, [(b"j", 20, False)])
    assert g.drop_parked(b"j") == [5]
    assert g.last(b"j") == 20
    with pytest.raises(KeyError):
        g.drop_parked(b"nope")


def test_gate_dirty(impl):
    g = impl.SequenceGate(10, 100)
    for k in (b"a", b"b", b"c"):
        g.load(k, 0)
    assert g.dirty() == []  # load is not a change
    decide(
        g, [(b"b", 1, True), (b"a", 5, False), (b"b", 2, True), (b"c", 0, True), (b"c", 3, True)]
    )
    assert g.dirty() == [(b"b", 2), (b"a", 5)]  # order of first change; parking is no change
    assert g.dirty() == []
    decide(g, [(b"c", 1, True)])
    assert g.dirty() == [(b"c", 1)]
    decide(g, [(b"c", 2, True)])  # drains 3
    assert g.dirty() == [(b"c", 3)]
    decide(g, [(b"a", 6, False)])
    g.load(b"a", 40)  # reloading forgets the change
    assert g.dirty() == []


def test_gate_load_replaces_state(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"a", 0, [(3, 1.0), (4, 1.0)])
    g.load(b"b", 0, [(3, 1.0)])
    assert g.parked_total == 3
    g.load(b"a", 1, [(5, 2.0)])
    assert g.parked_total == 2 and g.parked(b"a") == [5] and g.last(b"a") == 1
    g.load(b"a", 10)
    assert g.parked_total == 1 and g.expired(100.0, 0.0) == [b"b"]


def test_gate_clear(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"a", 0)
    decide(g, [(b"a", 1, True), (b"a", 3, True)])
    g.clear()
    assert len(g) == 0 and g.parked_total == 0 and g.dirty() == [] and g.expired(1e9, 0) == []
    assert g.missing([b"a"]) == [b"a"]


def test_gate_evict(impl):
    g = impl.SequenceGate(10, 100)
    for i in range(10):
        g.load(b"k%d" % i, 0)
    decide(g, [(b"k0", 1, True), (b"k1", 5, True)])  # k0 dirty, k1 parked
    assert g.evict(20) == 0 and len(g) == 10
    assert g.evict(6) == 4
    assert len(g) == 6
    assert g.missing([b"k%d" % i for i in range(10)]) == [b"k2", b"k3", b"k4", b"k5"]
    g.dirty()
    assert g.evict(0) == 5  # only the parked key stays
    assert len(g) == 1 and g.parked(b"k1") == [5]


def test_gate_repr_and_bounds(impl):
    g = impl.SequenceGate(7, 70)
    assert (g.max_parked_per_key, g.max_parked_total) == (7, 70)
    assert "SequenceGate(keys=0" in repr(g)


def test_gate_sequence_types(impl):
    g = impl.SequenceGate(10, 100)
    g.load(b"a", 0)
    codes, _ = g.decide((k for k in [b"a", b"a"]), (s for s in [True, 2]), bytearray(2), 1)
    assert list(codes) == [APPLY, APPLY] and g.last(b"a") == 2
    for bad, exc in (
        (1.0, TypeError),
        ("3", TypeError),
        (2**63, OverflowError),
        (-(2**63) - 1, OverflowError),
    ):
        with pytest.raises(exc):
            g.decide([b"a"], [bad], b"\x01", 0.0)
    assert g.decide([b"a"], [2**63 - 1], b"\x01", 0.0)[0] == bytearray([PARK])


# ----------------------------------------------------------------------------- discrepancy
def _outcome(fn, *args):
    try:
        res = fn(*args)
    except Exception as exc:  # the exception type is the outcome
        return ("raised", type(exc))
    if isinstance(res, bytearray):
        return ("bytearray", bytes(res))
    if isinstance(res, tuple) and res and isinstance(res[0], bytearray):
        return ("decided", bytes(res[0]), res[1])
    return ("ok", res)


def _gate_ops(rng: random.Random, nkeys: int, steps: int):
    keys = [b"key-%d" % i for i in range(nkeys)] + [b"unloaded"]
    front = dict.fromkeys(keys, 0)  # sequences drift upwards, around a moving front
    now = 0.0
    for _ in range(steps):
        now += rng.random()
        r = rng.random()
        if r < 0.55:
            n = rng.randint(0, 30)
            ks = [rng.choice(keys[:-1] if rng.random() < 0.98 else keys) for _ in range(n)]
            seqs = []
            for k in ks:
                front[k] += rng.randint(0, 1)
                seqs.append(front[k] + rng.randint(-2, 4))
            flags = bytes(rng.random() < 0.8 for _ in range(n))
            yield "decide", (ks, seqs, flags, now)
        elif r < 0.65:
            k = rng.choice(keys[:-1])
            last = front[k] + rng.randint(-3, 1)
            parked = [
                (last + rng.randint(-1, 6), rng.random() * now) for _ in range(rng.randint(0, 4))
            ]
            yield "load", (k, last, parked)
        elif r < 0.70:
            yield "missing", (rng.sample(keys, rng.randint(0, len(keys))),)
        elif r < 0.76:
            yield "expired", (now, rng.choice([0.0, 0.5, 2.0, 5.0]))
        elif r < 0.82:
            yield "skip_gap", (rng.choice(keys),)
        elif r < 0.86:
            yield "drop_parked", (rng.choice(keys),)
        elif r < 0.91:
            yield "dirty", ()
        elif r < 0.95:
            yield "parked", (rng.choice(keys),)
        elif r < 0.975:
            yield "evict", (rng.randint(0, nkeys),)
        elif r < 0.985:
            yield "clear", ()
        else:
            yield "last", (rng.choice(keys),)


@needs_both
@pytest.mark.parametrize("seed", range(40))
def test_gate_discrepancy(seed):
    rng = random.Random(seed)
    per_key, total = rng.choice([(1, 2), (3, 5), (5, 100), (100, 1000)])
    fast, ref = _core.SequenceGate(per_key, total), core_ref.SequenceGate(per_key, total)
    for name, args in _gate_ops(rng, rng.randint(1, 8), 300):
        if name == "decide":
            # keys must be loaded: load the missing ones (from the first gate's answer)
            miss = fast.missing(args[0])
            assert miss == ref.missing(args[0])
            for k in miss:
                if k != b"unloaded":
                    fast.load(k, 0)
                    ref.load(k, 0)
        a, b = _outcome(getattr(fast, name), *args), _outcome(getattr(ref, name), *args)
        assert a == b, (seed, name, args)
        assert (len(fast), fast.parked_total) == (len(ref), ref.parked_total)
    assert _outcome(fast.dirty) == _outcome(ref.dirty)


def _bloom_ops(rng: random.Random, steps: int):
    pool = [rand_pairs(1, rng.getrandbits(32)) for _ in range(300)]
    gen_hint = 0
    for _ in range(steps):
        r = rng.random()
        n = rng.randint(0, 40)
        buf = b"".join(rng.choice(pool) for _ in range(n))
        if r < 0.35:
            yield "check_and_add", (buf,)
        elif r < 0.6:
            yield "contains", (buf,)
        elif r < 0.7:
            yield "add", (buf,)
        elif r < 0.8:
            yield "rotate", ()
        elif r < 0.9:
            gen_hint += rng.choice([-1, 0, 0, 1, 2])
            yield "load", (gen_hint, buf)
        elif r < 0.95:
            yield "check_and_add", (buf + b"\0" * rng.randint(1, 15),)
        else:
            yield "contains", (buf[: len(buf) - 8] if buf else b"",)


@needs_both
@pytest.mark.parametrize("seed", range(30))
def test_bloom_discrepancy(seed):
    rng = random.Random(seed)
    cap, p, gens = rng.choice([10, 50, 200]), rng.choice([0.5, 0.1, 0.01]), rng.randint(1, 4)
    fast, ref = _core.BloomFilter(cap, p, gens), core_ref.BloomFilter(cap, p, gens)
    props = (
        "generation",
        "oldest_generation",
        "live_generations",
        "count",
        "full",
        "memory_bytes",
        "bits_per_generation",
        "hash_count",
    )
    for name, args in _bloom_ops(rng, 200):
        a, b = _outcome(getattr(fast, name), *args), _outcome(getattr(ref, name), *args)
        assert a == b, (seed, name)
        for prop in props:
            assert getattr(fast, prop) == getattr(ref, prop), (seed, name, prop)


def test_reload_core_module_is_stable():
    """Re-importing the chooser keeps the same choice (no hidden state)."""
    from aggregator import core

    before = core.IMPLEMENTATION
    assert importlib.reload(core).IMPLEMENTATION == before
