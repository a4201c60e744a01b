"""A history replay stops at the first sign that its connection is gone (issue 18: a
client that said hello and reset its socket had its history written into the dead
transport, one "socket.send() raised exception." line per message)."""

from __future__ import annotations

import asyncio
import json
import logging

from test_ping_flood import open_websocket
from test_stuck_kernel import text_frame

from chatlib import Limits


async def test_a_replay_writes_nothing_after_the_connection_is_reset(start_chat, caplog,
                                                                      monkeypatch):
    caplog.set_level(logging.WARNING)
    server = await start_chat(limits=Limits(history=500))
    hub = server.hub
    for i in range(1000):
        await hub.post("bob", f"{i}" + "x" * 200)
    connections = server._server.server_state.connections
    read_page = hub.log.after
    reset = asyncio.Event()

    async def after(after_id: int, limit: int = 1000):
        page = await read_page(after_id, limit)
        if after_id == 1 and not reset.is_set():
            # The reset is found as the replay reads its first page (as when the peer's RST
            # is read on the same turn): asyncio marks the transport closing at once and
            # calls connection_lost only on a later turn, so uvicorn still looks connected.
            for connection in list(connections):
                connection.transport.abort()
            reset.set()
        return page

    monkeypatch.setattr(hub.log, "after", after)
    reader, writer = await open_websocket(server.port)
    try:
        writer.write(text_frame(json.dumps({"type": "hello", "user": "dead", "after": 1})))
        await writer.drain()
        await asyncio.wait_for(reset.wait(), 10)
        async with asyncio.timeout(10):  # the reader leaves, and takes its writer with it
            while hub.subscribers or any(getattr(task.get_coro(), "__name__", "") == "write_frames"
                                         for task in asyncio.all_tasks()):
                await asyncio.sleep(0.01)
    finally:
        writer.transport.abort()
    written_dead = [r for r in caplog.records if "socket.send() raised" in r.getMessage()]
    assert written_dead == [] and "WebSocket writer failed" not in caplog.text
