"""A ping flood cannot grow the server, and the hello timeout drops a client that reads
nothing (issue 18: four sockets sending 125-byte pings and reading no pongs grew the
server by 207 MB in 8 s; the hello timeout logged a traceback per socket)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket

from chatlib import Limits

HIGH_WATER = 256 * 1024  # asyncio's default is 64 KiB; one read's pongs may come on top


def ping(payload: bytes = b"x" * 125) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x89, 0x80 | len(payload)]) + mask + masked


async def open_websocket(port: int):
    """A raw WebSocket (handshake done) with a 4 KB receive buffer, as a client that
    reads nothing would leave it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def test_a_ping_flood_that_reads_no_pongs_is_not_read_either(start_chat, caplog):
    caplog.set_level(logging.INFO)
    server = await start_chat(limits=Limits(hello_timeout=2.0))
    reader, writer = await open_websocket(server.port)
    burst = ping() * 500  # 65 KB of pings per write
    loop = asyncio.get_running_loop()
    started, sent, blocked = loop.time(), 0, False
    try:
        while sent < 50_000_000 and loop.time() - started < 20:  # bounded
            writer.write(burst)
            sent += len(burst)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                blocked = True  # the server stopped reading: its kernel buffers filled
                break
        assert blocked, f"the server read all {sent:,} bytes of pings"
        buffered = [c.transport.get_write_buffer_size()
                    for c in server._server.server_state.connections if c.transport]
        assert buffered and max(buffered) <= HIGH_WATER, buffered
        # No hello, and its pongs wait: the hello timeout aborts the connection (RST),
        # since a close frame would wait behind them.
        async with asyncio.timeout(10):
            while server._server.server_state.connections:  # bounded by the timeout
                await asyncio.sleep(0.05)
        try:
            assert await asyncio.wait_for(reader.read(), 5) is not None
        except ConnectionResetError:
            pass
    finally:
        writer.transport.abort()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
