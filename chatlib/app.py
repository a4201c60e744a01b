"""The chat server's web application: one Starlette route table for every transport.

Read :func:`create_app` first: the route table. Each transport has its own module
(chatlib.polling for HTTP posting and (long) polling, chatlib.sse, chatlib.ws); each handler
validates what the client sent (chatlib.validation), talks to the :class:`Hub` (and only
to it), and answers in the format chatlib.wire defines. Bad input is answered with
``{"error": ...}`` and a status code for that request only (the handlers below); a
WebSocket gets an error frame and stays open.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import MappingProxyType

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import wire
from .auth import GRANT, TokenGate
from .closecode import CloseCode
from .fastpath import RAW_SEND, unsent_bytes
from .guard import Guard, HostPolicy
from .hub import Hub
from .limits import SendBudget
from .polling import Messages, presence, typing
from .rooms import Rooms
from .sse import events
from .store import DEFAULT_ROOM, StoreUnavailable
from .stuck import StuckWatch
from .validation import ChatError, dm_users, optional_user
from .web import JSONBody
from .ws import websocket


def static_dir() -> Path:
    """The chat page's files: ``chatlib/static/`` in a wheel (package data, see
    pyproject.toml), the checkout's top-level ``static/`` in an editable install."""
    here = Path(__file__).resolve().parent
    installed = here / "static"
    return installed if (installed / "index.html").is_file() else here.parent / "static"


STATIC_DIR = static_dir()


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def limits_for_clients(request: Request) -> Response:
    """``GET /api/limits``: what a client's input box must know (chatlib.limits is their home):
    the longest text and nickname, and the send budget (``rate`` per second, ``burst``)."""
    limits = request.app.state.hub.limits
    return JSONBody({"max_text": limits.max_text, "max_user": limits.max_user,
                     "rate": limits.rate, "burst": limits.burst})


async def webtransport_info(request: Request) -> Response:
    """``GET /api/webtransport``: where the WebTransport session is, and the certificate's
    hash (chatlib.webtransport.WebTransportServer.info); ``{"available": false}`` when
    the server runs without it."""
    server = request.app.state.webtransport
    return JSONBody({"available": False}) if server is None else server.info(request)


async def room_list(request: Request) -> Response:
    """``GET /api/rooms``: the rooms a client may join that the log holds, with their last
    ids (a client's unread count is that minus its cursor)::

        {"rooms": [{"room": R, "last_id": N[, "private": true]}, ...],
         "dms": [{"room": "@A+B", "with": OTHER, "last_id": N}, ...]}

    Open rooms (the default room first, then by name); private rooms and direct messages
    only of the user token's user (in open mode: of ``?user=``)."""
    rooms: Rooms = request.app.state.rooms
    grant = request.scope.get(GRANT)
    user = optional_user(request.query_params, rooms.limits)
    if grant is not None and user and user != grant.user:
        raise ChatError(403, f"forbidden: this token is {grant.user!r}'s")
    if grant is not None:
        user = grant.user
    elif rooms.token_mode:
        user = ""  # the shared token: no direct messages
    mine = rooms.readable(grant)
    listed, dms = [], []
    for room, last_id in sorted((await rooms.log.rooms()).items(),
                                key=lambda item: (item[0] != DEFAULT_ROOM, item[0])):
        pair = dm_users(room)
        if pair is not None:
            if user in pair:
                dms.append({"room": room, "with": pair[1] if user == pair[0] else pair[0],
                            "last_id": last_id})
        elif room not in rooms.private:
            listed.append({"room": room, "last_id": last_id})
        elif room in mine:
            listed.append({"room": room, "last_id": last_id, "private": True})
    return JSONBody({"rooms": listed, "dms": dms})


