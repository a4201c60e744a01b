"""Every transport over real sockets: fan-out between all of them, resume, reset, presence,
typing, history, long-poll timing (logical, not wall-clock), and the static files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from chatlib import Limits, fastpath, protocols
from chatlib.wire import SSEParser

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
TRANSPORTS = ("poll", "longpoll", "sse", "ws")
T = 10  # seconds: hang guard for one receive; never reached when things work


@pytest.fixture(autouse=True, params=["fast", "public", "stock"],
                ids=["fast path", "public path", "uvicorn's protocols"])
def path(request, monkeypatch) -> str:
    """Every test here runs three times: with chatlib.fastpath on; switched off as it
    switches itself off when the installed uvicorn/websockets/h11 lack what it expects;
    and with that and uvicorn's own protocols instead of chatlib.protocols' (what a
    uvicorn that lacks what those override gets: tests/test_fastpath.py)."""
    if request.param != "fast":
        monkeypatch.setattr(fastpath, "MISSING", "switched off by the test")
    if request.param == "stock":
        monkeypatch.setattr(protocols, "MISSING", "switched off by the test")
    return request.param


# -- wire-level helpers (no client-side de-duplication) ---------------------------------


async def post(http: httpx.AsyncClient, server, user: str, text: str) -> dict:
    response = await http.post(server.url + "api/messages", json={"user": user, "text": text})
    assert response.status_code == 201, response.text
    return response.json()


class SSEReader:
    """One per streaming response (httpx streams a response only once): raw bytes as they
    came, and the events wire.SSEParser found in them, not yet handed out."""

    def __init__(self, response: httpx.Response) -> None:
        self.chunks = response.aiter_bytes()
        self.parser = SSEParser()
        self.raw = b""
        self.events: list = []

    async def read(self) -> bool:
        """One more chunk from the network; False at the end of the stream."""
        try:
            chunk = await anext(self.chunks)
        except StopAsyncIteration:
            return False
        self.raw += chunk
        self.events += [(e.event, e.last_event_id, json.loads(e.data))
                        for e in self.parser.feed(chunk)]
        return True


def sse_reader(response: httpx.Response) -> SSEReader:
    if not hasattr(response, "_test_reader"):
        response._test_reader = SSEReader(response)
    return response._test_reader


async def read_sse(response: httpx.Response, until, *, limit: int = 10_000):
    """SSE events ``(event, last_event_id, data)`` from a streaming response until
    ``until(events)``."""
    reader, events = sse_reader(response), []
    for _ in range(1_000_000):  # chunks; each waits on the network (callers set a timeout)
        while reader.events:
            events.append(reader.events.pop(0))
            if until(events) or len(events) >= limit:
                return events
        if not await reader.read():
            break
    raise AssertionError(f"the event stream ended after {events}")


def has_message(text: str):
    return lambda events: any(e == "message" and d["text"] == text for e, _, d in events)


async def read_ws(ws, until) -> list[dict]:
    frames = []
    while not until(frames):
        frames.append(json.loads(await ws.recv()))
    return frames


def ws_has_message(text: str):
    return lambda frames: any(f["type"] == "message" and f["text"] == text for f in frames)


def message_ids(items) -> list[int]:
    """Ids of the messages in WS frames, SSE events or HTTP message dicts."""
    ids = []
    for item in items:
        if isinstance(item, tuple):  # SSE (event, id, data)
            if item[0] == "message":
                assert item[1] == str(item[2]["id"])  # the id: line matches the message
                ids.append(item[2]["id"])
        elif item.get("type", "message") == "message":
            ids.append(item["id"])
    return ids


async def wait_until(predicate, timeout: float = T, interval: float = 0.01):
    """Poll ``predicate()`` (maybe async) until it is true; bounded by ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(interval)


async def presence(http, server) -> list[str]:
    response = await http.get(server.url + "api/presence")
    assert response.status_code == 200
    return response.json()["users"]


