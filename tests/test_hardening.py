"""Issue 6, the server core's defects, each over real sockets: line breaks in every client
(1), clients that never read (3), presence floods (6), rate-limit bypass (7), nicknames
that hide what they say (8), input that used to cause a 500 (9), a failing writer (13)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from chatlib import Limits
from chatlib.limits import RateLimits
from chatlib.outbox import Outbox

pytestmark = pytest.mark.timeout(90)

T = 10  # seconds: hang guard for one wait; never reached when things work
TRANSPORTS = ("poll", "longpoll", "sse", "ws")
# Every character str.splitlines() ends a line at (SSE: only CR, LF, CRLF do).
LINE_BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
               "\u2028", "\u2029"]


async def post(http, server, user: str, text: str) -> httpx.Response:
    return await http.post(server.url + "api/messages", json={"user": user, "text": text})


async def eventually(predicate, timeout: float = T, interval: float = 0.02):
    async with asyncio.timeout(timeout):
        while not predicate():  # bounded by the timeout
            await asyncio.sleep(interval)


# -- 1: line breaks ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_every_line_break_reaches_every_client_intact(server, make_client, http, kind):
    client = await make_client(kind, server, "reader")
    texts = [f"a{c}b" for c in LINE_BREAKS] + ["and the next message too"]
    for text in texts:
        assert (await post(http, server, "ada", text)).status_code == 201
    got = await client.receive_many(len(texts), timeout=T)
    assert [m.text for m in got] == texts
    assert client.resets == 0


@pytest.mark.parametrize("char", LINE_BREAKS)
async def test_a_nickname_with_a_line_break_is_refused(server, http, char):
    # ... so that no typing notice or presence list can carry one (the hub escapes them
    # anyway: test_wire.py); stripped ends would just be trimmed, so put it inside.
    response = await http.post(server.url + "api/typing", json={"user": f"a{char}b"})
    assert response.status_code == 400
    assert "character" in response.json()["error"]


async def test_typing_notices_reach_sse_and_ws_clients(server, make_client):
    sse = await make_client("sse", server, "s\u00e9")
    ws = await make_client("ws", server, "w\u00e9")
    await ws.send_typing()
    for _ in range(50):  # events until the typing notice (presence may come first)
        if "w\u00e9" in sse.typing:
            break
        with pytest.raises(TimeoutError):
            await sse.receive(timeout=0.1)
    assert list(sse.typing) == ["w\u00e9"]


# -- 3: clients that never read ---------------------------------------------------------

STUCK = Limits(max_queue=8, max_text=70_000, max_body=200_000, rate=10_000, burst=10_000,
               stuck_timeout=0.5)
# The kernel may hold megabytes for a client whose window is shut, long before its outbox
# (here: 10**6 frames) overflows: no progress for stuck_timeout is enough.
STUCK_NO_OVERFLOW = Limits(max_queue=10**6, max_text=70_000, max_body=200_000, rate=10_000,
                           burst=10_000, stuck_timeout=0.5)
SLOW_BUT_READING = Limits(max_queue=8, max_text=70_000, max_body=200_000, rate=10_000,
                          burst=10_000, stuck_timeout=8)
BIG = 60_000


async def stuck_socket(port: int, request: bytes, then: bytes = b"") -> socket.socket:
    """A connection with a tiny receive window that sends ``request``, reads the response
    head, sends ``then`` and never reads again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    head = b""
    async with asyncio.timeout(T):
        while b"\r\n\r\n" not in head:  # bounded by the timeout
            head += await loop.sock_recv(sock, 1)  # byte by byte: nothing past the head
    assert head.split(b" ")[1] in (b"101", b"200"), head
    await loop.sock_sendall(sock, then)
    return sock


