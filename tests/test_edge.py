"""The HTTP edge: what reaches the app (Host, Origin, Content-Type) and how connections are
opened, bounded and closed (header timeout, body budget, lingering close, descriptors).

Raw sockets where the exact bytes matter; every wait is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import sys
from pathlib import Path

import httpx
import pytest
from conftest import send_raw_http
from helpers import end_process
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from chatlib import Limits

T = 10.0  # hang guard for one exchange


def request(method: str, path: str, host: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def handshake(host: str, origin: str | None = None) -> bytes:
    headers = ["Upgrade: websocket", "Connection: Upgrade",
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if origin:
        headers.append(f"Origin: {origin}")
    return (f"GET /ws HTTP/1.1\r\nHost: {host}\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode()


JSON = "Content-Type: application/json"
MESSAGE = json.dumps({"user": "mallory", "text": "rebound"}).encode()


# -- Host allowlist (DNS rebinding) --------------------------------------------------------


async def test_rebinding_host_is_refused_on_every_transport(server):
    """A page on evil.example whose name now resolves to 127.0.0.1 is same-origin with
    itself: Origin matches Host. The Host allowlist refuses it everywhere, with a hint."""
    host = f"evil.example:{server.port}"
    origin = f"Origin: http://{host}"
    attempts = {
        "page": request("GET", "/", host),
        "history": request("GET", "/api/messages?after=0", host),
        "events": request("GET", "/api/events", host, "Accept: text/event-stream"),
        "presence": request("GET", "/api/presence", host),
        "post": request("POST", "/api/messages", host, origin, JSON, body=MESSAGE),
        "typing": request("POST", "/api/typing", host, origin, JSON, body=b'{"user": "m"}'),
        "websocket": handshake(host, f"http://{host}"),
    }
    for name, data in attempts.items():
        status, _, body = await send_raw_http(server.port, data)
        assert status == 403, name
        error = json.loads(body)["error"]
        assert "evil.example" in error and "--allow-host" in error, name
        assert f"http://127.0.0.1:{server.port}/" in error, name
    assert await server.hub.log.last_id() == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "LOCALHOST.", "chat.localhost",
                                  "10.1.2.3", "[fe80::1]"])
async def test_local_names_and_ip_literals_are_allowed(server, host):
    for with_port in (f"{host}:{server.port}", host):
        status, _, _ = await send_raw_http(server.port, request("GET", "/api/presence", with_port))
        assert status == 200, with_port
    status, _, _ = await send_raw_http(server.port, handshake(f"{host}:{server.port}"))
    assert status == 101


@pytest.mark.parametrize("limits", [Limits(allowed_hosts={"Chat.Example"})])
async def test_allowed_hosts_are_configurable(server):
    ok = request("POST", "/api/messages", f"chat.example:{server.port}", JSON,
                 f"Origin: http://chat.example:{server.port}", body=MESSAGE)
    assert (await send_raw_http(server.port, ok))[0] == 201
    other = request("GET", "/api/presence", f"other.example:{server.port}")
    assert (await send_raw_http(server.port, other))[0] == 403


@pytest.mark.parametrize("limits", [Limits(allowed_hosts={"*"})])
async def test_star_allows_any_host(server):
    status, _, _ = await send_raw_http(server.port, request("GET", "/api/presence", "any.example"))
    assert status == 200


async def test_public_url_host_is_allowed(start_chat, monkeypatch):
    monkeypatch.setenv("CHATLIB_PUBLIC_URL", "https://ada-{port}.app.example.dev/")
    server = await start_chat()
    status, _, _ = await send_raw_http(
        server.port, request("GET", "/api/presence", f"ada-{server.port}.app.example.dev"))
    assert status == 200


async def test_behind_jupyterhub_a_relayed_host_is_allowed(start_chat, monkeypatch):
    """On a hub the browser reaches the kernel only through jupyter-server-proxy, with the
    hub's own name in Host and the hub's port (not ours). A Host that names our own port
    came straight to us, and is still checked."""
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    server = await start_chat()
    for host in ("hub.example.org", "hub.example.org:8443"):
        status, _, _ = await send_raw_http(server.port, request("GET", "/api/presence", host))
        assert status == 200, host
        status, _, _ = await send_raw_http(server.port, handshake(host, f"https://{host}"))
        assert status == 101, host
    direct = f"evil.example:{server.port}"
    status, _, _ = await send_raw_http(server.port, request("GET", "/api/presence", direct))
    assert status == 403


# -- Content-Type ------------------------------------------------------------------------------


async def test_post_requires_json_content_type(server, http):
    """A cross-site form can send only these types: none of them may post."""
    for path, body in (("api/messages", MESSAGE), ("api/typing", b'{"user": "m"}')):
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x", "application/jsonx"):
            headers = {"Content-Type": content_type} if content_type else {}
            response = await http.post(server.url + path, content=body, headers=headers)
            assert response.status_code == 415, (path, content_type)
            assert "application/json" in response.json()["error"]
    assert await server.hub.log.last_id() == 0
    response = await http.post(server.url + "api/messages", content=MESSAGE,
                               headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 201


@pytest.mark.parametrize("limits", [Limits(header_timeout=0.2, body_timeout=0.2)])
async def test_http_timers_leave_an_upgraded_websocket_alone(server, make_client):
    """The header and body timers belong to HTTP: a WebSocket outlives them untouched (an
    upgrade request is still "sending its body" for h11 when uvicorn hands it over)."""
    ws = await make_client("ws", server, "ada")
    await asyncio.sleep(0.6)  # outlast both timers: the absence of a 408 is the point
    await ws.send("still here")
    assert (await ws.receive(timeout=T)).text == "still here"


# -- request body budget (tiny chunks) ---------------------------------------------------------


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


@pytest.mark.parametrize("limits", [Limits(max_body_chunks=16)])
async def test_too_many_chunks_is_413_at_once(server, http):
    head = request("POST", "/api/messages", "127.0.0.1", JSON, "Transfer-Encoding: chunked")
    # 2,000 chunks of one byte of JSON whitespace: a valid body, but 1,984 chunks too many.
    body = chunked(*[b" "] * 2000, MESSAGE)
    status, _, answer = await send_raw_http(server.port, head + body)
    assert status == 413
    assert b"more than 16 chunks" in answer
    # A body in a few chunks is fine.
    status, _, _ = await send_raw_http(server.port, head + chunked(MESSAGE[:10], MESSAGE[10:]))
    assert status == 201
    assert await server.hub.log.last_id() == 1


@pytest.mark.parametrize("limits", [Limits(body_timeout=0.3)])
async def test_slow_body_is_408(server):
    """A body that stops arriving is cut off after body_timeout (not held forever)."""
    head = request("POST", "/api/messages", "127.0.0.1", JSON, "Content-Length: 100")
    status, _, answer = await send_raw_http(server.port, head + b'{"user": "slow"')
    assert status == 408
    assert b"request body not complete within 0.3 s" in answer


# -- header timeout (slowloris), malformed and incomplete requests -----------------------------


@pytest.mark.parametrize("limits", [Limits(header_timeout=0.3)])
async def test_slow_headers_are_408(server):
    status, _, answer = await send_raw_http(server.port, b"GET /api/presence HTTP/1.1\r\nHost: 12")
    assert status == 408
    assert b"request headers not complete within 0.3 s" in answer


@pytest.mark.parametrize("limits", [Limits(header_timeout=0.3)])
async def test_a_connection_that_sends_nothing_is_closed(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        async with asyncio.timeout(T):
            assert await reader.read() == b""  # EOF: the server closed it
    finally:
        writer.close()


@pytest.mark.parametrize("limits", [Limits(header_timeout=0.3)])
async def test_header_timeout_applies_to_each_keep_alive_request(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /api/presence HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(T):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readuntil(b"}")
            writer.write(b"GET /api/presence HTTP/1.1\r\nHost: 127")  # ... and stops
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
    finally:
        writer.close()


async def test_incomplete_request_then_eof_is_400_at_once(server):
    """A client that half-closes mid-request is told so at once (it waited for nothing)."""
    for partial in (b"GET /api/presence HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                    request("POST", "/api/messages", "127.0.0.1", JSON,
                            "Content-Length: 100") + b'{"user"'):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(partial)
            writer.write_eof()
            async with asyncio.timeout(T):
                answer = await reader.read()
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
        assert answer.endswith(b"400 incomplete request\n")


async def test_malformed_request_is_400_with_a_short_reason(server):
    status, _, answer = await send_raw_http(server.port, b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400
    assert answer == b"400 illegal request line\n"  # the client's bytes are not echoed


async def test_unsupported_transfer_coding_is_400_not_501(server):
    """h11 suggests 501 for it; but no client input may get a 5xx."""
    data = request("POST", "/api/messages", "127.0.0.1", JSON, "Transfer-Encoding: gzip")
    status, _, answer = await send_raw_http(server.port, data)
    assert status == 400, answer


@pytest.mark.parametrize("extra", [
    ["Transfer-Encoding: chunked"],
    [f"X-Many-{n}: x" for n in range(200)],
], ids=["transfer-encoding", "200 headers"])
async def test_handshake_h11_accepts_but_websockets_refuses_is_400(server, extra):
    """uvicorn hands such a request to websockets' stricter parser, which refused it
    silently: the client waited forever. Now it gets 400 at once, saying why."""
    data = handshake("127.0.0.1").replace(b"\r\n\r\n", b"\r\n" + "\r\n".join(extra).encode()
                                          + b"\r\n\r\n")
    if "chunked" in extra[0]:
        data += b"0\r\n\r\n"
    status, _, answer = await send_raw_http(server.port, data)
    assert status == 400
    assert answer.startswith(b"400 ") and len(answer) < 100


# -- refused clients can read why (lingering close) --------------------------------------------

@pytest.fixture
async def served(tmp_path):
    """``await served(*args, preexec=None)``: ``python -m chatlib serve --port 0 *args`` in a
    process of its own; returns ``(process, port)``. Stopped (SIGTERM, then SIGKILL) after."""
    processes = []

    async def start(*args: str, preexec=None, env=None):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatlib", "serve", "--port", "0", *args,
            stdout=asyncio.subprocess.PIPE, stderr=(tmp_path / "stderr").open("wb"),
            preexec_fn=preexec, cwd=tmp_path, env={**os.environ, **(env or {})})
        processes.append(process)
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        assert "serving on" in line, (line, (tmp_path / "stderr").read_text())
        return process, int(line.split("serving on ")[1].split()[0].rstrip("/").rsplit(":")[-1])

    try:
        yield start
    finally:
        for process in processes:
            await end_process(process)


async def post_1mb_then_read(port: int) -> bool:
    """Like many clients: write the whole 1 MB body, then read. Did the 413 arrive?"""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("POST", "/api/messages", "127.0.0.1", JSON,
                             "Content-Length: 1048576"))
        with contextlib.suppress(OSError):
            for _ in range(16):
                writer.write(bytes(65536))
                await writer.drain()
        async with asyncio.timeout(T):
            return (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 413")
    except (OSError, asyncio.IncompleteReadError):
        return False  # reset: the 413 was thrown away
    finally:
        writer.close()


async def test_refused_big_post_reads_its_413(served):
    """The server runs in a process of its own, as in bench/edge.py (8 in 80 lost before)."""
    _, port = await served()
    assert [await post_1mb_then_read(port) for _ in range(80)] == [True] * 80


async def frame_1mb_then_read(port: int) -> bool:
    """A WebSocket client writes a 1 MB frame (64 KB allowed), then reads: close 1009?"""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(handshake("127.0.0.1"))
        async with asyncio.timeout(T):
            await reader.readuntil(b"\r\n\r\n")
        writer.write(bytes([0x81, 0xFF]) + (1 << 20).to_bytes(8, "big") + bytes(4))  # mask 0
        with contextlib.suppress(OSError):
            for _ in range(16):
                writer.write(b"x" * 65536)
                await writer.drain()
        async with asyncio.timeout(T):
            close = await reader.readexactly(4)
        return close[0] == 0x88 and close[2:4] == (1009).to_bytes(2, "big")
    except (OSError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def test_oversized_frame_client_reads_1009(served):
    """78 in 80 of these clients got a reset instead of the close frame before."""
    _, port = await served()
    assert [await frame_1mb_then_read(port) for _ in range(40)] == [True] * 40


@pytest.mark.parametrize("limits", [Limits(hello_timeout=0.3)])
async def test_hello_timeout_sends_a_close_frame(server):
    async with ws_connect(server.ws_url, open_timeout=T) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
    assert ws.close_code == 1008
    assert ws.close_reason == "no hello within 0.3 s"


async def test_serve_allow_host_option(served):
    _, port = await served("--allow-host", "chat.example", "--allow-host", "other.example")
    for host, status in (("chat.example", 200), (f"other.example:{port}", 200),
                         ("evil.example", 403)):
        assert (await send_raw_http(port, request("GET", "/api/presence", host)))[0] == status


# -- file descriptors --------------------------------------------------------------------------


def fd_limit(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


@pytest.mark.parametrize(("soft", "hard", "warned"), [(256, 2048, True), (256, 8192, False)])
async def test_server_raises_its_descriptor_limit(served, tmp_path, soft, hard, warned):
    process, _ = await served(preexec=fd_limit(soft, hard))
    assert open_files_limit(process.pid) == hard
    stderr = (tmp_path / "stderr").read_text()
    assert ("may open only 2048 files" in stderr) is warned, stderr


async def test_out_of_descriptors_backs_off_and_recovers(served, tmp_path, http):
    """With 64 descriptors, 100 idle connections exhaust them. The server logs one line (not
    a traceback per accept attempt), and serves again once the header timeout has closed
    the idle ones."""
    process, port = await served("--header-timeout", "0.5", preexec=fd_limit(64, 64))
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
    try:
        async with asyncio.timeout(30):
            while True:  # bounded by the timeout
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.get(f"http://127.0.0.1:{port}/api/presence",
                                              timeout=1)
                    if response.status_code == 200:
                        break
                await asyncio.sleep(0.1)
    finally:
        for _, writer in idle:
            writer.close()
    stderr = (tmp_path / "stderr").read_text()
    assert "may open only 64 files" in stderr
    assert stderr.count("open-files limit 64 reached (Too many open files): new clients wait "
                        "until others leave; raise it with `ulimit -n 65536`") == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "out of system resource" not in stderr
    assert process.returncode is None


# -- stopping ------------------------------------------------------------------------------------


async def test_stop_does_not_swallow_the_callers_cancellation(start_chat):
    """Even when uvicorn hangs in shutdown (here: made to), cancelling the task that awaits
    stop() cancels it; the port is freed all the same."""
    server = await start_chat(shutdown_timeout=0)
    hang = asyncio.Event()

    async def hung_shutdown(sockets=None):
        await hang.wait()

    server._server.shutdown = hung_shutdown
    stopping = asyncio.ensure_future(server.stop())
    try:
        async with asyncio.timeout(T):
            while not server._server.force_exit:  # stop() gave up waiting politely
                await asyncio.sleep(0.05)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(stopping, T)
        with socket.socket() as probe:  # the port is free again
            probe.bind(("127.0.0.1", server.port))
    finally:
        hang.set()
