"""Real `Worker` objects driven in-process: no Kafka, no supervisor.

The test plays the supervisor: it creates the shared-memory segments (protocol.create_segments),
turns simulated Kafka records into ring messages the way `Supervisor._dispatch` does
(protocol.frame_messages, binary frames), and moves forwarded
view updates between workers by reading each worker's inbound peer rings (forwards.decode).
"""

from __future__ import annotations

import errno
import json
import os
import random
import tempfile
import time
import types
import uuid
from pathlib import Path

import lmdb
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aggregator.store as store_mod
import aggregator.worker as worker_mod
from aggregator import _core, _merge, bloom_snapshot, core_ref, forwards
from aggregator import merge as merge_ref
from aggregator import plan as plan_mod
from aggregator.changes import blob_records, outbox_blobs
from aggregator.config import load_config
from aggregator.control import TOTAL_SLOTS, Slot
from aggregator.devtools import simulate
from aggregator.devtools.encoder import to_binary
from aggregator.envelope import parse, routing_key
from aggregator.frames import decode
from aggregator.protocol import (
    REC_SLOT,
    create_segments,
    frame_messages,
    pack_frame,
    through_list,
    unpack,
)
from aggregator.routing import identity_hash, slot_of, worker_of
from aggregator.store import STORAGE_ERRORS as STORAGE_ERRNOS
from aggregator.store import Shard, ShardError, read_views, shard_path
from aggregator.worker import Worker

MiB = 1 << 20
PACKER = msgpack.Packer(use_bin_type=True)
_unpack = unpack  # what test_reshard imports
N_EVENTS = 3000
INBOUND_RING = 8 * MiB
PEER_RING = 2 * MiB
PARTITIONS = 3


# ---- the harness ---------------------------------------------------------------------------------


class FakeDLQ:
    """Stands in for DeadLetters (which would create a Kafka producer)."""

    def __init__(self) -> None:
        self.sent: list[tuple[list, str, str]] = []
        self.flushes = 0

    def send(self, rec: list, reason: str, message: str) -> None:
        self.sent.append((rec, reason, message))

    def flush(self, timeout: float = 30.0) -> None:
        self.flushes += 1

    def deliver(self, waiting) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass

    @property
    def reasons(self) -> list[str]:
        return [r for _, r, _ in self.sent]


class FakePublisher:
    """Delivers every committed change event at once, into a shared list."""

    def __init__(self, real, sink: list) -> None:
        self.published = self.committed_seq = real.published
        self.enc = real.enc
        self.sink = sink
        self.pending: list = []
        # what a crash left unpublished
        for first, last, blob in outbox_blobs(real.read_after(real.published)):
            self.pending.append((first, last, blob))
            self.committed_seq = last

    @property
    def backlog(self) -> int:
        return self.committed_seq - self.published

    def committed(self, changes) -> None:
        if changes:
            self.pending.extend(changes)
            self.committed_seq = changes[-1][1]

    def pump(self) -> None:
        for first, _, blob in self.pending:
            for seq, (view_id, key, version, data) in enumerate(blob_records(blob)[2], first):
                if seq > self.published:
                    self.sink.append((self.enc.views[view_id], key.decode(), version, data))
        self.pending.clear()
        self.published = self.committed_seq

    def flush(self, timeout: float) -> bool:
        self.pump()
        return True

    def close(self) -> None:
        pass


class Cluster:
    """A control block, the rings and N in-process workers on one data dir."""

    def __init__(self, data_dir: Path, n: int, overrides: dict | None = None,
                 peer_ring: int = PEER_RING) -> None:
        opts = {
            "service.data_dir": str(data_dir),
            "service.workers": n,
            "service.lmdb_sync": False,
            "service.lmdb_map_size": 64 * MiB,
            "service.ring_bytes": INBOUND_RING,
            "gate.gap_timeout_ms": 600_000,
        }
        opts.update(overrides or {})
        self.cfg = load_config(None, opts, env={})
        self.data_dir = Path(data_dir)
        self.n = n
        self.prefix = "aggtest-" + uuid.uuid4().hex[:12]
        self.segments = create_segments(self.prefix, n, INBOUND_RING, peer_ring)
        self.ctl = self.segments.ctl
        self.rings = self.segments.rings
        self.workers: list[Worker | None] = [None] * n
        self.dlqs: list[FakeDLQ] = [FakeDLQ() for _ in range(n)]
        self.published: list = []  # (view, key, version, data) change events, in order
        self.pending: dict[int, list] = {i: [] for i in range(n)}
        self.next_batch = [1] * n
        self.next_offset: dict[tuple[int, int], int] = {}
        self.tindex = {t: i for i, t in enumerate(self.cfg.topics())}

    # lifecycle
    def boot(self, i: int | None = None) -> None:
        for j in range(self.n) if i is None else [i]:
            w = Worker(self.cfg, j, self.prefix)
            w.boot()
            w.dlq = self.dlqs[j]
            if w.publisher is not None:
                w.publisher = FakePublisher(w.publisher, self.published)
            self.workers[j] = w

    def stop(self, i: int) -> None:
        """Close worker i, as if its process ended: what it had not read from its peer rings
        is lost (its next boot resets them)."""
        w = self.workers[i]
        w.close()
        for r in [w.inbound, *w.peer_in.values(), *w.peer_out.values()]:
            r.close()
        w.ctl.close()
        self.workers[i] = None
        self.pending[i] = []

    def restart(self, i: int) -> Worker:
        self.stop(i)
        self.boot(i)
        return self.workers[i]

    def close(self) -> None:
        for i, w in enumerate(self.workers):
            if w is not None:
                self.stop(i)
        self.segments.close()

    def views(self) -> dict:
        """read_views needs the shards closed (LMDB: one open per process)."""
        for i, w in enumerate(self.workers):
            if w is not None:
                self.stop(i)
        return read_views(self.data_dir, list(self.cfg.views))

    # records
    def ring_records(self, records, partition_of=None, offsets=None) -> list[list]:
        """Kafka records (topic, key, value, headers) → ring records with fresh offsets
        (continuing per partition, as if produced after everything before)."""
        out = []
        for n_, (topic, key, value, headers) in enumerate(records):
            ti = self.tindex[topic]
            part = (slot_of(key) % PARTITIONS if key else 0) if partition_of is None \
                else partition_of(key)
            if offsets is None:
                off = self.next_offset.get((ti, part), 0)
                self.next_offset[(ti, part)] = off + 1
            else:
                off = offsets[n_]
            rk = routing_key(value, headers, key)
            slot = slot_of(rk) if rk is not None else 0
            out.append([ti, part, off, key, value, [[k, v] for k, v in headers], 1000 + off,
                        slot])
        return out

    # the supervisor side
    def dispatch(self, recs: list[list]) -> None:
        """One consume round: each worker gets its records and the through-offsets."""
        per: list[list] = [[] for _ in range(self.n)]
        through: dict[tuple[int, int], int] = {}
        for r in recs:
            per[worker_of(r[REC_SLOT], self.n)].append(r)
            tp = (r[0], r[1])
            through[tp] = max(through.get(tp, -1), r[2])
        thr = through_list(through)
        for i, w in enumerate(self.workers):
            # in binary frames, as the supervisor writes them (one message: the ring takes
            # it whole), read back as the worker reads what the ring carries
            msg, = frame_messages([pack_frame(*r) for r in per[i]], thr, self.next_batch[i],
                                  self.segments.inbound[i].max_message)
            bid = self.next_batch[i]
            self.next_batch[i] = bid + 1
            peers, self.pending[i] = self.pending[i], []
            w.process([decode(msg)], peers)
            assert w.ctl.get(i, Slot.ACK_BATCH) == bid
            self.pump()

    def pump(self) -> None:
        for w in self.workers:
            if w is not None:
                w._pump_outbox()
        for i, w in enumerate(self.workers):
            if w is None:
                continue
            for r in w.peer_in.values():
                while True:
                    msgs = r.get_many(1000)
                    if not msgs:
                        break
                    self.pending[i].extend(forwards.decode(m) for m in msgs)

    def settle(self, rounds: int = 50) -> None:
        """Deliver forwarded updates until no worker has any left."""
        for _ in range(rounds):
            self.pump()
            if not any(self.pending.values()):
                return
            for i, w in enumerate(self.workers):
                peers, self.pending[i] = self.pending[i], []
                if peers:
                    w.process([], peers)
        raise AssertionError("forwarded updates did not settle")

    def feed(self, recs: list[list], rng: random.Random, max_batch: int = 300) -> None:
        i = 0
        while i < len(recs):
            k = rng.randint(1, max_batch)
            self.dispatch(recs[i:i + k])
            i += k
        self.settle()

    def stat(self, i: int, slot: Slot) -> int:
        return self.ctl.get(i, slot)

    def total(self, slot: Slot) -> int:
        return sum(self.ctl.get(i, slot) for i in range(self.n))


