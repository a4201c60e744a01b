"""The chat server's web application: one Starlette route table for every transport.

Read the route table at the bottom first. Each handler validates what the client sent
(with :mod:`.validation`), talks to the :class:`Hub` (and only to it), and answers in the
format :mod:`.wire` defines. Bad input is answered with ``{"error": ...}`` and a status code
for that request only; a WebSocket gets an error frame and stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import h11
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute, request_response
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.protocol import State

from . import frames, wire
from .auth import TokenGate
from .guard import Guard, HostPolicy
from .hub import GOING_AWAY, TRY_AGAIN_LATER, Hub, Outbox
from .limits import Limits, RateLimit, SendBudget
from .store import StoreUnavailable
from .validation import (
    ChatError,
    client_id,
    cursor,
    float_param,
    int_param,
    json_object,
    message_text,
    nickname,
    optional_user,
)

try:  # Linux: how many bytes the kernel still holds for the peer (SIOCOUTQ = TIOCOUTQ)
    import fcntl
    import termios
    _OUTQ = termios.TIOCOUTQ
except (ImportError, AttributeError):  # elsewhere: only asyncio's own buffer is seen
    _OUTQ = None


def static_dir() -> Path:
    """The chat page's files: ``chatlib/static/`` in a wheel (package data, see
    pyproject.toml), the checkout's top-level ``static/`` in an editable install."""
    here = Path(__file__).resolve().parent
    installed = here / "static"
    return installed if (installed / "index.html").is_file() else here.parent / "static"


STATIC_DIR = static_dir()
WS_OPEN = State.OPEN
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
log = logging.getLogger("chatlib")


# -- reading requests -------------------------------------------------------------------


async def read_json(request: Request, limits: Limits) -> dict:
    """The request body as a JSON object, read with a size limit.

    Host, Origin and Content-Type were checked before any route (chatlib.guard).
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body:
        raise ChatError(413, f"body is larger than {limits.max_body} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body:
                raise ChatError(413, f"body is larger than {limits.max_body} bytes")
    except ClientDisconnect:  # hung up mid-body, or a broken chunk: not a server error
        raise ChatError(400, "incomplete request body") from None
    return json_object(bytes(body))


def address(scope) -> str:
    """The client's IP address, "" if the server does not know it (an ASGI scope's ``client``)."""
    client = scope.get("client")
    return client[0] if client else ""


def rate_check(request: Request, user: str) -> None:
    if not request.app.state.budget.allow(address(request.scope), user=user):
        raise ChatError(429, "too many messages: slow down")


class JSONBody(JSONResponse):
    """A JSON response in the wire format's one encoding (:func:`wire.dumps`)."""

    def render(self, content) -> bytes:
        return wire.dumps(content).encode()


# -- HTTP handlers ----------------------------------------------------------------------


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def poll(state, scope, receive) -> bytes | None:
    """``GET /api/messages``: the JSON body of the 200 answer, or None if the client hung up
    while its long poll waited (499). Raises ChatError (4xx) and StoreUnavailable (503)."""
    hub: Hub = state.hub
    limits = hub.limits
    params = QueryParams(scope["query_string"])
    after = int_param(params, "after", 0)
    wait = min(max(float_param(params, "wait", 0.0), 0.0), limits.max_wait)
    user = optional_user(params, limits)
    if user:
        refused = hub.touch(user, address(scope))
        if refused:
            raise ChatError(429, refused)
    start, reset = await hub.resolve_cursor(after)
    if wait > 0:
        found = await until_disconnected(receive, hub.wait_after(start, wait))
        if found is None:
            return None
    else:
        found = await hub.wait_after(start, 0)
    return poll_answer(state, found, await hub.last_id(), reset)


POLL_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


