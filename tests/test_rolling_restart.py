"""A rolling restart of the cluster (chatlib.cluster.Cluster.rolling_restart, ``make cluster``
then ``kill -HUP``): every chat process in turn gets SIGTERM and starts again on its port.

``chatlib serve`` answers SIGTERM with 1012 and, per push client, its own delay in the close
reason (``--restart-spread S``; an SSE stream: its last ``close`` event), so its clients come
back spread over S seconds, through nginx, to whichever process is up; ``--restart-spread 0``
is the naive restart: 1012 and no delay. Either way every client is back and has every
message once, in order (counted on the wire).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from redis_fixtures import recording, require_programs

from chatlib.clients import retryable, server_delay
from chatlib.cluster import Cluster

T = 30.0

pytestmark = pytest.mark.timeout(180)


async def follow(client, text: str, delays: list) -> None:
    """Receive until ``text``, coming back as the server says after every close."""
    for _ in range(1000):  # bounded: each round a message or a reconnect
        try:
            if (await client.receive(timeout=T)).text == text:
                return
        except Exception as exc:
            if not retryable(exc):
                raise
            delays.append(server_delay(exc))
            await client.come_back(exc)
    raise AssertionError("too many rounds")


@pytest.mark.parametrize("spread", ["2", "0"])
async def test_a_rolling_restart_brings_every_client_back(spread, make_client):
    require_programs("redis-server", "nginx")
    cluster = Cluster(processes=2, port=0, args=("--restart-spread", spread))
    await cluster.start()
    try:
        clients = [await make_client(transport, cluster.url, f"{transport}-{i}")
                   for i in range(3) for transport in ("ws", "sse")]
        wire_ids = [recording(client) for client in clients]
        async with httpx.AsyncClient(timeout=T) as http:
            posted = await http.post(cluster.url + "api/messages",
                                     json={"user": "ada", "text": "before"})
            assert posted.status_code == 201
            for client in clients:
                assert (await client.receive(timeout=T)).text == "before"
            delays: list[float | None] = []
            followers = [asyncio.ensure_future(follow(c, "after", delays)) for c in clients]
            await cluster.rolling_restart()
            assert (await http.post(cluster.url + "api/messages",
                                    json={"user": "ada", "text": "after"})).status_code == 201
            async with asyncio.timeout(60):
                await asyncio.gather(*followers)
        assert len(delays) >= len(clients)  # each was closed at least once
        told = [d for d in delays if d is not None]
        if spread == "0":
            assert not told  # the naive restart: 1012, no delay
        else:
            # the clients closed by a restart were told a delay each, within the spread
            # (others saw only a refused attempt while a process was down)
            assert len(told) >= len(clients) and all(0 <= d < 2 for d in told), delays
            assert len({round(d, 2) for d in told}) > 1  # each its own
        for ids in wire_ids:
            assert ids == [1, 2], ids  # every message once, in order, no gap
    finally:
        await cluster.stop()
