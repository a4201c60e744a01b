"""A log that goes back (Redis FLUSHALL, a new Redis on the same URL): every transport on
every process is told to reset (issue 18).

Before, POSTs got 201 with ids from 1 again, and connected WebSocket and SSE clients on
every process received nothing (the followers waited for ids past the old cursor: 7,925
messages in the report); only pollers were told. Now the follower notices the id counter
below its cursor, the hub closes its push clients with 1012 (restarting), and each
reconnects with its cursor, which is past the new log's end: ``reset``, then the new log.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from chatlib.closecode import CloseCode
from chatlib.store import DEFAULT_ROOM

T = 20.0


async def receive_across_reconnects(client, timeout: float = T):
    """The next message, reconnecting (as the page does) when the server closes."""
    closed_with = []
    async with asyncio.timeout(timeout):
        for _ in range(20):  # bounded: a few reconnects at most
            try:
                return await client.receive(), closed_with
            except ConnectionClosed as exc:
                closed_with.append(exc.rcvd.code if exc.rcvd else None)
            except (ConnectionError, httpx.HTTPError) as exc:
                closed_with.append(type(exc).__name__)
            await client.close()
            await client.connect()
    raise AssertionError("no message after 20 reconnects")


@pytest.mark.parametrize("room", [DEFAULT_ROOM, "lab"])
async def test_flushall_resets_every_transport_on_every_process(
        redis_server, start_chat, make_log, make_client, room):
    """In any room: each room's follower notices its own counter went back."""
    one = await start_chat(log=make_log(block=0.5))
    two = await start_chat(log=make_log(block=0.5))
    clients = [await make_client("ws", one, "ws-one", room=room),
               await make_client("sse", two, "sse-two", room=room),
               await make_client("ws", two, "ws-two", room=room),
               await make_client("longpoll", one, "lp-one", wait=0.5, room=room)]
    params = {} if room == DEFAULT_ROOM else {"room": room}
    async with httpx.AsyncClient() as http:
        for i in range(5):
            response = await http.post((one, two)[i % 2].url + "api/messages", params=params,
                                       json={"user": "ann", "text": f"before {i}"})
            assert response.status_code == 201
        for client in clients:
            assert [m.id for m in await client.receive_many(5, timeout=T)] == [1, 2, 3, 4, 5]
        admin = aioredis.Redis.from_url(redis_server.url)
        try:
            await admin.flushall()
        finally:
            await admin.aclose()
        after = await http.post(two.url + "api/messages", params=params,
                                json={"user": "ann", "text": "after"})
        assert after.status_code == 201 and after.json()["id"] == 1  # the ids started again
    for client in clients:
        message, closed_with = await receive_across_reconnects(client)
        assert (message.id, message.text) == (1, "after"), client.user
        assert client.resets == 1, client.user
        if client.transport == "ws":
            assert closed_with == [CloseCode.SERVICE_RESTART], client.user


async def test_an_emptied_sqlite_file_resets_connected_clients(tmp_path, start_chat,
                                                                make_client):
    import sqlite3

    from chatlib import SQLiteLog

    log = SQLiteLog(tmp_path / "chat.db")
    try:
        server = await start_chat(log=log)
        clients = [await make_client("ws", server, "ws"), await make_client("sse", server, "sse")]
        async with httpx.AsyncClient() as http:
            for i in range(3):
                await http.post(server.url + "api/messages", json={"user": "a", "text": str(i)})
            for client in clients:
                assert len(await client.receive_many(3, timeout=T)) == 3
            emptier = sqlite3.connect(tmp_path / "chat.db", isolation_level=None)
            emptier.execute("DELETE FROM messages")
            emptier.execute("DELETE FROM sqlite_sequence")  # the ids start again at 1
            emptier.close()
            after = await http.post(server.url + "api/messages",
                                    json={"user": "a", "text": "after"})
            assert after.json()["id"] == 1
        for client in clients:
            message, _ = await receive_across_reconnects(client)
            assert (message.id, message.text, client.resets) == (1, "after", 1)
    finally:
        await log.close()
