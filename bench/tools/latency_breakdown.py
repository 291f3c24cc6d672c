"""Where the end-to-end latency goes: the paced latency run with the service's step trace.

    python -m bench.tools.latency_breakdown --rate 11000 --seconds 20
    python -m bench.tools.latency_breakdown --rate 11000 --set service.commit_window_ms=20 \
        --consumer fetch.wait.max.ms=100
    python -m bench.tools.latency_breakdown --rate 26000 --producer linger.ms=50 --floor

Runs bench/stages/latency.py's `measure_latency` (the whole service on the embedded broker,
a paced load at RATE events/s, produce → state committed, verified against the oracle) with
``AGGREGATOR_LATENCY_TRACE`` set (aggregator/devtools/latency_trace.py), and prints
p50/p90/p99 and per step of a record's way (`latency.STEPS`: they add up to its latency)
p50/p90/p99/mean over all records, the mean around the median (``@p50``) and the mean over
the slowest 1 % (``@p99+``). ``--set`` gives config overrides (dotted keys, repeatable),
``--consumer`` extra librdkafka consumer settings, ``--producer`` the paced producer's (the
load generator's: its ``linger.ms`` sets how many produce requests the embedded broker,
on the same cores, serves per event); ``--floor`` also measures the bare consumer on the
same load (bench/stages/latency.py `measure_floor`); ``--json FILE`` keeps the result.
"""

from __future__ import annotations

import argparse
import json
import uuid


def _value(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return {"true": True, "false": False}.get(text.lower(), text)


def _pairs(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = _value(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, required=True, help="events/s of the paced load")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", "-w", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2001)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override, e.g. service.commit_window_ms=20")
    ap.add_argument("--consumer", action="append", default=[], metavar="KEY=VALUE",
                    help="a librdkafka consumer setting, e.g. fetch.wait.max.ms=100")
    ap.add_argument("--producer", action="append", default=[], metavar="KEY=VALUE",
                    help="a librdkafka setting of the paced producer, e.g. linger.ms=50")
    ap.add_argument("--floor", action="store_true",
                    help="also the bare consumer's latency on the same paced load")
    ap.add_argument("--json", default=None, metavar="FILE")
    a = ap.parse_args(argv)

    from aggregator.devtools.broker import EmbeddedBroker
    from bench.stages.latency import format_breakdown, measure_floor, measure_latency

    broker = EmbeddedBroker().start()
    floor = None
    try:
        r = measure_latency(broker.bootstrap_servers, f"lb{uuid.uuid4().hex[:6]}.", a.workers,
                            a.rate, a.seconds, a.seed, embedded=True, broker_pid=broker.pid,
                            timeout=600, consumer=_pairs(a.consumer),
                            overrides=_pairs(a.set), trace=True,
                            producer=_pairs(a.producer))
        if a.floor:
            floor = measure_floor(broker.bootstrap_servers, f"lf{uuid.uuid4().hex[:6]}.",
                                  a.rate, a.seconds, a.seed, consumer=_pairs(a.consumer),
                                  producer=_pairs(a.producer))
    finally:
        broker.stop()
    print(f"at {r.achieved_rate:,.0f} events/s, {a.workers} workers, settings {a.set} "
          f"consumer {a.consumer} producer {a.producer}: p50 {r.p50_ms} / p90 {r.p90_ms} / "
          f"p99 {r.p99_ms} / max {r.max_ms} ms; verified {r.verified} {r.error}")
    if floor is not None:
        print(f"bare consumer at {floor.achieved_rate:,.0f} events/s: p50 {floor.p50_ms} / "
              f"p90 {floor.p90_ms} / p99 {floor.p99_ms} / max {floor.max_ms} ms {floor.error}")
    print(f"CPU µs per event: {r.cpu_us_per_event}")
    if r.breakdown:
        print(format_breakdown(r.breakdown))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r.to_json() | {"floor": floor.to_json() if floor else None}, f,
                      indent=1)
    return 0 if r.ok and (floor is None or floor.ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