# -- every transport to every transport -------------------------------------------------


@pytest.mark.parametrize("receiver_kind", TRANSPORTS)
@pytest.mark.parametrize("sender_kind", TRANSPORTS)
async def test_every_transport_reaches_every_other(server, make_client, sender_kind,
                                                   receiver_kind):
    receiver = await make_client(receiver_kind, server, "rita")
    sender = await make_client(sender_kind, server, "sam")
    texts = [f"{sender_kind} -> {receiver_kind} #{i}" for i in range(3)]
    for text in texts:
        await sender.send(text)
    got = await receiver.receive_many(3, timeout=T)
    assert [m.text for m in got] == texts
    assert {m.user for m in got} == {"sam"}
    assert all(isinstance(m.id, int) and isinstance(m.ts, float) for m in got)
    assert [m.id for m in got] == sorted({m.id for m in got})
    assert receiver.last_id == got[-1].id
    if sender_kind == "ws":  # a WebSocket sender gets its own messages back, with ids
        assert [m.text for m in await sender.receive_many(3, timeout=T)] == texts


async def test_all_transports_see_the_same_order(server, make_client):
    receivers = [await make_client(kind, server, f"r-{kind}") for kind in TRANSPORTS]
    senders = [await make_client(kind, server, f"s-{kind}") for kind in TRANSPORTS]

    async def send_all(sender):
        for i in range(5):
            await sender.send(f"{sender.transport}:{i}")

    async with asyncio.timeout(T):
        await asyncio.gather(*(send_all(s) for s in senders))
    orders = []
    for receiver in receivers:
        got = await receiver.receive_many(20, timeout=T)
        orders.append([(m.id, m.text) for m in got])
    assert all(order == orders[0] for order in orders)
    ids = [i for i, _ in orders[0]]
    assert ids == sorted(set(ids)) and len(ids) == 20
    for sender in senders:  # each sender's own messages keep their order
        mine = [t for _, t in orders[0] if t.startswith(sender.transport + ":")]
        assert mine == [f"{sender.transport}:{i}" for i in range(5)]


async def test_long_polls_racing_posts_lose_nothing(server, make_client):
    followers = [await make_client("longpoll", server, f"lp{i}") for i in range(4)]
    followers.append(await make_client("sse", server, "sse"))
    followers.append(await make_client("ws", server, "ws"))
    senders = [await make_client(kind, server, f"s{kind}") for kind in ("poll", "ws")]

    async def send_all(sender):
        for i in range(15):
            await sender.send(f"{sender.user}:{i}")

    async with asyncio.timeout(30):
        results = await asyncio.gather(
            *(f.receive_many(30, timeout=25) for f in followers),
            *(send_all(s) for s in senders),
        )
    expected = [(m.id, m.text) for m in results[0]]
    assert len(expected) == 30
    for got in results[:len(followers)]:
        assert [(m.id, m.text) for m in got] == expected


# -- resume after a disconnect ----------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_client_resumes_after_reconnect(server, make_client, http, kind):
    client = await make_client(kind, server, "ada")
    for i in range(3):
        await post(http, server, "bob", f"before {i}")
    got = await client.receive_many(3, timeout=T)
    assert [m.text for m in got] == [f"before {i}" for i in range(3)]
    await client.close()
    for i in range(4):
        await post(http, server, "bob", f"missed {i}")
    await client.connect()  # resumes after client.last_id
    missed = await client.receive_many(4, timeout=T)
    assert [m.text for m in missed] == [f"missed {i}" for i in range(4)]
    await post(http, server, "bob", "live")
    assert (await client.receive(timeout=T)).text == "live"
    assert client.stats.messages == 8


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_new_client_with_after_gets_exactly_the_rest(server, make_client, http, kind):
    sent = [await post(http, server, "bob", f"m{i}") for i in range(6)]
    client = await make_client(kind, server, "ada", after=sent[2]["id"])
    got = await client.receive_many(3, timeout=T)
    assert [m.id for m in got] == [m["id"] for m in sent[3:]]


