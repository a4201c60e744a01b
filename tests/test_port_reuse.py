"""A chat link that survives a kernel restart (chatlib.server.notebook_port, static/app.js).

* In this process: a "new kernel" (start_server's memory gone) of the same notebook gets the
  port its predecessor had; another notebook, no notebook (nbval, scripts) or
  ``CHATLIB_NO_PORT_REUSE`` remember nothing; a busy remembered port falls back to a free one.
* A real ipykernel under a notebook's identity (``JPY_SESSION_NAME``, as Jupyter Server
  starts it), restarted: the same port, and the chat page open in Chromium reconnects by
  itself, without a reload, within 10 s of the new server.
* The server back on another port: the page says within 3 failed tries that the server is
  gone and where the new link is, and clears presence and older notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
from helpers import needs_chromium
from playwright.async_api import async_playwright, expect
from test_page_send import open_page

import chatlib
import chatlib.server
from chatlib.closecode import CloseCode

UI_MS = 20_000
BACK_MS = 10_000  # the bound: the page is back within 10 s of its server
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def notebook(monkeypatch, tmp_path):
    """This process as the kernel of notebook ``course/07.ipynb``, with its own runtime dir."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "course" / "07.ipynb"))
    monkeypatch.delenv("CHATLIB_NO_PORT_REUSE", raising=False)
    return tmp_path


@pytest.fixture
async def kernel_memory():
    """start_server's memory of "its" server, forgotten as a kernel restart forgets it."""

    async def restart() -> None:
        await chatlib.stop_server()  # the old kernel's server is gone, and so is its memory

    try:
        yield restart
    finally:
        await asyncio.wait_for(chatlib.stop_server(), 20)


async def test_a_restarted_kernel_gets_its_notebooks_port(notebook, kernel_memory):
    first = await chatlib.start_server()
    port = first.port
    await kernel_memory()
    second = await chatlib.start_server()
    assert second.port == port


@pytest.mark.parametrize("setting", ["off", "other notebook", "no notebook"])
async def test_nothing_is_reused_without_a_known_notebook(setting, notebook, monkeypatch,
                                                          kernel_memory):
    first = await chatlib.start_server()
    await kernel_memory()
    if setting == "off":
        monkeypatch.setenv("CHATLIB_NO_PORT_REUSE", "1")
    elif setting == "other notebook":
        monkeypatch.setenv("JPY_SESSION_NAME", str(notebook / "course" / "08.ipynb"))
    else:
        monkeypatch.delenv("JPY_SESSION_NAME")
    assert chatlib.server.notebook_port("127.0.0.1") == 0  # nothing to reuse
    second = await chatlib.start_server()
    remembered = chatlib.server.notebook_port("127.0.0.1")
    # The other notebook has its own port from now on; without a notebook, nothing is kept.
    assert remembered == (second.port if setting == "other notebook" else 0), first.port


async def test_a_busy_remembered_port_falls_back_to_a_free_one(notebook, kernel_memory):
    first = await chatlib.start_server()
    port = first.port
    await kernel_memory()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        second = await chatlib.start_server()
        assert second.port != port
    assert chatlib.server.notebook_port("127.0.0.1") == second.port  # the new one, from now on


# -- a real kernel, restarted, with the chat page open --------------------------------------

START_CELL = "import chatlib\nserver = await chatlib.start_server()\nprint('PORT', server.port)"


async def run_cell(kc, code: str) -> str:
    lines: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            lines.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, timeout=60, output_hook=hook)
    assert reply["content"]["status"] == "ok", (reply["content"], lines)
    return "".join(lines)


def port_of(output: str) -> int:
    return int(output.split("PORT", 1)[1].split()[0])


@needs_chromium()
async def test_the_open_page_survives_a_kernel_restart(tmp_path):
    from jupyter_client.manager import AsyncKernelManager

    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JPY_SESSION_NAME": str(tmp_path / "07.ipynb")}
    env.pop("CHATLIB_NO_PORT_REUSE", None)
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel(cwd=str(ROOT), env=env)
    kc = km.client()
    try:
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        port = port_of(await run_cell(kc, START_CELL))
        async with async_playwright() as p:
            url = f"http://127.0.0.1:{port}/?user=ada&transport=ws"
            browser, page, _ = await open_page(p, url)
            try:
                status = page.locator("#status")  # connected (open_page)
                await page.evaluate("window.__samePage = true")

                await km.restart_kernel(now=True)
                await expect(status).not_to_have_attribute("data-state", "connected",
                                                           timeout=UI_MS)
                await kc.wait_for_ready(timeout=60)
                assert port_of(await run_cell(kc, START_CELL)) == port
                await expect(status).to_have_attribute("data-state", "connected",
                                                       timeout=BACK_MS)
                assert await page.evaluate("window.__samePage") is True  # no reload
                await page.fill("#message-input", "back after the restart")
                await page.press("#message-input", "Enter")
                await expect(page.locator("#messages li.message .text")).to_have_text(
                    ["back after the restart"], timeout=UI_MS)
            finally:
                await browser.close()
    finally:
        kc.stop_channels()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(km.shutdown_kernel(now=True), 30)


@needs_chromium()
async def test_a_server_on_another_port_is_announced_within_three_tries(start_chat):
    server = await start_chat()
    async with async_playwright() as p:
        browser, page, _ = await open_page(p, f"{server.url}?user=ada&transport=ws")
        try:
            status = page.locator("#status")  # connected (open_page)
            await expect(page.locator("#presence li")).to_have_text(["ada"], timeout=UI_MS)
            # An older notice, stale once the server is gone.
            await page.evaluate("""() => {
                document.getElementById('notice-text').textContent = 'an old notice';
                document.getElementById('notice').hidden = false; }""")
            tries: list[str] = []
            page.on("websocket", lambda ws: tries.append(ws.url))
            # The page keeps trying after its notice (full jitter: the next try may start
            # within milliseconds), so count the tries when the notice is shown, not when
            # this test next looks at it.
            at_notice: list[int] = []
            await page.expose_function("noticeShown", lambda: at_notice.append(len(tries)))
            await page.evaluate("""() => {
                const text = document.getElementById('notice-text');
                new MutationObserver(() => {
                    if (text.textContent.includes('does not answer')) window.noticeShown();
                }).observe(text, {childList: true, characterData: true, subtree: true}); }""")

            await server.stop(CloseCode.SERVICE_RESTART)
            await start_chat()  # on another port: this page's address stays dead
            notice = page.locator("#notice")
            await expect(notice).to_contain_text("does not answer", timeout=UI_MS)
            assert at_notice and at_notice[0] <= 3, (at_notice, tries)
            await expect(notice).to_contain_text("run the cell that starts the server")
            await expect(notice).not_to_contain_text("an old notice")
            await expect(page.locator("#presence li")).to_have_count(0)
            await expect(status).to_have_attribute("data-state", "disconnected")
        finally:
            await browser.close()


def test_notebook_port_file_is_per_notebook_and_host(notebook):
    assert chatlib.server.notebook_port("127.0.0.1") == 0
    chatlib.server.notebook_port("127.0.0.1", 8123)
    assert chatlib.server.notebook_port("127.0.0.1") == 8123
    assert chatlib.server.notebook_port("::1") == 0
    saved = json.loads((notebook / "runtime" / "chatlib-ports.json").read_text())
    assert list(saved.values()) == [8123]