@pytest.fixture
def make_cluster(tmp_path):
    made: list[Cluster] = []

    def make(n: int, sub: str = "data", **kw) -> Cluster:
        c = Cluster(tmp_path / sub, n, **kw)
        made.append(c)
        c.boot()
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="module")
def workload() -> simulate.Workload:
    return simulate.generate(7, N_EVENTS)


@pytest.fixture(scope="module")
def oracle(workload) -> dict:
    return simulate.expected_views(workload)


def assert_views(got: dict, want: dict) -> None:
    for view in want:
        g, w = got[view], want[view]
        bad = sorted(k for k in set(g) | set(w) if g.get(k) != w.get(k))
        assert not bad, (f"view {view}: {len(bad)} of {len(w)} documents differ, e.g. "
                         f"{bad[0]}: got {g.get(bad[0])!r}, want {w.get(bad[0])!r}")
    assert set(got) == set(want)


# ---- 1. the simulated workload -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_workload_equals_oracle(make_cluster, workload, oracle, n):
    c = make_cluster(n)
    recs = c.ring_records(workload.records)
    c.feed(recs, random.Random(n))
    assert c.total(Slot.RECORDS) == len(workload.records)
    assert c.total(Slot.DUPLICATES) == workload.stats["duplicates"]
    assert c.total(Slot.DEADLETTERED) == 0
    assert c.total(Slot.PARKED) == 0
    if n > 1:
        assert c.total(Slot.FORWARDED) > 0
        for i in range(n):
            for j in range(n):
                if i != j:
                    assert c.ctl.link_applied(j, i) == c.ctl.link_committed(i, j) > 0
    assert_views(c.views(), oracle)
    # the shards hold the through-offset of every partition
    for i in range(n):
        s = Shard(shard_path(c.data_dir, i), readonly=True)
        try:
            offs = s.offsets()
        finally:
            s.close()
        topics = c.cfg.topics()
        assert {(c.tindex[t], p): o for (t, p), o in offs.items()} == {
            tp: o - 1 for tp, o in c.next_offset.items()} and len(offs) > len(topics)


def test_workload_in_one_big_batch(make_cluster, workload, oracle):
    c = make_cluster(2)
    c.dispatch(c.ring_records(workload.records))
    c.settle()
    assert_views(c.views(), oracle)


# ---- 2. redelivery -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_redelivery_changes_nothing(make_cluster, workload, oracle, n):
    c = make_cluster(n)
    recs = c.ring_records(workload.records)
    c.feed(recs, random.Random(10 + n))
    applied = c.total(Slot.APPLIED)
    records = c.total(Slot.RECORDS)

    # same offsets (a rewind after a crash): skipped by the through-offsets
    c.feed(recs, random.Random(20 + n))
    assert c.total(Slot.RECORDS) == records  # not even counted: below the through-offset
    assert c.total(Slot.APPLIED) == applied

    # new offsets (the producer re-sent everything): dropped by dedup
    again = c.ring_records(workload.records)
    assert again[0][2] > recs[0][2] or again[0][1] != recs[0][1]
    c.feed(again, random.Random(30 + n))
    assert c.total(Slot.RECORDS) == 2 * records
    assert c.total(Slot.APPLIED) == applied
    assert c.total(Slot.DUPLICATES) == records + workload.stats["duplicates"]
    assert_views(c.views(), oracle)


# ---- 3. restart ----------------------------------------------------------------------------------


def test_restart_single_worker(make_cluster, workload, oracle):
    c = make_cluster(1)
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    c.feed(recs[:half], random.Random(1))
    ids = sum(1 for _ in c.workers[0].shard.dedup_entries())
    assert ids > 0
    w = c.restart(0)
    assert w._bloom_loaded == ids
    # the rebuilt bloom knows every stored id
    hashes = _identity_hashes(recs[:half])
    assert all(w.bloom.contains(b"".join(hashes)))
    assert w.through == {tp: max(r[2] for r in recs[:half] if (r[0], r[1]) == tp)
                         for tp in {(r[0], r[1]) for r in recs[:half]}}
    # the rest, plus a rewind over some of the first half
    c.feed(recs[half - 400:], random.Random(2))
    assert_views(c.views(), oracle)


def test_restart_redelivered_with_new_offsets(make_cluster, workload, oracle):
    c = make_cluster(1)
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    c.feed(recs[:half], random.Random(3))
    c.restart(0)
    # everything again with new offsets: the first half only dedup can catch, after a boot
    c.feed(c.ring_records(workload.records), random.Random(4))
    assert_views(c.views(), oracle)


def _identity_hashes(recs: list[list]) -> list[bytes]:
    out = []
    for r in recs:
        ev = parse(r[4], r[5], r[3])
        out.append(identity_hash(ev.source, ev.id))
    return out


def test_restart_of_one_of_two_workers(make_cluster, workload, oracle):
    c = make_cluster(2)
    recs = c.ring_records(workload.records)
    third = len(recs) // 3
    rng = random.Random(5)
    c.feed(recs[:third], rng)
    # worker 1 stops with forwarded updates of worker 0 not yet read from its ring
    c.dispatch(recs[third:2 * third])
    c.workers[0]._pump_outbox()
    c.restart(1)
    c.feed(recs[2 * third - 300:], rng)
    assert_views(c.views(), oracle)


def test_restart_of_a_sender_whose_outbox_was_pruned(make_cluster, workload, oracle):
    """A worker restarted after its peer applied (and it pruned) every forwarded message
    must continue the link sequence, not start again at 1 (the peer would drop it all)."""
    c = make_cluster(2)
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    c.feed(recs[:half], random.Random(6))
    c.dispatch([])  # one more batch each: prunes what the peer acknowledged
    c.settle()
    c.dispatch([])
    for i in range(2):
        s = c.workers[i].shard
        assert list(s.outbox_after(1 - i, 0)) == [], "outbox should be pruned"
        assert c.ctl.link_committed(i, 1 - i) > 0
    c.restart(0)
    c.restart(1)
    c.feed(recs[half:], random.Random(7))
    assert_views(c.views(), oracle)


def test_restart_sender_while_forwarded_messages_are_in_flight(make_cluster, workload, oracle):
    c = make_cluster(2)
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    c.feed(recs[:half], random.Random(8))
    c.dispatch(recs[half:half + 500])
    c.pump()  # worker 1 holds (in `pending`) messages worker 0 forwarded; then 0 restarts
    c.restart(0)
    c.feed(recs[half + 500:], random.Random(9))
    assert_views(c.views(), oracle)


# ---- MAP_FULL inside the worker ------------------------------------------------------------------


def test_map_full_grows_and_retries(make_cluster, workload, oracle):
    c = make_cluster(2, overrides={"service.lmdb_map_size": MiB,
                                   "service.lmdb_max_map_size": 256 * MiB})
    recs = c.ring_records(workload.records)
    # big batches: several MAP_FULL aborts and retries (late events park across them)
    c.feed(recs, random.Random(11), max_batch=1500)
    sizes = [c.workers[i].shard.env.info()["map_size"] for i in range(2)]
    assert max(sizes) > MiB
    assert_views(c.views(), oracle)


def test_map_full_at_the_maximum_is_an_error(make_cluster, workload):
    c = make_cluster(1, overrides={"service.lmdb_map_size": MiB,
                                   "service.lmdb_max_map_size": MiB})
    c.dispatch(c.ring_records(workload.records[:10]))
    assert c.stat(0, Slot.COMMITS) == 1
    before = c.workers[0].shard.offsets()
    big = c.ring_records([
        _event("products", "shop.product.upserted", f"big-{i}", 1,
               {"product_id": f"big-{i}", "blob": "x" * 8000}, f"big-{i}") for i in range(300)])
    with pytest.raises(ShardError, match="map full"):
        c.dispatch(big)
    assert c.stat(0, Slot.COMMITS) == 1
    assert c.workers[0].shard.offsets() == before
    assert not any(k.startswith("big-") for k in c.views()["product"])


# ---- 4. property: any interleaving gives the clean views -----------------------------------------

PROP_KEYS = ("k0", "k1", "k2", "k3")
CORES = {
    "cython": types.SimpleNamespace(BloomFilter=_core.BloomFilter,
                                    SequenceGate=_core.SequenceGate, IMPLEMENTATION="cython"),
    "python": types.SimpleNamespace(BloomFilter=core_ref.BloomFilter,
                                    SequenceGate=core_ref.SequenceGate, IMPLEMENTATION="python"),
}


