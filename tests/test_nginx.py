"""nginx (Debian's) in front of chat processes, with deploy/nginx.conf: every transport
through one port, across processes; and the idle-timeout lesson, both ways.

Each test starts its own redis-server, chat processes and nginx on free ports, in
temporary directories, as ordinary child processes (chatlib.cluster).
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from redis_fixtures import recording, require_programs
from websockets.exceptions import ConnectionClosed

from chatlib import Limits, MemoryLog
from chatlib.cluster import Cluster, NginxProcess

TRANSPORTS = ("ws", "sse", "longpoll", "poll")


@pytest.fixture
async def cluster():
    require_programs("redis-server", "nginx")
    cluster = Cluster(processes=3, port=0)
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


def upstreams_used(cluster: Cluster) -> set[str]:
    """The chat processes nginx sent requests to (from its access log)."""
    log = (cluster.nginx.directory / "access.log").read_text()
    return set(re.findall(r"upstream=(127\.0\.0\.1:\d+)", log))


async def test_every_transport_through_one_port_across_processes(cluster, make_client):
    async with httpx.AsyncClient() as http:
        page = await http.get(cluster.url)
        assert page.status_code == 200 and "<html" in page.text.lower()
    clients = [await make_client(transport, cluster.url, f"{transport}-{i}")
               for i in range(2) for transport in TRANSPORTS]
    wire_ids = [recording(client) for client in clients]
    texts = []
    for client in clients:
        texts.append(f"hello from {client.user}")
        await client.send(texts[-1])
    for client in clients:
        got = await client.receive_many(len(texts), timeout=20)
        assert [m.text for m in got] == texts, client.user
    for ids in wire_ids:
        assert ids == list(range(1, len(texts) + 1))  # once each, in order, no gap
    # The requests really were spread over the processes (round robin).
    assert len(upstreams_used(cluster)) >= 2


async def test_killed_process_clients_come_back_through_nginx(cluster, make_client):
    clients = [await make_client(transport, cluster.url, f"{transport}-{i}")
               for i in range(3) for transport in ("ws", "sse")]
    wire_ids = [recording(client) for client in clients]
    await clients[0].send("before")
    for client in clients:
        assert (await client.receive(timeout=20)).text == "before"

    cluster.servers[0].kill()  # SIGKILL: the streams it held just break
    async with httpx.AsyncClient() as http:  # POSTs are not retried by nginx: use a live one
        response = await http.post(cluster.servers[1].url + "api/messages",
                                   json={"user": "bob", "text": "after"})
        assert response.status_code == 201
    for client in clients:  # a client whose stream broke reconnects to the same URL
        try:
            got = await client.receive(timeout=5)
        except (ConnectionError, ConnectionClosed, httpx.HTTPError, TimeoutError):
            await client.close()
            await client.connect()  # resumes after the last id it saw, on a live process
            got = await client.receive(timeout=20)
        assert got.text == "after"
    for ids in wire_ids:
        assert ids == [1, 2]


@pytest.fixture
async def behind_nginx(tmp_path, start_chat):
    """``await behind_nginx(read_timeout, heartbeat)``: a chat server (pings and SSE
    heartbeats every ``heartbeat`` s, or never) behind nginx; returns nginx's URL."""
    require_programs("nginx")
    proxies: list[NginxProcess] = []

    async def start(read_timeout: float, heartbeat: float | None) -> str:
        server = await start_chat(log=MemoryLog(), ws_ping_interval=heartbeat,
                                  limits=Limits(heartbeat=heartbeat or 3600.0))
        nginx = NginxProcess(tmp_path / "nginx", [server.port],
                             read_timeout=f"{int(read_timeout * 1000)}ms")
        proxies.append(nginx)
        await nginx.start()
        return nginx.url

    try:
        yield start
    finally:
        for nginx in proxies:
            await nginx.stop()


async def test_idle_streams_are_cut_when_the_heartbeat_is_slower_than_the_proxy(
        behind_nginx, make_client):
    url = await behind_nginx(read_timeout=1.0, heartbeat=None)
    ws = await make_client("ws", url, "idle-ws")
    sse = await make_client("sse", url, "idle-sse")
    # Nothing crosses either connection: after proxy_read_timeout nginx closes both.
    with pytest.raises(ConnectionClosed):
        await ws.receive(timeout=15)
    with pytest.raises((ConnectionError, httpx.HTTPError)):
        await sse.receive(timeout=15)


async def test_idle_streams_survive_when_the_heartbeat_is_faster_than_the_proxy(
        behind_nginx, make_client):
    # A ping each second (uvicorn also waits 1 s for its pong: don't go lower on a loaded
    # machine), an SSE comment line each second, and nginx waiting 2.5 s.
    url = await behind_nginx(read_timeout=2.5, heartbeat=1.0)
    ws = await make_client("ws", url, "idle-ws")
    sse = await make_client("sse", url, "idle-sse")
    connection, stream = ws.ws, sse._stream
    await asyncio.sleep(6.0)  # the scenario itself: idle for more than two proxy timeouts
    async with httpx.AsyncClient() as http:
        response = await http.post(url + "api/messages", json={"user": "ada", "text": "still?"})
        assert response.status_code == 201
    for client in (ws, sse):
        assert (await client.receive(timeout=15)).text == "still?"
    # ... over the very same connections: nothing was cut and reopened.
    assert ws.ws is connection and sse._stream is stream
