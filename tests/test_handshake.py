"""Tests for chatlib.handshake: the RFC example, exact request bytes, response parsing and
checks, agreement with `websockets`, and open_raw against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import doctest
import string
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import websockets.utils
from helpers import free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request
from websockets.server import ServerProtocol

from chatlib import handshake
from chatlib.frames import (
    CloseCode,
    Frame,
    Opcode,
    close_payload,
    encode,
    new_mask_key,
    parse_close,
    read_frame,
    text,
)
from chatlib.handshake import (
    GUID,
    MAX_HEAD_SIZE,
    HandshakeError,
    Response,
    accept_key,
    build_upgrade_request,
    check_accept,
    new_key,
    open_raw,
    parse_response,
)

SETTINGS = settings(max_examples=200, deadline=None)
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# --- keys ---------------------------------------------------------------------------------


def test_rfc_accept_example() -> None:
    assert GUID == "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    assert accept_key(RFC_KEY) == RFC_ACCEPT


def test_doctests() -> None:
    result = doctest.testmod(handshake)
    assert result.attempted >= 3
    assert result.failed == 0


@given(raw=st.binary(min_size=16, max_size=16))
@SETTINGS
def test_accept_key_agrees_with_websockets(raw: bytes) -> None:
    key = base64.b64encode(raw).decode()
    assert accept_key(key) == websockets.utils.accept_key(key)


@given(key=st.text(max_size=40))
@SETTINGS
def test_accept_key_agrees_with_websockets_on_any_text(key: str) -> None:
    assert accept_key(key) == websockets.utils.accept_key(key)


def test_new_key() -> None:
    keys = {new_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert len(key) == 24
        assert len(base64.b64decode(key, validate=True)) == 16


# --- the request --------------------------------------------------------------------------


def test_build_upgrade_request_exact_bytes() -> None:
    assert build_upgrade_request("127.0.0.1:8000", key=RFC_KEY) == (
        b"GET /ws HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8000\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"\r\n"
    )


def test_build_upgrade_request_with_origin_and_extra() -> None:
    request = build_upgrade_request(
        "example.com",
        "/chat?room=1",
        key=RFC_KEY,
        origin="http://example.com",
        extra={"sec-websocket-version": "8", "User-Agent": "notebook"},
    )
    assert request == (
        b"GET /chat?room=1 HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"sec-websocket-version: 8\r\n"  # replaced in place, with the caller's spelling
        b"Origin: http://example.com\r\n"
        b"User-Agent: notebook\r\n"
        b"\r\n"
    )


def test_build_upgrade_request_makes_a_key() -> None:
    request = build_upgrade_request("localhost")
    (line,) = [x for x in request.split(b"\r\n") if x.startswith(b"Sec-WebSocket-Key: ")]
    assert len(base64.b64decode(line.split(b": ")[1])) == 16


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "localhost\r\nX-Evil: 1"},
        {"host": "localhost", "origin": "http://a\nb"},
        {"host": "localhost", "extra": {"X-Ok": "a\r\n\r\nGET / HTTP/1.1"}},
        {"host": "localhost", "extra": {"X Bad": "1"}},
        {"host": "localhost", "extra": {"X-Bad:": "1"}},
        {"host": "localhost", "extra": {"X-Nul": "a\x00b"}},
        {"host": "localhost", "path": "ws"},
        {"host": "localhost", "path": "/a b"},
        {"host": "localhost", "path": "/é"},
        {"host": "héllo"},
        {"host": "localhost", "key": "abc\r\n"},
    ],
)
def test_build_upgrade_request_refuses_injection(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_upgrade_request(**kwargs)


hosts = st.sampled_from(["localhost", "127.0.0.1:8000", "[::1]:9000", "example.com"])
paths = st.text(string.ascii_letters + string.digits + "/?=&-._~%", max_size=30).map(
    lambda s: "/" + s
)


@given(host=hosts, path=paths, raw_key=st.binary(min_size=16, max_size=16))
@SETTINGS
def test_websockets_server_accepts_our_request(host: str, path: str, raw_key: bytes) -> None:
    """websockets' sans-I/O server parses our bytes and answers 101; we then check it."""
    key = base64.b64encode(raw_key).decode()
    server = ServerProtocol()
    server.receive_data(build_upgrade_request(host, path, key=key, origin="http://x"))
    [request] = server.events_received()
    assert isinstance(request, Request)
    assert request.path == path
    assert request.headers["Host"] == host
    assert request.headers["Origin"] == "http://x"
    server.send_response(server.accept(request))
    [answer] = server.data_to_send()
    response = parse_response(answer)
    assert response.status == 101
    assert response.headers["sec-websocket-accept"] == accept_key(key)
    check_accept(response, key)