async def test_ws_resume_on_the_wire_has_no_gaps_or_dupes(server, http):
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada", "after": 0}))
        await post(http, server, "bob", "one")
        await post(http, server, "bob", "two")
        async with asyncio.timeout(T):
            frames = await read_ws(ws, ws_has_message("two"))
    last = message_ids(frames)[-1]
    sent = [await post(http, server, "bob", f"missed {i}") for i in range(3)]
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada", "after": last}))
        async with asyncio.timeout(T):
            frames = await read_ws(ws, ws_has_message("missed 2"))
            live = await post(http, server, "bob", "live")
            frames += await read_ws(ws, ws_has_message("live"))
    assert message_ids(frames) == [m["id"] for m in sent] + [live["id"]]


@pytest.mark.parametrize("use_header", [False, True], ids=["after", "last-event-id"])
async def test_sse_resume_on_the_wire_has_no_gaps_or_dupes(server, http, use_header):
    first = [await post(http, server, "bob", f"m{i}") for i in range(2)]
    async with asyncio.timeout(T):
        async with http.stream("GET", server.url + "api/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = await read_sse(response, has_message("m1"))
    last = message_ids(events)[-1]
    assert last == first[-1]["id"]
    missed = [await post(http, server, "bob", f"missed {i}") for i in range(3)]
    url = server.url + "api/events" + ("" if use_header else f"?after={last}")
    headers = {"Last-Event-ID": str(last)} if use_header else {}
    async with asyncio.timeout(T):
        async with http.stream("GET", url, headers=headers) as response:
            events = await read_sse(response, has_message("missed 2"))
            live = await post(http, server, "bob", "live")
            events += await read_sse(response, has_message("live"))
    assert message_ids(events) == [m["id"] for m in missed] + [live["id"]]


async def test_sse_last_event_id_wins_over_after(server, http):
    sent = [await post(http, server, "bob", f"m{i}") for i in range(5)]
    url = server.url + f"api/events?after={sent[3]['id']}"
    async with asyncio.timeout(T):
        async with http.stream("GET", url, headers={"Last-Event-ID": str(sent[1]["id"])}) as r:
            events = await read_sse(r, has_message("m4"))
    assert message_ids(events) == [m["id"] for m in sent[2:]]


async def test_sse_stream_format(server, http):
    """The bytes themselves, written out (an independent check of wire.py, not a parser):
    JSON data on one line, every non-ASCII character escaped, so that no line end but
    "\n" (not U+2028, not U+0085) can ever appear inside an event."""
    message = await post(http, server, "b\u00f6b", "h\u00e9\u2028\x85\u2029!")
    async with asyncio.timeout(T):
        async with http.stream("GET", server.url + "api/events") as response:
            assert response.status_code == 200
            raw = b""
            async for chunk in response.aiter_bytes():
                raw += chunk
                if b"event: message" in raw and raw.endswith(b"\n\n"):
                    break
    ts = repr(message["ts"]).encode()
    assert raw == (b"retry: 1000\n\n"
                   b"id: 1\nevent: message\n"
                   b'data: {"id":1,"ts":' + ts + b',"user":"b\\u00f6b",'
                   b'"text":"h\\u00e9\\u2028\\u0085\\u2029!"}\n\n')


@pytest.mark.parametrize("kind", ["poll", "longpoll"])
async def test_http_poll_resume_on_the_wire(server, http, kind):
    sent = [await post(http, server, "bob", f"m{i}") for i in range(5)]
    wait = "&wait=5" if kind == "longpoll" else ""
    response = await http.get(server.url + f"api/messages?after={sent[1]['id']}{wait}")
    assert response.status_code == 200
    body = response.json()
    assert body["messages"] == sent[2:]
    assert body["last_id"] == sent[-1]["id"]
    assert "reset" not in body or body["reset"] is False


# -- long polling -----------------------------------------------------------------------


async def test_long_poll_answers_as_soon_as_a_message_is_posted(server, http):
    await post(http, server, "bob", "old")
    await http.post(server.url + "api/presence", json={"user": "waiter"})
    joined_at = server.hub.presence.last_seen("waiter")
    poll = asyncio.create_task(
        http.get(server.url + "api/messages?after=1&wait=25&user=waiter"))
    # The handler has the request once the poll has refreshed the waiter's presence.
    await wait_until(lambda: server.hub.presence.last_seen("waiter") != joined_at)
    assert not poll.done()
    message = await post(http, server, "bob", "new")
    async with asyncio.timeout(T):  # far less than the 25 s it would otherwise hang
        response = await poll
    assert response.status_code == 200
    assert response.json() == {"messages": [message], "last_id": message["id"]}


async def test_long_poll_returns_empty_after_wait(server, http):
    message = await post(http, server, "bob", "old")
    async with asyncio.timeout(T):
        response = await http.get(server.url + f"api/messages?after={message['id']}&wait=0.3")
    assert response.status_code == 200
    assert response.json() == {"messages": [], "last_id": message["id"]}


@pytest.mark.parametrize("limits", [Limits(max_wait=0.2)])
async def test_long_poll_wait_is_capped(server, http):
    async with asyncio.timeout(T):  # wait=1000 is capped at max_wait
        response = await http.get(server.url + "api/messages?after=0&wait=1000")
    assert response.json() == {"messages": [], "last_id": 0}


async def test_short_poll_answers_at_once(server, http):
    async with asyncio.timeout(T):
        response = await http.get(server.url + "api/messages")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {"messages": [], "last_id": 0}


@pytest.mark.parametrize("query", ["after=abc", "after=1.5", "wait=abc", "wait=nan",
                                   "after=", "wait="])
async def test_bad_poll_parameters_are_400(server, http, query):
    response = await http.get(server.url + "api/messages?" + query)
    assert response.status_code == 400
    assert "error" in response.json()


async def test_negative_wait_is_a_short_poll(server, http):
    async with asyncio.timeout(T):
        response = await http.get(server.url + "api/messages?after=0&wait=-5")
    assert response.json() == {"messages": [], "last_id": 0}


# -- reset: the cursor is past the end of the log ---------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_reset_when_cursor_is_past_the_end(server, make_client, http, kind):
    sent = [await post(http, server, "bob", f"m{i}") for i in range(2)]
    client = await make_client(kind, server, "ada", after=50)
    got = await client.receive_many(2, timeout=T)
    assert [m.id for m in got] == [m["id"] for m in sent]  # replayed from the start
    assert client.resets == 1
    await post(http, server, "bob", "live")
    assert (await client.receive(timeout=T)).text == "live"
    assert client.resets == 1


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_reset_after_an_in_memory_server_restarts(start_chat, make_client, kind):
    first = await start_chat()
    poster = await make_client("poll", first, "bob")
    for i in range(4):
        await poster.send(f"old {i}")
    client = await make_client(kind, first, "ada")
    await client.receive_many(4, timeout=T)
    assert client.last_id == 4
    await client.close()
    port = first.port
    await first.stop()
    second = await start_chat(port=port)  # a fresh MemoryLog: ids start at 1 again
    poster = await make_client("poll", second, "bob")
    await poster.send("new 0")
    await client.connect()
    got = await client.receive(timeout=T)
    assert (got.id, got.text) == (1, "new 0")
    assert client.resets == 1


async def test_reset_on_the_wire(server, http):
    sent = [await post(http, server, "bob", f"m{i}") for i in range(2)]
    for wait in ("", "&wait=5"):
        body = (await http.get(server.url + f"api/messages?after=99{wait}")).json()
        assert body == {"messages": sent, "last_id": sent[-1]["id"], "reset": True}
    async with asyncio.timeout(T):
        async with http.stream("GET", server.url + "api/events?after=99") as response:
            events = await read_sse(response, has_message("m1"))
        assert events[0][0] == "reset"
        assert message_ids(events) == [m["id"] for m in sent]
        async with http.stream("GET", server.url + "api/events",
                               headers={"Last-Event-ID": "99"}) as response:
            events = await read_sse(response, has_message("m1"))
        assert events[0][0] == "reset"
        async with ws_connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "hello", "user": "ada", "after": 99}))
            frames = await read_ws(ws, ws_has_message("m1"))
    assert frames[0] == {"type": "reset"}
    assert message_ids(frames) == [m["id"] for m in sent]


