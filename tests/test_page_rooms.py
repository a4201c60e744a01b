"""The chat page's rooms and direct messages, in real Chromium (static/app.js).

* Two browsers in different rooms never see each other's messages, on every transport.
* The room list counts other rooms' messages as unread (WebSocket: they arrive live; the
  HTTP transports: ``GET api/rooms``), and switching rooms keeps each room's history.
* A DM started from the presence list reaches the other person (a page or the ChatPanel)
  and no one else; the other side is told by a ``dm`` event and finds the room in its list.
* A room the server refuses (a private room, token mode) is shown as refused, not dropped
  silently.
"""

from __future__ import annotations

import pytest
from helpers import needs_chromium
from playwright.async_api import expect

from chatlib import ChatPanel, WebSocketClient
from chatlib.wire import dm_room

TRANSPORTS = ["ws", "sse", "longpoll", "poll"]
UI_MS = 30_000  # generous: the machine is shared

pytestmark = [pytest.mark.timeout(180), needs_chromium()]


async def open_page(browser, url: str):
    """A connected chat page at ``url`` in a context of its own (its own storage), and the
    list its uncaught errors go to."""
    context = await browser.new_context(viewport={"width": 900, "height": 700})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    await connected(page)
    return page, errors


async def connected(page) -> None:
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected",
                                                            timeout=UI_MS)


async def say(page, text: str) -> None:
    await page.fill("#message-input", text)
    await page.press("#message-input", "Enter")


def texts(page):
    return page.locator("#messages li.message .text")


def room_item(page, room: str):
    return page.locator(f'#rooms li[data-room="{room}"]')


async def open_room(page, room: str) -> None:
    await room_item(page, room).locator("button.room").click()
    await expect(room_item(page, room).locator("button.room")).to_have_attribute(
        "aria-current", "true")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_two_rooms_never_see_each_others_messages(transport, server, chromium):
    ada, ada_errors = await open_page(chromium, f"{server.url}?user=ada&room=red"
                                               f"&transport={transport}")
    bob, bob_errors = await open_page(chromium, f"{server.url}?user=bob&room=blue"
                                               f"&transport={transport}")
    await say(ada, "only for red")
    await expect(texts(ada)).to_have_text(["only for red"], timeout=UI_MS)
    await say(bob, "only for blue")
    await expect(texts(bob)).to_have_text(["only for blue"], timeout=UI_MS)
    # A message posted in blue after red's is stored: once bob shows it, red's would
    # have come before it on bob's connection if it were to come at all.
    async with WebSocketClient(server.url, "carol", room="blue") as carol:
        await carol.send("blue marker")
    await expect(texts(bob)).to_have_text(["only for blue", "blue marker"], timeout=UI_MS)
    await expect(texts(ada)).to_have_text(["only for red"])
    # Neither page is in the other's room, and the default room holds neither message.
    await expect(room_item(ada, "blue")).to_have_count(0)
    await expect(room_item(bob, "red")).to_have_count(0)
    await open_room(bob, "lobby")
    await expect(bob.locator("#messages li.message")).to_have_count(0)
    assert [m.text for m in await server.log.after(0)] == []
    assert [m.text for m in await server.log.room("red").after(0)] == ["only for red"]
    assert not ada_errors and not bob_errors, ada_errors + bob_errors


@pytest.mark.parametrize("transport", ["ws", "webtransport", "poll"])
async def test_unread_counts_and_switching_keeps_history(transport, start_chat, chromium):
    server = await start_chat(webtransport=transport == "webtransport")
    async with WebSocketClient(server.url, "bob") as bob:
        ada, errors = await open_page(chromium, f"{server.url}?user=ada&room=red"
                                                f"&transport={transport}")
        await expect(ada.locator("#transport")).to_have_text(transport)
        await say(ada, "red one")
        await expect(texts(ada)).to_have_text(["red one"], timeout=UI_MS)
        await bob.send("lobby 1")
        await bob.send("lobby 2")
        # Counted while red is on screen; red itself counts nothing.
        await expect(room_item(ada, "lobby")).to_have_attribute("data-unread", "2",
                                                                timeout=UI_MS)
        await expect(room_item(ada, "lobby").locator(".unread")).to_have_text("2")
        await expect(room_item(ada, "red")).to_have_attribute("data-unread", "0")
        await expect(texts(ada)).to_have_text(["red one"])
        await open_room(ada, "lobby")
        await expect(texts(ada)).to_have_text(["lobby 1", "lobby 2"], timeout=UI_MS)
        await expect(room_item(ada, "lobby")).to_have_attribute("data-unread", "0")
        # Back to red: its history is there as it was, once (no reload, no duplicate).
        await open_room(ada, "red")
        await expect(texts(ada)).to_have_text(["red one"], timeout=UI_MS)
        await bob.send("lobby 3")
        await expect(room_item(ada, "lobby")).to_have_attribute("data-unread", "1",
                                                                timeout=UI_MS)
        await open_room(ada, "lobby")
        await expect(texts(ada)).to_have_text(["lobby 1", "lobby 2", "lobby 3"],
                                              timeout=UI_MS)
        assert not errors, errors


