"""Rooms (issue 23; chatlib.rooms, /work/wt/rooms-api.md): a message belongs to one room,
and a client never sees another room's messages, presence or typing, on any transport,
on the memory, SQLite and Redis logs, also when it resumes (WebSocket ``join`` with ``after``,
SSE ``Last-Event-ID``, the long-poll cursor). The default room is what the chat was
before rooms: its frames carry no ``room``."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from chatlib import Limits, MemoryLog, SQLiteLog
from chatlib.store import DEFAULT_ROOM
from chatlib.validation import ChatError
from chatlib.wire import SSEParser

T = 15.0
LIMITS = Limits(history=5, rate=1000, burst=1000, presence_interval=0)
KINDS = ("memory", "sqlite", "redis")


@pytest.fixture
def chat(make_any_log, start_chat):
    """A factory: ``await chat(kind, limits=..., **server_options)``, a server on that
    kind of log."""

    async def make(kind: str, limits: Limits = LIMITS, **options):
        return await start_chat(log=await make_any_log(kind), limits=limits, **options)

    return make


async def post(http: httpx.AsyncClient, server, text: str, room: str | None = None,
               user: str = "bob", status: int = 201) -> dict:
    params = {} if room is None else {"room": room}
    response = await http.post(server.url + "api/messages", params=params,
                               json={"user": user, "text": text})
    assert response.status_code == status, response.text
    return response.json()


async def seed(http: httpx.AsyncClient, server, *rooms: str | None) -> None:
    """Messages 1 to 3 of each of ``rooms`` (None: the default room), interleaved:
    ``a1``, ``b1``, ``a2`` ... (``lobby1`` for the default room)."""
    for i in range(1, 4):
        for room in rooms:
            await post(http, server, f"{room or 'lobby'}{i}", room)


async def frames_until(ws, done, kinds=("message",)) -> list[dict]:
    """Frames of ``kinds`` until ``done(frame)`` (that one included)."""
    frames = []
    async with asyncio.timeout(T):
        while True:  # bounded by the timeout
            frame = json.loads(await ws.recv())
            if frame["type"] in kinds:
                frames.append(frame)
            if done(frame):
                return frames


def text_is(text: str):
    return lambda frame: frame.get("text") == text


async def hello(server, user: str, **fields):
    ws = await ws_connect(server.ws_url)
    await ws.send(json.dumps({"type": "hello", "user": user, "after": 0, **fields}))
    return ws


# -- the store -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_each_room_is_a_log_of_its_own(make_any_log, kind):
    log = await make_any_log(kind)
    a, b = log.room("a"), log.room("b")
    assert log.room(DEFAULT_ROOM) is log and a.room(DEFAULT_ROOM) is log
    assert log.room("a") is a and b.room("a") is a
    first, _ = await log.append("ada", "lobby 1")
    in_a = [(await a.append("ada", f"a {i}"))[0] for i in range(1, 4)]
    in_b, _ = await b.append("bob", "b 1", "c1")
    assert first.id == 1 and [m.id for m in in_a] == [1, 2, 3] and in_b.id == 1
    assert [m.text for m in await a.after(1)] == ["a 2", "a 3"]
    assert [m.text for m in await b.after(0)] == ["b 1"]
    assert [m.text for m in await log.after(0)] == ["lobby 1"]
    assert [m.text for m in await a.before(3, 10)] == ["a 1", "a 2"]
    assert await a.last_id() == 3 and await b.first_id() == 1
    page = await a.page(1, 1)
    assert [m.text for m in page.messages] == ["a 2"] and page.last_id == 3
    # dedupe is per room: the same (user, client_id) in another room is another message
    again, duplicate = await b.append("bob", "b 1", "c1")
    assert duplicate and again == in_b
    _, duplicate = await a.append("bob", "b 1", "c1")
    assert not duplicate
    assert {m.room for m in await a.after(0)} == {"a"}
    assert await log.rooms() == {DEFAULT_ROOM: 1, "a": 4, "b": 1}
    # the wire: the default room's message is what it was; another room's says which
    assert "room" not in first.to_dict() and in_b.to_dict()["room"] == "b"


@pytest.mark.parametrize("kind", KINDS)
async def test_retention_is_per_room(make_any_log, kind):
    log = await make_any_log(kind, **{"max_len" if kind == "redis" else "max_messages": 10})
    busy, quiet = log.room("busy"), log.room("quiet")
    await quiet.append("ada", "kept")
    for i in range(30):
        await busy.append("bob", f"m{i}")
    assert await busy.first_id() > 1 and await busy.last_id() == 30
    assert [m.text for m in await quiet.after(0)] == ["kept"]


@pytest.mark.parametrize("kind", KINDS)
async def test_rooms_are_bounded(make_any_log, kind):
    log = await make_any_log(kind, max_rooms=3)  # the default room and two more
    await log.room("a").append("ada", "1")
    await log.room("b").append("ada", "1")
    with pytest.raises(ChatError) as refused:
        await log.room("c").append("ada", "1")
    assert refused.value.status == 429 and "rooms" in refused.value.error
    await log.room("a").append("ada", "2")  # the rooms it holds go on


async def test_an_sqlite_file_from_before_rooms_is_the_default_room(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)  # the table of a file made before rooms (and client ids)
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,"
               " ts REAL NOT NULL, user TEXT NOT NULL, text TEXT NOT NULL)")
    db.executemany("INSERT INTO messages (ts, user, text) VALUES (1.0, 'ada', ?)",
                   [("one",), ("two",)])
    db.commit()
    db.close()
    log = SQLiteLog(path)
    try:
        assert [(m.id, m.text, m.room) for m in await log.after(0)] == [
            (1, "one", DEFAULT_ROOM), (2, "two", DEFAULT_ROOM)]
        message, _ = await log.append("bob", "three")
        assert message.id == 3
        other, _ = await log.room("new").append("bob", "first")
        assert other.id == 1 and other.room == "new"
    finally:
        await log.close()
    log = SQLiteLog(path)  # and opens again, rooms and all
    try:
        assert [m.text for m in await log.room("new").after(0)] == ["first"]
        assert await log.last_id() == 3
    finally:
        await log.close()


async def test_reading_a_room_makes_nothing_that_stays():
    log = MemoryLog(max_rooms=2)
    held = log.room("a")
    assert log.room("a") is held  # one log per room while anyone holds it
    for i in range(100):
        assert await log.room(f"read-{i}").after(0) == []
    assert await log.rooms() == {DEFAULT_ROOM: 0}
    await held.append("ada", "first")  # the one room besides the default one
    with pytest.raises(ChatError):
        await log.room("b").append("ada", "one too many")
    assert await log.rooms() == {DEFAULT_ROOM: 0, "a": 1}


async def test_a_room_first_used_while_the_server_stops_is_closed_too():
    """Rooms.close closes the hubs held then; a room first asked for after it (a late
    long poll during stop()) gets a hub as closed as the rest, so the poll answers at
    once instead of parking until the server's shutdown timeout cancels it."""
    from chatlib.hub import Hub
    from chatlib.rooms import Rooms

    default = Hub(MemoryLog(), LIMITS)
    rooms = Rooms(default)
    await default.start()
    rooms.close()
    late = await rooms.hub("late")
    assert late.closing.is_set()
    page = await asyncio.wait_for(late.poll(0, timeout=30), 5)
    assert page.messages == []