def _event(source: str, type_: str, pk: str, seq: int, data: dict, eid: str) -> tuple:
    topic = simulate.SOURCES[source].topic
    attrs = {"id": eid, "source": simulate.SOURCES[source].uri, "type": type_,
             "time": f"2025-01-01T00:00:{seq % 60:02d}.000Z", "partitionkey": pk,
             "sequence": seq}
    headers, value = to_binary(attrs, data)
    return (topic, pk.encode(), value, headers)


@st.composite
def streams(draw):
    """Clean per-key streams of inventory (strict, `add`) and orders (latest) events."""
    events = []
    for k in draw(st.lists(st.sampled_from(PROP_KEYS), min_size=1, max_size=3, unique=True)):
        for seq in range(1, draw(st.integers(0, 6)) + 1):
            delta = draw(st.integers(-20, 20))
            events.append(_event("inventory", "shop.inventory.adjusted", f"p-{k}", seq,
                                 {"product_id": f"p-{k}", "delta": delta, "n": seq},
                                 f"inv-{k}-{seq}"))
        for seq in range(1, draw(st.integers(0, 5)) + 1):
            data = {"order_id": f"o-{k}", "customer_id": f"c-{k}", "status": f"s{seq}",
                    "amount_cents": draw(st.integers(0, 10_000))}
            type_ = "shop.order.placed" if seq == 1 else "shop.order.updated"
            events.append(_event("orders", type_, f"o-{k}", seq, data, f"ord-{k}-{seq}"))
    return events


@st.composite
def deliveries(draw):
    clean = draw(streams())
    # duplicates: re-sent records (same bytes, their own offsets)
    dups = draw(st.lists(st.sampled_from(clean), max_size=len(clean))) if clean else []
    messy = draw(st.permutations(clean + dups))
    cuts = draw(st.lists(st.integers(1, 6), min_size=1, max_size=20))
    return clean, messy, cuts, draw(st.sampled_from([1, 2]))


def _run(records: list, n: int, cuts: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        c = Cluster(Path(d), n)
        try:
            c.boot()
            recs = c.ring_records(records)
            i = 0
            k = 0
            while i < len(recs):
                size = cuts[k % len(cuts)]
                k += 1
                c.dispatch(recs[i:i + size])
                i += size
            c.settle()
            parked = c.total(Slot.PARKED)
            dlq = sum(len(q.sent) for q in c.dlqs)
            views = c.views()
        finally:
            c.close()
    assert parked == 0 and dlq == 0
    return views


def _direct(clean: list) -> dict:
    """The expected views, straight from the clean streams."""
    product: dict = {}
    order: dict = {}
    customer: dict = {}
    for _, _, value, headers in clean:
        h = dict(headers)
        data = json.loads(value)
        if h["ce_source"] == b"/shop/inventory":
            d = product.setdefault(data["product_id"], {})
            d["stock"] = d.get("stock", 0) + data["delta"]
            d["adjustments"] = d.get("adjustments", 0) + 1
        else:
            order[data["order_id"]] = {"order": data}  # clean order: the last one wins
            customer[data["customer_id"]] = {"orders": {data["order_id"]: {
                "status": data["status"], "amount_cents": data["amount_cents"]}}}
    return {"customer": customer, "order": order, "product": product}


@pytest.mark.parametrize("impl", sorted(CORES))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=deliveries())
def test_any_interleaving_gives_the_clean_views(impl, case):
    clean, messy, cuts, n = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(worker_mod, "core", CORES[impl])
        want = _run(clean, n, [len(clean) or 1])
        assert want == _direct(clean)
        got = _run(messy, n, cuts)
    assert got == want


def test_the_core_swap_reaches_the_worker(make_cluster, monkeypatch):
    monkeypatch.setattr(worker_mod, "core", CORES["python"])
    c = make_cluster(1)
    assert isinstance(c.workers[0].bloom, core_ref.BloomFilter)
    assert isinstance(c.workers[0].gate, core_ref.SequenceGate)


# ---- 5. gap policy -------------------------------------------------------------------------------


def _inventory(c: Cluster, pk: str, seqs, tag: str = "") -> list[list]:
    return c.ring_records([
        _event("inventory", "shop.inventory.adjusted", pk, s,
               {"product_id": pk, "delta": 10 ** s}, f"gap-{pk}-{s}{tag}") for s in seqs])


def _parked_rows(c: Cluster, i: int = 0) -> int:
    return c.workers[i].shard.stat()["parked"]


GAP_MS = 300


def test_gap_skip_after_timeout(make_cluster):
    c = make_cluster(1, overrides={"gate.gap_timeout_ms": GAP_MS, "gate.gap_policy": "skip"})
    c.dispatch(_inventory(c, "p-1", [1, 3, 4, 6]))  # 2 and 5 never come
    assert c.stat(0, Slot.PARKED) == 3
    assert _parked_rows(c) == 3
    c.workers[0].process([], [])  # not yet expired
    assert c.stat(0, Slot.GAPS_SKIPPED) == 0
    time.sleep(GAP_MS / 1000 + 0.05)
    c.workers[0].process([], [])
    assert c.stat(0, Slot.GAPS_SKIPPED) == 1  # 3 and 4 applied; 6 waits for its own timeout
    assert c.stat(0, Slot.PARKED) == 1
    # 6 was parked at the same time: expired as well, next round
    c.workers[0].process([], [])
    assert c.stat(0, Slot.GAPS_SKIPPED) == 2
    assert c.stat(0, Slot.PARKED) == 0
    assert _parked_rows(c) == 0
    assert c.dlqs[0].sent == []
    views = c.views()
    assert views["product"]["p-1"] == {"stock": 10 + 1000 + 10_000 + 1_000_000,
                                       "adjustments": 4}


def test_gap_skip_then_late_event_is_stale(make_cluster):
    c = make_cluster(1, overrides={"gate.gap_timeout_ms": GAP_MS, "gate.gap_policy": "skip"})
    c.dispatch(_inventory(c, "p-1", [1, 3]))
    time.sleep(GAP_MS / 1000 + 0.05)
    c.workers[0].process([], [])
    c.dispatch(_inventory(c, "p-1", [2, 4]))  # 2 is too late now
    assert c.stat(0, Slot.STALE) == 1
    assert c.views()["product"]["p-1"] == {"stock": 10 + 1000 + 10_000, "adjustments": 3}


def test_gap_dead_letter_after_timeout(make_cluster):
    c = make_cluster(1, overrides={"gate.gap_timeout_ms": GAP_MS,
                                   "gate.gap_policy": "dead-letter"})
    recs = _inventory(c, "p-1", [1, 3, 4])
    c.dispatch(recs)
    assert _parked_rows(c) == 2
    time.sleep(GAP_MS / 1000 + 0.05)
    c.workers[0].process([], [])
    assert c.dlqs[0].reasons == ["sequence_gap_timeout"] * 2
    assert [r[2] for r, _, _ in c.dlqs[0].sent] == [recs[1][2], recs[2][2]]
    assert [r[4] for r, _, _ in c.dlqs[0].sent] == [recs[1][4], recs[2][4]]
    assert _parked_rows(c) == 0
    assert c.stat(0, Slot.PARKED) == 0
    assert c.stat(0, Slot.DEADLETTERED) == 2
    # the stream continues after the dead-lettered sequences
    c.dispatch(_inventory(c, "p-1", [2, 5]))
    assert c.stat(0, Slot.STALE) == 1
    assert c.views()["product"]["p-1"] == {"stock": 10 + 100_000, "adjustments": 2}


@pytest.mark.parametrize("policy", ["skip", "dead-letter"])
def test_gap_expires_after_a_restart(make_cluster, policy):
    """Events parked before a restart must still expire, even if their key sees no new
    event after the restart."""
    c = make_cluster(1, overrides={"gate.gap_timeout_ms": GAP_MS, "gate.gap_policy": policy})
    c.dispatch(_inventory(c, "p-1", [1, 3]) + _inventory(c, "p-2", [2]))
    assert _parked_rows(c) == 2
    w = c.restart(0)
    assert w.gate.parked_total == 2
    assert c.stat(0, Slot.PARKED) == 2
    time.sleep(GAP_MS / 1000 + 0.05)
    w.process([], [])
    assert _parked_rows(c) == 0
    views = c.views()
    if policy == "skip":
        assert c.dlqs[0].sent == []
        assert views["product"] == {"p-1": {"stock": 1010, "adjustments": 2},
                                    "p-2": {"stock": 100, "adjustments": 1}}
    else:
        assert sorted(c.dlqs[0].reasons) == ["sequence_gap_timeout"] * 2
        assert views["product"] == {"p-1": {"stock": 10, "adjustments": 1}}


