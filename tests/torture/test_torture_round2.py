"""The second outside attack's families (issue 18), each against a server in a subprocess,
each printing its figures: ping flood, replay amplification, dead-connection replay,
forwarded-header rotation, look-alike names, HTTP slow readers, Redis FLUSHALL / OOM /
hang (needs redis-server). The resume protocol on every transport and log:
tests/test_resume.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time

import httpx
from helpers import server_side_states
from test_fragments import frame as fragment
from test_ping_flood import open_websocket, ping
from test_stuck_kernel import text_frame
from torturekit import percentile, ws_open

from chatlib.limits import MAX_FRAGMENTS
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


async def fragment_flood(port: int, stop: asyncio.Event) -> int:
    """One connection that sends messages of MAX_FRAGMENTS frames of 1 byte each (the most
    the frame budget lets through: each message is then refused as invalid JSON, one error
    frame, read here) until ``stop``; returns the frames sent."""
    reader, writer = await open_websocket(port)
    writer.write(text_frame(json.dumps({"type": "hello", "user": "fragments"})))
    message = b"".join([fragment(0x1, b"x", fin=False)]
                       + [fragment(0x0, b"x", fin=False)] * (MAX_FRAGMENTS - 2)
                       + [fragment(0x0, b"x", fin=True)])

    async def drain() -> None:
        while await reader.read(1 << 16):  # bounded: ends with the connection
            pass

    reading = asyncio.ensure_future(drain())
    sent = 0
    try:
        for _ in range(100_000):  # bounded; ends at stop
            if stop.is_set():
                break
            writer.write(message)
            sent += MAX_FRAGMENTS
            await asyncio.wait_for(writer.drain(), 30)
    finally:
        reading.cancel()
        writer.transport.abort()
    return sent


async def test_continuation_frame_flood(spawn, bystander, figures):
    """A bystander's latency while two connections send 1-byte continuation frames as
    fast as the server reads them, against the same bystander on a quiet server."""
    server = await spawn(limits=FAST)
    phase = 6.0
    async with bystander(server.ws_url, name="quiet", interval=0.02) as pair:
        await asyncio.sleep(phase)  # the bystander measures meanwhile
        quiet = await pair.finish()
    stop = asyncio.Event()
    started = time.monotonic()
    floods = [asyncio.ensure_future(fragment_flood(server.port, stop)) for _ in range(2)]
    async with bystander(server.ws_url, name="flooded", interval=0.02) as pair:
        await asyncio.sleep(phase)  # the bystander measures meanwhile
        stop.set()
        frames = sum(await asyncio.gather(*floods))
        flooded = await pair.finish()
    figures("1-byte continuation-frame flood (2 connections)",
            frames_per_s=round(frames / (time.monotonic() - started)),
            quiet_p50_p99_ms=(quiet["p50_ms"], quiet["p99_ms"]),
            flooded_p50_p99_ms=(flooded["p50_ms"], flooded["p99_ms"]),
            server_cpu_s=round(server.cpu_seconds(), 1))
    assert server.alive
    for report in (quiet, flooded):
        assert report["lost"] == report["duplicated"] == report["out_of_order"] == 0, report
    # Generous: a loaded 2-core CI machine; the measured figures are printed above. (Each
    # read parsed in one go, p50 was 129-552 ms; READ_SLICE brought it to 24-38 ms.)
    assert frames > 0 and flooded["p50_ms"] < 200 and flooded["p99_ms"] < 2000, flooded


async def unread_pages(server, count: int, after: int) -> list[socket.socket]:
    """``count`` sockets (4 KB receive buffers) that ask for the page after ``after`` and
    never read it."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET /api/messages?after={after} HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{server.port}\r\n\r\n".encode())
        sockets.append(sock)
    return sockets


def ended_by_reset(sock: socket.socket) -> bool:
    """Read what the server sent (bounded by the timeout): True if a reset ended it."""
    sock.settimeout(5)
    try:
        while sock.recv(1 << 20):  # bounded: the server closed or reset it
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        pass
    return False