def server_stats(state) -> dict:
    """Backpressure and admission now, computed on request (nothing is kept for it on the
    path of a message; ``ChatServer.stats()``, ``GET /api/stats``)::

        {"connections": {"websocket": N, "sse": N, "webtransport": N, "long_poll": N},
         "clients": [{"transport": "websocket" | "sse" | "webtransport", "user": U,
                      "queued": FRAMES,
                      "unsent_bytes": B | None}, ...],      # deepest queue first
         "queued_max": FRAMES, "unsent_bytes_max": B,
         "closes": {CODE: N}, "behind": N, "stuck_resets": N,
         "admission": {"rate", "burst", "admitted", "refused", "tokens"},
         "published": ID}

    ``queued``: frames in the client's outbox (it is closed with 1013 at
    ``Limits.max_queue``); ``unsent_bytes``: bytes written for it and not acknowledged,
    asyncio's buffer and the kernel's (None without the fast path); ``long_poll``: long
    polls parked now; ``closes``: push connections closed, by code, counted when decided
    (``behind``: 1013, fell behind, stuck ones included; 1001 also counts SSE clients that
    hung up; both need the fast path); ``stuck_resets``: connections reset for not reading
    (chatlib.stuck); all since the server started. Costs one ioctl per push client.
    ``clients`` are per room (a WebSocket in two rooms has a queue in each: two entries),
    ``connections`` are connections (a WebTransport session: per room too);
    ``published`` is the default room's.
    """
    hub: Hub = state.hub
    stuck: StuckWatch = state.stuck
    clients = []
    connections: dict[str, set] = {"websocket": set(), "sse": set(), "webtransport": set()}
    for subscriber in state.rooms.subscribers:
        transport = stuck.transport(subscriber)
        unsent = None
        if transport is not None and not transport.is_closing():
            unsent = unsent_bytes(transport)
        kind = getattr(subscriber, "transport", None)  # webtransport (chatlib.webtransport)
        if kind is None:
            kind = "websocket" if subscriber.encoding is wire.WEBSOCKET else "sse"
        clients.append({"transport": kind, "user": subscriber.user,
                        "queued": subscriber.queued, "unsent_bytes": unsent})
        connections[kind].add(transport if transport is not None else subscriber)
    clients.sort(key=lambda c: (c["queued"], c["unsent_bytes"] or 0), reverse=True)
    closes = stuck.closes
    return {
        "connections": {**{kind: len(held) for kind, held in connections.items()},
                        "long_poll": state.long_polls},
        "clients": clients,
        "queued_max": max((c["queued"] for c in clients), default=0),
        "unsent_bytes_max": max((c["unsent_bytes"] or 0 for c in clients), default=0),
        "closes": {int(code): n for code, n in sorted(closes.items())},
        "behind": closes[CloseCode.TRY_AGAIN_LATER],
        "stuck_resets": stuck.resets,
        "admission": hub.admission.stats(),
        "published": hub.published,
    }


STATS_EVERY = 1.0
"""Seconds ``GET /api/stats`` reuses its answer: a client asking in a loop costs one
computation (one ioctl per push client) per second, however often it asks."""


async def stats(request: Request) -> Response:
    """``GET /api/stats``: :func:`server_stats`, the first 100 clients (deepest queues) named,
    as guarded as every route (Host, Origin, token); at most one computation per
    :data:`STATS_EVERY` s."""
    state = request.app.state
    now = time.monotonic()
    cached = getattr(state, "stats_cache", None)
    if cached is None or now - cached[0] >= STATS_EVERY:
        data = server_stats(state)
        data["clients_count"] = len(data["clients"])
        data["clients"] = data["clients"][:100]
        cached = state.stats_cache = (now, wire.dumps(data).encode())
    return Response(cached[1], media_type="application/json",
                    headers={"Cache-Control": "no-store"})


# -- errors: {"error": ...} and a status code, for that request only ----------------------


async def chat_error(request: Request, exc: ChatError) -> Response:
    """``{"error"}``; for a refusal that passes also ``"retry_after"`` (seconds) in the body
    and, rounded up to whole seconds as RFC 9110 section 10.2.3 wants, in ``Retry-After``."""
    if exc.retry_after is None:
        return JSONBody({"error": exc.error}, status_code=exc.status)
    return JSONBody({"error": exc.error, "retry_after": exc.retry_after}, status_code=exc.status,
                    headers={"Retry-After": str(math.ceil(exc.retry_after))})