@pytest.mark.parametrize("policy", ["skip", "dead-letter"])
def test_time_stopped_does_not_count_toward_a_gap(make_cluster, policy):
    """A worker stopped for longer than gap_timeout_ms: after the restart its parked events
    wait a full timeout again, so the missing event, read from the backlog right after the
    restart, still fills the gap (it must not be skipped or dead-lettered at boot)."""
    c = make_cluster(1, overrides={"gate.gap_timeout_ms": GAP_MS, "gate.gap_policy": policy})
    c.dispatch(_inventory(c, "p-1", [2, 3]))
    time.sleep(GAP_MS / 1000 + 0.05)  # stopped: nothing processed while the clock ran
    w = c.restart(0)
    w.process([], [])  # a batch at boot, before the backlog: nothing expires
    assert c.stat(0, Slot.GAPS_SKIPPED) == 0
    assert c.dlqs[0].sent == []
    c.dispatch(_inventory(c, "p-1", [1]))
    assert c.stat(0, Slot.PARKED) == 0
    assert c.stat(0, Slot.STALE) == 0
    assert c.views()["product"]["p-1"] == {"stock": 1110, "adjustments": 3}


def test_gap_filled_after_a_restart(make_cluster):
    c = make_cluster(1)
    c.dispatch(_inventory(c, "p-1", [2, 3]))
    c.restart(0)
    c.dispatch(_inventory(c, "p-1", [1]))
    assert c.stat(0, Slot.PARKED) == 0
    assert c.views()["product"]["p-1"] == {"stock": 1110, "adjustments": 3}


def test_gap_overflow_skip_and_dead_letter(make_cluster):
    over = {"gate.max_parked_per_key": 2, "gate.max_parked_total": 10}
    c = make_cluster(1, sub="skip", overrides={**over, "gate.gap_policy": "skip"})
    c.dispatch(_inventory(c, "p-1", [1, 3, 4, 5]))  # 5 does not fit: skip the gap at 2
    assert c.stat(0, Slot.GAPS_SKIPPED) == 1
    assert c.stat(0, Slot.PARKED) == 0
    assert c.views()["product"]["p-1"]["adjustments"] == 4

    d = make_cluster(1, sub="dlq", overrides={**over, "gate.gap_policy": "dead-letter"})
    recs = _inventory(d, "p-1", [1, 3, 4, 5])
    d.dispatch(recs)
    assert d.dlqs[0].reasons == ["sequence_gap_overflow"]
    assert d.dlqs[0].sent[0][0][2] == recs[3][2]
    assert d.stat(0, Slot.PARKED) == 2
    d.dispatch(_inventory(d, "p-1", [2]))
    assert d.stat(0, Slot.PARKED) == 0
    assert d.views()["product"]["p-1"] == {"stock": 11110, "adjustments": 4}


# ---- 6. malformed records ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_malformed_records_are_dead_lettered(make_cluster, workload, oracle, n):
    c = make_cluster(n)
    bad = simulate.bad_records()
    good = list(workload.records)
    mixed = list(good)
    rng = random.Random(12)
    for b in bad:
        mixed.insert(rng.randrange(len(mixed) + 1), tuple(b[:4]))
    recs = c.ring_records(mixed)
    c.feed(recs, random.Random(13))
    sent = [x for q in c.dlqs for x in q.sent]
    assert sorted(r for _, r, _ in sent) == sorted(b.reason for b in bad)
    # the dead-lettered record is the ring record (topic index, partition, offset, key,
    # value, headers as (name, value) tuples): find each bad record by its position
    by_pos = {(rec[0], rec[1], rec[2]): (rec, reason) for rec, reason, _ in sent}
    for b in bad:
        pos = mixed.index(tuple(b[:4]))
        r = recs[pos]
        rec, reason = by_pos[(r[0], r[1], r[2])]
        assert reason == b.reason, b
        assert (rec[3], bytes(rec[4]), rec[5]) == (b.key, b.value, [tuple(h) for h in b.headers])
    assert c.total(Slot.DEADLETTERED) == len(bad)
    assert all(q.flushes > 0 for q in c.dlqs if q.sent)
    # the batches still committed every good record, and every offset
    assert c.total(Slot.RECORDS) == len(mixed)
    views = c.views()
    assert_views(views, oracle)
    for i in range(n):
        s = Shard(shard_path(c.data_dir, i), readonly=True)
        try:
            assert len(s.offsets()) == len(c.next_offset)
        finally:
            s.close()


def test_merge_error_is_dead_lettered_and_the_rest_applies(make_cluster):
    c = make_cluster(1)
    ok = _event("inventory", "shop.inventory.adjusted", "p-1", 1,
                {"product_id": "p-1", "delta": 5}, "m-1")
    bad_delta = _event("inventory", "shop.inventory.adjusted", "p-2", 1,
                       {"product_id": "p-2", "delta": "five"}, "m-2")
    no_key = _event("orders", "shop.order.placed", "o-1", 1, {"order_id": "o-1"}, "m-3")
    recs = c.ring_records([ok, bad_delta, no_key])
    c.dispatch(recs)
    assert sorted(c.dlqs[0].reasons) == ["merge_error", "merge_error"]
    views = c.views()
    assert views["product"] == {"p-1": {"stock": 5, "adjustments": 1}}
    assert views["order"] == {}  # the event is dead-lettered as a whole


# ---- 7. bloom false positives --------------------------------------------------------------------


class AlwaysMaybe:
    """A bloom filter that answers "maybe seen" for everything."""

    def __init__(self, real) -> None:
        self._real = real
        self.calls = 0

    def check_and_add(self, hashes):
        out = self._real.check_and_add(hashes)
        self.calls += 1
        return bytearray(b"\x01" * len(out))

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("n", [1, 2])
def test_bloom_false_positives_drop_nothing(make_cluster, workload, oracle, n):
    c = make_cluster(n)
    for w in c.workers:
        w.bloom = AlwaysMaybe(w.bloom)
    c.feed(c.ring_records(workload.records), random.Random(14))
    assert all(w.bloom.calls > 0 for w in c.workers)
    assert c.total(Slot.DUPLICATES) == workload.stats["duplicates"]
    assert_views(c.views(), oracle)


# ---- forwarded messages larger than a peer ring message ------------------------------------------


def test_forwarded_updates_larger_than_a_peer_ring_message(make_cluster, workload, oracle):
    c = make_cluster(2, peer_ring=128 << 10)  # 64 KiB max message
    c.feed(c.ring_records(workload.records), random.Random(15), max_batch=3000)
    assert_views(c.views(), oracle)


# ---- bloom generations: rotation, pruning of the exact index, rebuild at boot --------------------


def test_bloom_rotation_prunes_and_rebuilds(make_cluster, workload, oracle):
    c = make_cluster(1, overrides={"dedup.bloom_capacity": 300, "dedup.bloom_generations": 3})
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    c.feed(recs[:half], random.Random(16), max_batch=50)
    w = c.workers[0]
    live = w.bloom.live_generations
    assert w.bloom.generation >= 3  # rotated several times
    stored = sorted({g for g, _ in w.shard.dedup_entries()})
    assert stored and set(stored) <= set(live)  # dropped generations are pruned
    assert w.shard.get_meta("bloom_generation") == w.bloom.generation
    n_ids = w.shard.stat()["dedup"]
    assert n_ids == sum(1 for _ in w.shard.dedup_entries())
    w = c.restart(0)
    assert w.bloom.live_generations == live
    assert w._bloom_loaded == n_ids
    # late duplicates beyond the dedup window are still dropped by the sequence gate
    c.feed(recs[half - 200:], random.Random(17), max_batch=50)
    c.feed(c.ring_records(workload.records[:400]), random.Random(18))
    assert_views(c.views(), oracle)


# ---- merge failures undo everything the event changed --------------------------------------------