# --- parsing and checking the response ----------------------------------------------------

GOOD = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"\r\n"
)


def test_parse_response() -> None:
    response = parse_response(GOOD + b"\x81\x02hi")
    assert response == Response(
        101,
        "Switching Protocols",
        {
            "upgrade": "websocket",
            "connection": "Upgrade",
            "sec-websocket-accept": RFC_ACCEPT,
        },
        b"\x81\x02hi",
    )
    check_accept(response, RFC_KEY)


def test_parse_response_details() -> None:
    response = parse_response(
        b"HTTP/1.0 403 \r\nX-A: 1\r\nx-a:  2 \r\nEmpty:\r\nContent-Length: 4\r\n\r\nnope"
    )
    assert response.status == 403
    assert response.reason == ""
    assert response.headers == {"x-a": "1, 2", "empty": "", "content-length": "4"}
    assert response.body == b"nope"
    assert parse_response(b"HTTP/1.1 204\r\n\r\n").reason == ""
    assert parse_response(b"HTTP/1.1 200 OK\r\nX: caf\xe9\r\n\r\n").headers["x"] == "caf\xe9"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n", "incomplete"),
        (b"HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\n\n", "CRLF"),
        (b"HTTP/1.1 1O1 Switching\r\n\r\n", "status line"),
        (b"HTTP/2.0 101 Switching\r\n\r\n", "status line"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "status line"),
        (b"HTTP/1.1 101 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 101 OK\r\nBad Name: x\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 101 OK\r\nX: a\nb\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 101 OK\r\nX: a\r\n  folded\r\n\r\n", "folding"),
    ],
)
def test_parse_response_errors(data: bytes, message: str) -> None:
    with pytest.raises(HandshakeError, match=message):
        parse_response(data)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "got 403 Forbidden"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "expected status 101"),
        (GOOD.replace(b"Upgrade: websocket", b"Upgrade: h2c"), "Upgrade: websocket"),
        (GOOD.replace(b"Connection: Upgrade", b"Connection: close"), "Connection: Upgrade"),
        (GOOD.replace(b"Sec-WebSocket-Accept", b"X-Accept"), "missing Sec-WebSocket-Accept"),
        (GOOD.replace(RFC_ACCEPT.encode(), b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="), "expected"),
        (GOOD.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Accept: x\r\n\r\n"), "expected"),
    ],
)
def test_check_accept_errors(data: bytes, message: str) -> None:
    response = parse_response(data)
    with pytest.raises(HandshakeError, match=message) as info:
        check_accept(response, RFC_KEY)
    assert info.value.response is response


def test_check_accept_is_case_insensitive_where_http_is() -> None:
    response = parse_response(
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"upgrade: WebSocket\r\n"
        b"connection: keep-alive, upgrade\r\n"
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"\r\n"
    )
    check_accept(response, RFC_KEY)
    with pytest.raises(HandshakeError):
        check_accept(response, new_key())  # the wrong key


# --- open_raw against real servers --------------------------------------------------------


async def echo(connection: ServerConnection) -> None:
    async for message in connection:
        await connection.send(message)


def port_of(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]


async def test_open_raw_against_websockets() -> None:
    async with serve(echo, "127.0.0.1", 0) as server:
        key = new_key()
        reader, writer, response = await open_raw("127.0.0.1", port_of(server), key=key)
        try:
            assert response.status == 101
            assert response.headers["sec-websocket-accept"] == accept_key(key)
            assert response.body == b""

            # A hand-made, masked text frame; the echo comes back unmasked.
            writer.write(text("Hello, raw socket ✓", mask_key=new_mask_key()))
            echoed = await asyncio.wait_for(read_frame(reader, masked=False), 5)
            assert echoed == Frame(Opcode.TEXT, "Hello, raw socket ✓".encode())

            writer.write(encode(Frame(Opcode.PING, b"are you there?"), mask_key=new_mask_key()))
            pong = await asyncio.wait_for(read_frame(reader, masked=False), 5)
            assert pong == Frame(Opcode.PONG, b"are you there?")

            # Closing handshake: our CLOSE, then the server's, echoing the code.
            closing = Frame(Opcode.CLOSE, close_payload(CloseCode.NORMAL, "bye"))
            writer.write(encode(closing, mask_key=new_mask_key()))
            reply = await asyncio.wait_for(read_frame(reader, masked=False), 5)
            assert reply.opcode is Opcode.CLOSE
            assert parse_close(reply.payload) == (CloseCode.NORMAL, "bye")
        finally:
            writer.close()
            await writer.wait_closed()


async def test_websockets_closes_on_an_unmasked_client_frame() -> None:
    async with serve(echo, "127.0.0.1", 0) as server:
        reader, writer, _ = await open_raw("127.0.0.1", port_of(server))
        try:
            writer.write(text("not masked", mask_key=None))
            reply = await asyncio.wait_for(read_frame(reader, masked=False), 5)
            assert reply.opcode is Opcode.CLOSE
            code, _ = parse_close(reply.payload)
            assert code == CloseCode.PROTOCOL_ERROR
        finally:
            writer.close()
            await writer.wait_closed()


async def test_open_raw_with_a_refused_origin() -> None:
    async with serve(echo, "127.0.0.1", 0, origins=["http://good.example"]) as server:
        port = port_of(server)
        reader, writer, _ = await open_raw("127.0.0.1", port, origin="http://good.example")
        writer.close()
        await writer.wait_closed()
        with pytest.raises(HandshakeError, match="403") as info:
            await open_raw("127.0.0.1", port, origin="http://evil.example")
        assert info.value.response is not None
        assert info.value.response.status == 403


@contextlib.asynccontextmanager
async def fake_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A bare TCP server on 127.0.0.1 running ``handle`` per connection; yields its port.

    On exit, waits (a bounded time) for the handlers to finish, then closes everything.
    """
    tasks: list[asyncio.Task] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(handle(reader, writer), 5)
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield port_of(server)
    finally:
        server.close()
        await server.wait_closed()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


async def read_request(reader: asyncio.StreamReader) -> str:
    """Read the client's request head; return its Sec-WebSocket-Key."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("sec-websocket-key:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no key in request")


async def test_open_raw_keeps_frames_sent_right_after_the_101() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = await read_request(reader)
        # Head and first frame in a single write, so they arrive in one TCP segment.
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_key(key).encode()
            + b"\r\n\r\n"
            + text("welcome", mask_key=None)
        )
        await reader.read()  # until the client closes

    async with fake_server(handle) as port:
        reader, writer, response = await open_raw("127.0.0.1", port)
        try:
            assert response.body == b""  # the frame was not swallowed into the response...
            frame = await asyncio.wait_for(read_frame(reader, masked=False), 5)
            assert frame == Frame(Opcode.TEXT, b"welcome")  # ...it is still in the reader
        finally:
            writer.close()
            await writer.wait_closed()


