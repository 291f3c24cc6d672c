"""CPU per merge apply: the compiled merge ops (`_merge`) against the reference (`merge.py`).

    python -m bench.micro.bench_merge [--events 20000] [--repeat 5] [--json]

Two tables, process CPU per apply (best of `--repeat`), both implementations back to back
on the same plans, documents and events:

- per op kind: a one-op plan (or two for the copy cases) applied again and again to one
  document of the shop's shape (steady state: set/merge/upsert overwrite, add accumulates,
  unset/remove walk to a target that is gone after the first apply);
- the shop workload: the simulated shop's events (`simulate.generate`) through the feeds of
  `examples/shop.toml`, with the views' ops as context as the service compiles them; every
  (document before, event) pair of a feed is prepared first (deep copies, not timed), then
  each pair is applied once; per feed and over all applies (`apply_update` too: the merge
  plus version and freshness, as stages/route.py calls it).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import time
import tomllib

from aggregator import _merge
from aggregator import merge as ref
from aggregator.devtools import simulate
from aggregator.envelope import Event

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "shop.toml"
IMPLS = (("python", ref.compile_ops), ("cython", _merge.compile_ops))

DATA = {"order_id": "o-17", "customer_id": "c-3", "status": "paid", "amount_cents": 1299,
        "items": [{"sku": "p-1", "qty": 2}], "note": "leave at the door"}
DOC = {"profile": {"name": "Ann", "tier": "gold"}, "orders": {"o-1": {"status": "placed"}},
       "stats": {"total": 10, "count": 1}}

OP_CASES: dict[str, list[dict]] = {
    "set from data.x": [{"op": "set", "path": "profile.status", "from": "data.status"}],
    "set literal": [{"op": "set", "path": "flags.active", "value": True}],
    "set literal table (copy)": [{"op": "set", "path": "flags", "value": {"a": 1, "b": [1]}}],
    "set attribute": [{"op": "set", "path": "last_seen", "from": "time"}],
    "set fields": [{"op": "set", "path": "last", "from": "data",
                    "fields": ["status", "amount_cents"]}],
    "merge root": [{"op": "merge", "path": "", "from": "data"}],
    "merge path fields": [{"op": "merge", "path": "profile", "from": "data",
                           "fields": ["status", "note"]}],
    "merge data (cloned)": [{"op": "merge", "path": "p", "from": "data"},
                            {"op": "add", "path": "p.amount_cents", "value": 1}],
    "unset": [{"op": "unset", "path": "profile.tier"}],
    "upsert fields": [{"op": "upsert", "path": "orders", "id": "data.order_id", "from": "data",
                       "fields": ["status", "amount_cents"]}],
    "remove": [{"op": "remove", "path": "orders", "id": "data.order_id"}],
    "add from data": [{"op": "add", "path": "stats.total", "from": "data.amount_cents"}],
    "add literal": [{"op": "add", "path": "stats.count", "value": 1}],
    "add negate": [{"op": "add", "path": "stats.total", "from": "data.amount_cents",
                    "negate": True}],
    "delete": [{"op": "delete"}],
}


def _event(data, **attrs) -> Event:
    base = {"id": "e1", "source": "/shop/orders", "type": "t", "partitionkey": "k",
            "sequence": 7, "time": "2026-01-01T00:00:00.000Z"}
    base.update(attrs)
    return Event(data=data, **base)


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def op_kinds(repeat: int, n: int = 20_000) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    ev = _event(DATA)
    for name, specs in OP_CASES.items():
        row = {}
        for impl, compile_ops in IMPLS:
            apply = compile_ops(specs).apply
            doc = copy.deepcopy(DOC)
            if specs[0]["op"] == "delete":

                def run(apply=apply, doc=doc):
                    for _ in range(n):
                        apply(doc, ev)
            else:

                def run(apply=apply, doc=doc):
                    for _ in range(n):
                        apply(doc, ev)  # returns doc itself: steady state
            row[impl] = _best(run, repeat) / n * 1e6
        out[name] = row
    return out


def shop_pairs(events: int) -> dict[str, list]:
    """feed label -> (specs, view specs, [(document before, event)]) in event order."""
    cfg = tomllib.loads(EXAMPLE.read_text())
    feeds: dict[tuple[str, str], list] = {}
    out: dict[str, list] = {}
    for view_name, view in cfg["views"].items():
        view_specs = [op for f in view["feeds"] for op in f["ops"]]
        for feed in view["feeds"]:
            key = None if feed["key"] == "partitionkey" else feed["key"].split(".")[1:]
            plan = ref.compile_ops(feed["ops"], view_specs)
            for t in feed["types"]:
                label = f"{view_name} <- {t}"
                entry = out[label] = [feed["ops"], view_specs, []]
                feeds.setdefault((feed["source"], t), []).append((view_name, key, plan, entry))
    docs: dict[tuple, dict | None] = {}
    for sim in simulate.generate(5, events).events:
        ev = Event(data=sim.data, **sim.attributes())
        for view_name, key, plan, entry in feeds.get((sim.source_name, sim.type), ()):
            k = sim.partitionkey if key is None else str(ref.get_path(sim.data, key))
            before = docs.get((view_name, k))
            entry[2].append((copy.deepcopy(before), ev))
            docs[(view_name, k)] = plan.apply(copy.deepcopy(before), ev)
    return {label: e for label, e in out.items() if e[2]}


def shop(events: int, repeat: int) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    per_feed: dict[str, dict[str, float]] = {}
    total = {"python": 0.0, "cython": 0.0, "python apply_update": 0.0,
             "cython apply_update": 0.0}
    applies = 0
    for label, (specs, view_specs, pairs) in shop_pairs(events).items():
        applies += len(pairs)
        row = {}
        for impl, compile_ops in IMPLS:
            plan = compile_ops(specs, view_specs)
            best = upd = float("inf")
            for _ in range(repeat):
                docs = [copy.deepcopy(d) for d, _ in pairs]
                t = time.process_time()
                for d, (_, ev) in zip(docs, pairs):
                    plan.apply(d, ev)
                best = min(best, time.process_time() - t)
                stored = [{"v": 1, "d": copy.deepcopy(d), "s": {}} for d, _ in pairs]
                t = time.process_time()
                for s, (_, ev) in zip(stored, pairs):
                    plan.apply_update(s, ev)
                upd = min(upd, time.process_time() - t)
            row[impl] = best / len(pairs) * 1e6
            total[impl] += best
            total[f"{impl} apply_update"] += upd
        per_feed[f"{label} ({len(pairs)})"] = row
    return per_feed, {k: v / applies * 1e6 for k, v in total.items()} | {"applies": applies}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    kinds = op_kinds(args.repeat)
    feeds, total = shop(args.events, args.repeat)
    if args.json:
        print(json.dumps({"op_kinds": kinds, "shop_feeds": feeds, "shop_total": total}))
        return 0
    for title, table in (("µs per apply, by op", kinds), ("µs per apply, shop feeds", feeds)):
        print(f"{title:44} {'python':>8} {'cython':>8} {'ratio':>6}")
        for name, row in table.items():
            print(f"{name:44} {row['python']:8.3f} {row['cython']:8.3f} "
                  f"{row['python'] / row['cython']:6.1f}")
        print()
    print(f"shop workload, {total['applies']} applies, µs per apply: python "
          f"{total['python']:.3f}, cython {total['cython']:.3f} "
          f"({total['python'] / total['cython']:.1f}x); apply_update: python "
          f"{total['python apply_update']:.3f}, cython {total['cython apply_update']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
