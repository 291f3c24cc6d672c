"""Resharding a data dir (reshard.py) between real `Worker` runs on real LMDB files.

The shards are written by the worker code path (tests/test_worker.py's `Cluster`: real
workers in-process, the test plays the supervisor), left with pending state the way a crash
leaves it (forwarded updates not yet applied by their peer, change events not yet published,
parked events, one shard's through-offsets behind the others), resharded 4 → 7 → 2 → 4, and
run on: the views, the document versions and the change events must come out exact.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from aggregator import reshard
from aggregator.changes import outbox_records
from aggregator.control import Slot
from aggregator.doc_codec import unpack_record
from aggregator.forwards import decode as decode_forward
from aggregator.plan import ViewPlan
from aggregator.routing import SLOTS, slot_of
from aggregator.store import TOTALS, Shard, parse_seq_value, resolved_change, shard_path
from tests import test_worker
from tests.test_worker import (
    Cluster,
    FakeDLQ,
    MiB,
    _event,
    _rebuild_from_changes,
    _unpack,
    assert_views,
)

ROOT = Path(__file__).resolve().parents[1]

# the same module-scoped fixtures as the worker tests: seed 7, 3,000 events, and its oracle
workload = test_worker.workload
oracle = test_worker.oracle


@pytest.fixture
def clusters():
    made: list[Cluster] = []

    def make(data_dir: Path, n: int, published: list, next_offset: dict,
             overrides: dict | None = None) -> Cluster:
        c = Cluster(data_dir, n, overrides)
        made.append(c)
        c.published = published  # one change-event sink across every run
        c.next_offset = next_offset  # offsets continue across runs
        c.boot()
        return c

    yield make
    for c in made:
        c.close()


# ---- helpers ---------------------------------------------------------------------------------


def dispatch_only(c: Cluster, recs: list[list], only: set[int]) -> None:
    """One consume round that only the workers in `only` commit (the others die before their
    commit), with no forwarded updates handed over: the others' through-offsets stay behind."""
    per: list[list] = [[] for _ in range(c.n)]
    through: dict = {}
    for r in recs:
        per[r[7] % c.n].append(r)
        through[(r[0], r[1])] = max(through.get((r[0], r[1]), -1), r[2])
    thr = [[ti, p, o] for (ti, p), o in through.items()]
    for i in sorted(only):
        bid = c.next_batch[i]
        c.next_batch[i] += 1
        c.workers[i].process([_unpack(msgpack.packb([1, bid, thr, per[i]]))], [])


def extra(c: Cluster, records: list) -> list[list]:
    """Ring records on a partition of their own (7), so that their offsets never move the
    through-offsets of the workload's partitions (whose offsets were assigned up front)."""
    return c.ring_records(records, partition_of=lambda _key: 7)


def inventory(c: Cluster, pk: str, seqs) -> list[list]:
    return extra(c, [_event("inventory", "shop.inventory.adjusted", pk, s,
                            {"product_id": pk, "delta": 10 ** s}, f"gap-{pk}-{s}")
                     for s in seqs])


def crash(c: Cluster) -> None:
    """Every worker stops; what the rings held (forwarded updates read but not applied) is
    lost, as in a SIGKILL; only LMDB survives."""
    c.close()