async def test_no_reset_when_cursor_is_the_last_id(server, http):
    sent = await post(http, server, "bob", "m")
    body = (await http.get(server.url + f"api/messages?after={sent['id']}")).json()
    assert body == {"messages": [], "last_id": sent["id"]}


# -- history on join --------------------------------------------------------------------


@pytest.mark.parametrize("limits", [Limits(history=5)])
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_resume_is_replayed_in_pages(server, make_client, http, kind):
    sent = [await post(http, server, "bob", f"h{i}") for i in range(12)]
    client = await make_client(kind, server, "ada", after=sent[0]["id"])  # a cursor
    got = await client.receive_many(11, timeout=T)
    assert [m.id for m in got] == [m["id"] for m in sent[1:]]
    await post(http, server, "bob", "live")
    assert (await client.receive(timeout=T)).text == "live"


async def test_http_history_is_one_page_per_request(start_chat, http):
    server = await start_chat(limits=Limits(history=5))
    sent = [await post(http, server, "bob", f"h{i}") for i in range(12)]
    body = (await http.get(server.url + f"api/messages?after={sent[0]['id']}")).json()
    assert body["messages"] == sent[1:6]
    assert body["last_id"] == sent[-1]["id"]


async def test_ws_history_then_live_without_dupes(server, http):
    sent = [await post(http, server, "bob", f"h{i}") for i in range(3)]
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada", "after": sent[0]["id"]}))
        live = [await post(http, server, "bob", f"live{i}") for i in range(3)]
        async with asyncio.timeout(T):
            frames = await read_ws(ws, ws_has_message("live2"))
    assert message_ids(frames) == [m["id"] for m in sent[1:] + live]
    for frame in frames:
        if frame["type"] == "message":
            assert set(frame) == {"type", "id", "ts", "user", "text"}


