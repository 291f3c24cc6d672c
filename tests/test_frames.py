"""Binary ring frames, supervisor → worker: the compiled route-and-frame step and reader
(aggregator._frames) against the pure-Python reference (frames.FrameRouterRef,
protocol.read_frames), and routing against envelope.routing_key + routing.slot_of.

Any records (None or empty key/value, big values, many headers, names that are not UTF-8)
framed by either writer give the same bytes, and read by either reader the same records.
"""

from __future__ import annotations

import json

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import _frames, frames
from aggregator.envelope import routing_key
from aggregator.frames import FrameRouterRef, decode
from aggregator.protocol import (
    FRAMES_MAGIC,
    MSG_RECORDS,
    MSG_STOP,
    frame_messages,
    pack_frame,
    read_frames,
)
from aggregator.routing import slot_of
from tests.support.messages import FakeError, FakeMessage

TOPICS = ["t0", "t1", "t2", "t3"]
TINDEX = {t: i for i, t in enumerate(TOPICS)}
DETECT = [False, True, False, True]
MAX_BYTES = 1 << 16


def _mapped_route(value, headers, key):
    """A stand-in for mapping.route on topic t2: the value's first 4 bytes."""
    return value[:4] if value else None


ROUTE_FNS = [None, None, _mapped_route, None]




def routers(workers):
    return (FrameRouterRef(workers, TINDEX, DETECT, ROUTE_FNS, MAX_BYTES),
            _frames.FrameRouter(workers, TINDEX, DETECT, ROUTE_FNS, MAX_BYTES))


# ---- strategies ---------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-10**30, 10**30)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12)
pk_values = (st.text(max_size=10) | st.sampled_from(["", "c-1", "é✓", "\ud800x", "a\"b"])
             | json_values)


@st.composite
def structured_values(draw):
    """A structured-mode event (or something close to one) as bytes."""
    members = draw(st.lists(st.tuples(
        st.sampled_from(["partitionkey", "id", "data", "partitionke\\u0079", "x"]) |
        st.text(max_size=5),
        pk_values), max_size=6))
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", "\t:\r ")]))
    ascii_ = draw(st.booleans())
    parts = []
    for name, v in members:
        n = name if "\\u" in name else json.dumps(name, ensure_ascii=ascii_)[1:-1]
        parts.append(f'"{n}"{sep[1]}{json.dumps(v, ensure_ascii=ascii_)}')
    text = "{" + sep[0].join(parts) + "}"
    raw = text.encode("utf-8", "surrogatepass")
    kind = draw(st.integers(0, 9))
    if kind == 0:  # a byte changed, inserted or dropped: most of these are not JSON
        i = draw(st.integers(0, len(raw)))
        b = bytes([draw(st.integers(0, 255))])
        raw = draw(st.sampled_from([raw[:i] + b + raw[i + 1:], raw[:i] + b + raw[i:],
                                    raw[:i] + raw[i + 1:]]))
    elif kind == 1:
        raw += draw(st.sampled_from([b" trailing", b"\xff", b"}", b""]))
    elif kind == 2:
        raw = draw(st.sampled_from([b" ", b"\xef\xbb\xbf", b"\n"])) + raw
    elif kind == 3:  # deep nesting, big integers, constants
        raw = draw(st.sampled_from([
            b'{"partitionkey":"p","d":' + b"[" * 300 + b"]" * 300 + b"}",
            b'{"partitionkey":"p","d":' + b"[" * 150 + b"]" * 150 + b"}",
            b'{"partitionkey":"p","n":1' + b"0" * 5000 + b"}",
            b'{"partitionkey":"p","n":1' + b"0" * 700 + b"}",
            b'{"partitionkey":"p","n":1.' + b"0" * 5000 + b"}",
            b'{"partitionkey":"p","n":NaN}', b'{"partitionkey":"p","n":-Infinity}',
            b'{"partitionkey":"p","n":-}', b'{"partitionkey":"p","n":01}',
            b'{"partitionkey":"p","n":1.}', b'{"partitionkey":"p","n":1e}',
            b'{"partitionkey":"p","n":1e+5,"m":-0.5E-3}', b'{"partitionkey":"p",}',
            b'{"partitionkey":"p","a":[1,]}', b'{"partitionkey":"p\x01"}',
            b'{"partitionkey":"\\ud83d\\ude00"}', b'{"partitionkey":"\\ud83d"}',
            b'{"partitionkey":"a\\qb"}', b'{"partitionkey":"\\u00e9"}',
            b'{"partitionkey":"\xed\xa0\x80"}', b'{"partitionkey":"\xc0\xaf"}',
            b'{"partitionkey":"\xf4\x90\x80\x80"}', b'["partitionkey"]',
            b'{"partitionkey":"p"', b'{"partitionkey" "p"}', b'{"partitionkey":tru}',
            b'{"partitionkey":"x","partitionkey":null}', b'{"a":{"partitionkey":"in"}}',
        ]))
    return raw


