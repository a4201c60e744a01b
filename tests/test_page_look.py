"""What the chat page tells a learner, and how readably, in real Chromium (static/).

* The nickname box: the suggestion is selected (the first key replaces it); after Join the
  message box has the focus.
* The header's two latencies, each saying what it measures (own round trip, others' delivery).
* Message texts carry ``dir="auto"`` (right-to-left scripts read right to left).
* A length counter near the server's ``max_text`` (read from ``GET api/limits``).
* Screen readers: the status is a live region; the status and presence dots are not read out.
* Small print (times, send states, latencies) at least 4.5:1 in the light and the dark scheme,
  computed from the CSS colours (tests/contrast.py); a screenshot of each scheme goes to
  tests/artifacts/page-light.png and page-dark.png.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from contrast import contrast
from helpers import needs_chromium
from playwright.async_api import async_playwright, expect

from chatlib import WebSocketClient
from chatlib.browser import launch

ARTIFACTS = Path(__file__).parent / "artifacts"
UI_MS = 20_000
HEBREW = "שלום, מה שלומך?"

pytestmark = [pytest.mark.timeout(180),
              needs_chromium()]


@contextlib.asynccontextmanager
async def chat_page(url: str, scheme: str = "light"):
    """A Chromium page at ``url`` (in the ``scheme`` colour scheme), closed afterwards."""
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            context = await browser.new_context(color_scheme=scheme,
                                                viewport={"width": 900, "height": 600})
            page = await context.new_page()
            await page.goto(url)
            yield page
        finally:
            await browser.close()


async def connected(page) -> None:
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected",
                                                            timeout=UI_MS)


async def test_the_suggested_nick_is_replaced_by_typing_and_join_moves_on(server):
    async with chat_page(server.url) as page:
        nick = page.locator("#nick")
        await expect(nick).to_be_focused()
        value = await nick.input_value()
        assert value.startswith("guest-")
        selected = await nick.evaluate("(el) => [el.selectionStart, el.selectionEnd]")
        assert selected == [0, len(value)]
        await page.keyboard.type("kbd-user")
        await expect(nick).to_have_value("kbd-user")
        await page.keyboard.press("Enter")
        await connected(page)
        await expect(page.locator("#message-input")).to_be_focused()


async def test_latencies_say_what_they_measure(server):
    async with chat_page(f"{server.url}?user=ada&transport=ws") as page:
        await connected(page)
        header = page.locator(".conn")
        await expect(header).to_contain_text("Median round trip")
        await expect(header).to_contain_text("Median delivery")
        await expect(header).not_to_contain_text("Median latency")
        await page.fill("#message-input", "mine")
        await page.press("#message-input", "Enter")
        await expect(page.locator("#latency")).to_have_attribute("data-ms", re.compile(r"^\d+$"),
                                                                 timeout=UI_MS)
        await expect(page.locator("#latency")).to_have_attribute("title", re.compile("round trip"))
        await expect(page.locator("#latency-others")).to_have_text("–")  # none from others yet
        async with WebSocketClient(server.url, "bob") as bob:
            await bob.send("theirs")
            await expect(page.locator("#latency-others")).to_have_attribute(
                "data-ms", re.compile(r"^\d+$"), timeout=UI_MS)
        await expect(page.locator("#latency-others")).to_have_attribute("title",
                                                                        re.compile("one-way"))


async def test_texts_have_their_own_direction(server):
    async with chat_page(f"{server.url}?user=ada&transport=ws") as page:
        await connected(page)
        await page.fill("#message-input", HEBREW)
        await page.press("#message-input", "Enter")
        text = page.locator("#messages li.message .text")
        await expect(text).to_have_text([HEBREW], timeout=UI_MS)
        await expect(text).to_have_attribute("dir", "auto")
        assert await text.evaluate("(el) => getComputedStyle(el).direction") == "rtl"


async def test_a_counter_shows_near_the_length_limit(server):
    async with chat_page(f"{server.url}?user=ada&transport=poll") as page:
        await connected(page)
        limit = server.limits.max_text
        box, count = page.locator("#message-input"), page.locator("#message-count")
        await box.fill("x" * (limit // 2))
        await expect(count).to_be_hidden()
        await box.fill("x" * (limit - 100))
        await expect(count).to_have_text(f"{limit - 100} / {limit}")
        await box.fill("x" * (limit + 30))
        await expect(count).to_have_text(f"{limit + 30} / {limit}: 30 too many")
        await expect(count).to_have_class("count-chars over")
        await box.press("Enter")  # refused by the server: a failed row, and the box is empty
        await expect(count).to_be_hidden()
        await expect(page.locator("#messages li.outgoing.failed")).to_have_count(1, timeout=UI_MS)


async def test_screen_readers_hear_states_not_dots(server):
    async with chat_page(f"{server.url}?user=ada&transport=ws") as page:
        await connected(page)
        await expect(page.locator("#status")).to_have_attribute("role", "status")
        await expect(page.locator("#status-dot")).to_have_attribute("aria-hidden", "true")
        await expect(page.locator("#presence li")).to_have_text(["ada"], timeout=UI_MS)
        tree = await page.locator("body").aria_snapshot()
        assert "●" not in tree, tree
        assert "listitem: ada" in tree, tree


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_small_print_is_readable_in_both_schemes(scheme, server):
    async with chat_page(f"{server.url}?user=ada&transport=ws", scheme) as page:
        await connected(page)
        async with WebSocketClient(server.url, "bob") as bob:
            await bob.send("Hello ada, bob here.")
            await page.fill("#message-input", "Hi bob!")
            await page.press("#message-input", "Enter")
            await page.fill("#message-input", HEBREW)
            await page.press("#message-input", "Enter")
            await expect(page.locator("#messages li.message")).to_have_count(3, timeout=UI_MS)
            await bob.send("And a reply to that.")
            await expect(page.locator("#messages li.message")).to_have_count(4, timeout=UI_MS)
        await page.fill("#message-input", "a refused paste " + "lorem ipsum " * 250)
        await page.press("#message-input", "Enter")
        await expect(page.locator("#messages li.outgoing.failed")).to_have_count(1, timeout=UI_MS)
        # A "sent ✓" row lasts only until the message itself is back: draw one to measure it.
        await page.evaluate("""() => {
            const li = document.createElement('li');
            li.className = 'outgoing mine sent';
            const meta = document.createElement('div');
            meta.className = 'meta';
            const state = document.createElement('span');
            state.className = 'send-state';
            state.textContent = 'sent ✓';
            meta.append(state);
            li.append(meta);
            document.getElementById('messages').append(li);
        }""")
        ratios = {
            "time, own": await contrast(page.locator("li.message.mine .time")),
            "time, others'": await contrast(page.locator("li.message:not(.mine) .time")),
            "latency": await contrast(page.locator("li.message .latency")),
            "sent ✓": await contrast(page.locator("li.outgoing.sent .send-state")),
            "not sent": await contrast(page.locator("li.outgoing.failed .send-state")),
            "header label": await contrast(page.locator(".conn dt")),
        }
        low = {name: round(ratio, 2) for name, ratio in ratios.items() if ratio < 4.5}
        assert not low, f"{scheme}: contrast below 4.5:1: {low}"
        await page.evaluate("document.querySelector('li.outgoing.sent').remove()")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / f"page-{scheme}.png"))
