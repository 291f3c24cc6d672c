"""The benchmark workload: seeded simulation, loading it onto Kafka, and the config to read it.

`simulate.generate(seed, n_events, dup_rate, reorder_rate)` has no knob for the number of
keys or the payload size: the key count (distinct partition keys) and the payload sizes it
produces are measured and reported instead (`describe`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from aggregator.admin import end_offsets
from aggregator.config import default_config_path, load_config
from aggregator.devtools import simulate

log = logging.getLogger(__name__)

CONFIG_PATH = default_config_path()  # examples/shop.toml next to the imported aggregator
PARTITIONS = 4
# The embedded broker's group join otherwise waits half of the 45 s default session timeout.
FAST_JOIN = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


@dataclass
class Loaded:
    """A workload produced onto topics `prefix + shop.*`."""

    workload: simulate.Workload
    prefix: str
    topics: list[str]  # in config order
    ends: dict[tuple[str, int], int]  # high watermark per (topic, partition)
    produce_seconds: float

    @property
    def targets(self) -> dict[tuple[str, int], int]:
        """The last offset of every non-empty partition."""
        return {tp: high - 1 for tp, high in self.ends.items() if high > 0}


def describe(w: simulate.Workload) -> dict:
    sizes = sorted(len(r[2]) for r in w.records)
    keys = {r[1] for r in w.records}

    def q(p: float) -> int:
        return sizes[min(len(sizes) - 1, int(p * len(sizes)))] if sizes else 0

    s = w.stats
    return {
        "seed": w.seed,
        "unique_events": s["unique_events"],
        "records": s["records"],
        "duplicates": s["duplicates"],
        "reordered": s["reordered"],
        "keys": len(keys),
        "streams": s["streams"],
        "structured": s["structured"],
        "binary_json": s["binary_json"],
        "binary_msgpack": s["binary_msgpack"],
        "value_bytes_p5_p50_p95": [q(0.05), q(0.5), q(0.95)],
        "value_bytes_total": s["value_bytes"],
    }


def generate(seed: int, n_events: int) -> simulate.Workload:
    """The default rates of the issue: 5 % duplicates, 2 % reordered."""
    return simulate.generate(seed, n_events, dup_rate=0.05, reorder_rate=0.02)


def source_topics(prefix: str) -> list[str]:
    return [prefix + t for t in simulate.TOPICS]


def output_topics() -> dict[str, str]:
    """Topics the service writes besides the dead-letter topic: {view: change-event topic}
    for the views of shop.toml that publish changes (builds that have the option)."""
    cfg = load_config(CONFIG_PATH, {}, env={})
    return dict(getattr(cfg, "changes_topics", dict)())


def create(bootstrap: str, prefix: str) -> list[str]:
    """Create the source topics and every topic the service writes, all under `prefix`."""
    topics = source_topics(prefix)
    out = [prefix + simulate.DEAD_LETTER_TOPIC] + [prefix + t for t in output_topics().values()]
    simulate.ensure_topics(bootstrap, topics + out, partitions=PARTITIONS)
    return topics


def load(bootstrap: str, workload: simulate.Workload, prefix: str) -> Loaded:
    """Create the topics and produce every record (an idempotent producer, in order)."""
    topics = create(bootstrap, prefix)
    t0 = time.monotonic()
    simulate.produce(workload, bootstrap, prefix,
                     config={"queue.buffering.max.messages": 500_000}, timeout=1800)
    took = time.monotonic() - t0
    return Loaded(workload, prefix, topics, end_offsets(bootstrap, topics), took)


def overrides(bootstrap: str, prefix: str, *, workers: int, data_dir: str | Path,
              group: str, embedded: bool) -> dict:
    """Config overrides (dotted paths) on examples/shop.toml for one aggregator run.

    Everything else keeps the shipped defaults: lmdb_sync = true (durable), 5000 records
    per poll, 64 MiB rings, commit every 1000 ms.
    """
    o: dict = {
        "kafka.bootstrap_servers": bootstrap,
        "kafka.group_id": group,
        "service.workers": workers,
        "service.data_dir": str(data_dir),
        "service.dead_letter_topic": prefix + simulate.DEAD_LETTER_TOPIC,
    }
    for name, src in simulate.SOURCES.items():
        o[f"sources.{name}.topic"] = prefix + src.topic
    for view, topic in output_topics().items():
        o[f"views.{view}.changes_topic"] = prefix + topic
    if "http" in type(load_config(CONFIG_PATH, {}, env={})).model_fields:
        o["http.port"] = 0  # the read API stays on, on any free port (8080 may be taken)
    if embedded:
        for k, v in FAST_JOIN.items():
            o[f"kafka.consumer.{k}"] = v
    return o


def ring_messages(w: simulate.Workload, batch: int, *, limit: int | None = None,
                  packed: bool = False) -> list:
    """The workload's records as supervisor → worker ring messages of `batch` records each
    (normal mode: ``[MSG_RECORDS, batch id, through-offsets, records]``, REC_* fields), for
    benches that drive a `Worker` in-process. Partitions by the Kafka key, offsets counted
    per partition, slots from the routing key. `packed`: msgpack bytes; else decoded as a
    worker decodes them (headers become ``[name, value]`` lists)."""
    import msgpack

    from aggregator.envelope import routing_key
    from aggregator.routing import slot_of

    tindex = {t: i for i, t in enumerate(load_config(CONFIG_PATH, {}, env={}).topics())}
    offs: dict = {}
    recs = []
    for topic, key, value, headers in w.records[:limit]:
        ti, part = tindex[topic], slot_of(key) % PARTITIONS
        off = offs.get((ti, part), 0)
        offs[(ti, part)] = off + 1
        recs.append([ti, part, off, key, value, headers, off,
                     slot_of(routing_key(value, headers, key))])
    out = []
    for bid, i in enumerate(range(0, len(recs), batch), start=1):
        chunk = recs[i:i + batch]
        through = {(r[0], r[1]): r[2] for r in chunk}
        raw = msgpack.packb([1, bid, [[t, p, o] for (t, p), o in through.items()], chunk],
                            use_bin_type=True)
        out.append(raw if packed else
                   msgpack.unpackb(raw, raw=False, strict_map_key=False, use_list=True))
    return out
