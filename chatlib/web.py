"""What every web handler shares: reading a request, the client's address, answering JSON.

Host, Origin and Content-Type were checked before any route (chatlib.guard). Bad input
raises :class:`~chatlib.validation.ChatError`; chatlib.app turns it into ``{"error": ...}``
with its status code, for that request only.
"""

from __future__ import annotations

from typing import NamedTuple

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from . import wire
from .limits import Limits
from .validation import ChatError, json_object


async def read_json(request: Request, limits: Limits) -> dict:
    """The request body as a JSON object, read with a size limit."""
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


def latin1(value: bytes | None) -> str | None:
    """A header's value as a str (ASGI headers are bytes), None for an absent header."""
    return None if value is None else value.decode("latin-1")


def address(scope) -> str:
    """The client's IP address, "" if the server does not know it (an ASGI scope's ``client``)."""
    client = scope.get("client")
    return client[0] if client else ""


class JSONBody(JSONResponse):
    """A JSON response in the wire format's one encoding (:func:`wire.dumps`)."""

    def render(self, content) -> bytes:
        return wire.dumps(content).encode()


class Refusal(NamedTuple):
    """A request refused before any route (chatlib.guard, chatlib.auth): its ``status``,
    ``{"error": error}`` and the extra ``headers`` that answer it (:func:`refuse`)."""

    status: int
    error: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


async def refuse(kind: str, send, status: int, error: str,
                 headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer ``status`` and ``{"error": error}`` (plus ``headers``) before any route (the
    middleware's refusals): to an HTTP request (``kind`` "http"), or to a WebSocket
    handshake as ASGI's denial response, an HTTP answer instead of 101."""
    body = wire.dumps({"error": error}).encode()
    prefix = "http" if kind == "http" else "websocket.http"
    await send({"type": f"{prefix}.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body)), *headers]})
    await send({"type": f"{prefix}.response.body", "body": body})


async def wait_disconnect(receive) -> None:
    """Return when the client hangs up (the request's body was read: only
    ``http.disconnect`` can come)."""
    for _ in range(1000):  # bounded
        if (await receive())["type"] == "http.disconnect":
            return
