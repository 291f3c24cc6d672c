"""Process CPU per record spent inside named `store.Batch` calls, in the write_attribution
loop (one in-process worker, shop.toml, transactions of `service.commit_max_bytes`).

    python -m bench.tools.batch_call_cpu --events 211000 [--calls put_seqs,checkpoint_seqs]

Each call is wrapped by a process_time timer (a few hundred ns of overhead per call, the same
for two builds): steadier than the whole loop's CPU on a shared machine, as the timers cover
only the code that a change touched. Run a build from another tree with ``PYTHONPATH=<tree>``
from that tree; calls a build does not have are left out.
"""

from __future__ import annotations

import argparse
import collections
import time

import msgpack

DEFAULT_CALLS = "put_seqs,checkpoint_seqs,get_seq,commit,put_doc,get_doc,mark_seen_many"


def run(events: int, seed: int, calls: list[str]) -> tuple[int, float, dict[str, float]]:
    from aggregator import store
    from bench import workload as wl
    from bench.tools.scale_profile import in_process_worker, transactions

    msgs = wl.ring_messages(wl.generate(seed, events), 100, packed=True)
    spent: collections.Counter = collections.Counter()
    names = [n for n in calls if hasattr(store.Batch, n)]
    saved = {n: getattr(store.Batch, n) for n in names}

    def timed(name, real):
        def call(self, *a, **k):
            t = time.process_time()
            try:
                return real(self, *a, **k)
            finally:
                spent[name] += time.process_time() - t
        return call

    for n in names:
        setattr(store.Batch, n, timed(n, saved[n]))
    try:
        with in_process_worker("callcpu") as (worker, cfg, _tmp):
            txns = transactions(msgs, cfg.service.commit_max_bytes)
            c0 = time.process_time()
            for group in txns:
                worker.process([msgpack.unpackb(m, raw=False, strict_map_key=False)
                                for m in group], [])
            total = time.process_time() - c0
    finally:
        for n, f in saved.items():
            setattr(store.Batch, n, f)
    records = len(msgs) * 100
    return records, total / records * 1e6, {n: spent[n] / records * 1e6 for n in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", "-n", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--calls", default=DEFAULT_CALLS)
    a = ap.parse_args(argv)
    records, total, per = run(a.events, a.seed, a.calls.split(","))
    print(f"{records:,} records, {total:.1f} µs CPU per record; inside the calls: "
          + ", ".join(f"{n} {v:.2f}" for n, v in per.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
