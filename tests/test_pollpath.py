"""The long poll's own HTTP path (chatlib.pollpath): which requests it takes, and that what
it answers, and how the connection goes on, is what the general path (h11 and the app)
would do. Raw sockets where the exact bytes matter; every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from chatlib import Limits
from chatlib.app import create_app
from chatlib.auth import page_path
from chatlib.hub import Hub
from chatlib.pollpath import PollPath
from chatlib.store import MemoryLog

T = 10.0  # hang guard for one exchange
HEAD = "GET /api/messages?after=0 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"


@pytest.fixture
def path() -> PollPath:
    hub = Hub(MemoryLog(), Limits())
    return PollPath(create_app(hub))


def take(path: PollPath, data: str) -> dict | None:
    return path.take(data.encode("latin-1"), ("127.0.0.1", 8000), ("127.0.0.1", 5000), "http")


@pytest.mark.parametrize("extra", [
    "", "Connection: keep-alive\r\n", "Content-Length: 0\r\n", "Accept:  */* \r\n",
    "Origin: http://127.0.0.1:8000\r\n", "X-Empty:\r\n", "User-Agent: a\tb c\xe9\r\n"])
def test_a_plain_long_poll_is_taken(path, extra):
    scope = take(path, HEAD + extra + "\r\n")
    assert scope is not None
    assert (scope["method"], scope["path"], scope["query_string"]) == (
        "GET", "/api/messages", b"after=0")


@pytest.mark.parametrize("data", [
    HEAD,  # the head is not complete
    HEAD + "\r\n" + HEAD + "\r\n",  # two requests in one read
    HEAD + "\r\nx",  # a body after a GET
    HEAD.replace("GET", "POST", 1) + "Content-Length: 0\r\n\r\n",
    HEAD.replace("GET", "HEAD", 1) + "\r\n",
    HEAD.replace("/api/messages", "/api/presence") + "\r\n",
    HEAD.replace("/api/messages", "/api/messagesx") + "\r\n",
    HEAD.replace("/api/messages", "/api/%6dessages") + "\r\n",
    HEAD.replace("HTTP/1.1", "HTTP/1.0") + "\r\n",
    HEAD.replace("?after=0", "?after=0 x") + "\r\n",
    HEAD + "Connection: close\r\n\r\n",
    HEAD + "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    HEAD + "Content-Length: 5\r\n\r\n",
    HEAD + "Content-Length: 0\r\nContent-Length: 0\r\n\r\n",
    HEAD + "Transfer-Encoding: chunked\r\n\r\n",
    HEAD + "Expect: 100-continue\r\n\r\n",
    "GET /api/messages HTTP/1.1\r\n\r\n",  # no Host
    HEAD + "Host: 127.0.0.1\r\n\r\n",  # two
    HEAD + "Bad Name: x\r\n\r\n",
    HEAD + "X-A: x\r\n continued\r\n\r\n",  # obsolete line folding
    HEAD + "X-A: a\x00b\r\n\r\n",
    HEAD + "X-A: a\rb\r\n\r\n",
    HEAD + "NoColon\r\n\r\n",
    HEAD.replace("127.0.0.1:8000", "evil.example:8000") + "\r\n",  # the Guard refuses it
    HEAD + "X-Long: " + "a" * 20000 + "\r\n\r\n",
])
def test_anything_else_goes_the_general_way(path, data):
    assert take(path, data) is None


def test_token_mode_takes_only_what_carries_the_token():
    hub = Hub(MemoryLog(), Limits())
    path = PollPath(create_app(hub, token="s3cret"))
    assert take(path, HEAD + "\r\n") is None  # 401 is the general path's
    assert take(path, HEAD + "Authorization: Bearer nope\r\n\r\n") is None
    assert take(path, HEAD + "Authorization: Bearer s3cret\r\n\r\n") is not None
    page = HEAD.replace("/api/messages", page_path("s3cret") + "/api/messages")
    assert take(path, page + "Cookie: chatlib-token-8000=s3cret\r\n\r\n") is not None
    assert take(path, page + "Cookie: chatlib-token-8001=s3cret\r\n\r\n") is None


def test_only_chatlibs_app_gets_a_poll_path():
    """This path runs the checks of the app's front door and its route's poll without
    them: for any other app (another ASGI app, another front door, another endpoint for
    the route) every request goes the general way."""
    from chatlib.app import ChatApp
    from chatlib.auth import TokenGate
    from chatlib.guard import Guard
    from chatlib.polling import Messages

    hub = Hub(MemoryLog(), Limits())
    assert PollPath.of(create_app(hub)) is not None
    assert PollPath.of(create_app(hub, token="s3cret")) is not None

    async def bare(scope, receive, send):
        pass

    def app(messages, *front_door):
        return ChatApp([], messages=messages, websockets={}, front_door=front_door,
                       exception_handlers={})

    guard = (Guard, {"limits": hub.limits})
    assert PollPath.of(app(Messages(), guard)) is not None
    assert PollPath.of(bare) is None
    assert PollPath.of(app(Messages(), guard, guard)) is None
    assert PollPath.of(app(Messages(), (TokenGate, {"token": "s3cret"}))) is None
    assert PollPath.of(app(bare, guard)) is None


@pytest.mark.parametrize("change", [
    lambda app: app.add_middleware(object),
    lambda app: app.add_exception_handler(ValueError, lambda request, exc: None),
    lambda app: app.add_route("/x", lambda request: None),
    lambda app: app.add_websocket_route("/x", lambda websocket: None),
    lambda app: app.mount("/x", app),
    lambda app: app.host("example.org", app),
])
def test_the_app_is_not_changed_after_build(change):
    """A change through Starlette's API would reach the general way and not this path
    (nor the WebSocket stack): it is refused, with how to do it instead."""
    app = create_app(Hub(MemoryLog(), Limits()))
    with pytest.raises(TypeError, match="wrap it"):
        change(app)
    assert PollPath.of(app) is not None


# -- on a live server -----------------------------------------------------------------------


class Connection:
    """One raw keep-alive HTTP/1.1 connection: write requests, read responses in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, data: str | bytes) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def response(self) -> tuple[int | None, dict[str, str], bytes]:
        """The next response; ``(None, {}, b"")`` if the server closed instead."""
        async with asyncio.timeout(T):
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return None, {}, b""
            lines = head.decode("latin-1").split("\r\n")
            headers = dict((name.lower(), value.strip()) for name, _, value in
                           (line.partition(":") for line in lines[1:] if line))
            body = await self.reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split()[1]), headers, body

    async def closed(self) -> bool:
        async with asyncio.timeout(T):
            return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def connections():
    opened: list[Connection] = []

    async def open_one(port: int) -> Connection:
        opened.append(await Connection.open(port))
        return opened[-1]

    try:
        yield open_one
    finally:
        for connection in opened:
            connection.close()