class Snapshot:
    """Everything the test checks across a reshard, read from the closed shards."""

    def __init__(self, data_dir: Path, cfg):
        self.docs: dict[tuple[str, str], dict] = {}  # (view, key) -> stored record
        self.owner: dict[tuple[str, str], int] = {}
        self.offsets: list[dict] = []
        self.parked = 0
        self.unpublished = 0  # change events not yet delivered
        self.pending: dict[tuple[str, str], int] = {}  # forwarded updates not yet applied
        self.meta: list[dict] = []
        self.totals: list[dict] = []  # each shard's meta "totals" (store.TOTALS)
        self.seq: dict[bytes, list] = {}  # stream -> [last, topic, partition], log overlaid
        self.logged = 0  # seq rows in the shards' sequence logs (not checkpointed)
        self.docs_logged = 0  # documents in the shards' document logs (not checkpointed)
        shards = sorted(data_dir.glob("shard-*"), key=lambda p: int(p.name[6:]))
        self.n = len(shards)
        plan = ViewPlan(cfg, {v: i for i, v in enumerate(cfg.views)})
        links = []
        opened = []
        for i, path in enumerate(shards):
            assert path == shard_path(data_dir, i)
            s = Shard(path, readonly=True)
            opened.append(s)
            views = s.get_meta("views")
            self.totals.append(s.totals())
            self.meta.append({k: s.get_meta(k) for k in
                              ("workers", "shard", "bloom_generation", "change_seq",
                               "changes_published", "link_out", "fingerprint")})
            snap = s.snapshot()  # views with the document log overlaid
            try:
                for k, v in snap.rows("views"):
                    slot = int.from_bytes(k[:2], "big")
                    assert slot % self.n == i, f"slot {slot} in shard {i} of {self.n}"
                    doc = (views[k[2]], bytes(k[3:]).decode())
                    assert doc not in self.docs, f"{doc} in shards {self.owner[doc]} and {i}"
                    self.docs[doc] = unpack_record(v)
                    self.owner[doc] = i
            finally:
                snap.close()
            self.docs_logged += len(s.doc_pending)
            for k, v in s.seq_rows():
                assert int.from_bytes(k[:2], "big") % self.n == i and k not in self.seq
                self.seq[k] = parse_seq_value(v, s.seq_topics)
            self.logged += s.seq_logged
            self.offsets.append(s.offsets())
            st = s.stat()
            self.parked += st["parked"]
            self.unpublished += s.count_changes_after(s.get_meta("changes_published", 0))
            links.append(s.links())
        for i, s in enumerate(opened):
            for t in range(self.n):
                if t == i:
                    continue
                for _, msg in s.outbox_after(t, links[t].get(i, 0)):
                    for feed_id, key, _, _ in decode_forward(msg)[3]:
                        doc = (plan.feeds[feed_id].view, key)
                        self.pending[doc] = self.pending.get(doc, 0) + 1
        for s in opened:
            s.close()


def check_reshard(before: Snapshot, after: Snapshot, stats, m: int) -> None:
    """The invariants of one reshard, old layout `before`, new layout `after`."""
    n = before.n
    assert after.n == m and [x["workers"] for x in after.meta] == [m] * m
    assert [x["shard"] for x in after.meta] == list(range(m))
    # every document once, in the shard that owns its slot (Snapshot asserts both), with its
    # version unchanged except for the forwarded updates that were pending for it
    assert set(after.docs) == set(before.docs) | set(before.pending)
    for doc, rec in after.docs.items():
        old_v = before.docs[doc]["v"] if doc in before.docs else 0
        assert rec["v"] == old_v + before.pending.get(doc, 0), doc
        if not before.pending.get(doc):
            assert rec == before.docs[doc], doc
    assert stats.forwarded == sum(before.pending.values())
    # the service's totals carried whole (in new shard 0), plus the pending forwarded
    # updates the reshard dead-lettered
    assert sum_totals(after) == {**sum_totals(before), "deadlettered":
                                 sum_totals(before)["deadlettered"] + stats.dead_lettered}
    assert not any(v for t in after.totals[1:] for v in t.values())
    # links and outbox start again from 0: nothing is pending between the new shards
    assert after.pending == {} and all(x["link_out"] == {} for x in after.meta)
    assert after.parked == before.parked == stats.parked
    # every stream's sequence row, the old shards' logs overlaid, in the new seq tables
    assert after.seq == before.seq and after.logged == 0
    assert after.docs_logged == 0  # the reshard writes views (the documents compared above)
    # no change event lost: the old unpublished ones, plus one per applied forwarded update
    assert stats.changes == before.unpublished
    assert after.unpublished == before.unpublished + stats.forwarded
    assert all(x["changes_published"] == 0 for x in after.meta)
    # through-offsets: the minimum over the old shards that gave slots to each new one
    for j in range(m):
        olds = {s % n for s in range(j, SLOTS, m)}
        want = {}
        for tp in set.intersection(*(set(before.offsets[i]) for i in olds)):
            want[tp] = min(before.offsets[i][tp] for i in olds)
        assert after.offsets[j] == want, j
    gens = {x["bloom_generation"] or 0 for x in after.meta}
    assert gens == {max(x["bloom_generation"] or 0 for x in before.meta)}
    assert {x["fingerprint"] for x in after.meta} == {before.meta[0]["fingerprint"]}


