"""Limits and bad input. Each bad client fails alone: every test also checks that clients
connected before it (one per transport) still receive every accepted message."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatlib import Limits, SSEClient, WebSocketClient
from chatlib.clients import ChatRefused
from chatlib.validation import ChatError, json_object, message_text, nickname
from chatlib.wire import SSEParser

pytestmark = pytest.mark.timeout(60)

T = 10  # seconds: hang guard, never reached when things work
SMALL = Limits(max_text=50, max_user=8, max_body=1000, max_frame=1024)


# -- bystanders: clients connected before the bad one ----------------------------------


class Bystanders:
    """One client per transport, connected before the misbehaving one."""

    def __init__(self, server, clients) -> None:
        self.server = server
        self.clients = clients
        self.accepted: list[str] = []  # every message the server accepted, in order
        self._seen = [0] * len(clients)

    async def post(self, text: str, user: str | None = None) -> dict:
        user = user or f"c{len(self.accepted)}"  # a fresh name: never rate limited
        async with httpx.AsyncClient() as http:
            response = await http.post(self.server.url + "api/messages",
                                       json={"user": user, "text": text})
        assert response.status_code == 201, response.text
        self.accepted.append(text)
        return response.json()

    async def check(self) -> None:
        """Post one more message; everyone gets every accepted message, in order, once."""
        await self.post(f"still serving #{len(self.accepted)}")
        for i, client in enumerate(self.clients):
            new = self.accepted[self._seen[i]:]
            got = await client.receive_many(len(new), timeout=T)
            assert [m.text for m in got] == new, client.transport
            self._seen[i] = len(self.accepted)


@pytest.fixture
async def bystanders(server, make_client) -> Bystanders:
    # Short names: they must fit the smallest max_user the tests use.
    clients = [await make_client(kind, server, f"b-{kind[:4]}")
               for kind in ("ws", "sse", "longpoll", "poll")]
    return Bystanders(server, clients)


async def ws_hello(server, user: str = "ada", after: int = 0, **options):
    ws = await ws_connect(server.ws_url, **options)
    await ws.send(json.dumps({"type": "hello", "user": user, "after": after}))
    return ws


async def ws_next(ws, *kinds: str) -> dict:
    """The next frame of one of these types (skipping presence, typing, ...)."""
    async with asyncio.timeout(T):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] in kinds:
                return frame


async def ws_closed_code(ws) -> int:
    """Read until the server closes; the close code it sent."""
    async with asyncio.timeout(T):
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame made by hand (RFC 6455 section 5.2), whatever its payload."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


# -- Origin -----------------------------------------------------------------------------


def foreign_origins(port: int) -> list[str]:
    return ["http://evil.example", "null", f"http://127.0.0.1:{port + 1}",
            f"http://localhost:{port}", f"http://127.0.0.1:{port}.evil.example",
            f"http://evil.example@127.0.0.1:{port}x", "http://127.0.0.1"]


@pytest.mark.parametrize("path", ["api/messages", "api/typing"])
async def test_foreign_origin_post_is_403(server, bystanders, http, path):
    for origin in foreign_origins(server.port):
        response = await http.post(server.url + path, json={"user": "eve", "text": "hi"},
                                   headers={"Origin": origin})
        assert response.status_code == 403, origin
        assert "error" in response.json()
    assert (await http.get(server.url + "api/messages")).json()["last_id"] == 0
    await bystanders.check()


async def test_same_origin_is_allowed(server, bystanders, make_client, http):
    origin = server.url.rstrip("/")
    response = await http.post(server.url + "api/messages", json={"user": "ada", "text": "a"},
                               headers={"Origin": origin})
    assert response.status_code == 201
    bystanders.accepted.append("a")
    response = await http.post(server.url + "api/typing", json={"user": "ada"},
                               headers={"Origin": origin})
    assert response.status_code == 204
    poller = await make_client("poll", server, "bob", origin=origin)
    await poller.send("b")
    bystanders.accepted.append("b")
    ws = await make_client("ws", server, "carol", origin=origin)
    await ws.send("c")
    bystanders.accepted.append("c")
    assert [m.text for m in await ws.receive_many(3, timeout=T)] == ["a", "b", "c"]
    await bystanders.check()


async def test_forwarded_host_counts_as_same_origin(server, http):
    response = await http.post(server.url + "api/messages", json={"user": "ada", "text": "a"},
                               headers={"Origin": "https://hub.example",
                                        "X-Forwarded-Host": "hub.example"})
    assert response.status_code == 201


@pytest.mark.parametrize("limits", [Limits(allowed_origins={"http://lab.example:8888"})])
async def test_allowed_origins_are_configurable(server, bystanders, http):
    response = await http.post(server.url + "api/messages", json={"user": "ada", "text": "a"},
                               headers={"Origin": "http://lab.example:8888"})
    assert response.status_code == 201
    bystanders.accepted.append("a")
    response = await http.post(server.url + "api/messages", json={"user": "ada", "text": "b"},
                               headers={"Origin": "http://lab.example:9999"})
    assert response.status_code == 403
    ws = await ws_hello(server, origin="http://lab.example:8888")
    try:
        assert (await ws_next(ws, "message"))["text"] == "a"
    finally:
        await ws.close()
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(server.ws_url, origin="http://lab.example:9999")
    assert refused.value.response.status_code == 403
    await bystanders.check()


@pytest.mark.parametrize("limits", [Limits(allowed_origins={"*"})])
async def test_allowed_origins_star_allows_any(server, http):
    response = await http.post(server.url + "api/messages", json={"user": "ada", "text": "a"},
                               headers={"Origin": "http://anywhere.example"})
    assert response.status_code == 201


async def test_foreign_origin_websocket_handshake_is_refused(server, bystanders, http):
    for origin in foreign_origins(server.port):
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(server.ws_url, origin=origin, open_timeout=T)
        assert refused.value.response.status_code == 403, origin
    with pytest.raises(InvalidStatus):
        client = WebSocketClient(server.url, "eve", origin="http://evil.example")
        await client.connect()
    assert "eve" not in (await http.get(server.url + "api/presence")).json()["users"]
    await bystanders.check()


async def test_same_origin_websocket_is_accepted(server, bystanders):
    ws = await ws_hello(server, origin=server.url.rstrip("/"))
    try:
        await bystanders.post("hello")
        assert (await ws_next(ws, "message"))["text"] == "hello"
    finally:
        await ws.close()
    await bystanders.check()


# -- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("limits", [SMALL])
async def test_text_too_long_is_413(server, bystanders, http):
    url = server.url + "api/messages"
    response = await http.post(url, json={"user": "ada", "text": "x" * 51})
    assert response.status_code == 413
    assert "error" in response.json()
    # The limit counts characters, not bytes: 50 two-byte characters are fine.
    response = await http.post(url, json={"user": "ada", "text": "é" * 50})
    assert response.status_code == 201
    bystanders.accepted.append("é" * 50)
    await bystanders.check()


@pytest.mark.parametrize("kind", ["ws", "poll"])
@pytest.mark.parametrize("char", ["x", "é", "ж", "\U0001f600"], ids=["ascii", "latin", "cyrillic",
                                                                    "emoji"])
async def test_text_at_the_limit_is_accepted_however_json_escapes_it(
        server, bystanders, make_client, kind, char):
    # The clients send json.dumps() output: non-ASCII as \uXXXX escapes (12 characters
    # for one emoji). The limit is on the text's characters, not on its JSON encoding.
    client = await make_client(kind, server, "ada")
    text = char * server.limits.max_text
    await client.send(text)
    bystanders.accepted.append(text)
    got = await client.receive(timeout=T)
    assert got.text == text
    assert list(client.errors) == []
    with pytest.raises(ChatRefused, match="longer than") as refused:
        await client.send(text + char)  # one character too many
    assert refused.value.status == 413  # the POST's status, or the error frame's
    assert client.pending == {}
    await bystanders.check()


@pytest.mark.parametrize("limits", [SMALL])
async def test_text_too_long_over_websocket_is_an_error_frame(server, bystanders):
    ws = await ws_hello(server)
    try:
        await ws.send(json.dumps({"type": "message", "text": "x" * 51}))
        assert "error" in await ws_next(ws, "error")
        await ws.send(json.dumps({"type": "message", "text": "fits"}))  # still open
        bystanders.accepted.append("fits")
        assert (await ws_next(ws, "message"))["text"] == "fits"
    finally:
        await ws.close()
    await bystanders.check()


@pytest.mark.parametrize("limits", [SMALL])
async def test_nickname_too_long_is_413(server, bystanders, http):
    for path in ("api/messages", "api/typing"):
        response = await http.post(server.url + path, json={"user": "n" * 9, "text": "hi"})
        assert response.status_code == 413, path
    response = await http.get(server.url + "api/messages?user=" + "n" * 9)
    assert response.status_code == 413
    response = await http.post(server.url + "api/messages", json={"user": "n" * 8, "text": "ok"})
    assert response.status_code == 201
    bystanders.accepted.append("ok")
    ws = await ws_connect(server.ws_url)
    await ws.send(json.dumps({"type": "hello", "user": "n" * 9}))
    assert "error" in await ws_next(ws, "error")
    assert await ws_closed_code(ws) == 1008
    await bystanders.check()


@pytest.mark.parametrize("limits", [SMALL])
async def test_websocket_frame_larger_than_max_frame_closes_1009(server, bystanders):
    ws = await ws_hello(server)
    await ws.send(json.dumps({"type": "message", "text": "x" * 2000}))  # > 1024 bytes
    assert await ws_closed_code(ws) == 1009
    await bystanders.check()


@pytest.mark.parametrize("limits", [SMALL])
async def test_oversized_body_is_413(server, bystanders, http, raw_http):
    url = server.url + "api/messages"
    big = json.dumps({"user": "ada", "text": "x" * 5000}).encode()
    response = await http.post(url, content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "error" in response.json()

    async def chunks():  # no Content-Length: the server must count as it reads
        for _ in range(10):
            yield b" " * 500

    response = await http.post(url, content=chunks(),
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    # A huge declared length is refused before any of it is read.
    status, _, body = await raw_http(
        server.port, b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: 99999999999\r\nContent-Type: application/json"
                     b"\r\nConnection: close\r\n\r\n{")
    assert status == 413 and b"error" in body
    await bystanders.check()


# -- malformed input ----------------------------------------------------------------------

BAD_BODIES = {
    "not json": b"not json",
    "empty": b"",
    "truncated": b'{"user": "ada", "text": "hi"',
    "array": b'["ada", "hi"]',
    "string": b'"hi"',
    "null": b"null",
    "number": b"42",
    "empty object": b"{}",
    "missing text": b'{"user": "ada"}',
    "missing user": b'{"text": "hi"}',
    "null text": b'{"user": "ada", "text": null}',
    "int user": b'{"user": 5, "text": "hi"}',
    "int text": b'{"user": "ada", "text": 5}',
    "bool text": b'{"user": "ada", "text": true}',
    "list text": b'{"user": "ada", "text": ["hi"]}',
    "object user": b'{"user": {"name": "ada"}, "text": "hi"}',
    "NaN text": b'{"user": "ada", "text": NaN}',
    "blank text": b'{"user": "ada", "text": "   "}',
    "blank user": b'{"user": " ", "text": "hi"}',
    "control in user": b'{"user": "a\\u0001da", "text": "hi"}',
    "raw control char": b'{"user": "ada", "text": "a\x01b"}',
    "latin-1 body": b'{"user": "ada", "text": "caf\xe9"}',
    "invalid utf-8": b'\xff\xfe{"user": "ada", "text": "hi"}',
    "overlong utf-8": b'{"user": "ada", "text": "\xc0\xaf"}',
    "utf-8 surrogate bytes": b'{"user": "ada", "text": "\xed\xa0\x80"}',
    "lone surrogate text": b'{"user": "ada", "text": "\\ud800"}',
    "lone low surrogate": b'{"user": "ada", "text": "x\\udc00y"}',
    "lone surrogate user": b'{"user": "\\udbff", "text": "hi"}',
    "deeply nested": b"[" * 900,
    "deeply nested object": b'{"a":' * 900,
}


# Typing needs only a valid user: with these bodies it is fine (204).
TYPING_OK = {"missing text", "null text", "int text", "bool text", "list text", "NaN text",
             "blank text", "lone surrogate text", "lone low surrogate"}


@pytest.mark.parametrize("limits", [Limits(rate=10_000, burst=10_000)])
async def test_bad_body_is_400(server, bystanders, http, subtests):
    for name, body in BAD_BODIES.items():
        with subtests.test(body=name):
            last_id = (await http.get(server.url + "api/messages")).json()["last_id"]
            for path in ("api/messages", "api/typing"):
                response = await http.post(server.url + path, content=body,
                                           headers={"Content-Type": "application/json"})
                if path == "api/typing" and name in TYPING_OK:
                    assert response.status_code == 204
                    continue
                assert response.status_code == 400, (path, response.text)
                assert isinstance(response.json()["error"], str)
            assert (await http.get(server.url + "api/messages")).json()["last_id"] == last_id
            await bystanders.check()


async def test_deeply_nested_json_is_400_not_500(server, bystanders, http):
    response = await http.post(server.url + "api/messages", content=b"[" * 50_000,
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    await bystanders.check()


async def test_valid_surrogate_pair_is_accepted(server, bystanders, http):
    response = await http.post(server.url + "api/messages",
                               content=b'{"user": "ada", "text": "\\ud83d\\ude00 ok"}',
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 201
    assert response.json()["text"] == "\U0001f600 ok"
    bystanders.accepted.append("\U0001f600 ok")
    await bystanders.check()


BAD_FRAMES = {
    "not json": "not json",
    "array": "[1, 2]",
    "string": '"message"',
    "no type": '{"text": "hi"}',
    "unknown type": '{"type": "shout", "text": "hi"}',
    "second hello": '{"type": "hello", "user": "ada"}',
    "missing text": '{"type": "message"}',
    "int text": '{"type": "message", "text": 5}',
    "null text": '{"type": "message", "text": null}',
    "blank text": '{"type": "message", "text": " "}',
    "lone surrogate": '{"type": "message", "text": "\\ud800"}',
    "lone surrogate type": '{"type": "\\ud800"}',
    "deeply nested": "[" * 900,
    "very deeply nested": "[" * 4000,
}


@pytest.mark.parametrize("limits", [Limits(rate=10_000, burst=10_000)])
async def test_bad_websocket_frame_is_an_error_frame(server, bystanders, subtests):
    ws = await ws_hello(server)  # one connection survives every bad frame
    try:
        for name, frame in BAD_FRAMES.items():
            with subtests.test(frame=name):
                await ws.send(frame)
                error = await ws_next(ws, "error")
                assert isinstance(error["error"], str) and error["error"]
                text = f"after {name}"
                await ws.send(json.dumps({"type": "message", "text": text}))
                bystanders.accepted.append(text)
                assert (await ws_next(ws, "message"))["text"] == text
                await bystanders.check()
    finally:
        await ws.close()


async def test_binary_frame_is_an_error_frame(server, bystanders):
    ws = await ws_hello(server)
    try:
        await ws.send(b'{"type": "message", "text": "binary"}')
        assert "binary" in (await ws_next(ws, "error"))["error"]
        await ws.send(json.dumps({"type": "message", "text": "text is fine"}))
        bystanders.accepted.append("text is fine")
        assert (await ws_next(ws, "message"))["text"] == "text is fine"
    finally:
        await ws.close()
    await bystanders.check()


async def test_invalid_utf8_text_frame_closes_1007(server, bystanders):
    ws = await ws_hello(server)
    await ws_next(ws, "presence")  # the server has processed the hello
    ws.transport.write(masked_frame(0x1, b'{"type": "message", "text": "\xc3\x28"}'))
    assert await ws_closed_code(ws) == 1007
    await bystanders.check()


async def test_utf8_character_split_across_fragments_is_fine(server, bystanders):
    ws = await ws_hello(server)
    try:
        await ws_next(ws, "presence")
        payload = json.dumps({"type": "message", "text": "café"}, ensure_ascii=False).encode()
        cut = payload.index("é".encode()) + 1  # between the two bytes of "é"
        ws.transport.write(masked_frame(0x1, payload[:cut], fin=False)
                           + masked_frame(0x0, payload[cut:]))
        bystanders.accepted.append("café")
        assert (await ws_next(ws, "message"))["text"] == "café"
    finally:
        await ws.close()
    await bystanders.check()


FIRST_FRAMES = {
    "message": '{"type": "message", "text": "hi"}',
    "not json": "hello?",
    "array": '["hello"]',
    "no user": '{"type": "hello"}',
    "int user": '{"type": "hello", "user": 7}',
    "blank user": '{"type": "hello", "user": "  "}',
    "string after": '{"type": "hello", "user": "ada", "after": "5"}',
    "bool after": '{"type": "hello", "user": "ada", "after": true}',
    "float after": '{"type": "hello", "user": "ada", "after": 1.5}',
    "long user": json.dumps({"type": "hello", "user": "n" * 33}),
    "surrogate user": '{"type": "hello", "user": "\\ud800"}',
    "nested": "[" * 3000,
    "binary": b'{"type": "hello", "user": "ada"}',
}


async def test_first_frame_must_be_a_valid_hello(server, bystanders, subtests):
    for name, first in FIRST_FRAMES.items():
        with subtests.test(first=name):
            ws = await ws_connect(server.ws_url)
            await ws.send(first)
            assert isinstance((await ws_next(ws, "error"))["error"], str)
            assert await ws_closed_code(ws) == 1008
            await bystanders.check()


@pytest.mark.parametrize("limits", [Limits(hello_timeout=0.2)])
async def test_silent_websocket_is_closed_after_hello_timeout(server, bystanders):
    ws = await ws_connect(server.ws_url)
    async with asyncio.timeout(T):
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    await bystanders.check()


MALFORMED_REQUESTS = {
    "garbage": b"GARBAGE\r\n\r\n",
    "binary": b"\x00\x01\x02\x03\xff\r\n\r\n",
    "no version": b"GET /\r\n\r\n",
    "header without colon": b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
    "bad content-length": b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: abc\r\n\r\n",
    "two content-lengths": b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "space in target": b"GET /a b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "bad chunk": b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


async def test_malformed_http_request_is_400(server, bystanders, raw_http, caplog, subtests):
    for name, data in MALFORMED_REQUESTS.items():
        with subtests.test(request=name):
            status, _, _ = await raw_http(server.port, data)
            assert status == 400
            status, _, _ = await raw_http(server.port, b"GET /api/presence HTTP/1.1\r\n"
                                          b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert status == 200
            await bystanders.check()
            # Bad bytes from a client are no server error (no traceback in the notebook).
            assert not [r for r in caplog.records if "Exception in ASGI" in r.getMessage()]


async def test_non_ascii_last_event_id_is_ignored(server, bystanders, raw_http):
    await bystanders.post("one")
    # "²" (latin-1 0xb2) passes str.isdigit() but is no integer for int().
    status, headers, _ = await raw_http(
        server.port, b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: \xb2\r\n\r\n",
        head_only=True)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    await bystanders.check()


# -- rate limits ----------------------------------------------------------------------------

# rate=0.01/s: no token comes back during a test, so the outcome never depends on timing.
RATE = Limits(rate=0.01, burst=2)


@pytest.mark.parametrize("limits", [RATE])
async def test_http_rate_limit_is_429(server, bystanders, http):
    url = server.url + "api/messages"
    for text in ("one", "two"):
        assert (await http.post(url, json={"user": "ada", "text": text})).status_code == 201
        bystanders.accepted.append(text)
    response = await http.post(url, json={"user": "ada", "text": "three"})
    assert response.status_code == 429
    assert "error" in response.json()
    response = await http.post(server.url + "api/typing", json={"user": "ada"})
    assert response.status_code == 429  # typing notices count too
    # Other users are not slowed down by ada.
    assert (await http.post(url, json={"user": "bob", "text": "bob"})).status_code == 201
    bystanders.accepted.append("bob")
    await bystanders.check()


@pytest.mark.parametrize("limits", [RATE])
async def test_websocket_rate_limit_is_an_error_frame(server, bystanders, make_client):
    ws = await ws_hello(server)
    try:
        for text in ("one", "two", "three"):
            await ws.send(json.dumps({"type": "message", "text": text}))
        bystanders.accepted += ["one", "two"]
        frames = []
        async with asyncio.timeout(T):
            while not frames or frames[-1]["type"] != "error":
                frames.append(json.loads(await ws.recv()))
        assert "slow down" in frames[-1]["error"]
        assert [f["text"] for f in frames if f["type"] == "message"] == ["one", "two"]
        # The connection stays open and keeps receiving.
        other = await make_client("ws", server, "ada")  # same user, its own bucket
        await other.send("from another connection")
        bystanders.accepted.append("from another connection")
        assert (await ws_next(ws, "message"))["text"] == "from another connection"
    finally:
        await ws.close()
    await bystanders.check()


@pytest.mark.parametrize("limits", [Limits(rate=0.01, burst=2, max_text=10)])
@pytest.mark.parametrize("via", ["http", "ws"])
async def test_a_refused_text_spends_no_rate_token(server, http, via):
    """HTTP and WebSocket posting check the text before they spend a rate token, in the
    same order: two refused texts leave the burst of two for two accepted messages."""
    texts = ["x" * 11, "y" * 11, "one", "two", "three"]
    if via == "http":
        statuses = [(await http.post(server.url + "api/messages",
                                     json={"user": "ada", "text": text})).status_code
                    for text in texts]
    else:
        ws = await ws_hello(server)
        try:
            statuses = []
            for i, text in enumerate(texts):
                await ws.send(json.dumps({"type": "message", "text": text,
                                          "client_id": f"c{i}"}))
                answer = await ws_next(ws, "ack", "error")
                statuses.append(201 if answer["type"] == "ack" else answer["status"])
        finally:
            await ws.close()
    assert statuses == [413, 413, 201, 201, 429]


# -- slow readers ---------------------------------------------------------------------------

SLOW = Limits(max_queue=8, max_text=70_000, max_body=200_000, rate=10_000, burst=10_000)
BIG = 60_000  # characters per message: a few hundred fill any socket buffer


async def small_window_socket(port: int) -> socket.socket:
    """A connected socket with a tiny receive buffer, so that not reading fills it fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


