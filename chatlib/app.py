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
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from .auth import TokenGate
from .fastpath import RAW_SEND
from .guard import Guard, HostPolicy
from .hub import Hub
from .limits import SendBudget
from .polling import Messages, presence, typing
from .sse import events
from .store import StoreUnavailable
from .stuck import StuckWatch
from .validation import ChatError
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


class ChatApp(Starlette):
    """Starlette, with the server's own ASGI ``send`` kept in the scope.

    Between ``ws.send_text(...)`` and the server's ``send`` Starlette has four coroutine
    layers (``send_text``, ``WebSocket.send`` and two exception-handling wrappers that only
    matter for HTTP). Fanning out one message to N clients runs them N times; the
    transports' writers use this ``send`` directly instead (chatlib.fastpath.server_send).
    Everything else (accept, receive, close, errors) still goes through Starlette.
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
        Route("/api/messages", Messages(), methods=["GET", "POST"]),  # chatlib.polling
        Route("/api/typing", typing, methods=["POST"]),
        Route("/api/events", events),  # chatlib.sse
        Route("/api/presence", presence, methods=["GET", "POST"]),
        Route("/api/limits", limits_for_clients),
        Route("/api/webtransport", webtransport_info),  # chatlib.webtransport
        WebSocketRoute("/ws", websocket),  # chatlib.ws
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
    app.state.webtransport = None  # chatlib.webtransport.WebTransportServer, if on
    return app
