"""Notebook 10's hand-made WebSocket server (chatlib/handmade.py), held to the real thing.

* A frame-level conformance battery against its ``/echo`` endpoint, case by case after
  Autobahn|Testsuite sections 1-7: framing (1), pings and pongs (2), reserved bits (3),
  reserved opcodes (4), fragmentation (5), UTF-8 handling including fail-fast on an
  unfinished message (6), close handling and close codes (7). Each case sends raw frames
  (built with chatlib.frames, or by hand where the codec refuses to) and expects exactly the
  listed frames back, then the server's CLOSE with an allowed code, then the end of the TCP
  connection. Like Autobahn, chopped cases write one byte at a time.
* The chat protocol over ``/ws``: hello with history, message with ack (once per client_id),
  typing, presence; what a bad client gets (1003, 1008, an error frame) while the server
  keeps serving the others; handshake refusals (400, 403, 426).
* The real chat page in real Chromium, served by the hand-made server, chatting with another
  page and with chatlib.WebSocketClient.
* The notebook's solution cells define exactly this module's code (compared as syntax trees),
  so the notebook teaches what is tested here.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import needs_chromium

from chatlib import WebSocketClient, frames, handmade, handshake
from chatlib.browser import launch
from chatlib.frames import CloseCode, Opcode

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "10-build-your-own-websocket-server.ipynb"
TIMEOUT = 10.0

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def server():
    server = await handmade.HandmadeServer().start()
    try:
        yield server
    finally:
        await server.stop()


# -- building the battery ---------------------------------------------------------------------


def wire(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
         masked: bool = True) -> bytes:
    """One client frame, any header at all (reserved opcodes and RSV bits included)."""
    key = frames.new_mask_key() if masked else None
    n = len(payload)
    length = (bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big") if n < 65536
              else bytes([127]) + n.to_bytes(8, "big"))
    header = bytes([(0x80 if fin else 0) | rsv << 4 | opcode, (0x80 if masked else 0) | length[0]])
    header += length[1:]
    if key is None:
        return header + payload
    return header + key + frames.mask_bytes(payload, key)


def text(data: str | bytes, **kw) -> bytes:
    return wire(Opcode.TEXT, data.encode() if isinstance(data, str) else data, **kw)


def close(code: int | None = 1000, reason: bytes = b"") -> bytes:
    return wire(Opcode.CLOSE, b"" if code is None else code.to_bytes(2, "big") + reason)


@dataclass
class Case:
    """Send ``send``; expect ``expect`` (frames) then a CLOSE with a code in ``codes``."""

    name: str
    send: list[bytes]
    expect: list[tuple[int, bytes]] = field(default_factory=list)
    codes: tuple = (1000,)  # None in codes: an empty CLOSE payload is fine
    chop: bool = False  # write one byte at a time


def ok(name: str, *send: bytes, expect=(), chop=False) -> Case:
    """A case that must pass: the expected frames, then our CLOSE 1000 is answered."""
    return Case(name, [*send, close(1000)], list(expect), (1000,), chop)


def fail(name: str, *send: bytes, expect=(), code: int = 1002, chop=False) -> Case:
    """A case the server must fail with ``code`` (after the expected frames)."""
    return Case(name, list(send), list(expect), (code,), chop)


def echo(data: str | bytes, opcode: int = Opcode.TEXT) -> tuple[int, bytes]:
    return opcode, data.encode() if isinstance(data, str) else data


def pong(payload: bytes = b"") -> tuple[int, bytes]:
    return Opcode.PONG, payload


UTF8_VALID = ["Hello-µ@ßöäüàá-UTF-8!!", "κόσμε", "\U0001f600 smile", "\x00", "\u0080",
              "\u07ff", "\u0800", "\uffff", "\U00010000", "\U0010ffff", "\ufeff BOM", "\ufffd"]
UTF8_INVALID = [
    b"\x80", b"\xbf", b"\x80\xbf",  # lone continuation bytes
    b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf",  # overlong "/"
    b"\xc1\xbf", b"\xe0\x9f\xbf",  # overlong maximums
    b"\xed\xa0\x80", b"\xed\xbf\xbf",  # UTF-16 surrogates
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf8\x88\x80\x80\x80", b"\xfc\x84\x80\x80\x80\x80",  # 5- and 6-byte forms
    b"\xfe", b"\xff", b"\xfe\xfe\xff\xff",  # bytes that never appear
    b"\xc2", b"\xe0\x80", b"\xf0\x90\x80",  # cut before the end of the text
    "κόσμε".encode() + b"\xed\xa0\x80edited",
]
PING125 = bytes(range(125))

CASES = [
    # 1 · Framing: text and binary messages of every length class, whole and chopped.
    *[ok(f"1.1 text {n} bytes", text("*" * n), expect=[echo("*" * n)])
      for n in (0, 125, 126, 127, 128, 65535, 65536)],
    ok("1.1 text 65536 bytes, chopped", text("*" * 2000), expect=[echo("*" * 2000)], chop=True),
    *[ok(f"1.2 binary {n} bytes", wire(Opcode.BINARY, b"\xfe" * n),
         expect=[echo(b"\xfe" * n, Opcode.BINARY)]) for n in (0, 125, 126, 127, 128, 65535)],
    # 2 · Pings and pongs.
    ok("2.1 ping, empty", wire(Opcode.PING), expect=[pong()]),
    ok("2.2 ping, text payload", wire(Opcode.PING, b"Hello"), expect=[pong(b"Hello")]),
    ok("2.3 ping, binary payload", wire(Opcode.PING, b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"),
       expect=[pong(b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff")]),
    ok("2.4 ping, 125 bytes", wire(Opcode.PING, PING125), expect=[pong(PING125)]),
    fail("2.5 ping, 126 bytes", wire(Opcode.PING, bytes(126))),
    ok("2.6 ping, 125 bytes, chopped", wire(Opcode.PING, PING125), expect=[pong(PING125)],
       chop=True),
    ok("2.7 unsolicited pong, empty", wire(Opcode.PONG), text("x"), expect=[echo("x")]),
    ok("2.8 unsolicited pong, payload", wire(Opcode.PONG, b"unsolicited"), text("x"),
       expect=[echo("x")]),
    ok("2.9 unsolicited pong, then ping", wire(Opcode.PONG, b"u"), wire(Opcode.PING, b"p"),
       expect=[pong(b"p")]),
    ok("2.10 ten pings", *[wire(Opcode.PING, b"%d" % i) for i in range(10)],
       expect=[pong(b"%d" % i) for i in range(10)]),
    ok("2.11 ten pings, chopped", *[wire(Opcode.PING, b"%d" % i) for i in range(10)],
       expect=[pong(b"%d" % i) for i in range(10)], chop=True),
    fail("unmasked client frame", text("x", masked=False)),
    # 3 · Reserved bits: no extension was negotiated, so any RSV bit fails the connection.
    fail("3.1 text, RSV1", text("x", rsv=1)),
    fail("3.2 text, text RSV2, ping", text("x"), text("x", rsv=2), wire(Opcode.PING),
         expect=[echo("x")]),
    fail("3.3 same, chopped", text("x"), text("x", rsv=3), wire(Opcode.PING),
         expect=[echo("x")], chop=True),
    fail("3.4 text, RSV4", text("x", rsv=4)),
    fail("3.5 binary, RSV5", wire(Opcode.BINARY, b"\x00", rsv=5)),
    fail("3.6 ping, RSV6", wire(Opcode.PING, b"p", rsv=6)),
    fail("3.7 close, RSV7", wire(Opcode.CLOSE, b"\x03\xe8", rsv=7)),
    # 4 · Reserved opcodes, alone and between valid frames.
    *[fail(f"4.1 reserved data opcode {op}", wire(op)) for op in (3, 4, 5, 6, 7)],
    *[fail(f"4.2 reserved control opcode {op}", wire(op, b"x")) for op in (11, 12, 13, 14, 15)],
    fail("4.1.3 text, opcode 5, ping", text("x"), wire(5, b"x"), wire(Opcode.PING),
         expect=[echo("x")]),
    fail("4.2.3 text, opcode 13, ping", text("x"), wire(13, b"x"), wire(Opcode.PING),
         expect=[echo("x")]),
    # 5 · Fragmentation.
    fail("5.1 fragmented ping", wire(Opcode.PING, b"a", fin=False), wire(0, b"b")),
    fail("5.2 fragmented pong", wire(Opcode.PONG, b"a", fin=False), wire(0, b"b")),
    ok("5.3 text in 2 fragments", text("frag", fin=False), wire(0, b"ment"),
       expect=[echo("fragment")]),
    ok("5.4 text in 2 fragments, chopped", text("frag", fin=False), wire(0, b"ment"),
       expect=[echo("fragment")], chop=True),
    ok("5.6 ping between fragments", text("frag", fin=False), wire(Opcode.PING, b"p"),
       wire(0, b"ment"), expect=[pong(b"p"), echo("fragment")]),
    ok("5.8 ping between fragments, chopped", text("frag", fin=False),
       wire(Opcode.PING, b"p"), wire(0, b"ment"), expect=[pong(b"p"), echo("fragment")],
       chop=True),
    fail("5.9 continuation first, FIN=1", wire(0, b"x"), text("x"), expect=[]),
    fail("5.10 continuation first, FIN=0", wire(0, b"x", fin=False), text("x")),
    fail("5.15 message, then a stray continuation", text("a", fin=False), wire(0, b"b"),
         wire(0, b"c", fin=False), wire(0, b"d"), expect=[echo("ab")]),
    fail("5.18 new text before the last one ended", text("a", fin=False), text("b")),
    ok("5.19 pings between many fragments",
       text("a", fin=False), wire(0, b"b", fin=False), wire(Opcode.PING, b"1"),
       wire(0, b"c", fin=False), wire(Opcode.PING, b"2"), wire(0, b"d"),
       expect=[pong(b"1"), pong(b"2"), echo("abcd")]),
    ok("5.x binary in 3 fragments", wire(Opcode.BINARY, b"\x00", fin=False),
       wire(0, b"\xff", fin=False), wire(0, b"\x80"), expect=[echo(b"\x00\xff\x80", 2)]),
    ok("5.x fragments of 0 bytes", text("", fin=False), wire(0, b"", fin=False), wire(0, b"x"),
       expect=[echo("x")]),
    # 6 · UTF-8: valid text whole and split at every byte, invalid text refused with 1007.
    *[ok(f"6.2 valid {s!r}", text(s), expect=[echo(s)]) for s in UTF8_VALID],
    *[ok(f"6.2.3 valid text split after byte {i}", text(s.encode()[:i], fin=False),
         wire(0, s.encode()[i:]), expect=[echo(s)])
      for s in ["κόσμε\U0001f600"] for i in range(1, len(s.encode()))],
    *[fail(f"6.3 invalid {b!r}", text(b), code=1007) for b in UTF8_INVALID],
    *[fail(f"6.3 invalid {b!r}, fragmented", text(b[:1], fin=False), wire(0, b[1:]),
           code=1007) for b in UTF8_INVALID if len(b) > 1],
    ok("6.x invalid UTF-8 in a binary message is fine", wire(Opcode.BINARY, b"\xff"),
       expect=[echo(b"\xff", Opcode.BINARY)]),
    # Fail fast: the message never ends, so only a server that checks each fragment closes.
    fail("6.4.1 invalid in the first fragment, never finished",
         text("κόσμε".encode() + b"\xf4\x90\x80\x80", fin=False), code=1007),
    fail("6.4.2 invalid from the second fragment on, never finished",
         text("κόσμε".encode() + b"\xf4", fin=False), wire(0, b"\x90", fin=False), code=1007),
    fail("6.4.3 same, chopped", text("κόσμε".encode() + b"\xf4", fin=False),
         wire(0, b"\x90", fin=False), code=1007, chop=True),
    # 7 · Close handling.
    ok("7.1.1 text, then close", text("Hello"), expect=[echo("Hello")]),
    Case("7.1.2 close twice", [close(1000), close(1000)]),
    Case("7.1.3 close, then ping: no pong", [close(1000), wire(Opcode.PING, b"p")]),
    Case("7.1.4 close, then text: no echo", [close(1000), text("x")]),
    Case("7.1.5 close inside a fragmented message",
         [text("a", fin=False), close(1000), wire(0, b"b")]),
    ok("7.1.6 large text, then close", text("*" * 60000), expect=[echo("*" * 60000)]),
    Case("7.3.1 close, empty payload", [close(None)], codes=(None, 1000)),
    fail("7.3.2 close, 1-byte payload", wire(Opcode.CLOSE, b"\x03")),
    Case("7.3.4 close 1000 with reason", [close(1000, b"bye")]),
    Case("7.3.5 close 1000 with a 123-byte reason", [close(1000, b"x" * 123)]),
    fail("7.3.6 close with a 124-byte reason", close(1000, b"x" * 124)),
    fail("7.5.1 close reason not UTF-8", close(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc"
                                                   b"\xce\xb5\xed\xa0\x80"), code=1007),
    *[Case(f"7.7 valid close code {c}", [close(c)], codes=(c, 1000))
      for c in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999)],
    *[fail(f"7.9 invalid close code {c}", close(c))
      for c in (0, 999, 1004, 1005, 1006, 1012 + 4, 1100, 2000, 2999, 5000, 65535)],
]


async def run_case(port: int, case: Case) -> list:
    """Send the case's frames on a fresh /echo connection; return what came back.

    Reading runs while we write: a server that fails the connection early resets it when
    more bytes arrive, and what it sent before must already be read by then.
    """
    reader, writer, _ = await handshake.open_raw("127.0.0.1", port, "/echo")

    async def read_all() -> list:
        got = []
        for _ in range(len(case.expect) + 1):  # the expected frames, then the CLOSE
            frame = await frames.read_frame(reader, masked=False, max_size=None)
            if frame.opcode == Opcode.CLOSE:
                code, _ = frames.parse_close(frame.payload)
                got.append(("close", None if code is None else int(code)))
                break
            got.append((frame.opcode, frame.payload))
        # After its CLOSE the server must close the TCP connection (RFC 6455, 7.1.1).
        try:
            got.append(("tcp closed", await reader.read()))
        except ConnectionError:  # a reset (we were still writing) closes it too
            got.append(("tcp closed", b""))
        return got

    reading = asyncio.ensure_future(read_all())
    try:
        data = b"".join(case.send)
        with contextlib.suppress(ConnectionError):
            if case.chop:
                for i in range(len(data)):
                    if reading.done():
                        break
                    writer.write(data[i:i + 1])
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(data)
                await writer.drain()
        try:
            return await asyncio.wait_for(reading, TIMEOUT)
        except TimeoutError:
            return [("timeout", None)]
    finally:
        reading.cancel()
        writer.close()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_conformance(server, case):
    got = await run_case(server.port, case)
    assert len(got) >= 2 and got[-1][0] != "timeout", f"no CLOSE within {TIMEOUT} s: {got}"
    assert got[:-2] == case.expect, f"frames before the CLOSE: {got}"
    assert got[-2][0] == "close" and got[-2][1] in case.codes, f"no CLOSE {case.codes}: {got}"
    assert got[-1][0] == "tcp closed", got


async def test_server_serves_others_while_failing_one(server):
    reader, writer, _ = await handshake.open_raw("127.0.0.1", server.port, "/echo")
    async with WebSocketClient(server.url, "ada") as ada:
        writer.write(wire(5))  # a reserved opcode: that connection fails ...
        assert (await run_case(server.port, ok("ok", text("hi"), expect=[echo("hi")])))[0] \
            == echo("hi")
        await ada.send("still here")  # ... the others carry on
        assert (await ada.receive(timeout=TIMEOUT)).text == "still here"
    frame = await asyncio.wait_for(frames.read_frame(reader, masked=False), TIMEOUT)
    assert frames.parse_close(frame.payload)[0] == CloseCode.PROTOCOL_ERROR
    writer.close()


# -- the chat protocol ------------------------------------------------------------------------


async def chat_frames(reader, count: int) -> list[dict]:
    events = []
    async with asyncio.timeout(TIMEOUT):
        while len(events) < count:  # bounded by the timeout
            frame = await frames.read_frame(reader, masked=False)
            assert frame.opcode == Opcode.TEXT, frames.describe(frames.encode(frame,
                                                                              mask_key=None))
            events.append(json.loads(frame.payload))
    return events


def send_event(writer, event: dict) -> None:
    writer.write(text(json.dumps(event)))


async def test_chat_protocol(server):
    r1, w1, _ = await handshake.open_raw("127.0.0.1", server.port, "/ws")
    send_event(w1, {"type": "hello", "user": "ada", "after": 0})
    assert await chat_frames(r1, 1) == [{"type": "presence", "users": ["ada"]}]
    send_event(w1, {"type": "message", "text": "first", "client_id": "c-1"})
    ack, message = await chat_frames(r1, 2)
    assert ack == {**message, "type": "ack"}  # the ack carries the stored message
    assert message["type"] == "message" and message["text"] == "first" and message["id"] == 1
    assert message["client_id"] == "c-1" and message["user"] == "ada"
    send_event(w1, {"type": "message", "text": "first", "client_id": "c-1"})  # a resend
    assert await chat_frames(r1, 1) == [ack]  # acked with the original, not stored again
    assert len(server.history) == 1

    r2, w2, _ = await handshake.open_raw("127.0.0.1", server.port, "/ws")
    send_event(w2, {"type": "hello", "user": "bob", "after": 0})
    history, presence = await chat_frames(r2, 2)
    assert history == {"type": "message", **server.history[0]}
    assert presence == {"type": "presence", "users": ["ada", "bob"]}
    assert await chat_frames(r1, 1) == [presence]
    send_event(w2, {"type": "typing"})
    assert await chat_frames(r1, 1) == [{"type": "typing", "user": "bob"}]
    send_event(w2, {"type": "nonsense"})
    assert (await chat_frames(r2, 1))[0]["type"] == "error"
    w2.write(b"\x81\x85" + bytes(4) + b"{bad}")  # not JSON: an error, the connection stays
    assert (await chat_frames(r2, 1))[0]["type"] == "error"
    w2.write(close(1000))
    assert await chat_frames(r1, 1) == [{"type": "presence", "users": ["ada"]}]
    for w in (w1, w2):
        w.close()


@pytest.mark.parametrize(("first", "code"), [
    (text(json.dumps({"type": "message", "text": "no hello"})), CloseCode.POLICY_VIOLATION),
    (text(json.dumps({"type": "hello", "user": "x" * 33})), CloseCode.POLICY_VIOLATION),
    (wire(Opcode.BINARY, b"\x00"), CloseCode.UNSUPPORTED_DATA),
])
async def test_chat_refuses_bad_clients(server, first, code):
    reader, writer, _ = await handshake.open_raw("127.0.0.1", server.port, "/ws")
    writer.write(first)
    frame = await asyncio.wait_for(frames.read_frame(reader, masked=False), TIMEOUT)
    assert frame.opcode == Opcode.CLOSE and frames.parse_close(frame.payload)[0] == code
    writer.close()


@pytest.mark.parametrize(("extra", "status"), [
    ({"Sec-WebSocket-Version": "8"}, 426),
    ({"Sec-WebSocket-Key": "too-short"}, 400),
    ({"Upgrade": "h2c"}, 400),
    ({"Origin": "http://evil.example"}, 403),
])
async def test_handshake_refusals(server, raw_http, extra, status):
    request = handshake.build_upgrade_request(f"127.0.0.1:{server.port}", "/ws", extra=extra)
    got, headers, _ = await raw_http(server.port, request)
    assert got == status
    if status == 426:
        assert headers["sec-websocket-version"] == "13"


# -- what a server open to strangers must add (issue 18's findings) ------------------------------


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example:{port}", 403),  # DNS rebinding: the page's Origin is evil.example:PORT too
    ("EVIL.example.:{port}", 403),
    ("localhost.evil.example:{port}", 403),
    ("127.0.0.1:{port}", 101),
    ("localhost:{port}", 101),
    ("chat.localhost:{port}", 101),
    ("[::1]:{port}", 101),
])
async def test_host_allowlist_stops_dns_rebinding(server, host, status):
    host = host.format(port=server.port)
    assert await upgrade_status(server.port, host) == status


async def test_host_allowlist_takes_extra_names():
    server = await handmade.HandmadeServer(names={"hub.example.org"}).start()
    try:
        assert await upgrade_status(server.port, f"hub.example.org:{server.port}") == 101
    finally:
        await server.stop()


async def upgrade_status(port: int, host: str) -> int:
    """The status of an upgrade with this Host, from a page on that origin."""
    request = handshake.build_upgrade_request(host, "/ws", origin=f"http://{host}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        return int(head.split(b" ")[1])
    finally:
        writer.close()


async def hello(port: int, user: str = "ada", after: int = 0):
    """A raw /ws connection that said hello; returns (reader, writer)."""
    reader, writer, _ = await handshake.open_raw("127.0.0.1", port, "/ws")
    send_event(writer, {"type": "hello", "user": user, "after": after})
    return reader, writer


async def test_deeply_nested_json_gets_an_error_not_a_dropped_socket(server):
    reader, writer = await hello(server.port)
    assert (await chat_frames(reader, 1))[0]["type"] == "presence"
    writer.write(text("[" * 60_000))  # deeper than Python's recursion limit
    assert (await chat_frames(reader, 1))[0]["type"] == "error"
    send_event(writer, {"type": "message", "text": "still here", "client_id": "c-1"})
    assert (await chat_frames(reader, 2))[0]["type"] == "ack"
    writer.close()


async def test_a_bug_in_a_handler_closes_1011_for_that_client_only(server, monkeypatch):
    def broken(writer, text):
        raise RuntimeError("a bug")

    reader, writer = await hello(server.port)
    await chat_frames(reader, 1)
    monkeypatch.setattr(server, "on_event", broken)
    writer.write(text("{}"))
    frame = await asyncio.wait_for(frames.read_frame(reader, masked=False), TIMEOUT)
    assert frames.parse_close(frame.payload)[0] == CloseCode.INTERNAL_ERROR
    writer.close()


@pytest.mark.parametrize("nick", ["ada\x00", "ada\nbob", "\u202eadmin", "ad\u200bmin", "   ",
                                  "\x1b[31mred", "x" * 33, 7, "\u3164", "\u2800",
                                  "\u115f\u1160", "ad\uffa0min"])
async def test_nicknames_without_controls_or_invisible_characters(server, nick):
    reader, writer = await hello(server.port, nick)
    frame = await asyncio.wait_for(frames.read_frame(reader, masked=False), TIMEOUT)
    assert frame.opcode == Opcode.CLOSE, frame
    assert frames.parse_close(frame.payload)[0] == CloseCode.POLICY_VIOLATION
    assert not server.users
    writer.close()


async def test_a_nickname_with_spaces_and_accents_is_fine(server):
    reader, writer = await hello(server.port, "Ada Lovelace-Byrön")
    assert await chat_frames(reader, 1) == [{"type": "presence", "users": ["Ada Lovelace-Byrön"]}]
    writer.close()


@pytest.fixture
def quick_timeouts(monkeypatch):
    monkeypatch.setattr(handmade, "READ_TIMEOUT", 1.0, raising=False)
    monkeypatch.setattr(handmade, "PING_INTERVAL", 0.3, raising=False)


async def closed_by_server(reader) -> int | None:
    """Read until the server's CLOSE; its code (then the connection must end)."""
    async with asyncio.timeout(TIMEOUT):
        while True:  # bounded by the timeout
            frame = await frames.read_frame(reader, masked=False)
            if frame.opcode == Opcode.CLOSE:
                code = frames.parse_close(frame.payload)[0]
                assert await reader.read() == b""  # then the server ends TCP
                return code


