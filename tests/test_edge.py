"""The HTTP edge: what reaches the app (Host, Origin, Content-Type) and how connections are
opened, bounded and closed (header timeout, body budget, lingering close, descriptors).

Raw sockets where the exact bytes matter; every wait is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from chatlib import Limits

T = 10.0  # hang guard for one exchange


async def raw_request(port: int, data: bytes, timeout: float = T) -> tuple[int | None, bytes]:
    """Send ``data`` on a new connection; ``(status, body)`` of the answer, ``None`` if none."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return None, b""
            status = int(head.split()[1])
            length = [line for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")]
            if status == 101:
                body = b""
            elif length:
                body = await reader.readexactly(int(length[0].split(b":")[1]))
            else:
                body = await reader.read()
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


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
        status, body = await raw_request(server.port, data)
        assert status == 403, name
        error = json.loads(body)["error"]
        assert "evil.example" in error and "--allow-host" in error, name
        assert f"http://127.0.0.1:{server.port}/" in error, name
    assert await server.hub.log.last_id() == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "LOCALHOST.", "chat.localhost",
                                  "10.1.2.3", "[fe80::1]"])
async def test_local_names_and_ip_literals_are_allowed(server, host):
    for with_port in (f"{host}:{server.port}", host):
        status, _ = await raw_request(server.port, request("GET", "/api/presence", with_port))
        assert status == 200, with_port
    status, _ = await raw_request(server.port, handshake(f"{host}:{server.port}"))
    assert status == 101


@pytest.mark.parametrize("limits", [Limits(allowed_hosts={"Chat.Example"})])
async def test_allowed_hosts_are_configurable(server):
    ok = request("POST", "/api/messages", f"chat.example:{server.port}", JSON,
                 f"Origin: http://chat.example:{server.port}", body=MESSAGE)
    assert (await raw_request(server.port, ok))[0] == 201
    other = request("GET", "/api/presence", f"other.example:{server.port}")
    assert (await raw_request(server.port, other))[0] == 403


@pytest.mark.parametrize("limits", [Limits(allowed_hosts={"*"})])
async def test_star_allows_any_host(server):
    status, _ = await raw_request(server.port, request("GET", "/api/presence", "any.example"))
    assert status == 200


async def test_public_url_host_is_allowed(start_chat, monkeypatch):
    monkeypatch.setenv("CHATLIB_PUBLIC_URL", "https://ada-{port}.app.example.dev/")
    server = await start_chat()
    status, _ = await raw_request(
        server.port, request("GET", "/api/presence", f"ada-{server.port}.app.example.dev"))
    assert status == 200


async def test_behind_jupyterhub_a_relayed_host_is_allowed(start_chat, monkeypatch):
    """On a hub the browser reaches the kernel only through jupyter-server-proxy, with the
    hub's own name in Host and the hub's port (not ours). A Host that names our own port
    came straight to us, and is still checked."""
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    server = await start_chat()
    for host in ("hub.example.org", "hub.example.org:8443"):
        status, _ = await raw_request(server.port, request("GET", "/api/presence", host))
        assert status == 200, host
        status, _ = await raw_request(server.port, handshake(host, f"https://{host}"))
        assert status == 101, host
    direct = f"evil.example:{server.port}"
    status, _ = await raw_request(server.port, request("GET", "/api/presence", direct))
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