def sum_totals(snap: Snapshot) -> dict[str, int]:
    return {name: sum(t[name] for t in snap.totals) for name in TOTALS}


def do_reshard(cfg, data_dir: Path, m: int):
    before = Snapshot(data_dir, cfg)
    stats = reshard.ensure_layout(cfg, data_dir, m, dead_letters=FakeDLQ)
    assert stats is not None and (stats.old_workers, stats.new_workers) == (before.n, m)
    after = Snapshot(data_dir, cfg)
    check_reshard(before, after, stats, m)
    assert not (data_dir / reshard.TMP).exists() and not (data_dir / reshard.OLD).exists()
    assert not (data_dir / reshard.MARKER).exists()
    return before, after, stats


# ---- 4 → 7 → 2 → 4 ---------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt", [32_768, 60], ids=["seq-logged", "seq-checkpointed"])
def test_reshard_4_7_2_4_keeps_everything_exact(tmp_path, clusters, workload, oracle, ckpt):
    """`ckpt` (gate.seq_checkpoint_rows): every sequence row and document still in the
    shards' logs (the defaults, for this workload), or checkpoints every few batches (rows
    and documents in both places: service.doc_checkpoint_bytes small as well)."""
    data = tmp_path / "data"
    published: list = []
    offsets: dict = {}
    base = clusters
    docs = {} if ckpt == 32_768 else {"service.doc_checkpoint_bytes": 20_000}

    def clusters(data, n, published, offsets, overrides=None):
        return base(data, n, published, offsets,
                    {"gate.seq_checkpoint_rows": ckpt, **docs, **(overrides or {})})
    c = clusters(data, 4, published, offsets)
    recs = c.ring_records(workload.records)
    q = len(recs) // 4
    rng = random.Random(1)

    # ---- run 1: 4 workers, then a crash with state pending
    c.feed(recs[:q], rng)
    c.dispatch(inventory(c, "p-resh", [2, 3]))  # parked: 1 is missing
    placed = {"order_id": "o-resh", "customer_id": "c-resh", "status": "placed",
              "amount_cents": 7}
    c.dispatch(extra(c, [_event("orders", "shop.order.placed", "o-resh", 5, placed, "st-5")]))
    c.settle()
    c.workers[1].publisher.pump = lambda: None  # dies before publishing these changes
    c.dispatch(recs[q:q + 150])  # forwarded updates read from the rings, not applied
    replay_from = q + 150
    dispatch_only(c, recs[replay_from:replay_from + 150], {0, 1, 2})  # worker 3 dies
    crash(c)

    before, after, stats = do_reshard(c.cfg, data, 7)
    assert stats.forwarded > 0 and stats.changes > 0 and stats.parked == 2
    assert before.logged > 0 and len(before.seq) > before.logged * (ckpt < 1000)
    assert before.docs_logged > 0  # documents read from the old shards' logs
    assert any(len({o.get(tp) for o in before.offsets}) > 1 for tp in before.offsets[0]), \
        "the old through-offsets should differ"
    resh_docs = {d: after.docs[d]["d"] for d in after.docs if "resh" in d[1]}

    # ---- run 2: 7 workers
    c = clusters(data, 7, published, offsets)
    assert sum(w.gate.parked_total for w in c.workers) == 2  # parked events moved
    c.dispatch(inventory(c, "p-resh", [1]))  # the gap fills: 1, 2, 3 applied
    assert c.total(Slot.PARKED) == 0
    # the counters go on from the totals of run 1 (carried by the reshard)
    assert c.total(Slot.APPLIED) == sum_totals(after)["applied"] + 3 > 3
    stale0, dup0 = c.total(Slot.STALE), c.total(Slot.DUPLICATES)
    stale = dict(placed, status="older")
    c.dispatch(extra(c, [_event("orders", "shop.order.placed", "o-resh", 3, stale, "st-3")]))
    assert c.total(Slot.STALE) == stale0 + 1  # the sequence state moved
    applied = c.total(Slot.APPLIED)
    c.feed(extra(c, workload.records[:200]), rng)  # re-sent: new offsets
    assert c.total(Slot.DUPLICATES) == dup0 + 200 and c.total(Slot.APPLIED) == applied
    # the supervisor replays from the minimum through-offset: what workers 0-2 of the old
    # layout had applied is dropped by dedup, what worker 3 had not is applied
    c.feed(recs[replay_from:2 * q], rng)
    c.workers[4].publisher.pump = lambda: None
    c.dispatch(recs[2 * q:2 * q + 200])
    crash(c)

    _, _, stats = do_reshard(c.cfg, data, 2)
    assert stats.forwarded > 0 and stats.changes > 0

    # ---- run 3: 2 workers, stopped cleanly
    c = clusters(data, 2, published, offsets)
    c.feed(recs[2 * q:3 * q], rng)
    for w in c.workers:  # a clean stop: publish, then prune what was delivered
        w.publisher.pump()
        w.process([], [])
    crash(c)
    _, _, stats = do_reshard(c.cfg, data, 4)
    assert stats.forwarded == 0 and stats.changes == 0

    # ---- run 4: back to 4 workers, to the end
    c = clusters(data, 4, published, offsets)
    c.feed(recs[3 * q:], rng)
    for w in c.workers:
        w.publisher.pump()
    want = copy.deepcopy(oracle)
    want["product"]["p-resh"] = {"stock": 1110, "adjustments": 3}
    for (view, key), doc in resh_docs.items():
        if view != "product":
            want[view][key] = doc  # the stale event changed nothing
    assert_views(c.views(), want)
    # every change event of every run, in order per key, none missing (versions 1..n with no
    # gap, see _rebuild_from_changes), and the last one is the document
    assert _rebuild_from_changes(published) == want