async def test_open_raw_refuses_a_wrong_accept() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(GOOD)  # the RFC's accept value, for the RFC's key: not ours
        await reader.read()

    async with fake_server(handle) as port:
        with pytest.raises(HandshakeError, match="Sec-WebSocket-Accept"):
            await open_raw("127.0.0.1", port)


async def test_open_raw_bounds_the_response_head() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n")
        for i in range(MAX_HEAD_SIZE // 10):  # far more than MAX_HEAD_SIZE, never a blank line
            writer.write(b"X-Junk-%d: %s\r\n" % (i, b"x" * 20))
        await reader.read()

    async with fake_server(handle) as port:
        with pytest.raises(HandshakeError, match="longer than"):
            await open_raw("127.0.0.1", port)


async def test_open_raw_times_out() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # say nothing; return when the client gives up and closes

    async with fake_server(handle) as port:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError, match="within 0.2 s"):
            await open_raw("127.0.0.1", port, timeout=0.2)
        assert loop.time() - start < 2


async def test_open_raw_when_the_server_hangs_up() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switch")  # then close, mid-line

    async with fake_server(handle) as port:
        with pytest.raises(HandshakeError, match="connection closed"):
            await open_raw("127.0.0.1", port)


async def test_open_raw_connection_refused() -> None:
    # A port that was free a moment ago: nothing listens there now.
    port = free_port()
    with pytest.raises(OSError):
        await open_raw("127.0.0.1", port, timeout=2)


def test_host_header() -> None:
    assert handshake._host_header("127.0.0.1", 80) == "127.0.0.1:80"
    assert handshake._host_header("::1", 8000) == "[::1]:8000"
    assert handshake._host_header("[::1]", 8000) == "[::1]:8000"
