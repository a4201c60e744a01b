"""The chat page's nickname per tab, in real Chromium.

A second tab of the page must not silently become a second "alice": the remembered nick is
only a suggestion, and one already in the chat becomes "alice-2" (then "alice-3"). A reload
of a tab keeps that tab's own nick (sessionStorage); without a presence answer the
remembered nick stays as it is.
"""

from __future__ import annotations

import pytest
from helpers import needs_chromium
from playwright.async_api import async_playwright, expect

from chatlib import ChatServer
from chatlib.browser import launch

UI_MS = 15_000

pytestmark = [
    needs_chromium(),
    pytest.mark.timeout(120),
]


async def join(page, nick: str | None = None) -> None:
    if nick is not None:
        await page.fill("#nick", nick)
    await page.click("#join")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected",
                                                            timeout=UI_MS)


async def test_a_second_tab_gets_a_free_nick():
    async with ChatServer(port=0) as server, async_playwright() as p:
        browser = await launch(p)
        try:
            context = await browser.new_context()  # tabs share localStorage, as in a browser
            first = await context.new_page()
            await first.goto(server.url)
            await join(first, "alice")

            second = await context.new_page()
            await second.goto(server.url)
            await expect(second.locator("#nick")).to_have_value("alice-2", timeout=UI_MS)
            await join(second)
            await expect(first.locator("#presence li")).to_have_text(
                ["alice", "alice-2"], timeout=UI_MS)

            third = await context.new_page()
            await third.goto(server.url)
            await expect(third.locator("#nick")).to_have_value("alice-3", timeout=UI_MS)

            # A reload keeps the tab's own nick, even though that name is in the chat.
            await first.reload()
            await expect(first.locator("#nick")).to_have_value("alice")

            # No presence to check against (the request fails): the remembered nick is
            # suggested as it is, and the person can still pick another.
            fourth = await context.new_page()
            await fourth.route("**/api/presence", lambda route: route.abort())
            await fourth.goto(server.url)
            await expect(fourth.locator("#nick")).to_have_value("alice-2")  # remembered
            await fourth.fill("#nick", "bob")
            await join(fourth)
            await expect(fourth.locator("#nick")).to_have_value("bob")
        finally:
            await browser.close()
