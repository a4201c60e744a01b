"""An idle WebSocket connection holds no writer task (chatlib.ws.Writer): the hub writes
its frames directly, and a writer is started only for a backlog or a close."""

from __future__ import annotations

import asyncio
import gc
import json
import sys

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from chatlib import protocols
from chatlib.closecode import CloseCode

pytestmark = pytest.mark.timeout(60)
T = 10


def writers() -> list[asyncio.Task]:
    return [task for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__name__", "") == "write_frames"]


async def until(predicate) -> None:
    async with asyncio.timeout(T):
        while not predicate():  # bounded by the timeout
            await asyncio.sleep(0.01)


async def receive_until(ws, kind: str) -> dict:
    async with asyncio.timeout(T):
        while True:  # bounded by the timeout
            event = json.loads(await ws.recv())
            if event["type"] == kind:
                return event


async def test_an_idle_websocket_has_no_writer_task_until_it_must_write(server):
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada"}))
        await ws.send(json.dumps({"type": "message", "text": "hi", "client_id": "c1"}))
        await receive_until(ws, "ack")
        await until(lambda: not writers())  # the history's writer ended; none since
        await ws.send(json.dumps({"type": "message", "text": "again", "client_id": "c2"}))
        assert (await receive_until(ws, "message"))["text"] == "again"
        assert (await receive_until(ws, "ack"))["client_id"] == "c2"
        [outbox] = [s for s in server.rooms.subscribers if s.user == "ada"]
        outbox.close(CloseCode.TRY_AGAIN_LATER)  # the hub gives up on it: a writer says so
        with pytest.raises(ConnectionClosed):
            await receive_until(ws, "never")
    assert ws.close_code == CloseCode.TRY_AGAIN_LATER
    await until(lambda: not writers())


def awaiting(task: asyncio.Task) -> list[str]:
    """The coroutines ``task`` is suspended in, outermost first, by qualified name."""
    chain, coro = [], task.get_coro()
    for _ in range(100):  # bounded: a chain of awaits ends
        if coro is None or not hasattr(coro, "cr_code"):
            break
        chain.append(coro.cr_code.co_qualname)
        coro = coro.cr_await
    return chain


async def test_an_idle_websocket_waits_under_few_coroutines(server):
    """Every coroutine between the server and the endpoint lasts as long as the
    connection: only the app's own middleware (chatlib.guard) stays, none of Starlette's."""
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada"}))
        await receive_until(ws, "presence")
        [task] = [task for task in asyncio.all_tasks()
                  if any(name.endswith("WebSocketChat.__call__") for name in awaiting(task))]
        assert awaiting(task) == [
            "WebSocketsSansIOProtocol.run_asgi", "ChatApp.__call__", "Guard.__call__",
            "WebSocketChat.__call__", "WebSocketsSansIOProtocol.receive", "LeanQueue.get"]


async def test_leaving_a_room_while_idle_closes_nothing(server):
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada"}))
        await ws.send(json.dumps({"type": "join", "room": "side"}))
        await receive_until(ws, "joined")
        await until(lambda: not writers())
        await ws.send(json.dumps({"type": "leave", "room": "side"}))
        assert (await receive_until(ws, "left"))["room"] == "side"
        await ws.send(json.dumps({"type": "message", "text": "still here", "client_id": "c"}))
        assert (await receive_until(ws, "ack"))["client_id"] == "c"


@pytest.mark.skipif(protocols.MISSING is not None, reason="uvicorn's own protocols in use")
async def test_the_protocol_keeps_a_compact_attribute_dict(server):
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada"}))
        await receive_until(ws, "presence")  # a writer made its sink: the last attribute
        [protocol] = [obj for obj in gc.get_objects()
                      if type(obj) is protocols.BoundedWebSocketProtocol]
        attributes = vars(protocol)
        assert sys.getsizeof(attributes) == sys.getsizeof(dict(attributes))
        del protocol, attributes
