"""Starting and stopping the server: ports, restarts, history, and open connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import chatlib
from chatlib import ChatServer, Limits, SQLiteLog

pytestmark = pytest.mark.timeout(60)

T = 10  # seconds: hang guard, never reached when things work
STOP_GUARD = 15  # seconds: generous bound on stop() with open connections (not a perf test)


def can_bind(port: int, *, reuse: bool) -> bool:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        return True
    except OSError:
        return False
    finally:
        sock.close()


async def refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


@pytest.fixture
async def listening_socket():
    """A socket that holds a port (listening), closed at teardown."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
async def current_server():
    """Make sure the module-level server of ``start_server`` is stopped after the test."""
    try:
        yield
    finally:
        await asyncio.wait_for(chatlib.stop_server(), 20)


async def test_url_and_context_manager():
    async with ChatServer(port=0) as server:
        assert server.running
        assert server.port and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/"
        assert server.ws_url == f"ws://127.0.0.1:{server.port}/ws"
        assert "running" in repr(server)
        async with httpx.AsyncClient() as http:
            assert (await http.get(server.url + "api/presence")).status_code == 200
    assert not server.running
    assert "stopped" in repr(server)


async def test_stop_frees_the_port(http):
    server = await ChatServer(port=0).start()
    port = server.port
    assert (await http.get(server.url)).status_code == 200
    await server.stop()
    assert not server.running
    assert await refuses_connections(port)
    # A new server (which binds with SO_REUSEADDR, like ours) can listen there at once.
    assert can_bind(port, reuse=True)


async def test_stop_without_connections_frees_the_port_for_anyone():
    server = await ChatServer(port=0).start()
    port = server.port
    await server.stop()
    assert can_bind(port, reuse=False)


async def test_stop_is_idempotent_and_safe_before_start():
    never_started = ChatServer(port=0)
    await never_started.stop()
    server = await ChatServer(port=0).start()
    await server.stop()
    await server.stop()
    assert not server.running


async def test_start_is_idempotent(start_chat):
    server = await start_chat()
    port = server.port
    assert await server.start() is server
    assert server.port == port


async def test_busy_port_raises_oserror(start_chat, listening_socket, make_client):
    other = await start_chat()
    watcher = await make_client("ws", other, "watcher")
    port = listening_socket.getsockname()[1]
    server = ChatServer(port=port)
    with pytest.raises(OSError):
        await server.start()
    assert not server.running
    await server.stop()  # harmless
    # The port's owner still works ...
    accepted = asyncio.get_running_loop().sock_accept
    listening_socket.setblocking(False)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn, _ = await asyncio.wait_for(accepted(listening_socket), T)
    conn.close()
    writer.close()
    # ... and so does every other server.
    await watcher.send("still here")
    assert (await watcher.receive(timeout=T)).text == "still here"


async def test_port_of_a_running_chat_server_is_busy(start_chat, http):
    first = await start_chat()
    with pytest.raises(OSError):
        await ChatServer(port=first.port).start()
    response = await http.post(first.url + "api/messages", json={"user": "a", "text": "x"})
    assert response.status_code == 201


async def test_same_server_object_restarts_and_keeps_history(start_chat, make_client):
    server = await start_chat()
    poster = await make_client("poll", server, "bob")
    await poster.send("before")
    port = server.port
    await server.stop()
    server.requested_port = port
    await server.start()
    assert server.port == port
    client = await make_client("ws", server, "ada")
    assert (await client.receive(timeout=T)).text == "before"


async def test_start_server_twice_keeps_port_and_history(current_server, make_client):
    first = await chatlib.start_server()
    assert first.running
    ada = await make_client("ws", first, "ada")
    await ada.send("before the restart")
    assert (await ada.receive(timeout=T)).text == "before the restart"

    second = await chatlib.start_server()  # re-running the notebook cell
    assert second is not first
    assert not first.running and second.running
    assert second.port == first.port  # open browser tabs keep their URL
    assert second.log is first.log
    # ada reconnects (as the page does) and resumes: no reset, nothing repeated.
    await ada.close()
    await ada.connect()
    await ada.send("after the restart")
    got = await ada.receive(timeout=T)
    assert got.text == "after the restart"
    assert ada.resets == 0
    poller = await make_client("poll", second, "bob")
    assert [m.text for m in await poller.receive_many(2, timeout=T)] == [
        "before the restart", "after the restart"]

    await chatlib.stop_server()
    assert not second.running
    assert await refuses_connections(second.port)


async def test_restart_closes_websockets_with_1012_and_stop_with_1001(current_server):
    """RFC 6455 7.4.1: 1012 "service restart" tells a client to come back; a stop is 1001."""

    async def close_code_of(server, action) -> int:
        ws = await ws_connect(server.ws_url)
        await ws.send(json.dumps({"type": "hello", "user": "ada", "after": 0}))
        await asyncio.wait_for(ws.recv(), T)  # the hello was handled: presence arrived
        await action()
        async with asyncio.timeout(T):
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()
        return ws.close_code

    server = await chatlib.start_server()
    assert await close_code_of(server, chatlib.start_server) == 1012  # re-running the cell
    assert await close_code_of(chatlib.server._current, chatlib.stop_server) == 1001


