"""Fan-out: one published message reaches every connected client, whatever its transport.

The hub keeps the log, who is connected, and the fan-out between them. It knows no
transport: a push client (WebSocket, SSE) is a :class:`Subscriber`, which takes
:class:`Batch` es of payloads and can be closed. Subscribers are grouped by their
:attr:`~Subscriber.encoding` (chatlib.wire), so that each message is encoded once per
encoding, not once per client; :class:`chatlib.outbox.Outbox` is the one the transports use.

Pull transports (polling, long polling) need no subscriber: they read the log after their
cursor; long polls sleep on an :class:`asyncio.Event` that every publish sets.

A message reaches the subscribers one way only: appended to the log, then read back in id
order by :meth:`Hub.catch_up` (or handed over, in id order, by :meth:`Hub.deliver` when
something else reads the log), then :meth:`Hub._publish`.

Who is here is chatlib.presence's (:attr:`Hub.presence`): the hub tells it who subscribes
and unsubscribes, and fans out the ``presence`` events it makes.

A hub is one room's (:attr:`Hub.room`, its log's): chatlib.rooms makes one per room in
use. Every event it fans out for a room other than the default one carries ``"room"``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import NamedTuple, Protocol

from .admission import Admission
from .closecode import CloseCode
from .limits import (
    FANOUT_GROUP,
    FANOUT_SLICE,
    LIVE_FIRST_STEPS,
    REPLAY_SLICE,
    Limits,
    RateLimits,
)
from .presence import Presence
from .store import DEFAULT_ROOM, Bus, Message, MessageLog


class Batch:
    """What one fan-out delivers: ``(message_id, payload)`` items, in order (``message_id``
    0 for an event that is not a message).

    Every subscriber of a fan-out gets the very same object (and ``payloads`` tuple), so a
    transport may encode it once for all of them, keyed by identity (chatlib.fastpath).
    """

    __slots__ = ("items", "payloads", "first_id")

    def __init__(self, items: tuple[tuple[int, str], ...]) -> None:
        self.items = items
        self.payloads = tuple(payload for _, payload in items)
        self.first_id = items[0][0] if len(items) == 1 else next(
            (message_id for message_id, _ in items if message_id), 0)
        """The first message's id (ids only grow within a batch); 0 if none is a message."""


class Resume(NamedTuple):
    """Where a client starts (:meth:`Hub.resolve_cursor`) and what it is told first.

    The resume protocol, decided here once for every transport (README, "Resuming";
    chatlib.wire), by :meth:`of`:

    * No cursor (0): a **fresh join** gets the newest page (at most ``limits.history``
      messages), and ``before`` when older ones exist.
    * A cursor within retention: everything after it (paced in pages: Hub.history).
    * A cursor older than the oldest message kept: a **gap** (``gap`` = the first id
      still kept), then everything from there.
    * A cursor past the end (a new or emptied log): a **reset**, then a fresh join.
    """

    start: int
    """The cursor: the client gets the messages after it."""
    reset: bool = False
    """Its cursor was past the log's end: it must start over (event ``reset``)."""
    gap: int = 0
    """Its cursor was older than retention: this is the first id still kept (``gap``)."""
    before: int = 0
    """Older messages exist below this id: ask ``GET /api/messages?before=ID``."""

    @classmethod
    def of(cls, after: int, first_id: int, last_id: int, history: int) -> Resume:
        """Where a client that says ``after`` starts, in a log that holds ``first_id`` to
        ``last_id``, given pages of ``history`` messages."""
        reset = after > last_id
        if after > 0 and not reset:
            if after >= first_id - 1:
                return cls(after)
            return cls(first_id - 1, gap=first_id)
        start = max(last_id - history, first_id - 1, 0)
        return cls(start, reset=reset, before=start + 1 if start >= first_id else 0)

    def events(self, room: str = DEFAULT_ROOM) -> list[tuple[str, dict]]:
        """The events (name, data) that come before the history, in order; their data
        carries ``"room"`` for a ``room`` other than the default one."""
        tag = {} if room == DEFAULT_ROOM else {"room": room}
        events = [("reset", {**tag})] if self.reset else []
        if self.gap:
            events.append(("gap", {"first_id": self.gap, **tag}))
        if self.before:
            events.append(("history", {"before": self.before, **tag}))
        return events


