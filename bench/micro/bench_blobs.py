"""Compressed change outbox blobs: CPU per change event of compressing a commit's blob
(`changes.compress_blob`, written by every commit) and of opening it again
(`changes.open_blob`, when the publisher reads the outbox after a restart or a failure), and
the size on disk, against LZ4's frame format and zlib on the same blobs.

Run: ``pytest bench/micro/bench_blobs.py --benchmark-only`` (``--benchmark-disable`` runs
each case once, as a smoke test), or ``python -m bench.micro.bench_blobs [--events N]
[--commit 3600] [--repeat 5] [--json]`` for the table: process CPU per change event (best of
`--repeat`) and stored bytes per change event.

The blobs are those a worker writes: the change rows of the seeded shop workload's final
view documents (bench_publish.change_rows: JSON bodies, keyed by view key) packed by
`pack_blob` in commits of `--commit` events (a worker's transaction under load writes
~3,600 records, ~1.4 change events each).
"""

from __future__ import annotations

import argparse
import json
import zlib

import lz4.block
import lz4.frame
import pytest

from aggregator.changes import compress_blob, open_blob, pack_blob
from bench.micro.bench_doc_codec import cpu_us_per_item
from bench.micro.bench_publish import change_rows

COMMIT = 3600


def blobs(events: int, commit: int = COMMIT) -> list[bytes]:
    rows = change_rows(events)
    return [pack_blob(rows[k:k + commit], 1_700_000_000_000, True)
            for k in range(0, len(rows), commit)]


# (name, compress, decompress(stored, raw length)); "lz4.block" is what changes.py stores
CODECS = [
    ("lz4.block", compress_blob, lambda s, n: open_blob(s)),
    ("lz4.frame", lambda b: lz4.frame.compress(b, content_checksum=False),
     lambda s, n: lz4.frame.decompress(s)),
    ("zlib-1", lambda b: zlib.compress(b, 1), lambda s, n: zlib.decompress(s)),
]


def measure(raw: list[bytes], events: int, repeat: int) -> list[dict]:
    size = sum(map(len, raw))
    out = []
    for name, comp, dec in CODECS:
        stored = [comp(b) for b in raw]
        pairs = list(zip(stored, map(len, raw)))
        c = cpu_us_per_item(comp, raw, repeat) * len(raw) / 1e6  # seconds, the best loop
        d = cpu_us_per_item(lambda p: dec(*p), pairs, repeat) * len(pairs) / 1e6
        out.append({"codec": name, "raw_B_per_event": round(size / events, 1),
                    "stored_B_per_event": round(sum(map(len, stored)) / events, 1),
                    "ratio": round(sum(map(len, stored)) / size, 3),
                    "compress_us_per_event": round(c / events * 1e6, 3),
                    "decompress_us_per_event": round(d / events * 1e6, 3),
                    "compress_ns_per_byte": round(c / size * 1e9, 2)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--commit", type=int, default=COMMIT)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    raw = blobs(args.events, args.commit)
    assert all(open_blob(compress_blob(b)) == b for b in raw)
    res = measure(raw, args.events, args.repeat)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{args.events} change events in blobs of {args.commit}; per change event:")
    print(f"{'codec':10s} {'raw B':>8s} {'stored B':>9s} {'ratio':>6s} {'compress µs':>12s} "
          f"{'decompress µs':>14s} {'ns/B':>6s}")
    for r in res:
        print(f"{r['codec']:10s} {r['raw_B_per_event']:8.1f} {r['stored_B_per_event']:9.1f} "
              f"{r['ratio']:6.3f} {r['compress_us_per_event']:12.3f} "
              f"{r['decompress_us_per_event']:14.3f} {r['compress_ns_per_byte']:6.2f}")
    return 0


@pytest.fixture(scope="module")
def raw_blobs():
    return blobs(20_000)


def _report(benchmark, items: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.mean:
        benchmark.extra_info["events_per_s"] = round(items / stats.stats.mean)


def test_compress(benchmark, raw_blobs):
    benchmark(lambda: [compress_blob(b) for b in raw_blobs])
    _report(benchmark, 20_000)


def test_open(benchmark, raw_blobs):
    stored = [compress_blob(b) for b in raw_blobs]
    benchmark(lambda: [open_blob(b) for b in stored])
    _report(benchmark, 20_000)


def test_pack_and_compress(benchmark):
    rows = change_rows(20_000)
    parts = [rows[k:k + COMMIT] for k in range(0, len(rows), COMMIT)]
    benchmark(lambda: [compress_blob(pack_blob(p, 1, True)) for p in parts])
    _report(benchmark, 20_000)


if __name__ == "__main__":
    raise SystemExit(main())