def test_merge_error_after_an_earlier_op_changed_the_document(make_cluster):
    """The reviews feed upserts, then adds: a bad rating fails after the upsert. Neither the
    upsert nor the customer view's count may survive, and earlier updates of the same
    documents in the same transaction must."""
    c = make_cluster(1)
    good = _event("reviews", "shop.review.posted", "r-1", 1,
                  {"review_id": "r-1", "product_id": "p-1", "customer_id": "c-1",
                   "rating": 4}, "v-1")
    bad = _event("reviews", "shop.review.posted", "r-2", 1,
                 {"review_id": "r-2", "product_id": "p-1", "customer_id": "c-1",
                  "rating": "four"}, "v-2")
    c.dispatch(c.ring_records([good, bad]))  # one transaction
    assert c.dlqs[0].reasons == ["merge_error"]
    views = c.views()
    assert views["product"] == {"p-1": {"reviews": {"r-1": {"rating": 4, "customer_id": "c-1"}},
                                        "rating_sum": 4, "review_count": 1}}
    assert views["customer"] == {"c-1": {"reviews_written": 1}}


def test_document_error_midway_through_a_plan_is_undone(make_cluster):
    """An error that only the document shows (adding to a string) stops a plan after its
    first op changed the document, in the compiled merge as in the reference (phase 1 only
    checks event values): the replay restores the document, and the same transaction's
    earlier update survives."""
    c = make_cluster(1, overrides={
        "views": {"a": {"feeds": [
            {"source": "orders", "types": ["shop.order.placed"], "key": "partitionkey",
             "ops": [{"op": "set", "path": "status", "from": "data.status"}]},
            {"source": "orders", "types": ["shop.order.updated"], "key": "partitionkey",
             "ops": [{"op": "add", "path": "n", "value": 1},
                     {"op": "set", "path": "last", "from": "data.status"},
                     {"op": "add", "path": "status", "from": "data.amount_cents"}]},
        ]}},
        "sources": {"orders": {"topic": "shop.orders", "ordering": "latest"}},
    })
    data = {"order_id": "o-1", "customer_id": "c-1", "status": "placed", "amount_cents": 1}
    placed = _event("orders", "shop.order.placed", "o-1", 1, data, "e-1")
    updated = _event("orders", "shop.order.updated", "o-1", 2, data, "e-2")
    c.dispatch(c.ring_records([placed, updated]))  # one transaction
    assert c.dlqs[0].reasons == ["merge_error"]
    assert c.views()["a"] == {"o-1": {"status": "placed"}}


def test_event_data_shared_by_two_views_is_not_mutated_through_either(make_cluster):
    """`set` stores the event's data by reference; a later event's op writing inside that
    value must not reach the other view's document (the plan clones when the view has such
    an op)."""
    c = make_cluster(1, overrides={
        "views": {
            "a": {"feeds": [
                {"source": "orders", "types": ["shop.order.placed"], "key": "partitionkey",
                 "ops": [{"op": "set", "path": "order", "from": "data"}]},
                {"source": "orders", "types": ["shop.order.updated"], "key": "partitionkey",
                 "ops": [{"op": "add", "path": "order.changes", "value": 1}]},
            ]},
            "b": {"feeds": [
                {"source": "orders", "types": ["shop.order.placed"], "key": "partitionkey",
                 "ops": [{"op": "set", "path": "copy", "from": "data"}]},
            ]},
        },
        "sources": {"orders": {"topic": "shop.orders", "ordering": "latest"}},
    })
    data = {"order_id": "o-1", "customer_id": "c-1", "status": "placed", "amount_cents": 1}
    placed = _event("orders", "shop.order.placed", "o-1", 1, data, "e-1")
    updated = _event("orders", "shop.order.updated", "o-1", 2, data, "e-2")
    c.dispatch(c.ring_records([placed, updated]))  # one transaction
    assert c.dlqs[0].sent == []
    views = c.views()
    assert views["a"] == {"o-1": {"order": {**data, "changes": 1}}}
    assert views["b"] == {"o-1": {"copy": data}}


# ---- change events --------------------------------------------------------------------------


def _rebuild_from_changes(published) -> dict:
    """What a downstream consumer builds: dedup by (view, key, version), gate by version."""
    docs: dict = {}
    last: dict = {}
    for view, key, version, data in published:
        if version <= last.get((view, key), 0):
            continue
        assert version == last.get((view, key), 0) + 1, f"{view}/{key}: gap before {version}"
        last[(view, key)] = version
        if data is None:
            docs.get(view, {}).pop(key, None)
        else:
            docs.setdefault(view, {})[key] = json.loads(data)
    return docs


def test_compiled_and_reference_merge_store_and_publish_the_same(make_cluster, workload,
                                                                  monkeypatch):
    """The shop workload through two workers (forwarded updates included) with the compiled
    merge ops and with the reference: the same views and the same change events, in order."""
    results = []
    for compile_ops, plan_type in ((_merge.compile_ops, _merge.MergePlan),
                                   (merge_ref.compile_ops, merge_ref.MergePlan)):
        monkeypatch.setattr(plan_mod, "compile_ops", compile_ops)
        c = make_cluster(2, sub=plan_type.__module__)
        assert all(type(f.merge) is plan_type for f in c.workers[0].plan.feeds)
        c.feed(c.ring_records(workload.records), random.Random(5))
        for w in c.workers:
            w.publisher.pump()
        results.append((c.views(), c.published))
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1] and results[0][1]


@pytest.mark.parametrize("n", [1, 2])
def test_change_events_rebuild_the_views(make_cluster, workload, oracle, n):
    c = make_cluster(n)
    c.feed(c.ring_records(workload.records), random.Random(21))
    for w in c.workers:
        w.publisher.pump()
    assert _rebuild_from_changes(c.published) == oracle


def test_change_events_survive_a_crash_before_publishing(make_cluster, workload, oracle):
    """Committed changes that were never handed to the producer are published at boot."""
    c = make_cluster(1)
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    c.workers[0].publisher.pump = lambda: None  # the process dies before publishing
    c.feed(recs[:half], random.Random(22))
    assert c.workers[0].publisher.pending
    before = len(c.published)
    w = c.restart(0)
    w.publisher.pump()
    assert len(c.published) > before
    c.feed(recs[half:], random.Random(23))
    w.publisher.pump()
    assert _rebuild_from_changes(c.published) == oracle



def _logged_rows(shard) -> int:
    """Change blobs of the outbox stored without the data their doc_log record holds."""
    from aggregator.changes import BLOB_LOGGED

    with shard.env.begin(db=shard.db["changes"]) as txn:
        return sum(1 for k, v in txn.cursor() if len(k) == 16 and v[1] & BLOB_LOGGED)


@pytest.mark.parametrize("checkpoint_bytes", [32 * MiB, 150_000])
def test_logged_change_blobs_survive_a_crash_and_checkpoints(make_cluster, workload, oracle,
                                                             monkeypatch, checkpoint_bytes):
    """Change blobs stored without the data of the commit's doc_log record (format 6):
    nothing is published before the worker dies, so its boot reads every change from the
    outbox with the data put back; with a small `doc_checkpoint_bytes`, checkpoints come
    while blobs are still undelivered and rewrite them with their data first. Every change
    event reaches the sink as the worker made it (the views rebuilt from them are exact)."""
    rewritten = []
    real = store_mod.resolve_changes
    monkeypatch.setattr(store_mod, "resolve_changes",
                        lambda *a: rewritten.append(real(*a)) or rewritten[-1])
    c = make_cluster(1, overrides={"service.doc_checkpoint_bytes": checkpoint_bytes})
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    c.workers[0].publisher.pump = lambda: None  # the process dies before publishing
    c.feed(recs[:half], random.Random(31))
    shard = c.workers[0].shard
    if checkpoint_bytes > 1 << 20:  # no checkpoint: every commit's blob refers to its log
        assert _logged_rows(shard) > 0 and not rewritten
    else:  # undelivered logged blobs were rewritten whole before the log they refer to went
        assert sum(rewritten) > 0
    w = c.restart(0)
    w.publisher.pump()
    c.feed(recs[half:], random.Random(32))
    w.publisher.pump()
    assert _rebuild_from_changes(c.published) == oracle
    versions: dict = {}
    for view, key, version, _ in c.published:  # each version once, in order
        assert version == versions.get((view, key), 0) + 1
        versions[(view, key)] = version

# ---- data-disk errors: the transaction is rolled back and the same batch applied again -----------


@pytest.fixture
def flaky_commits(monkeypatch):
    """Factory: ``flaky_commits(fails) -> log``; commit call number k (1, 2, ... over every
    worker) raises ``fails(k)`` when that returns an exception, after aborting the
    transaction as LMDB does. `log` gets (call number, raised, STORAGE_BLOCKED of worker 0
    at the call). Retry pauses are shortened to milliseconds."""
    monkeypatch.setattr(worker_mod, "STORAGE_RETRY_S", (0.001, 0.004))
    real = store_mod.Batch.commit

    def install(fails, ctl_of=lambda: None):
        calls: list[tuple[int, bool, int]] = []

        def commit(self):
            k = len(calls) + 1
            exc = fails(k)
            ctl = ctl_of()
            calls.append((k, exc is not None, ctl.get(0, Slot.STORAGE_BLOCKED) if ctl else 0))
            if exc is not None:
                self.txn.abort()
                raise exc
            real(self)

        monkeypatch.setattr(store_mod.Batch, "commit", commit)
        return calls

    return install