async def test_a_room_joined_by_name_is_created_and_escaped(server, chromium):
    name = "<b>lab</b>"
    ada, errors = await open_page(chromium, f"{server.url}?user=ada&transport=ws")
    await ada.fill("#room-name", name)
    await ada.press("#room-name", "Enter")
    await expect(room_item(ada, name).locator("button.room")).to_have_attribute(
        "aria-current", "true", timeout=UI_MS)
    await expect(room_item(ada, name).locator("button.room")).to_have_text(f"#{name}")
    assert await ada.locator("#rooms b").count() == 0  # the name is text, not markup
    await say(ada, "in the lab")
    await expect(texts(ada)).to_have_text(["in the lab"], timeout=UI_MS)
    assert [m.text for m in await server.log.room(name).after(0)] == ["in the lab"]
    assert not errors, errors


async def test_a_reload_keeps_the_tabs_rooms(server, chromium):
    ada, errors = await open_page(chromium, f"{server.url}?user=ada&transport=ws")
    await ada.fill("#room-name", "red")
    await ada.press("#room-name", "Enter")
    await say(ada, "red before the reload")
    await expect(texts(ada)).to_have_text(["red before the reload"], timeout=UI_MS)
    await ada.reload()
    await connected(ada)
    await expect(ada.locator("#rooms li")).to_have_count(2)
    await expect(room_item(ada, "red").locator("button.room")).to_have_attribute(
        "aria-current", "true")
    await expect(texts(ada)).to_have_text(["red before the reload"], timeout=UI_MS)
    assert not errors, errors


@pytest.mark.parametrize("transport", ["ws", "longpoll"])
async def test_a_dm_between_the_page_and_the_panel_reaches_only_them(transport, server, chromium):
    panel = ChatPanel(server, user="notebook")
    try:
        await panel.wait_connected()
        ada, ada_errors = await open_page(chromium, f"{server.url}?user=ada"
                                                   f"&transport={transport}")
        cy, cy_errors = await open_page(chromium, f"{server.url}?user=cy&transport=sse")
        # A DM starts from the presence list: a click on the other person's name.
        dm = ada.locator("#presence button.dm", has_text="notebook")
        await dm.click(timeout=UI_MS)
        room = dm_room("ada", "notebook")
        await expect(room_item(ada, room).locator("button.room")).to_have_text(
            "@notebook")
        await say(ada, "just for you, notebook")
        await expect(texts(ada)).to_have_text(["just for you, notebook"], timeout=UI_MS)
        # The panel is told (a dm event), joins, and counts it unread ...
        await panel.wait_for(lambda p: any(r["room"] == room and r["unread"] == 1
                                           for r in p.rooms), timeout=20)
        panel.dm("ada")
        await panel.wait_for_text("just for you, notebook", timeout=20)
        await panel.send("just for you, ada")
        await expect(texts(ada)).to_have_text(["just for you, notebook",
                                               "just for you, ada"], timeout=UI_MS)
        # ... and nobody else sees any of it: cy has no such room, and the lobby is empty.
        await say(cy, "cy in the lobby")
        await expect(texts(cy)).to_have_text(["cy in the lobby"], timeout=UI_MS)
        await expect(room_item(cy, room)).to_have_count(0)
        assert [m.text for m in await server.log.after(0)] == ["cy in the lobby"]
        assert not ada_errors and not cy_errors, ada_errors + cy_errors
    finally:
        await panel.aclose()


