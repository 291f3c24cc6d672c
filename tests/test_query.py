"""Read-only queries (query.py) on real LMDB shards: documents, tombstones, pagination across
shards, stats, and reads while another process writes and grows the map."""

from __future__ import annotations

import logging
import multiprocessing
import random
import time

import lmdb
import pytest

from aggregator.query import BadCursor, QueryError, UnknownView, Views, decode_cursor
from aggregator.routing import slot_of
from aggregator.store import Shard, shard_path

from .support.viewdata import VIEWS, lmdb_key, record, shard_of, write_docs


def make_docs(n: int, seed: int = 1, tombstones: float = 0.1) -> dict:
    rng = random.Random(seed)
    docs = {}
    for i in range(n):
        view = rng.choice(VIEWS)
        key = f"{view[0]}-{i:05d}"
        dead = rng.random() < tombstones
        docs[(view, key)] = record(None if dead else {"n": i, "name": f"x{i}"}, version=i % 7 + 1,
                                   fresh={"/shop/x": [i, "2024-01-01T00:00:00Z"]})
    return docs


def live_keys(docs: dict, view: str) -> set[str]:
    return {k for (v, k), rec in docs.items() if v == view and rec["d"] is not None}


def walk(views: Views, view: str, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        keys, cursor = views.list_keys(view, limit, cursor)
        pages.append(keys)
        assert len(keys) <= limit
        if cursor is None:
            return pages
        assert len(pages) < 10_000


# ---- documents ----------------------------------------------------------------------------


def test_get_document_version_and_freshness(tmp_path):
    write_docs(tmp_path, 2, {
        ("customer", "c-1"): record({"profile": {"name": "Ada"}}, 3,
                                    {"/shop/customers": [7, "2024-05-01T10:00:00Z"],
                                     "/shop/orders": [None, None]}),
        ("order", "c-1"): record({"total": 5}),  # same key, another view
    })
    with Views(tmp_path, 2, VIEWS) as views:
        assert views.get("customer", "c-1") == {
            "view": "customer", "key": "c-1", "version": 3,
            "document": {"profile": {"name": "Ada"}},
            "freshness": {"/shop/customers": {"sequence": 7, "time": "2024-05-01T10:00:00Z"},
                          "/shop/orders": {"sequence": None, "time": None}},
        }
        assert views.get("order", "c-1")["document"] == {"total": 5}
        assert views.get("product", "c-1") is None
        assert views.get("customer", "c-2") is None
        assert views.get("customer", "") is None
        assert views.get("customer", "x" * 2000) is None  # longer than any LMDB key


def test_tombstone_reads_as_absent(tmp_path):
    write_docs(tmp_path, 3, {("customer", "gone"): record(None, 4),
                             ("customer", "here"): record({"a": 1})})
    with Views(tmp_path, 3, VIEWS) as views:
        assert views.get("customer", "gone") is None
        assert views.get("customer", "here")["document"] == {"a": 1}
        keys, cursor = views.list_keys("customer", 10)
        assert keys == ["here"] and cursor is None


def test_unknown_view(tmp_path):
    write_docs(tmp_path, 1, {("customer", "a"): record({})})
    with Views(tmp_path, 1, VIEWS) as views:
        with pytest.raises(UnknownView, match="'nope'"):
            views.get("nope", "a")
        with pytest.raises(UnknownView):
            views.list_keys("nope")
    with Views(tmp_path, 1) as views:  # no config: the views the shards name
        assert views.views() == VIEWS
        assert views.get("customer", "a")["document"] == {}
        with pytest.raises(UnknownView):
            views.get("nope", "a")


def test_configured_view_missing_from_the_shards_is_empty(tmp_path):
    write_docs(tmp_path, 2, {("customer", "a"): record({})}, views=["customer"])
    with Views(tmp_path, 2, ["customer", "newview"]) as views:
        assert views.get("newview", "a") is None
        assert views.list_keys("newview") == ([], None)


def test_no_shards_yet_reads_as_empty(tmp_path):
    with Views(tmp_path / "data", 2, VIEWS) as views:
        assert views.get("customer", "a") is None
        assert views.list_keys("customer") == ([], None)
        assert [s["exists"] for s in views.stats()] == [False, False]
    # shards appear later (the service booted): the same reader picks them up
    views = Views(tmp_path / "data", 2, VIEWS)
    assert views.get("customer", "a") is None
    write_docs(tmp_path / "data", 2, {("customer", "a"): record({"x": 1})})
    assert views.get("customer", "a")["document"] == {"x": 1}
    views.close()


def test_documents_live_on_the_shard_of_their_key(tmp_path):
    docs = make_docs(300, tombstones=0)
    write_docs(tmp_path, 3, docs)
    for (view, key) in docs:
        s = Shard(shard_path(tmp_path, shard_of(key, 3)), readonly=True)
        try:
            snap = s.snapshot()  # views with the document log overlaid
            try:
                assert snap.get("views", lmdb_key(VIEWS.index(view), key)) is not None
            finally:
                snap.close()
        finally:
            s.close()
        break  # one is enough to pin the layout the reader relies on
    with Views(tmp_path, 3, VIEWS) as views:
        for (view, key), rec in docs.items():
            assert views.get(view, key)["document"] == rec["d"]


# ---- listing ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("limit", [1, 3, 10, 1000])
def test_pagination_covers_every_key_exactly_once(tmp_path, workers, limit):
    docs = make_docs(400, seed=workers)
    write_docs(tmp_path, workers, docs)
    with Views(tmp_path, workers, VIEWS) as views:
        for view in VIEWS:
            pages = walk(views, view, limit)
            flat = [k for p in pages for k in p]
            assert len(flat) == len(set(flat)), "a key came twice"
            assert set(flat) == live_keys(docs, view)
            assert all(pages[:-1]) and (pages[-1] or len(pages) == 1), "no empty pages"
            assert all(len(p) == limit for p in pages[:-1])
            # stable order: shard, then slot, then key bytes (not alphabetical)
            order = [(shard_of(k, workers), slot_of(k.encode()), k.encode()) for k in flat]
            assert order == sorted(order)


def test_pagination_when_a_page_ends_at_a_shard_boundary(tmp_path):
    docs = {("order", f"o{i}"): record({"i": i}) for i in range(40)}
    write_docs(tmp_path, 3, docs)
    per_shard = [sum(shard_of(k, 3) == s for _, k in docs) for s in range(3)]
    with Views(tmp_path, 3, VIEWS) as views:
        keys, cursor = views.list_keys("order", per_shard[0])  # exactly shard 0
        assert len(keys) == per_shard[0] and cursor is not None
        rest, cursor2 = views.list_keys("order", 1000, cursor)
        assert cursor2 is None and set(keys) | set(rest) == {k for _, k in docs}
        everything, end = views.list_keys("order", 40)
        assert len(everything) == 40 and end is None  # a full last page has no next cursor


def test_listing_resumes_after_keys_change(tmp_path):
    docs = {("product", f"p{i:03d}"): record({"i": i}) for i in range(100)}
    write_docs(tmp_path, 2, docs)
    views = Views(tmp_path, 2, VIEWS)
    first, cursor = views.list_keys("product", 30)
    views.close()
    # the key the cursor points at is deleted, others are added: no key seen twice
    write_docs(tmp_path, 2, {("product", first[-1]): record(None, 2),
                             **{("product", f"q{i}"): record({}) for i in range(20)}})
    with Views(tmp_path, 2, VIEWS) as views:
        rest = [k for p in walk_from(views, "product", 30, cursor) for k in p]
    assert not set(first) & set(rest)
    assert {k for _, k in docs} - set(first) <= set(rest)  # every untouched key still comes


def walk_from(views, view, limit, cursor):
    while True:
        keys, cursor = views.list_keys(view, limit, cursor)
        yield keys
        if cursor is None:
            return


def test_bad_cursor_and_limit(tmp_path):
    write_docs(tmp_path, 2, {("customer", "a"): record({})})
    with Views(tmp_path, 2, VIEWS) as views:
        for bad in ("x", "!!!", "AAAA", "kwGRAQ", "lAEFxAN4eXo"):
            with pytest.raises(BadCursor):
                views.list_keys("customer", 10, bad)
        with pytest.raises(QueryError):
            views.list_keys("customer", 0)
    assert decode_cursor(None, 2) == (0, None)


# ---- stats and layout ---------------------------------------------------------------------


def test_stats(tmp_path):
    docs = make_docs(50, tombstones=0)
    write_docs(tmp_path, 2, docs)
    with Views(tmp_path, 2, VIEWS) as views:
        stats = views.stats()
    assert [s["shard"] for s in stats] == [0, 1]
    assert sum(s["entries"]["views"] for s in stats) == 50
    for s in stats:
        assert s["exists"] and s["map_bytes"] == 16 << 20
        assert 0 < s["used_bytes"] <= s["file_bytes"] <= s["map_bytes"]
        assert s["entries"]["meta"] >= 4


def test_check_layout_refuses_another_worker_count(tmp_path):
    write_docs(tmp_path, 2, {("customer", "a"): record({})})
    Views(tmp_path, 2, VIEWS).check_layout()
    with pytest.raises(QueryError, match="written by 2 workers, but 3"):
        Views(tmp_path, 3, VIEWS).check_layout()


# ---- reads while another process writes ---------------------------------------------------


def _writer(path: str, rounds: int, started) -> None:
    """Bump the version of 'hot' every round, adding 200 x 1 KiB documents per round to
    a map that starts at 1 MiB, growing it on MAP_FULL like a worker does."""
    shard = Shard(path, map_size=1 << 20, max_map_size=1 << 30, sync=False)
    started.set()
    pad = "x" * 1024
    for r in range(1, rounds + 1):
        while True:
            b = shard.begin()
            try:
                b.put_doc(lmdb_key(0, "hot"), record({"round": r}, r))
                for i in range(200):
                    key = f"fill-{r}-{i}"
                    b.put_doc(lmdb_key(1, key), record({"pad": pad}))
                b.commit()
                break
            except lmdb.MapFullError:
                b.abort()
                assert shard.grow()
    shard.close()


def test_reads_while_another_process_writes_and_grows_the_map(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="aggregator.query")
    # one shard, so every key is in shard-0 whatever its slot
    write_docs(tmp_path, 1, {("customer", "hot"): record({"round": 0}, 0)}, map_size=1 << 20)
    rounds = 150
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=_writer, args=(str(shard_path(tmp_path, 0)), rounds, started))
    proc.start()
    try:
        assert started.wait(30)
        views = Views(tmp_path, 1, VIEWS)
        last, reads, listed = 0, 0, 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            doc = views.get("customer", "hot")
            assert doc is not None and doc["version"] >= last, "went back in time"
            assert doc["document"] == {"round": doc["version"]}
            last = doc["version"]
            reads += 1
            if reads % 20 == 0:
                keys, _ = views.list_keys("order", 1000)  # a scan inside one transaction
                listed = max(listed, len(keys))
            if last == rounds:
                break
        proc.join(60)
        assert proc.exitcode == 0
        assert last == rounds, f"never saw the last write (at {last})"
        assert reads > 10
        stats = views.stats()[0]
        assert stats["map_bytes"] > 1 << 20, "the writer should have grown the map"
        assert "map grown by the writer" in caplog.text  # MDB_MAP_RESIZED was handled
        assert views.get("customer", "hot")["version"] == rounds
        keys = [k for p in walk(views, "order", 997) for k in p]
        assert len(keys) == len(set(keys)) == rounds * 200
        views.close()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
