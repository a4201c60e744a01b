"""The chat page and the resume protocol, in real Chromium (static/app.js; README "Resuming").

* A cursor older than the server's retention gets ``gap``: the page says, in the list
  between the last message it had and the first one kept, that some older messages are
  no longer available (every transport).
* A fresh join shows the newest page; when the ``history`` marker says older messages exist,
  "Load older messages" at the top of the list fetches the page below (a WebSocket
  ``older`` frame, else ``GET api/messages?before=``) and shows it above, in order, without
  duplicates or moving what the reader looks at; it goes once nothing older is left.
"""

from __future__ import annotations

import pytest
from helpers import needs_chromium
from playwright.async_api import async_playwright, expect
from test_page_send import open_page

from chatlib import Limits, MemoryLog
from chatlib.browser import launch

TRANSPORTS = ["ws", "sse", "longpoll", "poll"]
UI_MS = 30_000  # generous: the machine is shared

pytestmark = [pytest.mark.timeout(120), needs_chromium()]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_gap_is_shown_where_the_messages_are_missing(transport, start_chat):
    # The page reads messages 1-3; the server stops; 40 more are written to its log, which
    # keeps 10 (so 4 up to at least 30 are gone); the server comes back on the same port,
    # and the page, resuming after 3, gets a gap.
    log = MemoryLog(max_messages=10)
    server = await start_chat(log=log)
    for i in range(1, 4):
        await log.append("bob", f"early {i}")
    async with async_playwright() as p:
        browser, page, errors = await open_page(p, f"{server.url}?user=ada&transport={transport}")
        try:
            texts = page.locator("#messages li.message .text")
            await expect(texts).to_have_text(["early 1", "early 2", "early 3"], timeout=UI_MS)
            await expect(page.locator("#messages li.gap")).to_have_count(0)
            port = server.port
            await server.stop()
            await expect(page.locator("#status")).not_to_have_attribute(
                "data-state", "connected", timeout=UI_MS)
            for i in range(4, 44):
                await log.append("bob", f"late {i}")
            first = await log.first_id()
            assert first > 5
            await start_chat(log=log, port=port)

            kept = [f"late {i}" for i in range(first, 44)]
            await expect(texts).to_have_text(["early 1", "early 2", "early 3", *kept],
                                             timeout=UI_MS)
            gap = page.locator("#messages li.gap")
            await expect(gap).to_have_count(1)
            await expect(gap).to_have_text("Some older messages are no longer available")
            # In its place: right after the last message before the gap, before the first kept.
            rows = await page.locator("#messages > li").evaluate_all(
                "(lis) => lis.map((li) => li.className.split(' ')[0] + ':'"
                " + (li.dataset.id || li.dataset.gap))")
            assert rows[2:5] == ["message:3", f"gap:{first}", f"message:{first}"], rows
            assert await gap.is_visible()
        finally:
            await browser.close()
    assert not errors, errors


@pytest.mark.parametrize("transport", ["ws", "poll"])
async def test_load_older_messages_prepends_the_pages_before(transport, start_chat):
    server = await start_chat(limits=Limits(history=20))
    texts = [f"m {i}" for i in range(1, 51)]
    for text in texts:
        await server.log.append("bob", text)
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            page = await browser.new_page(viewport={"width": 900, "height": 500})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            older_gets: list[str] = []
            page.on("request", lambda r: older_gets.append(r.url) if "before=" in r.url else None)
            await page.goto(f"{server.url}?user=ada&transport={transport}")
            shown = page.locator("#messages li.message .text")
            await expect(shown).to_have_text(texts[30:], timeout=UI_MS)  # the newest page
            button = page.get_by_role("button", name="Load older messages")
            await expect(button).to_be_visible()
            # The button is the list's first row; the reader scrolls up to it.
            assert await page.locator("#messages > li").first.get_attribute("class") == "load-older"
            await page.locator("#messages").evaluate("(list) => { list.scrollTop = 0; }")
            oldest = page.locator('#messages li.message[data-id="31"]')
            y0 = (await oldest.bounding_box())["y"]

            await button.click()
            await expect(shown).to_have_text(texts[10:], timeout=UI_MS)
            # What the reader was looking at stays where it was.
            assert abs((await oldest.bounding_box())["y"] - y0) < 2
            await expect(button).to_be_visible()  # 1-10 are still below

            await button.click()
            await expect(shown).to_have_text(texts, timeout=UI_MS)  # each once, in order
            await expect(button).to_have_count(0)  # nothing older is left
            assert await page.locator("#messages li.message").count() == 50
            # The WebSocket asks on its own connection; HTTP transports with GET ?before=.
            assert bool(older_gets) == (transport != "ws"), older_gets
            assert not errors, errors
        finally:
            await browser.close()
