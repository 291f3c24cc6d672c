"""The unsealed-dedup-id table: the compiled `_idtable.IdTable` against the reference
`idtable_ref.IdTable`, over random operation sequences (hypothesis)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import _idtable, idtable_ref

SLOTS = 1 << 16

# few slots and few hashes, so that keys repeat and slots hold several keys; the all-zero
# key (the compiled table's empty cell) included
_slot = st.sampled_from([0, 1, 2, 7, 255, 256, 4096, SLOTS - 1])
_hash = st.one_of(st.just(bytes(16)), st.binary(min_size=16, max_size=16),
                  st.sampled_from([bytes([i]) * 16 for i in range(4)]))
_key = st.builds(lambda s, h: s.to_bytes(2, "big") + h, _slot, _hash)
_op = st.one_of(
    st.tuples(st.just("add"), st.lists(_key, max_size=40)),
    st.tuples(st.just("has"), _key),
    st.tuples(st.just("seal"), st.integers(0, SLOTS), st.integers(0, 50)),
    st.tuples(st.just("from"), st.sampled_from([0, 1, 3, 256, 5000, SLOTS])),
)


def _split(joined: bytes, size: int) -> list[bytes]:
    return sorted(joined[i:i + size] for i in range(0, len(joined), size))


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=30))
def test_compiled_table_matches_the_reference(ops):
    c, r = _idtable.IdTable(), idtable_ref.IdTable()
    for op in ops:
        if op[0] == "add":
            joined = b"".join(op[1])
            c.add(joined)
            r.add(joined)
        elif op[0] == "has":
            assert (op[1] in c) == (op[1] in r)
        elif op[0] == "from":
            assert _split(c.keys(op[1]), 18) == _split(r.keys(op[1]), 18)
            assert _split(c.hashes(op[1]), 16) == _split(r.hashes(op[1]), 16)
        else:
            assert c.seal_slice(op[1], op[2]) == r.seal_slice(op[1], op[2])
        assert len(c) == len(r)
        assert sorted(c.keys()[i:i + 18] for i in range(0, len(c) * 18, 18)) == \
            sorted(r.keys()[i:i + 18] for i in range(0, len(r) * 18, 18))
        assert sorted(c.hashes()[i:i + 16] for i in range(0, len(c) * 16, 16)) == \
            sorted(r.hashes()[i:i + 16] for i in range(0, len(r) * 16, 16))


def test_large_table_grows_and_seals_every_key_once_in_order():
    keys = [os.urandom(18) for _ in range(200_000)]
    t = _idtable.IdTable()
    for i in range(0, len(keys), 1000):
        t.add(b"".join(keys[i:i + 1000]))
    t.add(b"".join(keys[:5000]))  # again: kept once
    assert len(t) == len(keys)
    assert all(k in t for k in keys[::97])
    assert os.urandom(18) not in t
    assert 18 * len(keys) < t.nbytes < 40 * len(keys)  # cells at 53-80 % load
    out, nxt = [], 0
    while nxt < SLOTS:
        chunk, nxt = t.seal_slice(nxt, 2048)
        out.append(chunk)
    joined = b"".join(out)
    assert [joined[i:i + 18] for i in range(0, len(joined), 18)] == sorted(keys)


def test_bad_sizes_are_refused():
    for cls in (_idtable.IdTable, idtable_ref.IdTable):
        t = cls()
        try:
            t.add(b"x" * 17)
        except ValueError:
            pass
        else:
            raise AssertionError("17 bytes accepted")