class Messages:
    """``/api/messages``: ``GET`` polls (long and short), ``POST`` posts.

    A raw ASGI endpoint, for the polls' sake: a function endpoint would run Starlette's
    ``Request``, ``Response`` and two exception-handling ``send`` wrappers for every
    answer, which a poll needs none of. Its errors still go to the app's handlers
    (ChatError's JSON, 503 with ``Retry-After``; nothing has been sent when they are
    raised) and its answer goes to the server's own send (``RAW_SEND``, see
    :class:`ChatApp`): server CPU per long-poll delivery about 0.9x a function
    endpoint's at N=100 (bench/README.md, "Long polling: the floor"). A ``POST`` is an
    ordinary Starlette endpoint.
    """

    def __init__(self) -> None:
        self.post = request_response(post_message)

    async def __call__(self, scope, receive, send) -> None:
        if scope["method"] == "POST":
            await self.post(scope, receive, send)
            return
        body = await poll(scope["app"].state, scope, receive)
        status, headers = (200, POLL_HEADERS) if body is not None else (499, [])
        body = body or b""
        send = scope.get(RAW_SEND, send)
        try:
            await send({"type": "http.response.start", "status": status,
                        "headers": [*headers, (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})
        except OSError:  # uvicorn's ClientDisconnected: nobody to answer
            pass


async def until_disconnected(receive, work):
    """Await ``work``, or give up (``None``) if the client hangs up first.

    A long poll parks a handler for up to ``max_wait`` seconds; a client that gives up
    should free it at once rather than hold it until the timeout.

    Two tasks and asyncio.wait, on purpose. One watch task that cancels this one on a
    hang-up (no task for ``work``) made each answer ~12 % cheaper, but the answers went
    out a loop step sooner and carried one message instead of two: twice the answers,
    245 instead of 139 µs of server CPU per delivery (bench/README.md, "Long polling:
    the floor").
    """
    waiting = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not waiting.done():
            waiting.cancel()
    return waiting.result() if waiting.done() and not waiting.cancelled() else None


def poll_answer(state, found: list, last_id: int, reset: bool) -> bytes:
    """The JSON body for ``found`` messages, shared by every poll that gets the same ones.

    After a message, every long poll parked at the same cursor wakes and gets the same
    messages: the answer is encoded once (the last one is kept, per app) and sent to
    each. Equal lists of (frozen) messages make equal bodies, so a replaced log can't be
    answered from the cache with its predecessor's texts.
    """
    key = (found, last_id, reset)
    cached = getattr(state, "poll_answer", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    answer = wire.dumps(wire.messages_body(found, last_id, reset)).encode()
    state.poll_answer = (key, answer)
    return answer


async def post_message(request: Request) -> Response:
    """201 and the stored message; a repeat of (user, client_id): 200 and the original.

    The client id comes in the body (``"client_id"``) or in an ``Idempotency-Key`` header
    (the IETF httpapi draft's name for it); both at once must agree.
    """
    hub: Hub = request.app.state.hub
    data = await read_json(request, hub.limits)
    user = nickname(data, hub.limits)
    text = message_text(data, hub.limits)
    cid = client_id(data.get("client_id"))
    key = client_id(request.headers.get("idempotency-key"), "Idempotency-Key")
    if cid is not None and key is not None and cid != key:
        raise ChatError(400, "client_id and Idempotency-Key differ")
    rate_check(request, user)
    message, duplicate = await hub.post(user, text, cid or key)
    return JSONBody(message.to_dict(), status_code=200 if duplicate else 201)


async def typing(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    user = nickname(await read_json(request, hub.limits), hub.limits)
    rate_check(request, user)
    hub.typing(user)
    return Response(status_code=204)


async def presence(request: Request) -> Response:
    return JSONBody(request.app.state.hub.presence_event())


async def events(request: Request) -> Response:
    """Server-Sent Events: history after the cursor, then live events, heartbeats between."""
    hub: Hub = request.app.state.hub
    if hub.closing.is_set():
        raise ChatError(503, "server is stopping")
    after = int_param(request.query_params, "after", 0)
    try:  # a reconnecting EventSource knows best; a header that is no id is ignored
        after = cursor(request.headers["last-event-id"], "Last-Event-ID")
    except (KeyError, ChatError):
        pass
    user = optional_user(request.query_params, hub.limits)
    start, reset = await hub.resolve_cursor(after)
    outbox = hub.subscribe("sse", user)
    stuck: StuckWatch = request.app.state.stuck
    stuck.watch(request.scope, outbox)
    return EventStream(hub, outbox, start, reset, stuck)


class EventStream(Response):
    """The ``text/event-stream`` response of :func:`events`: ``retry:``, then the batches
    of :meth:`Hub.push`, one HTTP chunk each (``: ping`` for an empty one), until the
    outbox closes (1013, shutdown) or the client hangs up.

    Starlette's StreamingResponse ran three layers per chunk (its generator, its send
    through two exception-handling wrappers) and its own disconnect task group. Here the
    status line and headers go through Starlette's ``send`` (so that its error handling
    knows the response started); the chunks go to the server's own send (``RAW_SEND``,
    see ChatApp), and live events, while the connection can take them, straight to the
    transport (:func:`sse_sink`), as WebSocket frames do. One task per stream waits for
    the client to hang up and closes the outbox then: uvicorn ignores what is sent to a
    connection that is gone, so the stream would otherwise never end. Server CPU per SSE
    delivery at N=100: 0.34x StreamingResponse's (bench/README.md, "SSE and long polling").
    """

    media_type = "text/event-stream"

    def __init__(self, hub: Hub, outbox: Outbox, start: int, reset: bool,
                 stuck: StuckWatch) -> None:
        self.status_code, self.background = 200, None
        # No self.body: Response.init_headers then adds no Content-Length (chunked body).
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.hub, self.outbox, self.start, self.reset, self.stuck = (
            hub, outbox, start, reset, stuck)

    async def __call__(self, scope, receive, send) -> None:
        hub, outbox = self.hub, self.outbox
        hang_up = asyncio.ensure_future(wait_disconnect(receive))
        hang_up.add_done_callback(lambda _: outbox.close(GOING_AWAY))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            raw = scope.get(RAW_SEND) or send
            if scope.get("method") == "GET" and scope.get("http_version") == "1.1":
                outbox.sink = sse_sink(getattr(raw, "__self__", None))
            more = {"type": "http.response.body", "body": SSE_RETRY, "more_body": True}
            await raw(more)
            async for batch in hub.push(outbox, self.start, self.reset, hub.limits.heartbeat):
                more["body"] = "".join(batch).encode() if batch else SSE_PING
                await raw(more)
            await raw({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            hang_up.cancel()
            self.stuck.forget(outbox)
            hub.unsubscribe(outbox)


SSE_RETRY, SSE_PING = wire.SSE_RETRY.encode(), wire.SSE_PING.encode()


async def wait_disconnect(receive) -> None:
    """Return when the client hangs up (the request's body was read: only
    ``http.disconnect`` can come)."""
    for _ in range(1000):  # bounded
        if (await receive())["type"] == "http.disconnect":
            return


def sse_sink(cycle) -> Callable[[tuple[str, ...]], bool] | None:
    """A function that writes SSE events (one or more, in one chunk) on uvicorn's h11
    request ``cycle`` at once and returns True, or returns False when it must not now (see
    :func:`direct_sink`); None for any other server (the stream then sends everything
    through ASGI).

    It writes only while uvicorn's ``send`` would write without waiting (not paused by
    flow control) and the response is still streaming: h11 in its body state, the client
    connected, the transport not closing. The bytes are exactly what h11 writes for a
    chunk of a chunked body (``SIZE CRLF DATA CRLF``), which keeps no state between
    chunks; only GET over HTTP/1.1 is chunked (:class:`EventStream` checks).
    """
    conn = getattr(cycle, "conn", None)
    transport = getattr(cycle, "transport", None)
    flow = getattr(cycle, "flow", None)
    if conn is None or transport is None or not hasattr(flow, "write_paused") or (
            getattr(conn, "our_state", None) is not h11.SEND_BODY
            or not hasattr(cycle, "disconnected")):
        return None
    write, is_closing = transport.write, transport.is_closing

    def sink(payloads: tuple[str, ...]) -> bool:
        if (flow.write_paused or cycle.disconnected or conn.our_state is not h11.SEND_BODY
                or is_closing()):
            return False
        write(http_chunks(payloads))
        return True

    return sink


_last_chunk: tuple[tuple[str, ...] | None, bytes] = (None, b"")  # None: no tuple matches


def http_chunks(payloads: tuple[str, ...]) -> bytes:
    """The events of ``payloads`` as one chunk of a chunked HTTP/1.1 body (RFC 9112 7.1),
    the last one kept: a fan-out asks with the same tuple once per client (as
    :func:`text_frames`)."""
    global _last_chunk
    if payloads is _last_chunk[0]:
        return _last_chunk[1]
    data = "".join(payloads).encode()
    chunk = b"%x\r\n%b\r\n" % (len(data), data)
    _last_chunk = (payloads, chunk)
    return chunk


# -- WebSocket --------------------------------------------------------------------------


async def websocket(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    limits = hub.limits
    if hub.closing.is_set():
        await ws.send_denial_response(JSONBody({"error": "server is stopping"}, 503))
        return
    await ws.accept()
    try:
        user, after = await receive_hello(ws, limits)
    except ChatError as exc:
        await ws.send_text(wire.ws_event("error", {"error": exc.error}))
        await ws.close(POLICY_VIOLATION, exc.error[:120])
        return
    except TimeoutError:  # say why before hanging up (a bare TCP close tells nothing)
        await ws.close(POLICY_VIOLATION, f"no hello within {limits.hello_timeout:g} s")
        return
    except WebSocketDisconnect:
        return
    start, reset = await hub.resolve_cursor(after)
    outbox = hub.subscribe("ws", user)
    stuck: StuckWatch = ws.app.state.stuck
    stuck.watch(ws.scope, outbox)
    writer = asyncio.create_task(write_frames(ws, hub, outbox, start, reset))
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
                hub.tell(outbox, wire.ws_event("error", {"error": exc.error}))
    finally:
        stuck.forget(outbox)
        hub.unsubscribe(outbox)
        writer.cancel()


async def receive_hello(ws: WebSocket, limits: Limits) -> tuple[str, int]:
    event = await asyncio.wait_for(ws.receive(), limits.hello_timeout)
    if event["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(event.get("code", 1000))
    if event.get("text") is None:
        raise ChatError(400, "expected a text frame")
    data = json_object(event["text"])
    if data.get("type") != "hello":
        raise ChatError(400, 'the first frame must be {"type": "hello", "user": ...}')
    after = data.get("after", 0)
    if not isinstance(after, int) or isinstance(after, bool):
        raise ChatError(400, "after must be an integer")
    return nickname(data, limits), cursor(after)


async def handle_frame(hub: Hub, user: str, client: str, rate: RateLimit, budget: SendBudget,
                       event: dict, outbox: Outbox) -> None:
    text = event.get("text")
    if text is None:
        raise ChatError(400, "binary frames are not supported: send JSON text")
    # Don't parse what can't be valid. JSON may escape each character of the text as
    # "\ud83d\ude00" (12 characters; json.dumps does by default): bound by that, not less.
    if len(text) > 12 * hub.limits.max_text + 200:
        raise ChatError(413, f"text is longer than {hub.limits.max_text} characters")
    data = json_object(text)
    kind = data.get("type")
    if kind not in ("message", "typing"):
        raise ChatError(400, f"unknown type: {str(kind)[:40]!r}")
    if kind == "typing":
        if not budget.allow(client, rate):
            raise ChatError(429, "too many messages: slow down")
        hub.typing(user)
        return
    cid = client_id(data.get("client_id"))
    try:
        if not budget.allow(client, rate):
            raise ChatError(429, "too many messages: slow down")
        try:
            message, _ = await hub.post(user, message_text(data, hub.limits), cid)
        except StoreUnavailable as exc:  # not stored: refused as clearly as HTTP's 503
            raise ChatError(503, str(exc)) from None
    except ChatError as exc:
        if cid is None:
            raise
        # Refused: the error names the message, so that its sender stops waiting for an ack,
        # and gives the HTTP status, so that it knows whether to send it again (5xx) or not.
        hub.tell(outbox, wire.ws_event("error", {"error": exc.error, "client_id": cid,
                                              "status": exc.status}))
        return
    if cid is not None:  # to the sender only: stored (for a repeat, the original)
        hub.tell(outbox, wire.ws_event("ack", message.to_dict()))


async def write_frames(ws: WebSocket, hub: Hub, outbox: Outbox, start: int, reset: bool):
    """This connection's writer: one text frame per payload of :meth:`Hub.push`.

    Once the history is sent and the queue is empty the writer sleeps, and the hub writes
    live frames itself through ``outbox.sink`` (:func:`direct_sink`) while the connection
    can take them; the writer wakes only for a backlog.
    """
    # Frames skip Starlette's per-frame layers and go to the server's own ASGI send (see
    # ChatApp): server CPU per delivery 3.2 -> 2.8 µs (-12%) at 100 clients (bench/README.md).
    send = ws.scope.get(RAW_SEND) or ws.send
    outbox.sink = direct_sink(getattr(send, "__self__", None))
    try:
        async for batch in hub.push(outbox, start, reset):
            for payload in batch:
                await send({"type": "websocket.send", "text": payload})
        await ws.close(outbox.close_code)
    except (WebSocketDisconnect, OSError):  # uvicorn's ClientDisconnected is an OSError
        pass  # the client is gone; the reader sees the disconnect and cleans up
    except StoreUnavailable:  # history unreadable now: the client resumes when it reconnects
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await ws.close(TRY_AGAIN_LATER)


def direct_sink(protocol) -> Callable[[tuple[str, ...]], bool] | None:
    """A function that writes text frames (one per payload, in one ``write``) on
    ``protocol`` (uvicorn's websockets-sansio protocol) at once and returns True, or
    returns False when it must not now; None for any other server (the writer then sends
    everything, through ASGI).

    It writes only while uvicorn's ``send`` would write without waiting: not paused by
    flow control (``writable``, cleared when asyncio's buffer passes its high-water mark),
    the connection open (websockets' state, no close sent or received, transport not
    closing) and nothing of websockets' own waiting to be written. Otherwise the payload
    is queued, and the writer's ``send`` waits for the transport as before: a client that
    stops reading still fills its queue (1013) or is reset by :class:`StuckWatch`.

    Without an extension (no permessage-deflate) the frame is the same bytes for every
    client (a server's frames are not masked, RFC 6455 5.1): :func:`text_frames` builds
    them once per message (or group of messages, see :func:`chatlib.hub.put_group`). With
    permessage-deflate each connection compresses with its own context, through websockets
    as uvicorn does.
    """
    conn = getattr(protocol, "conn", None)
    transport = getattr(protocol, "transport", None)
    writable = getattr(protocol, "writable", None)
    if conn is None or transport is None or not isinstance(writable, asyncio.Event) or (
            getattr(conn, "state", None) is not WS_OPEN or not hasattr(protocol, "close_sent")):
        return None
    plain = not conn.extensions
    write, is_closing, is_writable = transport.write, transport.is_closing, writable.is_set

    def sink(payloads: tuple[str, ...]) -> bool:
        if (not is_writable() or protocol.close_sent or conn.state is not WS_OPEN
                or conn.writes or is_closing()):
            return False
        if plain:
            write(text_frames(payloads))
        else:
            for payload in payloads:
                conn.send_text(payload.encode())
            write(b"".join(conn.data_to_send()))
        return True

    return sink


_last_frames: tuple[tuple[str, ...] | None, bytes] = (None, b"")  # None: no tuple matches


def text_frames(payloads: tuple[str, ...]) -> bytes:
    """Unmasked, unfragmented, uncompressed text frames (RFC 6455 5.2), one per payload,
    joined, the last ones kept: a fan-out asks with the same tuple (the hub's, one per
    message or group of messages) once per client, and gets one encoding for all
    (websockets' ``broadcast()`` serialises each message once per client)."""
    global _last_frames
    if payloads is _last_frames[0]:
        return _last_frames[1]
    # the course's own encoder (chapter 6)
    data = b"".join(frames.text(payload, mask_key=None) for payload in payloads)
    _last_frames = (payloads, data)
    return data


def writer_done(ws: WebSocket, writer: asyncio.Task) -> None:
    """A writer that failed is a bug: log it, and close with 1011 rather than fall silent."""
    if writer.cancelled() or writer.exception() is None:
        return
    log.error("WebSocket writer failed", exc_info=writer.exception())
    close = asyncio.ensure_future(ws.close(INTERNAL_ERROR))
    _closing.add(close)  # the loop keeps only a weak reference to a task: keep it till done
    close.add_done_callback(_closed)


_closing: set[asyncio.Task] = set()


def _closed(task: asyncio.Task) -> None:
    _closing.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a client already gone is no news


# -- a client that never reads ----------------------------------------------------------


def transport_of(scope) -> asyncio.WriteTransport | None:
    """The TCP connection under an ASGI connection (uvicorn's ``send`` is a bound method
    of its protocol, for WebSockets, or of the request's cycle, for HTTP; both keep it;
    for HTTP it may be chatlib.protocols' LingeringTransport, which passes these on)."""
    owner = getattr(scope.get(RAW_SEND), "__self__", None)
    transport = getattr(owner, "transport", None)
    needed = ("abort", "get_write_buffer_size", "get_extra_info")
    return transport if all(hasattr(transport, name) for name in needed) else None


def unsent_bytes(transport: asyncio.WriteTransport) -> int:
    """Bytes written but not yet taken by the peer: asyncio's buffer + the kernel's."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0 and _OUTQ is not None:
        with contextlib.suppress(OSError):
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0" * 4))[0]
    return unsent


def reset_connection(transport: asyncio.WriteTransport) -> None:
    """Close at once and free everything: RST, not FIN (a FIN would wait behind the unsent
    bytes, in FIN-WAIT-1, for as long as the peer keeps its window shut)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def bytes_acked(transport: asyncio.WriteTransport) -> int | None:
    """How many bytes the peer has acknowledged so far (Linux TCP_INFO), if known."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0 or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    # struct tcp_info: tcpi_bytes_acked is the u64 at offset 120 (Linux >= 4.1).
    return struct.unpack_from("Q", info, 120)[0] if len(info) >= 128 else None


class StuckWatch:
    """Finds push clients that stopped reading, and resets their connections.

    A client is stuck when bytes wait for it in asyncio's buffer (so the kernel's send
    buffer is full too) and it acknowledged nothing for ``limits.stuck_timeout`` seconds.
    A slow client that reads, however slowly, makes progress and is left alone. The kernel
    may hold megabytes for a peer with a shut window, so this can happen long before the
    client's outbox overflows (1013). One sweep for all clients, a few times per timeout;
    only connections with unsent bytes cost a system call.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._watched: dict[Outbox, list] = {}  # outbox -> [transport, acked, since]
        self._sweeper: asyncio.Task | None = None

    def watch(self, scope, outbox: Outbox) -> None:
        transport = transport_of(scope)
        if transport is None:
            return
        self._watched[outbox] = [transport, None, 0.0]
        outbox.on_close = partial(self._closed, transport)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    def forget(self, outbox: Outbox) -> None:
        self._watched.pop(outbox, None)
        if not self._watched and self._sweeper is not None:
            self._sweeper.cancel()  # nobody to watch: no task left behind at shutdown
            self._sweeper = None

    def _closed(self, transport: asyncio.WriteTransport, code: int) -> None:
        """The hub gave up on this client (1013): the close frame (or the end of the SSE
        stream) is on its way; if the client does not read it either, reset."""
        if code == TRY_AGAIN_LATER:
            asyncio.get_running_loop().call_later(self.limits.stuck_timeout, self._check,
                                                  transport)

    def _check(self, transport: asyncio.WriteTransport) -> None:
        if unsent_bytes(transport):
            self._reset(transport)

    def _reset(self, transport: asyncio.WriteTransport) -> None:
        log.info("resetting a connection that stopped reading (%s)",
                 transport.get_extra_info("peername"))
        reset_connection(transport)

    async def _sweep(self) -> None:
        interval = max(self.limits.stuck_timeout / 4, 0.05)
        loop = asyncio.get_running_loop()
        while self._watched:
            await asyncio.sleep(interval)
            now = loop.time()
            for outbox, entry in list(self._watched.items()):
                transport, acked, since = entry
                if not transport.get_write_buffer_size():
                    entry[1] = None  # nothing waits for it: not stuck
                    continue
                now_acked = bytes_acked(transport)
                if acked is None or now_acked != acked:
                    entry[1:] = [now_acked if now_acked is not None else -1, now]
                elif now - since >= self.limits.stuck_timeout:
                    self._watched.pop(outbox, None)
                    outbox.close(TRY_AGAIN_LATER)
                    self._reset(transport)


# -- the application --------------------------------------------------------------------


async def chat_error(request: Request, exc: ChatError) -> Response:
    return JSONBody({"error": exc.error}, status_code=exc.status)


async def store_unavailable(request: Request, exc: StoreUnavailable) -> Response:
    return JSONBody({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def http_error(request: Request, exc: HTTPException) -> Response:
    return JSONBody({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


RAW_SEND = "chatlib.raw_send"


class ChatApp(Starlette):
    """Starlette, with the server's own ASGI ``send`` kept in the scope (``RAW_SEND``).

    Between ``ws.send_text(...)`` and the server's ``send`` Starlette has four coroutine
    layers (``send_text``, ``WebSocket.send`` and two exception-handling wrappers that only
    matter for HTTP). Fanning out one message to N clients runs them N times; write_frames
    uses this ``send`` directly instead. Everything else (accept, receive, close, errors)
    still goes through Starlette's WebSocket, whose state is unaffected.
    """

    async def __call__(self, scope, receive, send) -> None:
        scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(hub: Hub, hosts: HostPolicy | None = None,
               token: str | None = None) -> Starlette:
    """The chat app for ``hub``; ``hosts`` is the Host allowlist (chatlib.guard); with a
    ``token`` every request needs it (chatlib.auth)."""
    routes = [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        Route("/api/messages", Messages(), methods=["GET", "POST"]),
        Route("/api/typing", typing, methods=["POST"]),
        Route("/api/events", events),
        Route("/api/presence", presence),
        WebSocketRoute("/ws", websocket),
    ]
    app = ChatApp(
        routes=routes,
        exception_handlers={ChatError: chat_error, HTTPException: http_error,
                            StoreUnavailable: store_unavailable},
        middleware=[Middleware(Guard, limits=hub.limits, hosts=hosts),
                    *([Middleware(TokenGate, token=token)] if token else [])],
    )
    app.state.hub = hub
    app.state.budget = SendBudget(hub.limits)
    app.state.stuck = StuckWatch(hub.limits)
    return app
