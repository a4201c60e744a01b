"""The chat page through nginx in front of three Redis-backed chat processes, in Chromium.

One page per transport opens the page at nginx's port (so each lands on whichever process
nginx picks), they chat across processes; then one process is SIGKILLed, the pages that
were on it reconnect through nginx to the others, and every page ends up showing every
message exactly once, in id order, equal to the shared log.
"""

from __future__ import annotations

import contextlib

import httpx
import pytest
from helpers import needs_chromium
from playwright.async_api import async_playwright, expect
from redis_fixtures import require_programs
from test_browser import CONNECT_MS, DELIVER_MS, ChatPage

from chatlib.browser import launch
from chatlib.cluster import Cluster

# One page per transport; names that are not substrings of each other (text matching).
USERS = {"ws": "ada", "sse": "bob", "longpoll": "cyd", "poll": "dee"}

pytestmark = [
    needs_chromium(),
    pytest.mark.timeout(180),
]


async def test_pages_chat_across_processes_and_survive_a_killed_process():
    require_programs("redis-server", "nginx")
    cluster = Cluster(processes=3, port=0)
    await cluster.start()
    pages: list[ChatPage] = []
    try:
        async with async_playwright() as p:
            browser = await launch(p)
            try:
                for transport, user in USERS.items():
                    context = await browser.new_context()
                    chat = ChatPage(context, await context.new_page(), user)
                    pages.append(chat)
                    await chat.page.goto(f"{cluster.url}?user={user}&transport={transport}")
                    await chat.wait_connected()
                said = []
                for chat in pages:
                    said.append(f"{chat.user} says hi")
                    await chat.say(said[-1])
                    for other in pages:
                        await other.wait_for_text(said[-1])

                cluster.servers[0].kill()
                for chat in pages:  # each says something after the kill, and all see it
                    said.append(f"{chat.user} after the kill")
                    await chat.wait_connected()
                    await chat.say(said[-1])
                for chat in pages:
                    await expect(chat.texts).to_have_text(said, timeout=DELIVER_MS)
                async with httpx.AsyncClient() as http:
                    log = (await http.get(cluster.servers[1].url + "api/messages")).json()
                log_ids = [m["id"] for m in log["messages"]]
                assert [m["text"] for m in log["messages"]] == said
                for chat in pages:
                    assert await chat.ids() == log_ids, chat.user
                    await expect(chat.page.locator("#status")).to_have_attribute(
                        "data-state", "connected", timeout=CONNECT_MS)
                # The killed process really was serving some of these pages.
                access = (cluster.nginx.directory / "access.log").read_text().splitlines()
                killed = f"upstream=127.0.0.1:{cluster.servers[0].port}"
                assert any(killed in line and ("/ws" in line or "/api/" in line)
                           for line in access)
                errors = [f"{chat.user}: {e}" for chat in pages for e in chat.errors]
                assert not errors, errors
            finally:
                for chat in pages:
                    with contextlib.suppress(Exception):
                        await chat.context.close()
                await browser.close()
    finally:
        await cluster.stop()
