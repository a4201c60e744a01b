"""The chat page (static/) in a real browser: headless Debian Chromium driven by Playwright.

Every test starts its own chat server (``chatlib.ChatServer``, port 0, on 127.0.0.1) in the
test's event loop and opens pages with ``?user=NAME&transport=X``, which join at once. One
Chromium serves the whole module; every page gets its own browser context (own storage,
own network switch) and is closed when its test ends. Waiting is done with Playwright's
auto-retrying assertions (bounded timeouts), never with sleeps.

What is checked:

* every forced transport: two pages chat both ways, show the transport and each other in
  the presence list, and a Python WebSocket client sees the same messages (and is seen);
* a WebSocket page and a short-polling page chat with each other;
* text and nicknames are shown as literal text, never run as markup;
* a server restart mid-chat: the page reconnects, shows what others said while it was away,
  and every message exactly once, in id order, equal to the server's log;
* a restart with an empty log (an in-memory server restarted): the page starts over;
* the typing indicator;
* a screenshot of a finished chat goes to tests/artifacts/browser-chat.png.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_asyncio
from helpers import needs_chromium, shut_down
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from chatlib import ChatServer, MemoryLog, WebSocketClient
from chatlib.browser import launch

TRANSPORTS = ["ws", "sse", "longpoll", "poll"]
ARTIFACTS = Path(__file__).parent / "artifacts"

# Generous bounds: they only matter when something is broken.
CONNECT_MS = 15_000
DELIVER_MS = 15_000
PRESENCE_MS = 20_000  # polling pages refresh presence every 5 s

XSS_TEXT = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
XSS_NICK = "<b onmouseover=x>"

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    needs_chromium(),
    pytest.mark.timeout(120),
]


# -- fixtures ---------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    """One headless Chromium for the module."""
    async with async_playwright() as p:
        chromium = await launch(p)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def start_server():
    """``await start_server(port=0, log=None)``: a chat server, stopped at teardown."""
    servers: list[ChatServer] = []

    async def start(port: int = 0, log=None) -> ChatServer:
        server = ChatServer("127.0.0.1", port, log=log)
        servers.append(server)
        return await server.start()

    try:
        yield start
    finally:
        await shut_down(servers, "stop", 15)


@pytest_asyncio.fixture(loop_scope="module")
async def server(start_server) -> ChatServer:
    return await start_server()


@pytest_asyncio.fixture(loop_scope="module")
async def python_client():
    """``await python_client(server, user)``: a connected chatlib WebSocketClient."""
    clients: list[WebSocketClient] = []

    async def make(server: ChatServer, user: str = "python", after: int = 0):
        client = WebSocketClient(server.url, user, after=after)
        clients.append(client)
        await client.connect()
        return client

    try:
        yield make
    finally:
        await shut_down(clients, "close", 5)


class ChatPage:
    """One chat page in its own browser context, with the few things tests do to it."""

    def __init__(self, context: BrowserContext, page: Page, user: str) -> None:
        self.context, self.page, self.user = context, page, user
        self.errors: list[str] = []      # uncaught exceptions in the page
        self.requests: list[str] = []    # every URL the page asked for
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", lambda request: self.requests.append(request.url))

    @property
    def texts(self):
        return self.page.locator("#messages li.message .text")

    async def say(self, text: str) -> None:
        await self.page.fill("#message-input", text)
        await self.page.press("#message-input", "Enter")

    async def wait_for_text(self, text: str) -> None:
        await expect(self.texts.filter(has_text=text)).to_have_count(1, timeout=DELIVER_MS)

    async def wait_connected(self) -> None:
        await expect(self.page.locator("#status")).to_have_attribute(
            "data-state", "connected", timeout=CONNECT_MS)

    async def ids(self) -> list[int]:
        return await self.page.eval_on_selector_all(
            "#messages li.message", "els => els.map(e => Number(e.dataset.id))")

    async def all_texts(self) -> list[str]:
        return await self.texts.all_text_contents()


@pytest_asyncio.fixture(loop_scope="module")
async def open_chat(browser):
    """``await open_chat(server, user, transport)``: a joined, connected chat page.

    At teardown every context is closed, and no page may have thrown an uncaught error.
    """
    pages: list[ChatPage] = []

    async def open_page(server: ChatServer, user: str, transport: str) -> ChatPage:
        context = await browser.new_context(viewport={"width": 900, "height": 600})
        chat = ChatPage(context, await context.new_page(), user)
        pages.append(chat)
        await chat.page.goto(f"{server.url}?user={quote(user)}&transport={transport}")
        await chat.wait_connected()
        return chat

    try:
        yield open_page
    finally:
        for chat in pages:
            with contextlib.suppress(Exception):
                await chat.context.close()
    errors = [f"{chat.user}: {error}" for chat in pages for error in chat.errors]
    assert not errors, f"uncaught errors in the chat page: {errors}"


def assert_ids_exact(ids: list[int], log_ids: list[int]) -> None:
    """Each message once, in strictly increasing id order, and exactly the server's log."""
    assert len(ids) == len(set(ids)), f"a message is shown twice: {ids}"
    assert all(a < b for a, b in zip(ids, ids[1:], strict=False)), f"ids out of order: {ids}"
    assert ids == log_ids, f"page shows {ids}, the server's log has {log_ids}"