async def test_a_half_sent_frame_is_closed(quick_timeouts, server):
    reader, writer, _ = await handshake.open_raw("127.0.0.1", server.port, "/echo")
    writer.write(text("hello")[:4])  # a header and two bytes of the mask: then nothing
    assert await closed_by_server(reader) == CloseCode.INTERNAL_ERROR
    writer.close()


async def test_a_silent_client_is_pinged_then_closed(quick_timeouts, server):
    reader, writer, _ = await handshake.open_raw("127.0.0.1", server.port, "/echo")
    frame = await asyncio.wait_for(frames.read_frame(reader, masked=False), TIMEOUT)
    assert frame.opcode == Opcode.PING  # the server asks first ...
    assert await closed_by_server(reader) == CloseCode.INTERNAL_ERROR  # ... then gives up
    writer.close()


async def test_a_client_that_answers_pings_stays(quick_timeouts, server):
    reader, writer, _ = await handshake.open_raw("127.0.0.1", server.port, "/echo")
    pongs = 0
    async with asyncio.timeout(TIMEOUT):
        while pongs < 6:  # 6 pings of 0.3 s: longer than READ_TIMEOUT (1 s)
            frame = await frames.read_frame(reader, masked=False)
            assert frame.opcode == Opcode.PING, frame
            writer.write(wire(Opcode.PONG, frame.payload))
            pongs += 1
    writer.write(text("alive"))
    frame = await asyncio.wait_for(frames.read_frame(reader, masked=False), TIMEOUT)
    assert (frame.opcode, frame.payload) == (Opcode.TEXT, b"alive")
    writer.close()


