"""Shared fixtures: real chat servers on 127.0.0.1 (ephemeral ports) and clients for them.

Every server and client a fixture hands out is stopped / closed when the test ends, even
when it fails. Nothing here sleeps for correctness: helpers wait on events with timeouts.

* ``limits``: the :class:`chatlib.Limits` the ``server`` fixture uses. Override it in a
  module (``@pytest.fixture def limits(): ...``) or per test with
  ``@pytest.mark.parametrize("limits", [Limits(...)])``.
* ``server``: a started :class:`chatlib.ChatServer` (port 0).
* ``start_chat``: ``await start_chat(limits=Limits(...), log=..., **options)`` starts
  another server, stopped at teardown.
* ``make_client``: ``await make_client("ws", server, "ada", after=0, **options)`` opens a
  client of one transport (``"poll"``, ``"longpoll"``, ``"sse"``, ``"ws"``), closed at
  teardown. Polling clients poll quickly so tests stay fast. A WebSocket client is
  returned once the server has processed its hello (its user shows in
  ``/api/presence``), so typing and presence events sent afterwards reach it; pass
  ``ready=False`` to skip that wait.
* ``chromium``: a headless Chromium browser (Playwright), closed at teardown.
* ``http``: an ``httpx.AsyncClient`` (no base URL; pass ``server.url + "api/..."``).
* ``raw_http``: ``await raw_http(port, b"GET / HTTP/1.1\\r\\n...")`` sends bytes exactly as
  given (no URL normalisation) and returns ``(status, headers, body)``.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from helpers import shut_down
from log_fixtures import every_log, make_any_log  # noqa: F401 (fixtures: every log)
from redis_fixtures import make_log, redis_server  # noqa: F401 (fixtures: tests/test_redis*.py)

from chatlib import (
    ChatServer,
    Limits,
    LongPollClient,
    MemoryLog,
    PollingClient,
    SQLiteLog,
    SSEClient,
    WebSocketClient,
)
from chatlib.browser import launch, unavailable

TRANSPORTS = ("poll", "longpoll", "sse", "ws")
"""Every client transport, by the ``transport`` name of its client class."""

CLIENT_CLASSES = {
    "poll": PollingClient,
    "longpoll": LongPollClient,
    "sse": SSEClient,
    "ws": WebSocketClient,
}

# Defaults that keep pull clients quick in tests (a short poll interval, a long poll that
# is answered by the next message long before it times out).
CLIENT_DEFAULTS = {
    "poll": {"interval": 0.02},
    "longpoll": {"wait": 5.0},
    "sse": {},
    "ws": {},
}


@pytest.fixture
def limits() -> Limits:
    """The limits of the ``server`` fixture (override per module or parametrise)."""
    return Limits()


@pytest.fixture
async def start_chat():
    """A factory that starts chat servers on ephemeral ports and stops them all at teardown."""
    servers: list[ChatServer] = []

    async def start(*, limits: Limits | None = None, port: int = 0, **options) -> ChatServer:
        server = ChatServer("127.0.0.1", port, limits=limits or Limits(), **options)
        servers.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        await shut_down(servers, "stop", 20)


@pytest.fixture(params=["memory", "sqlite"])
async def log(request, tmp_path):
    """Each message store in turn: the same tests run against both."""
    store = MemoryLog() if request.param == "memory" else SQLiteLog(tmp_path / "chat.db")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def server(start_chat, limits: Limits) -> ChatServer:
    """A started chat server on 127.0.0.1 with an ephemeral port (stopped at teardown)."""
    return await start_chat(limits=limits)


@pytest.fixture
async def chromium():
    """A headless Chromium (chatlib.browser.launch), closed at teardown; the test is skipped
    where none starts (chatlib.browser.unavailable)."""
    if reason := unavailable():
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await launch(p)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def make_client():
    """A factory for connected clients of any transport, all closed at teardown."""
    clients = []

    async def make(transport: str, server_or_url, user: str, *, ready: bool = True,
                   **options):
        url = getattr(server_or_url, "url", server_or_url)
        cls = CLIENT_CLASSES[transport]
        client = cls(url, user, **{**CLIENT_DEFAULTS[transport], **options})
        clients.append(client)
        await client.connect()
        if ready and transport == "ws":
            await wait_present(client.url, user, options.get("room"))
        return client

    try:
        yield make
    finally:
        await shut_down(clients, "close", 5)


async def wait_present(url: str, user: str, room: str | None = None,
                       timeout: float = 10.0) -> None:
    """Wait until ``user`` shows in the presence list of ``room`` (None: the default room)
    of the server at ``url``."""
    async with httpx.AsyncClient() as http, asyncio.timeout(timeout):
        while True:  # bounded by the timeout
            response = await http.get(url.rstrip("/") + "/api/presence",
                                      params={"room": room} if room else {})
            if user in response.json()["users"]:
                return
            await asyncio.sleep(0.005)


@pytest.fixture
async def http():
    """A plain async HTTP client (no Origin header), closed at teardown."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        yield client


async def send_raw_http(port: int, data: bytes, *, timeout: float = 10.0,
                        head_only: bool = False):
    """Send ``data`` as is on a new TCP connection; parse the first response.

    Returns ``(status, headers, body)`` with lower-case header names; ``(None, {}, b"")``
    if the server closed the connection without answering. ``head_only`` skips the body
    (for a response that never ends, such as an event stream); a ``101`` has none.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return None, {}, b""
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if head_only or status == 101:
                body = b""
            elif "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = await reader.read()
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@pytest.fixture
def raw_http():
    """``await raw_http(port, data)``: see :func:`send_raw_http`."""
    return send_raw_http
