"""The stuck-client rule covers every HTTP response, not only WebSocket and SSE (issue 18:
100 sockets with a 4 KB receive buffer that asked for a 500-message page of emoji and
never read held 115 MB of the server and 267 MB of kernel buffers for over 75 s)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from helpers import server_side_states

from chatlib import Limits
from chatlib.protocols import BoundedH11Protocol


async def test_a_response_nobody_reads_is_reset_after_the_stuck_timeout(start_chat):
    server = await start_chat(limits=Limits(stuck_timeout=1.0, history=1000))
    for _ in range(1000):  # one page: ~8 MB, more than the kernel's buffers take
        await server.hub.post("bob", "\U0001f600" * 2000)
    streams = []
    for _ in range(5):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET /api/messages?after=1 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}"
                     "\r\n\r\n".encode())
        await writer.drain()
        streams.append((reader, writer))

    def http_connections() -> list:
        return [c for c in server._server.server_state.connections
                if isinstance(c, BoundedH11Protocol)]

    try:
        async with asyncio.timeout(10):
            while len(http_connections()) < 5:  # all five asked
                await asyncio.sleep(0.05)
        async with asyncio.timeout(15):  # the stuck timeout and some slack
            while http_connections():  # bounded by the timeout
                await asyncio.sleep(0.1)
    finally:
        for _, writer in streams:
            writer.transport.abort()


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
async def test_an_unread_response_that_fits_in_kernel_buffers_is_reset(start_chat, connection):
    """A page small enough for the kernel's buffers never passes asyncio's high-water mark:
    it used to wait there, then a FIN queued behind it (at the keep-alive timeout, or at
    once after a ``Connection: close`` answer) held the connection in FIN-WAIT-1 for
    minutes (about 100 s of zero-window probes) for a client that never reads."""
    server = await start_chat(limits=Limits(stuck_timeout=1.0))
    for _ in range(40):  # one page of ~200 KB
        await server.hub.post("bob", "\U0001f600" * 1000)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    port = sock.getsockname()[1]
    try:
        writer.write(f"GET /api/messages?after=0 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}"
                     f"\r\nConnection: {connection}\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(20):  # the stuck timeout, a sweep, and load
            while server_side_states(server.port, {port}) != {}:  # bounded by the timeout
                await asyncio.sleep(0.1)
        with pytest.raises(ConnectionResetError):  # reset, not ended
            async with asyncio.timeout(10):
                while await reader.read(65536):  # bounded by the timeout and the reset
                    pass
    finally:
        writer.transport.abort()