async def test_presence_is_coalesced(server):
    joins = 300
    connections = []
    try:
        for i in range(joins):
            connections.append(await hello(server.port, f"user{i}"))
        counts = []
        for reader, _ in connections:  # each reads until it sees all 300
            seen = 0
            async with asyncio.timeout(TIMEOUT * 3):
                while True:  # bounded by the timeout
                    event = (await chat_frames(reader, 1))[0]
                    seen += event["type"] == "presence"
                    if event["type"] == "presence" and len(event["users"]) == joins:
                        break
            counts.append(seen)
    finally:
        for _, writer in connections:
            writer.close()
    # One presence per join to everyone: 300 * 301 / 2 = 45,150 frames. Coalesced, the count
    # depends on how long the joins take (at most one update per PRESENCE_DELAY); the bound
    # leaves room for a loaded machine.
    assert sum(counts) < joins * (joins + 1) // 2 // 3, sum(counts)


async def test_a_join_replays_one_page_of_history(server):
    for i in range(1, 1001):
        server.history.append({"id": i, "ts": 0.0, "user": "bot", "text": f"m{i}"})
    reader, writer = await hello(server.port, "fresh", after=0)
    events = await chat_frames(reader, handmade.HISTORY_PAGE + 1)
    ids = [e["id"] for e in events if e["type"] == "message"]
    assert ids == list(range(1001 - handmade.HISTORY_PAGE, 1001))  # the newest page
    assert events[-1]["type"] == "presence"
    reader2, writer2 = await hello(server.port, "back", after=995)  # resuming: the rest
    events = await chat_frames(reader2, 6)
    assert [e.get("id") for e in events[:5]] == [996, 997, 998, 999, 1000]
    reader3, writer3 = await hello(server.port, "away", after=10)  # too far back: said so
    events = await chat_frames(reader3, 2)
    assert events[0] == {"type": "error", "error": "890 older messages are not shown"}
    assert events[1]["id"] == 1001 - handmade.HISTORY_PAGE
    for w in (writer, writer2, writer3):
        w.close()