DISK_ERRORS = (
    lambda: lmdb.DiskError("mdb_txn_commit: No space left on device"),
    lambda: lmdb.Error("mdb_txn_commit: Read-only file system"),
    lambda: lmdb.Error("mdb_txn_commit: Disk quota exceeded"),
    lambda: lmdb.Error("mdb_txn_commit: Input/output error"),
)


@pytest.mark.parametrize("n", [1, 2])
def test_data_disk_errors_roll_back_and_retry_the_batch(make_cluster, workload, oracle,
                                                       flaky_commits, n):
    """Most commits fail once or twice (full, read-only, quota, I/O): every batch is applied
    again until it commits, with nothing of a failed attempt left: views exact, duplicates
    and dead letters counted once, no dead letter sent twice, the bloom filter not inflated
    by the retries."""
    bad = simulate.bad_records()
    mixed = list(workload.records)
    rng = random.Random(31)
    for b in bad:
        mixed.insert(rng.randrange(len(mixed) + 1), tuple(b[:4]))
    clean = make_cluster(n, sub="clean")
    clean.feed(clean.ring_records(mixed), random.Random(32))

    c = make_cluster(n)
    calls = flaky_commits(lambda k: DISK_ERRORS[k % 4]() if k % 5 in (1, 2) else None,
                          lambda: c.ctl)
    c.feed(c.ring_records(mixed), random.Random(32))
    failed = sum(1 for _, f, _ in calls if f)
    assert failed >= 10
    # while a worker retries, its row shows the errno; once committed, 0
    after_failure = [blocked for (_, f, _), (_, _, blocked) in zip(calls, calls[1:]) if f]
    assert any(after_failure) and set(after_failure) <= {0, *STORAGE_ERRNOS}
    assert c.total(Slot.STORAGE_ERRORS) == failed
    assert c.total(Slot.STORAGE_BLOCKED) == 0
    for slot in (Slot.RECORDS, Slot.APPLIED, Slot.DUPLICATES, Slot.STALE, Slot.DEADLETTERED,
                 Slot.COMMITS):
        assert c.total(slot) == clean.total(slot), slot.name
    assert sorted(r for q in c.dlqs for r in q.reasons) == sorted(b.reason for b in bad)
    assert [(w.bloom.generation, w.bloom.count) for w in c.workers] == \
        [(w.bloom.generation, w.bloom.count) for w in clean.workers]
    assert_views(c.views(), oracle)


def test_a_rolled_back_bloom_rotation_is_stored_by_the_retry(make_cluster, workload, oracle,
                                                             flaky_commits):
    c = make_cluster(1, overrides={"dedup.bloom_capacity": 300, "dedup.bloom_generations": 3})
    w = c.workers[0]
    seen = {"gen": w.bloom.generation}

    def fails(k):  # the first commit of each transaction that rotated the filter
        if w.bloom.generation != seen["gen"]:
            seen["gen"] = w.bloom.generation
            return DISK_ERRORS[0]()
        return None

    calls = flaky_commits(fails)
    recs = c.ring_records(workload.records)
    c.feed(recs, random.Random(33), max_batch=50)
    assert sum(1 for _, f, _ in calls if f) >= 3
    assert w.shard.get_meta("bloom_generation") == w.bloom.generation
    live = w.bloom.live_generations
    stored = sorted({g for g, _ in w.shard.dedup_entries()})
    assert stored and set(stored) <= set(live)  # dropped generations pruned after all
    w = c.restart(0)
    assert w.bloom.live_generations == live
    assert_views(c.views(), oracle)


def test_mdb_panic_reopens_the_environment(make_cluster, workload, oracle, flaky_commits,
                                           monkeypatch, caplog):
    """A failed write of the meta page leaves LMDB refusing every transaction (MDB_PANIC)
    until the environment is opened again: the worker reopens it and carries on."""
    c = make_cluster(1)
    w = c.workers[0]
    flaky_commits(lambda k: DISK_ERRORS[0]() if k == 3 else None)
    real_begin = Shard.begin
    panics = []

    def begin(self):
        if len(panics) < 2 and w.blocked_code:  # after the failed commit, until reopened
            panics.append(1)
            raise lmdb.PanicError("mdb_txn_begin: MDB_PANIC: Update of meta page failed")
        return real_begin(self)

    monkeypatch.setattr(Shard, "begin", begin)
    reopened = []
    real_reopen = Shard.reopen
    monkeypatch.setattr(Shard, "reopen", lambda self: (reopened.append(1), real_reopen(self)))
    with caplog.at_level("ERROR", logger="aggregator.worker"):
        c.feed(c.ring_records(workload.records), random.Random(34))
    assert panics and reopened
    assert "data disk full" in caplog.text and "I/O error" not in caplog.text
    assert_views(c.views(), oracle)


def test_other_lmdb_errors_are_not_retried(make_cluster, workload, flaky_commits):
    c = make_cluster(1)
    flaky_commits(lambda k: lmdb.CorruptedError("mdb_txn_commit: MDB_CORRUPTED"))
    with pytest.raises(lmdb.CorruptedError):
        c.dispatch(c.ring_records(workload.records[:20]))
    assert c.stat(0, Slot.COMMITS) == 0 and c.stat(0, Slot.STORAGE_ERRORS) == 0


@pytest.mark.parametrize("writemap", [False, True])
def test_lmdb_writemap_switch_opens_the_shard_so(make_cluster, workload, oracle, writemap):
    """service.lmdb_writemap decides how the worker opens its shard: with it, WRITEMAP and
    data.mdb allocated up to the map size; without, neither; the views are the same."""
    c = make_cluster(2, overrides={"service.lmdb_writemap": writemap})
    for w in c.workers:
        assert w.shard.env.flags()["writemap"] is writemap
    c.feed(c.ring_records(workload.records), random.Random(36))
    for w in c.workers:
        st = os.stat(w.shard.path / "data.mdb")
        allocated, size = st.st_blocks * 512, w.shard.env.info()["map_size"]
        assert (allocated >= size) is writemap, (allocated, size)
    assert_views(c.views(), oracle)
    assert load_config(None, {}, env={}).service.lmdb_writemap is True  # the default
    assert load_config(None, {}, env={"AGGREGATOR__SERVICE__LMDB_WRITEMAP": "false"}
                       ).service.lmdb_writemap is False


@pytest.mark.parametrize("writemap", [False, True])
def test_lmdb_resident_budget_drops_map_pages_and_the_views_are_the_same(
        make_cluster, workload, oracle, writemap):
    """service.lmdb_resident_bytes: with a budget smaller than a transaction's pages the
    workers unmap their shard's pages after (nearly) every commit; the views are the same."""
    c = make_cluster(2, overrides={"service.lmdb_writemap": writemap,
                                   "service.lmdb_resident_bytes": 64 * 1024})
    c.feed(c.ring_records(workload.records), random.Random(37))
    assert all(w.shard.residency.drops > 0 for w in c.workers)
    assert_views(c.views(), oracle)
    assert load_config(None, {}, env={}).service.lmdb_resident_bytes == 64 << 20  # the default
    cfg = load_config(None, {}, env={"AGGREGATOR__SERVICE__LMDB_RESIDENT_BYTES": "0"})
    assert cfg.service.lmdb_resident_bytes == 0
    c0 = make_cluster(1, "zero", overrides={"service.lmdb_resident_bytes": 0})
    assert c0.workers[0].shard.residency is None  # 0: unbounded, no check at all


def test_writemap_grow_refused_by_the_disk_is_retried(make_cluster, workload, oracle,
                                                      monkeypatch, caplog):
    """service.lmdb_writemap: the map's blocks are allocated before it grows; a disk that
    refuses them (ENOSPC from posix_fallocate) blocks the worker like a failed commit: the
    batch is rolled back, the worker waits and retries, and the views end up exact."""
    monkeypatch.setattr(worker_mod, "STORAGE_RETRY_S", (0.001, 0.004))
    real = store_mod._allocate_map
    refused = []

    def allocate(path, size):
        if size > MiB and len(refused) < 3:  # every grow is refused three times
            refused.append(size)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, size)
        refused.clear()

    monkeypatch.setattr(store_mod, "_allocate_map", allocate)
    c = make_cluster(1, overrides={"service.lmdb_writemap": True, "service.lmdb_sync": True,
                                   "service.lmdb_map_size": MiB,
                                   "service.lmdb_max_map_size": 64 * MiB})
    w = c.workers[0]
    assert w.shard.env.flags()["writemap"]
    with caplog.at_level("ERROR", logger="aggregator.worker"):
        c.feed(c.ring_records(workload.records), random.Random(35))
    assert w.shard.env.info()["map_size"] > MiB  # it grew, after the refusals
    assert c.stat(0, Slot.STORAGE_ERRORS) >= 3 and c.stat(0, Slot.STORAGE_BLOCKED) == 0
    assert "data disk full" in caplog.text
    assert_views(c.views(), oracle)


