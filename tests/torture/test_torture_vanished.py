"""Peers that vanish without a FIN (issue 20): a client of every transport, each in its own
network namespace joined to the server's by a veth pair (netns.py), connects and shows in
the presence list; then every link is taken down at once, so the server sees silence, not
a close. Each client must be released (the server holds no socket for it) and gone from
presence within its transport's heartbeat bound (README, "Limits and security"), computed
below from the same settings, scaled down so the test takes seconds:

* WebSocket: a ping every ``ws_ping_interval``; no pong within the same again: closed.
* SSE: a ``: ping`` comment every ``heartbeat``; bytes nobody acknowledges for
  ``stuck_timeout`` (checked four times per timeout): reset (chatlib.stuck).
* long polling: its pending poll is answered within ``max_wait``, then reset by the same
  rule (chatlib.protocols); the name leaves ``presence_ttl`` after its last request (the
  server looks every ``min(5, presence_ttl / 3)`` s, and tells at most every
  ``presence_interval``).
* polling: the name as above; the idle connection is closed by uvicorn's keep-alive
  timeout (5 s), or a request cut in half by ``header_timeout``.

A connection with bytes its peer never acknowledged is reset, not closed: a FIN would
wait behind them, in FIN-WAIT-1, retransmitted into the void for minutes.

Skipped, saying why, where network namespaces cannot be made (not root, no ``ip``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import sys
import time

import netns
import pytest
from torturekit import HERE
from websockets.asyncio.client import connect as ws_connect

from chatlib import Limits

TRANSPORTS = ("ws", "sse", "longpoll", "poll")
OPTIONS = {"ws": [], "sse": [], "longpoll": ["wait=25"], "poll": ["interval=0.5"]}
PING = 2.0
"""``ChatServer(ws_ping_interval=)``, also its ping timeout (default 20 s)."""
LIMITS = {"stuck_timeout": 2.0, "heartbeat": 2.0, "presence_ttl": 3.0, "max_wait": 2.0,
          "header_timeout": 3.0}
KEEP_ALIVE = 5.0
"""uvicorn's ``timeout_keep_alive`` (chatlib keeps its default)."""
SLACK = 5.0
"""For a loaded 2-core CI machine; the figures printed are the measured times."""

pytestmark = pytest.mark.skipif((reason := netns.unavailable()) is not None,
                                reason=reason or "")


def bounds(limits: Limits, ping: float) -> dict[str, tuple[float, float]]:
    """Per transport: (seconds until the name leaves presence, until the socket is freed)
    after the peer went silent, as README's limits table states them."""
    stuck = limits.stuck_timeout * 1.25  # one sweep (a quarter of it) may pass first
    name_expires = (limits.presence_ttl + min(5.0, limits.presence_ttl / 3)
                    + limits.presence_interval)
    return {"ws": (2 * ping, 2 * ping),
            "sse": (limits.heartbeat + stuck,) * 2,
            "longpoll": (name_expires, limits.max_wait + stuck),
            "poll": (name_expires, max(KEEP_ALIVE, limits.header_timeout + stuck))}


def sockets_from(pid: int, address: str) -> tuple[int, int]:
    """(sockets the server process holds, all kernel sockets besides TIME-WAIT) to or from
    ``address``, in the server's network namespace (/proc/PID/net/tcp; a socket no process
    holds, an orphan, has inode 0)."""
    wanted = f"{struct.unpack('<I', socket.inet_aton(address))[0]:08X}"
    held = kernel = 0
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[2].split(":")[0] == wanted and fields[3] != "06":
                kernel += 1
                held += fields[9] != "0"
    return held, kernel