async def test_a_refused_big_frame_is_read_not_reset(server):
    """The server refuses a 4 MB frame (1009) while the client is still sending it.

    Closed at once, with the rest unread, the socket sends RST; the client's next write
    fails and its stream reports the reset instead of the CLOSE it had received. The frame
    is within LINGER_BYTES, so a lingering server reads all of it and never resets.
    """

    async def one() -> int | None:
        reader, writer, _ = await handshake.open_raw("127.0.0.1", server.port, "/echo")
        try:
            writer.write(text(b"x" * 4_000_000))
            await writer.drain()
            frame = await asyncio.wait_for(frames.read_frame(reader, masked=False), TIMEOUT)
            return frames.parse_close(frame.payload)[0]
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            return type(exc).__name__
        finally:
            writer.close()

    codes = await asyncio.gather(*(one() for _ in range(10)))
    assert codes == [CloseCode.MESSAGE_TOO_BIG] * 10, codes


async def slow_reader(port: int, path: str = "/echo"):
    """A raw WebSocket connection with 4 KiB socket buffers: they fill after a few frames.

    Returns (reader, writer) after the handshake; the caller reads only when it wants to.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # and what we send waits in
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    key = handshake.new_key()
    writer.write(handshake.build_upgrade_request(f"127.0.0.1:{port}", path, key=key))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def session_ended(server) -> bool:
    """Did every connection's handler (session, then linger) end within TIMEOUT?"""
    handlers = set(server._handlers)
    if handlers:
        await asyncio.wait(handlers, timeout=TIMEOUT)
    return all(task.done() for task in handlers)


