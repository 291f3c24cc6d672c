"""The workers' garbage collection between transactions (runtime.collect_between_batches)."""

from __future__ import annotations

import gc
import weakref

import pytest

from aggregator import runtime


class Node:
    def __init__(self) -> None:
        self.other = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def between_batches():
    runtime.tune_gc(between_batches=True)
    runtime._batches = 0
    try:
        yield
    finally:
        gc.unfreeze()
        gc.enable()


def test_no_automatic_collection_and_cycles_freed_at_a_full_collection(between_batches):
    assert not gc.isenabled()
    ref = weakref.ref(Node())  # unreachable at once, but held by its own cycle
    for _ in range(runtime.FULL_EVERY - 1):
        assert runtime.collect_between_batches() == 0
        assert gc.get_count()[0] < 100  # frozen: no later collection traverses it
    assert ref() is not None  # waits for the full collection
    assert runtime.collect_between_batches() >= 1
    assert ref() is None
    assert not gc.isenabled() and gc.get_freeze_count() > 0  # frozen again after it


def test_acyclic_objects_are_freed_by_reference_counting_while_frozen(between_batches):
    class Leaf:
        pass

    leaf = Leaf()
    ref = weakref.ref(leaf)
    runtime.collect_between_batches()  # leaf is frozen now
    del leaf
    assert ref() is None


def test_nothing_happens_while_automatic_collection_is_on():
    assert gc.isenabled()
    before = gc.get_freeze_count()
    assert runtime.collect_between_batches() == 0
    assert gc.get_freeze_count() == before
