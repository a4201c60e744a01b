"""A WebSocket message may come in at most MAX_FRAGMENTS frames (issue 18: messages sent one
byte per continuation frame let two connections saturate a core; bystander p50 0.9 ->
8.8 ms). Past the budget the connection is closed with 1008, saying why."""

from __future__ import annotations

import asyncio
import json
import os
import struct

from test_ping_flood import open_websocket
from test_stuck_kernel import text_frame

from chatlib.limits import MAX_FRAGMENTS


def frame(opcode: int, payload: bytes, fin: bool) -> bytes:
    mask = os.urandom(4)
    return (bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


async def read_close(reader) -> tuple[int, bytes]:
    """The first close frame the server sends (skipping other frames)."""
    async with asyncio.timeout(10):
        for _ in range(10_000):  # bounded
            head = await reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(length)
            if head[0] & 0x0F == 0x8:
                return struct.unpack("!H", payload[:2])[0], payload[2:]
    raise AssertionError("no close frame")


async def test_a_message_in_too_many_frames_is_closed_with_1008(server):
    reader, writer = await open_websocket(server.port)
    try:
        writer.write(text_frame(json.dumps({"type": "hello", "user": "frag"})))
        pieces = [frame(0x1, b"{", fin=False)]
        pieces += [frame(0x0, b" ", fin=False) for _ in range(MAX_FRAGMENTS + 10)]
        writer.write(b"".join(pieces))
        await writer.drain()
        code, reason = await read_close(reader)
        assert code == 1008 and b"frames in one message" in reason
    finally:
        writer.transport.abort()


async def test_a_message_in_a_few_frames_still_arrives(server, make_client):
    reader_client = await make_client("ws", server, "reader")
    reader, writer = await open_websocket(server.port)
    try:
        writer.write(text_frame(json.dumps({"type": "hello", "user": "frag"})))
        data = json.dumps({"type": "message", "text": "in pieces"}).encode()
        pieces = [frame(0x1 if i == 0 else 0x0, data[i:i + 1], fin=i == len(data) - 1)
                  for i in range(len(data))]
        writer.write(b"".join(pieces))
        await writer.drain()
        assert (await reader_client.receive(timeout=10)).text == "in pieces"
    finally:
        writer.transport.abort()