async def test_a_ping_flood_that_never_reads_is_closed(server, monkeypatch):
    """PINGs from a client that reads nothing: each PONG waits in our buffer, without end.

    read_message answered every PING without looking at the buffer (MAX_UNSENT was checked
    in broadcast only): 39 MB of PINGs left 32 MB of PONGs in the server's memory. Now a PING
    past MAX_UNSENT unsent bytes fails the connection (1008), so the flood hits a wall.
    """
    monkeypatch.setattr(handmade, "MAX_UNSENT", 64 * 1024)
    reader, writer = await slow_reader(server.port)
    batch = b"".join(wire(Opcode.PING, PING125) for _ in range(500))  # 65,500 bytes
    sent = 0
    try:
        async with asyncio.timeout(TIMEOUT * 3):
            while sent < 64 * 1024 * 1024:  # bounded: 64 MiB of PINGs, 1000 times MAX_UNSENT
                writer.write(batch)
                await writer.drain()
                sent += len(batch)
    except (ConnectionError, TimeoutError):
        pass  # reset after the linger, or the server stopped reading: both end the flood
    assert sent < 64 * 1024 * 1024, "the server took 64 MiB of PINGs from a client that never reads"
    assert await session_ended(server), "the flooding connection is still open"
    writer.close()


async def test_a_client_that_never_reads_its_echoes_is_dropped(quick_timeouts, server):
    """The session awaited writer.drain() with no bound: a client that sends and never reads
    held it (a task, a socket, the unsent bytes) for good. Now drain has READ_TIMEOUT too."""
    reader, writer = await slow_reader(server.port)
    for _ in range(64):  # 4 MiB of echoes: far more than the two sockets' buffers hold
        writer.write(text(b"x" * 65536))
    assert await session_ended(server), "a client that never reads is still connected"
    writer.transport.abort()


