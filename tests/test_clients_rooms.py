"""The Python clients in rooms (chatlib.clients, ``room=``) and the ChatPanel's rooms.

* Every client transport reads and posts in the room it is given, and only there; without
  ``room=`` it is in the default room, with today's URLs and frames.
* A WebSocket client joins several rooms (one cursor each), resumes each after its own
  cursor on reconnect, and leaves them; a refused join raises and the connection stays.
* ``ChatPanel(server, room=...)``: starts in the room, counts the other rooms' messages as
  unread, switches (keeping each room's history), and opens DMs.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import CLIENT_CLASSES, CLIENT_DEFAULTS, TRANSPORTS

from chatlib import ChatPanel, WebSocketClient
from chatlib.clients import ChatRefused
from chatlib.store import DEFAULT_ROOM
from chatlib.wire import dm_room


def client(transport: str, server, user: str, **options):
    return CLIENT_CLASSES[transport](server.url, user, **CLIENT_DEFAULTS[transport], **options)


async def nothing_more(client, timeout: float = 0.3) -> None:
    """Nothing else arrives (checked after a later message proved delivery had happened)."""
    with pytest.raises(TimeoutError):
        await client.receive(timeout=timeout)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_reads_and_posts_in_its_room_only(transport, server):
    async with client(transport, server, "ada", room="red") as ada, \
            WebSocketClient(server.url, "bob") as bob, \
            WebSocketClient(server.url, "cy", room="red") as cy:
        await bob.send("lobby only")
        stored = await ada.send("red only")
        assert stored.room == "red" and stored.id == 1
        got = await cy.receive(timeout=10)
        assert (got.room, got.text) == ("red", "red only")
        await cy.send("red reply")
        received = [m for m in await ada.receive_many(2, timeout=10)]
        assert [(m.room, m.text) for m in received] == [("red", "red only"),
                                                        ("red", "red reply")]
        assert ada.last_id == 2 and ada.cursors == {"red": 2}
        await nothing_more(ada)
        assert [m.text for m in await server.log.after(0)] == ["lobby only"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_without_a_room_a_client_is_in_the_default_room(transport, server):
    async with client(transport, server, "ada") as ada:
        stored = await ada.send("hello")
        assert ada.room == DEFAULT_ROOM and stored.room == DEFAULT_ROOM
        assert "room" not in stored.to_dict()
        assert (await ada.receive(timeout=10)).text == "hello"


async def test_a_websocket_client_in_several_rooms_resumes_each(server):
    async with WebSocketClient(server.url, "ada") as ada, \
            WebSocketClient(server.url, "bob", room="red") as bob:
        await ada.join("red")
        await ada.join("blue")
        await bob.send("red 1")
        await ada.send("blue 1", room="blue")
        got = await ada.receive_many(2, timeout=10)
        assert sorted((m.room, m.text) for m in got) == [("blue", "blue 1"), ("red", "red 1")]
        assert ada.cursors == {DEFAULT_ROOM: 0, "red": 1, "blue": 1}
        await ada.close()
        await bob.send("red 2")  # while ada is away
        await ada.connect()  # hello, then a join per room, each after its own cursor
        got = await ada.receive(timeout=10)
        assert (got.room, got.id, got.text) == ("red", 2, "red 2")
        await nothing_more(ada)
        await ada.leave("red")
        await bob.send("red 3")
        await ada.send("still in blue", room="blue")
        got = await ada.receive(timeout=10)
        assert (got.room, got.text) == ("blue", "still in blue")
        assert "red" not in ada.cursors


async def test_a_refused_join_raises_and_the_connection_stays(server):
    async with WebSocketClient(server.url, "eve") as eve:
        with pytest.raises(ChatRefused) as refused:
            await eve.join(dm_room("ada", "bob"))
        assert refused.value.status == 403 and refused.value.error.startswith("forbidden")
        assert dm_room("ada", "bob") not in eve.cursors
        assert (await eve.send("eve is still here")).room == DEFAULT_ROOM


async def test_a_message_to_a_room_not_joined_is_refused_at_once(server):
    async with WebSocketClient(server.url, "ada", ack_timeout=30) as ada:
        async with asyncio.timeout(10):  # not after ack_timeout
            with pytest.raises(ChatRefused) as refused:
                await ada.send("nobody joined", room="elsewhere")
        assert refused.value.status == 409 and not ada.pending


async def test_an_http_client_cannot_join_a_second_room(server):
    async with client("poll", server, "ada") as ada:
        with pytest.raises(TypeError, match="one client per room"):
            await ada.join("red")


@pytest.fixture
async def panels():
    made: list[ChatPanel] = []

    def make(*args, **options) -> ChatPanel:
        made.append(ChatPanel(*args, **options))
        return made[-1]

    yield make
    for panel in made:
        await panel.aclose()


async def shows(panel: ChatPanel, texts: list[str]) -> None:
    """Wait until the view's history (the room on screen's) is exactly ``texts``."""
    await panel.wait_for(lambda p: [m["text"] for m in p.history] == texts, timeout=20)


@pytest.mark.parametrize("transport", ["ws", "longpoll"])
async def test_the_panel_starts_in_its_room_and_switches(transport, server, panels):
    panel = panels(server, "notebook", room="lab-1", transport=transport)
    await panel.wait_connected()
    assert panel.room == "lab-1" and [r["room"] for r in panel.rooms] == ["lab-1"]
    async with WebSocketClient(server.url, "ada", room="lab-1") as ada, \
            WebSocketClient(server.url, "bob", room="lab-2") as bob:
        await ada.send("for lab 1")
        await panel.wait_for_text("for lab 1")
        panel.switch("lab-2")
        await bob.send("for lab 2")
        await shows(panel, ["for lab 2"])
        await ada.send("lab 1 while away")  # counted unread (ws: live; HTTP: api/rooms)
        await panel.wait_for(lambda p: p.rooms[0]["unread"] == 1, timeout=20)
        panel.switch("lab-1")
        await shows(panel, ["for lab 1", "lab 1 while away"])
        assert [r["unread"] for r in panel.rooms] == [0, 0]
        sent = await panel.send("from the panel")
        assert sent.room == "lab-1"
        assert [m.text for m in await server.log.after(0)] == []


async def test_a_panel_message_right_after_a_switch_goes_to_the_new_room(server, panels):
    panel = panels(server, "notebook")
    await panel.wait_connected()
    panel.switch("lab-9")
    sent = await panel.send("right away")  # its join is on its way in a task
    assert sent.room == "lab-9" and panel.room == "lab-9" and not panel.error


@pytest.mark.parametrize("transport", ["ws", "poll"])
async def test_the_panel_opens_a_dm_and_is_told_of_one(transport, server, panels):
    panel = panels(server, "notebook", transport=transport)
    await panel.wait_connected()
    async with WebSocketClient(server.url, "ada") as ada:
        room = dm_room("ada", "notebook")
        await ada.join(room)
        await ada.send("hello notebook", room=room)
        await panel.wait_for(lambda p: [r["unread"] for r in p.rooms] == [0, 1], timeout=20)
        panel.dm("ada")
        assert panel.room == room
        await panel.wait_for_text("hello notebook")
        await panel.send("hello ada")
        got = [m async for m in _until(ada, "hello ada")]
        assert all(m.room == room for m in got)


async def _until(client, text: str, timeout: float = 10.0):
    async with asyncio.timeout(timeout):
        for _ in range(100):  # bounded: at most 100 messages before it
            message = await client.receive()
            yield message
            if message.text == text:
                return


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_the_panel_shows_a_refused_room_and_goes_back(transport, server, panels):
    panel = panels(server, "notebook", transport=transport)
    await panel.wait_connected()
    panel.switch(dm_room("ada", "bob"))
    await panel.wait_for(lambda p: "cannot join" in p.error and p.room == DEFAULT_ROOM,
                         timeout=20)
    assert [r["room"] for r in panel.rooms] == [DEFAULT_ROOM]
    assert "forbidden" in panel.error
    await panel.send("still connected")


async def test_a_panel_with_a_user_token_reads_its_private_room(start_chat, panels):
    server = await start_chat(token=True, private_rooms={"staff"})
    shared = panels(server, "guest")
    await shared.wait_connected()
    shared.switch("staff")  # the shared token opens no private room
    await shared.wait_for(lambda p: "forbidden" in p.error and p.room == DEFAULT_ROOM,
                          timeout=20)
    staff = panels(server, "ada", token=server.user_token("ada", rooms=["staff"]))
    await staff.wait_connected()
    staff.switch("staff")
    sent = await staff.send("staff only")
    assert sent.room == "staff"
    assert [m.text for m in await server.log.room("staff").after(0)] == ["staff only"]