async def test_http_slow_readers(spawn, figures):
    """Unread pages too big for the kernel's buffers (8 MB: asyncio's buffer passes its
    high-water mark) and small enough to fit (~160 KB: only the kernel holds them): both
    end in a reset within the stuck timeout, none in a FIN stuck in FIN-WAIT-1."""
    server = await spawn(limits={**FAST, "stuck_timeout": 2.0, "history": 1000})
    async with httpx.AsyncClient() as http:
        for _ in range(1000):  # a page of ~8 MB: more than the kernel's buffers take
            await http.post(server.url + "api/messages",
                            json={"user": "bob", "text": "\U0001f600" * 1990})
    rss_before = server.rss_kib()
    groups = {"8 MB": await unread_pages(server, 20, 1),
              "160 KB": await unread_pages(server, 20, 980)}
    ports = {sock.getsockname()[1]: size for size, socks in groups.items() for sock in socks}
    started = time.monotonic()
    rss_peak = server.rss_kib()
    within: dict[str, float] = {}
    try:
        async with asyncio.timeout(30):
            while len(within) < len(groups):  # bounded by the timeout
                live = server_side_states(server.port, set(ports))
                for size in set(groups) - set(within) - {ports[p] for p in live}:
                    within[size] = round(time.monotonic() - started, 1)
                rss_peak = max(rss_peak, server.rss_kib())
                await asyncio.sleep(0.2)
        resets = {size: sum(map(ended_by_reset, socks)) for size, socks in groups.items()}
    finally:
        for socks in groups.values():
            for sock in socks:
                sock.close()
    for size in groups:
        figures(f"HTTP slow readers (20 unread {size} pages, 4 KB receive buffers)",
                reset=resets[size], gone_within_s=within[size])
    figures("HTTP slow readers (20 unread 8 MB pages, 4 KB receive buffers)",
            rss_growth_mib=round((rss_peak - rss_before) / 1024, 1))
    assert resets == {size: 20 for size in groups}, resets


async def test_redis_flushall_oom_and_hang(spawn, figures, tmp_path):
    import os
    import signal

    import redis.asyncio as aioredis
    from redis_fixtures import require_programs

    from chatlib.cluster import RedisProcess

    require_programs("redis-server")
    redis = RedisProcess(tmp_path / "redis")
    await redis.start()
    admin = aioredis.Redis.from_url(redis.url)
    try:
        server = await spawn(cli=["--redis", redis.url, "--rate", "1000000",
                                  "--burst", "1000000"])
        url = server.url + "api/messages"
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(5):
                assert (await http.post(url, json={"user": "a", "text": f"m{i}"})).status_code \
                    == 201
            # FLUSHALL under a connected WebSocket: closed with 1012, to resume into a reset.
            ws = await ws_open(server.ws_url)
            await ws.send(json.dumps({"type": "hello", "user": "w", "after": 5}))
            await admin.flushall()
            started = time.monotonic()
            await http.post(url, json={"user": "a", "text": "after"})
            try:
                async with asyncio.timeout(20):
                    while True:  # bounded by the timeout
                        await ws.recv()
            except Exception:  # noqa: BLE001 (the close is the point)
                pass
            flush_code, flush_s = ws.close_code, time.monotonic() - started
            # OOM: every write refused, with a JSON 503.
            await admin.config_set("maxmemory", 1)
            oom = [await http.post(url, json={"user": "a", "text": "no room"})
                   for _ in range(20)]
            await admin.config_set("maxmemory", 0)
            oom_json_503 = sum(r.status_code == 503 and r.headers["content-type"]
                               == "application/json" for r in oom)
            # A hung Redis (SIGSTOP, past the command timeout): 503 "unknown", resend once.
            body = {"user": "a", "text": "into a hung Redis", "client_id": "hung"}
            os.kill(redis.process.pid, signal.SIGSTOP)
            try:
                hung = await http.post(url, json=body)
            finally:
                os.kill(redis.process.pid, signal.SIGCONT)
            for _ in range(100):  # bounded: until Redis answers again
                again = await http.post(url, json=body)
                if again.status_code != 503:
                    break
            texts = [m["text"] for m in (await http.get(url + "?after=0")).json()["messages"]]
    finally:
        await admin.aclose()
        redis.kill()
    figures("Redis faults (FLUSHALL, maxmemory OOM, SIGSTOP past the timeout)",
            flushall_close=flush_code, flushall_closed_within_s=round(flush_s, 1),
            oom_json_503=f"{oom_json_503}/20", hung_status=hung.status_code,
            resend_status=again.status_code, stored_once=texts.count("into a hung Redis"),
            tracebacks=tracebacks(server))
    assert flush_code == 1012 and oom_json_503 == 20 and hung.status_code == 503
    assert texts.count("into a hung Redis") == 1 and tracebacks(server) == 0