async def test_a_message_must_end_within_read_timeout(quick_timeouts, server):
    """A first fragment, then only PONGs: the deadline is per message, not per frame."""
    reader, writer, _ = await handshake.open_raw("127.0.0.1", server.port, "/echo")
    writer.write(text("never finished", fin=False))
    code = None
    async with asyncio.timeout(TIMEOUT):
        while code is None:  # bounded by the timeout; PINGs come every 0.3 s
            frame = await frames.read_frame(reader, masked=False)
            if frame.opcode == Opcode.PING:
                writer.write(wire(Opcode.PONG, frame.payload))
            else:
                assert frame.opcode == Opcode.CLOSE, frame
                code = frames.parse_close(frame.payload)[0]
    assert code == CloseCode.INTERNAL_ERROR
    writer.close()


@pytest.mark.parametrize(("request_head", "status"), [
    (b"GET /ws HTTP/1.1\r\nHost: [::1\r\n", 403),  # urlsplit raised ValueError: no answer
    (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://[\r\n", 403),
    (b"GET //[x HTTP/1.1\r\nHost: 127.0.0.1\r\n", 404),
    (b"GET //evil.example/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n", 404),  # urlsplit: path "/ws"
])
async def test_odd_targets_and_hosts_get_an_answer(server, raw_http, request_head, status):
    key = handshake.new_key()
    upgrade = (f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    got, _, _ = await raw_http(server.port, request_head + upgrade)
    assert got == status


@pytest.mark.parametrize("header", [
    "X-Odd: a\rb",  # a bare CR
    "X-Odd: a\nb",  # a bare LF
    "X-Odd: a\x00b",
    "X Odd: a",  # a field name is a token: no space
    "Host: 127.0.0.1",  # a second Host: which one is real?
    "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==",  # a second key
])
async def test_malformed_header_lines_get_400(server, raw_http, header):
    request = handshake.build_upgrade_request(f"127.0.0.1:{server.port}", "/ws")
    request = request[:-2] + header.encode("latin-1") + b"\r\n\r\n"
    assert (await raw_http(server.port, request))[0] == 400


async def test_an_oversized_head_gets_431_not_a_reset(server):
    """The 400 for a head over MAX_HEAD was closed with the rest unread: a reset, 3 times
    out of 3. Now it is 431 (RFC 6585, 5) and the server lingers after every HTTP answer."""

    async def one() -> bytes | str:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nX-Big: " + b"x" * 200_000)
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), TIMEOUT)).split(b"\r\n")[0]
        except ConnectionError as exc:
            return type(exc).__name__
        finally:
            writer.close()

    got = await asyncio.gather(*(one() for _ in range(3)))
    assert got == [b"HTTP/1.1 431 Request Header Fields Too Large"] * 3, got


