"""Hypothesis properties of the core, over both implementations.

- Strict mode: whatever the duplicates and the reordering, every key's sequences
  1..n come out of the gate (APPLY codes plus ``ready`` entries, in apply order) exactly
  once each and in increasing order.
- Latest mode: applied sequences per key are strictly increasing and end at n.
- Bloom filter: no false negatives for any hash pairs, and the twins agree bit for bit.
- Random operation sequences give identical outputs on both twins.
"""

from __future__ import annotations

import array
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import core_ref

try:
    from aggregator import _core
except ImportError:  # only acceptable when the pure core is forced
    _core = None

IMPLS = [pytest.param(core_ref, id="python")]
if _core is not None:
    IMPLS.insert(0, pytest.param(_core, id="cython"))

needs_both = pytest.mark.skipif(_core is None, reason="compiled core not built")

APPLY = 0
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U64 = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def shuffled_streams(draw):
    """Events (gkey, seq) for several keys: each key's 1..n, with duplicates, shuffled,
    cut into batches."""
    nkeys = draw(st.integers(1, 4))
    events = []
    lengths = {}
    for k in range(nkeys):
        key = b"key-%d" % k
        n = draw(st.integers(1, 25))
        lengths[key] = n
        seqs = list(range(1, n + 1))
        dups = draw(st.lists(st.sampled_from(seqs), max_size=n))
        events += [(key, s) for s in seqs + dups]
    events = draw(st.permutations(events))
    cuts = sorted(draw(st.lists(st.integers(0, len(events)), max_size=6)))
    bounds = [0, *cuts, len(events)]
    batches = [events[a:b] for a, b in pairwise(bounds)]
    return lengths, batches


def run_gate(gate, batches, strict: bool):
    """Feed batches through the gate; returns {key: [applied seqs in apply order]}."""
    applied: dict[bytes, list[int]] = {}
    now = 0.0
    for batch in batches:
        keys = [k for k, _ in batch]
        seqs = [s for _, s in batch]
        for k in gate.missing(keys):
            gate.load(k, 0)
        now += 1.0
        codes, ready = gate.decide(keys, seqs, bytes([strict]) * len(batch), now)
        rp = 0
        for i, code in enumerate(codes):
            if code == APPLY:
                applied.setdefault(keys[i], []).append(seqs[i])
            while rp < len(ready) and ready[rp][0] == i:
                _, key, seq = ready[rp]
                assert key == keys[i]
                applied.setdefault(key, []).append(seq)
                rp += 1
        assert rp == len(ready)  # ready entries are in event order
    return applied


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(streams=shuffled_streams())
def test_strict_mode_applies_each_sequence_once_in_order(impl, streams):
    lengths, batches = streams
    gate = impl.SequenceGate(max_parked_per_key=100, max_parked_total=1000)
    applied = run_gate(gate, batches, strict=True)
    assert applied == {k: list(range(1, n + 1)) for k, n in lengths.items()}
    assert gate.parked_total == 0
    assert sorted(gate.dirty()) == sorted(lengths.items())


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(streams=shuffled_streams())
def test_latest_mode_applies_increasing_and_ends_at_n(impl, streams):
    lengths, batches = streams
    gate = impl.SequenceGate(max_parked_per_key=100, max_parked_total=1000)
    applied = run_gate(gate, batches, strict=False)
    assert set(applied) == set(lengths)
    for key, seqs in applied.items():
        assert all(a < b for a, b in pairwise(seqs))
        assert seqs[-1] == lengths[key]
        assert gate.last(key) == lengths[key]
    assert gate.parked_total == 0


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(streams=shuffled_streams(), per_key=st.integers(0, 4), total=st.integers(0, 8))
def test_strict_mode_with_bounds_and_gap_skips(impl, streams, per_key, total):
    """With tight parking bounds and skip_gap on FULL (events still FULL after the skip
    are dropped, as the dead-letter policy would), the bounds hold and the applied
    sequences per key are strictly increasing, ending at the gate's ``last``."""
    lengths, batches = streams
    gate = impl.SequenceGate(per_key, total)
    applied: dict[bytes, list[int]] = {}
    for batch in batches:
        keys = [k for k, _ in batch]
        for k in gate.missing(keys):
            gate.load(k, 0)
        for key, seq in batch:  # one event at a time, like the worker's FULL policy
            codes, ready = gate.decide([key], [seq], b"\x01", 0.0)
            assert gate.parked_total <= total
            assert len(gate.parked(key)) <= per_key
            if codes[0] == 3:  # FULL: skip the gap, then retry once
                applied.setdefault(key, []).extend(gate.skip_gap(key))
                codes, ready = gate.decide([key], [seq], b"\x01", 0.0)
            if codes[0] == APPLY:
                applied.setdefault(key, []).append(seq)
            applied.setdefault(key, []).extend(s for _, _, s in ready)
    for key in lengths:
        applied.setdefault(key, []).extend(gate.skip_gap(key))
        while gate.parked(key):
            applied[key].extend(gate.skip_gap(key))
    for key, seqs in applied.items():
        assert all(a < b for a, b in pairwise(seqs)), seqs
        assert not seqs or seqs[-1] == gate.last(key)
        assert not gate.parked(key)


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(
    pairs=st.lists(st.tuples(U64, U64), max_size=60),
    probes=st.lists(st.tuples(U64, U64), max_size=60),
    capacity=st.integers(1, 200),
    fp_rate=st.sampled_from([0.5, 0.1, 0.01, 0.001]),
)
def test_bloom_no_false_negatives_and_parity(impl, pairs, probes, capacity, fp_rate):
    buf = array.array("Q", [v for p in pairs for v in p]).tobytes()
    pbuf = array.array("Q", [v for p in probes for v in p]).tobytes()
    b = impl.BloomFilter(capacity, fp_rate, 2)
    ref = core_ref.BloomFilter(capacity, fp_rate, 2)
    assert b.check_and_add(buf) == ref.check_and_add(buf)
    assert b.contains(buf) == bytearray([1]) * len(pairs)
    assert b.contains(pbuf) == ref.contains(pbuf)
    b.rotate()
    ref.rotate()
    assert b.contains(buf) == bytearray([1]) * len(pairs)
    assert b.check_and_add(pbuf) == ref.check_and_add(pbuf)


