"""The task changelog through a real broker: batches written by `ChangelogWriter` are
restored by `ChangelogReader` + `Restore` into another shard; a batch cut short (records
delivered, no marker) and a superseded owner's batches are not applied; a restore claims a
new epoch."""

from __future__ import annotations

import msgpack
import pytest

from aggregator.changelog import (
    VIEWS,
    ChangelogReader,
    ChangelogWriter,
    Restore,
    meta_name,
)
from aggregator.store import Shard

pytestmark = pytest.mark.integration


def dk(slot: int, key: str) -> bytes:
    return slot.to_bytes(2, "big") + b"\x00" + key.encode()


def doc(v: int) -> bytes:
    return msgpack.packb({"v": v, "d": {"n": v}, "s": {}})


def views(shard: Shard) -> dict[bytes, int]:
    with shard.env.begin(db=shard.db["views"]) as txn:
        return {bytes(k): msgpack.unpackb(v)["v"] for k, v in txn.cursor()}


@pytest.fixture
def shard(tmp_path):
    s = Shard(tmp_path / "shard", map_size=16 << 20, max_map_size=64 << 20, sync=False)
    yield s
    s.close()


def restore(bootstrap: str, topic: str, shard: Shard, task: int, writer: ChangelogWriter):
    """What the worker does (worker._restore): read to the end, claim, read to the claim."""
    reader = ChangelogReader({"bootstrap.servers": bootstrap, "group.id": "restore-test"},
                             topic)
    try:
        r = Restore(shard, task, generation=0)
        start = r.start  # (r.start moves on with the restore)
        nxt = [start]

        def sink(off, key, value, headers):
            nxt[0] = off + 1
            r.feed(off, key, value, headers)

        reader.read(task, r.start, sink, heartbeat=lambda: None, timeout=60)
        epoch = r.max_epoch + 1
        writer.begin()
        claim = writer.commit({task: (epoch, 0)})[task]
        reader.read(task, nxt[0], sink, until=claim, heartbeat=lambda: None, timeout=60)
        r.finish()
        return r, epoch, start
    finally:
        reader.close()


def test_batches_survive_a_move_and_a_cut_short_one_does_not(bootstrap, create_topic, shard,
                                                           tmp_path):
    topic = create_topic("changelog", partitions=2)
    conf = {"bootstrap.servers": bootstrap}
    old = ChangelogWriter(conf, topic, lambda: None)
    old.begin()
    old.commit({1: (1, 0)})  # the first owner's claim
    for seq in (1, 2, 3):
        old.begin()
        old.put_state(1, 1, seq, [(VIEWS, dk(1, "a"), doc(seq)), (VIEWS, dk(9, f"k{seq}"),
                                                                  doc(1))])
        old.commit({1: (1, seq)})
    old.begin()  # cut short: delivered, no marker
    old.put_state(1, 1, 4, [(VIEWS, dk(1, "a"), doc(99))])
    old.flush()
    old.abort()

    new = ChangelogWriter(conf, topic, lambda: None)
    r, epoch, _ = restore(bootstrap, topic, shard, 1, new)
    assert epoch == 2
    assert views(shard) == {dk(1, "a"): 3, dk(9, "k1"): 1, dk(9, "k2"): 1, dk(9, "k3"): 1}

    # the old owner resumes (a zombie) and completes a batch: no later restore applies it
    old.begin()
    old.put_state(1, 1, 5, [(VIEWS, dk(1, "a"), doc(98))])
    old.commit({1: (1, 5)})
    new.begin()
    new.put_state(1, epoch, 1, [(VIEWS, dk(1, "a"), doc(4))])
    new.commit({1: (epoch, 1)})

    fresh = Shard(tmp_path / "fresh", map_size=16 << 20, max_map_size=64 << 20, sync=False)
    try:
        third = ChangelogWriter(conf, topic, lambda: None)
        r3, epoch3, _ = restore(bootstrap, topic, fresh, 1, third)
        assert epoch3 == 3
        assert views(fresh)[dk(1, "a")] == 4
        # and the first restorer catches up from its cached offset to the same state
        cached = shard.get_meta(meta_name(1))[0]
        r4, _, start4 = restore(bootstrap, topic, shard, 1, new)
        assert start4 == cached + 1 and r4.records < r3.records
        assert views(shard) == views(fresh)
    finally:
        fresh.close()


def _die_inside_a_batch(bootstrap: str, topic: str) -> None:
    """A writer that claims task 0, writes one batch, then is killed inside the next."""
    import os

    w = ChangelogWriter({"bootstrap.servers": bootstrap}, topic, lambda: None)
    w.begin()
    w.commit({0: (1, 0)})
    w.begin()
    w.put_state(0, 1, 1, [(VIEWS, dk(0, "a"), doc(1))])
    w.commit({0: (1, 1)})
    w.begin()
    w.put_state(0, 1, 2, [(VIEWS, dk(0, "a"), doc(2))])
    w.flush()
    os._exit(0)  # its records are delivered, its marker never


def test_a_writer_killed_inside_a_batch(bootstrap, create_topic, shard):
    """A writer killed between its records and its marker: the next owner restores the
    batches before and claims; the cut-short batch is not applied."""
    import multiprocessing

    topic = create_topic("changelog", partitions=1)
    child = multiprocessing.get_context("spawn").Process(
        target=_die_inside_a_batch, args=(bootstrap, topic))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    new = ChangelogWriter({"bootstrap.servers": bootstrap}, topic, lambda: None)
    r, epoch, _ = restore(bootstrap, topic, shard, 0, new)
    assert epoch == 2
    assert views(shard) == {dk(0, "a"): 1}  # the open batch was not applied
