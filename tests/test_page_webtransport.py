"""The chat page over WebTransport, in real Chromium (static/app.js, chatlib/webtransport.py).

* In auto mode the page tries WebTransport first when the server offers it
  (``GET /api/webtransport``) and chats over it with a WebSocket client and the ChatPanel
  (over WebTransport too): messages (escaped), acks, typing by datagram.
* It resumes after its cursor when the server comes back on the same port.
* It falls back to the WebSocket when the server runs without WebTransport, and when the
  UDP port refuses (nothing listens there any more).
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import needs_chromium
from playwright.async_api import async_playwright, expect
from test_page_send import open_page

from chatlib import ChatPanel, MemoryLog, wire
from chatlib.browser import launch

UI_MS = 30_000  # generous: the machine is shared
T = 10

pytestmark = [pytest.mark.timeout(120), needs_chromium()]


async def test_the_page_chats_over_webtransport_with_a_websocket_and_the_panel(
        start_chat, make_client):
    server = await start_chat(webtransport=True)
    bob = await make_client("ws", server, "bob")
    panel = ChatPanel(server, user="notebook", transport="webtransport")
    async with async_playwright() as p:
        browser, page, errors = await open_page(p, f"{server.url}?user=ada")
        try:
            await expect(page.locator("#transport")).to_have_text("webtransport")
            await panel.wait_connected()
            texts = page.locator("#messages li.message .text")

            markup = "<b>not bold</b> & <img src=x onerror=alert(1)>"
            await page.fill("#message-input", markup)
            await page.press("#message-input", "Enter")
            await expect(texts).to_have_text([markup], timeout=UI_MS)
            assert await page.locator("#messages b, #messages img").count() == 0
            received = await bob.receive(timeout=T)
            assert (received.user, received.text) == ("ada", markup)
            await panel.wait_for(lambda pn: any(m.text == markup for m in pn.messages.values()),
                                 timeout=T)

            await bob.send("from the WebSocket")
            panel._handle_custom_msg({"type": "send", "text": "from the panel",
                                      "client_id": "p-1"}, [])
            await expect(texts).to_have_text([markup, "from the WebSocket", "from the panel"],
                                             timeout=UI_MS)
            await panel.wait_for(lambda pn: not pn.outbox and len(pn.messages) == 3, timeout=T)

            # Typing goes as a datagram; the WebSocket client gets it as a frame.
            await page.type("#message-input", "typ")
            async with asyncio.timeout(T):
                for _ in range(1000):  # bounded: frames until ada's typing notice
                    kind, data = wire.parse_ws(await bob.ws.recv())
                    if kind == "typing" and data["user"] == "ada":
                        break
            await bob.send_typing()
            await expect(page.locator("#typing")).to_contain_text("bob", timeout=UI_MS)
            await expect(page.locator("#presence")).to_contain_text("notebook", timeout=UI_MS)
        finally:
            await browser.close()
            await panel.aclose()
    assert not errors, errors


async def test_the_page_resumes_over_webtransport_after_its_cursor(start_chat):
    log = MemoryLog()
    server = await start_chat(log=log, webtransport=True)
    for i in range(1, 4):
        await log.append("bob", f"early {i}")
    async with async_playwright() as p:
        browser, page, errors = await open_page(p, f"{server.url}?user=ada")
        try:
            await expect(page.locator("#transport")).to_have_text("webtransport")
            texts = page.locator("#messages li.message .text")
            await expect(texts).to_have_text(["early 1", "early 2", "early 3"], timeout=UI_MS)
            port = server.port
            await server.stop()
            await expect(page.locator("#status")).not_to_have_attribute(
                "data-state", "connected", timeout=UI_MS)
            for i in range(4, 8):
                await log.append("bob", f"late {i}")
            await start_chat(log=log, port=port, webtransport=True)
            await expect(texts).to_have_text(
                [f"early {i}" for i in range(1, 4)] + [f"late {i}" for i in range(4, 8)],
                timeout=UI_MS)
            await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
            await expect(page.locator("#transport")).to_have_text("webtransport")
        finally:
            await browser.close()
    assert not errors, errors


@pytest.mark.parametrize("udp", ["off", "refused"])
async def test_the_page_falls_back_to_the_websocket(udp, start_chat, make_client):
    """Without WebTransport the route says so; with its UDP port refused (nothing listens
    there any more, as behind a firewall) the route still names it and the attempt fails.
    Either way the page chats over the WebSocket."""
    server = await start_chat(webtransport=udp == "refused")
    if udp == "refused":
        await server._webtransport.close(grace=0)
    async with async_playwright() as p:
        browser, page, errors = await open_page(p, f"{server.url}?user=ada")
        try:
            await expect(page.locator("#transport")).to_have_text("ws")
            bob = await make_client("ws", server, "bob")
            await bob.send("over the WebSocket")
            await expect(page.locator("#messages li.message .text")).to_have_text(
                ["over the WebSocket"])
        finally:
            await browser.close()
    assert not errors, errors


CLOSE_JS = """async ([lines, read]) => {
  const info = await (await fetch('/api/webtransport')).json();
  const wt = new WebTransport(info.url, {serverCertificateHashes: [{algorithm: 'sha-256',
    value: Uint8Array.from(info.hash.match(/../g), (h) => parseInt(h, 16))}]});
  await wt.ready;
  const stream = await wt.createBidirectionalStream();
  const writer = stream.writable.getWriter();
  for (const line of lines) await writer.write(new TextEncoder().encode(line + '\\n'));
  if (read) stream.readable.pipeTo(new WritableStream()).catch(() => {});
  try {
    const {closeCode, reason} = await wt.closed;
    return {closeCode, reason};
  } catch (e) { return {error: String(e)}; }
}"""


async def test_chromium_reads_the_close_code_and_reason(start_chat):
    """aioquic parses no capsules: the server writes CLOSE_WEBTRANSPORT_SESSION itself, and
    Chromium's ``transport.closed`` must resolve with its code and reason."""
    server = await start_chat(webtransport=True)
    async with async_playwright() as p:
        browser, page = await bare_page(p, server)
        try:
            closed = await page.evaluate(CLOSE_JS, [['{"type": "message", "text": "hi"}'], True])
            assert closed["closeCode"] == 1008, closed
            assert "hello" in closed["reason"]
        finally:
            await browser.close()