async def test_a_room_is_held_while_a_request_uses_it():
    """Rooms.using: a room's hub stays while any request uses it, goes with the last one,
    also when the request fails or its hub could not start; the default room's stays."""
    from chatlib.hub import Hub
    from chatlib.rooms import Rooms

    log = MemoryLog()
    default = Hub(log, LIMITS)
    rooms = Rooms(default)
    async with rooms.using(DEFAULT_ROOM) as hub:
        assert hub is default
    async with rooms.using("a") as first:
        async with rooms.using("a") as second:
            assert second is first and rooms.hubs["a"] is first
        assert rooms.hubs["a"] is first  # the outer request still uses it
    assert set(rooms.hubs) == {DEFAULT_ROOM}
    with pytest.raises(RuntimeError):
        async with rooms.using("b"):
            raise RuntimeError("the request failed")
    assert set(rooms.hubs) == {DEFAULT_ROOM}

    async def broken_start(self) -> None:
        raise OSError("the log cannot be read")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Hub, "start", broken_start)
        with pytest.raises(OSError):
            async with rooms.using("c"):
                pass
    assert set(rooms.hubs) == {DEFAULT_ROOM}
    async with rooms.using("c") as hub:  # nothing of the failed start is left in the way
        assert rooms.hubs["c"] is hub
    assert set(rooms.hubs) == {DEFAULT_ROOM}