# ----------------------------------------------------------------------------- parity
KEYS = [b"a", b"b", b"c"]
gate_op = st.one_of(
    st.tuples(
        st.just("decide"),
        st.lists(st.tuples(st.sampled_from(KEYS), st.integers(-1, 12), st.booleans()), max_size=12),
    ),
    st.tuples(
        st.just("load"),
        st.sampled_from(KEYS),
        st.integers(-1, 6),
        st.lists(st.tuples(st.integers(0, 14), st.floats(0, 20)), max_size=3),
    ),
    st.tuples(st.just("expired"), st.floats(0, 30), st.floats(0, 10)),
    st.tuples(st.just("skip_gap"), st.sampled_from(KEYS)),
    st.tuples(st.just("drop_parked"), st.sampled_from(KEYS)),
    st.tuples(st.just("dirty")),
    st.tuples(st.just("evict"), st.integers(0, 3)),
    st.tuples(st.just("clear")),
)


def _apply(gate, op, now):
    name = op[0]
    try:
        if name == "decide":
            events = op[1]
            keys = [k for k, _, _ in events]
            for k in gate.missing(keys):
                gate.load(k, 0)
            codes, ready = gate.decide(
                keys, [s for _, s, _ in events], bytes(f for _, _, f in events), now
            )
            return bytes(codes), ready
        if name == "load":
            return gate.load(op[1], op[2], op[3])
        return getattr(gate, name)(*op[1:])
    except (KeyError, ValueError) as exc:
        return type(exc)


@needs_both
@SETTINGS
@given(ops=st.lists(gate_op, max_size=40), per_key=st.integers(0, 5), total=st.integers(0, 9))
def test_gate_twins_agree(ops, per_key, total):
    fast, ref = _core.SequenceGate(per_key, total), core_ref.SequenceGate(per_key, total)
    for step, op in enumerate(ops):
        now = float(step)
        assert _apply(fast, op, now) == _apply(ref, op, now), op
        assert fast.parked_total == ref.parked_total
        assert len(fast) == len(ref)
        for k in KEYS:
            if k in ref:
                assert (fast.last(k), fast.parked(k)) == (ref.last(k), ref.parked(k))
            else:
                assert k not in fast