# ---- the dedup window across a merge --------------------------------------------------------


def test_merged_shards_keep_every_live_generation(tmp_path, clusters, workload, oracle):
    small = {"dedup.bloom_capacity": 200, "dedup.bloom_generations": 4}
    data = tmp_path / "data"
    published: list = []
    offsets: dict = {}
    c = clusters(data, 4, published, offsets, small)
    recs = c.ring_records(workload.records)
    half = len(recs) // 2
    c.feed(recs[:half], random.Random(2), max_batch=40)
    # uneven load: 1200 more ids on shard 0 only (a type no view uses): it rotates its bloom
    # filter more often than the others, by more than the window of 4 generations
    pks = [pk for pk in (f"x-{n}" for n in range(6000)) if slot_of(pk.encode()) % 4 == 0]
    c.feed(extra(c, [_event("inventory", "shop.inventory.counted", pk, 1, {}, f"x-{pk}")
                     for pk in pks[:1200]]), random.Random(3), max_batch=40)
    gens_before = [w.bloom.generation for w in c.workers]
    assert gens_before[0] >= max(gens_before[1:]) + 4
    crash(c)
    _, _, stats = do_reshard(c.cfg, data, 2)
    assert stats.dedup_dropped == 0  # every shard's live generations stay live
    c = clusters(data, 2, published, offsets, small)
    top = max(gens_before)
    for w in c.workers:
        ids = w.shard.stat()["dedup"]
        gens = [g for g, _ in w.shard.dedup_entries()]
        assert len(gens) == ids and w._bloom_loaded == ids  # dedup_gen rebuilt from dedup
        assert top - 3 <= min(gens) and max(gens) <= top == w.bloom.generation
    # the last events of shards 1-3, several generations behind shard 0, are still known
    # after the merge (shard 0's own are beyond its window by now)
    last = [workload.records[i] for i in range(half - 200, half) if recs[i][7] % 4 != 0]
    applied, dup0 = c.total(Slot.APPLIED), c.total(Slot.DUPLICATES)
    c.feed(extra(c, last), random.Random(4))
    assert c.total(Slot.DUPLICATES) == dup0 + len(last) and c.total(Slot.APPLIED) == applied
    c.feed(recs, random.Random(5), max_batch=40)  # everything again, same offsets
    assert_views(c.views(), oracle)


