"""chatlib.leanasync: asyncio's Event and an unbounded Queue without a deque each; they
must behave as asyncio's do for what uvicorn's WebSocket protocol and the outbox use."""

from __future__ import annotations

import asyncio
import sys

import pytest

from chatlib.leanasync import LeanEvent, LeanQueue


async def test_lean_event_is_an_asyncio_event_that_wakes_every_waiter():
    event = LeanEvent()
    assert isinstance(event, asyncio.Event) and not event.is_set()
    waiters = [asyncio.ensure_future(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    event.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [True, True, True]
    event.clear()
    assert not event.is_set()
    late = asyncio.ensure_future(event.wait())
    await asyncio.sleep(0)
    late.cancel()  # a cancelled waiter leaves nothing behind
    with pytest.raises(asyncio.CancelledError):
        await late
    event.set()
    assert await asyncio.wait_for(event.wait(), 5)


def test_lean_event_is_smaller_than_asyncio_s():
    if LeanEvent is asyncio.Event:
        pytest.skip("this Python's asyncio.Event has other state: LeanEvent is asyncio's")
    size = sys.getsizeof(LeanEvent()._waiters)
    assert size < sys.getsizeof(asyncio.Event()._waiters) / 4


async def test_lean_queue_is_first_in_first_out_and_get_waits():
    queue = LeanQueue()
    assert queue.empty() and queue.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    for item in ("a", "b", "c"):
        queue.put_nowait(item)
    assert await asyncio.wait_for(getter, 5) == "a"
    assert queue.qsize() == 2
    assert [await queue.get(), queue.get_nowait()] == ["b", "c"]
    assert queue.empty()


async def test_lean_queue_wakes_getters_in_order_one_item_each():
    queue = LeanQueue()
    getters = [asyncio.ensure_future(queue.get()) for _ in range(3)]
    await asyncio.sleep(0)
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert await asyncio.wait_for(asyncio.gather(*getters[:2]), 5) == [1, 2]
    assert not getters[2].done()
    getters[2].cancel()
    with pytest.raises(asyncio.CancelledError):
        await getters[2]
    queue.put_nowait(3)  # the cancelled getter is gone: the item waits for the next get
    assert await asyncio.wait_for(queue.get(), 5) == 3


async def test_a_getter_cancelled_after_its_wake_up_passes_it_on():
    """As asyncio.Queue: the item that woke a getter cancelled meanwhile is not stranded."""
    queue = LeanQueue()
    first = asyncio.ensure_future(queue.get())
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("x")  # wakes first ...
    first.cancel()  # ... which is cancelled before it runs
    assert await asyncio.wait_for(second, 5) == "x"
    with pytest.raises(asyncio.CancelledError):
        await first
