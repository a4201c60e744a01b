"""A WebSocket client that stops reading is reset even when what it was sent fits in the
kernel's buffers (issue 18: the watch looked only at asyncio's buffer, never fired, and
the connection ended in a FIN with 14.4 MB in FIN-WAIT-1 for 340 s)."""

from __future__ import annotations

import asyncio
import json
import os

from test_ping_flood import open_websocket

from chatlib import Limits
from chatlib.fastpath import unsent_bytes
from chatlib.protocols import BoundedWebSocketProtocol


def text_frame(text: str) -> bytes:
    payload, mask = text.encode(), os.urandom(4)
    return (bytes([0x81, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


async def test_a_reader_that_stops_is_reset_when_its_bytes_sit_in_the_kernel(start_chat):
    server = await start_chat(limits=Limits(stuck_timeout=1.0, rate=1e6, burst=10**6,
                                            address_rate=1e6, address_burst=10**6))
    reader, writer = await open_websocket(server.port)  # a 4 KB receive buffer, never read
    try:
        writer.write(text_frame(json.dumps({"type": "hello", "user": "stuck"})))
        await writer.drain()
        [connection] = [c for c in server._server.server_state.connections
                        if isinstance(c, BoundedWebSocketProtocol)]
        transport = connection.transport
        async with asyncio.timeout(10):
            while "stuck" not in server.hub.presence.users():  # its hello is in
                await asyncio.sleep(0.01)
        # Posted in-process: 300 HTTP POSTs took over stuck_timeout on a loaded machine,
        # and the client was reset before the checks below could see its bytes wait.
        for i in range(300):  # ~600 KB: the kernel buffers take it
            await server.hub.post("bob", f"{i:04d}" + "x" * 1990)
        async with asyncio.timeout(10):
            while transport.get_write_buffer_size():  # asyncio's buffer drains ...
                await asyncio.sleep(0.05)
        assert unsent_bytes(transport) > 0  # ... into the kernel's, where it waits
        async with asyncio.timeout(15):  # stuck_timeout, a few sweeps
            while not transport.is_closing():
                await asyncio.sleep(0.05)
    finally:
        writer.transport.abort()
