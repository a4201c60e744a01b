"""The chat page's own messages under the server's limits, in real Chromium (static/app.js).

* A burst faster than the send budget (``Limits.rate``/``burst``) on every transport: every
  message is stored, once, in the order typed; while the budget is spent the held messages
  stay on screen saying why they wait, and go out by themselves.
* A message refused for good (longer than ``Limits.max_text``) stays on screen with the
  reason first, cut short (expandable), and Retry / Edit / Discard.
"""

from __future__ import annotations

import pytest
from helpers import needs_chromium
from playwright.async_api import async_playwright, expect

from chatlib import Limits
from chatlib.browser import launch

TRANSPORTS = ["ws", "sse", "longpoll", "poll"]
UI_MS = 30_000  # generous: the machine is shared
BURST = 30

pytestmark = [pytest.mark.timeout(120),
              needs_chromium()]


@pytest.fixture
def limits() -> Limits:
    """A budget the burst overruns on any machine: 10 at once, then 4 per second."""
    return Limits(rate=4.0, burst=10)


# Types and submits `texts` one every `gap` ms, as fast hands would (no waiting on the page).
BURST_JS = """async ([texts, gap]) => {
    const input = document.getElementById('message-input');
    const form = document.getElementById('composer');
    for (const text of texts) {
        input.value = text;
        form.requestSubmit();
        await new Promise((resolve) => setTimeout(resolve, gap));
    }
}"""


async def open_page(p, url: str):
    browser = await launch(p)
    page = await browser.new_page(viewport={"width": 900, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected",
                                                            timeout=UI_MS)
    return browser, page, errors


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_burst_over_the_rate_limit_loses_nothing(transport, server):
    texts = [f"burst {i:02d} over {transport}" for i in range(BURST)]
    async with async_playwright() as p:
        browser, page, errors = await open_page(p, f"{server.url}?user=ada&transport={transport}")
        try:
            await page.evaluate(BURST_JS, [texts, 40])  # 30 in ~1.2 s
            # Held back, on screen, saying why (not dropped, not silently "sending…").
            waiting = page.locator("#messages li.outgoing .send-state").filter(
                has_text="too many messages")
            await expect(waiting).not_to_have_count(0, timeout=UI_MS)
            # ... and then every one goes out by itself, in order.
            shown = page.locator("#messages li.message .text")
            await expect(shown).to_have_text(texts, timeout=UI_MS)
            await expect(page.locator("#messages li.outgoing")).to_have_count(0)
            assert not await page.locator("#notice").is_visible()
        finally:
            await browser.close()
    stored = await server.log.after(0)
    assert [m.text for m in stored] == texts  # each once, in the order typed
    assert not errors, errors


@pytest.mark.parametrize("transport", ["ws", "poll"])
async def test_a_refused_message_stays_with_its_reason_and_choices(transport, server):
    too_long = "x" * (server.limits.max_text + 1000)
    async with async_playwright() as p:
        browser, page, errors = await open_page(p, f"{server.url}?user=ada&transport={transport}")
        try:
            await page.evaluate(BURST_JS, [[too_long, "after the long one"], 0])
            failed = page.locator("#messages li.outgoing.failed")
            await expect(failed).to_have_count(1, timeout=UI_MS)
            await expect(failed.locator(".send-state")).to_have_text(
                f"not sent: text is longer than {server.limits.max_text} characters")
            # The next message is not held up by the refused one.
            await expect(page.locator("#messages li.message .text")).to_have_text(
                ["after the long one"], timeout=UI_MS)
            # Cut short, the reason above the text, the whole of it one click away.
            box = await failed.bounding_box()
            assert box["height"] < 200, box
            reason = await failed.locator(".send-state").bounding_box()
            text = await failed.locator(".text").bounding_box()
            assert reason["y"] < text["y"]
            await failed.get_by_role("button", name="Show all").click()
            assert (await failed.bounding_box())["height"] > box["height"]
            await expect(failed.get_by_role("button", name="Retry")).to_be_visible()

            await failed.get_by_role("button", name="Edit").click()
            await expect(failed).to_have_count(0)
            await expect(page.locator("#message-input")).to_have_value(too_long)
            await expect(page.locator("#message-input")).to_be_focused()

            await page.evaluate(BURST_JS, [["y" * (server.limits.max_text + 1)], 0])
            await expect(failed).to_have_count(1, timeout=UI_MS)
            await failed.get_by_role("button", name="Discard").click()
            await expect(page.locator("#messages li.outgoing")).to_have_count(0)
        finally:
            await browser.close()
    assert [m.text for m in await server.log.after(0)] == ["after the long one"]
    assert not errors, errors