header_names = (st.sampled_from(["ce_partitionkey", "CE_PartitionKey", "content-type",
                                 "Content-Type", "ce_id", "ce_", "ce_x", "x-other",
                                 "ce_partitionKey", "ce_partitionkey", "naïve", "n\udcff"])
                | st.text(max_size=6))
ct_values = st.sampled_from([b"application/cloudevents+json", b"Application/CloudEvents+JSON;x",
                             b"application/json", b"text/plain", b"application/msgpack",
                             b"application/cloudevents", b"\xff\xfe", b"", b" application/json",
                             b"application/vnd.x+json; charset=utf-8"])


@st.composite
def header_lists(draw):
    if draw(st.integers(0, 5)) == 0:
        return None
    out = []
    for name in draw(st.lists(header_names, max_size=10)):
        if name.lower() == "content-type":
            v = draw(st.none() | ct_values)
        else:
            v = draw(st.none() | st.binary(max_size=12) | st.sampled_from([b"", b"pk-1"]))
        out.append((name, v))
    return out


keys = st.none() | st.binary(max_size=16)
BIG = [bytes([i]) * (MAX_BYTES + d) for i, d in ((120, -1), (121, 0), (122, 1))]  # the limit
values = (st.none() | st.binary(max_size=64) | structured_values() | st.sampled_from(BIG))


@st.composite
def messages(draw):
    out = []
    offs: dict = {}
    for _ in range(draw(st.integers(0, 25))):
        if draw(st.integers(0, 30)) == 0:
            out.append(FakeMessage(None, 0, 0, None, None, None, 0,
                                   error=FakeError(draw(st.sampled_from([-191, 3])))))
            continue
        topic = draw(st.sampled_from(TOPICS))
        part = draw(st.integers(0, 3))
        off = offs.get((topic, part), draw(st.integers(0, 2**40)))
        offs[(topic, part)] = off + 1
        out.append(FakeMessage(topic, part, off, draw(keys), draw(values), draw(header_lists()),
                               draw(st.integers(-1, 2**45))))
    return out


# ---- routing --------------------------------------------------------------------------------

def test_xxh3_of_the_linked_library_is_slot_of():
    for b in [b"", b"k", b"customer-000001", bytes(range(256)) * 17]:
        assert _frames.xxh3_64(b) == xxhash.xxh3_64_intdigest(b)
        assert _frames.xxh3_64(b) % 4096 == slot_of(b)


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_xxh3_any_bytes(b):
    assert _frames.xxh3_64(b) == xxhash.xxh3_64_intdigest(b)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.none() | st.binary(max_size=40) | structured_values(), headers=header_lists(),
       key=keys, ti=st.integers(0, 3))
def test_compiled_routing_key_is_routing_key(value, headers, key, ti):
    _, router = routers(1)
    got, _ = router.routing_key(value, headers, key, ti)
    if ROUTE_FNS[ti] is None:
        assert got == routing_key(value, headers, key, detect=DETECT[ti])
    else:
        assert got == _mapped_route(value, headers, key)


STRUCTURED = [("content-type", b"application/cloudevents+json")]


