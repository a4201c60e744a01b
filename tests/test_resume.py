"""The resume protocol, on every transport and every log (issue 18; chatlib.wire, README
"Resuming"): a fresh join gets the newest page and a marker for older ones, older pages
come by id, a cursor within retention gets everything after it, a cursor older than
retention gets an explicit gap. (A log that goes back, FLUSHALL: tests/test_log_reset.py.)

Before, a fresh join (WebSocket ``after: 0``, SSE without a cursor) replayed the whole
log: 20,000 of 20,000 frames per connection.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from log_fixtures import LOGS
from websockets.asyncio.client import connect as ws_connect

from chatlib import Limits
from chatlib.store import DEFAULT_ROOM
from chatlib.wire import SSEParser

T = 15.0
PAGE = Limits(history=5, rate=1000, burst=1000)


@pytest.fixture
def chat(make_any_log, start_chat):
    """A factory: ``await chat(kind, **log_options)``, a server on that kind of log."""

    async def make(kind: str, **options):
        return await start_chat(log=await make_any_log(kind, **options), limits=PAGE)

    return make


async def post_many(server, count: int, room: str | None = None) -> None:
    async with httpx.AsyncClient() as http:
        for i in range(count):
            response = await http.post(server.url + "api/messages",
                                       params={"room": room} if room else {},
                                       json={"user": "bob", "text": f"m{i + 1}"})
            assert response.status_code == 201


async def ws_events(server, hello: dict, until) -> list[dict]:
    """Frames after ``hello`` until ``until(frames)``."""
    frames: list[dict] = []
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada", **hello}))
        async with asyncio.timeout(T):
            while not until(frames):
                frames.append(json.loads(await ws.recv()))
    return [f for f in frames if f["type"] not in ("presence", "typing")]


async def sse_events(server, query: str, until) -> list[dict]:
    events: list[dict] = []
    parser = SSEParser()
    async with httpx.AsyncClient(timeout=T) as http:
        async with http.stream("GET", server.url + "api/events?" + query) as stream:
            chunks = stream.aiter_bytes()
            async with asyncio.timeout(T):
                while not until(events):
                    for event in parser.feed(await anext(chunks)):
                        events.append({"type": event.event, **json.loads(event.data)})
    return [e for e in events if e["type"] not in ("presence", "typing")]


def has_message(message_id: int):
    return lambda events: any(e.get("id") == message_id and e["type"] == "message"
                              for e in events)


def summary(events: list[dict]) -> list:
    return [e["id"] if e["type"] == "message" else (e["type"], e.get("before", e.get(
        "first_id"))) for e in events]


@pytest.mark.parametrize("kind", LOGS)
async def test_a_fresh_join_gets_the_newest_page_and_older_pages_by_id(chat, kind):
    server = await chat(kind)
    await post_many(server, 12)
    newest = [("history", 8), 8, 9, 10, 11, 12]
    assert summary(await ws_events(server, {}, has_message(12))) == newest
    assert summary(await ws_events(server, {"after": 0}, has_message(12))) == newest
    assert summary(await sse_events(server, "", has_message(12))) == newest
    async with httpx.AsyncClient() as http:
        body = (await http.get(server.url + "api/messages?after=0")).json()
        assert [m["id"] for m in body["messages"]] == [8, 9, 10, 11, 12]
        assert body["history"] == {"before": 8} and body["last_id"] == 12
        older = (await http.get(server.url + "api/messages?before=8")).json()
        assert [m["id"] for m in older["messages"]] == [3, 4, 5, 6, 7]
        assert older["before"] == 3 and older["first_id"] == 1
        oldest = (await http.get(server.url + "api/messages?before=3")).json()
        assert [m["id"] for m in oldest["messages"]] == [1, 2] and "before" not in oldest


@pytest.mark.parametrize("kind", LOGS)
async def test_a_resume_within_retention_gets_everything_after_its_cursor(
        chat, kind, make_client):
    server = await chat(kind)
    await post_many(server, 12)
    for transport in ("ws", "sse", "longpoll", "poll"):
        client = await make_client(transport, server, f"r-{transport}", after=3)
        got = await client.receive_many(9, timeout=T)
        assert [m.id for m in got] == list(range(4, 13)), transport  # no loss, no repeat
    assert summary(await ws_events(server, {"after": 3}, has_message(12))) == list(range(4, 13))


@pytest.mark.parametrize("room", [None, "lab"])
@pytest.mark.parametrize("kind", LOGS)
async def test_a_cursor_older_than_retention_gets_a_gap(chat, kind, room):
    """Per room too (issue 23): a room's retention and gap are its own; the default
    room, with one message, keeps it."""
    server = await chat(kind, **({"max_len": 10} if kind == "redis" else {"max_messages": 10}))
    if room:
        await post_many(server, 1)
    await post_many(server, 30, room)
    first = await server.log.room(room or DEFAULT_ROOM).first_id()
    assert 20 <= first <= 22  # 90-100 % of the cap kept
    expected = [("gap", first), *range(first, 31)]
    in_room = {"room": room} if room else {}
    query = f"room={room}&" if room else ""
    assert summary(await ws_events(server, {"after": 2, **in_room}, has_message(30))) \
        == expected
    assert summary(await sse_events(server, query + "after=2", has_message(30))) == expected
    async with httpx.AsyncClient() as http:
        body = (await http.get(server.url + f"api/messages?{query}after=2")).json()
        if room:
            assert [m["id"] for m in (await http.get(server.url + "api/messages?after=0")
                                      ).json()["messages"]] == [1]
    assert body["gap"] == {"first_id": first}
    assert [m["id"] for m in body["messages"]] == list(range(first, first + 5))


async def test_a_websocket_asks_for_older_pages_on_its_own_connection(chat):
    server = await chat("memory")
    await post_many(server, 12)
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada"}))
        await ws.send(json.dumps({"type": "older", "before": 8}))
        async with asyncio.timeout(T):
            while (frame := json.loads(await ws.recv()))["type"] != "older":  # bounded
                pass
    assert [m["id"] for m in frame["messages"]] == [3, 4, 5, 6, 7]
    assert frame["before"] == 3 and frame["first_id"] == 1


async def test_replays_are_budgeted_per_address(start_chat, make_client):
    server = await start_chat(limits=Limits(history=5, replay_rate=0.001, replay_burst=2,
                                            rate=1000, burst=1000))
    await post_many(server, 30)
    first = await make_client("ws", server, "first", after=1)
    got = await first.receive_many(15, timeout=T)  # the first page, then two tokens' worth
    assert [m.id for m in got] == list(range(2, 17))
    second = await make_client("sse", server, "second", after=1)  # the same address
    assert [m.id for m in await second.receive_many(5, timeout=T)] == list(range(2, 7))
    for client in (first, second):  # the address's budget is spent: the rest waits
        with pytest.raises(TimeoutError):
            await client.receive(timeout=0.5)
