"""The compiled sequence gate's table, against the pure-Python twin (hypothesis).

``_core.SequenceGate`` keeps its state in an insertion-ordered open-addressing table of
fixed-size entries (removed keys leave dead entries until a rebuild compacts them; parked
sequences live in a side dict). ``core_ref.SequenceGate`` is a dict of per-key objects.
Random operation sequences over many keys of every length up to ``GATE_KEY_MAX`` (so the
table grows, compacts and probes past removed slots) must give identical answers and
identical observable state after every step: ``len``, ``parked_total``, each key's
``last``/``parked``, membership and ``missing`` order. Eviction never drops a dirty key or
one with parked sequences, on either twin.

``gate_keys`` (one call per batch) must equal
``routing.slot_prefix(slot) + routing.gate_hash(source, partitionkey)`` on both twins.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import core_ref
from aggregator.routing import gate_hash, slot_prefix

try:
    from aggregator import _core
except ImportError:  # only acceptable when the pure core is forced
    _core = None

needs_both = pytest.mark.skipif(_core is None, reason="compiled core not built")
IMPLS = [pytest.param(core_ref, id="python")]
if _core is not None:
    IMPLS.insert(0, pytest.param(_core, id="cython"))

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys: 18-byte gate keys as the service makes them, short keys, keys that differ only by
# trailing zero bytes (entries are zero-padded), the longest allowed and a too-long one.
_SPECIAL = [b"", b"\x00", b"a", b"a\x00", b"a\x00\x00", b"\x00" * 22, b"x" * 22, b"y" * 23]
_GATE = [slot_prefix(i % 7) + gate_hash("svc", f"k{i}") for i in range(120)]
KEYS = _SPECIAL + _GATE
key_st = st.sampled_from(KEYS)
seq_st = st.integers(-3, 40)

op_st = st.one_of(
    st.tuples(
        st.just("decide"),
        st.lists(st.tuples(key_st, seq_st, st.booleans()), max_size=40),
        st.floats(0, 50),
    ),
    st.tuples(
        st.just("load"),
        key_st,
        seq_st,
        st.lists(st.tuples(seq_st, st.floats(0, 50)), max_size=4),
    ),
    st.tuples(st.just("load_many"), st.lists(key_st, max_size=60), seq_st),
    st.tuples(st.just("expired"), st.floats(0, 60), st.sampled_from([0.0, 1.0, 10.0])),
    st.tuples(st.just("skip_gap"), key_st),
    st.tuples(st.just("drop_parked"), key_st),
    st.tuples(st.just("dirty")),
    st.tuples(st.just("evict"), st.integers(-1, 130)),
    st.tuples(st.just("clear")),
    st.tuples(st.just("missing"), st.lists(key_st, max_size=30)),
)


def _apply(gate, op):
    name = op[0]
    try:
        if name == "decide":
            events, now = op[1], op[2]
            keys = [k for k, _, _ in events]
            for k in gate.missing(keys):
                gate.load(k, 0) if len(k) <= 22 else None
            codes, ready = gate.decide(keys, [s for _, s, _ in events],
                                       bytes(f for _, _, f in events), now)
            return bytes(codes), ready
        if name == "load":
            return gate.load(op[1], op[2], op[3])
        if name == "load_many":
            return [_apply(gate, ("load", k, op[2], ())) for k in op[1]]
        if name == "evict":
            # the keys eviction may not drop: dirty or with parked sequences
            kept = {k for k in KEYS if k in gate and gate.parked(k)}
            before = set(k for k in KEYS if k in gate)
            n = gate.evict(op[1])
            gone = before - {k for k in KEYS if k in gate}
            assert not gone & kept
            return n, sorted(gone)
        return getattr(gate, name)(*op[1:])
    except (KeyError, ValueError) as exc:
        return type(exc), exc.args


def _state(gate):
    held = [k for k in KEYS if k in gate]
    return (
        len(gate),
        gate.parked_total,
        [(k, gate.last(k), gate.parked(k)) for k in held],
        gate.missing(KEYS),
    )


@needs_both
@SETTINGS
@given(ops=st.lists(op_st, max_size=60), per_key=st.integers(0, 6), total=st.integers(0, 20))
def test_table_twins_agree(ops, per_key, total):
    fast, ref = _core.SequenceGate(per_key, total), core_ref.SequenceGate(per_key, total)
    for op in ops:
        assert _apply(fast, op) == _apply(ref, op), op
        assert _state(fast) == _state(ref), op
    assert fast.dirty() == ref.dirty()
    assert fast.expired(1e9, 0.0) == ref.expired(1e9, 0.0)


@needs_both
@pytest.mark.parametrize("n", [1, 5, 6, 1000, 20_000])
def test_table_growth_and_eviction_order(n):
    """Many keys through growth, eviction and compaction: the oldest-loaded clean keys go
    first, dirty and parked ones stay, and the twins end identical."""
    keys = [slot_prefix(i % 4096) + gate_hash("s", str(i)) for i in range(n)]
    fast, ref = _core.SequenceGate(10, 100_000), core_ref.SequenceGate(10, 100_000)

    def run(g):
        for k in keys:
            g.load(k, 0)
        dirty, parked = keys[::3], keys[1::7]
        g.decide(dirty, [1] * len(dirty), b"\x01" * len(dirty), 1.0)
        g.decide(parked, [5] * len(parked), b"\x01" * len(parked), 2.0)
        evicted = g.evict(n // 2)
        assert all(k in g for k in dirty + parked)
        return evicted

    assert run(fast) == run(ref)
    assert _state(fast)[:2] == _state(ref)[:2]
    assert fast.missing(keys) == ref.missing(keys)
    assert fast.dirty() == ref.dirty()
    assert fast.evict(0) == ref.evict(0)
    assert fast.missing(keys) == ref.missing(keys)
    for k in keys:  # reload everything: the table compacts and grows again
        fast.load(k, 7)
        ref.load(k, 7)
    assert [fast.last(k) for k in keys] == [ref.last(k) for k in keys] == [7] * n
    assert fast.expired(1e9, 0) == ref.expired(1e9, 0) == []


@pytest.mark.parametrize("impl", IMPLS)
def test_key_length_limit(impl):
    g = impl.SequenceGate(1, 1)
    assert impl.GATE_KEY_MAX == 22
    g.load(b"k" * 22, 1)
    with pytest.raises(ValueError):
        g.load(b"k" * 23, 1)
    assert g.missing([b"k" * 23]) == [b"k" * 23] and len(g) == 1
    with pytest.raises(KeyError):
        g.last(b"k" * 23)
    with pytest.raises(TypeError):  # an unhashable key fails as a dict lookup does
        g.missing([bytearray(b"k")])


# ----------------------------------------------------------------------------- gate keys
text_st = st.text(max_size=40)  # any code point, surrogates included


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(rows=st.lists(st.tuples(st.integers(0, 0xFFFF), text_st, text_st), max_size=30))
def test_gate_keys_equal_routing(impl, rows):
    try:
        want = [slot_prefix(s) + gate_hash(src, pk) for s, src, pk in rows]
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            impl.gate_keys(*zip(*rows))
        return
    slots, sources, pks = ([r[i] for r in rows] for i in range(3))
    assert impl.gate_keys(slots, sources, pks) == want
    assert impl.gate_keys(iter(slots), tuple(sources), pks) == want


@pytest.mark.parametrize("impl", IMPLS)
def test_gate_keys_errors(impl):
    assert impl.gate_keys([], [], []) == []
    with pytest.raises(ValueError):
        impl.gate_keys([1], ["a"], [])
    for slot in (-1, 0x10000):
        with pytest.raises(OverflowError):
            impl.gate_keys([slot], ["a"], ["b"])
    with pytest.raises(TypeError):
        impl.gate_keys([1.0], ["a"], ["b"])
    with pytest.raises(TypeError):
        impl.gate_keys([1], [b"a"], ["b"])
    with pytest.raises(TypeError):
        impl.gate_keys([1], ["a"], [None])
    assert impl.gate_keys([True], ["a"], ["b"]) == [slot_prefix(1) + gate_hash("a", "b")]


# ----------------------------------------------------------------------------- the stage
def test_batch_has_parked_sees_the_transaction(tmp_path):
    """`_load_gate` reads a key's parked rows only when the shard holds any: `has_parked`
    must count the transaction's own parks and unparks, and survive the commit."""
    from aggregator.store import Shard

    shard = Shard(tmp_path / "shard-0", map_size=16 << 20, max_map_size=64 << 20, sync=False)
    try:
        g = slot_prefix(1) + gate_hash("s", "k")
        b = shard.begin()
        assert not b.has_parked()
        b.park(g, 5, 1.0, [0, 0, 1, b"k", b"v", [], 1, 1])
        assert b.has_parked() and b.parked_of(g) == [(5, 1.0)]
        b.commit()
        b = shard.begin()
        assert b.has_parked()
        assert b.unpark(g, 5) is not None
        assert not b.has_parked()
        b.commit()
    finally:
        shard.close()
