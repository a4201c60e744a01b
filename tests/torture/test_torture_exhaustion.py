"""Exhaustion: 2,000 long polls, 2,000 SSE streams, 3,000 idle WebSockets, 500 half-open
requests, one crowd at a time, each with a bystander whose health check is timed.

The server runs in its own process (its open-files limit raised, as a deployment would),
so its RSS, descriptors and latency are real. For each crowd: every connection is
accepted, the bystander's requests all succeed (p50 / p99 printed, and bounded far below
any client timeout), and when the crowd leaves the server gives back its descriptors and
serves the bystander again.
"""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import time

import pytest
from rawhttp import exchange
from torturekit import percentile
from wscases import text as text_frame

CROWDS = {"long polls": 2000, "SSE streams": 2000, "idle WebSockets": 3000,
          "half-open requests": 500}
HEALTH_SAMPLES = 30
P99_BOUND = 10.0
"""A bystander's request must not wait longer than this (seconds) with a crowd connected:
far below the 25 s long-poll cap and browsers' timeouts; measured figures are printed."""
OPENING = 100
"""Connections opened at once while a crowd gathers."""


def request(port: int, line: str, *extra: str) -> bytes:
    headers = "".join(f"{h}\r\n" for h in extra)
    return f"{line} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode()


async def join(port: int, crowd: str, i: int):
    """One member of the crowd: a connection in the state the crowd is about."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if crowd == "long polls":
        writer.write(request(port, "GET /api/messages?after=0&wait=25"))
    elif crowd == "SSE streams":
        writer.write(request(port, "GET /api/events?after=0", "Accept: text/event-stream"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head
    elif crowd == "idle WebSockets":
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(request(port, "GET /ws", "Upgrade: websocket", "Connection: Upgrade",
                             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0], head
        writer.write(text_frame({"type": "hello", "user": f"idle{i % 10}", "after": 0}))
    else:  # half-open: a request that never ends (slowloris)
        writer.write(f"GET /api/presence HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    await writer.drain()
    return writer


async def health(port: int) -> list[float]:
    """Time the bystander's requests: GET /api/presence on a new connection each."""
    times = []
    for _ in range(HEALTH_SAMPLES):  # bounded
        answer = await exchange(port, request(port, "GET /api/presence", "Connection: close"),
                                deadline=60)
        assert answer.status == 200, answer
        times.append(answer.seconds)
        await asyncio.sleep(0.05)  # a steady trickle, not a second crowd
    return times


async def wait_for_fds(server, count: int, timeout: float = 60.0, *,
                       at_least: bool = False) -> int:
    """Wait until the server holds at most (or ``at_least``) ``count`` descriptors."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded by the deadline
        fds = server.open_fds()
        if (fds >= count) if at_least else (fds <= count):
            return fds
        await asyncio.sleep(0.2)
    return server.open_fds()


async def test_crowds_then_recovery(spawn, figures):
    need = max(CROWDS.values()) + 500
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
        pytest.skip(f"needs {need} open files (ulimit -Hn is lower)")
    server = await spawn(limits={"admit_rate": 0})  # crowds of descriptors, not admissions
    await health(server.port)  # warm up
    baseline_fds = server.open_fds()
    idle = await health(server.port)
    figures("exhaustion", baseline=f"fds {baseline_fds}, RSS {server.rss_kib() // 1024} MiB, "
            f"health p50/p99 {percentile(idle, 50) * 1000:.0f}/{percentile(idle, 99) * 1000:.0f}"
            " ms")
    for crowd, n in CROWDS.items():
        writers = []
        gate = asyncio.Semaphore(OPENING)

        async def member(i: int, crowd=crowd, gate=gate, writers=writers) -> None:
            async with gate:
                writers.append(await asyncio.wait_for(join(server.port, crowd, i), 60))

        try:
            await asyncio.gather(*(member(i) for i in range(n)))
            if crowd != "half-open requests":  # (those the header timeout may close)
                await wait_for_fds(server, baseline_fds + n, at_least=True)  # all accepted
            fds, rss = server.open_fds(), server.rss_kib()
            times = await health(server.port)
        finally:
            for writer in writers:
                writer.transport.abort()
        left = await wait_for_fds(server, baseline_fds + 20)
        after = await health(server.port)
        figures("exhaustion", **{crowd: (
            f"{n} open: server fds {fds}, RSS {rss // 1024} MiB, health p50/p99 "
            f"{percentile(times, 50) * 1000:.0f}/{percentile(times, 99) * 1000:.0f} ms; "
            f"after: fds {left}, p99 {percentile(after, 99) * 1000:.0f} ms")})
        if crowd != "half-open requests":  # (those the header timeout may already close)
            assert fds >= n, f"{crowd}: only {fds} descriptors for {n} connections"
        assert percentile(times, 99) < P99_BOUND, (crowd, times)
        assert left <= baseline_fds + 20, f"{crowd}: {left} descriptors after they left"
        assert server.alive
    assert "Traceback" not in server.stderr_tail(20000), server.stderr_tail()