# -- presence and typing ----------------------------------------------------------------


async def test_presence_over_every_transport(server, make_client, http):
    assert await presence(http, server) == []
    ws = await make_client("ws", server, "ada")
    sse = await make_client("sse", server, "bob")
    longpoll = await make_client("longpoll", server, "carol", wait=0.05)
    poll = await make_client("poll", server, "dave")
    with pytest.raises(TimeoutError):
        await longpoll.receive(timeout=0.2)  # one poll request at least
    with pytest.raises(TimeoutError):
        await poll.receive(timeout=0.1)
    # The WebSocket user is registered once its hello is processed.
    await wait_until(lambda: _has(presence(http, server), {"ada", "bob", "carol", "dave"}))
    assert await presence(http, server) == ["ada", "bob", "carol", "dave"]
    # A WebSocket client is told too (SSE and HTTP users included).
    await wait_until(lambda: _fetch_until(ws, lambda: len(ws.presence) == 4))
    assert ws.presence == ["ada", "bob", "carol", "dave"]
    await ws.close()
    await sse.close()
    # Push users leave when they disconnect; HTTP users stay for presence_ttl.
    await wait_until(lambda: _equals(presence(http, server), ["carol", "dave"]))


async def _has(users_coro, expected: set) -> bool:
    return expected <= set(await users_coro)


async def _equals(users_coro, expected: list) -> bool:
    return await users_coro == expected