@pytest.fixture
def taken(monkeypatch) -> list[bytes]:
    """The query strings of the requests the poll path took, in order."""
    seen = []
    original = PollPath.take

    def spy(self, data, *args):
        scope = original(self, data, *args)
        if scope is not None:
            seen.append(scope["query_string"])
        return scope

    monkeypatch.setattr(PollPath, "take", spy)
    return seen


def poll(port: int, query: str, *extra: str) -> str:
    return (f"GET /api/messages?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            + "".join(line + "\r\n" for line in extra) + "\r\n")


def post(port: int, text: str) -> str:
    body = json.dumps({"user": "ann", "text": text})
    return (f"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}")


async def until(condition, what: str) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    async with asyncio.timeout(T):
        while not condition():  # bounded by the timeout
            await asyncio.sleep(0.01)


async def parked(server, count: int) -> None:
    await until(lambda: server.stats()["connections"]["long_poll"] == count,
                f"{count} long polls parked")


async def test_the_same_answers_as_the_general_path(start_chat, connections, taken):
    """Each answer (a page, an empty poll, a bad cursor's 400, a room's answer) is the
    general path's, header for header (a server behind a proxy runs only that path)."""
    fast = await start_chat()
    general = await start_chat(forwarded_allow_ips="127.0.0.2")
    queries = ["after=0", "after=1", "after=x", "after=0&room=den", "after=0&room=%40"]
    answers = {}
    for server in (fast, general):
        connection = await connections(server.port)
        connection.send(post(server.port, "hi"))
        assert (await connection.response())[0] == 201
        for query in queries:
            connection.send(poll(server.port, query))
            status, headers, body = await connection.response()
            headers.pop("date")
            assert int(headers.pop("content-length")) == len(body)  # "ts" varies in length
            data = json.loads(body)
            for message in data.get("messages", []):
                message.pop("ts")  # the two servers stored "hi" at different times
            answers.setdefault(query, []).append((status, headers, data))
    for query in queries:
        assert answers[query][0] == answers[query][1], query
    assert taken == [query.encode() for query in queries]
    assert [answers[query][0][0] for query in queries] == [200, 200, 400, 200, 400]


async def test_keep_alive_and_pipelining(server, connections, taken):
    """A request pipelined behind a parked long poll waits for its answer, then is read;
    the connection then serves the general path (a POST) and the poll path again."""
    port = server.port
    poller = await connections(port)
    poller.send(poll(port, "after=0&wait=5"))
    await parked(server, 1)
    poller.send(poll(port, "after=0") + post(port, "piped"))  # two in one read: h11's
    other = await connections(port)
    other.send(post(port, "hello"))
    assert (await other.response())[0] == 201
    first = await poller.response()
    second = await poller.response()
    third = await poller.response()
    assert first[0] == second[0] == 200
    assert [m["text"] for m in json.loads(first[2])["messages"]] == ["hello"]
    assert [m["text"] for m in json.loads(second[2])["messages"]] == ["hello"]
    assert third[0] == 201 and json.loads(third[2])["text"] == "piped"
    poller.send(poll(port, "after=2"))
    status, _, body = await poller.response()
    assert status == 200 and json.loads(body)["last_id"] == 2
    assert taken == [b"after=0&wait=5", b"after=2"]


async def test_a_client_that_does_not_read_gets_one_answer_buffered(server, connections,
                                                                    taken):
    """Write backpressure, as on the general path (issue 18): while an answer waits in the
    server's buffer for a client that reads nothing, its next requests are not read."""
    for i in range(server.limits.history):
        await server.hub.post("ann", f"{i} " + "y" * 1000)
    port = server.port
    connection = await connections(port)
    (protocol,) = server._server.server_state.connections
    sock = connection.writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection.reader._transport.pause_reading()  # and the kernel's buffer fills
    for sent in range(1, 41):  # one head per read, so that each is the poll path's
        connection.send(poll(port, "after=0"))
        await until(lambda: len(taken) == sent and (  # noqa: B023 - called in this iteration
            protocol.polling is None or protocol.flow.write_paused), "the head answered")
        if protocol.polling is not None:  # its answer waits for the client to take some
            break
    assert protocol.polling is not None, "every answer was buffered"
    connection.send(poll(port, "after=0"))
    await until(lambda: protocol._piped, "the next head kept unread")
    assert len(taken) == sent
    assert protocol.raw_transport.get_write_buffer_size() < 2 * len(await ok_page(server))


async def ok_page(server) -> bytes:
    """A poll's answer, as the poll path writes it."""
    connection = await Connection.open(server.port)
    try:
        connection.send(poll(server.port, "after=0"))
        status, _, body = await connection.response()
        assert status == 200
        return body
    finally:
        connection.close()


async def test_a_client_that_hangs_up_frees_its_poll(server, connections, taken):
    connection = await connections(server.port)
    connection.send(poll(server.port, "after=0&wait=20"))
    await parked(server, 1)
    assert taken == [b"after=0&wait=20"]
    connection.close()
    await parked(server, 0)


@pytest.mark.parametrize("limits", [Limits(header_timeout=0.5)])
async def test_the_header_timeout_runs_after_an_answer(server, connections, taken):
    connection = await connections(server.port)
    connection.send(poll(server.port, "after=0"))
    assert (await connection.response())[0] == 200
    connection.send("GET /api/mess")  # and nothing more
    status, _, body = await connection.response()
    assert status == 408 and b"headers not complete" in body
    assert await connection.closed()
    assert taken == [b"after=0"]


async def test_bad_bytes_after_an_answer_get_400_for_that_client_only(server, connections,
                                                                     taken):
    bad = await connections(server.port)
    good = await connections(server.port)
    bad.send(poll(server.port, "after=0"))
    assert (await bad.response())[0] == 200
    good.send(poll(server.port, "after=0&wait=5"))
    await parked(server, 1)
    bad.send("GET /api/messages?after=0 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert (await bad.response())[0] == 400
    assert await bad.closed()
    other = await connections(server.port)
    other.send(post(server.port, "still here"))
    assert (await other.response())[0] == 201
    status, _, body = await good.response()
    assert status == 200 and json.loads(body)["messages"][0]["text"] == "still here"
    assert taken == [b"after=0", b"after=0&wait=5"]


async def test_a_stopping_server_answers_a_parked_poll_then_closes(start_chat, connections,
                                                                   taken):
    server = await start_chat()
    connection = await connections(server.port)
    connection.send(poll(server.port, "after=0&wait=20"))
    await parked(server, 1)
    stopping = asyncio.ensure_future(server.stop())
    status, _, body = await connection.response()
    assert status == 200 and json.loads(body)["messages"] == []
    assert await connection.closed()
    await asyncio.wait_for(stopping, T)
    assert taken == [b"after=0&wait=20"]


async def test_a_poll_cancelled_at_shutdown_closes_its_connection(start_chat, connections,
                                                                  taken, monkeypatch):
    """uvicorn cancels what still runs when its graceful shutdown times out: a poll that
    the hub's close did not wake (here: one that never ends) then closes its connection."""
    async def forever(state, scope):
        await asyncio.Event().wait()

    monkeypatch.setattr("chatlib.pollpath.poll", forever)
    server = await start_chat(shutdown_timeout=0.5)
    connection = await connections(server.port)
    connection.send(poll(server.port, "after=0&wait=20"))
    await until(lambda: taken, "the poll taken")
    await asyncio.wait_for(server.stop(), T)
    assert await connection.closed()


@pytest.mark.parametrize("limits", [Limits(header_timeout=0.5)])
async def test_a_parked_poll_outlives_the_header_timeout(server, connections, taken):
    """The head is complete: no header timer runs while its poll waits."""
    connection = await connections(server.port)
    connection.send(poll(server.port, "after=0&wait=1.5"))
    status, _, body = await connection.response()
    assert status == 200 and json.loads(body)["messages"] == []
    assert taken == [b"after=0&wait=1.5"]


async def test_bytes_behind_a_parked_poll_wait_unread(server, connections, taken):
    connection = await connections(server.port)
    connection.send(poll(server.port, "after=0&wait=5"))
    await parked(server, 1)
    (protocol,) = server._server.server_state.connections
    connection.send(poll(server.port, "after=0"))
    await until(lambda: protocol._piped, "the next head kept")
    assert protocol.flow.read_paused
    await server.hub.post("ann", "wake")
    for _ in range(2):
        status, _, body = await connection.response()
        assert status == 200 and json.loads(body)["messages"][0]["text"] == "wake"
    assert taken == [b"after=0&wait=5", b"after=0"]


async def test_a_poll_running_when_the_server_stops_is_answered_then_closed(
        start_chat, connections, taken, monkeypatch):
    """The protocol's shutdown, while a poll runs (one the hub's close did not answer
    yet): the poll's answer is written, then the connection closed."""
    release = asyncio.Event()

    async def held(state, scope):
        await release.wait()
        return b'{"messages":[]}'

    monkeypatch.setattr("chatlib.pollpath.poll", held)
    server = await start_chat()
    connection = await connections(server.port)
    connection.send(poll(server.port, "after=0&wait=20"))
    await until(lambda: taken, "the poll taken")
    (protocol,) = server._server.server_state.connections
    stopping = asyncio.ensure_future(server.stop())
    try:
        await until(lambda: protocol._close_after_poll, "the server stopping")
        release.set()
        status, _, body = await connection.response()
        assert status == 200 and body == b'{"messages":[]}'
        assert await connection.closed()
    finally:
        release.set()
        await asyncio.wait_for(stopping, T)


async def test_an_error_handler_gets_the_request(start_chat, connections, taken,
                                                monkeypatch):
    """The app's exception handlers are called as the app calls them: with the request."""
    import chatlib.app

    chat_error = chatlib.app.chat_error

    async def with_path(request, exc):
        refusal = await chat_error(request, exc)
        refusal.headers["x-path"] = request.url.path
        return refusal

    monkeypatch.setattr(chatlib.app, "chat_error", with_path)  # before create_app reads it
    server = await start_chat()
    connection = await connections(server.port)
    connection.send(poll(server.port, "after=x"))
    status, headers, _ = await connection.response()
    assert (status, headers["x-path"]) == (400, "/api/messages")
    assert taken == [b"after=x"]


FRONT_DOOR_CASES = {  # request lines beyond the request line -> the expected status
    None: [
        (["Host: evil.example:{port}"], 403),  # DNS rebinding: chatlib.guard
        (["Host: 127.0.0.1:{port}", "Origin: http://evil.example"], 200),  # a GET's Origin
        (["Host: 127.0.0.1:{port}"], 200),
    ],
    "s3cret": [
        (["Host: 127.0.0.1:{port}"], 401),  # no token: chatlib.auth
        (["Host: 127.0.0.1:{port}", "Authorization: Bearer nope"], 401),
        (["Host: 127.0.0.1:{port}", "Cookie: chatlib-token-{port}=nope"], 401),
        (["Host: 127.0.0.1:{port}", "Cookie: chatlib-token-1=s3cret"], 401),  # another port's
        (["Host: 127.0.0.1:{port}", "Authorization: Bearer s3cret",
          "Authorization: Bearer nope"], 401),  # the last of a repeated header counts
        (["Host: evil.example:{port}", "Authorization: Bearer s3cret"], 403),
        (["Host: 127.0.0.1:{port}", "Authorization: Bearer nope",
          "Authorization: Bearer s3cret"], 200),
        (["Host: 127.0.0.1:{port}", "Cookie: a=b; chatlib-token-{port}=s3cret"], 200),
        (["Host: 127.0.0.1:{port}", "Origin: http://evil.example",
          "Authorization: Bearer s3cret"], 200),
    ],
}


@pytest.mark.parametrize("token", FRONT_DOOR_CASES)
async def test_the_front_doors_answers_are_the_same_on_both_paths(start_chat, connections,
                                                                   taken, token):
    """The poll path runs the checks of the app's middleware (Guard.verdict,
    TokenGate.verdict) and takes only what they let in: every request the front door
    refuses (bad Host, missing or bad token; a GET's Origin is not checked) gets the
    general path's answer, header for header, on a server with the poll path and one
    without, and what it lets in is the poll path's. A change to either path's check alone
    makes the answers, or what the poll path took, differ."""
    fast = await start_chat(token=token)
    general = await start_chat(token=token, forwarded_allow_ips="127.0.0.2")
    cases = FRONT_DOOR_CASES[token]
    answers = []
    for server in (fast, general):
        for case, (lines, _) in enumerate(cases):
            connection = await connections(server.port)
            connection.send(f"GET /api/messages?after=0&case={case} HTTP/1.1\r\n"
                            + "".join(line.format(port=server.port) + "\r\n" for line in lines)
                            + "\r\n")
            status, headers, body = await connection.response()
            headers.pop("date")
            assert int(headers.pop("content-length")) == len(body)
            answers.append((status, headers, body.replace(b"%d" % server.port, b"PORT")))
    assert answers[:len(cases)] == answers[len(cases):]
    assert [status for status, _, _ in answers[:len(cases)]] == [status for _, status in cases]
    assert taken == [f"after=0&case={case}".encode()
                     for case, (_, status) in enumerate(cases) if status == 200]
