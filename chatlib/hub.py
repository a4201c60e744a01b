"""Fan-out: one published message reaches every connected client, whatever its transport.

Push transports (WebSocket, SSE) each get an :class:`Outbox`, a bounded queue drained by
that connection's own writer. Publishing never waits for a client: it appends to every
outbox and returns. A client that stops reading fills its outbox and is closed (1013,
"try again later"); it can resume from its last id, and nobody else was slowed down.

A transport may give its outbox a :attr:`Outbox.sink`: a function that writes one payload
at once if the connection can take it. While the writer is idle (history sent, queue
empty, nothing in flight) publishing calls the sink instead of queueing, so that a message
costs no task wake-up per client; anything that cannot be written at once (the transport
is paused by flow control, closing, ...) is queued and the writer takes over, in order.

Pull transports (polling, long polling) need no outbox: they read the log after their
cursor; long polls sleep on an :class:`asyncio.Event` that every publish sets.

Each message is encoded once per transport, not once per client.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable

from . import wire
from .limits import Limits, RateLimits
from .store import Message, MessageLog

GOING_AWAY = 1001
SERVICE_RESTART = 1012  # IANA close code registry (RFC 6455 11.7): "come back in a moment"
TRY_AGAIN_LATER = 1013

# How each push transport frames a message, and a reset.
FRAME = {"ws": wire.ws_frame, "sse": wire.sse_message}
RESET = {"ws": wire.WS_RESET, "sse": wire.SSE_RESET}


class Outbox:
    """A bounded queue of ``(message_id, payload)`` for one push client.

    ``message_id`` is 0 for events that are not messages (presence, typing); writers use
    it to skip messages they already sent as history.
    """

    __slots__ = ("kind", "user", "limit", "closed", "close_code", "on_close", "sink",
                 "direct", "sent", "_items", "_ready")

    def __init__(self, kind: str, user: str, limit: int) -> None:
        self.kind = kind
        self.user = user
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
        self.sent = 0
        """Messages up to this id were sent as history: ``direct`` skips them (see push)."""
        self._items: deque[tuple[int, str]] = deque()
        self._ready = asyncio.Event()

    def put(self, message_id: int, payload: str) -> None:
        put_all((self,), (message_id, payload))

    def close(self, code: int) -> None:
        if not self.closed:
            self.closed, self.close_code = True, code
            self._items.clear()
            self._ready.set()
            if self.on_close is not None:
                self.on_close(code)

    async def get(self, timeout: float | None = None) -> list[tuple[int, str]]:
        """Everything queued (waiting up to ``timeout`` for something); [] on timeout/close."""
        if not self._items and not self.closed:
            self._ready.clear()
            # Idle: from now until we wake, put_all may write straight to the sink (what
            # the caller took before has all been written: it called us again).
            self.direct = self.sink
            try:
                if timeout is None:  # the WebSocket writer's case: no wait_for() per wake-up
                    await self._ready.wait()
                else:
                    try:
                        await asyncio.wait_for(self._ready.wait(), timeout)
                    except TimeoutError:
                        return []
            finally:
                # Awake (something was queued, or closed): what we take now is in flight
                # until the next get(), and nothing may overtake it.
                self.direct = None
        items = list(self._items)
        self._items.clear()
        return items


def put_all(outboxes, item: tuple[int, str]) -> None:
    """``outbox.put(*item)`` for every outbox: what each publish does, once per client.

    Outbox.put's body lives here, inlined into the loop, because this loop runs once per
    delivery: no method call and one shared tuple per client, 118 -> 48 ns (measured).

    An idle outbox (``direct`` set: empty queue, writer asleep) with a sink that can write
    now gets the payload written at once, skipping the queue and its writer's wake-up: one
    message in flight (the chat's normal state) then costs no task switch per client.
    ``direct`` is only set while the queue is empty and the writer has nothing in flight,
    so a direct write never overtakes a queued one; a message the writer already sent as
    history (id <= ``sent``) is queued, for the writer to skip.
    """
    message_id, payload = item
    payloads = (payload,)  # one tuple for every client: the sink's frame cache keys on it
    for outbox in outboxes:
        if outbox.closed:
            continue
        items = outbox._items
        if not items:
            direct = outbox.direct
            if (direct is not None and (not message_id or message_id > outbox.sent)
                    and direct(payloads)):
                continue
        elif len(items) >= outbox.limit:
            outbox.close(TRY_AGAIN_LATER)  # too slow: don't let it hold the others back
            continue
        items.append(item)
        if len(items) == 1:
            # Only the first item can find the writer asleep (it sleeps only when the queue
            # is empty): a fan-out burst skips an Event.set() call per item.
            outbox._ready.set()


def put_group(outboxes, items: list[tuple[int, str]]) -> None:
    """``put_all(outboxes, item)`` for each of ``items`` (in order), client by client: an
    idle client gets all of them in one write (one ``send()``, one TCP segment).

    This is what a burst costs the kernel: on loopback the server's ``send()`` also runs
    the receiving socket's TCP input and its ACK, so a delivery costs per *segment*, and
    one frame to each client in turn (message by message) is one segment, and about one
    ACK, per delivery (bench/README.md, "The burst at N=1000").
    """
    payloads = tuple(payload for _, payload in items)  # shared by all: see Outbox.sink
    first = next((message_id for message_id, _ in items if message_id), 0)  # ids only grow
    for outbox in outboxes:
        if outbox.closed:
            continue
        queue = outbox._items
        was_empty = not queue
        if was_empty:
            direct = outbox.direct
            if direct is not None and (not first or first > outbox.sent) and direct(payloads):
                continue
        for item in items:
            if queue and len(queue) >= outbox.limit:
                outbox.close(TRY_AGAIN_LATER)  # too slow: don't let it hold the others back
                break
            queue.append(item)
        else:
            if was_empty:
                outbox._ready.set()


FANOUT_SLICE = 256
"""Deliveries one event-loop step makes before the loop may run anything else.

A fan-out is a loop over every client, and nothing else runs on the event loop meanwhile:
in a Jupyter kernel with 5,000 clients one message held the loop ~50 ms, and a cell
waiting behind it took as long (``1+1``: p99 71-180 ms at 10 messages/s, bench/classroom.py).
Bigger fan-outs go in slices of this many clients, one per loop step, all of one
message's before the next message's (see :meth:`Hub._fan_out`)."""

FANOUT_GROUP = 32
"""At most this many fan-outs waiting for the same clients go out together, client by
client (:func:`put_group`): a burst's frames to one client in one write."""


class Hub:
    """The log, who is connected, and the fan-out between them."""

    def __init__(self, log: MessageLog, limits: Limits) -> None:
        self.log = log
        self.limits = limits
        self._outboxes: dict[str, set[Outbox]] = {"ws": set(), "sse": set()}
        self._new_message = asyncio.Event()
        self._connected: Counter[str] = Counter()  # WebSocket and SSE users
        self._polled: dict[str, tuple[float, str]] = {}  # HTTP user -> (last seen, address)
        self._polled_per_address: Counter[str] = Counter()
        self._new_names = RateLimits(limits.new_names_rate, limits.new_names_burst)
        self._presence_sent: list[str] = []
        self._presence_data: dict = {"users": [], "count": 0}
        self._presence_sent_at = float("-inf")  # loop time of the last presence broadcast
        self._presence_due: asyncio.TimerHandle | None = None
        self._published = 0  # every message up to this id has been fanned out
        self._fanning: deque[tuple[list[Outbox], tuple[int, str]]] = deque()  # _fan_out
        self._fanned = 0  # outboxes of _fanning[0] done (of each fan-out of the group)
        self._group: list[tuple[int, str]] = []  # the items of _fanning's first fan-outs
        self._roster = 0  # changes of _outboxes (subscribe, unsubscribe)
        self._snapshot: tuple[set[Outbox] | None, int, list[Outbox]] = (None, -1, [])
        self._publishing = asyncio.Lock()
        self._follower: asyncio.Task | None = None
        self._pushed = False  # the log tells us about every message (RedisLog.follow)
        self.closing = asyncio.Event()
        # Set by a log that follows other server processes (RedisLog.follow):
        self.elsewhere: frozenset[str] = frozenset()  # users connected to other processes
        self.relay_typing = None  # tells the other processes who is typing here

    @property
    def published(self) -> int:
        """Every message up to this id has been fanned out."""
        return self._published

    async def start(self) -> None:
        """Begin after what the log already holds; follow other writers if it has any."""
        self._published = await self.log.last_id()
        if hasattr(self.log, "follow"):  # the log pushes what other processes write
            self._follower = asyncio.ensure_future(self.log.follow(self))
            self._pushed = True
        elif getattr(self.log, "poll_interval", None):
            self._follower = asyncio.ensure_future(self._follow(self.log.poll_interval))

    # -- messages ------------------------------------------------------------------------

    async def post(self, user: str, text: str,
                   client_id: str | None = None) -> tuple[Message, bool]:
        """Append to the log and fan out: ``(message, duplicate)``.

        A repeat of ``(user, client_id)`` is not stored nor fanned out again: it returns
        ``(original, True)`` (see :meth:`MessageLog.append`).
        """
        message, duplicate = await self.log.append(user, text, client_id)
        if not duplicate and not self._pushed:
            await self.catch_up()
        # A log that pushes (RedisLog.follow) delivers this one too, in order, in batches:
        # a burst of posts costs one read and one wake-up per client per batch.
        return message, duplicate

    async def catch_up(self) -> None:
        """Fan out, in id order, every message in the log not fanned out yet.

        Usually that is just the message this process appended; with a log that other
        processes write to, it also picks up theirs, in the order of the log's ids (which
        is what writers' dedupe-by-id relies on).
        """
        async with self._publishing:
            async for page in self.history(self._published):
                for message in page:
                    self._publish(message)
                self._published = page[-1].id

    async def deliver(self, messages: list[Message]) -> None:
        """Fan out ``messages`` (consecutive, in id order) that a follower read from the
        log, skipping those already published."""
        async with self._publishing:
            for message in messages:
                if message.id > self._published:
                    self._publish(message)
                    self._published = message.id

    async def _follow(self, interval: float) -> None:
        while not self.closing.is_set():
            await asyncio.sleep(interval)
            await self.catch_up()

    def _publish(self, message: Message) -> None:
        ws, sse = self._outboxes["ws"], self._outboxes["sse"]
        if ws:
            self._fan_out(ws, (message.id, wire.ws_frame(message)))
        if sse:
            self._fan_out(sse, (message.id, wire.sse_message(message)))
        # Wake every long poll, then arm a fresh event for the next message.
        self._new_message.set()
        self._new_message = asyncio.Event()

    async def last_id(self) -> int:
        """The newest message's id (0 for an empty log)."""
        return await self.log.last_id()

    async def history(self, cursor: int) -> AsyncIterator[list[Message]]:
        """Pages (at most ``limits.history`` messages each) after ``cursor``, until caught up."""
        size = self.limits.history
        for _ in range(1 << 62):  # ends at the log's end; every page moves the cursor on
            page = await self.log.after(cursor, size)
            if not page:
                return
            yield page
            cursor = page[-1].id
            if len(page) < size:
                return

    async def resolve_cursor(self, after: int) -> tuple[int, bool]:
        """``(cursor, reset)``: a cursor past the end means the log was replaced."""
        if after > 0 and after > await self.log.last_id():
            return 0, True
        return max(after, 0), False

    async def push(self, outbox: Outbox, cursor: int, reset: bool,
                   heartbeat: float | None = None) -> AsyncIterator[list[str]]:
        """What one push client (WebSocket or SSE) is sent, as batches of encoded payloads.

        A reset if asked, the history after ``cursor`` page by page, then what the hub queues
        in ``outbox``, skipping messages already sent as history (the outbox was subscribed
        before the history was read, so nothing falls between the two). An empty batch means
        ``heartbeat`` seconds passed with nothing to send. Ends when the outbox is closed;
        the transport only frames and writes the batches.
        """
        kind = outbox.kind
        if reset:
            yield [RESET[kind]]
        sent = cursor
        frame = FRAME[kind]
        async for page in self.history(cursor):
            yield [frame(message) for message in page]
            sent = page[-1].id
        while True:
            outbox.sent = sent  # for put_all's direct writes: history not to send again
            items = await outbox.get(heartbeat)
            if outbox.closed:
                return
            if not items or items[0][0] > sent:
                # The usual case: a message's id is > sent, and so are the rest (ids only
                # grow in an outbox); one test per batch, not one per item.
                yield [payload for _, payload in items]
            else:
                yield [payload for message_id, payload in items
                       if not message_id or message_id > sent]
            for message_id, _ in reversed(items):
                if message_id:
                    sent = max(sent, message_id)
                    break

    async def wait_after(self, after: int, timeout: float) -> list[Message]:
        """Messages after ``after``, waiting up to ``timeout`` s for the first (long poll)."""
        # Take the event *before* reading the log: a message appended while we read sets
        # this very event, so it cannot slip between the read and the wait.
        new_message = self._new_message
        messages = await self.log.after(after, self.limits.history)
        if messages or timeout <= 0 or self.closing.is_set():
            return messages
        closing = asyncio.ensure_future(self.closing.wait())
        arrived = asyncio.ensure_future(new_message.wait())
        try:
            await asyncio.wait({closing, arrived}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            arrived.cancel()
        return await self.log.after(after, self.limits.history)

    # -- events that are not messages ----------------------------------------------------

    @staticmethod
    def _payloads(event: str, data: dict) -> dict[str, str]:
        """An event that is not a message, encoded for each push transport."""
        return {"ws": wire.ws_event(event, data), "sse": wire.sse_event(event, data)}

    def _broadcast(self, event: str, data: dict) -> None:
        payloads = self._payloads(event, data)
        for kind, outboxes in self._outboxes.items():
            if outboxes:
                self._fan_out(outboxes, (0, payloads[kind]))

    def _fan_out(self, outboxes: set[Outbox], item: tuple[int, str]) -> None:
        """``put_all(outboxes, item)``, at most :data:`FANOUT_SLICE` deliveries per loop step.

        Fan-outs form one queue, served in order: every client gets message 1 before any
        client gets message 2, as when each ran at once. A big one takes a snapshot of the
        outboxes: a client that subscribes meanwhile reads the message from the log, one
        that leaves is closed (``put_all`` skips it). Small ones with nothing queued run
        at once, as before.
        """
        if not self._fanning and len(outboxes) <= FANOUT_SLICE:
            put_all(outboxes, item)
            return
        # Fan-outs to the same clients share one snapshot, so that a burst's can go out
        # together (see _fan_out_step).
        snapshot_of, roster, snapshot = self._snapshot
        if snapshot_of is not outboxes or roster != self._roster:
            snapshot = list(outboxes)
            self._snapshot = (outboxes, self._roster, snapshot)
        self._fanning.append((snapshot, item))
        if len(self._fanning) == 1:  # else a step is already scheduled
            self._fan_out_step()

    def _fan_out_step(self) -> None:
        """One slice: :data:`FANOUT_SLICE` deliveries, then the next step is scheduled.

        The first fan-outs of the queue that go to the same snapshot (a burst, published
        while an earlier one was still going out) make a group, up to :data:`FANOUT_GROUP`:
        each client of the slice gets the whole group at once (:func:`put_group`). Every
        client still gets the messages in order, and a fan-out queued later (an ack, a
        client that joined) still waits for the group to end.
        """
        budget = FANOUT_SLICE
        while self._fanning and budget > 0:  # bounded: every turn spends budget or pops
            outboxes = self._fanning[0][0]
            start = self._fanned
            if not start:  # a new group: the leading fan-outs to the same snapshot
                group = self._group = []
                for snapshot, item in self._fanning:
                    if snapshot is not outboxes or len(group) == FANOUT_GROUP:
                        break
                    group.append(item)
            group = self._group
            chunk = outboxes[start:start + max(1, budget // len(group))]
            if len(group) == 1:
                put_all(chunk, group[0])
            else:
                put_group(chunk, group)
            budget -= len(chunk) * len(group)
            if start + len(chunk) >= len(outboxes):
                for _ in group:
                    self._fanning.popleft()
                self._fanned = 0
            else:
                self._fanned = start + len(chunk)
        if self._fanning:
            asyncio.get_running_loop().call_soon(self._fan_out_step)

    def tell(self, outbox: Outbox, payload: str) -> None:
        """An event for one client only (its ack, an error): queued behind any fan-out
        still going out in slices, so that an ack never overtakes its own message."""
        self._fan_out((outbox,), (0, payload))

    def typing(self, user: str, relay: bool = True) -> None:
        self._broadcast("typing", {"user": user})
        if relay and self.relay_typing is not None:
            self.relay_typing(user)

    # -- presence ------------------------------------------------------------------------

    def subscribe(self, kind: str, user: str) -> Outbox:
        """A new push client; ``user`` may be "" for a reader that is not in the chat."""
        outbox = Outbox(kind, user, self.limits.max_queue)
        self._outboxes[kind].add(outbox)
        self._roster += 1
        if user:
            if user in self._presence_sent:  # a second tab: the list won't change; tell it
                outbox.put(0, self._payloads("presence", self._presence_data)[kind])
            self._connected[user] += 1
            self.presence_changed()
        return outbox

    def unsubscribe(self, outbox: Outbox) -> None:
        if outbox in self._outboxes[outbox.kind]:
            self._outboxes[outbox.kind].discard(outbox)
            self._roster += 1
            if outbox.user:
                self._connected[outbox.user] -= 1
                if self._connected[outbox.user] <= 0:
                    del self._connected[outbox.user]
                self.presence_changed()

    def touch(self, user: str, address: str = "") -> str:
        """An HTTP (polling) client named ``user`` at ``address`` just made a request.

        Returns "" or, when ``user`` is new and may not join the presence list, why not:
        one address may have at most ``polled_per_address`` polling names, and announce
        new ones at most at ``new_names_rate`` (each new name is broadcast to everyone).
        """
        now = time.monotonic()
        seen = self._polled.get(user)
        if seen is not None:
            self._polled[user] = (now, seen[1])
            return ""
        self._expire_polled(now)
        if self._polled_per_address[address] >= self.limits.polled_per_address:
            return (f"too many nicknames polling from this address "
                    f"(at most {self.limits.polled_per_address})")
        if not self._new_names.allow(address):
            return "too many new nicknames from this address: slow down"
        self._polled[user] = (now, address)
        self._polled_per_address[address] += 1
        self.presence_changed()
        return ""

    def _expire_polled(self, now: float) -> None:
        expired = now - self.limits.presence_ttl
        for user in [u for u, (seen, _) in self._polled.items() if seen < expired]:
            address = self._polled.pop(user)[1]
            self._polled_per_address[address] -= 1
            if self._polled_per_address[address] <= 0:
                del self._polled_per_address[address]

    def here(self) -> set[str]:
        """Users connected to this process: push clients with a nickname, recent pollers."""
        self._expire_polled(time.monotonic())
        return set(self._connected) | set(self._polled)

    def presence(self) -> list[str]:
        """Everyone here (sorted), in this process and (with a shared log) elsewhere."""
        return sorted(self.here() | self.elsewhere)

    def presence_event(self, users: list[str] | None = None) -> dict:
        """What a presence event says: the first ``presence_names`` names and the count."""
        users = self.presence() if users is None else users
        return {"users": users[:self.limits.presence_names], "count": len(users)}

    def presence_changed(self) -> None:
        """Tell everyone who is here, if that changed: now, or with the next broadcast.

        Broadcasts are at least ``presence_interval`` apart; changes in between are told
        together when it has passed.
        """
        if self._presence_due is not None:
            return  # a broadcast is already scheduled: it will say what is true then
        loop = asyncio.get_running_loop()
        wait = self._presence_sent_at + self.limits.presence_interval - loop.time()
        if wait > 0:
            self._presence_due = loop.call_later(wait, self._broadcast_presence)
        else:
            self._broadcast_presence()

    def _broadcast_presence(self) -> None:
        self._presence_due = None
        users = self.presence()
        if users != self._presence_sent:
            self._presence_sent = users
            self._presence_data = self.presence_event(users)
            self._presence_sent_at = asyncio.get_running_loop().time()
            self._broadcast("presence", self._presence_data)

    # -- shutdown ------------------------------------------------------------------------

    def close(self, code: int = GOING_AWAY) -> None:
        """The server is stopping: end long polls and SSE streams, close WebSockets (``code``)."""
        self.closing.set()
        if self._follower is not None:
            self._follower.cancel()
        if self._presence_due is not None:
            self._presence_due.cancel()
        self._fanning.clear()
        self._fanned = 0
        for outboxes in self._outboxes.values():
            for outbox in outboxes:
                outbox.close(code)
