"""Baseline (a), the ceiling: raw confluent-kafka consumption with no processing.

One consumer, `assign()` of every partition from the beginning (no group join), batches of
`consume(5000)` like the supervisor's, and each record's key, value and headers read once.
The consumer settings are the aggregator's (built-in defaults + shop.toml), so the fetch
path is the same. Window: first record fetched → last record of every partition fetched.
"""

from __future__ import annotations

import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench import workload as wl


def consumer_conf(bootstrap: str, group: str) -> dict:
    """The aggregator's consumer settings (defaults < shop.toml), for a standalone reader."""
    from aggregator.config import load_config

    cfg = load_config(wl.CONFIG_PATH, {"kafka.bootstrap_servers": bootstrap,
                                       "kafka.group_id": group}, env={})
    return cfg.kafka.consumer_conf()


def assigned_consumer(bootstrap: str, targets: dict, group: str) -> Consumer:
    c = Consumer(consumer_conf(bootstrap, group))
    c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for (t, p) in sorted(targets)])
    return c


def consume_all(bootstrap: str, targets: dict, batch: int, conn) -> None:
    """Child process: read every record up to `targets` (last offset per partition)."""
    c = assigned_consumer(bootstrap, targets, "bench-raw")
    left = dict(targets)
    n = nbytes = nheaders = 0
    t_first = 0.0
    t0 = time.monotonic()
    try:
        while left:
            msgs = c.consume(batch, 0.1)
            if not msgs:
                if time.monotonic() - t0 > 600:
                    raise TimeoutError(f"stalled with {len(left)} partitions left")
                continue
            if not t_first:
                t_first = time.monotonic()
                cpu_first = time.process_time()
            for m in msgs:
                if m.error() is not None:
                    continue
                key, value, headers = m.key(), m.value(), m.headers()
                n += 1
                nbytes += len(value) + (len(key) if key else 0)
                nheaders += len(headers) if headers else 0
                tp = (m.topic(), m.partition())
                if tp in left and m.offset() >= left[tp]:
                    del left[tp]
        t_last = time.monotonic()
        cpu = time.process_time() - cpu_first
    finally:
        c.close()
    conn.send({"records": n, "bytes": nbytes, "headers": nheaders, "t_first": t_first,
               "t_last": t_last, "cpu_window_s": cpu})