@pytest.mark.parametrize("value, expected, in_c", [
    (b'{"specversion":"1.0","partitionkey":"c-1","data":{"a":[1,2.5e3,null,true]}}',
     b"c-1", True),
    (b'{ "partitionkey" : "\xc3\xa9" , "x":{"partitionkey":"in"}}', b"\xc3\xa9", True),
    (b'{"partitionkey":"a","partitionkey":"b"}', b"b", True),
    (b'{"partitionkey":"a","partitionkey":1}', b"kafka-key", True),
    (b'{"partitionkey":""}', b"kafka-key", True),
    (b'{"partitionkey":"a",}', b"kafka-key", True),
    (b' {"partitionkey":"a"}', b"kafka-key", True),
    (b'{"partitionkey":"a"}\xff', b"kafka-key", True),
    (b'{"partitionkey":"a"} anything', b"a", True),
    (b'{"partitionkey":"a","n":NaN}', b"kafka-key", True),
    (b'{"partitionkey":"\\u00e9"}', b"\xc3\xa9", False),
    (b'{"partitionke\\u0079":"esc"}', b"esc", False),
    (b'{"partitionkey":"\\ud800"}', b"kafka-key", False),
    (b'{"partitionkey":"a","n":1' + b"0" * 5000 + b"}", b"kafka-key", False),
    (b'{"partitionkey":"a","d":' + b"[" * 3000 + b"]" * 3000 + b"}", b"kafka-key", False),
])
def test_structured_scan_cases(value, expected, in_c):
    _, router = routers(1)
    got, decided_in_c = router.routing_key(value, STRUCTURED, b"kafka-key", 0)
    assert got == routing_key(value, STRUCTURED, b"kafka-key") == expected
    assert decided_in_c == in_c


def test_header_key_and_kafka_key_are_decided_in_c():
    _, router = routers(1)
    h = [("ce_id", b"1"), ("CE_PARTITIONKEY", b"pk"), ("ce_partitionkey", b"other")]
    assert router.routing_key(b"{}", h, b"k", 0) == (b"pk", True)
    assert router.routing_key(b"x", [("ce_partitionkey", None)], b"k", 0) == (b"k", True)
    assert router.routing_key(b"x", None, b"", 0) == (None, True)
    assert router.routing_key(b"x", [("naïve", b"1")], b"k", 0) == (b"k", False)


# ---- writers and readers --------------------------------------------------------------------

def _expected_records(msgs):
    """What the worker must read: the records of `msgs` with the slot of routing_key."""
    out = []
    for m in msgs:
        if m.error() is not None:
            continue
        v = m.value()
        if v is not None and len(v) > MAX_BYTES:
            continue
        ti = TINDEX[m.topic()]
        fn = ROUTE_FNS[ti]
        rk = (routing_key(v, m.headers(), m.key(), detect=DETECT[ti]) if fn is None
              else fn(v, m.headers(), m.key()))
        out.append([ti, m.partition(), m.offset(), m.key(), v,
                    None if m.headers() is None else [tuple(h) for h in m.headers()],
                    m.timestamp()[1], slot_of(rk) if rk is not None else 0])
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.data_too_large])
@given(msgs=messages(), workers=st.integers(1, 4),
       max_message=st.sampled_from([1 << 20, 4096, 300]))
def test_both_routers_write_the_same_bytes_and_both_readers_read_the_records(
        msgs, workers, max_message):
    ref, fast = routers(workers)
    bids = [1 + 10 * w for w in range(workers)]
    a = ref.route(msgs, bids, max_message)
    b = fast.route(msgs, bids, max_message)
    assert a.messages == b.messages
    assert list(a.through.items()) == list(b.through.items())
    assert a.counts == b.counts
    assert a.errors == b.errors
    assert a.oversized == b.oversized
    expected = _expected_records(msgs)
    got = []
    for w in range(workers):
        out = a.messages[w]
        if not a.through:
            assert out == []
            continue
        assert out
        for i, msg in enumerate(out):
            decoded = read_frames(msg)
            assert _frames.read_frames(msg) == decoded
            assert decode(msg) == decoded
            kind, bid, thr, records = decoded
            assert kind == MSG_RECORDS and bid == bids[w] + i
            assert thr == ([[ti, p, o] for (ti, p), o in a.through.items()]
                           if i == len(out) - 1 else [])
            if len(records) > 1:
                assert len(msg) <= max_message
            for r in records:
                assert r[7] % workers == w
            got.extend(records)
    key = lambda r: (r[0], r[1], r[2])  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)
    # each worker's records keep the consumed order
    for w in range(workers):
        mine = [r for r in expected if r[7] % workers == w]
        seen = [r for msg in a.messages[w] for r in read_frames(msg)[3]]
        assert seen == mine


