"""The ChatPanel's view (chatlib/panel.js) drawn in real Chromium from a stand-in model.

The model is what anywidget hands ``render``: ``get``/``on``/``off``/``send`` over the
synced traits (chatlib.panel.ChatPanel); JupyterLab itself is tested in test_jupyterlab.py.

* ``gaps`` (first ids kept after a retention gap): a notice, "Some older messages are no
  longer available", right before the first message kept, redrawn as traits change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import needs_chromium
from playwright.async_api import async_playwright

from chatlib.browser import launch

PANEL_JS = (Path(__file__).resolve().parent.parent / "chatlib" / "panel.js").read_text()

pytestmark = [pytest.mark.timeout(60), needs_chromium()]

# Renders the view with a model holding `traits`; window.setTrait(name, value) changes one
# and fires change:NAME, as a kernel update does.
RENDER_JS = """async ([source, traits]) => {
    const { default: widget } = await import(
        'data:text/javascript,' + encodeURIComponent(source));
    const handlers = {};
    const model = {
        get: (name) => traits[name],
        on: (name, fn) => { (handlers[name] ??= []).push(fn); },
        off: () => {},
        send: () => {},
    };
    window.setTrait = (name, value) => {
        traits[name] = value;
        for (const fn of handlers[`change:${name}`] || []) fn();
    };
    const root = document.createElement('div');
    document.body.append(root);
    widget.render({ model, el: root });
}"""

ROWS_JS = """() => [...document.querySelectorAll('.chatlib-history > li')]
    .filter((li) => !li.classList.contains('chatlib-day'))
    .map((li) => li.classList.contains('chatlib-gap') ? `gap:${li.dataset.gap}` : li.dataset.id)"""


def traits(ids: list[int], gaps: list[int]) -> dict:
    return {
        "user": "notebook", "url": "", "transport": "ws", "state": "connected", "error": "",
        "retry_at": 0, "presence": [], "typing": None, "outbox": [], "max_text": 2000,
        "gaps": gaps,
        "history": [{"id": i, "ts": 1_700_000_000 + i, "user": "bob", "text": f"m {i}"}
                    for i in ids],
    }


async def test_a_gap_is_drawn_before_the_first_message_kept():
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.evaluate(RENDER_JS, [PANEL_JS, traits([1, 2, 3], [])])
            assert await page.evaluate(ROWS_JS) == ["1", "2", "3"]
            await page.evaluate("() => window.setTrait('gaps', [16])")
            assert await page.evaluate(ROWS_JS) == ["1", "2", "3", "gap:16"]
            await page.evaluate("""() => window.setTrait('history', [1, 2, 3, 16, 17].map(
                (i) => ({ id: i, ts: 1700000000 + i, user: 'bob', text: `m ${i}` })))""")
            assert await page.evaluate(ROWS_JS) == ["1", "2", "3", "gap:16", "16", "17"]
            gap = page.locator(".chatlib-gap")
            assert await gap.text_content() == "Some older messages are no longer available"
            assert await gap.is_visible()
            assert not errors, errors
        finally:
            await browser.close()
