"""A push client's side of the fan-out: a bounded queue, and direct writes while idle.

:class:`Outbox` is the :class:`~chatlib.hub.Subscriber` the WebSocket and SSE transports
give the hub. Publishing never waits for a client: :meth:`Outbox.deliver` queues the batch
and returns. A client that stops reading fills its queue, ``deliver`` refuses, and the hub
closes it (1013, "try again later"); it can resume from its last id, and nobody else was
slowed down.

A transport may give its outbox a :attr:`Outbox.sink`: a function that writes a batch at
once if the connection can take it. While the connection's writer is idle (history sent,
queue empty, nothing in flight) ``deliver`` calls the sink instead of queueing, so that a
message costs no task wake-up per client; anything that cannot be written at once (the
transport is paused by flow control, closing, ...) is queued and the writer takes over,
in order.

A writer need not even exist while idle: with ``stream(..., wake=...)`` the stream ends
once the history is sent and nothing is queued, and the outbox calls ``wake`` (its
:attr:`Outbox.on_backlog`) when it next queues something or closes; the transport then
starts a writer that takes the backlog (:meth:`Outbox.backlog`) and ends again when it is
written. An idle WebSocket connection thus holds no writer task at all (chatlib.ws).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from .closecode import CloseCode
from .hub import Batch, Hub, Resume
from .leanasync import LeanEvent
from .wire import Encoding


def unsent(items: list[tuple[int, str]], sent: int) -> tuple[list[str], int]:
    """The payloads of queued ``items`` (``(message id or 0, payload)``) that were not sent
    as history (id > ``sent``; 0: not a message), and the newest id sent once they are."""
    if not items or items[0][0] > sent:
        # The usual case: a message's id is > sent, and so are the rest (ids only grow in
        # an outbox); one test per batch, not one per item.
        batch = [payload for _, payload in items]
    else:
        batch = [payload for message_id, payload in items
                 if not message_id or message_id > sent]
    for message_id, _ in reversed(items):
        if message_id:
            return batch, max(sent, message_id)
    return batch, sent


class Outbox:
    """A bounded queue of ``(message_id, payload)`` for one push client.

    ``message_id`` is 0 for events that are not messages (presence, typing); writers use
    it to skip messages they already sent as history.
    """

    __slots__ = ("encoding", "user", "limit", "closed", "close_code", "on_close", "sink",
                 "direct", "on_backlog", "sent", "_items", "_ready")

    def __init__(self, encoding: Encoding, user: str = "", limit: int = 1024) -> None:
        self.encoding = encoding
        """How this client's payloads are encoded (chatlib.wire.WEBSOCKET or SSE)."""
        self.user = user
        """The client's nickname; "" for a reader that is not in the chat."""
        self.limit = limit
        self.closed = False
        self.close_code = 0
        self.on_close: Callable[[int], None] | None = None
        """Called with the close code when the outbox closes (the transport's business)."""
        self.sink: Callable[[tuple[str, ...]], bool] | None = None
        """Set by the transport: writes the payloads now (in order, one write) and returns
        True, or returns False (cannot write now: they are queued for the writer instead).
        The tuple is the same object for every client of a fan-out (a cache key)."""
        self.direct: Callable[[tuple[str, ...]], bool] | None = None
        """``sink`` while the writer is idle in :meth:`get` (nothing queued, nothing in
        flight): only then may a payload skip the queue without overtaking older ones."""
        self.on_backlog: Callable[[], None] | None = None
        """Set while no writer runs (:meth:`backlog` ended idle): called once, and cleared,
        when something is queued or the outbox closes; it starts a writer."""
        self.sent = 0
        """Messages up to this id were sent as history: ``direct`` skips them (see push)."""
        # A list and chatlib.leanasync's Event, not a deque and asyncio's: ~1.4 KiB less
        # per connection, and the writer takes the whole list at once (get). The Event is
        # made by the first get() that waits: a WebSocket's writers never do (backlog).
        self._items: list[tuple[int, str]] = []
        self._ready: LeanEvent | None = None

    @property
    def queued(self) -> int:
        """How many payloads wait for the writer."""
        return len(self._items)

    def deliver(self, batch: Batch) -> bool:
        """Take ``batch`` (written at once if idle, else queued); False if the queue is full.

        The hub calls this once per client per fan-out. An idle outbox (``direct`` set:
        empty queue, writer asleep) whose sink can write now gets the payloads written at
        once, skipping the queue and its writer's wake-up: one message in flight (the
        chat's normal state) then costs no task switch per client. ``direct`` is only set
        while the queue is empty and the writer has nothing in flight, so a direct write
        never overtakes a queued one; a message the writer already sent as history (id <=
        ``sent``) is queued, for the writer to skip.
        """
        direct = self.direct  # set only while open, idle and with nothing queued
        if direct is not None:
            first = batch.first_id
            if (not first or first > self.sent) and direct(batch.payloads):
                return True
            self.direct = None  # queued from now on: nothing may overtake what follows
        elif self.closed:
            return True
        queue = self._items
        items = batch.items
        if len(queue) + len(items) > self.limit:
            return False  # too slow: the hub closes it rather than let it hold others back
        if not queue:
            # Only a batch that finds the queue empty can find the writer asleep (it
            # sleeps only when the queue is empty): a burst skips an Event.set() per item.
            if self._ready is not None:
                self._ready.set()
        queue.extend(items)
        self._wake()
        return True

    def put(self, message_id: int, payload: str) -> None:
        """Deliver one payload; close with 1013 if the queue is full."""
        if not self.deliver(Batch(((message_id, payload),))):
            self.close(CloseCode.TRY_AGAIN_LATER)

    def close(self, code: int) -> None:
        if not self.closed:
            self.closed, self.close_code = True, code
            self.direct = None
            self._items.clear()
            if self._ready is not None:
                self._ready.set()
            if self.on_close is not None:
                self.on_close(code)
            self._wake()  # a writer writes the close

    def _wake(self) -> None:
        """Start a writer if none runs (:attr:`on_backlog`)."""
        wake = self.on_backlog
        if wake is not None:
            self.on_backlog = None
            wake()

    async def get(self, timeout: float | None = None) -> list[tuple[int, str]]:
        """Everything queued (waiting up to ``timeout`` for something); [] on timeout/close."""
        if not self._items and not self.closed:
            ready = self._ready
            if ready is None:
                ready = self._ready = LeanEvent()
            else:
                ready.clear()
            # Idle: from now until we wake, deliver() may write straight to the sink (what
            # the caller took before has all been written: it called us again).
            self.direct = self.sink
            try:
                if timeout is None:  # no wait_for() per wake-up
                    await ready.wait()
                else:
                    try:
                        await asyncio.wait_for(ready.wait(), timeout)
                    except TimeoutError:
                        return []
            finally:
                # Awake (something was queued, or closed): what we take now is in flight
                # until the next get(), and nothing may overtake it.
                self.direct = None
        items, self._items = self._items, []
        return items

    async def stream(self, hub: Hub, resume: Resume, heartbeat: float | None = None,
                     address: str | None = None,
                     wake: Callable[[], None] | None = None) -> AsyncIterator[list[str]]:
        """What this client is sent, as batches of encoded payloads.

        The events of ``resume`` (reset, gap, history: see Resume.of), the
        history after its cursor page by page, then what the hub queues here, skipping
        messages already sent as history (the outbox was subscribed before the history
        was read, so nothing falls between the two; paced by ``address``'s replay budget,
        Hub.history). An empty batch means ``heartbeat``
        seconds passed with nothing to send. Ends when the outbox is closed; the transport
        only writes the batches. With ``wake`` it also ends once the history is sent and
        nothing is queued: see :meth:`backlog`.
        """
        encoding = self.encoding
        first = [encoding.reset if name == "reset" and not data else encoding.event(name, data)
                 for name, data in resume.events(hub.room)]
        if first:
            yield first
        cursor = sent = resume.start
        frame = encoding.message
        async for page in hub.history(cursor, address):
            if self.closed:  # the client left (or was closed) while its replay was paced
                return
            yield [frame(message) for message in page]
            sent = page[-1].id
        if wake is not None:
            self.sent = sent
            async for batch in self.backlog(wake):
                yield batch
            return
        while True:
            self.sent = sent  # for deliver's direct writes: history not to send again
            items = await self.get(heartbeat)
            if self.closed:
                return
            batch, newest = unsent(items, sent)
            yield batch
            sent = newest

    async def backlog(self, wake: Callable[[], None]) -> AsyncIterator[list[str]]:
        """What is queued, a batch at a time, skipping messages sent as history (id <=
        :attr:`sent`), until the queue is empty or the outbox closed.

        Found empty (and open), the outbox is left idle with no writer: ``direct`` writes
        on, and ``wake`` set as :attr:`on_backlog`, called when something is queued or the
        outbox closes. The caller's writer then returns at once (in the same loop step, so
        that nothing is queued between the two) and ``wake`` starts another, which calls
        this again. Each batch is in flight, nothing may overtake it, until the caller asks
        for the next.
        """
        while not self.closed:  # bounded: each turn takes the whole queue, or returns
            items = self._items
            if not items:
                self.direct = self.sink
                self.on_backlog = wake
                return
            self._items = []
            batch, newest = unsent(items, self.sent)
            yield batch
            self.sent = newest
