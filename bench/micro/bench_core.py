"""Micro-benchmarks of the core, compiled and pure-Python twins side by side.

Run: ``pytest bench/micro/bench_core.py --benchmark-only`` (add ``--benchmark-json=out.json``
for a machine-readable report). ``--benchmark-disable`` runs every case once as a quick
smoke test (CI).

Workloads are seeded and identical for both implementations:

- bloom ``check_and_add`` / ``contains``: batches of 10,000 hash pairs against a filter of
  1M items per generation at 1%, 3 generations, the older ones full and the current one
  half full. ``contains`` and ``check_and_add`` take never-inserted items (the common
  case: new events); the ``_present`` / ``_duplicates`` cases take items already held.
- gate ``decide``: batches of 10,000 events over 2,000 keys, latest mode, strict mode in
  order, and strict mode with 5% of a key's events swapped with its next one (parks and
  ready runs), and strict mode with new key objects in every batch (as the gate stage
  makes them). One round = 6 batches on a freshly loaded gate.
- gate keys: one batch of 10,000 (slot, source, partition key) → 18-byte gate keys with
  ``gate_keys`` of each twin, and the per-event expression the gate stage used before
  (``slot_prefix(slot) + gate_hash(source, pk)`` in a list comprehension), same data.

``extra_info["items_per_s"]`` in the report is items per second from the mean time.
"""

from __future__ import annotations

import itertools
import random

import pytest

from aggregator import core_ref
from aggregator.routing import gate_hash, slot_prefix

try:
    from aggregator import _core
except ImportError:  # only acceptable when the pure core is forced
    _core = None

IMPLS = [pytest.param(core_ref, id="python")]
if _core is not None:
    IMPLS.insert(0, pytest.param(_core, id="cython"))

BATCH = 10_000
CAPACITY = 1_000_000
N_KEYS = 2_000


def pairs(n: int, rng: random.Random) -> bytes:
    """n random (h1, h2) uint64 pairs."""
    return rng.randbytes(16 * n)


