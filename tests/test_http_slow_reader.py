"""The stuck-client rule covers every HTTP response, not only WebSocket and SSE (issue 18:
100 sockets with a 4 KB receive buffer that asked for a 500-message page of emoji and
never read held 115 MB of the server and 267 MB of kernel buffers for over 75 s)."""

from __future__ import annotations

import asyncio
import socket

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
