"""Change-event publishing alone: CPU per change event through ChangePublisher.

    python -m bench.micro.bench_publish [N]      # default 100,000 change events

Starts the embedded broker, commits N outbox entries (an order document of ~300 bytes, JSON)
to a ChangePublisher in batches of 2,000, pumps and flushes, and prints wall time, CPU time
per change event (this process, including librdkafka's threads) and the top functions.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

from aggregator.admin import create_topics
from aggregator.changes import ChangeEncoder, ChangePublisher
from aggregator.config import config_from_dict
from aggregator.devtools.broker import EmbeddedBroker

DOC = {"order": {"order_id": "o-000042", "customer_id": "c-000008", "quantity": 1,
                 "amount_cents": 17678, "status": "cancelled",
                 "ship_to": {"city": "Lyon", "country": "FR"},
                 "notes": "green door quality instructions"}}


def main(n: int) -> None:
    broker = EmbeddedBroker()
    broker.start()
    try:
        create_topics(broker.bootstrap_servers, ["v.changes"], 4)
        cfg = config_from_dict({
            "kafka": {"bootstrap_servers": broker.bootstrap_servers, "group_id": "g"},
            "sources": {"s": {"topic": "src"}},
            "views": {"v": {"changes_topic": "v.changes", "feeds": [
                {"source": "s", "types": ["t"], "key": "partitionkey",
                 "ops": [{"op": "set", "path": "x", "from": "data"}]}]}}}, env={})
        enc = ChangeEncoder(cfg, ["v"])
        entries = [(i + 1, enc.entry(0, f"o-{i:06d}", 1, enc.encode(DOC))) for i in range(n)]
        pub = ChangePublisher(cfg, enc, lambda seq: iter(()), 0, 0)
        prof = cProfile.Profile()
        t0, c0 = time.perf_counter(), time.process_time()
        prof.enable()
        for k in range(0, n, 2000):
            pub.committed(entries[k:k + 2000])
            pub.pump()
        pub.flush(60)
        prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{n:,} change events: {wall:.2f} s wall, {cpu:.2f} s CPU = "
              f"{cpu / n * 1e6:.2f} µs CPU per event; published {pub.published:,}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)
        pub.close()
    finally:
        broker.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
