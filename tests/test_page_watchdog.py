"""The chat page notices a dead network on a quiet stream (its silence watchdog, static/app.js).

A quiet WebSocket or SSE stream looks the same whether the chat is idle or the network is
gone, and page code sees neither SSE comments nor WebSocket PINGs. The page therefore asks for
presence every ``?watchdog_ms=`` (15 s by default) and replaces a connection whose question
goes unanswered. Here a netem proxy *stalls* (holds every byte, closes nothing), which is
what a dead network looks like: the page must leave "connected" while the stall lasts, then
reconnect and show what was said meanwhile, once.
"""

from __future__ import annotations

import pytest
from helpers import needs_chromium

from chatlib import netem
from chatlib.browser import launch

STALL_S = 8.0  # far longer than the 1 s watchdog period and its 1 s deadline
UI_MS = 20_000  # generous bounds: the machine is shared

pytestmark = [pytest.mark.timeout(120),
              needs_chromium()]


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_stalled_network_is_noticed_and_survived(transport, server, http):
    from playwright.async_api import async_playwright, expect

    proxy = await netem.start(server)
    errors: list[str] = []
    try:
        async with async_playwright() as p:
            browser = await launch(p)
            try:
                page = await browser.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(f"{proxy.url}?user=ada&transport={transport}&watchdog_ms=1000")
                status = page.locator("#status")
                await expect(status).to_have_attribute("data-state", "connected", timeout=UI_MS)

                proxy.stall(STALL_S)  # nothing is closed: only silence
                # Without the watchdog the page would stay "connected" for the whole stall.
                await expect(status).not_to_have_attribute("data-state", "connected",
                                                           timeout=(STALL_S - 2) * 1000)
                response = await http.post(server.url + "api/messages",
                                           json={"user": "bob", "text": "said while stalled"})
                assert response.status_code == 201, response.text

                await expect(status).to_have_attribute("data-state", "connected", timeout=UI_MS)
                texts = page.locator("#messages li.message .text")
                await expect(texts.filter(has_text="said while stalled")).to_have_count(
                    1, timeout=UI_MS)
            finally:
                await browser.close()
    finally:
        await proxy.stop()
    assert not errors, errors