async def test_start_server_falls_back_to_a_free_port(current_server, make_client):
    first = await chatlib.start_server()
    poster = await make_client("poll", first, "bob")
    await poster.send("kept")
    await first.stop()
    # Someone else takes the port in between.
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
    try:
        squatter.bind(("127.0.0.1", first.port))
        squatter.listen(1)
        second = await chatlib.start_server()
        assert second.running and second.port != first.port
    finally:
        squatter.close()
    reader = await make_client("poll", second, "ada")
    assert (await reader.receive(timeout=T)).text == "kept"


async def test_start_server_with_an_explicit_busy_port_raises(current_server, listening_socket):
    with pytest.raises(OSError):
        await chatlib.start_server(port=listening_socket.getsockname()[1])


async def test_stop_ends_every_open_connection(start_chat, http):
    server = await start_chat()
    await http.post(server.url + "api/messages", json={"user": "bob", "text": "hi"})

    ws = await ws_connect(server.ws_url)
    await ws.send(json.dumps({"type": "hello", "user": "ada", "after": 1}))
    sse_done = asyncio.Event()
    sse_lines: list[str] = []

    async def read_sse():
        async with httpx.AsyncClient(timeout=httpx.Timeout(T)) as client:
            try:
                async with client.stream("GET", server.url + "api/events?after=1") as r:
                    async for line in r.aiter_lines():
                        sse_lines.append(line)
            except httpx.HTTPError as exc:  # an abrupt end is an end, too
                sse_lines.append(f"<{type(exc).__name__}>")
            finally:
                sse_done.set()

    async def long_poll():
        async with httpx.AsyncClient(timeout=httpx.Timeout(T, read=30)) as client:
            return await client.get(server.url + "api/messages?after=1&wait=25&user=bob")

    await http.post(server.url + "api/presence", json={"user": "bob"})  # joining: POST
    joined_at = server.hub.presence.last_seen("bob")
    sse_task = asyncio.create_task(read_sse())
    poll_task = asyncio.create_task(long_poll())
    # Everything is connected: the SSE stream has started, the WebSocket user and the long
    # poll's request are in (the poll refreshed bob's presence; from then on a stop answers
    # it, waiting or not).
    async with asyncio.timeout(T):
        while "retry: 1000" not in sse_lines:
            await asyncio.sleep(0.01)
        presence = server.hub.presence
        while "ada" not in presence.users() or presence.last_seen("bob") == joined_at:
            await asyncio.sleep(0.01)
    assert not poll_task.done()

    async with asyncio.timeout(STOP_GUARD):
        await server.stop()
        await sse_done.wait()
        response = await poll_task
    assert not server.running
    async with asyncio.timeout(T):
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
    assert ws.close_code in (1001, 1012)
    assert response.status_code == 200
    assert response.json()["messages"] == []
    await sse_task
    assert await refuses_connections(server.port)


async def test_stop_with_a_slow_websocket_reader_finishes(start_chat, http):
    server = await start_chat(limits=Limits(max_text=70_000, max_body=200_000,
                                            rate=10_000, burst=10_000))
    slow = await ws_connect(server.ws_url, max_queue=1)
    await slow.send(json.dumps({"type": "hello", "user": "slow"}))
    for _ in range(20):  # the slow client reads none of it
        await http.post(server.url + "api/messages", json={"user": "b", "text": "x" * 60_000})
    try:
        async with asyncio.timeout(STOP_GUARD):
            await server.stop()
        assert not server.running
    finally:
        slow.transport.abort()


async def test_sqlite_history_survives_a_restart(start_chat, make_client, tmp_path):
    path = tmp_path / "chat.db"
    log = SQLiteLog(path)
    try:
        first = await start_chat(log=log)
        ada = await make_client("ws", first, "ada")
        for i in range(3):
            await ada.send(f"m{i}")
        await ada.receive_many(3, timeout=T)
        await ada.close()
        await first.stop()
    finally:
        await log.close()

    log = SQLiteLog(path)
    try:
        second = await start_chat(log=log)
        ada.url = second.url
        await ada.connect()  # resumes after id 3: a real cursor, not a reset
        await ada.send("after restart")
        got = await ada.receive(timeout=T)
        assert (got.id, got.text) == (4, "after restart")
        assert ada.resets == 0
        bob = await make_client("longpoll", second, "bob")
        assert [m.text for m in await bob.receive_many(4, timeout=T)] == [
            "m0", "m1", "m2", "after restart"]
        await second.stop()
    finally:
        await log.close()


async def test_accepted_connections_disable_nagle(server, http):
    """Small realtime writes must not wait for ACKs (Nagle + delayed ACK is ~40 ms)."""
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada"}))
        assert (await http.get(server.url + "api/presence")).status_code == 200
        connections = list(server._server.server_state.connections)
        assert connections
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_two_servers_are_independent(start_chat, make_client):
    one = await start_chat()
    two = await start_chat()
    assert one.port != two.port
    a = await make_client("ws", one, "ada")
    b = await make_client("ws", two, "bob")
    await a.send("on one")
    await b.send("on two")
    assert (await a.receive(timeout=T)).text == "on one"
    assert (await b.receive(timeout=T)).text == "on two"
    with contextlib.suppress(TimeoutError):
        extra = await a.receive(timeout=0.1)
        pytest.fail(f"a message leaked between servers: {extra}")
