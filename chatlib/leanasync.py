"""asyncio's ``Event`` and an unbounded ``Queue``, without a ``deque`` each.

Every idle WebSocket connection holds a few of these (uvicorn's receive queue and its
``writable`` flag, the outbox's wake-up), and each of asyncio's holds a
``collections.deque``: 760 bytes even when empty (one 64-slot block), so an
``asyncio.Queue`` (three deques and an ``Event``) costs 3 KiB before anything is put in
it. Waiters are rare and few (one reader, one writer), so a list (56 bytes) does.

* :class:`LeanEvent` is an ``asyncio.Event`` (a subclass: ``isinstance`` holds, every
  method is asyncio's) whose waiters are kept in a list. asyncio's methods only append to,
  remove from and iterate over it. If an upgrade gives ``Event`` other instance state,
  :data:`LeanEvent` is ``asyncio.Event`` itself (checked at import).
* :class:`LeanQueue` has the part of ``asyncio.Queue``'s interface an unbounded queue
  with one consumer needs (``put_nowait``, ``get``, ``get_nowait``, ``empty``,
  ``qsize``): first in, first out, ``get`` waits; any number of getters, woken in order.
"""

from __future__ import annotations

import asyncio
from typing import Any


class _ListEvent(asyncio.Event):
    """``asyncio.Event`` with its waiters in a list instead of a deque."""

    def __init__(self) -> None:  # asyncio.Event.__init__ without the deque
        self._waiters: list[asyncio.Future] = []
        self._value = False


LeanEvent: type[asyncio.Event] = (
    _ListEvent if set(vars(asyncio.Event())) == {"_waiters", "_value"} else asyncio.Event)
"""An ``asyncio.Event`` that costs ~60 bytes instead of ~800 while nobody waits."""


class LeanQueue:
    """An unbounded FIFO queue for one event loop, with ``asyncio.Queue``'s names for the
    methods it has. ``put_nowait`` never blocks; ``get`` waits for an item, and a getter
    cancelled after it was woken passes the wake-up on (as asyncio's does)."""

    __slots__ = ("_items", "_getters")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._getters: list[asyncio.Future] | None = None  # made by the first wait

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake_next()

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    async def get(self) -> Any:
        while not self._items:  # a wake-up without an item (taken by get_nowait): wait again
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                if getter in self._getters:
                    self._getters.remove(getter)
                elif self._items:  # woken, then cancelled: the next getter takes the item
                    self._wake_next()
                raise
        return self._items.pop(0)

    def _wake_next(self) -> None:
        getters = self._getters
        while getters:  # bounded: each turn removes one
            getter = getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return
