"""Batches prepared ahead of their step: order, errors, early stop."""
import threading
import time

import pytest

from coconut_jax.feed import Prefetch


def test_items_arrive_in_order_and_at_most_depth_ahead():
    """`make(k)` may start only once the consumer has taken item k - depth - 1: the queue holds
    `depth` items and the thread one more in hand. A thread that ran further ahead fails the
    assertion inside `make`, which the consumer then raises."""
    depth, taken = 2, []

    def make(k):
        assert k <= len(taken) + depth, f"item {k} made with only {len(taken)} taken"
        return k * 10
    with Prefetch(make, range(8), depth=depth) as it:
        for item in it:
            taken.append(item)
    assert taken == [k * 10 for k in range(8)]


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
