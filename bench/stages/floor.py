"""Baseline (c), the floor: the 50-line loop a user writes first (issue 13).

One process: consume, a dict of the headers, the JSON (or msgpack) payload, a set for dedup,
a dict update per key for the "merge" — no sequence gate, no merge ops, nothing durable, no
change events. Its views are not the oracle's (it does less than the service): it is the
floor under which no pipeline that parses and keeps state can go, and the service's rate is
reported as a ratio to it (goal ≥ 0.6x). orjson parses JSON, as the service does.
"""

from __future__ import annotations

import time

import msgpack
import orjson

STRUCTURED = b"application/cloudevents+json"


def run(bootstrap: str, targets: dict, batch: int, conn) -> None:
    """Child process: read every record up to `targets` and fold it into dicts."""
    from bench.stages.raw import assigned_consumer

    c = assigned_consumer(bootstrap, targets, "bench-floor")
    left = dict(targets)
    seen: set = set()
    docs: dict = {}
    n = dups = bad = 0
    t_first = cpu_first = 0.0
    t0 = time.monotonic()
    try:
        while left:
            msgs = c.consume(batch, 0.1)
            if not msgs:
                if time.monotonic() - t0 > 1800:
                    raise TimeoutError(f"stalled with {len(left)} partitions left")
                continue
            if not t_first:
                t_first, cpu_first = time.monotonic(), time.process_time()
            for m in msgs:
                if m.error() is not None:
                    continue
                n += 1
                h = dict(m.headers() or ())
                try:
                    if h.get("content-type", b"").startswith(STRUCTURED):
                        ev = orjson.loads(m.value())
                        ident, pk, data = (ev["source"], ev["id"]), ev.get("partitionkey"), \
                            ev.get("data")
                    else:
                        ident, pk = (h["ce_source"], h["ce_id"]), h.get("ce_partitionkey")
                        ct = h.get("content-type", b"")
                        data = msgpack.unpackb(m.value()) if b"msgpack" in ct else \
                            orjson.loads(m.value())
                except (KeyError, ValueError, TypeError):
                    bad += 1
                    continue
                if ident in seen:
                    dups += 1
                else:
                    seen.add(ident)
                    if isinstance(data, dict):
                        docs.setdefault(pk or m.key(), {}).update(data)
                tp = (m.topic(), m.partition())
                if tp in left and m.offset() >= left[tp]:
                    del left[tp]
        t_last = time.monotonic()
        cpu = time.process_time() - cpu_first
    finally:
        c.close()
    conn.send({"records": n, "duplicates": dups, "bad": bad, "keys": len(docs),
               "t_first": t_first, "t_last": t_last, "cpu_window_s": cpu})
