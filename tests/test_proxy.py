"""chatlib behind jupyter-server-proxy, the way JupyterHub and Binder serve it.

One real Jupyter server runs for this module, on 127.0.0.1 with ``base_url=/user/learner/``,
no token, no password, and its own temporary HOME and JUPYTER_* directories. Each test starts
a chat server in this process (port 0) and reaches it only through
``http://127.0.0.1:J/user/learner/proxy/P/``: the page and its assets, every Python client,
two Chromium pages per forced transport, and the origin checks.

What jupyter-server-proxy (4.x) does, which these tests pin down:

* it forwards ``Host``, ``Origin`` and ``Cookie`` exactly as the browser sent them and adds
  ``X-Forwarded-Prefix`` / ``X-Forwarded-Context`` (no ``X-Forwarded-Host``), so chatlib's
  same-origin check compares the Jupyter origin with the Jupyter host and passes;
* it does not ask POSTs for Jupyter's XSRF token (``check_xsrf_cookie`` is a no-op in its
  handler: "defer to proxied apps"), so the page's POSTs need nothing extra and the origin
  check of the chat server is what refuses a foreign page;
* it streams a response only if the request said ``Accept: text/event-stream`` (any other
  response is buffered until it ends);
* Jupyter's own origin check refuses a foreign WebSocket handshake (403); an origin that
  Jupyter allows (``allow_origin_pat``, as deployments that serve Thebe do) is accepted by
  the proxy before it opens the chat server's WebSocket, so chatlib's refusal shows as a
  dropped connection;
* it relays WebSocket frames but not close codes: a client sees 1005 (no status), not 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatlib import PollingClient, WebSocketClient
from chatlib.browser import launch, unavailable
from chatlib.clients import ChatRefused
from chatlib.proxy import public_url

pytestmark = pytest.mark.timeout(120)

BASE_URL = "/user/learner/"
TRANSPORTS = ("poll", "longpoll", "sse", "ws")
FOREIGN_ORIGIN = "http://evil.example"
JUPYTER_ALLOWED_ORIGIN = "http://thebe.example"  # Jupyter lets it in; chatlib must not
STARTUP_TIMEOUT = 30.0  # hang guard for the Jupyter server to answer
IO_TIMEOUT = 10.0  # hang guard for one client operation


# -- the Jupyter server -----------------------------------------------------------------


@dataclass
class Jupyter:
    process: subprocess.Popen
    port: int
    runtime_dir: Path

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proxied(self, server) -> str:
        """The chat server's URL through this Jupyter server's proxy."""
        return f"{self.origin}{BASE_URL}proxy/{server.port}/"


def _log_tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-4000:]
    return ""


def _stop(process: subprocess.Popen) -> None:
    """Terminate the server's whole process group (it may have children), then reap it."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory) -> Jupyter:
    tmp = tmp_path_factory.mktemp("jupyter")
    root = tmp / "root"
    root.mkdir()
    runtime_dir = tmp / "runtime"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JUPYTER", "JUPYTERHUB_", "CHATLIB_"))}
    env.update(HOME=str(tmp / "home"), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_DATA_DIR=str(tmp / "data"), JUPYTER_RUNTIME_DIR=str(runtime_dir),
               IPYTHONDIR=str(tmp / "ipython"))
    command = [
        sys.executable, "-m", "jupyter_server", "--no-browser",
        "--ip=127.0.0.1", "--port=0", f"--ServerApp.base_url={BASE_URL}",
        "--IdentityProvider.token=", "--PasswordIdentityProvider.hashed_password=",
        f"--ServerApp.root_dir={root}",
        f"--ServerApp.allow_origin_pat=^{re.escape(JUPYTER_ALLOWED_ORIGIN)}$",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = tmp / "jupyter.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        port = _wait_ready(process, runtime_dir / f"jpserver-{process.pid}.json", log)
        yield Jupyter(process, port, runtime_dir)
    finally:
        _stop(process)


def _wait_ready(process: subprocess.Popen, info: Path, log: Path) -> int:
    """The server's port once it answers ``GET <base>api/status``; fail after a deadline."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    port = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"jupyter server exited with {process.returncode}\n{_log_tail(log)}")
        if port is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                port = int(json.loads(info.read_text())["port"])
        if port is not None:
            with contextlib.suppress(httpx.HTTPError):
                url = f"http://127.0.0.1:{port}{BASE_URL}api/status"
                if httpx.get(url, timeout=2).status_code == 200:
                    return port
        time.sleep(0.1)
    pytest.fail(f"jupyter server not ready after {STARTUP_TIMEOUT} s\n{_log_tail(log)}")


# -- what the proxy forwards --------------------------------------------------------------


async def test_proxy_forwards_host_and_origin_and_skips_xsrf(jupyter, http):
    """A bare backend prints what arrives: the facts chatlib's origin check relies on."""
    heads: asyncio.Queue[bytes] = asyncio.Queue()

    async def backend(reader, writer):
        heads.put_nowait(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(backend, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        url = f"{jupyter.origin}{BASE_URL}proxy/{port}/api/messages"
        # A browser-like POST: an _xsrf cookie but no token anywhere. Jupyter's own API
        # refuses exactly that (control) ...
        cookies = {"Origin": jupyter.origin, "Cookie": "_xsrf=2|abc|def|1"}
        own = await http.post(f"{jupyter.origin}{BASE_URL}api/contents", headers=cookies,
                              json={})
        assert own.status_code == 403 and "xsrf" in own.text.lower()
        # ... while the proxy passes it through to the backend.
        response = await http.post(url, headers=cookies, json={"user": "ada", "text": "x"})
        assert response.status_code == 204
        head = await asyncio.wait_for(heads.get(), IO_TIMEOUT)
    finally:
        listener.close()
        await listener.wait_closed()

    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "POST /api/messages HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    assert headers["host"] == f"127.0.0.1:{jupyter.port}"  # the browser's Host, unchanged
    assert headers["origin"] == jupyter.origin
    assert "_xsrf=" in headers["cookie"]
    assert headers["x-forwarded-prefix"] == f"{BASE_URL}proxy/{port}"
    assert "x-forwarded-host" not in headers


# -- the page -----------------------------------------------------------------------------


async def test_page_and_assets_through_proxy(jupyter, server, http):
    url = jupyter.proxied(server)
    page = await http.get(url)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # Every URL in the page is relative, so it stays under the proxy prefix.
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    assert not re.search(r'(?:src|href)="/', page.text)
    for asset, kind in (("static/app.js", "javascript"), ("static/style.css", "text/css")):
        response = await http.get(url + asset)
        assert response.status_code == 200, asset
        assert kind in response.headers["content-type"]
        assert response.content == (Path(__file__).parent.parent / asset).read_bytes()
    assert (await http.get(url + "static/../chatlib/app.py")).status_code == 404
    presence = await http.get(url + "api/presence")
    assert presence.status_code == 200 and presence.json() == {"users": [], "count": 0}


# -- Python clients -----------------------------------------------------------------------


@pytest.mark.parametrize("sender", TRANSPORTS)
async def test_python_clients_through_proxy(jupyter, server, make_client, sender):
    """One client of ``sender``'s transport talks with one reader of every transport."""
    url = jupyter.proxied(server)
    async with asyncio.timeout(30):
        readers = {t: await make_client(t, url, f"{t}-reader") for t in TRANSPORTS}
        writer = await make_client(sender, url, f"{sender}-writer")
        await writer.send(f"hello from {sender}")
        for transport, reader in readers.items():
            message = await reader.receive(timeout=IO_TIMEOUT)
            assert (message.user, message.text) == (f"{sender}-writer", f"hello from {sender}"), \
                transport
        for transport, reader in readers.items():
            await reader.send(f"{transport} answers {sender}")
        received = await writer.receive_many(1 + len(readers), timeout=IO_TIMEOUT)
    assert [m.text for m in received] == [f"hello from {sender}"] + [
        f"{t} answers {sender}" for t in TRANSPORTS]
    assert [m.id for m in received] == sorted(m.id for m in received)


async def test_sse_client_streams_through_proxy(jupyter, server, make_client):
    """Live SSE events arrive while the stream is open (the proxy does not buffer them)."""
    url = jupyter.proxied(server)
    sse = await make_client("sse", url, "listener")
    assert sse._stream.headers["content-type"].startswith("text/event-stream")
    for n in range(3):
        await server.hub.post("bot", f"live {n}")
        message = await sse.receive(timeout=IO_TIMEOUT)
        assert message.text == f"live {n}"


# -- origins --------------------------------------------------------------------------------


async def test_origins_through_proxy(jupyter, server, http):
    url = jupyter.proxied(server)
    ws_url = url.replace("http://", "ws://", 1) + "ws"

    # The page's own origin (the Jupyter origin) is accepted on POST and WebSocket.
    async with WebSocketClient(url, "same-ws", origin=jupyter.origin) as same_ws:
        same_http = PollingClient(url, "same-http", origin=jupyter.origin, interval=0.05)
        async with same_http:
            await same_http.send("same origin over POST")
            await same_ws.send("same origin over ws")
            texts = [m.text for m in await same_ws.receive_many(2, timeout=IO_TIMEOUT)]
    assert sorted(texts) == ["same origin over POST", "same origin over ws"]
    before = await server.hub.log.last_id()

    # A foreign page's POST passes Jupyter (no XSRF check) and is refused by chatlib (a
    # client without a name: one with a name would be refused already at its join POST).
    async with PollingClient(url, "", origin=FOREIGN_ORIGIN) as mallory:
        with pytest.raises(ChatRefused) as refused:
            await mallory.send("forged")
    assert (refused.value.status, refused.value.error) == (403, "origin not allowed")
    typing = await http.post(url + "api/typing", json={"user": "mallory"},
                             headers={"Origin": FOREIGN_ORIGIN})
    assert typing.status_code == 403

    # A foreign WebSocket is refused by Jupyter's own origin check, at the handshake.
    with pytest.raises(InvalidStatus) as invalid:
        async with ws_connect(ws_url, origin=FOREIGN_ORIGIN, open_timeout=IO_TIMEOUT):
            pass
    assert invalid.value.response.status_code == 403

    # An origin that Jupyter itself grants CORS (allow_origin_pat) gets no CORS through the
    # proxy (the proxied answer replaces Jupyter's headers): no preflight succeeds, so no
    # page can add X-Forwarded-Host; its simple POST reaches chatlib, which refuses it.
    own = await http.get(f"{jupyter.origin}{BASE_URL}api/status",
                         headers={"Origin": JUPYTER_ALLOWED_ORIGIN})
    assert own.headers["access-control-allow-origin"] == JUPYTER_ALLOWED_ORIGIN  # control
    preflight = await http.options(url + "api/messages", headers={
        "Origin": JUPYTER_ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-forwarded-host"})
    assert "access-control-allow-origin" not in preflight.headers
    simple = await http.post(url + "api/messages", content=b'{"user": "t", "text": "x"}',
                             headers={"Origin": JUPYTER_ALLOWED_ORIGIN,
                                      "Content-Type": "text/plain"})
    assert simple.status_code == 403

    # An origin Jupyter allows still gets nothing from chatlib: the proxy has already
    # answered 101 when chatlib refuses (403), so the proxy drops the connection.
    with pytest.raises(ConnectionClosed):
        async with ws_connect(ws_url, origin=JUPYTER_ALLOWED_ORIGIN,
                              open_timeout=IO_TIMEOUT) as ws:
            await ws.send(json.dumps({"type": "hello", "user": "thebe", "after": 0}))
            await ws.send(json.dumps({"type": "message", "text": "forged"}))
            await asyncio.wait_for(ws.recv(), IO_TIMEOUT)
    assert await server.hub.log.last_id() == before  # nothing forged got in


# -- public_url -------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No hub, no override, and a Jupyter runtime directory without servers."""
    for name in ("JUPYTERHUB_SERVICE_PREFIX", "CHATLIB_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    return monkeypatch


async def test_public_url(jupyter, server, http, clean_env):
    assert public_url(server) == server.url == f"http://127.0.0.1:{server.port}/"

    for prefix in (BASE_URL, BASE_URL.rstrip("/")):
        clean_env.setenv("JUPYTERHUB_SERVICE_PREFIX", prefix)
        assert public_url(server) == f"{BASE_URL}proxy/{server.port}/"
    # The path resolves against the Jupyter origin, as a link in the notebook does.
    page = await http.get(jupyter.origin + public_url(server))
    assert page.status_code == 200 and 'src="static/app.js"' in page.text

    clean_env.setenv("CHATLIB_PUBLIC_URL", "https://hub.example.org/user/ada/proxy/{port}")
    assert public_url(server) == f"https://hub.example.org/user/ada/proxy/{server.port}/"


async def test_public_url_from_parent_jupyter_server(jupyter, server, clean_env):
    """In a kernel, the parent process is the Jupyter server; its jpserver file has base_url."""
    clean_env.setenv("JUPYTER_RUNTIME_DIR", str(jupyter.runtime_dir))
    assert public_url(server) == server.url  # we are not that server's kernel
    clean_env.setattr(os, "getppid", lambda: jupyter.process.pid)
    assert public_url(server) == f"{BASE_URL}proxy/{server.port}/"


# -- the browser --------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [
    ("ws", "ws"), ("sse", "sse"), ("longpoll", "longpoll"), ("poll", "poll"),
    ("ws", "longpoll"), ("sse", "poll"),
])
async def test_browser_pages_chat_through_proxy(jupyter, server, first, second):
    playwright_api = pytest.importorskip("playwright.async_api")
    if reason := unavailable():
        pytest.skip(reason)
    expect = playwright_api.expect
    url = jupyter.proxied(server)
    responses: list[tuple[str, int]] = []
    requests = []
    sockets: list[str] = []
    errors: list[str] = []

    async with playwright_api.async_playwright() as pw:
        browser = await launch(pw)
        try:
            context = await browser.new_context()
            context.on("request", lambda r: requests.append(r))
            context.on("response", lambda r: responses.append((r.url, r.status)))
            pages = {}
            for nick, transport in (("ada", first), ("bob", second)):
                page = await context.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("websocket", lambda ws: sockets.append(ws.url))
                await page.goto(f"{url}?transport={transport}&user={nick}")
                await expect(page.locator("#transport")).to_have_text(transport)
                await expect(page.locator("#status")).to_have_text(
                    "connected", timeout=IO_TIMEOUT * 1000)
                pages[nick] = page

            for sender, receiver in (("ada", "bob"), ("bob", "ada")):
                text = f"{sender} says hi {uuid.uuid4().hex[:8]}"
                await pages[sender].fill("#message-input", text)
                await pages[sender].click("#send")
                for page in (pages[receiver], pages[sender]):
                    shown = page.locator("#messages .message .text", has_text=text)
                    await expect(shown).to_have_count(1, timeout=IO_TIMEOUT * 1000)

            posts = [r for r in requests if r.method == "POST"]
            origins = {(await r.all_headers()).get("origin") for r in posts}
        finally:
            await browser.close()

    assert not errors
    http_urls = [u for u, _ in responses if u.startswith("http")]
    assert http_urls and all(u.startswith(url) for u in http_urls), http_urls
    assert not [(u, s) for u, s in responses if s >= 400]
    expected_sockets = [url.replace("http://", "ws://", 1) + "ws"] * (first, second).count("ws")
    assert sockets == expected_sockets
    # HTTP transports send with POST; the browser's Origin is the Jupyter origin, accepted.
    assert len(posts) >= sum(t != "ws" for t in (first, second))
    assert origins == ({jupyter.origin} if posts else set())


async def test_server_stop_reaches_clients_through_proxy(jupyter, server, make_client):
    """Stopping the chat server ends proxied streams and sockets promptly. The proxy does
    not relay close codes: a WebSocket client sees no status (1005) instead of 1001."""
    url = jupyter.proxied(server)
    ws = await make_client("ws", url, "ws-user")
    sse = await make_client("sse", url, "sse-user")
    await server.stop()
    with pytest.raises(ConnectionClosed) as closed:
        await ws.receive(timeout=IO_TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code in (1001, 1005)
    with pytest.raises(ConnectionError):
        await sse.receive(timeout=IO_TIMEOUT)