@pytest.mark.parametrize("limits", [SLOW])
async def test_slow_websocket_reader_is_closed_1013_and_can_resume(server, make_client, http):
    fast = await make_client("ws", server, "fast")
    sock = await small_window_socket(server.port)
    # max_queue=1: the client library stops reading the socket after one unread frame.
    slow = await ws_connect(server.ws_url, sock=sock, max_queue=1, compression=None,
                            max_size=None)
    try:
        await slow.send(json.dumps({"type": "hello", "user": "slow", "after": 0}))
        count = 300
        for i in range(count):
            response = await http.post(server.url + "api/messages",
                                       json={"user": "poster", "text": f"{i}:" + "x" * BIG})
            assert response.status_code == 201
            # The fast reader gets each message while the slow one is stuck.
            assert (await fast.receive(timeout=T)).text.startswith(f"{i}:")
        # The slow reader reads again: what was buffered, then a 1013 close.
        ids = []
        async with asyncio.timeout(T):
            with pytest.raises(ConnectionClosed):
                while True:
                    frame = json.loads(await slow.recv())
                    if frame["type"] == "message":
                        ids.append(frame["id"])
        assert slow.close_code == 1013
        assert ids == list(range(1, len(ids) + 1))  # no gap before the close
        assert len(ids) < count
    finally:
        await slow.close()
    # It resumes after its last id and gets exactly the rest.
    resumed = await make_client("ws", server, "slow", after=ids[-1])
    rest = await resumed.receive_many(count - len(ids), timeout=T)
    assert [m.id for m in rest] == list(range(len(ids) + 1, count + 1))
    await fast.send("still fast")
    assert (await fast.receive(timeout=T)).text == "still fast"