async def _fetch_until(client, done) -> bool:
    """Let ``client`` read events (not messages) until ``done()``."""
    while not done():
        await client._fetch()
    return True


@pytest.mark.parametrize("limits", [Limits(presence_ttl=0.3)])
async def test_polling_users_leave_presence_after_the_ttl(server, make_client, http):
    watcher = await make_client("ws", server, "watcher")
    response = await http.post(server.url + "api/presence", json={"user": "poller"})
    assert response.status_code == 200
    assert "poller" in await presence(http, server)
    await wait_until(lambda: _fetch_until(watcher, lambda: "poller" in watcher.presence))
    # The server's sweeper notices the silence and tells the push clients.
    await wait_until(lambda: _fetch_until(watcher, lambda: watcher.presence == ["watcher"]))
    assert await presence(http, server) == ["watcher"]


async def test_presence_query_user_is_validated(server, http):
    response = await http.get(server.url + "api/messages?user=" + "x" * 100)
    assert response.status_code == 413
    response = await http.get(server.url + "api/events?user=%01bad")
    assert response.status_code == 400
    assert await presence(http, server) == []


@pytest.mark.parametrize("via", ["http", "ws"])
async def test_typing_reaches_ws_and_sse(server, make_client, http, via):
    ws = await make_client("ws", server, "ada")
    sse = await make_client("sse", server, "bob")
    if via == "http":
        response = await http.post(server.url + "api/typing", json={"user": "carol"})
        assert response.status_code == 204
    else:
        typist = await make_client("ws", server, "carol")
        await typist.send_typing()
    # Typing is not a message: post one after it, which arrives after the notice.
    await post(http, server, "dave", "after typing")
    for client in (ws, sse):
        got = await client.receive(timeout=T)
        assert got.text == "after typing"
        assert list(client.typing) == ["carol"]
    assert (await http.get(server.url + "api/messages")).json()["last_id"] == 1


async def test_http_client_send_typing(server, make_client, http):
    ws = await make_client("ws", server, "ada")
    poster = await make_client("poll", server, "carol")
    await poster.send_typing()
    await poster.send("hi")
    assert (await ws.receive(timeout=T)).text == "hi"
    assert list(ws.typing) == ["carol"]


# -- the page and its assets ------------------------------------------------------------