# -- every transport ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_two_pages_chat_over_each_transport(transport, server, open_chat,
                                                  python_client):
    python = await python_client(server, "python")
    alice = await open_chat(server, "alice", transport)
    bob = await open_chat(server, "bob", transport)
    for chat in (alice, bob):
        await expect(chat.page.locator("#transport")).to_have_text(transport)

    await alice.say(f"hi bob, alice here over {transport}")
    await bob.wait_for_text(f"hi bob, alice here over {transport}")
    await bob.say(f"hello alice, bob over {transport}")
    await alice.wait_for_text(f"hello alice, bob over {transport}")

    # The Python client (WebSocket) sees both: every transport writes the same log.
    received = await python.receive_many(2, timeout=DELIVER_MS / 1000)
    assert [(m.user, m.text) for m in received] == [
        ("alice", f"hi bob, alice here over {transport}"),
        ("bob", f"hello alice, bob over {transport}"),
    ]
    # ... and the pages see what it sends.
    await python.send(f"python says hi to the {transport} pages")
    for chat in (alice, bob):
        await chat.wait_for_text(f"python says hi to the {transport} pages")

    # Presence: pushed over ws and sse, refreshed from GET /api/presence when polling.
    for chat in (alice, bob):
        await expect(chat.page.locator("#presence li")).to_have_text(
            ["alice", "bob", "python"], timeout=PRESENCE_MS)
        await expect(chat.page.locator("#presence li.me")).to_have_text(chat.user)

    log_ids = [m.id for m in await server.log.after(0)]
    for chat in (alice, bob):
        await expect(chat.texts).to_have_text([
            f"hi bob, alice here over {transport}",
            f"hello alice, bob over {transport}",
            f"python says hi to the {transport} pages",
        ], timeout=DELIVER_MS)
        assert_ids_exact(await chat.ids(), log_ids)
        # Own messages are marked as such.
        await expect(chat.page.locator("#messages li.message.mine .user")).to_have_text(
            [chat.user])
        await expect(chat.page.locator("#status")).to_have_text("connected")

    if transport == "ws":
        ARTIFACTS.mkdir(exist_ok=True)
        await alice.page.screenshot(path=str(ARTIFACTS / "browser-chat.png"))


async def test_websocket_page_and_polling_page_chat(server, open_chat):
    alice = await open_chat(server, "alice", "ws")
    bob = await open_chat(server, "bob", "poll")
    await expect(alice.page.locator("#transport")).to_have_text("ws")
    await expect(bob.page.locator("#transport")).to_have_text("poll")

    await alice.say("from the WebSocket page")
    await bob.wait_for_text("from the WebSocket page")
    await bob.say("from the polling page")
    await alice.wait_for_text("from the polling page")

    log_ids = [m.id for m in await server.log.after(0)]
    for chat in (alice, bob):
        await expect(chat.texts).to_have_text(
            ["from the WebSocket page", "from the polling page"], timeout=DELIVER_MS)
        assert_ids_exact(await chat.ids(), log_ids)
    # The WebSocket page learns of the poller from the server's presence push.
    await expect(alice.page.locator("#presence li")).to_have_text(["alice", "bob"],
                                                                  timeout=PRESENCE_MS)


# -- markup injection ----------------------------------------------------------------------


async def test_markup_in_text_and_nickname_stays_text(server, open_chat, python_client):
    python = await python_client(server, "python")
    alice = await open_chat(server, "alice", "ws")
    mallory = await open_chat(server, XSS_NICK, "poll")  # nickname in the URL and in POSTs
    await expect(mallory.page.locator("#nick")).to_have_value(XSS_NICK)

    await mallory.say(XSS_TEXT)
    await alice.wait_for_text(XSS_TEXT)
    await python.send(XSS_TEXT)
    for chat in (alice, mallory):
        await expect(chat.texts).to_have_text([XSS_TEXT, XSS_TEXT], timeout=DELIVER_MS)
        await expect(chat.page.locator("#messages li.message .user")).to_have_text(
            [XSS_NICK, "python"])
        await expect(chat.page.locator("#presence li").filter(has_text=XSS_NICK)).to_have_count(
            1, timeout=PRESENCE_MS)

    for chat in (alice, mallory):
        assert [await el.text_content() for el in await chat.texts.all()] == [XSS_TEXT] * 2
        # No element was made from the payloads, anywhere in the page's dynamic parts.
        made = await chat.page.eval_on_selector_all(
            "#messages img, #messages script, #messages b, #presence b, #presence img, "
            "#typing *", "els => els.map(e => e.outerHTML)")
        assert made == []
        assert await chat.page.evaluate("typeof window.__xss") == "undefined"
        # An <img src=x> would have been fetched (relative to the page): it never was.
        assert not [url for url in chat.requests if url.rstrip("/").endswith("/x")]
        assert not await chat.page.locator("#notice").is_visible()


