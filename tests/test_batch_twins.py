"""The compiled batch calls of the worker's stages against their pure-Python references
(msgpack's test_discrepancy pattern): hypothesis-generated batches through both give the
same bytes, the same lists, the same errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import _publish, changes

fields = st.tuples(st.integers(0, 65535), st.text(max_size=20), st.integers(0, 2**64 - 1),
                   st.none() | st.binary(max_size=50))


@settings(max_examples=300, deadline=None)
@given(st.lists(fields, max_size=30), st.integers(-(2**63), 2**63 - 1), st.booleans(),
       st.integers(0, 2))
def test_pack_blob_compiled_is_the_reference(rows, ms, is_json, first):
    rows = [(b"dk",) * first + r for r in rows]  # the worker's rows start with the doc key
    want = changes.pack_blob_ref(rows, ms, is_json, first)
    assert _publish.pack_blob(rows, ms, is_json, first) == want
    assert _publish.pack_blob(iter(rows), ms, is_json, first) == want  # any iterable
    got_ms, got_json, recs = changes.blob_records(want)
    assert (got_ms, got_json) == (ms, is_json)
    assert recs == [(r[first], r[first + 1].encode(), r[first + 2], r[first + 3])
                    for r in rows]


def test_pack_blob_takes_any_buffer_as_data():
    rows = [(1, "a", 2, bytearray(b"xy")), (2, "b", 3, memoryview(b"z")), [3, "c", 4, None]]
    assert _publish.pack_blob(rows, 9, True) == changes.pack_blob_ref(rows, 9, True)


@pytest.mark.parametrize("row, error", [
    ((65536, "k", 1, None), struct.error),
    ((-1, "k", 1, None), struct.error),
    ((0, "k", 2**64, None), struct.error),
    ((0, "k", -1, None), struct.error),
    ((0, b"k", 1, None), (TypeError, AttributeError)),
    ((0, "k", 1, 5), TypeError),
    ((0, "k", 1), ValueError),
])
def test_pack_blob_refuses_what_the_reference_refuses(row, error):
    for impl in (changes.pack_blob_ref, _publish.pack_blob):
        with pytest.raises(error):
            impl([(0, "ok", 1, b"")] + [row], 0, True)