# -- WebSocket -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_websocket_clients_see_only_their_rooms(chat, kind):
    server = await chat(kind)
    async with httpx.AsyncClient(timeout=T) as http:
        lobby = await hello(server, "lea")
        in_a = await hello(server, "ada", room="a")
        both = await hello(server, "cy", room="a")
        await both.send(json.dumps({"type": "join", "room": "b", "after": 0}))
        joined = await frames_until(both, lambda f: f["type"] == "joined", ("joined",))
        assert joined == [{"type": "joined", "room": "b"}]
        try:
            await post(http, server, "to a", "a")
            await post(http, server, "to b", "b")
            await post(http, server, "to lobby")
            await post(http, server, "end a", "a")
            await post(http, server, "end b", "b")
            await post(http, server, "end lobby")
            got = await frames_until(lobby, text_is("end lobby"))
            assert [(f["text"], "room" in f) for f in got] == [
                ("to lobby", False), ("end lobby", False)]
            got = await frames_until(in_a, text_is("end a"))
            assert [(f["text"], f["room"], f["id"]) for f in got] == [
                ("to a", "a", 1), ("end a", "a", 2)]
            got = await frames_until(both, lambda f: f.get("text") == "end b")
            assert sorted(f["text"] for f in got) == ["end a", "end b", "to a", "to b"]
            assert all(f["room"] == f["text"][-1] for f in got)
        finally:
            for ws in (lobby, in_a, both):
                await ws.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_websocket_join_resumes_after_that_rooms_cursor(chat, kind):
    server = await chat(kind)
    async with httpx.AsyncClient(timeout=T) as http:
        await seed(http, server, "a", None, "b")
        ws = await hello(server, "ada", after=3)  # the default room: nothing new
        try:
            await ws.send(json.dumps({"type": "join", "room": "a", "after": 1}))
            got = await frames_until(ws, text_is("a3"), ("message", "joined", "history"))
            assert [(f["type"], f.get("text")) for f in got] == [
                ("joined", None), ("message", "a2"), ("message", "a3")]
            await post(http, server, "b4", "b")
            await post(http, server, "a4", "a")
            got = await frames_until(ws, text_is("a4"))
            assert [f["text"] for f in got] == ["a4"]
        finally:
            await ws.close()


async def test_a_polling_user_is_present_in_a_bounded_number_of_rooms(chat):
    server = await chat("memory", limits=Limits(rooms_per_client=2))
    async with httpx.AsyncClient(timeout=T) as http:
        for room, status in (("a", 200), ("b", 200), ("a", 200), ("c", 429)):
            answer = await http.post(server.url + "api/presence", params={"room": room},
                                     json={"user": "ada"})
            assert answer.status_code == status, answer.text
        assert "too many rooms" in answer.json()["error"]
        answer = await http.post(server.url + "api/presence", params={"room": "c"},
                                 json={"user": "bob"})
        assert answer.status_code == 200  # another user's own bound


async def test_a_refused_hello_leaves_nothing_behind(chat):
    server = await chat("memory", limits=Limits(rooms_per_client=0))
    ws = await hello(server, "ada")
    try:
        assert "too many rooms" in json.loads(await ws.recv())["error"]
        await asyncio.wait_for(ws.wait_closed(), T)
        assert ws.close_code == 1008
    finally:
        await ws.close()
    await wait_until(lambda: not server.rooms.connections("ada"))