records_st = st.lists(st.tuples(
    st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1),
    st.integers(-2**63, 2**63 - 1), keys, st.none() | st.binary(max_size=3000),
    st.none() | st.lists(st.tuples(st.text(max_size=20).map(
        lambda s: s.encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")),
        st.none() | st.binary(max_size=40)), max_size=40),
    st.integers(-2**63, 2**63 - 1), st.integers(0, 4095)), max_size=12)


@settings(deadline=None)
@given(records_st, st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9),
                                      st.integers(0, 2**62)), max_size=5))
def test_reference_frames_round_trip_through_both_readers(records, thr):
    frames_ = [pack_frame(*r) for r in records]
    thr = [list(t) for t in thr]
    out = frame_messages(frames_, thr, 7, 1 << 22)
    assert len(out) == 1
    want = [MSG_RECORDS, 7, thr, [list(r) for r in records]]
    assert read_frames(out[0]) == want
    assert _frames.read_frames(out[0]) == want
    _lazy_reads_as(out[0], want)


def _lazy_reads_as(msg: bytes, want: list) -> None:
    """`read_frames_lazy` gives `want`: its head, and its records however they are read."""
    kind, bid, thr, recs = _frames.read_frames_lazy(msg)
    assert [kind, bid, thr] == want[:3] and type(recs) is _frames.FrameRecords
    n = len(want[3])
    assert len(recs) == n and list(recs) == want[3] and recs[:] == want[3]
    for a, b, step in [(0, n, 1), (1, n - 1, 1), (0, n, 2), (n - 1, -1, -1), (0, 256, 1),
                       (None, None, -1), (-2, 0, -2)]:
        assert recs[a:b:step] == want[3][a:b:step]
    for i in range(-n, n):
        assert recs[i] == want[3][i]
    for i in (n, -n - 1):
        with pytest.raises(IndexError):
            recs[i]
    assert recs[0:1] is not recs[0:1] and (not n or recs[0] is not recs[0])  # made anew


def test_repeating_headers_are_shared_and_read_exactly():
    """The compiled reader hands out one (name, value) tuple for the repeating CloudEvents
    headers (specversion, source, type, content types) instead of a new one per record;
    per-event headers, other names, None values and values over the cache's limit are
    read as before. 600 distinct types (more than the cache holds) collide and replace
    each other; every record still equals the reference reader's."""
    records = []
    for i in range(3000):
        hdrs = [("ce_specversion", b"1.0"), ("ce_id", b"id-%d" % i),
                ("ce_source", b"/s/%d" % (i % 3)), ("ce_type", b"t.%d" % (i * 7919 % 600)),
                ("content-type", b"application/json"), ("ce_datacontenttype", None),
                ("CE_TYPE", b"upper is another name"), ("ce_source", b"x" * (90 + i % 10)),
                ("ce_sequence", b"%d" % i)]
        records.append((i % 5, i % 3, i, b"k%d" % i, b"{}", hdrs, 17, i % 4096))
    msg = frame_messages([pack_frame(*r) for r in records], [], 1, 1 << 24)[0]
    fast, ref = _frames.read_frames(msg)[3], read_frames(msg)[3]
    assert fast == ref == [list(r) for r in records]
    assert fast[0][5][0] is fast[2999][5][0]  # ("ce_specversion", b"1.0") shared
    assert fast[0][5][2] is fast[3][5][2]  # the same source
    assert fast[0][5][4] is fast[1][5][4]  # content-type
    assert fast[0][5][1] is not fast[1][5][1]  # ce_id: per event
    assert fast[0][5][6] is not fast[1][5][6]  # another name (case counts)
    assert fast[0][5][5] == ("ce_datacontenttype", None)