# ---- a pending forwarded update that fails to merge --------------------------------------------


class DeliveringDLQ(FakeDLQ):
    def deliver(self, waiting) -> None:
        self.flushes += 1


def test_forwarded_update_that_fails_to_merge_is_dead_lettered(tmp_path, clusters):
    """Applied during the reshard as the target worker would: the good review lands, the bad
    one (rating "four": the upsert runs, then the add fails) leaves the document as it was
    and is dead-lettered, delivered before the new layout is committed."""
    data = tmp_path / "data"
    c = clusters(data, 2, [], {})
    def worker(key: str) -> int:
        return slot_of(key.encode()) % 2

    # sent by worker 1 to worker 0, which processed its round before: not applied yet
    good, bad = [r for r in (f"r-{n}" for n in range(20)) if worker(r) == 1][:2]
    product = next(p for p in (f"p-{n}" for n in range(20)) if worker(p) == 0)
    reviews = [_event("reviews", "shop.review.posted", r, 1,
                      {"review_id": r, "product_id": product, "customer_id": "c-1",
                       "rating": rating}, eid) for r, rating, eid in ((good, 4, "v-good"),
                                                                     (bad, "four", "v-bad"))]
    c.dispatch(extra(c, reviews))
    crash(c)
    made: list[DeliveringDLQ] = []
    stats = reshard.ensure_layout(c.cfg, data, 3,
                                  dead_letters=lambda: made.append(DeliveringDLQ()) or made[-1])
    # the product's good update, and both customer updates if c-1 is worker 0's too
    assert stats.forwarded == (3 if worker("c-1") == 0 else 1)
    (dlq,) = made
    assert dlq.reasons == ["merge_error"] and dlq.flushes == 1
    rec = dlq.sent[0][0]
    assert json.loads(rec[4])["id"] == "v-bad"  # the event, in structured mode
    c = clusters(data, 3, [], {})
    views = c.views()
    assert views["product"] == {product: {
        "reviews": {good: {"rating": 4, "customer_id": "c-1"}}, "rating_sum": 4,
        "review_count": 1}}
    assert views["customer"] == {"c-1": {"reviews_written": 2}}  # only the one update fails


# ---- nothing to do, and refusals ------------------------------------------------------------


def test_same_count_or_empty_dir_is_left_alone(tmp_path, clusters):
    empty = tmp_path / "empty"
    empty.mkdir()
    c = clusters(tmp_path / "data", 2, [], {})
    cfg = c.cfg
    crash(c)
    assert reshard.ensure_layout(cfg, empty, 3) is None
    assert reshard.ensure_layout(cfg, tmp_path / "data", 2) is None


def test_pending_forwards_of_another_config_are_refused(tmp_path, clusters, workload):
    data = tmp_path / "data"
    c = clusters(data, 2, [], {})
    c.dispatch(c.ring_records(workload.records[:500]))  # forwarded, not applied
    crash(c)
    # the gap policy is part of the fingerprint
    changed = c.cfg.model_copy(update={"gate": c.cfg.gate.model_copy(
        update={"gap_policy": "dead-letter"})})
    assert changed.fingerprint() != c.cfg.fingerprint()
    with pytest.raises(reshard.ReshardError, match="forwarded updates are pending"):
        reshard.ensure_layout(changed, data, 3)
    assert sorted(p.name for p in data.iterdir() if p.name.startswith("shard-")) == \
        ["shard-0", "shard-1"]
    assert not (data / reshard.TMP).exists()