async def test_stats_count_a_connection_in_two_rooms_once(chat):
    server = await chat("memory")
    ws = await hello(server, "ada")
    try:
        await ws.send(json.dumps({"type": "join", "room": "a", "after": 0}))
        await frames_until(ws, lambda f: f["type"] == "joined", ())
        stats = server.stats()
        assert stats["connections"]["websocket"] == 1
        assert [c["user"] for c in stats["clients"]] == ["ada", "ada"]  # a queue per room
    finally:
        await ws.close()


async def test_websocket_leave_stops_the_room(chat):
    server = await chat("memory")
    async with httpx.AsyncClient(timeout=T) as http:
        ws = await hello(server, "ada")
        try:
            await ws.send(json.dumps({"type": "join", "room": "a", "after": 0}))
            await frames_until(ws, lambda f: f["type"] == "joined", ())
            await ws.send(json.dumps({"type": "leave", "room": "a"}))
            got = await frames_until(ws, lambda f: f["type"] == "left", ("left",))
            assert got == [{"type": "left", "room": "a"}]
            await post(http, server, "after leaving", "a")
            await post(http, server, "lobby")
            got = await frames_until(ws, text_is("lobby"))
            assert [f["text"] for f in got] == ["lobby"]
            # posting in a room it is not in is refused, and the connection stays
            await ws.send(json.dumps({"type": "message", "text": "x", "room": "a",
                                      "client_id": "c9"}))
            got = await frames_until(ws, lambda f: f["type"] == "error", ("error",))
            assert got[0]["room"] == "a" and "join it first" in got[0]["error"]
            # the error names the refused message: its sender stops waiting for an ack
            assert (got[0]["status"], got[0]["client_id"]) == (409, "c9")
            await ws.send(json.dumps({"type": "message", "text": "still here"}))
            await frames_until(ws, text_is("still here"))
        finally:
            await ws.close()


async def test_websocket_posts_to_the_room_it_names(chat):
    server = await chat("memory")
    ws = await hello(server, "ada", room="a")
    other = await hello(server, "bob")
    try:
        await ws.send(json.dumps({"type": "message", "text": "hi a", "room": "a",
                                  "client_id": "c1"}))
        got = await frames_until(ws, lambda f: f["type"] == "ack", ("message", "ack"))
        assert [(f["type"], f["room"], f["id"]) for f in got] == [
            ("message", "a", 1), ("ack", "a", 1)]
        # without "room" it is about the default room, which this connection is not in
        await ws.send(json.dumps({"type": "message", "text": "lost?"}))
        got = await frames_until(ws, lambda f: f["type"] == "error", ("error",))
        assert got[0]["room"] == DEFAULT_ROOM and "join it first" in got[0]["error"]
        await other.send(json.dumps({"type": "message", "text": "lobby"}))
        got = await frames_until(other, text_is("lobby"))
        assert [f["text"] for f in got] == ["lobby"]
    finally:
        await ws.close()
        await other.close()


async def test_websocket_refuses_bad_rooms_clearly(chat):
    server = await chat("memory", limits=Limits(rooms_per_client=2, rate=1000, burst=1000))
    ws = await hello(server, "ada")
    try:
        async def answer(frame: dict) -> dict:
            await ws.send(json.dumps(frame))
            return (await frames_until(ws, lambda f: f["type"] in ("error", "joined"),
                                       ("error", "joined")))[0]

        invisible = await answer({"type": "join", "room": "a\u200bb"})
        assert "room" in invisible["error"] and "status" not in invisible  # unnamed room
        assert "@A+B" in (await answer({"type": "join", "room": "@nobody"}))["error"]
        assert "needs a room" in (await answer({"type": "join"}))["error"]
        assert (await answer({"type": "join", "room": "a"}))["type"] == "joined"
        again = await answer({"type": "join", "room": "a"})
        assert "already" in again["error"] and (again["room"], again["status"]) == ("a", 409)
        full = await answer({"type": "join", "room": "b"})
        assert "too many rooms" in full["error"] and full["status"] == 429
        await ws.send(json.dumps({"type": "message", "text": "fine"}))
        await frames_until(ws, text_is("fine"))
    finally:
        await ws.close()
    # a hello naming a bad room is a bad hello: error, then 1008
    ws = await hello(server, "ada", room="")
    try:
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and "room" in error["error"]
        await asyncio.wait_for(ws.wait_closed(), T)
        assert ws.close_code == 1008
    finally:
        await ws.close()


