"""Token mode (chatlib.auth): every transport refuses without the token and works with it.

Directly, through a real jupyter-server-proxy (the ``jupyter`` fixture of test_proxy.py),
and in Chromium: the page opened from the token link chats over ws, sse, longpoll, poll
(the browser carries the token in the cookie that link set, since a page can set no header
on a WebSocket handshake or an EventSource).
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from conftest import TRANSPORTS
from helpers import needs_chromium, serve_cli
from test_proxy import jupyter  # noqa: F401  (a module fixture: a real Jupyter server)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatlib import ChatServer, PollingClient, start_server, stop_server, wire
from chatlib.auth import ERROR, page_path
from chatlib.browser import launch
from chatlib.clients import ChatRefused
from chatlib.proxy import public_url

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-T0ken_with.all~chars"
# (method, path, JSON body): every HTTP endpoint, the page and a static file.
ENDPOINTS = [
    ("GET", "", None),
    ("GET", "static/app.js", None),
    ("GET", "api/messages", None),
    ("GET", "api/messages?wait=1", None),
    ("POST", "api/messages", {"user": "mallory", "text": "let me in"}),
    ("POST", "api/typing", {"user": "mallory"}),
    ("GET", "api/presence", None),
    ("GET", "api/events", None),
]


@pytest.fixture
async def token_server(start_chat):
    return await start_chat(token=TOKEN)


async def request(http, url, method, body, headers=None):
    if "api/events" in url:  # a stream: read the body only when it is an error
        async with http.stream(method, url, headers=headers) as response:
            body = await response.aread() if response.status_code != 200 else b""
            return response.status_code, response.headers, body
    response = await http.request(method, url, json=body, headers=headers)
    return response.status_code, response.headers, response.content


def assert_refused(status, headers, content) -> None:
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="chatlib"'
    assert wire.loads(content) == {"error": ERROR}


# -- every transport refuses without it ------------------------------------------------


@pytest.mark.parametrize("method,path,body", ENDPOINTS)
@pytest.mark.parametrize("credentials", ["none", "wrong header", "wrong query",
                                         "wrong cookie", "not bearer"])
async def test_http_without_the_token_is_401(token_server, http, method, path, body,
                                             credentials):
    url, headers = token_server.url + path, {}
    if credentials == "wrong header":
        headers["Authorization"] = f"Bearer {TOKEN}x"
    elif credentials == "wrong query":
        url += ("&" if "?" in url else "?") + f"token={TOKEN[:-1]}"
    elif credentials == "wrong cookie":
        headers["Cookie"] = f"chatlib-token-{token_server.port}=nope"
    elif credentials == "not bearer":
        headers["Authorization"] = f"Basic {TOKEN}"
    assert_refused(*await request(http, url, method, body, headers))
    assert await token_server.log.after(0) == []


@pytest.mark.parametrize("credentials", ["none", "wrong", "other port's cookie"])
async def test_websocket_handshake_without_the_token_is_refused(token_server, credentials):
    headers = {"wrong": {"Authorization": "Bearer wrong"},
               "other port's cookie": {"Cookie": f"chatlib-token-1={TOKEN}"}}.get(credentials)
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(token_server.ws_url, additional_headers=headers, open_timeout=10):
            pass
    assert refused.value.response.status_code == 401
    assert wire.loads(refused.value.response.body) == {"error": ERROR}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_python_clients_without_the_token_are_refused(token_server, make_client,
                                                            transport):
    if transport == "ws":
        with pytest.raises(InvalidStatus):
            await make_client(transport, token_server, "ada", ready=False)
        return
    # The HTTP clients join the presence list when they connect (POST /api/presence).
    with pytest.raises(httpx.HTTPStatusError) as refused:
        await make_client(transport, token_server, "ada")
    assert refused.value.response.status_code == 401


async def test_a_python_client_without_the_token_cannot_send(token_server):
    client = PollingClient(token_server.url, "")  # no name: it joins nothing
    try:
        with pytest.raises(ChatRefused) as refused:
            await client.send("hi")
        assert (refused.value.status, refused.value.error) == (401, ERROR)
        assert client.pending == {}
    finally:
        await client.close()


# -- ... and works with it ----------------------------------------------------------------


@pytest.mark.parametrize("method,path,body", ENDPOINTS)
@pytest.mark.parametrize("credentials", ["header", "query", "cookie"])
async def test_http_with_the_token_works(token_server, http, method, path, body,
                                         credentials):
    url, headers = token_server.url + path, {}
    if credentials == "header":
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif credentials == "query":
        url += ("&" if "?" in url else "?") + f"token={TOKEN}"
    else:
        headers["Cookie"] = f"other=1; chatlib-token-{token_server.port}={TOKEN}"
    status, _, _ = await request(http, url, method, body, headers)
    if credentials == "query" and path == "" and method == "GET":
        assert status == 303  # the link to the page: sent to its own path (below)
        return
    assert status == {"api/messages": 201, "api/typing": 204}.get(path if method == "POST"
                                                                  else "", 200)


async def test_the_page_link_sets_the_cookie(token_server, http):
    page = await http.get(public_url(token_server) + "&user=ada")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    cookie = page.headers["set-cookie"]
    assert cookie == f"chatlib-token-{token_server.port}={TOKEN}; HttpOnly; SameSite=Strict"
    # The cookie alone (as the page's fetch, EventSource and WebSocket send it) now works.
    jar = {f"chatlib-token-{token_server.port}": TOKEN}
    async with httpx.AsyncClient(cookies=jar) as browser_like:
        assert (await browser_like.get(token_server.url + "api/presence")).status_code == 200
    async with ws_connect(token_server.ws_url, open_timeout=10, additional_headers={
            "Cookie": f"chatlib-token-{token_server.port}={TOKEN}"}) as ws:
        await ws.send(wire.dumps({"type": "hello", "user": "ada"}))
        await ws.send(wire.dumps({"type": "message", "text": "by cookie", "client_id": "c"}))
        async with asyncio.timeout(10):
            while wire.parse_ws(await ws.recv())[0] != "ack":  # bounded by the timeout
                pass
    # Only the page's link sets it: an API request with ?token= does not.
    api = await http.get(f"{token_server.url}api/presence?token={TOKEN}")
    assert api.status_code == 200 and "set-cookie" not in api.headers


async def test_the_cookie_goes_to_no_other_server_on_the_host(token_server, start_chat):
    # Cookies ignore ports: a cookie at path / went to every server on 127.0.0.1. The page
    # now lives under its own path, and the cookie's default path is that directory.
    other = await start_chat()
    async with httpx.AsyncClient() as browser_like:  # a cookie jar with RFC 6265 paths
        page = await browser_like.get(public_url(token_server))
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "path" not in page.headers["set-cookie"].lower()
        for elsewhere in (other.url, other.url + "api/messages", other.url + "t/x/",
                          token_server.url + "api/presence"):
            assert "cookie" not in browser_like.build_request("GET", elsewhere).headers
        own = public_url(token_server).partition("?")[0] + "api/presence"
        assert "cookie" in browser_like.build_request("GET", own).headers
        assert (await browser_like.get(own)).status_code == 200  # by the cookie alone


async def test_an_old_link_is_sent_to_the_page_path(token_server, http):
    old = await http.get(f"{token_server.url}?token={TOKEN}&user=ada")
    assert old.status_code == 303 and "set-cookie" not in old.headers
    assert old.headers["location"] == f"{page_path(TOKEN)[1:]}/?token={TOKEN}&user=ada"
    wrong = await http.get(f"{token_server.url}?token=wrong")
    assert wrong.status_code == 401


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_python_clients_with_the_token_chat(token_server, make_client, transport):
    # ready=False: the fixture's presence check has no token (history brings it anyway).
    reader = await make_client("ws", token_server, "reader", token=TOKEN, ready=False)
    writer = await make_client(transport, token_server, f"{transport}-writer", token=TOKEN,
                               ready=False)
    sent = await writer.send(f"hello over {transport}")
    got = await reader.receive(timeout=10)
    assert got == sent and got.text == f"hello over {transport}"
    await reader.send("answer")
    assert [m.text for m in await writer.receive_many(2, timeout=10)] == [
        f"hello over {transport}", "answer"]


async def test_no_token_mode_needs_none(server, http):
    assert server.token is None
    assert (await http.get(server.url + "api/presence")).status_code == 200
    assert public_url(server) == server.url


# -- making and showing the token ----------------------------------------------------------


async def test_generated_token_is_in_the_notebook_link(start_chat, http, monkeypatch):
    monkeypatch.delenv("CHATLIB_PUBLIC_URL", raising=False)
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    server = await start_chat(token=True)
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", server.token)
    link = f"{server.url}{page_path(server.token)[1:]}/?token={server.token}"
    assert public_url(server) == link
    assert f'href="{link}"' in server._repr_html_()
    assert (await http.get(link)).status_code == 200
    http.cookies.clear()  # the link set the cookie: without it, nothing
    assert (await http.get(server.url)).status_code == 401
    other = await start_chat(token=True)
    assert other.token != server.token
    monkeypatch.setenv("CHATLIB_PUBLIC_URL", "https://hub.example/user/x/proxy/{port}/")
    assert public_url(server) == (f"https://hub.example/user/x/proxy/{server.port}/"
                                  f"{page_path(server.token)[1:]}/?token={server.token}")


async def test_start_server_rerun_keeps_a_generated_token():
    try:
        first = await start_server(token=True)
        second = await start_server(token=True)  # re-running the cell: open tabs keep working
        assert second.token == first.token
        third = await start_server(token="chosen")
        assert third.token == "chosen"
    finally:
        await stop_server()


@pytest.mark.parametrize("bad", ["", "has space", "semi;colon", "é", "x" * 257, 42])
def test_a_token_that_cannot_go_in_a_url_or_cookie_is_refused(bad):
    with pytest.raises(ValueError, match="token must be"):
        ChatServer(token=bad)


def test_cli_token(tmp_path):
    """``chatlib serve --token T`` prints the link with the token; without it: 401."""
    with serve_cli("--token", TOKEN) as line:
        match = re.search(r"serving on (http://\S+/)\?token=(\S+)", line)
        assert match, line
        url, printed = match.groups()
        assert printed == TOKEN
        assert httpx.get(url + "api/presence", timeout=10).status_code == 401
        assert httpx.get(f"{url}api/presence?token={TOKEN}", timeout=10).status_code == 200


# -- through jupyter-server-proxy -------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_through_jupyter_server_proxy(jupyter, token_server, make_client, http,  # noqa: F811
                                            transport):
    url = jupyter.proxied(token_server)
    # Without: 401 from chatlib, relayed by the proxy (a WebSocket: the proxy has answered
    # 101 already when chatlib refuses, so the connection is dropped instead).
    for method, path, body in ENDPOINTS:
        assert_refused(*await request(http, url + path, method, body))
    if transport == "ws":
        with pytest.raises((InvalidStatus, ConnectionClosed)):
            async with ws_connect(url.replace("http", "ws", 1) + "ws", open_timeout=10) as ws:
                await ws.send(wire.dumps({"type": "hello", "user": "mallory"}))
                await asyncio.wait_for(ws.recv(), 10)
    # With: the link sets the cookie under the proxy's path; the Python clients use a header.
    page = await http.get(f"{url}?token={TOKEN}", follow_redirects=True)  # to the page path
    assert page.status_code == 200
    assert page.headers["set-cookie"].startswith(f"chatlib-token-{token_server.port}={TOKEN};")
    reader = await make_client("sse", url, "reader", token=TOKEN)
    writer = await make_client(transport, url, "writer", token=TOKEN, ready=False)
    sent = await writer.send(f"through the proxy over {transport}")
    assert await reader.receive(timeout=10) == sent


# -- in Chromium ---------------------------------------------------------------------------


@needs_chromium()
@pytest.mark.parametrize("where", ["direct", "proxy"])
async def test_chromium_page_from_the_token_link_chats_on_every_transport(
        token_server, make_client, where, request):
    from playwright.async_api import async_playwright, expect

    base = (request.getfixturevalue("jupyter").proxied(token_server) if where == "proxy"
            else token_server.url)
    python = await make_client("ws", token_server, "python", token=TOKEN, ready=False)
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            for transport in ("ws", "sse", "longpoll", "poll"):
                context = await browser.new_context()
                page = await context.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
                await page.goto(f"{base}?token={TOKEN}&user={transport}-page"
                                f"&transport={transport}")
                await expect(page.locator("#status")).to_have_attribute(
                    "data-state", "connected", timeout=15_000)
                assert "token=" not in page.url  # the page takes it out of the address bar
                await page.fill("#message-input", f"browser over {transport}")
                await page.press("#message-input", "Enter")
                async with asyncio.timeout(15):
                    message = await python.receive()
                    while message.user == "python":  # its own, from the round before
                        message = await python.receive()
                assert (message.user, message.text) == (f"{transport}-page",
                                                        f"browser over {transport}")
                await python.send(f"python to {transport}")
                texts = page.locator("#messages li.message .text")
                await expect(texts.filter(has_text=f"python to {transport}")).to_have_count(
                    1, timeout=15_000)
                assert errors == []
                # A reload (no token in the URL any more) still works: the cookie.
                await page.reload()
                await expect(page.locator("#status")).to_have_attribute(
                    "data-state", "connected", timeout=15_000)
                await context.close()
        finally:
            await browser.close()


async def test_chat_panel_of_a_token_server_uses_its_token(token_server, make_client):
    from chatlib import ChatPanel

    panel = ChatPanel(token_server, user="notebook")
    try:
        await panel.wait_connected()
        reader = await make_client("ws", token_server, "reader", token=TOKEN, ready=False)
        panel._handle_custom_msg({"type": "send", "text": "from the panel", "client_id": "p"},
                                 [])
        message = await reader.receive(timeout=10)
        assert (message.user, message.text, message.client_id) == (
            "notebook", "from the panel", "p")
    finally:
        await panel.aclose()