def ws_handshake(user: str) -> tuple[bytes, bytes]:
    """The opening handshake and a masked hello frame (sent once the 101 is in)."""
    key = base64.b64encode(os.urandom(16)).decode()
    hello = json.dumps({"type": "hello", "user": user}).encode()
    mask = os.urandom(4)
    frame = bytes([0x81, 0x80 | len(hello)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(hello))
    return (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode(), frame


async def read_until_gone(sock: socket.socket) -> BaseException | None:
    """Read everything; how the connection ended (None: a clean end of stream)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(T):
        for _ in range(1_000_000):  # chunks; bounded by the timeout too
            try:
                if not await loop.sock_recv(sock, 65536):
                    return None
            except OSError as exc:
                return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize("limits", [STUCK, STUCK_NO_OVERFLOW], ids=["overflow", "no-overflow"])
@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_a_client_that_never_reads_is_reset_after_stuck_timeout(server, make_client,
                                                                      http, kind):
    fast = await make_client("longpoll", server, "fast")  # a pull client: no outbox
    request = (ws_handshake("stuck") if kind == "ws" else
               (b"GET /api/events?user=stuck HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b""))
    sock = await stuck_socket(server.port, *request)
    try:
        await eventually(lambda: len(server.hub.subscribers) == 1)
        [stuck] = server.hub.subscribers
        for i in range(1000):  # ends once the server gave up on it
            assert (await post(http, server, "poster", f"{i}:" + "x" * BIG)).status_code == 201
            assert (await fast.receive(timeout=T)).text.startswith(f"{i}:")
            if stuck.closed:
                break
            if i > 100:  # enough to fill any kernel buffer: now wait for the verdict
                await eventually(lambda: stuck.closed)
        assert stuck.close_code == 1013
        # Gone from the hub, and its TCP connection reset: nothing is kept for it.
        await eventually(lambda: not server.hub.subscribers)
        assert isinstance(await read_until_gone(sock), ConnectionResetError)
    finally:
        sock.close()
    await fast.send("still here")
    assert (await fast.receive(timeout=T)).text == "still here"


@pytest.mark.parametrize("limits", [SLOW_BUT_READING])
async def test_a_slow_client_that_reads_in_time_gets_1013_not_a_reset(server, http):
    async with ws_connect(server.ws_url, max_queue=1, compression=None, max_size=None) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "slow"}))
        await eventually(lambda: len(server.hub.subscribers) == 1)
        [outbox] = server.hub.subscribers
        ws.transport.pause_reading()
        for i in range(300):
            assert (await post(http, server, "poster", f"{i}:" + "x" * BIG)).status_code == 201
            if outbox.closed:
                break
        ws.transport.resume_reading()
        async with asyncio.timeout(T):
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()
    assert ws.close_code == 1013


@pytest.mark.parametrize("limits", [SLOW_BUT_READING])
async def test_live_frames_stay_in_order_through_backpressure(server, http):
    """Live frames are written directly while a connection can take them, and queued while
    it cannot (issue 11): a client that stops reading must not get a frame out of order,
    twice or after a gap when it reads again, and must not hold up a client that reads."""
    async def messages(ws, want: int | None = None) -> list[str]:
        texts = []
        async with asyncio.timeout(T):
            while want is None or len(texts) < want:
                try:
                    frame = json.loads(await ws.recv())
                except ConnectionClosed:
                    break
                if frame["type"] == "message":
                    texts.append(frame["text"])
        return texts

    async with ws_connect(server.ws_url, max_queue=1, compression=None, max_size=None) as slow, \
            ws_connect(server.ws_url, compression=None, max_size=None) as fast:
        for ws, user in ((slow, "slow"), (fast, "fast")):
            await ws.send(json.dumps({"type": "hello", "user": user}))
        await eventually(lambda: len(server.hub.subscribers) == 2)
        outbox = next(o for o in server.hub.subscribers if o.user == "slow")
        assert (await post(http, server, "poster", "first")).status_code == 201
        assert await messages(slow, 1) == await messages(fast, 1) == ["first"]
        slow.transport.pause_reading()
        sent = []
        for i in range(300):  # until the slow client's queue overflows
            text = f"{i}:" + "x" * BIG
            assert (await post(http, server, "poster", text)).status_code == 201
            sent.append(text)
            assert await messages(fast, 1) == [text]  # not held up by the slow one
            if outbox.closed:
                break
        assert outbox.closed and outbox.close_code == 1013
        slow.transport.resume_reading()
        got = await messages(slow)
        assert got == sent[:len(got)], "out of order, repeated or with a gap"
        assert len(got) > 0
    assert slow.close_code == 1013


# -- 6: presence --------------------------------------------------------------------------


async def join(http, server, user: str) -> httpx.Response:
    """Join the presence list as an HTTP client (POST-only: test_presence_join.py)."""
    return await http.post(server.url + "api/presence", json={"user": user})


@pytest.mark.parametrize("limits", [Limits(presence_names=5, polled_per_address=20,
                                           new_names_rate=1e6, new_names_burst=10**6,
                                           presence_interval=0)])
async def test_presence_is_bounded_and_polling_names_per_address_too(server, make_client,
                                                                       http):
    watcher = await make_client("ws", server, "watch")
    statuses = [(await join(http, server, f"u{i:02d}")).status_code for i in range(25)]
    assert statuses == [200] * 20 + [429] * 5  # "watch" is a WebSocket: not counted
    refused = await join(http, server, "u24")
    assert "too many nicknames" in refused.json()["error"]
    assert (await join(http, server, "u00")).status_code == 200
    body = (await http.get(server.url + "api/presence")).json()
    assert body == {"users": ["u00", "u01", "u02", "u03", "u04"], "count": 21}
    for _ in range(100):  # frames until the presence list says 20
        if watcher.presence_count == 21:
            break
        with pytest.raises(TimeoutError):
            await watcher.receive(timeout=0.05)
    assert watcher.presence == ["u00", "u01", "u02", "u03", "u04"]


@pytest.mark.parametrize("limits", [Limits(new_names_rate=0.001, new_names_burst=3)])
async def test_new_polling_names_are_rate_limited_per_address(server, http):
    statuses = [(await join(http, server, f"n{i}")).status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert (await join(http, server, "n0")).status_code == 200
    assert (await http.get(server.url + "api/messages")).status_code == 200  # no name


# -- 7: rate limits -----------------------------------------------------------------------

ADDRESS = Limits(rate=0.001, burst=5, address_rate=0.001, address_burst=8)


@pytest.mark.parametrize("limits", [ADDRESS])
async def test_many_connections_share_one_address_budget(server):
    accepted = refused = 0
    for i in range(4):
        async with ws_connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "hello", "user": f"c{i}"}))
            for j in range(5):
                await ws.send(json.dumps({"type": "message", "text": f"{i}:{j}"}))
            outcomes = 0
            async with asyncio.timeout(T):
                while outcomes < 5:  # each learns the fate of its 5: echo or error
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "message" and frame["user"] == f"c{i}":
                        accepted, outcomes = accepted + 1, outcomes + 1
                    elif frame["type"] == "error":
                        assert "too many" in frame["error"]
                        refused, outcomes = refused + 1, outcomes + 1
    assert (accepted, refused) == (8, 12)  # the address's burst, not 4 x 5


@pytest.mark.parametrize("limits", [ADDRESS])
async def test_rotating_nicknames_share_one_address_budget(server, http):
    statuses = [(await post(http, server, f"n{i}", "hi")).status_code for i in range(12)]
    assert statuses == [201] * 8 + [429] * 4


def test_a_flood_of_new_keys_does_not_reset_a_throttled_client():
    rates = RateLimits(rate=0.001, burst=1, max_keys=100)
    assert rates.allow("throttled")
    for i in range(10_001):
        rates.allow(("new", i))
        if i % 10 == 0:
            assert not rates.allow("throttled"), i
    assert len(rates) == 100


# -- 8: nicknames -------------------------------------------------------------------------

BAD_NAMES = {
    "zero width space": "ali\u200bce",
    "zero width joiner": "ali\u200dce",
    "bidi override": "\u202eecila",
    "bidi isolate": "\u2066alice\u2069",
    "tag characters": "alice\U000e0041",
    "soft hyphen": "al\u00adice",
    "byte order mark": "\ufeffalice",
    "C1 control": "ali\x85ce",
    "only a combining mark": "\u0301",
    "Hangul filler": "\u3164",
    "Braille blank": "\u2800\u2800",
    "private use": "alice\ue000",
}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
async def test_names_that_hide_what_they_say_are_refused(server, http, name):
    for response in (await post(http, server, name, "hi"),
                     await http.post(server.url + "api/typing", json={"user": name}),
                     await http.get(server.url + "api/messages", params={"user": name}),
                     await http.get(server.url + "api/events", params={"user": name})):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "character (U+" in error or "empty" in error
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": name}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), T))
        assert frame["type"] == "error"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
    assert ws.close_code == 1008 and ws.close_reason == frame["error"]


async def test_names_are_nfkc_normalised(server, http):
    response = await post(http, server, "\uff41\uff4c\uff49\uff43\uff45", "hi")  # fullwidth
    assert response.status_code == 201
    assert response.json()["user"] == "alice"
    assert (await post(http, server, "Zo\u00eb \u65e5\u672c \U0001f600", "hi")).status_code == 201


# -- 9: no 500 for any input --------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "after=" + "9" * 5000, "after=" + str(2**63), "after=1e3", "after=%F0", "after=",
    "wait=" + "9" * 5000, "wait=1e999x",
])
async def test_bad_cursor_values_are_400(server, http, query):
    for path in ("api/messages", "api/events") if query.startswith("after") else ["api/messages"]:
        response = await http.get(server.url + path + "?" + query)
        assert response.status_code == 400, (path, response.text)


async def test_huge_but_valid_values_are_answered(server, http):
    sent = (await post(http, server, "ada", "hi")).json()
    for query in ("wait=1e999", "wait=-1e999", "after=-5", "after=-" + "9" * 19):
        response = await http.get(server.url + "api/messages?" + query)
        assert response.status_code == 200, query
        assert response.json()["messages"] == [sent]
    # A Last-Event-ID that is no id is ignored (as a browser's would be: it only echoes).
    for last_event_id in ("9" * 5000, "x", "-1", str(2**64)):
        async with http.stream("GET", server.url + "api/events",
                               headers={"Last-Event-ID": last_event_id}) as response:
            assert response.status_code == 200


async def test_a_hello_with_a_cursor_beyond_any_id_is_refused(server):
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada", "after": 2**70}))
        assert json.loads(await asyncio.wait_for(ws.recv(), T))["type"] == "error"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
    assert ws.close_code == 1008


# -- 13: a writer that fails --------------------------------------------------------------


async def test_a_failing_writer_is_logged_and_closes_1011(server, monkeypatch, caplog):
    async def broken_push(self, *args, **kwargs):
        raise RuntimeError("a bug in the writer")
        yield  # an async generator, like Outbox.stream

    monkeypatch.setattr(Outbox, "stream", broken_push)
    caplog.set_level(logging.ERROR, logger="chatlib")
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada"}))
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(T):
                while True:
                    await ws.recv()
    assert ws.close_code == 1011
    assert "a bug in the writer" in caplog.text


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_the_shared_frame_of_a_direct_write_is_a_whole_text_frame(size):
    """text_frames() keeps the last frames it built: the cache must never answer for another
    payload (the empty one included) and the bytes are a server's unmasked text frame."""
    from chatlib import frames
    from chatlib.fastpath import text_frames

    text_frames(("warm the cache",))
    payload = "é" * (size // 2) + "x" * (size % 2)
    payloads = (payload,)
    frame = text_frames(payloads)
    assert frames.decode(frame, max_size=None, masked=False)[0].payload == payload.encode()
    assert frame == frames.text(payload, mask_key=None)  # the course's encoder's bytes
    assert text_frames(payloads) is frame  # one frame for every client of a fan-out


def test_the_first_direct_frame_of_a_fresh_server_may_be_empty():
    """The frame cache starts empty without matching any payload (it once started as "")."""
    import subprocess
    import sys

    code = ("from chatlib.fastpath import text_frames, http_chunk; "
            "print(text_frames(('',)).hex(), http_chunk(('',)).hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["8100", b"0\r\n\r\n".hex()]