def dechunk(data: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response (as much as arrived)."""
    body, pos = b"", 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return body
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return body
        body += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


@pytest.mark.parametrize("limits", [SLOW])
async def test_slow_sse_reader_stream_ends_and_can_resume(server, make_client, http):
    fast = await make_client("sse", server, "fast")
    sock = await small_window_socket(server.port)
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        writer.write(b"GET /api/events?user=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(T):
            head = await reader.readuntil(b"\r\n\r\n")  # then stop reading for a while
        assert head.startswith(b"HTTP/1.1 200")
        count = 300
        for i in range(count):
            response = await http.post(server.url + "api/messages",
                                       json={"user": "poster", "text": f"{i}:" + "x" * BIG})
            assert response.status_code == 201
            assert (await fast.receive(timeout=T)).text.startswith(f"{i}:")
        async with asyncio.timeout(T):
            raw = await reader.read()  # everything until the server ends the stream
    finally:
        writer.close()
    ids = [int(e.last_event_id) for e in SSEParser().feed(dechunk(raw))
           if e.event == "message"]
    assert ids == list(range(1, len(ids) + 1))  # no gap
    assert len(ids) < count  # the server gave up on this reader
    resumed = SSEClient(server.url, "slow", after=ids[-1])
    try:
        rest = await resumed.receive_many(count - len(ids), timeout=T)
    finally:
        await resumed.close()
    assert [m.id for m in rest] == list(range(len(ids) + 1, count + 1))


# -- text is stored and returned verbatim ---------------------------------------------------

XSS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "javascript:alert(1)",
    "&lt;b&gt; &amp; &#x27;",
    "</textarea><svg/onload=alert(1)>",
    "{{constructor.constructor('alert(1)')()}}",
    "line1\nline2\r\n\ttab",
    "' OR 1=1; --",
    "\u202eRTL override\u200b zero width",
    "emoji \U0001f600 and \u2603",
    "  leading and trailing spaces  ",
    "data: fake\n\nevent: reset\nid: 999",  # must not break the SSE framing
]


@pytest.mark.parametrize("via", ["http", "ws"])
async def test_xss_payloads_are_returned_verbatim(server, bystanders, make_client, http, via):
    if via == "http":
        for text in XSS:
            stored = await bystanders.post(text, user="mallory")
            assert stored["text"] == text
    else:
        mallory = await make_client("ws", server, "mallory")
        for text in XSS:
            await mallory.send(text)
        bystanders.accepted += XSS
        assert [m.text for m in await mallory.receive_many(len(XSS), timeout=T)] == XSS
    body = (await http.get(server.url + "api/messages")).json()
    assert [m["text"] for m in body["messages"]] == XSS
    await bystanders.check()  # every transport delivered them unchanged, in order
    for client in bystanders.clients:
        assert client.resets == 0


# -- the validators never fail with anything but ChatError ----------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_json_object_rejects_any_bytes_cleanly(raw):
    try:
        data = json_object(raw)
    except ChatError as exc:
        assert exc.status == 400
    else:
        assert isinstance(data, dict)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["user", "text", "type", "x"]), JSON_VALUES))
def test_validators_raise_only_chat_errors(data):
    limits = Limits(max_text=20, max_user=8)
    for check in (nickname, message_text):
        try:
            value = check(data, limits)
        except ChatError as exc:
            assert exc.status in (400, 413)
        else:
            assert isinstance(value, str) and value.strip()
            value.encode("utf-8")  # always valid UTF-8


# -- one home for each limit ------------------------------------------------------------


@pytest.mark.parametrize("module, name", [
    ("chatlib.panel", "MAX_OUTBOX"), ("chatlib.server", "FD_LIMIT_WANTED"),
    ("chatlib.handshake", "MAX_HEAD_SIZE"), ("chatlib.frames", "DEFAULT_MAX_SIZE"),
    ("chatlib.protocols", "LINGER_SECONDS"), ("chatlib.protocols", "MAX_FRAGMENTS")])
def test_a_limit_lives_in_limits_and_stays_importable_where_it_is_used(module, name):
    """Every limit is defined once, in chatlib.limits (with its reason); the modules that
    apply it import it, so that `from chatlib.panel import MAX_OUTBOX` still works."""
    import importlib
    import inspect

    from chatlib import limits

    used_in = importlib.import_module(module)
    assert getattr(used_in, name) is getattr(limits, name)
    assert f"\n{name} = " not in inspect.getsource(used_in)