# -- reconnecting -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_server_restart_resumes_without_gaps_or_duplicates(
        transport, start_server, open_chat, python_client):
    """Kill the page's connection mid-chat (the server stops), let others talk while the page
    is away, and check that it shows what it missed, each message exactly once.

    The connection is dropped by a real server stop (1001 for WebSockets, end of stream for
    SSE, refused requests for polling). Headless Chromium's offline switch does *not* drop an
    open WebSocket or EventSource, but it does refuse new connections: it holds the page
    disconnected while the restarted server takes messages from others, so that they must
    come from the resume (``after`` = last id shown), not as live messages. Going back
    online also fires the page's ``online`` event (skip the backoff wait).
    """
    log = MemoryLog()
    server = await start_server(log=log)
    port = server.port
    alice = await open_chat(server, "alice", transport)
    python = await python_client(server, "python")

    await alice.say("alice: before the restart")
    await alice.wait_for_text("alice: before the restart")
    await python.send("python: before the restart")
    await expect(alice.texts).to_have_count(2, timeout=DELIVER_MS)

    await server.stop()
    await expect(alice.page.locator("#status")).to_have_attribute(
        "data-state", "reconnecting", timeout=CONNECT_MS)
    await alice.context.set_offline(True)

    # Same port, same log: history persists. Others talk while alice is away.
    server = await start_server(port=port, log=log)
    python = await python_client(server, "python")  # from the start: all 5 messages
    missed = [f"python: while alice is away {i}" for i in range(3)]
    for text in missed:
        await python.send(text)
    echoed = await python.receive_many(len(missed) + 2, timeout=DELIVER_MS / 1000)
    assert [m.text for m in echoed][-3:] == missed  # stored by the server
    # The page really was away: nothing of it is on screen yet.
    assert await alice.page.get_attribute("#status", "data-state") == "reconnecting"
    assert not [t for t in await alice.all_texts() if "away" in t]

    await alice.context.set_offline(False)
    await alice.wait_connected()
    await expect(alice.texts).to_have_text(
        ["alice: before the restart", "python: before the restart", *missed],
        timeout=DELIVER_MS)

    # The page works again, both ways.
    await alice.say("alice: back again")
    assert (await python.receive(timeout=DELIVER_MS / 1000)).text == "alice: back again"
    await python.send("python: welcome back")
    await alice.wait_for_text("python: welcome back")

    logged = await log.after(0)
    assert len(logged) == 7
    await expect(alice.texts).to_have_text([m.text for m in logged], timeout=DELIVER_MS)
    assert_ids_exact(await alice.ids(), [m.id for m in logged])


async def test_restart_with_a_new_log_starts_over(start_server, open_chat):
    """An in-memory server restarted with an empty log: the page's cursor is beyond the
    server's last id, the server says reset, and the page clears what it showed."""
    server = await start_server()
    port = server.port
    alice = await open_chat(server, "alice", "ws")
    for i in range(3):
        await alice.say(f"old {i}")
    await expect(alice.texts).to_have_count(3, timeout=DELIVER_MS)

    await server.stop()
    await expect(alice.page.locator("#status")).to_have_attribute(
        "data-state", "reconnecting", timeout=CONNECT_MS)
    server = await start_server(port=port, log=MemoryLog())
    await alice.wait_connected()
    await expect(alice.texts).to_have_count(0, timeout=DELIVER_MS)

    await alice.say("new world")
    await expect(alice.texts).to_have_text(["new world"], timeout=DELIVER_MS)
    assert await alice.ids() == [m.id for m in await server.log.after(0)] == [1]


# -- typing -----------------------------------------------------------------------------


@pytest.mark.parametrize("typist_transport", ["ws", "poll"])
async def test_typing_indicator(typist_transport, server, open_chat):
    alice = await open_chat(server, "alice", "ws")
    bob = await open_chat(server, "bob", typist_transport)  # poll types with POST api/typing
    typing = alice.page.locator("#typing")
    await expect(typing).to_be_hidden()

    await bob.page.locator("#message-input").press_sequentially("hel", delay=30)
    await expect(typing).to_be_visible(timeout=DELIVER_MS)
    await expect(typing).to_have_text("bob is typing…")
    await expect(bob.page.locator("#typing")).to_be_hidden()  # not shown to the typist

    await bob.page.press("#message-input", "Enter")
    await alice.wait_for_text("hel")
    # A message ends "typing" (and it would expire after 3 s anyway).
    await expect(typing).to_be_hidden(timeout=DELIVER_MS)