async def test_426_says_what_to_upgrade_to(server, raw_http):
    request = handshake.build_upgrade_request(f"127.0.0.1:{server.port}", "/ws",
                                              extra={"Sec-WebSocket-Version": "8"})
    status, headers, _ = await raw_http(server.port, request)
    assert status == 426 and headers["upgrade"] == "websocket"  # RFC 9110, 15.5.22
    assert "upgrade" in headers["connection"].lower()  # RFC 9110, 7.8


async def test_upgrade_is_a_list(server, raw_http):
    request = handshake.build_upgrade_request(f"127.0.0.1:{server.port}", "/ws",
                                              extra={"Upgrade": "websocket, foo"})
    assert (await raw_http(server.port, request))[0] == 101


async def test_head_and_other_methods_on_the_page(server, raw_http):
    status, headers, body = await raw_http(
        server.port, b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", head_only=True)
    assert status == 200 and int(headers["content-length"]) > 0  # the GET's length, no body
    status, headers, _ = await raw_http(server.port, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Content-Length: 0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"


async def test_stop_lets_a_busy_client_read_its_close(server):
    """A client in the middle of sending when the server stops must still read CLOSE 1001.

    stop() wrote the 1001 and closed at once: the server stopped reading, the client's
    frames stayed unread, and the client, waiting for its own writes to drain, got a reset
    or waited for good. Now stop() ends the session and its handler lingers: it reads and
    discards what the client still sends, so the client's writes drain and it reads the
    1001 behind the echoes it is owed.
    """
    reader, writer = await slow_reader(server.port)
    for _ in range(32):  # 2 MiB of echoes: more than the 4 KiB socket buffers take at once
        writer.write(text(b"x" * 65536))
    stopping = asyncio.ensure_future(server.stop())
    code = None
    try:
        await asyncio.wait_for(writer.drain(), TIMEOUT)  # as a client's send() does
        async with asyncio.timeout(TIMEOUT):
            while code is None:  # bounded by the timeout: the echoes, then the CLOSE
                frame = await frames.read_frame(reader, masked=False, max_size=None)
                if frame.opcode == Opcode.CLOSE:
                    code = frames.parse_close(frame.payload)[0]
    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
        code = type(exc).__name__
    finally:
        writer.transport.abort()
        await stopping
    assert code == CloseCode.GOING_AWAY


async def test_serves_the_chat_page(server, http):
    for path, kind in (("", "text/html"), ("static/app.js", "text/javascript"),
                       ("static/style.css", "text/css")):
        response = await http.get(server.url + path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    assert (await http.get(server.url + "static/../../etc/passwd")).status_code == 404


# -- the real chat page in Chromium ------------------------------------------------------------


@needs_chromium()
async def test_chat_page_in_chromium(server):
    from playwright.async_api import async_playwright, expect

    errors: list[str] = []
    async with async_playwright() as p, WebSocketClient(server.url, "python") as python:
        browser = await launch(p)
        try:
            pages = {}
            for user, transport in (("alice", "ws"), ("bob", "auto")):
                page = await browser.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(f"{server.url}?user={user}&transport={transport}")
                await expect(page.locator("#status")).to_have_attribute(
                    "data-state", "connected", timeout=15_000)
                await expect(page.locator("#transport")).to_have_text("ws")
                pages[user] = page

            async def say(page, words):
                await page.fill("#message-input", words)
                await page.press("#message-input", "Enter")

            def shown(page, words):
                return page.locator("#messages li.message .text", has_text=words)

            await say(pages["alice"], "hi from alice <b>bold?</b>")
            await expect(shown(pages["bob"], "hi from alice <b>bold?</b>")).to_have_count(
                1, timeout=15_000)
            await python.send("python was here")
            for page in pages.values():
                await expect(shown(page, "python was here")).to_have_count(1, timeout=15_000)
            got = await python.receive_many(2, timeout=TIMEOUT)
            assert [(m.user, m.text) for m in got] == [
                ("alice", "hi from alice <b>bold?</b>"), ("python", "python was here")]
            await expect(pages["alice"].locator("#presence li")).to_have_count(3,
                                                                               timeout=15_000)
            # A page opened later gets the history.
            late = await browser.new_page()
            await late.goto(f"{server.url}?user=carol&transport=ws")
            await expect(late.locator("#messages li.message")).to_have_count(2, timeout=15_000)
        finally:
            await browser.close()
    assert not errors, errors


# -- the notebook teaches this very code ---------------------------------------------------------


def definitions(tree: ast.Module) -> dict[str, str]:
    """Top-level functions, classes and constants, as comparable syntax-tree dumps."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found[node.name] = ast.dump(node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.isupper():
                    found[target.id] = ast.dump(node.value)
    return found


def test_notebook_solutions_are_this_module():
    notebook = json.loads(NOTEBOOK.read_text())
    source = "\n".join("".join(cell["source"]) for cell in notebook["cells"]
                       if cell["cell_type"] == "code"
                       and {"solution", "handmade"} & set(cell["metadata"].get("tags", [])))
    in_notebook = definitions(ast.parse(source))
    in_module = definitions(ast.parse(Path(handmade.__file__).read_text()))
    in_module.pop("__all__", None)
    missing = sorted(set(in_module) - set(in_notebook))
    assert not missing, f"the notebook does not define {missing}"
    different = [name for name in in_module if in_module[name] != in_notebook[name]]
    assert not different, f"the notebook's {different} differ from chatlib/handmade.py"