def test_non_utf8_header_names_survive():
    name = b"ce_\xff\xfe".decode("utf-8", "surrogateescape")
    msg = frame_messages([pack_frame(0, 0, 0, None, b"", [(name, b"v"), ("n", None)], 0, 1)],
                         [], 1, 1 << 20)[0]
    recs = _frames.read_frames(msg)[3]
    assert recs == read_frames(msg)[3]
    assert recs[0][5] == [(name, b"v"), ("n", None)]
    ref, fast = routers(1)
    m = FakeMessage("t0", 0, 5, b"k", b"v", [(name, b"x")], 9)
    assert ref.route([m], [1], 1 << 20).messages == fast.route([m], [1], 1 << 20).messages


@settings(deadline=None)
@given(records_st.filter(bool), st.data())
def test_truncated_or_extended_messages_are_refused_by_both_readers(records, data):
    msg = frame_messages([pack_frame(*r) for r in records], [[1, 2, 3]], 1, 1 << 22)[0]
    cut = data.draw(st.integers(0, len(msg) - 1))
    bad = data.draw(st.sampled_from([msg[:cut], msg + b"\0", bytes([0x90]) + msg[1:],
                                     msg[:1] + b"\x02" + msg[2:]]))
    for reader in (read_frames, _frames.read_frames):
        with pytest.raises(ValueError):
            reader(bad)
    with pytest.raises(ValueError) as eager:
        _frames.read_frames(bad)
    with pytest.raises(ValueError) as lazy:  # checked whole before a record is made
        _frames.read_frames_lazy(bad)
    assert str(lazy.value) == str(eager.value)


@settings(deadline=None)
@given(records_st.filter(bool), st.data())
def test_the_lazy_reader_refuses_or_reads_what_the_reader_does(records, data):
    """Bytes of a message changed at random (frame lengths, field lengths, header counts):
    `read_frames_lazy` raises the error the compiled `read_frames` raises, or reads the same
    records, and both refuse what the reference refuses."""
    frames_ = [pack_frame(*r) for r in records]
    msg = bytearray(frame_messages(frames_, [], 1, 1 << 22)[0])
    heads, at = [], len(msg) - sum(len(f) for f in frames_)
    for f in frames_:  # the bytes of each frame's head, its lengths at 32..43 above all
        heads += [at + k for k in range(44)] + [at + k for k in range(32, 44)] * 3
        at += len(f)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.sampled_from(heads) | st.integers(24, len(msg) - 1))
        msg[i] = data.draw(st.sampled_from([0, 1, 0xFF, 0x7F, msg[i] ^ 1, msg[i] + 1 & 0xFF]))
    msg = bytes(msg)
    try:
        ref = read_frames(msg)
    except ValueError:
        ref = None  # (the compiled readers check more up front: their messages differ)
    try:
        want = _frames.read_frames(msg)
    except ValueError as e:
        assert ref is None
        with pytest.raises(ValueError) as lazy:
            _frames.read_frames_lazy(msg)
        assert str(lazy.value) == str(e)
    else:
        assert want == ref
        _lazy_reads_as(msg, want)


def test_a_frame_that_lies_about_its_length_is_refused():
    f = bytearray(pack_frame(0, 0, 0, b"key", b"value", [("a", b"b")], 0, 0))
    f[0] += 1  # claims one byte more than its fields
    msg = frame_messages([bytes(f), pack_frame(0, 0, 1, None, None, None, 0, 0)], [], 1,
                         1 << 20)[0]
    for reader in (read_frames, _frames.read_frames, _frames.read_frames_lazy):
        with pytest.raises(ValueError):
            reader(msg)


def test_decode_tells_frames_from_msgpack():
    assert decode(msgpack.packb([MSG_STOP])) == [MSG_STOP]
    msg = frame_messages([], [[0, 1, 2]], 3, 1 << 20)[0]
    assert msg[0] == FRAMES_MAGIC
    assert decode(msg) == [MSG_RECORDS, 3, [[0, 1, 2]], []]


