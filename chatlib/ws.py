"""The WebSocket transport: ``/ws``. A client says hello (its nickname and cursor), gets
the history after its cursor, then live events; it sends messages and typing notices as
JSON text frames (chatlib.wire)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from . import wire
from .auth import GRANT, Grant
from .closecode import BUSY, STORE, CloseCode, close_reason
from .fastpath import (
    reset_connection,
    server_send,
    transport_of,
    unsent_bytes,
    websocket_sink,
    websocket_writer,
)
from .hub import Hub, Resume
from .limits import Limits, RateLimit, SendBudget
from .outbox import Outbox
from .rooms import Rooms
from .store import DEFAULT_ROOM, StoreUnavailable
from .stuck import StuckWatch
from .validation import ChatError, client_id, cursor, message_text, room_name
from .web import address, refuse

log = logging.getLogger("chatlib")

STORE_DOWN = close_reason(STORE)
"""The reason of a 1011 close when the log cannot be read (Redis down, OOM, hung): not
1013, which says that this client fell behind (chatlib.closecode)."""


class WebSocketChat:
    """``/ws``, as a raw ASGI endpoint: hello, history, then live events and the client's
    frames, until it hangs up.

    Raw for the idle connections' sake (as ``GET /api/messages`` is, chatlib.polling):
    Starlette's ``websocket_session`` would hold two more coroutines, an exception
    wrapper with its closures and a ``WebSocket`` for the life of every connection, and
    none of them is used. Everything before the route (Host, Origin, token:
    chatlib.guard, chatlib.auth) runs as before; what Starlette's ``WebSocket`` did here
    is spelled out: ``accept`` reads ``websocket.connect`` first, frames and closes go
    to the server's own send (chatlib.fastpath.server_send), a client gone makes it raise
    OSError (uvicorn's ``ClientDisconnected``) or RuntimeError (after a close).
    """

    async def __call__(self, scope, receive, send) -> None:
        state = scope["app"].state
        hub: Hub = state.hub
        limits = hub.limits
        send = server_send(scope, send)
        if hub.closing.is_set():
            await refuse("websocket", send, 503, "server is stopping")
            return
        if (await receive())["type"] != "websocket.connect":
            return  # gone before the handshake was answered
        await send({"type": "websocket.accept"})
        headers = scope.get("headers")
        if type(headers) is list:  # uvicorn's: read by the middleware, by nobody from now on
            headers.clear()  # (~0.8 KB per connection, for its life)
        wait = hub.admission.admit()  # after the handshake: a browser reads only a close code
        if wait is not None:
            with contextlib.suppress(RuntimeError, OSError):
                await close(send, CloseCode.TRY_AGAIN_LATER, close_reason(BUSY, wait))
            return
        rooms: Rooms = state.rooms
        grant = grant_of(scope)
        try:
            user, after, room = await receive_hello(receive, limits)
            rooms.check(room, user, grant)
        except ChatError as exc:
            await refuse_hello(send, exc)
            return
        except TimeoutError:  # say why before hanging up (a bare TCP close tells nothing) ...
            transport = transport_of(scope)
            if transport is not None and unsent_bytes(transport):
                reset_connection(transport)  # ... unless it reads nothing (pongs waiting): abort
                return
            with contextlib.suppress(RuntimeError, OSError):
                await close(send, CloseCode.POLICY_VIOLATION,
                            f"no hello within {limits.hello_timeout:g} s")
            return
        except Disconnected:
            return
        connection = Connection(scope, send, user, limits, state.stuck)
        member = Member(rooms, user, grant, connection.send_text, connection.outbox,
                        connection.writer, connection.stuck)
        try:
            try:
                await member.join(room, after, announce=False)
            except StoreUnavailable:
                with contextlib.suppress(RuntimeError, OSError):
                    await close(send, CloseCode.INTERNAL_ERROR, STORE_DOWN)
                return
            except ChatError as exc:  # no room at all for it (rooms_per_client)
                await refuse_hello(send, exc)
                return
            budget: SendBudget = state.budget
            rate = budget.connection()
            client = address(scope)
            while True:
                event = await receive()
                if event["type"] == "websocket.disconnect":
                    break
                await handle_frame(member, client, rate, budget, event.get("text"))
        finally:
            member.leave_all()


websocket = WebSocketChat()
"""The ``/ws`` endpoint (chatlib.app's route table)."""


class Connection:
    """What a :class:`Member` on ``/ws`` is given of its connection, as bound methods of
    one small object (three closures with their cells cost ~0.6 KB more per connection):
    ``send_text`` writes a frame at once, ``outbox`` makes its outbox in one more room,
    ``writer`` its :class:`Writer` there (watched for a client that stops reading)."""

    __slots__ = ("scope", "send", "user", "limits", "stuck")

    def __init__(self, scope, send, user: str, limits: Limits, stuck: StuckWatch) -> None:
        self.scope, self.send, self.user, self.limits, self.stuck = (
            scope, send, user, limits, stuck)

    def send_text(self, payload: str) -> Awaitable[None]:
        return send_text(self.send, payload)

    def outbox(self) -> Outbox:
        return Outbox(wire.WEBSOCKET, self.user, self.limits.max_queue)

    def writer(self, hub: Hub, outbox: Outbox, resume: Resume) -> Writer:
        self.stuck.watch(self.scope, outbox)
        return Writer(self.scope, self.send, hub, outbox, resume)


class Disconnected(Exception):
    """The client hung up (``websocket.disconnect``) before its hello."""


async def send_text(send, payload: str) -> None:
    """One text frame through the ASGI ``send``."""
    await send({"type": "websocket.send", "text": payload})


async def close(send, code: int, reason: str = "") -> None:
    """The close frame (``code``, ``reason``) through the ASGI ``send``."""
    await send({"type": "websocket.close", "code": code, "reason": reason})


async def refuse_hello(send, exc: ChatError) -> None:
    """An error frame for ``exc``, then a close with 1008 (unless the client is gone)."""
    with contextlib.suppress(RuntimeError, OSError):
        await send_text(send, wire.ws_event("error", {"error": exc.error}))
        await close(send, CloseCode.POLICY_VIOLATION, exc.error[:120])


def grant_of(scope) -> Grant | None:
    """The user token's grant the request carries (chatlib.auth.TokenGate), if any."""
    return scope.get(GRANT)


class Member:
    """One push connection's rooms (WebSocket, WebTransport): for each room it is in, the
    room's hub, the connection's outbox there (its presence, its queue) and what writes
    it (a task, or a :class:`Writer`: ``writer`` makes it, ``cancel()`` stops it). Frames
    about a room go through that room's outbox, in order with its messages; ``send``
    writes a frame at once (``joined``, ``left``, and what a connection in no room is
    told)."""

    __slots__ = ("registry", "user", "grant", "limits", "send", "outbox", "writer", "stuck",
                 "rooms", "closed")

    def __init__(self, rooms: Rooms, user: str, grant: Grant | None,
                 send: Callable[[str], Awaitable[None]], outbox: Callable[[], Outbox],
                 writer: Callable[[Hub, Outbox, Resume], Cancellable],
                 stuck: StuckWatch | None = None) -> None:
        self.registry, self.user, self.grant = rooms, user, grant
        self.limits = rooms.limits
        self.send, self.outbox, self.writer, self.stuck = send, outbox, writer, stuck
        self.rooms: dict[str, tuple[Hub, Outbox, Cancellable]] = {}
        """The rooms it is in: hub, outbox, writer."""
        self.closed = False
        rooms.connected(user, self, self.notice)

    async def join(self, room: str, after: int, announce: bool = True) -> None:
        """Join ``room`` after its cursor ``after`` (the history and live events of it
        follow), first telling ``joined`` (``announce``). ChatError: 403 (may not), 409
        (in it already), 429 (too many rooms); StoreUnavailable: the log is down."""
        if room in self.rooms:
            raise ChatError(409, f"already in room {room}")
        if len(self.rooms) >= self.limits.rooms_per_client:
            raise ChatError(429, "too many rooms for one connection"
                                 f" (at most {self.limits.rooms_per_client})")
        self.registry.check(room, self.user, self.grant)
        async with self.registry.using(room) as hub:
            resume = await hub.resolve_cursor(after)
            if self.closed:
                return
            if announce:
                try:
                    await self.send(wire.ws_event("joined", {"room": room}))
                except (RuntimeError, OSError):
                    return  # gone: the reader sees the disconnect and cleans up
            outbox = hub.subscribe(self.outbox())
            self.rooms[room] = (hub, outbox, self.writer(hub, outbox, resume))

    def leave(self, room: str) -> bool:
        """Leave ``room``: nothing of it is written from now on; False if not in it."""
        entry = self.rooms.pop(room, None)
        if entry is None:
            return False
        hub, outbox, writer = entry
        writer.cancel()  # before the outbox closes: a left room closes no connection
        if self.stuck is not None:
            self.stuck.forget(outbox)
        outbox.on_close = None
        hub.unsubscribe(outbox)
        outbox.close(CloseCode.NORMAL)  # a fan-out going out in slices skips it
        self.registry.release(hub)
        return True

    def leave_all(self) -> None:
        """The connection ended."""
        self.closed = True
        self.registry.disconnected(self.user, self)
        for room in list(self.rooms):
            self.leave(room)

    def room(self, room: str) -> tuple[Hub, Outbox]:
        """The hub and outbox of ``room``; ChatError 409 if the connection is not in it."""
        entry = self.rooms.get(room)
        if entry is None:
            raise ChatError(409, f"not in room {room}: join it first")
        return entry[0], entry[1]

    def tell(self, payload: str, room: str | None = None) -> None:
        """One frame for this connection: through ``room``'s outbox if it is in it (after
        what is queued there), else any room's, else at once."""
        entry = self.rooms.get(room) if room is not None else None
        if entry is None and self.rooms:
            entry = next(iter(self.rooms.values()))
        if entry is not None:
            entry[0].tell(entry[1], payload)
        elif not self.closed:
            keep(asyncio.ensure_future(self.send(payload)))

    def error(self, exc: ChatError, room: str | None, client_id: str | None = None,
              named: bool = False) -> None:
        """The error frame for ``exc``, about ``room`` if it names one: then with the
        ``room`` and the HTTP ``status``, as for a join or leave (``named``: the frame named
        the room, the default one included). The default room's other errors are what they
        were before rooms."""
        data = error_data(exc, client_id)
        if room is not None and (named or room != DEFAULT_ROOM):
            data["room"] = room
            data["status"] = exc.status
        self.tell(wire.ws_event("error", data), room)

    def notice(self, event: str, data: dict) -> None:
        """An event of no room's (a ``dm``: chatlib.rooms.Rooms.posted); none about a room
        the connection is in (it reads the message there)."""
        if data.get("room") in self.rooms or not self.rooms:
            return  # (in no room at all: it finds the DM in GET /api/rooms)
        hub, outbox, _ = next(iter(self.rooms.values()))
        hub.tell(outbox, wire.ws_event(event, data))


def error_data(exc: ChatError, client_id: str | None = None) -> dict:
    """An error frame's fields: ``error``; for a refused message its ``client_id`` and
    ``status``; for a refusal that passes (429) ``retry_after``, whole seconds."""
    data = {"error": exc.error}
    if client_id is not None:
        data.update(client_id=client_id, status=exc.status)
    if exc.retry_after is not None:
        data["retry_after"] = exc.retry_after
    return data


async def receive_hello(receive, limits: Limits) -> tuple[str, int, str]:
    """The hello's nickname, cursor and room. ChatError: not a valid hello; TimeoutError:
    none within ``limits.hello_timeout``; Disconnected: the client hung up."""
    event = await asyncio.wait_for(receive(), limits.hello_timeout)
    if event["type"] == "websocket.disconnect":
        raise Disconnected
    return wire.read_hello(event.get("text"), limits)


async def handle_frame(member: Member, client: str, rate: RateLimit, budget: SendBudget,
                       frame: str | None) -> None:
    """One frame after the hello, from ``member``'s connection at address ``client``:
    handled, or answered with an error frame (the connection stays)."""
    limits = member.limits
    room = kind = None
    named = False  # the frame named its room (join, leave)
    try:
        kind, data = wire.read_client_frame(frame, limits)
        if kind == "join" or kind == "leave":
            if data.get("room") is None:
                raise ChatError(400, f"{kind} needs a room")
            room = room_name(data.get("room"), limits)
            named = True
            if kind == "leave":
                if not member.leave(room):
                    raise ChatError(409, f"not in room {room}")
                member.tell(wire.ws_event("left", {"room": room}))
                return
            after = cursor(data.get("after", 0))
            if not budget.allow(client, rate):
                raise ChatError(429, "too many requests: slow down",
                                budget.retry_after(client, rate))
            try:
                await member.join(room, after)
            except StoreUnavailable as exc:
                raise ChatError(503, str(exc)) from None
            return
        room = room_name(data.get("room"), limits)
        named = True  # not in it (the one error left here): say which room, even the default
        hub, outbox = member.room(room)
    except ChatError as exc:
        cid = None
        if kind == "message":  # name the refused message, so its sender stops waiting
            with contextlib.suppress(ChatError):
                cid = client_id(data.get("client_id"))
        member.error(exc, room, cid, named=named)
        return
    user = member.user
    if kind == "typing":
        if not budget.allow(client, rate):
            member.error(ChatError(429, "too many messages: slow down",
                                         budget.retry_after(client, rate)), room)
            return
        hub.typing(user)
        return
    if kind == "older":  # the resume protocol's older page, as GET ?before=ID answers it
        try:
            before = cursor(data.get("before"), "before")
            if not budget.allow(client, rate):
                raise ChatError(429, "too many requests: slow down",
                                budget.retry_after(client, rate))
            try:
                page = await hub.log.before(before, limits.history)
                body = wire.older_body(page, await hub.log.first_id(), room)
            except StoreUnavailable as exc:
                raise ChatError(503, str(exc)) from None
        except ChatError as exc:
            member.error(exc, room)
            return
        hub.tell(outbox, wire.ws_event("older", body))
        return
    cid = None
    try:
        cid = client_id(data.get("client_id"))
        text = message_text(data, limits)  # checked before a rate token is spent,
        if not budget.allow(client, rate):  # as HTTP posting does
            raise ChatError(429, "too many messages: slow down", budget.retry_after(client, rate))
        try:
            message, _ = await hub.post(user, text, cid)
        except StoreUnavailable as exc:  # not stored: refused as clearly as HTTP's 503
            raise ChatError(503, str(exc)) from None
    except ChatError as exc:
        # Refused: the error names the message, so that its sender stops waiting for an ack,
        # and gives the HTTP status, so that it knows whether to send it again (5xx) or not.
        member.error(exc, room, cid)
        return
    if cid is not None:  # to the sender only: stored (for a repeat, the original)
        hub.tell(outbox, wire.ws_event("ack", message.to_dict()))


class Cancellable(Protocol):
    """What writes a room's outbox for a :class:`Member`: a task, or a :class:`Writer`."""

    def cancel(self) -> object: ...


class Writer:
    """One room's writer on one WebSocket: a :func:`write_frames` task while there is
    something to write, and no task at all while the connection is idle.

    The first task writes the resume events and the history, then what was queued
    meanwhile, and ends once the queue is empty (:meth:`Outbox.stream` with ``wake``).
    From then on the hub writes live frames itself through ``outbox.sink``
    (chatlib.fastpath.websocket_sink) while the connection can take them; when the outbox
    queues something instead (flow control, a frame behind a queued one) or closes, it
    calls :meth:`wake` (its ``on_backlog``), which starts a task for that backlog
    (:meth:`Outbox.backlog`), ending again once it is written. At most one task runs at a
    time. :meth:`cancel` (the room is left) stops it for good: nothing more is written.
    """

    __slots__ = ("scope", "send", "hub", "outbox", "task")

    def __init__(self, scope, send, hub: Hub, outbox: Outbox, resume: Resume) -> None:
        self.scope, self.send, self.hub, self.outbox = scope, send, hub, outbox
        self.task: asyncio.Task | None = None
        outbox.sink = websocket_sink(scope)
        self._start(outbox.stream(hub, resume, address=address(scope), wake=self.wake))

    def wake(self) -> None:
        """The outbox queued something, or closed, while no task ran: start one."""
        self._start(self.outbox.backlog(self.wake))

    def cancel(self) -> None:
        self.outbox.on_backlog = None  # (and no cycle outbox -> self -> outbox left behind)
        if self.task is not None:
            self.task.cancel()

    def _start(self, batches: AsyncIterator[list[str]]) -> None:
        task = self.task = asyncio.create_task(
            write_frames(self.scope, self.send, self.hub, self.outbox, batches))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        if self.task is task:
            self.task = None
        writer_done(self.send, task)


async def write_frames(scope, send, hub: Hub, outbox: Outbox,
                       batches: AsyncIterator[list[str]]) -> None:
    """Write ``batches`` (of :class:`Writer`'s outbox), one text frame per payload, and
    the close frame if the outbox closed.

    A backlog is written the way the hub writes live frames, a batch per write, once flow
    control lets it (chatlib.fastpath.websocket_writer). On the public path (and when
    websockets has a write of its own pending) frames go to ``send``, the connection's
    ASGI send. It stops at the first sign that the connection is gone (its transport
    closing), without writing another frame.
    """
    write = websocket_writer(scope)  # None on the public path
    transport = transport_of(scope)
    try:
        async for batch in batches:
            if write is not None and await write(tuple(batch)):
                continue  # the same encoder as the hub's direct writes, one write
            for payload in batch:
                # A connection found reset (a read or write failed) is closing at once, but
                # uvicorn hears of it (connection_lost, then send raises) only on a later
                # turn, and its send does not yield: without this test a page would go, a
                # "socket.send() raised exception." warning per frame, into the dead socket.
                if transport is not None and transport.is_closing():
                    return  # the reader sees the disconnect and cleans up
                await send({"type": "websocket.send", "text": payload})
        # Not closed: the outbox is idle, and a new writer starts when it is not. (Decided
        # in the step that ended ``batches``: nothing was queued or closed in between.)
        if outbox.closed:
            await close(send, outbox.close_code, hub.admission.closing(outbox.close_code))
    except OSError:  # uvicorn's ClientDisconnected
        pass  # the client is gone; the reader sees the disconnect and cleans up
    except StoreUnavailable:  # history unreadable now: the client resumes when it reconnects
        with contextlib.suppress(RuntimeError, OSError):
            await close(send, CloseCode.INTERNAL_ERROR, STORE_DOWN)


def writer_done(send, writer: asyncio.Task) -> None:
    """A writer that failed is a bug: log it, and close with 1011 rather than fall silent."""
    if writer.cancelled() or writer.exception() is None:
        return
    log.error("WebSocket writer failed", exc_info=writer.exception())
    keep(asyncio.ensure_future(close(send, CloseCode.INTERNAL_ERROR)))


_closing: set[asyncio.Task] = set()


def keep(task: asyncio.Task) -> None:
    """Keep ``task`` (a close, a frame) till done: the loop holds only a weak reference."""
    _closing.add(task)
    task.add_done_callback(_closed)


def _closed(task: asyncio.Task) -> None:
    _closing.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a client already gone is no news
