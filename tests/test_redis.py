"""RedisLog on a real redis-server: the MessageLog contract across processes, fan-out,
presence and typing between servers that share one chat.

Several ChatServers in one test process, each with its own RedisLog (its own connections),
stand for several server processes; tests/test_redis_faults.py uses real processes.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from helpers import free_port
from redis_fixtures import recording, until_client

from chatlib import Limits
from chatlib.redis_log import RedisLog


async def test_ids_strictly_increase_across_writers(make_log):
    first, second = make_log(), make_log()

    async def write(log: RedisLog, name: str) -> list[int]:
        return [(await log.append(name, f"{name} {i}"))[0].id for i in range(150)]

    ids_a, ids_b = await asyncio.gather(write(first, "a"), write(second, "b"))
    assert sorted(ids_a + ids_b) == list(range(1, 301))  # no gap, no id given twice
    assert ids_a == sorted(ids_a) and ids_b == sorted(ids_b)
    history = await first.after(0, 1000)
    assert [m.id for m in history] == list(range(1, 301))
    assert await second.last_id() == 300
    assert [m.id for m in await second.after(295, 3)] == [296, 297, 298]
    assert (await first.after(0, 1))[0].text in ("a 0", "b 0")


async def test_a_repeated_client_id_returns_the_original(make_log):
    log = make_log()
    original, first = await log.append("ada", "hello", client_id="c-1")
    again, repeat = await log.append("ada", "hello", client_id="c-1")
    other_user, _ = await log.append("bob", "hello", client_id="c-1")
    assert (first, repeat) == (False, True)
    assert again.id == original.id and again.text == "hello" and again.client_id == "c-1"
    assert other_user.id == original.id + 1
    assert [m.id for m in await log.after(0)] == [original.id, other_user.id]


async def test_the_stream_is_trimmed_to_max_len(make_log, redis_server):
    log = make_log(max_len=100)
    for i in range(1000):
        await log.append("ada", str(i))
    kept = await log.after(0, 10_000)
    # Trimmed down to 90 % once past the cap: bounded, never the newest.
    assert 90 <= len(kept) <= 100
    assert kept[-1].id == 1000 and kept[-1].text == "999"
    assert [m.id for m in kept] == list(range(kept[0].id, 1001))


async def test_unreachable_redis_raises_store_unavailable():
    from chatlib.store import StoreUnavailable

    log = RedisLog(f"redis://127.0.0.1:{free_port()}/0", timeout=2)
    try:
        with pytest.raises(StoreUnavailable):
            await log.append("ada", "lost?")
        with pytest.raises(StoreUnavailable):
            await log.after(0)
    finally:
        await log.close()


async def test_servers_sharing_redis_fan_out_to_every_transport(start_chat, make_log,
                                                                make_client):
    one = await start_chat(log=make_log())
    two = await start_chat(log=make_log())
    clients = {
        "ws@1": await make_client("ws", one, "ws1"),
        "sse@2": await make_client("sse", two, "sse2"),
        "longpoll@2": await make_client("longpoll", two, "lp2"),
        "poll@1": await make_client("poll", one, "poll1"),
        "ws@2": await make_client("ws", two, "ws2"),
    }
    seen = {name: recording(client) for name, client in clients.items()}
    texts = []
    for i in range(10):  # alternate the process and the transport that sends
        sender = list(clients.values())[i % len(clients)]
        texts.append(f"m{i} from {sender.user}")
        await sender.send(texts[-1])
    for name, client in clients.items():
        got = await client.receive_many(10, timeout=15)
        assert [m.text for m in got] == texts, name
        assert [m.id for m in got] == list(range(1, 11)), name
    for name, ids in seen.items():
        assert ids == sorted(set(ids)), f"{name} got a message twice: {ids}"


async def test_presence_is_the_union_and_typing_crosses_processes(start_chat, make_log,
                                                                   make_client):
    one = await start_chat(log=make_log(), limits=Limits(presence_interval=0.05))
    two = await start_chat(log=make_log(), limits=Limits(presence_interval=0.05))
    ada = await make_client("ws", one, "ada")
    bob = await make_client("ws", two, "bob")
    for client in (ada, bob):
        await until_client(client, lambda c=client: c.presence == ["ada", "bob"])
    async with httpx.AsyncClient() as http:
        for server in (one, two):
            assert (await http.get(server.url + "api/presence")).json()["users"] == [
                "ada", "bob"]
    await bob.send_typing()
    await until_client(ada, lambda: "bob" in ada.typing)
    await bob.close()
    await until_client(ada, lambda: ada.presence == ["ada"])  # bob left the other process


async def test_a_stopped_server_leaves_the_others_presence_at_once(start_chat, make_log,
                                                                   make_client):
    """A server that stops says so on the bus: its users leave the other processes'
    presence now, not after presence_ttl (here far longer than the test waits)."""
    limits = Limits(presence_interval=0.05)
    one = await start_chat(log=make_log(presence_ttl=120.0), limits=limits)
    two = await start_chat(log=make_log(presence_ttl=120.0), limits=limits)
    ada = await make_client("ws", one, "ada")
    await make_client("ws", two, "bob")
    await until_client(ada, lambda: ada.presence == ["ada", "bob"])
    await two.stop()
    await until_client(ada, lambda: ada.presence == ["ada"])


async def test_a_server_starts_after_existing_history_and_resumes_clients(start_chat,
                                                                          make_log,
                                                                          make_client):
    first = make_log()
    for i in range(5):
        await first.append("ada", f"before {i}")
    server = await start_chat(log=make_log())
    late = await make_client("ws", server, "late", after=3)
    got = await late.receive_many(2, timeout=10)
    assert [m.id for m in got] == [4, 5]
    await first.append("ada", "from another writer")
    assert (await late.receive(timeout=10)).text == "from another writer"