def test_errors_oversized_and_counts():
    big = b"x" * (MAX_BYTES + 1)
    msgs = [FakeMessage(None, 0, 0, None, None, None, 0, error=FakeError(-191)),
            FakeMessage("t1", 0, 4, b"k", big, [("h", b"v")], 1),
            FakeMessage("t1", 0, 5, b"k", b"{}", None, 2),
            FakeMessage("t3", 2, 9, None, None, None, 3)]
    for router in routers(2):
        rnd = router.route(msgs, [1, 1], 1 << 20)
        assert [e.code() for e in rnd.errors] == [-191]
        assert rnd.oversized == [[1, 0, 4, b"k", big, [("h", b"v")]]]
        assert rnd.counts == [0, 2, 0, 1]
        assert rnd.through == {(1, 0): 5, (3, 2): 9}
        assert sum(len(read_frames(m)[3]) for out in rnd.messages for m in out) == 2
    for router in routers(2):
        rnd = router.route(msgs[:1], [1, 1], 1 << 20)
        assert rnd.through == {} and rnd.messages == [[], []]


def test_pure_core_selects_the_reference():
    assert frames.IMPLEMENTATION == "cython"
    import subprocess
    import sys
    code = ("import aggregator.frames as f, aggregator.protocol as p;"
            "assert f.IMPLEMENTATION == 'python';"
            "assert f.FrameRouter is f.FrameRouterRef and f.read is p.read_frames")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={"AGGREGATOR_PURE_CORE": "1", "PATH": ""})


def test_structured_events_over_1_mib_route_by_the_kafka_key_as_before():
    """routing_key scans at most 1 MiB (its default), whatever service.max_record_bytes."""
    value = b'{"partitionkey":"json-pk","pad":"' + b"x" * (1 << 20) + b'"}'
    small = b'{"partitionkey":"json-pk"}'
    for cls in (FrameRouterRef, _frames.FrameRouter):
        router = cls(1, TINDEX, DETECT, ROUTE_FNS, 4 << 20)
        for v, pk in ((value, b"kafka-key"), (small, b"json-pk")):
            m = FakeMessage("t0", 0, 1, b"kafka-key", v, STRUCTURED, 0)
            rnd = router.route([m], [1], 8 << 20)
            assert rnd.oversized == []
            assert read_frames(rnd.messages[0][0])[3][0][7] == slot_of(pk)


def test_the_simulated_services_route_in_c_exactly():
    """Every record of the shop workload (binary JSON and msgpack, structured, malformed
    ones too) gets routing_key's key from the C path, without handing it to Python."""
    from aggregator.devtools import simulate

    w = simulate.generate(3, 3000)
    records = list(w.records) + [tuple(b[:4]) for b in simulate.bad_records()]
    for detect in (False, True):
        router = _frames.FrameRouter(1, {"t": 0}, [detect], [None], 1 << 20)
        for _, key, value, headers in records:
            headers = list(headers) if headers else None
            got, in_c = router.routing_key(value, headers, key, 0)
            assert got == routing_key(value, headers, key, detect=detect)
            assert in_c


def test_a_round_of_big_records_then_small_ones():
    """A worker's buffer grown past 32 MiB is let go after its round; the next rounds
    frame as before."""
    big = [FakeMessage("t0", 0, i, b"same-key", bytes([i]) * (1 << 20), None, i)
           for i in range(40)]
    small = [FakeMessage("t0", 0, 40 + i, b"same-key", b"v", None, i) for i in range(3)]
    ref = FrameRouterRef(1, TINDEX, DETECT, ROUTE_FNS, 2 << 20)
    fast = _frames.FrameRouter(1, TINDEX, DETECT, ROUTE_FNS, 2 << 20)
    for batch in (big, small, big):
        a, b = ref.route(batch, [1], 8 << 20), fast.route(batch, [1], 8 << 20)
        assert a.messages == b.messages
        assert [r[2] for m in b.messages[0] for r in read_frames(m)[3]] == \
            [m.offset() for m in batch]
