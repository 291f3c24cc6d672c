"""supervisor._count_crash: when a worker's crashes after boot stop the service (the
integration test tests/integration/test_kafka_startup.py runs the real thing)."""

from __future__ import annotations

import pytest

from aggregator.control import Slot
from aggregator.supervisor import FatalError, Supervisor, WorkerHandle


class Pipe:
    def __init__(self, message):
        self.message = message

    def poll(self):
        return self.message is not None

    def recv(self):
        return self.message


class Control:
    def __init__(self):
        self.acked = 0

    def get(self, _worker, slot):
        assert slot == Slot.ACK_BATCH
        return self.acked


class Service:
    max_worker_crashes = 3


def supervisor():
    sup = Supervisor.__new__(Supervisor)
    sup.svc, sup.ctl = Service(), Control()
    return sup


def crash(sup, h, error, acked=False):
    h.acked_at_spawn = sup.ctl.acked
    if acked:
        sup.ctl.acked += 1
    h.errors = Pipe(error)
    sup._count_crash(h)


def test_the_same_error_three_times_stops():
    sup, h = supervisor(), WorkerHandle(0)
    crash(sup, h, "KafkaException: x")
    crash(sup, h, "KafkaException: x")
    with pytest.raises(FatalError, match=r"^worker 0 crashed 3 times in a row after booting, "
                       r"each time with the same error and no batch committed: "
                       r"KafkaException: x; stopping \(service.max_worker_crashes = 3\)$"):
        crash(sup, h, "KafkaException: x")


def test_another_error_a_kill_or_progress_starts_a_new_count():
    sup, h = supervisor(), WorkerHandle(0)
    for error, acked, count in [("A", False, 1), ("A", False, 2), ("B", False, 1),
                                ("B", False, 2), (None, False, 0), ("B", False, 1),
                                ("B", False, 2), ("B", True, 1), ("B", False, 2)]:
        crash(sup, h, error, acked)
        assert h.crashes == count, (error, acked)
