"""A WebSocket message may come in at most MAX_FRAGMENTS frames (issue 18: messages sent one
byte per continuation frame let two connections saturate a core; bystander p50 0.9 ->
8.8 ms). Past the budget the connection is closed with 1008, saying why."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time

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


async def test_a_burst_of_1_byte_frames_never_holds_the_loop_long(server):
    """A read brings up to 256 KiB; websockets parsed it in one go, ~37,000 1-byte frames
    while every other client waited (bystander p50 129 ms under two such floods). Now a
    read is parsed READ_SLICE bytes per loop step. Measured in this thread's CPU time
    between two steps of a ticker on the server's loop (the client here shares it), which
    a loaded machine's scheduler does not inflate as it does wall-clock time."""
    reader, writer = await open_websocket(server.port)
    writer.write(text_frame(json.dumps({"type": "hello", "user": "frag"})))
    message = b"".join([frame(0x1, b"x", fin=False)]
                       + [frame(0x0, b"x", fin=False)] * (MAX_FRAGMENTS - 2)
                       + [frame(0x0, b"x", fin=True)])  # within the budget: invalid JSON
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.thread_time()
        for _ in range(10**7):  # bounded; ends at stop
            await asyncio.sleep(0)
            now = time.thread_time()
            gaps.append(now - last)
            last = now
            if stop.is_set():
                return

    ticker = asyncio.ensure_future(tick())
    try:
        writer.write(message * 30)  # ~210 KB in one write: the server reads it at once
        errors = 0
        async with asyncio.timeout(30):
            while errors < 30:  # one error frame per message, bounded by the timeout
                head = await reader.readexactly(2)
                body = await reader.readexactly(head[1] & 0x7F)
                errors += b'"error"' in body
    finally:
        stop.set()
        await ticker
        writer.transport.abort()
    assert max(gaps) < 0.025, f"the loop was held {max(gaps) * 1000:.0f} ms of CPU"