async def test_index_serves_the_page(server, http):
    response = await http.get(server.url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.content == (ROOT / "static" / "index.html").read_bytes()


async def test_static_assets_are_served(server, http):
    for path in sorted(p for p in (ROOT / "static").iterdir() if p.is_file()):
        response = await http.get(server.url + "static/" + path.name)
        assert response.status_code == 200, path.name
        assert response.content == path.read_bytes()


async def test_unknown_paths_are_404(server, http):
    for path in ("nope", "static/nope.js", "api/nope"):
        response = await http.get(server.url + path)
        assert response.status_code == 404, path


TRAVERSALS = [
    "/static/../chatlib/app.py",
    "/static/../../main/chatlib/app.py",
    "/static/%2e%2e/chatlib/app.py",
    "/static/%2E%2E/chatlib/app.py",
    "/static/.%2e/chatlib/app.py",
    "/static/%2e%2e%2fchatlib%2fapp.py",
    "/static/..%2fchatlib%2fapp.py",
    "/static/..%5cchatlib%5capp.py",
    "/static/..\\chatlib\\app.py",
    "/static/%252e%252e/chatlib/app.py",
    "/static/....//chatlib/app.py",
    "/static/./../chatlib/app.py",
    "/static//../chatlib/app.py",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/../pyproject.toml",
    "/static/%2e%2e/README.md",
    "/static/%00../chatlib/app.py",
    "/static" + str(ROOT / "chatlib" / "app.py"),
    "/static/" + str(ROOT / "chatlib" / "app.py"),
    "/static/%2f" + str(ROOT / "chatlib" / "app.py").lstrip("/").replace("/", "%2f"),
]


async def test_static_has_no_path_traversal(server, raw_http, subtests):
    for path in TRAVERSALS:
        with subtests.test(path=path):
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            status, _, body = await raw_http(server.port, request.encode("latin-1"))
            assert status in (400, 404), (status, body[:200])
            assert b"create_app" not in body and b"[project]" not in body
            assert b"root:" not in body and b"chat protocol" not in body
            # ... and the server still answers afterwards.
            status, _, _ = await raw_http(server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                      b"Connection: close\r\n\r\n")
            assert status == 200


# -- more of the stream formats, and a server on SQLite ---------------------------------


@pytest.mark.parametrize("limits", [Limits(heartbeat=0.1)])
async def test_sse_heartbeat_and_presence_events(server, http, make_client):
    async with asyncio.timeout(T):
        await http.post(server.url + "api/presence", json={"user": "sam"})  # joining: POST
        async with http.stream("GET", server.url + "api/events?user=sam") as response:
            reader = sse_reader(response)
            while b"\n\n: ping\n\n" not in reader.raw:  # an idle stream gets a comment
                assert await reader.read()
            await make_client("ws", server, "ada")
            events = await read_sse(response, lambda evs: any(
                e == "presence" and "ada" in d["users"] for e, _, d in evs))
    assert ("presence", "", {"users": ["ada", "sam"], "count": 2}) in events


@pytest.mark.parametrize("query", ["after=abc", "after=1.5", "user=", "user=%00"])
async def test_bad_event_stream_parameters_are_400(server, http, query):
    response = await http.get(server.url + "api/events?" + query)
    assert response.status_code == 400
    assert "error" in response.json()


async def test_websocket_that_drops_leaves_presence(server, http, make_client):
    watcher = await make_client("sse", server, "watcher")
    ws = await ws_connect(server.ws_url)
    await ws.send(json.dumps({"type": "hello", "user": "dropper"}))
    await wait_until(lambda: _has(presence(http, server), {"dropper"}))
    ws.transport.abort()  # no closing handshake: the TCP connection just goes away
    await wait_until(lambda: _equals(presence(http, server), ["watcher"]))
    await post(http, server, "bob", "after the drop")
    assert (await watcher.receive(timeout=T)).text == "after the drop"


async def test_every_transport_on_a_sqlite_log(start_chat, make_client, tmp_path):
    from chatlib import SQLiteLog

    log = SQLiteLog(tmp_path / "chat.db")
    try:
        server = await start_chat(log=log)
        receivers = [await make_client(kind, server, f"r{kind}") for kind in TRANSPORTS]
        senders = [await make_client(kind, server, f"s{kind}") for kind in TRANSPORTS]
        for sender in senders:
            await sender.send(f"via {sender.transport}")
        for receiver in receivers:
            got = await receiver.receive_many(4, timeout=T)
            assert [m.text for m in got] == [f"via {kind}" for kind in TRANSPORTS]
            assert [m.id for m in got] == [1, 2, 3, 4]
        await server.stop()
    finally:
        await log.close()


async def test_fan_out_to_many_clients(server, make_client, http):
    clients = [await make_client("ws", server, f"w{i}") for i in range(30)]
    clients += [await make_client("sse", server, f"s{i}") for i in range(10)]
    sent = [await post(http, server, "bob", f"m{i}") for i in range(20)]
    async with asyncio.timeout(20):
        results = await asyncio.gather(*(c.receive_many(20, timeout=20) for c in clients))
    for got in results:
        assert [m.id for m in got] == [m["id"] for m in sent]
    users = await presence(http, server)
    assert len(users) == 40


async def test_unicode_nicknames(server, make_client, http):
    ws = await make_client("ws", server, "Ädå 😀")
    message = await post(http, server, "Jürgen", "hi")
    assert message["user"] == "Jürgen"
    assert (await ws.receive(timeout=T)).user == "Jürgen"
    assert "Ädå 😀" in await presence(http, server)