async def test_presence_and_typing_are_per_room(chat):
    server = await chat("memory")
    lobby = await hello(server, "lea")
    in_a = await hello(server, "ada", room="a")
    try:
        got = await frames_until(in_a, lambda f: f["type"] == "presence", ("presence",))
        assert got[-1]["users"] == ["ada"] and got[-1]["room"] == "a"
        await in_a.send(json.dumps({"type": "typing", "room": "a"}))
        got = await frames_until(in_a, lambda f: f["type"] == "typing", ("typing",))
        assert got == [{"type": "typing", "user": "ada", "room": "a"}]
        await lobby.send(json.dumps({"type": "typing"}))
        await lobby.send(json.dumps({"type": "message", "text": "end"}))
        got = await frames_until(lobby, text_is("end"), ("presence", "typing", "message"))
        assert all("room" not in f for f in got)
        assert all(f["users"] == ["lea"] for f in got if f["type"] == "presence")
        async with httpx.AsyncClient(timeout=T) as http:
            answer = (await http.get(server.url + "api/presence?room=a")).json()
            assert answer == {"users": ["ada"], "count": 1, "room": "a"}
            answer = (await http.get(server.url + "api/presence")).json()
            assert answer == {"users": ["lea"], "count": 1}
    finally:
        await lobby.close()
        await in_a.close()


# -- HTTP: polling, long polling, SSE --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_polls_read_one_room_with_its_cursor(chat, kind):
    server = await chat(kind)
    async with httpx.AsyncClient(timeout=T) as http:
        await seed(http, server, "a", "b")
        answer = (await http.get(server.url + "api/messages",
                                 params={"room": "a", "after": 1})).json()
        assert [m["text"] for m in answer["messages"]] == ["a2", "a3"]
        assert answer["last_id"] == 3 and answer["room"] == "a"
        assert (await http.get(server.url + "api/messages")).json() == {
            "messages": [], "last_id": 0}
        older = (await http.get(server.url + "api/messages",
                                params={"room": "b", "before": 3})).json()
        assert [m["text"] for m in older["messages"]] == ["b1", "b2"]

        async def long_poll():
            return (await http.get(server.url + "api/messages",
                                   params={"room": "a", "after": 3, "wait": 10})).json()

        waiting = asyncio.ensure_future(long_poll())
        await wait_until(lambda: "a" in server.rooms.hubs
                         and server.rooms.hubs["a"].parked == 1)
        await post(http, server, "b4", "b")
        await post(http, server, "lobby")
        await post(http, server, "a4", "a")
        answer = await waiting
        assert [m["text"] for m in answer["messages"]] == ["a4"]
        assert answer["messages"][0]["room"] == "a"


