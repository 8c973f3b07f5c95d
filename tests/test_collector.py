"""lifecycle.settle_collector: once serving, start-up's objects are out of the collector's
passes and the youngest generation is collected less often, and garbage in reference
cycles is still collected without anyone calling gc.collect()."""
from __future__ import annotations

import gc
import weakref

import pytest

from gproxyd.lifecycle import YOUNG_COLLECTION_THRESHOLD, settle_collector


@pytest.fixture
def collector():
    """The test process's collector as it was, put back afterwards."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    pass


def test_what_start_up_built_is_frozen_and_young_collections_come_less_often(collector):
    built = [_Node() for _ in range(1000)]
    settle_collector()
    assert gc.get_freeze_count() >= len(built)
    assert gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD > 700
    walked = {id(thing) for thing in gc.get_objects()}  # every generation but the frozen
    assert not walked & {id(node) for node in built}


def test_garbage_in_cycles_made_while_serving_is_still_collected_on_its_own(collector):
    settle_collector()
    looped = _Node()
    looped.itself = looped
    gone = weakref.ref(looped)
    del looped
    kept = [[] for _ in range(3 * YOUNG_COLLECTION_THRESHOLD)]  # allocations, no collect()
    assert gone() is None
    assert len(kept) == 3 * YOUNG_COLLECTION_THRESHOLD
