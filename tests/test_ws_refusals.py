"""``/ws`` refuses what it refused when it was a Starlette WebSocket route (it is a raw
ASGI endpoint now, chatlib.ws.WebSocketChat): the front door's checks before the
handshake (an HTTP answer instead of 101), then the hello's, with close codes."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from chatlib import Limits, wire

pytestmark = pytest.mark.timeout(60)
T = 10


async def handshake(port: int, path: str = "/ws", **headers: str) -> tuple[int, dict]:
    """A raw WebSocket handshake on ``path`` with ``headers`` (``host`` given or ours):
    the answer's status and, if it is not 101, its JSON body (if any)."""
    fields = {"host": f"127.0.0.1:{port}", **headers}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\n"
                      + "".join(f"{name}: {value}\r\n" for name, value in fields.items())
                      + "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
        status = int(head.split()[1])
        if status == 101:
            return status, {}
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await asyncio.wait_for(reader.readexactly(length), T)
        return status, json.loads(body) if body.startswith(b"{") else {}
    finally:
        writer.close()


async def test_an_ordinary_handshake_is_accepted(server):
    assert await handshake(server.port, origin=f"http://127.0.0.1:{server.port}") == (101, {})


@pytest.mark.parametrize("headers, error", [
    ({"origin": "http://evil.example"}, "origin not allowed"),
    ({"host": "evil.example:1234", "origin": "http://evil.example:1234"}, "host not allowed"),
])
async def test_the_front_door_refuses_before_the_handshake(server, headers, error):
    status, body = await handshake(server.port, **headers)
    assert status == 403 and body["error"].startswith(error)


async def test_a_websocket_elsewhere_than_ws_is_refused(server):
    assert (await handshake(server.port, "/api/messages"))[0] == 403
    assert (await handshake(server.port, "/ws/more"))[0] == 403
    # uvicorn decodes %0A into the path: "/ws\n" is not "/ws" (Starlette's "^/ws$" took it)
    assert (await handshake(server.port, "/ws%0A"))[0] == 403
    assert (await handshake(server.port, "/ws%0a?x=1"))[0] == 403


async def asgi_handshake(app, path: str, root_path: str = "", query: bytes = b"") -> list[str]:
    """The ASGI messages ``app`` sends for a handshake to ``path`` whose client hangs up
    at once (``websocket.close`` before ``accept``: a 403)."""
    sent = []
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1001}]

    async def receive():
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1001}

    async def send(message):
        sent.append(message["type"] + (f"/{message['code']}" if "code" in message else ""))

    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": path,
             "raw_path": path.encode(), "root_path": root_path, "query_string": query,
             "headers": [(b"host", b"127.0.0.1:8000")], "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 5000), "subprotocols": []}
    await asyncio.wait_for(app(scope, receive, send), T)
    return sent


@pytest.mark.parametrize("token", [None, "s3cret"])
async def test_ws_with_a_newline_is_not_ws(token):
    """The raw path ``/ws\n`` too: ``/ws`` is compared exactly, in both modes."""
    from chatlib.app import create_app
    from chatlib.auth import page_path
    from chatlib.hub import Hub
    from chatlib.store import MemoryLog

    app = create_app(Hub(MemoryLog(), Limits()), token=token)
    query = b"token=s3cret" if token else b""  # as a browser's first handshake has it
    assert await asgi_handshake(app, "/ws\n", query=query) == ["websocket.close"]
    if token:
        page = page_path(token)
        assert await asgi_handshake(app, page + "/ws\n", query=query) == ["websocket.close"]
        assert (await asgi_handshake(app, page + "/ws", query=query))[0] == "websocket.accept"


async def test_in_token_mode_ws_with_a_newline_is_refused(start_chat):
    from chatlib.auth import page_path

    server = await start_chat(token="s3cret")
    bearer = {"authorization": "Bearer s3cret"}
    assert (await handshake(server.port, "/ws%0A", **bearer))[0] == 403
    assert (await handshake(server.port, page_path("s3cret") + "/ws%0A", **bearer))[0] == 403


async def test_in_token_mode_ws_is_also_under_the_page_path(start_chat):
    """TokenGate serves every route under the page's path too (its ``root_path``): the
    app routes a handshake by the path below it."""
    from chatlib.auth import page_path

    server = await start_chat(token="s3cret")
    page, bearer = page_path("s3cret"), {"authorization": "Bearer s3cret"}
    assert (await handshake(server.port, "/ws", **bearer))[0] == 101
    assert (await handshake(server.port, page + "/ws", **bearer))[0] == 101
    assert (await handshake(server.port, page + "/ws/more", **bearer))[0] == 403
    assert (await handshake(server.port, page + "ws", **bearer))[0] == 403
    assert (await handshake(server.port, page + "/ws"))[0] == 401


async def test_a_stopping_server_answers_503(server):
    server.hub.closing.set()
    try:
        assert await handshake(server.port) == (503, {"error": "server is stopping"})
    finally:
        server.hub.closing.clear()


@pytest.mark.parametrize("hello", [
    "not json",
    json.dumps({"type": "hello", "user": ""}),
    json.dumps({"type": "hello", "user": "x" * 1000}),
])
async def test_a_bad_hello_gets_an_error_frame_and_1008(server, hello):
    async with ws_connect(server.ws_url) as ws:
        await ws.send(hello)
        frame = wire.loads(await asyncio.wait_for(ws.recv(), T))
        assert frame["type"] == "error"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
    assert ws.close_code == 1008 and ws.close_reason == frame["error"][:120]


async def test_no_hello_in_time_is_closed_with_1008(start_chat):
    server = await start_chat(limits=Limits(hello_timeout=0.3))
    async with ws_connect(server.ws_url) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
    assert ws.close_code == 1008 and ws.close_reason == "no hello within 0.3 s"
