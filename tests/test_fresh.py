"""The stored freshness map kept as msgpack bytes (aggregator/_fresh.pyx) against msgpack
itself: `read` gives what ``doc_codec.unpack_stored`` gives (or fails as it fails), and a
`Fresh` with entries set packs to the bytes msgpack makes of the updated dict."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import core
from aggregator.doc_codec import pack_record, unpack_stored

pytestmark = pytest.mark.skipif(core.IMPLEMENTATION != "cython",
                                reason="the compiled core is not in use")
if core.IMPLEMENTATION == "cython":
    from aggregator import _fresh

_pack = msgpack.Packer(use_bin_type=True).pack

I64 = 2**63
ints = st.one_of(st.integers(-40, 300), st.integers(-I64, I64 - 1),
                 st.sampled_from([-33, -32, -129, -128, -32769, -32768, -2**31 - 1, -2**31,
                                  127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32,
                                  I64 - 1]))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "é", "日本", "😀", "a" * 31,
                                                        "b" * 32, "c" * 255, "d" * 256]))
entries = st.one_of(st.lists(st.one_of(st.none(), ints, texts), max_size=3),
                    # what the writer here leaves to msgpack: its bytes, its errors
                    st.sampled_from([[True, "t"], [1.5, None], (1, "x"), [2**64, "x"],
                                     [b"raw", None], {"a": 1}, "\ud800", ["\ud800"], None,
                                     list(range(16))]))
values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, texts, st.binary(max_size=20),
              st.floats(allow_nan=False)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(texts, ints), inner, max_size=3)),
    max_leaves=8)
keys = st.one_of(st.sampled_from(["orders", "payments", "customers", "é", "k" * 40]), texts)
maps = st.dictionaries(keys, st.one_of(st.lists(st.one_of(st.none(), ints, texts), max_size=3),
                                      values), max_size=20)


def record(s: dict, v: int = 3, j: bytes = b'{"a":1}') -> bytes:
    return pack_record({"v": v, "d": None, "s": s}, j)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=maps, sets=st.lists(st.tuples(keys, entries), max_size=6),
       v=st.one_of(st.integers(0, 300), st.sampled_from([2**16, 2**32, 2**64 - 1])),
       j=st.binary(max_size=300))
def test_entries_set_pack_as_msgpack_packs_the_updated_dict(s, sets, v, j):
    raw = record(s, v, j)
    got = _fresh.read(raw)
    want = unpack_stored(raw)
    assert type(got["s"]) is _fresh.Fresh
    assert got["v"] == want["v"] and got["j"] == want["j"] and list(got) == list(want)
    f = got["s"]
    d = dict(want["s"])
    for k, e in sets:
        f[k] = e
        d[k] = e
    try:
        expect = _pack(d)
    except Exception as exc:  # an entry msgpack cannot pack: the same error
        with pytest.raises(type(exc)):
            f.pack()
        return
    assert f.pack() == expect
    assert f.pack() == expect  # packed again, from the merged bytes
    f["again"] = [1, "x"]
    d["again"] = [1, "x"]
    assert f.pack() == _pack(d)
    d = msgpack.unpackb(_pack(d), raw=False, strict_map_key=False)  # (tuples read as lists)
    assert f == d and f.as_dict() == d  # a mapping on demand
    f["later"] = [2, None]  # held as a dict from now on
    d["later"] = [2, None]
    assert f.pack() == _pack(d)


@settings(max_examples=300, deadline=None)
@given(s=maps, cut=st.integers(0, 400), flip=st.integers(0, 400), byte=st.integers(0, 255))
def test_read_fails_where_msgpack_fails_and_agrees_where_it_reads(s, cut, flip, byte):
    raw = bytearray(record(s))
    if flip < len(raw):
        raw[flip] = byte
    raw = bytes(raw[:len(raw) - cut % 5])
    try:
        want = unpack_stored(raw)
    except Exception as exc:
        with pytest.raises(type(exc)):
            _fresh.read(raw)
        return
    got = _fresh.read(raw)
    if type(want) is not dict:
        assert repr(got) == repr(want)
        return
    plain = dict(got)  # the "d" form / other records as msgpack reads them, "s" as a dict
    if isinstance(plain.get("s"), _fresh.Fresh):
        plain["s"] = plain["s"].as_dict()
    assert repr(plain) == repr(want)  # (repr: a flipped byte may make a NaN)
    if type(want) is dict and "s" in want and "v" in want:
        assert pack_record(got, got.get("j")) == pack_record(want, want.get("j"))


def test_strings_that_are_not_utf8_and_other_records_are_read_by_msgpack():
    before = _fresh.stats()["deferred"]
    bad = [
        _pack({"v": 1, "j": b"{}", "s": {"a": [1, "x"]}}).replace(b"\xa1x", b"\xa1\xff"),
        _pack({"v": 1, "j": b"{}", "s": {"a": [1, "\xe9"]}}).replace(b"\xc3\xa9", b"\xed\xa0"),
    ]
    for raw in bad:
        with pytest.raises(UnicodeDecodeError):
            unpack_stored(raw)
        with pytest.raises(UnicodeDecodeError):
            _fresh.read(raw)
    others = [
        _pack({"v": 1, "d": {"x": 1}, "s": {}}),  # the "d" form
        _pack({"v": 1, "j": b"{}", "s": {1: [1, None]}}),  # a key that is not a str
        _pack({"v": -1, "j": b"{}", "s": {}}),
        _pack({"v": 1, "j": b"{}", "s": {"a": msgpack.ExtType(1, b"x")}}),
        _pack({"v": 1, "j": b"{}", "s": {"a": [[[[]]]]}}),  # read here
        _pack({"v": 1, "j": b"{}", "s": {}, "x": 1}),
    ]
    for raw in others:
        got = _fresh.read(raw)
        assert got == unpack_stored(raw)
    assert _fresh.stats()["deferred"] - before == len(bad) + len(others) - 1  # [[[[]]]] read


def test_pack_record_takes_a_fresh_map():
    raw = record({"orders": [1, "t1"]})
    got = _fresh.read(raw)
    got["s"]["payments"] = [2, "t2"]
    want = {"v": 3, "d": None, "s": {"orders": [1, "t1"], "payments": [2, "t2"]}}
    assert pack_record(got, b'{"a":1}') == record(want["s"])


# bytes around every boundary of UTF-8: ASCII runs (the eight-byte path), lead bytes
# C0..C2, E0/ED/EF, F0/F4/F5, continuation bytes 80/9F/A0/BF, truncation
_pieces = st.sampled_from([b"a" * 7, b"b" * 9, b"\xc2\x80", b"\xdf\xbf", b"\xc0\x80",
                           b"\xc1\xbf", b"\xe0\xa0\x80", b"\xe0\x9f\xbf", b"\xed\x9f\xbf",
                           b"\xed\xa0\x80", b"\xef\xbf\xbf", b"\xf0\x90\x80\x80",
                           b"\xf0\x8f\xbf\xbf", b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80",
                           b"\xf5\x80\x80\x80", b"\x80", b"\xbf", b"\xe0", b"\xf0\x90",
                           b"\xff", b"\x00"])


@settings(max_examples=400, deadline=None)
@given(raw=st.one_of(st.lists(_pieces, max_size=8).map(b"".join), st.binary(max_size=40)))
def test_strings_are_checked_as_utf8_decoding_checks_them(raw):
    """A freshness map's string is taken exactly when bytes.decode("utf-8") takes it (the
    validator of _utf8.pxd, which _frames.pyx uses for routing keys too)."""
    s = _pack({"src": [1, "x" * len(raw)]})
    s = s.replace(_pack("x" * len(raw)), _pack("x" * len(raw))[:-len(raw) or None] + raw) \
        if raw else s
    record_bytes = b"\x83\xa1v\x01\xa1j\xc4\x02{}\xa1s" + s
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            _fresh.read(record_bytes)
        return
    got = _fresh.read(record_bytes)
    assert type(got["s"]) is _fresh.Fresh
    assert got["s"].as_dict() == {"src": [1, raw.decode("utf-8")]}