# ---- 9. the shard's totals -----------------------------------------------------------------------


class Killed(BaseException):
    """The process died here (a SIGKILL after the LMDB commit, before anything else)."""


def _shard_totals(c: Cluster) -> dict[str, int]:
    """The shards' totals summed, as stored (read through the open workers' shards)."""
    out = dict.fromkeys(store_mod.TOTALS, 0)
    for w in c.workers:
        t = w.shard.totals()
        for k in out:
            out[k] += t[k]
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_totals_are_exact_through_kills_after_the_commit(make_cluster, workload, n):
    """A worker killed right after its commit (before the control block hears of the batch)
    every few batches: the shards' totals, and the control block once the replacement booted,
    count every committed batch exactly once (the oracle's counts). With the counters added
    to the control block after the commit, as before, each kill lost a batch."""
    bad = simulate.bad_records()
    mixed = list(workload.records)
    rng = random.Random(41)
    for b in bad:
        mixed.insert(rng.randrange(len(mixed) + 1), tuple(b[:4]))
    c = make_cluster(n)
    recs = c.ring_records(mixed)
    victim = n - 1  # the last worker of a round: the others got their records
    calls = [0]
    kills = 0

    def arm(w: Worker) -> None:
        real = w._post_commit

        def post_commit():
            calls[0] += 1
            if calls[0] % 4 == 0:
                raise Killed
            real()

        w._post_commit = post_commit

    arm(c.workers[victim])
    i = 0
    while i < len(recs):
        k = rng.randint(1, 300)
        try:
            c.dispatch(recs[i:i + k])
        except Killed:
            kills += 1
            arm(c.restart(victim))  # the batch is durable: the supervisor does not resend it
        i += k
        c.settle()
    assert kills >= 5
    applied = simulate.applied_events(workload)
    want = {"records": len(mixed), "applied": len(applied),
            "duplicates": workload.stats["duplicates"],
            "stale": len(workload.events) - len(applied), "gaps_skipped": 0,
            "deadlettered": len(bad)}
    got = {name: c.total(slot) for name, slot in zip(store_mod.TOTALS, TOTAL_SLOTS)}
    assert {k: got[k] for k in want} == want
    assert (got["forwarded"] > 0) == (n > 1)
    assert _shard_totals(c) == got
    # a restart of everything starts from the shards' totals
    c.close()
    again = make_cluster(n)
    assert {name: again.total(slot) for name, slot in zip(store_mod.TOTALS, TOTAL_SLOTS)} == got


def test_a_shard_without_totals_starts_them_from_zero(make_cluster, workload):
    """A data dir written before meta "totals" existed opens and counts from then on."""
    c = make_cluster(1)
    recs = c.ring_records(workload.records)
    c.feed(recs[:500], random.Random(1))
    w = c.workers[0]
    with w.shard.env.begin(write=True, db=w.shard.db["meta"]) as txn:
        assert txn.delete(store_mod.TOTALS_KEY.encode())  # as an older build left it
    w = c.restart(0)
    assert c.total(Slot.APPLIED) == 0 and w.totals["since"] == 0
    t0 = time.time()
    c.feed(recs[500:700], random.Random(2))
    assert c.total(Slot.RECORDS) == 200 == w.shard.totals()["records"]
    assert t0 - 1 <= w.shard.totals()["since"] / 1000 <= time.time()


# ---- 10. the saved bloom filter (bloom_snapshot.py) ----------------------------------------------


def _index_hashes(w: Worker) -> bytes:
    return b"".join(h for _, h in w.shard.dedup_entries())


def _assert_bloom_covers_index(w: Worker) -> None:
    """The safety property: every id of the exact index is "maybe" in the filter."""
    hashes = _index_hashes(w)
    flags = w.bloom.contains(hashes)
    assert flags.count(0) == 0, f"{flags.count(0)} of {len(flags)} indexed ids not in the filter"


SMALL_BLOOM = {"dedup.bloom_capacity": 1_000, "dedup.bloom_generations": 3}


def test_boot_restores_the_saved_bloom_and_tops_it_up_from_the_log(make_cluster, workload,
                                                                 oracle):
    c = make_cluster(1, overrides=SMALL_BLOOM)
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    c.feed(recs[:half], random.Random(1))
    w = c.workers[0]
    assert w.save_bloom_every == 10_000
    w.save_bloom()
    saved, gen = w.snap_seq, w.bloom.generation
    assert saved == w.dedup_log_seq > 0
    c.feed(recs[half:], random.Random(2))  # logged after the saved filter, not saved again
    w = c.restart(0)
    assert w._bloom_how.startswith(f"restored (dedup log {saved})") and w._bloom_loaded > 0
    assert w.bloom.generation > gen  # rotations after the save were replayed
    _assert_bloom_covers_index(w)
    rebuilt = w._new_bloom()
    w.bloom, keep = rebuilt, w.bloom
    w._rebuild_bloom()
    probes = _index_hashes(w) + b"".join(identity_hash("x", str(i)) for i in range(3000))
    assert keep.contains(probes) == rebuilt.contains(probes)  # the same answers
    w.bloom = keep
    # the next batch prunes the log up to the saved filter
    c.feed(c.ring_records(workload.records[:50]), random.Random(3))  # duplicates: no new ids
    assert w.dedup_log_pruned == saved
    assert [s for s, _, _ in w.shard.dedup_log_after(0)][0] == saved + 1
    c.feed(recs, random.Random(4))  # everything again: nothing applied twice
    assert c.total(Slot.APPLIED) == len(simulate.applied_events(workload))
    assert_views(c.views(), oracle)


@pytest.mark.parametrize("damage", ["missing", "torn", "flipped", "stale", "other shard",
                                    "newer than the shard", "other parameters"])
def test_an_unusable_saved_bloom_means_a_full_rebuild(make_cluster, workload, damage):
    """A saved filter that could miss ids is never used: the boot rebuilds from the index."""
    c = make_cluster(1, overrides=SMALL_BLOOM)
    recs = c.ring_records(workload.records)
    c.feed(recs[:800], random.Random(1))
    w = c.workers[0]
    w.save_bloom()
    path = bloom_snapshot.path_of(w.shard.path)
    old = path.read_bytes()
    c.feed(recs[800:1600], random.Random(2))
    w.save_bloom()
    c.feed(recs[1600:1700], random.Random(3))  # prunes the log up to the second save
    assert w.dedup_log_pruned > 0
    data = path.read_bytes()
    overrides = SMALL_BLOOM
    if damage == "missing":
        path.unlink()
    elif damage == "torn":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "flipped":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "stale":  # e.g. written late by a fenced worker
        path.write_bytes(old)
    elif damage == "other shard":
        w.shard.put_meta(shard_token="f" * 32)
    elif damage == "newer than the shard":
        w.shard.put_meta(dedup_log_seq=1, dedup_log_pruned=0)
    else:
        overrides = {**SMALL_BLOOM, "dedup.bloom_capacity": 1_001}
    c.stop(0)
    if damage == "other parameters":
        c.cfg = load_config(None, {"service.data_dir": str(c.data_dir), "service.workers": 1,
                                   "service.lmdb_sync": False, "service.lmdb_map_size": 64 * MiB,
                                   "service.ring_bytes": INBOUND_RING,
                                   "gate.gap_timeout_ms": 600_000, **overrides}, env={})
    c.boot(0)
    w = c.workers[0]
    assert w._bloom_how.startswith("rebuilt from the dedup index"), w._bloom_how
    _assert_bloom_covers_index(w)