def _report(benchmark, items: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.mean:
        benchmark.extra_info["items_per_s"] = round(items / stats.stats.mean)


@pytest.fixture(scope="module")
def bloom_data():
    rng = random.Random(20240601)
    older = [pairs(CAPACITY // 4, rng) for _ in range(8)]  # 2 full generations
    current = pairs(CAPACITY // 2, rng)
    batches = [pairs(BATCH, rng) for _ in range(20)]
    return older, current, batches


def make_bloom(impl, data):
    older, current, _ = data
    b = impl.BloomFilter(CAPACITY, 0.01, 3)
    for g in range(2):
        b.load(g, b"".join(older[4 * g : 4 * g + 4]))
    b.load(2, current)
    return b


@pytest.fixture(scope="module", params=IMPLS)
def loaded_bloom(request, bloom_data):
    return request.param, make_bloom(request.param, bloom_data)


@pytest.mark.benchmark(group="bloom-contains-10k")
def test_bloom_contains(benchmark, loaded_bloom, bloom_data):
    _, bloom = loaded_bloom
    batches = itertools.cycle(bloom_data[2])
    benchmark(lambda: bloom.contains(next(batches)))
    _report(benchmark, BATCH)


@pytest.mark.benchmark(group="bloom-contains-10k")
def test_bloom_contains_present(benchmark, loaded_bloom, bloom_data):
    """Probes of items present in the current generation (all k bits checked)."""
    _, bloom = loaded_bloom
    present = bloom_data[1][: 16 * BATCH]
    benchmark(bloom.contains, present)
    _report(benchmark, BATCH)


@pytest.mark.benchmark(group="bloom-check_and_add-10k")
def test_bloom_check_and_add(benchmark, loaded_bloom):
    """New items into the shared filter (runs after the contains cases of its twin;
    rotates when the current generation is full, so the load stays realistic).
    Every round gets a fresh batch, generated outside the timing."""
    impl, bloom = loaded_bloom
    rng = random.Random(99)

    def fresh_batch():
        if bloom.full:
            bloom.rotate()
        return (pairs(BATCH, rng),), {}

    rounds = 300 if impl is _core else 15
    benchmark.pedantic(bloom.check_and_add, setup=fresh_batch, rounds=rounds, warmup_rounds=1)
    _report(benchmark, BATCH)


@pytest.mark.benchmark(group="bloom-check_and_add-10k")
def test_bloom_check_and_add_duplicates(benchmark, loaded_bloom, bloom_data):
    """A batch already in the current generation (redelivered events)."""
    _, bloom = loaded_bloom
    present = bloom_data[1][: 16 * BATCH]
    benchmark(bloom.check_and_add, present)
    _report(benchmark, BATCH)


# ----------------------------------------------------------------------------- gate
def gate_batches(mode: str, n_batches: int = 6):
    rng = random.Random(7)
    keys = [b"%02x" % (i % 256) + rng.randbytes(16) for i in range(N_KEYS)]
    nxt = dict.fromkeys(keys, 1)
    out = []
    for _ in range(n_batches):
        ks, ss = [], []
        for _ in range(BATCH):
            k = rng.choice(keys)
            ks.append(k)
            ss.append(nxt[k])
            nxt[k] += 1
        if mode == "strict-reordered":
            # 5% of events swap sequences with the next event of their key in the batch
            pos: dict[bytes, list[int]] = {}
            for i, k in enumerate(ks):
                pos.setdefault(k, []).append(i)
            for plist in pos.values():
                for a, b in itertools.pairwise(plist):
                    if rng.random() < 0.05:
                        ss[a], ss[b] = ss[b], ss[a]
        if mode == "strict-fresh-keys":
            # new key objects, as the gate stage makes them per batch (no cached hash, no
            # identity hit in a dict)
            ks = [bytes(bytearray(k)) for k in ks]
        out.append((ks, ss, bytes([mode != "latest"]) * BATCH))
    return keys, out


@pytest.mark.benchmark(group="gate-decide-10k")
@pytest.mark.parametrize("mode", ["latest", "strict", "strict-reordered", "strict-fresh-keys"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gate_decide(benchmark, impl, mode):
    keys, batches = gate_batches(mode)

    def fresh_gate():
        gate = impl.SequenceGate(1000, 100_000)
        for k in keys:
            gate.load(k, 0)
        return (gate,), {}

    def decide_all(gate):
        # the batches in order on a fresh gate (sequences must advance)
        for ks, ss, flags in batches:
            gate.decide(ks, ss, flags, 1.0)
            gate.dirty()

    benchmark.pedantic(decide_all, setup=fresh_gate, rounds=5, iterations=1, warmup_rounds=1)
    _report(benchmark, BATCH * len(batches))


# ----------------------------------------------------------------------------- gate keys
def _per_event_keys(slots, sources, pks):
    return [slot_prefix(s) + gate_hash(src, pk) for s, src, pk in zip(slots, sources, pks)]


GATE_KEYS = [pytest.param(_per_event_keys, id="per-event-routing")]
GATE_KEYS += [pytest.param(p.values[0].gate_keys, id=p.id) for p in IMPLS]


@pytest.mark.benchmark(group="gate-keys-10k")
@pytest.mark.parametrize("fn", GATE_KEYS)
def test_gate_keys(benchmark, fn):
    rng = random.Random(3)
    services = ["customers", "orders", "payments", "shipments", "inventory", "products"]
    sources = [f"https://shop.example/{rng.choice(services)}" for _ in range(BATCH)]
    pks = [f"{src[-1]}-{rng.randrange(100_000):06d}" for src in sources]
    slots = [rng.randrange(4096) for _ in range(BATCH)]
    assert fn(slots, sources, pks) == _per_event_keys(slots, sources, pks)
    benchmark(fn, slots, sources, pks)
    _report(benchmark, BATCH)
