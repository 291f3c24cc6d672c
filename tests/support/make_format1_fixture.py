"""Build tests/fixtures/format1-2workers.tar.gz: a data dir written by format 1 (the storage
of commit 6d99ae1, before storage v2), for tests/test_migrate.py.

Run it with the OLD code first on the path (its compiled core copied next to it):

    git archive 6d99ae1 | tar -x -C /tmp/old && cp aggregator/_core*.so /tmp/old/aggregator/
    cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/make_format1_fixture.py OUT.tar.gz

What it leaves: 2 real `Worker`s (tests/test_worker.py's Cluster, in-process) ran the first
half of the seed-7 workload with a small bloom filter (capacity 300, 4 generations: several
rotations and generation prunes happened), saved their bloom filters, then ran a few
hundred records more (dedup log entries after the saved filter), got two inventory events
ahead of a gap (parked), read forwarded updates they never applied and change events they
never published, and were killed (only LMDB survives).
"""

from __future__ import annotations

import random
import sys
import tarfile
import tempfile
from pathlib import Path

import lmdb
import msgpack

from aggregator import store
from aggregator.devtools import simulate
from tests.test_reshard import crash, inventory
from tests.test_worker import N_EVENTS, Cluster

SMALL = {"dedup.bloom_capacity": 300, "dedup.bloom_generations": 4}


def main(out: str) -> None:
    assert store.FORMAT_VERSION == 1, "run this with the format-1 code on the path"
    workload = simulate.generate(7, N_EVENTS)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        c = Cluster(data, 2, SMALL)
        c.boot()
        recs = c.ring_records(workload.records)
        half = len(recs) // 2
        c.feed(recs[:half], random.Random(11))
        c.dispatch(inventory(c, "p-mig", [2, 3]))  # parked: 1 is missing
        c.settle()
        for w in c.workers:
            w.save_bloom()
        c.feed(recs[half:half + 300], random.Random(12))  # logged after the saved filters
        c.workers[1].publisher.pump = lambda: None  # dies before publishing these changes
        c.dispatch(recs[half + 300:half + 400])  # forwarded updates read, not applied
        crash(c)
        for shard in sorted(data.glob("shard-*")):  # a compact copy: the same rows, no free pages
            env = lmdb.open(str(shard), readonly=True, lock=False, max_dbs=16)
            (shard / "c").mkdir()
            env.copy(str(shard / "c"), compact=True)
            env.close()
            (shard / "c" / "data.mdb").replace(shard / "data.mdb")
            (shard / "c").rmdir()
        (data / "fixture.msgpack").write_bytes(msgpack.packb({"through": half + 400}))
        with tarfile.open(out, "w:gz") as tar:
            tar.add(data, arcname="data", filter=lambda t: None if t.name.endswith("lock.mdb")
                    else t)


if __name__ == "__main__":
    main(sys.argv[1])