class Answer(NamedTuple):
    """What a poll is answered (:meth:`Hub.poll`)."""

    resume: Resume
    messages: list[Message]
    last_id: int
    """The newest id in the log, as far as this process knows."""


class Wake:
    """What one publish tells the long polls parked until it (:meth:`Hub.poll`)."""

    __slots__ = ("event", "messages")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.messages: list[Message] = []
        """The messages that publish fanned out, in id order ([]: the log went back)."""


class Encoding(Protocol):
    """How a group of subscribers writes events (chatlib.wire.WEBSOCKET, chatlib.wire.SSE)."""

    def message(self, message: Message) -> str: ...
    def event(self, event: str, data: dict) -> str: ...


class Subscriber(Protocol):
    """A push client, as the hub sees it."""

    user: str
    """Its nickname, "" for a reader that is not in the chat (no presence)."""
    encoding: Encoding
    """How its payloads are written (chatlib.wire); the hub encodes once per encoding."""

    def deliver(self, batch: Batch) -> bool:
        """Take ``batch`` without waiting; False if it cannot keep up (the hub closes it)."""

    def close(self, code: int) -> None:
        """Stop: the transport ends the connection with ``code`` (a WebSocket close code)."""


def deliver_all(subscribers: Iterable[Subscriber], batch: Batch) -> None:
    """``batch`` to each subscriber; one that refuses (too slow) is closed with 1013 rather
    than hold the others back."""
    for subscriber in subscribers:
        if not subscriber.deliver(batch):
            subscriber.close(CloseCode.TRY_AGAIN_LATER)


