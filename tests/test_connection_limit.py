"""Six connections per host, shown in real Chromium (issue 9, part 3).

Over HTTP/1.1 Chromium opens at most 6 connections per host, shared by every tab of a
profile. Each tab of the chat page on Server-Sent Events (or long polling) holds one open for
as long as it lives, so with six such tabs open, a seventh request to that host, such as the
POST that sends a message, waits for one of them to end. WebSockets are not counted in that
pool, so the WebSocket transport does not stall. bench/connection_limit.py measures the POST
time against the number of tabs; here only what is certain is checked, on events:

* six SSE tabs: a POST from the sixth never reaches the server while all six streams are
  open, and goes through as soon as one tab is closed;
* eight WebSocket tabs: a POST from the eighth goes through;
* eight SSE tabs over HTTP/2 (hypercorn, TLS): one connection carries every stream, and a POST
  from the eighth goes through.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import needs_chromium
from playwright.async_api import async_playwright, expect

from chatlib.browser import launch

pytestmark = [
    needs_chromium(),
    pytest.mark.timeout(180),
]

# Starts a POST from the page and records when it is answered, without blocking evaluate().
START_POST = """(text) => {
  window.postDone = null;
  fetch('api/messages', {method: 'POST', headers: {'Content-Type': 'application/json'},
                         body: JSON.stringify({user: 'last-tab', text})})
    .then((r) => { window.postDone = r.status; },
          (e) => { window.postDone = String(e); });
}"""


async def open_tabs(context, url: str, transport: str, count: int) -> list:
    pages = []
    for i in range(count):
        page = await context.new_page()
        await page.goto(f"{url}?user=tab{i}&transport={transport}")
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected",
                                                                timeout=20_000)
        pages.append(page)
    return pages


async def test_six_sse_tabs_stall_a_post_until_one_closes(server, http):
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            context = await browser.new_context()  # one profile: one connection pool
            pages = await open_tabs(context, server.url, "sse", 6)
            before = (await http.get(server.url + "api/messages?after=0")).json()["last_id"]
            await pages[-1].evaluate(START_POST, "sent from the sixth tab")
            # Not answered while the six streams hold the six connections. A failure here
            # would mean the request got through; waiting longer cannot change that.
            with pytest.raises(Exception, match="Timeout"):
                await pages[-1].wait_for_function("window.postDone !== null", timeout=3000)
            after = (await http.get(server.url + "api/messages?after=0")).json()["last_id"]
            assert after == before, "the POST reached the server: no stall"

            await pages[0].close()  # its stream ends, a connection is free
            await pages[-1].wait_for_function("window.postDone !== null", timeout=20_000)
            assert await pages[-1].evaluate("window.postDone") == 201
        finally:
            await browser.close()


async def test_eight_websocket_tabs_do_not_stall(server):
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            context = await browser.new_context()
            pages = await open_tabs(context, server.url, "ws", 8)
            await pages[-1].evaluate(START_POST, "sent from the eighth tab")
            await pages[-1].wait_for_function("window.postDone !== null", timeout=20_000)
            assert await pages[-1].evaluate("window.postDone") == 201
        finally:
            await browser.close()


async def test_eight_sse_tabs_over_http2_do_not_stall():
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from connection_limit import H2Server

    server = await H2Server().start()
    try:
        async with async_playwright() as p:
            browser = await launch(p)
            try:
                context = await browser.new_context(ignore_https_errors=True)
                pages = await open_tabs(context, server.url, "sse", 8)
                protocol = await pages[-1].evaluate(
                    "performance.getEntriesByType('navigation')[0].nextHopProtocol")
                assert protocol == "h2", protocol
                await pages[-1].evaluate(START_POST, "sent from the eighth tab")
                await pages[-1].wait_for_function("window.postDone !== null", timeout=20_000)
                assert await pages[-1].evaluate("window.postDone") == 201
            finally:
                await browser.close()
    finally:
        await server.stop()
