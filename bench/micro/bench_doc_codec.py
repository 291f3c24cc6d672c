"""CPU per document of the document codec (issue 13: one encoding for storage and change event).

    python -m bench.micro.bench_doc_codec [--events 200000] [--repeat 5]

The documents are the simulated shop's final view documents (`simulate.expected_views` of the
bench workload), each in a record with a freshness map of two sources as the worker writes it.
Per document, process CPU (best of `--repeat`):

- before: the change body ``orjson.dumps(doc, default=..., OPT_NON_STR_KEYS)`` (every update),
  the record packed whole with msgpack (every stored document), and unpacked whole (every
  read) — what a worker did before doc_codec.py;
- after: `doc_codec.json_body` (orjson once, plus the compiled `json_lossless` check), the
  ``"j"`` record around those bytes (`pack_record`) and `unpack_record`.

One JSON line, then a table.
"""

from __future__ import annotations

import argparse
import base64
import json
import time

import msgpack
import orjson

from aggregator.devtools import simulate
from aggregator.doc_codec import json_body, pack_record, unpack_record
from bench import workload as wl

_pack = msgpack.Packer(use_bin_type=True).pack


def _unpack(b: bytes):
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


def _jsonable(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _body_before(doc) -> bytes:
    return orjson.dumps(doc, default=_jsonable, option=orjson.OPT_NON_STR_KEYS)


def records(events: int) -> list[dict]:
    views = simulate.expected_views(wl.generate(11, events))
    uris = [s.uri for s in simulate.SOURCES.values()]
    out = []
    for docs in views.values():
        for i, doc in enumerate(docs.values()):
            out.append({"v": 1 + i % 9, "d": doc,
                        "s": {uris[i % 7]: [i, "2026-01-01T00:00:00.000Z"],
                              uris[(i + 3) % 7]: [i + 1, "2026-01-01T00:00:01.000Z"]}})
    return out


def cpu_us_per_item(fn, items, repeat: int) -> float:
    """The best of `repeat` loops of `fn` over `items`: process CPU µs per item."""
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        for x in items:
            fn(x)
        best = min(best, time.process_time() - t)
    return best / len(items) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    recs = records(args.events)
    docs = [r["d"] for r in recs]
    bodies = [json_body(d) for d in docs]
    packed_d = [_pack(r) for r in recs]
    packed_j = [pack_record(r, b) for r, b in zip(recs, bodies)]
    pairs = list(zip(recs, bodies))
    res = {
        "documents": len(recs),
        "json_exact": sum(b is not None for b in bodies),
        "record_bytes": {"before": sum(map(len, packed_d)) / len(recs),
                         "after": sum(map(len, packed_j)) / len(recs)},
        "us": {
            "change body": (cpu_us_per_item(_body_before, docs, args.repeat),
                            cpu_us_per_item(json_body, docs, args.repeat)),
            "record pack": (cpu_us_per_item(_pack, recs, args.repeat),
                            cpu_us_per_item(lambda p: pack_record(p[0], p[1]), pairs, args.repeat)),
            "record read": (cpu_us_per_item(_unpack, packed_d, args.repeat),
                            cpu_us_per_item(unpack_record, packed_j, args.repeat)),
        },
    }
    print(json.dumps(res))
    print(f"{res['documents']} documents ({res['json_exact']} JSON-exact), record bytes "
          f"{res['record_bytes']['before']:.0f} -> {res['record_bytes']['after']:.0f}")
    print(f"{'µs per document':16} {'before':>8} {'after':>8}")
    tb = ta = 0.0
    for name, (b, a) in res["us"].items():
        tb, ta = tb + b, ta + a
        print(f"{name:16} {b:8.2f} {a:8.2f}")
    print(f"{'sum':16} {tb:8.2f} {ta:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