async def store_unavailable(request: Request, exc: StoreUnavailable) -> Response:
    return JSONBody({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def http_error(request: Request, exc: HTTPException) -> Response:
    return JSONBody({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


MESSAGES_PATH = "/api/messages"
"""Where chatlib.polling.Messages is (:attr:`ChatApp.messages`)."""


class ChatApp(Starlette):
    """Starlette, with the server's own ASGI ``send`` kept in the scope, fewer layers above
    a WebSocket's endpoint, and what chatlib's other paths need to know kept as its own.

    ``ChatApp(routes, messages=..., websockets=..., front_door=..., exception_handlers=...)``:

    * ``routes``: the HTTP routes, which Starlette routes (and answers errors of);
    * ``messages``: the ``/api/messages`` endpoint (chatlib.polling.Messages), routed by
      Starlette too; chatlib.pollpath answers its plain long polls itself;
    * ``websockets``: the endpoint of each WebSocket path, which this class routes itself
      (see below);
    * ``front_door``: the ASGI middleware every request and handshake goes through, as
      ``(class, options)`` pairs: chatlib.guard.Guard, then chatlib.auth.TokenGate in
      token mode. Kept as given (:attr:`front_door`): chatlib.pollpath runs the checks of
      this front door only, and its WebSocket stack is built from it;
    * ``exception_handlers``: the error answers, by exception class (Starlette's); kept,
      read-only, as :attr:`error_handlers`, which chatlib.pollpath answers with too.

    Between an endpoint and the server's ``send`` Starlette has exception-handling
    wrappers that only matter for HTTP (and a ``Response`` or ``WebSocket`` layer on top).
    Fanning out one message to N clients would run them N times; the transports' writers
    and the raw endpoints (``/ws``, ``GET /api/messages``) use this ``send`` directly
    instead (chatlib.fastpath.server_send).

    A WebSocket's ASGI call lasts as long as its connection, and so does every coroutine
    between the server and its endpoint: an idle connection held eight of Starlette's
    (the app, the error and exception middleware with its wrapper and closures, the
    router twice, the route). A WebSocket handshake goes through the front door (the
    same classes and options as HTTP's) to :meth:`route_websocket` instead. Starlette's
    error middleware only handles HTTP, and its exception handlers answer HTTP requests;
    an endpoint that raises is handled by the server (1011, or a 500 before the
    handshake), as it was.

    The app is complete when :func:`create_app` returns it: its paths are built from what
    it was given, so Starlette's ``add_middleware``, ``add_exception_handler``,
    ``add_route``, ``add_websocket_route``, ``mount`` and ``host`` raise TypeError rather
    than change one path and not the others. To put a middleware in front, wrap the app
    (``Mine(app)``): it sees every request and handshake, and chatlib.pollpath turns
    itself off for an app that is not chatlib's.
    """

    def __init__(self, routes, *, messages, websockets, front_door, exception_handlers) -> None:
        self.messages = messages
        self.websockets = dict(websockets)
        self.front_door = tuple(front_door)
        self.error_handlers = MappingProxyType(dict(exception_handlers))
        self.websocket_stack = None
        super().__init__(
            routes=[Route(MESSAGES_PATH, messages, methods=["GET", "POST"]), *routes],
            exception_handlers=self.error_handlers,
            # Starlette's documented way to add middleware: Middleware(cls, **options).
            middleware=[Middleware(cls, **options) for cls, options in self.front_door])

    def add_middleware(self, *args, **kwargs):
        raise TypeError("chatlib's app is complete as create_app() returns it: wrap it "
                        "instead (app = YourMiddleware(app))")

    add_exception_handler = add_route = add_websocket_route = mount = host = add_middleware

    async def __call__(self, scope, receive, send) -> None:
        scope[RAW_SEND] = send
        if scope["type"] != "websocket":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        if self.websocket_stack is None:
            stack = self.route_websocket
            for cls, options in reversed(self.front_door):
                stack = cls(stack, **options)
            self.websocket_stack = stack
        await self.websocket_stack(scope, receive, send)

    def route_websocket(self, scope, receive, send):
        """ASGI, behind the front door: a WebSocket handshake goes straight to the endpoint
        of its path (below ``root_path``: TokenGate serves every route under the page's
        path too), and one to any other path is refused (ASGI: a close before the accept
        is answered 403).

        Not a coroutine function: it returns the endpoint's coroutine, which the caller
        awaits, so no frame of its own stays for the connection's life. The endpoint is
        not given ``path_params`` (``/ws`` has none)."""
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root + "/"):
            path = path[len(root):]
        endpoint = self.websockets.get(path)
        if endpoint is None:
            return send({"type": "websocket.close"})
        return endpoint(scope, receive, send)


def create_app(hub: Hub, hosts: HostPolicy | None = None,
               token: str | None = None, user_secret: str | None = None) -> ChatApp:
    """The chat app for ``hub``; ``hosts`` is the Host allowlist (chatlib.guard); with a
    ``token`` every request needs it, or a user token signed with ``user_secret``
    (chatlib.auth)."""
    routes = [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        Route("/api/typing", typing, methods=["POST"]),
        Route("/api/events", events),  # chatlib.sse
        Route("/api/presence", presence, methods=["GET", "POST"]),
        Route("/api/limits", limits_for_clients),
        Route("/api/webtransport", webtransport_info),  # chatlib.webtransport
        Route("/api/stats", stats),
        Route("/api/rooms", room_list),
    ]
    front_door = [(Guard, {"limits": hub.limits, "hosts": hosts})]
    if token:
        front_door.append((TokenGate, {"token": token, "user_secret": user_secret}))
    app = ChatApp(
        routes,
        messages=Messages(),  # MESSAGES_PATH, GET and POST: chatlib.polling
        websockets={"/ws": websocket},  # chatlib.ws: a raw ASGI endpoint
        front_door=front_door,
        exception_handlers={ChatError: chat_error, HTTPException: http_error,
                            StoreUnavailable: store_unavailable},
    )
    app.state.hub = hub
    app.state.rooms = Rooms.of(hub)  # the server made it (private rooms); else open rooms
    app.state.budget = SendBudget(hub.limits)
    app.state.stuck = StuckWatch(hub.limits)
    app.state.webtransport = None  # chatlib.webtransport.WebTransportServer, if on
    app.state.long_polls = 0  # parked now (chatlib.polling)
    return app
