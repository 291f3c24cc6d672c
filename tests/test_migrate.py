"""Storage format 1 → 2 (store.py, reshard.py): a real format-1 data dir, migrated and run on.

The fixture (tests/fixtures/format1-2workers.tar.gz) was written by the format-1 code of
commit 6d99ae1 (tests/support/make_format1_fixture.py says how): 2 real workers ran half of
the seed-7 workload with a small bloom filter (several generations rotated and pruned),
saved their bloom filters, ran on, and were killed with parked events, forwarded updates
their peer had not applied and change events not published.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import lmdb
import msgpack
import pytest
from click.testing import CliRunner

from aggregator import reshard
from aggregator.cli import main as cli_main
from aggregator.config import default_config_path
from aggregator.control import Slot
from aggregator.store import (
    FORMAT_VERSION,
    SEQ_ROW,
    TOTALS,
    Shard,
    ShardError,
    normalize_totals,
    parse_offset_key,
    shard_path,
)
from tests import test_worker
from tests.test_reshard import extra, inventory
from tests.test_worker import Cluster, FakeDLQ, assert_views

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "format1-2workers.tar.gz"
SMALL = {"dedup.bloom_capacity": 300, "dedup.bloom_generations": 4}  # as the fixture's

workload = test_worker.workload
oracle = test_worker.oracle


def unpack_fixture(tmp_path: Path) -> tuple[Path, int]:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    data = tmp_path / "data"
    info = msgpack.unpackb((data / "fixture.msgpack").read_bytes())
    return data, info["through"]


def read_format1(data: Path) -> dict:
    """Everything an upgrade must keep, read straight from the format-1 LMDB files."""
    out = {"docs": {}, "offsets": [], "totals": [], "parked": {}, "seq": {}, "dedup": {},
           "gen": [], "outbox": 0}
    for i in range(2):
        env = lmdb.open(str(shard_path(data, i)), readonly=True, lock=False, max_dbs=16)
        dbs = {n: env.open_db(n.encode()) for n in
               ("views", "dedup", "seq", "parked", "offsets", "meta", "outbox")}
        with env.begin() as txn:
            meta = {bytes(k).decode(): msgpack.unpackb(v, strict_map_key=False)
                    for k, v in txn.cursor(db=dbs["meta"])}
            assert meta["format"] == 1
            out["gen"].append(meta["bloom_generation"])
            out["totals"].append(normalize_totals(meta.get("totals")))
            out["offsets"].append({bytes(k): bytes(v) for k, v in txn.cursor(db=dbs["offsets"])})
            for k, v in txn.cursor(db=dbs["views"]):
                out["docs"][bytes(k)] = msgpack.unpackb(v, strict_map_key=False)
            for k, v in txn.cursor(db=dbs["parked"]):
                out["parked"][bytes(k)] = bytes(v)
            for k, v in txn.cursor(db=dbs["seq"]):
                out["seq"][bytes(k)] = msgpack.unpackb(v)
            for k, v in txn.cursor(db=dbs["dedup"]):
                out["dedup"][bytes(k)] = int.from_bytes(v, "big")
            out["outbox"] += txn.stat(dbs["outbox"])["entries"]
        env.close()
    return out


def _cfg(data: Path):
    from aggregator.config import load_config

    return load_config(None, {"service.data_dir": str(data), "service.workers": 2,
                              "service.lmdb_sync": False, **SMALL}, env={})


def test_a_format1_shard_is_refused_with_the_command(tmp_path):
    data, _ = unpack_fixture(tmp_path)
    s = Shard(shard_path(data, 0))
    try:
        with pytest.raises(ShardError, match="aggregator migrate --config <config> --data-dir"):
            s.check_layout(shard=0, workers=2, slots=4096)
    finally:
        s.close()
    assert reshard.needs_migration(data)


def test_migration_keeps_views_offsets_totals_parked_and_the_dedup_window(
        tmp_path, workload, oracle):
    data, through = unpack_fixture(tmp_path)
    before = read_format1(data)
    assert before["parked"] and before["outbox"] and len(before["dedup"]) > 1000
    cfg = _cfg(data)
    stats = reshard.ensure_layout(cfg, data, 2, dead_letters=FakeDLQ)
    assert stats is not None and stats.dead_lettered == 0
    assert not reshard.needs_migration(data)
    assert reshard.ensure_layout(cfg, data, 2) is None  # done: nothing more to do

    # the rows, read through the format-2 code
    totals = {name: 0 for name in TOTALS}
    got_seq = set()
    for i in range(2):
        s = Shard(shard_path(data, i), readonly=True)
        try:
            meta = s.meta_items()
            assert meta["format"] == FORMAT_VERSION == 6
            assert meta["bloom_generation"] == before["gen"][i]  # not shifted: same shard
            assert "dedup_log_seq" in meta and "shard_token" in meta  # carried
            for name in TOTALS:
                totals[name] += s.totals()[name]
            with s.env.begin() as txn:
                offs = {bytes(k): bytes(v) for k, v in txn.cursor(db=s.db["offsets"])}
                assert offs == before["offsets"][i]
                for k, v in txn.cursor(db=s.db["seq"]):
                    assert len(v) == SEQ_ROW.size
                    got_seq.add(bytes(k))
                for k, v in txn.cursor(db=s.db["parked"]):
                    assert before["parked"][bytes(k)] == bytes(v)
            snap = s.snapshot()
            rows = list(snap.dedup_rows())
            snap.close()
            oldest = before["gen"][i] - 3
            want = {k: g for k, g in before["dedup"].items() if (k[0] << 8 | k[1]) % 2 == i
                    and g >= oldest}
            assert dict(rows) == want  # every id of the window, in its generation
            assert s.dedup_index == sorted([g, 0] for g in set(want.values()))
        finally:
            s.close()
    for name in TOTALS:
        assert totals[name] == sum(t[name] for t in before["totals"]), name
    assert set(got_seq) == set(before["seq"])

    # and the service runs on: filter restored from the carried snapshot, sequence state,
    # parked events and the dedup window all there
    c = Cluster(data, 2, SMALL)
    c.published, c.next_offset = [], {}
    try:
        recs = c.ring_records(workload.records)  # the fixture's offsets
        for offs in before["offsets"]:  # the extra records (partition 7) continue after it
            for k, v in offs.items():
                topic, part = parse_offset_key(k)
                if part == 7:
                    tp = (c.tindex[topic], part)
                    c.next_offset[tp] = max(c.next_offset.get(tp, 0),
                                            int.from_bytes(v, "big", signed=True) + 1)
        c.boot()
        for w in c.workers:
            assert w._bloom_how.startswith("restored"), w._bloom_how
            b = w.shard.begin()
            for g, (last, topic, part) in before["seq"].items():
                if (g[0] << 8 | g[1]) % 2 == w.index:
                    assert b.get_seq(g) == [last, topic, part]
            b.abort()
        assert sum(w.gate.parked_total for w in c.workers) == 2
        c.dispatch(inventory(c, "p-mig", [1]))  # fills the gap: 1, 2, 3 applied
        assert c.total(Slot.PARKED) == 0
        dup0, applied0 = c.total(Slot.DUPLICATES), c.total(Slot.APPLIED)
        c.feed(extra(c, workload.records[through - 250:through - 50]), random.Random(3))
        assert c.total(Slot.DUPLICATES) == dup0 + 200  # the dedup window moved
        assert c.total(Slot.APPLIED) == applied0
        c.feed(recs[through:], random.Random(4))
        for w in c.workers:
            w.publisher.pump()
        want = copy.deepcopy(oracle)
        want["product"]["p-mig"] = {"stock": 1110, "adjustments": 3}
        assert_views(c.views(), want)
    finally:
        c.close()


def dump(data: Path) -> dict:
    """Every row of every shard, the dedup index included (change events without time)."""
    out = {}
    for path in sorted(data.glob("shard-*")):
        s = Shard(path, readonly=True)
        try:
            with s.env.begin() as txn:
                for name, db in sorted(s.db.items()):
                    rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
                    if name == "changes":
                        rows = [(k, msgpack.unpackb(v)[:4]) for k, v in rows]
                    out[(path.name, name)] = rows
            out[(path.name, "dedup")] = sorted(s.dedup_entries())
            out[(path.name, "index")] = s.dedup_index
            snap = bytes((path / "bloom.snap").read_bytes()) if (path / "bloom.snap").exists() \
                else None
            out[(path.name, "bloom.snap")] = snap
        finally:
            s.close()
    return out


SUBPROCESS = """
import json, sys
from aggregator import reshard
from aggregator.config import load_config
opts = json.loads(sys.argv[1])
reshard.ensure_layout(load_config(None, opts, env={}), opts["service.data_dir"], 2)
"""


@pytest.mark.parametrize("fault", ["reshard_build=1", "reshard_build=2", "reshard_swap=1",
                                   "reshard_swap=3", "reshard_swap=5"])
def test_a_migration_killed_midway_is_redone_or_finished(tmp_path, fault):
    data, _ = unpack_fixture(tmp_path / "a")
    ref, _ = unpack_fixture(tmp_path / "b")
    cfg = _cfg(ref)
    assert reshard.ensure_layout(cfg, ref, 2) is not None
    want = dump(ref)
    opts = {"service.data_dir": str(data), "service.workers": 2, "service.lmdb_sync": False,
            **SMALL}
    env = dict(os.environ, AGGREGATOR_FAULTS=fault)
    env.pop("AGGREGATOR_FAULTS_ONCE", None)
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, json.dumps(opts)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    if fault.startswith("reshard_build"):  # before the commit point: the old shards untouched
        assert reshard.needs_migration(data) and not (data / reshard.MARKER).exists()
        assert reshard.ensure_layout(_cfg(data), data, 2) is not None  # done again
    else:  # after it: the next start finishes the swap
        assert (data / reshard.MARKER).exists()
        assert reshard.ensure_layout(_cfg(data), data, 2) is None
    assert not reshard.needs_migration(data)
    assert dump(data) == want
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == ["shard-0", "shard-1"]


def test_the_migrate_command(tmp_path):
    data, _ = unpack_fixture(tmp_path)
    args = ["migrate", "--config", str(default_config_path()), "--data-dir", str(data),
            "--workers", "2"]
    res = CliRunner().invoke(cli_main, args)
    assert res.exit_code == 0, res.output
    assert "migrated to format 6" in res.output
    res = CliRunner().invoke(cli_main, args)
    assert res.exit_code == 0 and "nothing to do" in res.output
    assert not reshard.needs_migration(data)


def test_a_migration_keeps_each_shards_own_meta(tmp_path):
    """Cluster mode keeps per-shard cache rows in meta (changelog.py, ``task.<t>``): a
    migration (same worker count) leaves them with their shard, unlike a reshard."""
    data, _ = unpack_fixture(tmp_path)
    for i in range(2):
        env = lmdb.open(str(shard_path(data, i)), max_dbs=16)
        with env.begin(write=True, db=env.open_db(b"meta")) as txn:
            txn.put(f"task.{i + 1}".encode(), msgpack.packb([100 + i, 1, 7]))
        env.close()
    reshard.ensure_layout(_cfg(data), data, 2)
    for i in range(2):
        s = Shard(shard_path(data, i), readonly=True)
        try:
            meta = s.meta_items()
        finally:
            s.close()
        assert [k for k in meta if k.startswith("task.")] == [f"task.{i + 1}"]
        assert meta[f"task.{i + 1}"] == [100 + i, 1, 7]
        assert meta["writer_epoch"] == 2  # above every old writer's
