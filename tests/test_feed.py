"""Batches prepared ahead of their step: order, errors, early stop."""
import threading
import time

import pytest

from coconut_jax.feed import Prefetch


def test_items_arrive_in_order_and_at_most_depth_ahead():
    made = []

    def make(k):
        made.append(k)
        return k * 10
    with Prefetch(make, range(6), depth=2) as it:
        time.sleep(0.2)  # the thread runs ahead only as far as the queue allows
        assert len(made) <= 3
        assert list(it) == [0, 10, 20, 30, 40, 50]


def test_an_error_in_make_is_raised_at_its_item():
    def make(k):
        if k == 2:
            raise ValueError("bad batch 2")
        return k
    it = Prefetch(make, range(5))
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="bad batch 2"):
        next(it)


def test_closing_early_stops_the_thread():
    before = threading.active_count()
    with Prefetch(lambda k: k, range(10_000), depth=1) as it:
        assert next(it) == 0
    time.sleep(0.05)
    assert threading.active_count() == before