async def test_a_page_that_never_reads_is_closed_and_others_go_on(start_chat, make_client):
    from chatlib import Limits

    server = await start_chat(limits=Limits(stuck_timeout=1, rate=1e6, burst=10**6,
                                            address_rate=1e6, address_burst=10**6),
                              webtransport=True)
    bob = await make_client("ws", server, "bob")
    async with async_playwright() as p:
        browser, page = await bare_page(p, server)
        try:
            closed = asyncio.ensure_future(page.evaluate(
                CLOSE_JS, [[wire.ws_hello("mallory")], False]))
            await wait_session(server)
            big = "x" * 1900
            async with asyncio.timeout(60):
                for i in range(20_000):  # bounded: until the server gives up on mallory
                    await bob._send_frame(wire.ws_post(f"{big} {i}"))
                    if i % 100 == 99:
                        await bob.send("sync")  # lets the server keep up; reads nothing
                        if closed.done() or not sessions(server):
                            break
            outcome = await asyncio.wait_for(closed, 30)
            assert outcome.get("closeCode") == 1013, outcome  # fell behind (queue full)
            assert outcome["reason"].startswith("behind: "), outcome
            last = await bob.send("after")  # the server still serves the others
            async with asyncio.timeout(T):
                while (await bob.receive()).id != last.id:  # bounded by the timeout
                    pass
        finally:
            await browser.close()


async def bare_page(p, server):
    """Chromium on one of the server's JSON routes: its origin, without the chat page."""
    browser = await launch(p)
    page = await browser.new_page()
    await page.goto(server.url + "api/limits")
    return browser, page


def sessions(server) -> list:
    return [pr for pr in server._webtransport.protocols if pr.session is not None]


async def wait_session(server) -> None:
    async with asyncio.timeout(T):
        while not sessions(server):  # bounded by the timeout
            await asyncio.sleep(0.02)


async def test_the_page_uses_webtransport_in_token_mode(start_chat, make_client):
    """A page cannot send the token on a WebTransport CONNECT (no headers, no cookie): it
    gets a single-use ticket from ``GET api/webtransport`` (which its cookie passes)."""
    from chatlib.auth import page_link

    server = await start_chat(webtransport=True, token="sekrit")
    async with async_playwright() as p:
        browser, page, errors = await open_page(
            p, page_link(server.url, server.token).replace("?token=", "?user=ada&token="))
        try:
            await expect(page.locator("#transport")).to_have_text("webtransport")
            bob = await make_client("ws", server, "bob", token="sekrit", ready=False)
            await bob.send("with a ticket")
            await expect(page.locator("#messages li.message .text")).to_have_text(
                ["with a ticket"], timeout=UI_MS)
        finally:
            await browser.close()
    assert not errors, errors


async def test_the_page_falls_back_when_a_restarted_server_has_no_webtransport(start_chat):
    log = MemoryLog()
    server = await start_chat(log=log, webtransport=True)
    async with async_playwright() as p:
        browser, page, errors = await open_page(p, f"{server.url}?user=ada")
        try:
            await expect(page.locator("#transport")).to_have_text("webtransport")
            port = server.port
            await server.stop()
            await expect(page.locator("#status")).not_to_have_attribute(
                "data-state", "connected", timeout=UI_MS)
            await log.append("bob", "after the restart")
            await start_chat(log=log, port=port)  # without WebTransport now
            await expect(page.locator("#messages li.message .text")).to_have_text(
                ["after the restart"], timeout=UI_MS)
            await expect(page.locator("#transport")).to_have_text("ws")
        finally:
            await browser.close()
    assert not errors, errors
