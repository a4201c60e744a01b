"""The WebSocket transport: ``/ws``. A client says hello (its nickname and cursor), gets
the history after its cursor, then live events; it sends messages and typing notices as
JSON text frames (chatlib.wire)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

from starlette.websockets import WebSocket, WebSocketDisconnect

from . import wire
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
from .store import StoreUnavailable
from .stuck import StuckWatch
from .validation import ChatError, client_id, cursor, message_text
from .web import JSONBody, address

log = logging.getLogger("chatlib")

STORE_DOWN = close_reason(STORE)
"""The reason of a 1011 close when the log cannot be read (Redis down, OOM, hung): not
1013, which says that this client fell behind (chatlib.closecode)."""


async def websocket(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    limits = hub.limits
    if hub.closing.is_set():
        await ws.send_denial_response(JSONBody({"error": "server is stopping"}, 503))
        return
    await ws.accept()
    wait = hub.admission.admit()  # after the handshake: a browser reads only a close code
    if wait is not None:
        await ws.close(CloseCode.TRY_AGAIN_LATER, close_reason(BUSY, wait))
        return
    try:
        user, after = await receive_hello(ws, limits)
    except ChatError as exc:
        await ws.send_text(wire.ws_event("error", {"error": exc.error}))
        await ws.close(CloseCode.POLICY_VIOLATION, exc.error[:120])
        return
    except TimeoutError:  # say why before hanging up (a bare TCP close tells nothing) ...
        transport = transport_of(ws.scope)
        if transport is not None and unsent_bytes(transport):
            reset_connection(transport)  # ... unless it reads nothing (pongs waiting): abort
            return
        await ws.close(CloseCode.POLICY_VIOLATION, f"no hello within {limits.hello_timeout:g} s")
        return
    except WebSocketDisconnect:
        return
    try:
        resume = await hub.resolve_cursor(after)
    except StoreUnavailable:
        await ws.close(CloseCode.INTERNAL_ERROR, STORE_DOWN)
        return
    outbox = hub.subscribe(Outbox(wire.WEBSOCKET, user, limits.max_queue))
    stuck: StuckWatch = ws.app.state.stuck
    stuck.watch(ws.scope, outbox)
    writer = asyncio.create_task(write_frames(ws, hub, outbox, resume))
    writer.add_done_callback(partial(writer_done, ws))
    budget: SendBudget = ws.app.state.budget
    rate = budget.connection()
    try:
        while True:
            event = await ws.receive()
            if event["type"] == "websocket.disconnect":
                break
            try:
                await handle_frame(hub, user, address(ws.scope), rate, budget, event, outbox)
            except ChatError as exc:
                hub.tell(outbox, wire.ws_event("error", error_data(exc)))
    finally:
        stuck.forget(outbox)
        hub.unsubscribe(outbox)
        writer.cancel()


def error_data(exc: ChatError, client_id: str | None = None) -> dict:
    """An error frame's fields: ``error``; for a refused message its ``client_id`` and
    ``status``; for a refusal that passes (429) ``retry_after``, whole seconds."""
    data = {"error": exc.error}
    if client_id is not None:
        data.update(client_id=client_id, status=exc.status)
    if exc.retry_after is not None:
        data["retry_after"] = exc.retry_after
    return data


async def receive_hello(ws: WebSocket, limits: Limits) -> tuple[str, int]:
    event = await asyncio.wait_for(ws.receive(), limits.hello_timeout)
    if event["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(event.get("code", CloseCode.NORMAL))
    return wire.read_hello(event.get("text"), limits)


async def handle_frame(hub: Hub, user: str, client: str, rate: RateLimit, budget: SendBudget,
                       event: dict, outbox: Outbox) -> None:
    kind, data = wire.read_client_frame(event.get("text"), hub.limits)
    if kind == "typing":
        if not budget.allow(client, rate):
            raise ChatError(429, "too many messages: slow down", budget.retry_after(client, rate))
        hub.typing(user)
        return
    if kind == "older":  # the resume protocol's older page, as GET ?before=ID answers it
        before = cursor(data.get("before"), "before")
        if not budget.allow(client, rate):
            raise ChatError(429, "too many requests: slow down", budget.retry_after(client, rate))
        try:
            page = await hub.log.before(before, hub.limits.history)
            body = wire.older_body(page, await hub.log.first_id())
        except StoreUnavailable as exc:
            raise ChatError(503, str(exc)) from None
        hub.tell(outbox, wire.ws_event("older", body))
        return
    cid = client_id(data.get("client_id"))
    try:
        text = message_text(data, hub.limits)  # checked before a rate token is spent,
        if not budget.allow(client, rate):  # as HTTP posting does
            raise ChatError(429, "too many messages: slow down", budget.retry_after(client, rate))
        try:
            message, _ = await hub.post(user, text, cid)
        except StoreUnavailable as exc:  # not stored: refused as clearly as HTTP's 503
            raise ChatError(503, str(exc)) from None
    except ChatError as exc:
        if cid is None:
            raise
        # Refused: the error names the message, so that its sender stops waiting for an ack,
        # and gives the HTTP status, so that it knows whether to send it again (5xx) or not.
        hub.tell(outbox, wire.ws_event("error", error_data(exc, client_id=cid)))
        return
    if cid is not None:  # to the sender only: stored (for a repeat, the original)
        hub.tell(outbox, wire.ws_event("ack", message.to_dict()))


async def write_frames(ws: WebSocket, hub: Hub, outbox: Outbox, resume: Resume):
    """This connection's writer: one text frame per payload of :meth:`Outbox.stream`.

    Once the history is sent and the queue is empty the writer sleeps, and the hub writes
    live frames itself through ``outbox.sink`` (chatlib.fastpath.websocket_sink) while the
    connection can take them; the writer wakes only for a backlog, and writes it the same
    way, a batch per write, once flow control lets it (chatlib.fastpath.websocket_writer).
    On the public path (and when websockets has a write of its own pending) frames go to
    the server's own ASGI send, past Starlette's per-frame layers
    (chatlib.fastpath.server_send). It stops at the first sign that the connection is
    gone (its transport closing), without writing another frame.
    """
    send = server_send(ws.scope, ws.send)
    outbox.sink = websocket_sink(ws.scope)
    write = websocket_writer(ws.scope)  # None on the public path
    transport = transport_of(ws.scope)
    try:
        async for batch in outbox.stream(hub, resume, address=address(ws.scope)):
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
        await ws.close(outbox.close_code, hub.admission.closing(outbox.close_code))
    except (WebSocketDisconnect, OSError):  # uvicorn's ClientDisconnected is an OSError
        pass  # the client is gone; the reader sees the disconnect and cleans up
    except StoreUnavailable:  # history unreadable now: the client resumes when it reconnects
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await ws.close(CloseCode.INTERNAL_ERROR, STORE_DOWN)


def writer_done(ws: WebSocket, writer: asyncio.Task) -> None:
    """A writer that failed is a bug: log it, and close with 1011 rather than fall silent."""
    if writer.cancelled() or writer.exception() is None:
        return
    log.error("WebSocket writer failed", exc_info=writer.exception())
    close = asyncio.ensure_future(ws.close(CloseCode.INTERNAL_ERROR))
    _closing.add(close)  # the loop keeps only a weak reference to a task: keep it till done
    close.add_done_callback(_closed)


_closing: set[asyncio.Task] = set()


def _closed(task: asyncio.Task) -> None:
    _closing.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a client already gone is no news