@pytest.mark.parametrize("receiver", ["ws", "sse", "poll"])
async def test_a_dm_between_two_pages(receiver, server, chromium):
    bob, bob_errors = await open_page(chromium, f"{server.url}?user=bob"
                                               f"&transport={receiver}")
    ada, ada_errors = await open_page(chromium, f"{server.url}?user=ada&transport=ws")
    await ada.locator("#presence button.dm", has_text="bob").click(timeout=UI_MS)
    await say(ada, "psst, bob")
    await expect(texts(ada)).to_have_text(["psst, bob"], timeout=UI_MS)
    room = dm_room("ada", "bob")
    # bob's list gains the DM room, unread, named after ada.
    await expect(room_item(bob, room)).to_have_attribute("data-unread", "1",
                                                         timeout=UI_MS)
    await expect(room_item(bob, room).locator("button.room")).to_contain_text("@ada")
    await expect(texts(bob)).to_have_count(0)
    await open_room(bob, room)
    await expect(texts(bob)).to_have_text(["psst, bob"], timeout=UI_MS)
    await say(bob, "hi ada")
    await expect(texts(ada)).to_have_text(["psst, bob", "hi ada"], timeout=UI_MS)
    assert not bob_errors and not ada_errors, bob_errors + ada_errors


@pytest.mark.parametrize("transport", ["ws", "sse", "poll"])
async def test_a_private_room_is_refused_with_a_notice(transport, start_chat, chromium):
    server = await start_chat(token=True, private_rooms={"staff"})
    ada, errors = await open_page(chromium, f"{server.url}?token={server.token}&user=ada"
                                           f"&transport={transport}")
    await ada.fill("#room-name", "staff")
    await ada.press("#room-name", "Enter")
    notice = ada.locator("#notice-text")
    await expect(notice).to_contain_text("You cannot join #staff", timeout=UI_MS)
    await expect(notice).to_contain_text("forbidden")
    # Out of it again, back in the room before, still connected and chatting.
    await expect(room_item(ada, "staff")).to_have_count(0)
    await expect(room_item(ada, "lobby").locator("button.room")).to_have_attribute(
        "aria-current", "true")
    await connected(ada)
    await say(ada, "still here")
    await expect(texts(ada)).to_have_text(["still here"], timeout=UI_MS)
    assert not errors, errors


async def test_the_panels_switcher_and_dm_buttons(chromium):
    """The ChatPanel's view (panel.js) with a stand-in model, as tests/test_panel_view.py
    draws it: no switcher in one room, a switcher with unread counts in two, a name under
    Here that asks for a DM, and a switch that replaces rows with the same ids."""
    from test_panel_view import PANEL_JS, RENDER_JS, traits

    render = RENDER_JS.replace("send: () => {},", "send: (m) => (window.sent ??= []).push(m),")
    assert render != RENDER_JS
    model = {**traits([1, 2], []), "presence": ["notebook", "ada"], "room": "lobby",
             "rooms": [{"room": "lobby", "label": "lobby", "unread": 0}]}
    page = await chromium.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.evaluate(render, [PANEL_JS, model])
    await expect(page.locator(".chatlib-rooms")).to_be_hidden()
    await expect(page.locator(".chatlib-who")).not_to_contain_text(" in ")
    await page.locator("button.chatlib-dm", has_text="ada").click()
    await expect(page.locator("button.chatlib-dm")).to_have_count(1)  # not oneself
    await page.evaluate("""() => window.setTrait('rooms', [
        {room: 'lobby', label: 'lobby', unread: 0},
        {room: 'lab-1', label: 'lab-1', unread: 3},
        {room: '@ada+notebook', label: 'ada', unread: 0}])""")
    await expect(page.locator(".chatlib-rooms")).to_be_visible()
    await expect(page.locator(".chatlib-room option")).to_have_text(
        ["#lobby", "#lab-1 (3 unread)", "@ada"])
    await page.locator(".chatlib-room").select_option("lab-1")
    assert await page.evaluate("() => window.sent.filter((m) => m.type !== 'hello')") == [
        {"type": "dm", "user": "ada"}, {"type": "switch", "room": "lab-1"}]
    # The kernel switched: lab-1's messages have ids 1 and 2 too, and replace lobby's.
    await page.evaluate("""() => {
        window.setTrait('room', 'lab-1');
        window.setTrait('history', [1, 2].map((i) => ({ id: i, ts: 1700000000 + i,
            user: 'bob', text: `lab ${i}`, room: 'lab-1' })));
    }""")
    await expect(page.locator(".chatlib-history .chatlib-text")).to_have_text(
        ["lab 1", "lab 2"])
    await expect(page.locator(".chatlib-who")).to_contain_text("in #lab-1")
    assert not errors, errors