async def test_vanished_peers_are_released(spawn, figures):
    topology = netns.Topology(len(TRANSPORTS))
    clients: list[asyncio.subprocess.Process] = []
    observer = watching = server = None
    try:
        topology.create()
        server = await spawn(limits=LIMITS, options={"host": netns.SERVER,
                                                     "ws_ping_interval": PING},
                             prefix=topology.run_in(topology.server, []))
        # The observer: a WebSocket from inside the server's namespace, told every change.
        sock = await asyncio.to_thread(topology.socket_in, topology.server,
                                       (netns.SERVER, server.port))
        observer = await ws_connect(server.ws_url, sock=sock, compression=None)
        await observer.send(json.dumps({"type": "hello", "user": "observer", "after": 0}))
        present: list[tuple[float, set[str]]] = []

        async def watch() -> None:
            async for raw in observer:  # until the observer is closed
                event = json.loads(raw)
                if event.get("type") == "presence":
                    present.append((time.monotonic(), set(event["users"])))

        watching = asyncio.ensure_future(watch())
        for k, kind in enumerate(TRANSPORTS):
            clients.append(await asyncio.create_subprocess_exec(
                *topology.run_in(topology.clients[k], [
                    sys.executable, str(HERE / "vanishing_client.py"), kind, server.url,
                    f"gone-{kind}", *OPTIONS[kind]]),
                stdout=asyncio.subprocess.PIPE))
        users = {f"gone-{kind}" for kind in TRANSPORTS}
        async with asyncio.timeout(30):
            for client in clients:
                assert (await client.stdout.readline()).strip() == b"READY"
            while not present or not users <= present[-1][1]:  # bounded by the timeout
                await asyncio.sleep(0.05)
            while not all(sockets_from(server.pid, topology.client_address(k))[0]
                          for k in range(len(TRANSPORTS))):  # bounded by the timeout
                await asyncio.sleep(0.05)

        for k in range(len(TRANSPORTS)):
            topology.cut(k)
        cut = time.monotonic()
        limit = bounds(Limits(**LIMITS), PING)
        left: dict[str, float] = {}
        freed: dict[str, float] = {}
        deadline = cut + max(max(b) for b in limit.values()) + SLACK
        while time.monotonic() < deadline and len(left) + len(freed) < 2 * len(TRANSPORTS):
            now = time.monotonic()  # bounded by the deadline
            for k, kind in enumerate(TRANSPORTS):
                if kind not in left and f"gone-{kind}" not in present[-1][1]:
                    left[kind] = round(next(t for t, names in present
                                            if t >= cut and f"gone-{kind}" not in names)
                                       - cut, 1)
                if kind not in freed and not sockets_from(
                        server.pid, topology.client_address(k))[0]:
                    freed[kind] = round(now - cut, 1)
            await asyncio.sleep(0.1)
        orphans = {kind: sockets_from(server.pid, topology.client_address(k))[1]
                   for k, kind in enumerate(TRANSPORTS)}
        settings = ", ".join(f"{k} {v:g} s" for k, v in {"ping": PING, **LIMITS}.items())
        figures(f"vanished peers (link cut, no FIN; {settings})",
                presence_gone_s=left, released_s=freed,
                bound_s={kind: max(b) for kind, b in limit.items()},
                kernel_sockets_left=orphans)
        assert server.alive and not observer.close_code  # the others are unaffected
        # Push connections are reset (no socket left retransmitting into the void for
        # minutes in FIN-WAIT-1); a polling connection closed while idle leaves a FIN.
        assert orphans["ws"] == orphans["sse"] == orphans["longpoll"] == 0, orphans
        for kind, (name_bound, socket_bound) in limit.items():
            assert left.get(kind, float("inf")) <= name_bound + SLACK, (kind, left, limit)
            assert freed.get(kind, float("inf")) <= socket_bound + SLACK, (kind, freed, limit)
    finally:
        if watching is not None:
            watching.cancel()
        if observer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(observer.close(), 5)
        for client in clients:
            with contextlib.suppress(ProcessLookupError):
                client.kill()
            await client.wait()
        if server is not None:
            await server.stop()
        topology.remove()