@pytest.mark.parametrize("kind", KINDS)
async def test_sse_streams_one_room_and_resumes_in_it(chat, kind):
    server = await chat(kind)
    async with httpx.AsyncClient(timeout=T) as http:
        await seed(http, server, "a", "b")

        async def stream(headers: dict, until: str) -> list:
            events = []
            parser = SSEParser()
            async with http.stream("GET", server.url + "api/events?room=a",
                                   headers=headers) as response:
                assert response.status_code == 200
                async with asyncio.timeout(T):
                    async for chunk in response.aiter_bytes():
                        for event in parser.feed(chunk):
                            if event.event == "message":
                                events.append((event.last_event_id,
                                               json.loads(event.data)))
                        if events and events[-1][1]["text"] == until:
                            return events
            return events

        resumed = asyncio.ensure_future(stream({"Last-Event-ID": "2"}, "a4"))
        await wait_until(lambda: "a" in server.rooms.hubs
                         and server.rooms.hubs["a"].subscribed)
        await post(http, server, "b4", "b")
        await post(http, server, "lobby")
        await post(http, server, "a4", "a")
        events = await resumed
        assert [(i, m["text"], m["room"]) for i, m in events] == [
            ("3", "a3", "a"), ("4", "a4", "a")]


async def test_http_refuses_bad_room_names(chat):
    server = await chat("memory")
    async with httpx.AsyncClient(timeout=T) as http:
        for path, method in (("api/messages", "GET"), ("api/events", "GET"),
                             ("api/presence", "GET")):
            response = await http.request(method, server.url + path,
                                          params={"room": "\u202eevil"})
            assert response.status_code == 400 and "room" in response.json()["error"]
        response = await http.post(server.url + "api/messages", params={"room": "@x"},
                                   json={"user": "ada", "text": "hi"})
        assert response.status_code == 400


async def test_rooms_nobody_is_in_are_dropped(chat):
    server = await chat("memory")
    async with httpx.AsyncClient(timeout=T) as http:
        await post(http, server, "hi", "a")
        assert set(server.rooms.hubs) == {DEFAULT_ROOM}
        ws = await hello(server, "ada", room="a")
        try:
            await frames_until(ws, text_is("hi"))
            assert "a" in server.rooms.hubs
        finally:
            await ws.close()
        await wait_until(lambda: "a" not in server.rooms.hubs)
        answer = (await http.get(server.url + "api/messages", params={"room": "a"})).json()
        assert [m["text"] for m in answer["messages"]] == ["hi"]


async def test_webtransport_sessions_join_rooms_as_websockets_do(chat):
    from test_webtransport import Probe

    server = await chat("memory", webtransport=True)
    ws = await hello(server, "bob", room="b")
    probe = Probe()
    status, error = await probe.session.open(server.wt_url, server.wt_hash)
    assert status == 200, error
    lines = probe.lines

    def line(**fields) -> int:
        probe.session.send(json.dumps(fields).encode() + b"\n")
        return len(lines)

    def typed(kind: str, **fields):
        return lambda: [f for f in lines if f["type"] == kind
                        and all(f.get(k) == v for k, v in fields.items())]

    try:
        async with httpx.AsyncClient(timeout=T) as http:
            line(type="hello", user="ada", room="a")
            await wait_until(lambda: "a" in server.rooms.hubs
                             and server.rooms.hubs["a"].subscribed)
            line(type="join", room="b", after=0)
            await probe.until(typed("joined", room="b"))
            await post(http, server, "to lobby")
            await post(http, server, "to a", "a")
            line(type="message", room="b", text="from ada")
            await probe.until(typed("message", text="from ada"))
            assert [(f["text"], f["room"]) for f in lines if f["type"] == "message"] == [
                ("to a", "a"), ("from ada", "b")]
            got = await frames_until(ws, text_is("from ada"))
            assert [(f["text"], f["room"]) for f in got] == [("from ada", "b")]
            # a typing datagram names its room, as the WebSocket's frame does
            probe.session.send_datagram(json.dumps({"type": "typing", "room": "b"}).encode())
            got = await frames_until(ws, lambda f: f["type"] == "typing", ("typing",))
            assert got == [{"type": "typing", "user": "ada", "room": "b"}]
            line(type="leave", room="b")
            await probe.until(typed("left", room="b"))
            line(type="message", room="b", text="gone")
            error = await probe.until(typed("error", room="b"))
            assert "join it first" in error[0]["error"]
    finally:
        await probe.session.close()
        await ws.close()


async def wait_until(condition, timeout: float = T) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # bounded by the timeout
            await asyncio.sleep(0.005)
