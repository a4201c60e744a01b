"""Faults of a Redis-backed chat, each provoked for real: Redis restarts under connected
clients, a server process is SIGKILLed, Redis answers slowly.

What must hold in every case: a message the server accepted (201, or an echo on the
WebSocket) reaches every client exactly once, in id order, with no gap; a message the
server could not store is refused with a clear 503, never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from redis_fixtures import recording, until

from chatlib import netem
from chatlib.clients import ChatRefused
from chatlib.cluster import ChatProcess


async def post(http: httpx.AsyncClient, server, user: str, text: str) -> httpx.Response:
    return await http.post(server.url + "api/messages", json={"user": user, "text": text})


async def test_redis_restart_refuses_posts_clearly_then_loses_nothing(
        redis_server, start_chat, make_log, make_client):
    one = await start_chat(log=make_log())
    two = await start_chat(log=make_log())
    clients = [await make_client("ws", one, "ws1"), await make_client("sse", two, "sse2"),
               await make_client("longpoll", two, "lp2"), await make_client("poll", one, "p1")]
    wire_ids = [recording(client) for client in clients]
    accepted: list[str] = []
    async with httpx.AsyncClient() as http:
        for i in range(4):
            response = await post(http, (one, two)[i % 2], "ada", f"before {i}")
            assert response.status_code == 201
            accepted.append(f"before {i}")

        redis_server.kill()  # the harshest stop; appendfsync always kept every write
        for server in (one, two):
            response = await post(http, server, "ada", "during the outage")
            assert response.status_code == 503, response.text
            assert "unavailable" in response.json()["error"]
        with pytest.raises(ChatRefused, match="unavailable"):  # the same, by WebSocket
            await clients[0].send("during the outage, by WebSocket")

        await redis_server.start()  # same port, same data directory
        for i in range(4):
            for _ in range(50):  # a 503 stored nothing: try again, as a client would
                response = await post(http, (two, one)[i % 2], "ada", f"after {i}")
                if response.status_code != 503:
                    break
                await asyncio.sleep(0.1)
            assert response.status_code == 201, response.text
            accepted.append(f"after {i}")
        assert (response.json())["id"] == 8  # the counter survived: no id reused

    for client, ids in zip(clients, wire_ids, strict=True):
        got = await client.receive_many(len(accepted), timeout=20)
        assert [m.text for m in got] == accepted, client
        assert [m.id for m in got] == list(range(1, 9))
        assert ids == sorted(set(ids)), f"{client} got a message twice: {ids}"
    # Each follower lost its connections to Redis and came back by itself.
    assert all(server.log.reconnects >= 1 for server in (one, two))


async def test_a_killed_process_clients_resume_on_another(redis_server, make_client):
    doomed = await ChatProcess(redis_server.url).start()
    survivor = await ChatProcess(redis_server.url).start()
    try:
        clients = [await make_client("ws", doomed, "ws-d"),
                   await make_client("sse", doomed, "sse-d"),
                   await make_client("longpoll", doomed, "lp-d")]
        watcher = await make_client("ws", survivor, "watcher")
        wire_ids = [recording(client) for client in [*clients, watcher]]
        async with httpx.AsyncClient() as http:
            for i in range(5):
                assert (await post(http, survivor, "bob", f"m{i}")).status_code == 201
            for client in clients:
                assert [m.id for m in await client.receive_many(5, timeout=20)] == [
                    1, 2, 3, 4, 5]

            doomed.kill()  # SIGKILL: no goodbye, its presence key just stops being refreshed
            for i in range(5, 10):
                assert (await post(http, survivor, "bob", f"m{i}")).status_code == 201

            async def gone() -> bool:
                users = (await http.get(survivor.url + "api/presence")).json()["users"]
                return not {"ws-d", "sse-d", "lp-d"} & set(users)

            await until(gone, timeout=20, what="the dead process's users drop out")

        for client in clients:  # fail over, resuming after the last id each one saw
            client.url = survivor.url
            with contextlib.suppress(Exception):
                await client.close()
            await client.connect()
        for client in [*clients, watcher]:
            got = await client.receive_many(5 if client is not watcher else 10, timeout=20)
            assert got[-1].id == 10 and got[-1].text == "m9"
        for client, ids in zip([*clients, watcher], wire_ids, strict=True):
            assert ids == list(range(1, 11)), f"{client.user}: {ids}"  # nothing lost or doubled
    finally:
        doomed.kill()
        await survivor.stop()


async def test_a_slow_redis_does_not_stall_the_server(redis_server, start_chat, make_log,
                                                      make_client):
    # Every byte to and from this server's Redis is delayed 1 s: an append (one script
    # call) takes a round trip, 2 s, while everything else takes milliseconds.
    proxy = await netem.start(f"127.0.0.1:{redis_server.port}", delay=1.0)
    try:
        slow = await start_chat(log=make_log(f"redis://127.0.0.1:{proxy.port}/0", timeout=15))
        fast = await start_chat(log=make_log())
        ada = await make_client("ws", fast, "ada")
        bob = await make_client("ws", slow, "bob")
        async with httpx.AsyncClient(timeout=30) as http:
            slow_post = asyncio.ensure_future(post(http, slow, "carol", "slowly"))
            # While the slow server waits on Redis, it still answers what needs no Redis,
            # and the other server's clients chat as usual.
            presence = await http.get(slow.url + "api/presence")
            assert presence.status_code == 200 and not slow_post.done()
            await ada.send("quick")
            seen = [await ada.receive(timeout=10)]
            if seen[0].text != "quick":  # the slow one got in first (a very loaded machine)
                seen.append(await ada.receive(timeout=10))
            assert seen[-1].text == "quick" and not slow_post.done()
            assert (await slow_post).status_code == 201
        if len(seen) == 1:
            seen.append(await ada.receive(timeout=20))
        for got in (seen, await bob.receive_many(2, timeout=20)):
            assert [m.id for m in got] == [1, 2]
            assert {m.text for m in got} == {"quick", "slowly"}
    finally:
        await proxy.stop()