@pytest.mark.parametrize("seed", range(4))
def test_saved_bloom_never_misses_an_indexed_id_through_random_kills(make_cluster, workload,
                                                                     oracle, seed):
    """Batches, saves (some left behind as stale copies), kills between any two of them:
    after every boot every id of the exact index is in the filter, and nothing is applied
    twice."""
    rng = random.Random(seed)
    c = make_cluster(1, overrides=SMALL_BLOOM)
    w = c.workers[0]
    w.save_bloom_every = rng.choice([200, 500, 10_000])
    recs = c.ring_records(workload.records)
    copies: list[bytes] = []
    i = 0
    restored = 0
    while i < len(recs):
        k = rng.randint(50, 400)
        c.feed(recs[i:i + k], rng)
        i += k
        path = bloom_snapshot.path_of(w.shard.path)
        op = rng.random()
        if op < 0.3:
            w.save_bloom()
            copies.append(path.read_bytes())
        elif op < 0.6:
            if copies and rng.random() < 0.3:
                path.write_bytes(rng.choice(copies))  # an older file comes back
            w = c.restart(0)
            w.save_bloom_every = rng.choice([200, 500, 10_000])
            restored += w._bloom_how.startswith("restored")
            _assert_bloom_covers_index(w)
    c.feed(recs, rng)  # everything again
    assert c.total(Slot.APPLIED) == len(simulate.applied_events(workload))
    assert restored > 0
    assert_views(c.views(), oracle)


# ---- the sequence and document logs: checkpoints through kills ---------------------------------


def _kill_at_every_second_checkpoint(make_cluster, workload, monkeypatch, method: str,
                                     where: str, overrides: dict, logged, seed: int):
    """Feed the workload in rounds of 20-200 records through 2 workers whose `Batch.<method>`
    checkpoints every few batches (`overrides`); every 2nd checkpoint, a worker dies inside
    the checkpoint's transaction (written, not committed) or right after its commit
    (`where`), and the round is delivered again to every worker started again. Returns the
    cluster, after asserting that checkpoints, kills and a non-empty log (`logged(shard)`)
    were all seen."""
    real = getattr(store_mod.Batch, method)
    made, kills, due = [0], [0], [False]

    def checkpoint(self):
        n = real(self)
        made[0] += 1
        if made[0] % 2 == 0:
            if where == "in_checkpoint":
                raise Killed
            due[0] = True  # this worker's _post_commit, right after its commit
        return n

    monkeypatch.setattr(store_mod.Batch, method, checkpoint)
    c = make_cluster(2, overrides=overrides)

    def arm(w: Worker) -> None:
        real_post = w._post_commit

        def post_commit():
            if due[0]:
                due[0] = False
                raise Killed
            real_post()

        w._post_commit = post_commit

    for w in c.workers:
        arm(w)
    recs = c.ring_records(workload.records)
    rng = random.Random(seed)
    i = 0
    logged_seen = False
    while i < len(recs):
        k = rng.randint(20, 200)
        while True:
            try:  # (forwarded updates write documents too: settle inside the round)
                c.dispatch(recs[i:i + k])
                c.settle()
                break
            except Killed:  # every worker starts again and the round is delivered again
                kills[0] += 1
                for j in range(c.n):
                    arm(c.restart(j))
        logged_seen |= any(logged(w.shard) for w in c.workers)
        i += k
    print(f"checkpoints {made[0]}, kills {kills[0]}")
    assert made[0] >= 6 and kills[0] >= 3 and logged_seen, (made, kills)
    return c


@pytest.mark.parametrize("impl", ["cython", "python"])
@pytest.mark.parametrize("where", ["in_checkpoint", "after_checkpoint_commit"])
def test_seq_checkpoints_are_exact_through_kills(make_cluster, workload, oracle, monkeypatch,
                                                 impl, where):
    """A small `gate.seq_checkpoint_rows` makes the workers checkpoint their sequence log
    every few batches, and workers die in and after every 2nd checkpoint (fault point
    ``seq_checkpoint``). The views, every applied count (no loss and no double apply: a
    sequence row lost between log and checkpoint would apply its stream's events again, or
    park them) and the parked events stay exact, with either gate core."""
    monkeypatch.setattr(worker_mod, "core", CORES[impl])
    c = _kill_at_every_second_checkpoint(
        make_cluster, workload, monkeypatch, "checkpoint_seqs", where,
        {"gate.seq_checkpoint_rows": 150, "gate.max_cached_keys": 30},
        lambda shard: shard.seq_logged, seed=5)
    assert c.total(Slot.APPLIED) == len(simulate.applied_events(workload))
    assert c.total(Slot.PARKED) == 0
    assert_views(c.views(), oracle)


@pytest.mark.parametrize("where", ["in_checkpoint", "after_checkpoint_commit"])
def test_doc_checkpoints_are_exact_through_kills(make_cluster, workload, oracle, monkeypatch,
                                                 where):
    """A small `service.doc_checkpoint_bytes` makes the workers checkpoint their document
    log every few batches, and workers die in and after every 2nd checkpoint (fault point
    ``doc_checkpoint``). The views, every change event (versions 1..n per document: a
    document lost between log and checkpoint would restart or repeat a version) and every
    applied count stay exact."""
    c = _kill_at_every_second_checkpoint(
        make_cluster, workload, monkeypatch, "checkpoint_docs", where,
        {"service.doc_checkpoint_bytes": 40_000}, lambda shard: shard.doc_logged, seed=6)
    assert c.total(Slot.APPLIED) == len(simulate.applied_events(workload))
    assert c.total(Slot.PARKED) == 0
    for w in c.workers:
        w.publisher.pump()
    assert_views(c.views(), oracle)
    assert _rebuild_from_changes(c.published) == oracle


def test_a_format4_data_dir_goes_on_where_it_stopped(make_cluster, workload, oracle):
    """A data directory as format 4 left it (every document in views, no doc_log database,
    meta format 4): the new build stamps it 6 and goes on from its documents (a document not
    read would start again at version 1), then logs and checkpoints as usual."""
    c = make_cluster(2, overrides={"service.doc_checkpoint_bytes": 60_000})
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    rng = random.Random(3)
    c.feed(recs[:half], rng)
    paths = [w.shard.path for w in c.workers]
    for i in range(c.n):
        c.stop(i)
    for p in paths:  # what a format-4 build would have written: documents only in views
        s = Shard(p, sync=False)
        s.fold_doc_log()
        with s.env.begin(write=True) as txn:
            txn.drop(s.db["doc_log"], delete=True)
            txn.delete(b"doc_log_epoch", db=s.db["meta"])
            txn.put(b"format", msgpack.packb(4), db=s.db["meta"])
        s.close()
    c.boot()
    assert [w.shard.get_meta("format") for w in c.workers] == [6, 6]
    assert not any(w.shard.doc_pending for w in c.workers)
    applied = c.total(Slot.APPLIED)
    c.feed(recs[:half], rng)  # redelivered: skipped by the through-offsets it kept
    assert c.total(Slot.APPLIED) == applied
    c.feed(recs[half:], rng)
    assert any(w.shard.doc_logged for w in c.workers)
    assert c.total(Slot.APPLIED) == len(simulate.applied_events(workload))
    for w in c.workers:
        w.publisher.pump()
    assert_views(c.views(), oracle)
    assert _rebuild_from_changes(c.published) == oracle


def test_a_format3_data_dir_goes_on_where_it_stopped(make_cluster, workload, oracle):
    """A data directory as format 3 left it (every seq row in seq, no seq_log database, meta
    format 3): the new build stamps it 4 and goes on from its sequence rows (the gate starts
    empty: every stream's next event is decided on its seq row, so a row not read would park
    or re-apply it), then logs and checkpoints as usual."""
    c = make_cluster(2, overrides={"gate.seq_checkpoint_rows": 600})
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    rng = random.Random(3)
    c.feed(recs[:half], rng)
    parked = c.total(Slot.PARKED)
    paths = [w.shard.path for w in c.workers]
    for i in range(c.n):
        c.stop(i)
    for p in paths:  # what a format-3 build would have written: rows only in seq
        s = Shard(p, sync=False)
        s.fold_seq_log()
        with s.env.begin(write=True) as txn:
            txn.drop(s.db["seq_log"], delete=True)
            txn.put(b"format", msgpack.packb(3), db=s.db["meta"])
        s.close()
    c.boot()
    assert [w.shard.get_meta("format") for w in c.workers] == [6, 6]
    assert c.total(Slot.PARKED) == parked
    applied = c.total(Slot.APPLIED)
    c.feed(recs[:half], rng)  # redelivered: skipped by the through-offsets it kept
    assert c.total(Slot.APPLIED) == applied
    c.feed(recs[half:], rng)
    assert any(w.shard.seq_logged for w in c.workers)
    assert c.total(Slot.APPLIED) == len(simulate.applied_events(workload))
    assert c.total(Slot.PARKED) == 0
    assert_views(c.views(), oracle)
