"""The second outside attack's families (issue 18), each against a server in a subprocess,
each printing its figures: ping flood, replay amplification, dead-connection replay,
forwarded-header rotation, look-alike names. (Redis FLUSHALL/OOM/hang need a redis-server:
tests/test_log_reset.py and tests/test_redis_errors.py; the resume protocol on every
transport and log: tests/test_resume.py.)
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time

import httpx
from test_ping_flood import open_websocket, ping
from test_stuck_kernel import text_frame
from torturekit import percentile, ws_open

from chatlib.validation import DEFAULT_IGNORABLE, FILLERS

FAST = {"rate": 1e6, "burst": 10**6, "address_rate": 1e6, "address_burst": 10**6}


def tracebacks(server) -> int:
    return server.stderr_tail(10**7).count("Traceback")


async def test_ping_flood(spawn, figures):
    server = await spawn(limits={"hello_timeout": 2.0})
    rss_before = server.rss_kib()
    sockets = [await open_websocket(server.port) for _ in range(4)]
    burst, sent, loop = ping() * 500, [0] * 4, asyncio.get_running_loop()

    async def flood(i: int) -> None:
        _, writer = sockets[i]
        started = loop.time()
        while loop.time() - started < 8:  # bounded; ends when the server stops reading
            writer.write(burst)
            sent[i] += len(burst)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except (TimeoutError, ConnectionError):
                return

    await asyncio.gather(*(flood(i) for i in range(4)))
    rss_peak = server.rss_kib()
    started = time.monotonic()
    gone = 0
    for reader, writer in sockets:  # the hello timeout (2 s) aborts each
        try:
            async with asyncio.timeout(15):
                while await reader.read(65536):  # bounded by the timeout
                    pass
            gone += 1
        except (ConnectionError, TimeoutError):
            gone += 1
        writer.transport.abort()
    figures("ping flood (4 sockets, no hello, pongs unread)",
            sent_mib=round(sum(sent) / 2**20, 1), rss_growth_mib=round(
                (rss_peak - rss_before) / 1024, 1),
            dropped=gone, dropped_within_s=round(time.monotonic() - started, 1),
            tracebacks=tracebacks(server))
    assert rss_peak - rss_before < 64 * 1024 and gone == 4 and tracebacks(server) == 0


async def test_replay_amplification(spawn, figures):
    server = await spawn(limits=FAST)
    async with httpx.AsyncClient() as http:
        for i in range(2000):
            await http.post(server.url + "api/messages", json={"user": "bob", "text": f"m{i}"})
    frames_per_join = []
    cpu_before = server.cpu_seconds()

    async def join(i: int) -> None:
        ws = await ws_open(server.ws_url)
        try:
            await ws.send(json.dumps({"type": "hello", "user": f"j{i}", "after": 0}))
            frames = 0
            async with asyncio.timeout(30):
                while True:  # until the newest message arrived, bounded by the timeout
                    frame = json.loads(await ws.recv())
                    frames += frame["type"] in ("message", "history")
                    if frame.get("id") == 2000:
                        break
            frames_per_join.append(frames)
        finally:
            await ws.close()

    await asyncio.gather(*(join(i) for i in range(8)))
    cpu = server.cpu_seconds() - cpu_before
    figures("replay amplification (2,000 messages, 8 fresh joins with after 0)",
            frames_per_join=max(frames_per_join), cpu_ms_per_join=round(cpu / 8 * 1000, 1))
    assert max(frames_per_join) <= 501  # the newest page and its "history" marker


async def test_dead_connection_replay(spawn, figures):
    server = await spawn(limits=FAST)
    async with httpx.AsyncClient() as http:
        for i in range(2000):
            await http.post(server.url + "api/messages",
                            json={"user": "bob", "text": f"{i}" + "x" * 200})
    for _ in range(8):  # resume from the start, then reset the socket at once
        reader, writer = await open_websocket(server.port)
        writer.write(text_frame(json.dumps({"type": "hello", "user": "dead", "after": 1})))
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    async with httpx.AsyncClient() as http:  # the server still answers at once
        started = time.monotonic()
        response = await http.get(server.url + "api/presence")
        answered_ms = (time.monotonic() - started) * 1000
    log = server.stderr_tail(10**7)
    figures("dead-connection replay (8 resumes from id 1, socket reset at once)",
            send_errors_logged=log.count("socket.send() raised"),
            writer_failures=log.count("WebSocket writer failed"),
            next_request_ms=round(answered_ms, 1))
    assert response.status_code == 200
    assert log.count("socket.send() raised") == 0 and "WebSocket writer failed" not in log


async def test_forwarded_header_rotation(spawn, figures):
    server = await spawn(limits={"address_rate": 0.01, "address_burst": 50, "rate": 0.01,
                                 "burst": 50})
    statuses = []
    async with httpx.AsyncClient() as http:
        for i in range(300):
            response = await http.post(
                server.url + "api/messages", json={"user": f"u{i}", "text": "hi"},
                headers={"X-Forwarded-For": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"})
            statuses.append(response.status_code)
    figures("forwarded-header rotation (300 POSTs, a new X-Forwarded-For each)",
            accepted=statuses.count(201), address_budget=50)
    assert statuses.count(201) == 50


async def test_look_alike_names(spawn, figures):
    server = await spawn(limits=FAST)
    invisible = [chr(c) for low, high in DEFAULT_IGNORABLE for c in range(low, high + 1)]
    tried = [*invisible[::16], *FILLERS, "\u034f"]
    accepted, latencies = 0, []
    async with httpx.AsyncClient() as http:
        for c in tried:
            started = time.monotonic()
            response = await http.post(server.url + "api/messages",
                                       json={"user": "admin" + c, "text": "hi"})
            latencies.append((time.monotonic() - started) * 1000)
            accepted += response.status_code == 201
    figures("look-alike names ('admin' + a default-ignorable code point or filler)",
            tried=len(tried), accepted=accepted, p99_ms=round(percentile(latencies, 99), 1))
    assert accepted == 0
