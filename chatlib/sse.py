"""The Server-Sent Events transport: ``GET /api/events``, a ``text/event-stream`` response
that sends the history after the client's cursor, then live events, heartbeats between.
A stream is about one room (``?room=NAME``; its cursor, ``after=`` or ``Last-Event-ID``,
is that room's), the default room without it."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from . import wire
from .admission import BUSY_ERROR
from .auth import GRANT
from .closecode import CloseCode, read_close_reason
from .fastpath import server_send, sse_sink, sse_writer
from .hub import Hub, Resume
from .outbox import Outbox
from .polling import room_of
from .rooms import Rooms
from .stuck import StuckWatch
from .validation import ChatError, cursor, int_param, optional_user
from .web import address, wait_disconnect


async def events(request: Request) -> Response:
    """History after the cursor (``after=`` or ``Last-Event-ID``), then live events."""
    hub: Hub = request.app.state.hub
    if hub.closing.is_set():
        raise ChatError(503, "server is stopping")
    wait = hub.admission.admit()
    if wait is not None:
        raise ChatError(503, BUSY_ERROR, wait)
    after = int_param(request.query_params, "after", 0)
    try:  # a reconnecting EventSource knows best; a header that is no id is ignored
        after = cursor(request.headers["last-event-id"], "Last-Event-ID")
    except (KeyError, ChatError):
        pass
    user = optional_user(request.query_params, hub.limits)
    room = room_of(request.query_params, hub.limits, user, request.scope)
    rooms: Rooms = request.app.state.rooms
    grant = request.scope.get(GRANT)
    named = grant.user if grant is not None else user  # told of its direct messages
    async with rooms.using(room) as hub:
        if user and not hub.presence.take(user):  # a name joins by POST /api/presence,
            user = ""  # not by a GET
        resume = await hub.resolve_cursor(after)
        outbox = hub.subscribe(Outbox(wire.SSE, user, hub.limits.max_queue))
    stuck: StuckWatch = request.app.state.stuck
    stuck.watch(request.scope, outbox)
    return EventStream(hub, outbox, resume, stuck, rooms, named)


RETRY, PING = (wire.SSE_RETRY,), (wire.SSE_PING,)


def closing_event(code: int, reason: str) -> tuple[str, ...]:
    """The end of a stream the server closes: ``event: close`` with the WebSocket close
    ``code`` and ``reason`` it stands for (chatlib.closecode.CLOSES), after a ``retry:``
    field with the delay the reason asks for, which a browser's own EventSource obeys."""
    _, delay = read_close_reason(reason)
    close = wire.SSE.event("close", {"code": code, "reason": reason})
    return (close,) if delay is None else (f"retry: {round(delay * 1000)}\n\n", close)


class EventStream(Response):
    """The ``text/event-stream`` response of :func:`events`: ``retry:``, then the batches
    of :meth:`Outbox.stream`, one HTTP chunk each (``: ping`` for an empty one), until the
    outbox closes (1013, shutdown) or the client hangs up.

    Not Starlette's StreamingResponse, which runs three layers per chunk (its generator,
    its send through two exception-handling wrappers) and its own disconnect task group
    (bench/README.md, "SSE and long polling"). Here the status line and headers go through
    Starlette's ``send`` (so that its error handling knows the response started); the
    chunks go straight to the transport, as WebSocket frames do: live events from the hub
    while the connection can take them (chatlib.fastpath.sse_sink), the rest from here
    once flow control lets them (chatlib.fastpath.sse_writer); on the public path through
    the server's own send (chatlib.fastpath.server_send). The last chunk goes through
    the server's send always: it ends h11's response. One task per stream waits for
    the client to hang up and closes the outbox then: uvicorn ignores what is sent to a
    connection that is gone, so the stream would otherwise never end.
    """

    media_type = "text/event-stream"

    def __init__(self, hub: Hub, outbox: Outbox, resume: Resume, stuck: StuckWatch,
                 rooms: Rooms | None = None, user: str = "") -> None:
        self.status_code, self.background = 200, None
        # No self.body: Response.init_headers then adds no Content-Length (chunked body).
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.hub, self.outbox, self.resume, self.stuck = hub, outbox, resume, stuck
        self.rooms, self.user = rooms, user  # who is told of direct messages here

    def notice(self, event: str, data: dict) -> None:
        """A ``dm`` (chatlib.rooms.Rooms.posted), unless about this stream's own room."""
        if data.get("room") != self.hub.room:
            self.hub.tell(self.outbox, wire.SSE.event(event, data))

    async def __call__(self, scope, receive, send) -> None:
        hub, outbox = self.hub, self.outbox
        hang_up = asyncio.ensure_future(wait_disconnect(receive))
        hang_up.add_done_callback(lambda _: outbox.close(CloseCode.GOING_AWAY))
        if self.rooms is not None:
            self.rooms.connected(self.user, self, self.notice)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            raw = server_send(scope, send)
            outbox.sink = sse_sink(scope)
            write = sse_writer(scope)  # None on the public path
            more = {"type": "http.response.body", "more_body": True}

            async def chunk(payloads: tuple[str, ...]) -> None:
                if write is None or not await write(payloads):
                    more["body"] = "".join(payloads).encode()
                    await raw(more)

            await chunk(RETRY)
            async for batch in outbox.stream(hub, self.resume, hub.limits.heartbeat,
                                             address(scope)):
                await chunk(tuple(batch) if batch else PING)  # empty: heartbeat passed
            if not hang_up.done():  # the server ends it: say why, as a WebSocket close does
                await chunk(closing_event(outbox.close_code,
                                          hub.admission.closing(outbox.close_code)))
            await raw({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            hang_up.cancel()
            self.stuck.forget(outbox)
            hub.unsubscribe(outbox)
            if self.rooms is not None:
                self.rooms.disconnected(self.user, self)
                self.rooms.release(hub)