# ---- crash safety: SIGKILL while building, and at every step of the swap ---------------------


SUBPROCESS = """
import json, logging, sys
from aggregator import reshard
from aggregator.changes import outbox_records
from aggregator.forwards import decode as decode_forward
from aggregator.config import load_config
logging.basicConfig(level=logging.INFO)
opts = json.loads(sys.argv[1])
reshard.ensure_layout(load_config(None, opts, env={}), opts["service.data_dir"],
                      opts["service.workers"])
"""


def dump(data_dir: Path) -> dict:
    """Every row of every shard (change events without their wall-clock time)."""
    out = {}
    for path in sorted(data_dir.glob("shard-*")):
        s = Shard(path, readonly=True)
        try:
            with s.env.begin() as txn:
                for name, db in sorted(s.db.items()):
                    rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
                    if name == "changes":  # logged blobs with their data (format 6)
                        rows = [(k, resolved_change(txn, s.db.get("doc_log"), k, v))
                                for k, v in rows]
                        rows = [r[:5] for r in outbox_records(rows)]
                    out[(path.name, name)] = rows
        finally:
            s.close()
    return out


@pytest.fixture
def crashed_layout(tmp_path, clusters, workload):
    """A 4-worker data dir with pending forwarded updates and change events, and the result
    of resharding a copy of it to 7 without a crash."""
    data = tmp_path / "data"
    c = clusters(data, 4, [], {})
    recs = c.ring_records(workload.records[:1500])
    c.feed(recs[:1000], random.Random(4))
    c.workers[2].publisher.pump = lambda: None
    c.dispatch(recs[1000:])
    crash(c)
    ref = tmp_path / "ref"
    shutil.copytree(data, ref)
    cfg = c.cfg
    assert reshard.ensure_layout(cfg, ref, 7).forwarded > 0
    return data, cfg, dump(ref)


def run_killed(data: Path, cfg, faults: str) -> subprocess.CompletedProcess:
    opts = {"service.data_dir": str(data), "service.workers": 7, "service.lmdb_sync": False,
            "service.lmdb_map_size": 64 * MiB, "service.ring_bytes": 8 * MiB,
            "gate.gap_timeout_ms": 600_000}
    env = dict(os.environ, AGGREGATOR_FAULTS=faults)
    env.pop("AGGREGATOR_FAULTS_ONCE", None)
    return subprocess.run([sys.executable, "-c", SUBPROCESS, json.dumps(opts)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("hit", [1, 2, 7])
def test_sigkill_while_building_keeps_the_old_layout(crashed_layout, hit):
    data, cfg, want = crashed_layout
    old = dump(data)
    proc = run_killed(data, cfg, f"reshard_build={hit}")
    assert proc.returncode == -9, proc.stderr
    assert not (data / reshard.MARKER).exists() and (data / reshard.TMP).exists()
    assert dump(data) == old  # the old layout is untouched
    assert reshard.current_workers(data) == 4
    reshard.ensure_layout(cfg, data, 7)  # the rerun starts over
    assert dump(data) == want


@pytest.mark.parametrize("hit", [1, 4, 5, 11, 12])
def test_sigkill_during_the_swap_is_finished_at_the_next_start(crashed_layout, hit):
    """The swap passes 12 fault points: 4 old shards out, 7 new ones in, marker removal."""
    data, cfg, want = crashed_layout
    proc = run_killed(data, cfg, f"reshard_swap={hit}")
    assert proc.returncode == -9, proc.stderr
    assert (data / reshard.MARKER).exists()
    assert reshard.ensure_layout(cfg, data, 7) is None  # finished, nothing more to do
    assert dump(data) == want
    assert sorted(p.name for p in data.iterdir()) == [f"shard-{i}" for i in range(7)]