class Hub:
    """The log, who is connected, and the fan-out between them."""

    def __init__(self, log: MessageLog, limits: Limits, bus: Bus | None = None, *,
                 admission: Admission | None = None,
                 replays: RateLimits | None = None) -> None:
        self.log = log
        self.limits = limits
        self.bus = bus
        """Presence and typing between the processes sharing ``log`` (chatlib.redis_bus)."""
        self.room: str = getattr(log, "name", DEFAULT_ROOM)
        """The room this hub is (its log's)."""
        self.tag: dict = {} if self.room == DEFAULT_ROOM else {"room": self.room}
        self.dm = self.room[:1] == "@"
        """Whether this is a room of direct messages (``@A+B``)."""
        """What every event of this room carries besides its own fields: ``{"room"}``, or
        nothing in the default room (its events are what they were before rooms)."""
        self.admission = admission if admission is not None else Admission(limits)
        """New sessions: every transport asks :meth:`Admission.admit` first (one for every
        room's hub: chatlib.rooms)."""
        self._subscribers: dict[Encoding, set[Subscriber]] = {}  # grouped by encoding
        self._wake = Wake()  # the next publish wakes the long polls parked on it
        self.presence = Presence(limits, self._broadcast)
        """Who is here; its ``presence`` events go out through this hub's fan-out."""
        self.replays = replays if replays is not None else RateLimits(
            limits.replay_rate, limits.replay_burst)
        """Each client address's budget of history pages (:meth:`history`; one for every
        room's hub: chatlib.rooms)."""
        self._published = 0  # every message up to this id has been fanned out
        self._fanning: deque[tuple[list[Subscriber], Batch]] = deque()  # see _fan_out
        self._fanned = 0  # subscribers of _fanning[0] done (of each fan-out of the group)
        self._live = 0  # fan-outs in _fanning that carry a message (see _live_first)
        self._group: Batch | None = None  # the items of _fanning's first fan-outs, together
        self._group_size = 0  # how many fan-outs _group holds
        self._roster = 0  # changes of _subscribers (subscribe, unsubscribe)
        self._snapshot: tuple[set[Subscriber] | None, int, list[Subscriber]] = (None, -1, [])
        self._publishing = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []  # following the log and the bus
        self.closing = asyncio.Event()
        self.parked = 0
        """Long polls waiting in :meth:`poll` now."""
        self.rooms = None
        """The chatlib.rooms.Rooms registry this hub is in, if any."""

    @property
    def published(self) -> int:
        """Every message up to this id has been fanned out."""
        return self._published

    async def start(self) -> None:
        """Begin after what the log already holds; follow other writers if it has any, and
        run the bus."""
        self._published = await self.log.last_id()
        if self.log.shared:
            self._tasks.append(asyncio.ensure_future(self._follow()))
        if self.bus is not None:
            self._tasks.append(asyncio.ensure_future(
                self.bus.run(self.presence.here, self._typing_elsewhere,
                             self.presence.set_elsewhere)))

    # -- messages ------------------------------------------------------------------------

    async def post(self, user: str, text: str,
                   client_id: str | None = None) -> tuple[Message, bool]:
        """Append to the log and fan out: ``(message, duplicate)``.

        A repeat of ``(user, client_id)`` is not stored nor fanned out again: it returns
        ``(original, True)`` (see :meth:`MessageLog.append`).
        """
        message, duplicate = await self.log.append(user, text, client_id)
        if self.dm and not duplicate and self.rooms is not None:
            self.rooms.posted(message)  # the other user hears of it (chatlib.rooms)
        if not duplicate and not self.log.pushes:
            # An id at or below what was published: another post's catch-up may have
            # published it already, unless the whole log is now below that (replaced).
            if message.id <= self._published and await self.log.last_id() < self._published:
                await self.log_went_back()
            await self.catch_up()
        # A log that pushes (RedisLog.follow) delivers this one too, in order, in pages:
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
                self._publish(page)

    async def deliver(self, messages: list[Message]) -> None:
        """Fan out ``messages`` (consecutive, in id order) that a follower read from the
        log, skipping those already published."""
        async with self._publishing:
            self._publish(messages)

    async def _follow(self) -> None:
        """Fan out what other processes append to a shared log, until cancelled. An empty
        page is the log saying that it went back: :meth:`log_went_back`."""
        async for page in self.log.follow(self._published):
            if page:
                await self.deliver(page)
            else:
                await self.log_went_back()

    async def log_went_back(self) -> None:
        """The log's ids started again below what was published: it was emptied or
        replaced (Redis FLUSHALL, a new Redis on the same URL, another SQLite file).

        Every push client is closed with 1012 (restarting): it reconnects with its cursor,
        which is now past the log's end, and is told to reset (:meth:`resolve_cursor`), as
        every poll is. Publishing starts again from the new log's first id.
        """
        async with self._publishing:
            self._published = 0
            for subscriber in self.subscribers:
                subscriber.close(CloseCode.SERVICE_RESTART)
            self._wake_polls([])  # parked long polls answer; their next poll resets

    def _publish(self, messages: list[Message]) -> None:
        """The one way a message reaches the subscribers: each of ``messages`` (read from
        the log, in id order) not published yet, encoded once per encoding, then every long
        poll wakes. Called with ``_publishing`` held, so ids go out in order."""
        published = []
        for message in messages:
            if message.id <= self._published:
                continue
            for encoding, subscribers in self._subscribers.items():
                if subscribers:
                    self._fan_out(subscribers, Batch(((message.id, encoding.message(message)),)))
            self._published = message.id
            published.append(message)
        if published:
            self._wake_polls(published)

    def _wake_polls(self, published: list[Message]) -> None:
        """Wake every long poll with what was ``published``; the next ones park anew."""
        wake, self._wake = self._wake, Wake()
        wake.messages = published
        wake.event.set()

    async def history(self, cursor: int, address: str | None = None
                      ) -> AsyncIterator[list[Message]]:
        """Pages (at most ``limits.history`` messages each) after ``cursor``, until caught up.

        Paced: the event loop runs everything else between two pages (a log in memory
        answers without yielding), so a client replaying a long history never makes live
        delivery to the others wait behind more than one page. With the client's
        ``address`` (a replay to a client, not the hub's own catch-up), pages come in
        slices of at most :data:`~chatlib.limits.REPLAY_SLICE` messages, and before each
        slice the replay lets the fan-outs of messages going out end first
        (:meth:`_live_first`): a live message waits behind one slice, not a page, nor a
        storm of pages; and every page after the first also takes a token of that
        address's replay budget (``limits.replay_rate``), waiting for one when it is spent.
        """
        size = self.limits.history
        first = True  # the replay's first slice (see _live_first)
        for _ in range(1 << 62):  # ends at the log's end; every page moves the cursor on
            page = await self.log.after(cursor, size)
            if not page:
                return
            if address is None:
                yield page
            else:
                for start in range(0, len(page), REPLAY_SLICE):
                    await self._live_first(first)
                    first = False
                    yield page[start:start + REPLAY_SLICE]
            cursor = page[-1].id
            if len(page) < size:
                return
            if address is None:
                await asyncio.sleep(0)  # (a replay's next slice waits in _live_first)
            if address is not None:
                for _ in range(1 << 30):  # until the address has a token, or the hub closes
                    if self.replays.allow(address):
                        break
                    if self.closing.is_set():
                        return
                    await asyncio.sleep(min(1 / max(self.limits.replay_rate, 1e-3), 0.25))

    async def _live_first(self, first: bool = False) -> None:
        """Let the event loop run one step, then more until no fan-out of a message is
        going out in slices, :data:`~chatlib.limits.LIVE_FIRST_STEPS` steps at most.

        Only messages go first: a replay does not wait for events (presence, typing, a
        client's ack), which go to other clients. A replay's ``first`` slice with no
        message going out does not wait at all: a client that joins is sent its history
        in the step that started its writer."""
        if first and not self._live:
            return
        for _ in range(LIVE_FIRST_STEPS):  # bounded: a replay moves on even in a busy room
            await asyncio.sleep(0)
            if not self._live:
                return

    async def resolve_cursor(self, after: int) -> Resume:
        """Where a client that says ``after`` starts (:meth:`Resume.of`; one read of the
        log's bounds)."""
        page = await self.log.page(after, 0)
        return Resume.of(after, page.first_id, page.last_id, self.limits.history)

    async def poll(self, after: int, timeout: float = 0) -> Answer:
        """A poll's answer: where a client that says ``after`` starts (:meth:`Resume.of`),
        the messages from there (at most ``limits.history``), waiting up to ``timeout``
        seconds for the first (a long poll), and the log's last id.

        One read of the log per answer: the first page and the log's bounds come together
        (:meth:`MessageLog.page`), and a long poll woken by a publish takes the messages
        that publish fanned out instead of reading them back. A second read only when the
        start is not the client's cursor (a fresh join with older messages, a reset), or
        when the wake-up carried nothing that follows the cursor (the log went back).
        """
        # Take the wake-up *before* reading the log: a message published while we read
        # sets this very one, so it cannot slip between the read and the wait.
        wake = self._wake
        history = self.limits.history
        page = await self.log.page(after, history)
        resume = Resume.of(after, page.first_id, page.last_id, history)
        if resume.reset or resume.before:  # the newest page, not the one after `after`
            page = await self.log.page(resume.start, history)
        if page.messages or timeout <= 0 or self.closing.is_set():
            return Answer(resume, page.messages, page.last_id)
        self.parked += 1
        try:  # in this task: no task per wait (close() sets the wake-up too)
            async with asyncio.timeout(timeout):
                await wake.event.wait()
        except TimeoutError:
            pass
        finally:
            self.parked -= 1
        if not wake.event.is_set() or self.closing.is_set():  # timed out, or closing
            return Answer(resume, [], page.last_id)
        published = wake.messages
        if published and published[0].id == resume.start + 1:
            return Answer(resume, published[:history], max(published[-1].id, page.last_id))
        page = await self.log.page(resume.start, history)
        return Answer(resume, page.messages, page.last_id)

    # -- events that are not messages ----------------------------------------------------

    def _broadcast(self, event: str, data: dict) -> None:
        if self.tag:
            data = {**data, **self.tag}
        for encoding, subscribers in self._subscribers.items():
            if subscribers:
                self._fan_out(subscribers, Batch(((0, encoding.event(event, data)),)))

    def _fan_out(self, subscribers: set[Subscriber] | tuple[Subscriber],
                 batch: Batch) -> None:
        """``deliver_all(subscribers, batch)``, at most :data:`~chatlib.limits.FANOUT_SLICE`
        deliveries per event-loop step.

        A fan-out is a loop over every client, and nothing else runs on the event loop
        meanwhile (in a Jupyter kernel, a cell waiting behind it waits as long): bigger
        fan-outs go in slices, one per loop step.

        Fan-outs form one queue, served in order: every client gets message 1 before any
        client gets message 2, as when each ran at once. A big one takes a snapshot of the
        subscribers: a client that subscribes meanwhile reads the message from the log, one
        that leaves is closed (its ``deliver`` ignores it). Small ones with nothing queued
        run at once.
        """
        if not self._fanning and len(subscribers) <= FANOUT_SLICE:
            deliver_all(subscribers, batch)
            return
        # Fan-outs to the same clients share one snapshot, so that a burst's can go out
        # together (see _fan_out_step).
        snapshot_of, roster, snapshot = self._snapshot
        if snapshot_of is not subscribers or roster != self._roster:
            snapshot = list(subscribers)
            self._snapshot = (subscribers, self._roster, snapshot)
        self._fanning.append((snapshot, batch))
        if batch.first_id:
            self._live += 1
        if len(self._fanning) == 1:  # else a step is already scheduled
            self._fan_out_step()

    def _fan_out_step(self) -> None:
        """One slice: :data:`FANOUT_SLICE` deliveries, then the next step is scheduled.

        The first fan-outs of the queue that go to the same snapshot (a burst, published
        while an earlier one was still going out) make a group, up to :data:`FANOUT_GROUP`,
        delivered as one batch: each client of the slice gets the whole group in one write.
        On loopback the server's ``send()`` also runs the receiver's TCP input and its ACK,
        so a delivery costs per *segment*: one frame to each client in turn would be one
        segment, and about one ACK, per delivery (bench/README.md, "The burst at N=1000").
        Every client still gets the messages in order, and a fan-out queued later (an ack,
        a client that joined) still waits for the group to end.
        """
        budget = FANOUT_SLICE
        while self._fanning and budget > 0:  # bounded: every turn spends budget or pops
            subscribers = self._fanning[0][0]
            start = self._fanned
            if not start:  # a new group: the leading fan-outs to the same snapshot
                batches = []
                for snapshot, batch in self._fanning:
                    if snapshot is not subscribers or len(batches) == FANOUT_GROUP:
                        break
                    batches.append(batch)
                self._group_size = len(batches)
                self._group = batches[0] if len(batches) == 1 else Batch(
                    tuple(item for batch in batches for item in batch.items))
            size = self._group_size
            chunk = subscribers[start:start + max(1, budget // size)]
            deliver_all(chunk, self._group)
            budget -= len(chunk) * size
            if start + len(chunk) >= len(subscribers):
                for _ in range(size):
                    if self._fanning.popleft()[1].first_id:
                        self._live -= 1
                self._fanned = 0
            else:
                self._fanned = start + len(chunk)
        if self._fanning:
            asyncio.get_running_loop().call_soon(self._fan_out_step)

    def tell(self, subscriber: Subscriber, payload: str) -> None:
        """An event for one client only (its ack, an error): queued behind any fan-out
        still going out in slices, so that an ack never overtakes its own message."""
        self._fan_out((subscriber,), Batch(((0, payload),)))

    def typing(self, user: str) -> None:
        """``user`` is typing here: tell everyone (the other processes through the bus)."""
        self._broadcast("typing", {"user": user})
        if self.bus is not None:
            self.bus.typing(user)

    def _typing_elsewhere(self, user: str) -> None:
        self._broadcast("typing", {"user": user})

    # -- subscribers ---------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> Subscriber:
        """Fan out to ``subscriber`` from now on (and count its user as here)."""
        self._subscribers.setdefault(subscriber.encoding, set()).add(subscriber)
        self._roster += 1
        user = subscriber.user
        if user:
            if self.presence.told(user):  # a second tab: the list won't change; tell it
                payload = subscriber.encoding.event("presence",
                                                    {**self.presence.data, **self.tag})
                self._fan_out((subscriber,), Batch(((0, payload),)))
            self.presence.connected(user)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscribers = self._subscribers.get(subscriber.encoding, ())
        if subscriber in subscribers:
            subscribers.discard(subscriber)
            self._roster += 1
            if subscriber.user:
                self.presence.disconnected(subscriber.user)

    @property
    def subscribed(self) -> bool:
        """Whether any push client is subscribed now."""
        return any(self._subscribers.values())

    @property
    def subscribers(self) -> list[Subscriber]:
        """Every push client subscribed now."""
        return [s for group in self._subscribers.values() for s in group]

    @property
    def fanning_out(self) -> bool:
        """Whether a fan-out is still going out in slices."""
        return bool(self._fanning)

    # -- shutdown ------------------------------------------------------------------------

    def close(self, code: int = CloseCode.GOING_AWAY) -> None:
        """The server is stopping: end long polls and SSE streams, close WebSockets (``code``)."""
        self.closing.set()
        self._wake.event.set()  # parked long polls answer (Hub.poll)
        for task in self._tasks:
            task.cancel()
        self.presence.close()
        self._fanning.clear()
        self._fanned = self._live = 0
        for subscriber in self.subscribers:
            subscriber.close(code)
