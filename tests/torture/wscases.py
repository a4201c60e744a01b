"""Generated WebSocket frames for the fuzzer, and the oracle that says how each must end.

A case is bytes sent after a valid opening handshake (and, for most, a valid hello). The
oracle (:func:`expect`) reads those bytes as the server must (RFC 6455 sections 5 and 7,
in the order the ``websockets`` library checks them, since that order decides which code
wins when one frame breaks two rules) and returns either the close code(s) the server must
send, or that the connection stays open (and how many error frames must come first).

Close codes (RFC 6455 section 7.4.1): 1002 protocol error (unmasked client frame, RSV bit
without an extension, reserved opcode, fragmented or >125-byte control frame, continuation
without a start, a new message inside a fragmented one, a close code that may not be sent,
a 1-byte close payload); 1007 text that is not UTF-8 (message or close reason); 1009 a
message over the server's limit (``Limits.max_frame``); 1008 the chat's own policy (the
first message is not a valid hello). A valid close is echoed with its own code.
"""

from __future__ import annotations

import json
import os
import random
import struct
from dataclasses import dataclass, field

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
MAX_SIZE = 64 * 1024  # chatlib.Limits().max_frame, the server's ws_max_size
SENDABLE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
"""Close codes a peer may send (RFC 6455 7.4.1-7.4.2, IANA registry; websockets' list)."""
BAD_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
GOOD_CODES = sorted(SENDABLE) + [3000, 3999, 4000, 4999]


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          masked: bool = True, length: int | None = None, key: bytes | None = None) -> bytes:
    """One frame as a client sends it; ``length`` overrides the declared payload length.

    Unlike ``chatlib.frames.encode`` this also writes what no codec should: reserved
    opcodes and lengths that do not match the payload (test_torture_ws checks that the
    two agree on every frame both can write).
    """
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = key or os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_frame(code: int | None = 1000, reason: bytes = b"") -> bytes:
    return frame(CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


def text(obj) -> bytes:
    return frame(TEXT, (obj if isinstance(obj, str) else json.dumps(obj)).encode())


@dataclass
class Outcome:
    close: frozenset = frozenset()
    """Close codes the server may answer with (None: an empty close payload); empty when the
    connection stays open."""
    errors: int = 0
    """Error frames the chat must send (for messages that are certainly invalid)."""
    pongs: list[bytes] = field(default_factory=list)
    fragmented: bool = False
    """Open, in the middle of a fragmented message (a close now is a protocol error)."""
    needed: int = 0
    """Bytes missing to complete the last frame (random bytes are padded with zeros)."""


def _certain_error(opcode: int, data: bytes) -> bool:
    """Would the chat answer this complete message with an error frame, whatever its limits?"""
    if opcode == BINARY:
        return True
    try:
        obj = json.loads(data.decode())
    except (ValueError, RecursionError):
        return True
    return not isinstance(obj, dict) or obj.get("type") not in ("message", "typing")


def _valid_hello(opcode: int, data: bytes) -> bool:
    try:
        obj = json.loads(data.decode())
    except (ValueError, RecursionError):
        return False
    return (opcode == TEXT and isinstance(obj, dict) and obj.get("type") == "hello"
            and isinstance(obj.get("user"), str) and obj["user"].isalnum()
            and len(obj["user"]) <= 32 and type(obj.get("after", 0)) is int)


def expect(stream: bytes, *, hello: bool) -> Outcome:
    """How the server must end (or continue) after reading ``stream`` (see module doc)."""
    pos, current, message, errors, pongs = 0, None, [], 0, []
    later = set()  # a 1007 found earlier may lose to a protocol error in the same read
    errors_at_1007 = 0

    def done(*codes) -> Outcome:
        return Outcome(frozenset(codes) | later, errors, pongs)

    while pos < len(stream):  # bounded: every round consumes a frame or returns
        if len(stream) - pos < 2:
            return Outcome(needed=2 - (len(stream) - pos))
        h1, h2 = stream[pos], stream[pos + 1]
        fin, rsv, opcode = bool(h1 & 0x80), (h1 >> 4) & 7, h1 & 0x0F
        if opcode not in (CONT, TEXT, BINARY, CLOSE, PING, PONG):
            return done(1002)
        if not h2 & 0x80:
            return done(1002)
        length, head = h2 & 0x7F, 2
        if length == 126:
            if len(stream) - pos < 4:
                return Outcome(needed=4 - (len(stream) - pos))
            length, head = struct.unpack("!H", stream[pos + 2:pos + 4])[0], 4
        elif length == 127:
            if len(stream) - pos < 10:
                return Outcome(needed=10 - (len(stream) - pos))
            length, head = struct.unpack("!Q", stream[pos + 2:pos + 10])[0], 10
        if length > (MAX_SIZE if current is None else MAX_SIZE - current):
            return done(1009)
        end = pos + head + 4 + length
        if end > len(stream):
            return Outcome(needed=end - len(stream))
        key = stream[pos + head:pos + head + 4]
        data = bytes(b ^ key[i % 4] for i, b in enumerate(stream[pos + head + 4:end]))
        pos = end
        if rsv:
            return done(1002)
        if opcode >= CLOSE and (length > 125 or not fin):
            return done(1002)
        if opcode in (TEXT, BINARY):
            if current is not None:
                return done(1002)
            message = [opcode, data]
            if not fin:
                current = len(data)
                continue
        elif opcode == CONT:
            if current is None:
                return done(1002)
            message[1] += data
            if not fin:
                current += len(data)
                continue
            current = None
        elif opcode == PING:
            pongs.append(data)
            continue
        elif opcode == PONG:
            continue
        else:  # CLOSE
            if len(data) == 1:
                return done(1002)
            if len(data) >= 2:
                try:
                    data[2:].decode()
                except UnicodeDecodeError:
                    return done(1007)
                code = struct.unpack("!H", data[:2])[0]
                if code not in SENDABLE and not 3000 <= code < 5000:
                    return done(1002)
            if current is not None:
                return done(1002)
            return done(struct.unpack("!H", data[:2])[0] if data else None)
        # a complete data message
        kind, payload = message
        if kind == TEXT:
            try:
                payload.decode()
            except UnicodeDecodeError:
                if later:
                    continue
                later = {1007}
                errors_at_1007 = errors
                continue
        if later:
            continue  # the server stops at the 1007; what follows only matters if it errs
        if not hello:
            if _valid_hello(kind, payload):
                hello = True
                continue
            return done(1008)
        errors += _certain_error(kind, payload)
    if later:
        errors = errors_at_1007
        return Outcome(frozenset(later), errors, pongs)
    return Outcome(errors=errors, pongs=pongs, fragmented=current is not None)


def _utf8_bad(rng: random.Random) -> bytes:
    return rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                       b"\xc0\xaf", b"\x80", b"ok\xfe", b"\xf0\x9f\x98"])


NONSENSE = ['{"type":"nonsense"}', "[]", "null", '"hello"', "{", '{"type":1}', "1e999",
            '{"type":"message","text":' + "[" * 3000, '{"type":["message"]}', "",
            '{"type":"hello","user":"again"}', '{"type":"message","text":"hi"}',
            '{"type":"typing"}', '{"type":"message","text":"\\ud800"}',
            '{"type":"message","text":""}', '{"type":"message","text":' + '"x' * 1 + 'x"}',
            '{"type":"message","text":"' + "y" * 3000 + '"}', '{"type":"message"}']
BAD_HELLOS = [b"not json", b"[]", b'{"type":"message","text":"hi"}', b'{"user":"x"}',
              b'{"type":"hello"}', b'{"type":"hello","user":""}',
              b'{"type":"hello","user":"' + b"u" * 100 + b'"}',
              b'{"type":"hello","user":"x","after":"5"}',
              b'{"type":"hello","user":"x","after":1.5}',
              b'{"type":"hello","user":"a\\u0000b"}', b'{"type":"hello","user":5}']


def case(rng: random.Random) -> tuple[str, bool, bytes]:
    """``(family, send_hello_first, bytes)``: one fuzz case."""
    kind = rng.randrange(20)
    data = rng.randbytes(rng.randrange(0, 40))
    if kind == 0:
        op = rng.choice([TEXT, BINARY, PING, CLOSE, CONT])
        return "unmasked", rng.random() < 0.5, frame(op, data[:10], masked=False)
    if kind == 1:
        op = rng.choice([TEXT, BINARY, PING])
        return "rsv", rng.random() < 0.5, frame(op, data, rsv=rng.randrange(1, 8))
    if kind == 2:
        op = rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
        return "reserved-opcode", rng.random() < 0.5, frame(op, data)
    if kind == 3:
        op = rng.choice([PING, PONG, CLOSE])
        return "fragmented-control", rng.random() < 0.5, frame(op, data, fin=False)
    if kind == 4:
        op = rng.choice([PING, PONG, CLOSE])
        return "big-control", rng.random() < 0.5, frame(op, rng.randbytes(rng.randrange(126, 300)))
    if kind == 5:
        bad = b"hi " + _utf8_bad(rng)
        if rng.random() < 0.5:
            return "bad-utf8", rng.random() < 0.5, frame(TEXT, bad)
        cut = rng.randrange(1, len(bad))
        return "bad-utf8-fragmented", True, (frame(TEXT, bad[:cut], fin=False)
                                             + frame(PING, b"p") + frame(CONT, bad[cut:]))
    if kind == 6:
        return "bad-utf8-close", rng.random() < 0.5, close_frame(1000, _utf8_bad(rng))
    if kind == 7:
        if rng.random() < 0.2:
            return "close-1-byte", rng.random() < 0.5, frame(CLOSE, b"\x03")
        return "bad-close-code", rng.random() < 0.5, close_frame(rng.choice(BAD_CODES))
    if kind == 8:
        code = rng.choice(GOOD_CODES + [None])
        return "good-close", rng.random() < 0.5, close_frame(code, b"bye" if code else b"")
    if kind == 9:
        return "orphan-continuation", True, frame(CONT, data, fin=rng.random() < 0.5)
    if kind == 10:
        first = frame(TEXT, b'{"type":', fin=False)
        second = rng.choice([frame(TEXT, b"x"), frame(BINARY, b"x"), frame(TEXT, b"x", fin=False),
                             close_frame(1000)])
        return "interleaved", True, first + second
    if kind == 11:
        length = rng.choice([MAX_SIZE + 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 10**12])
        op = rng.choice([TEXT, BINARY, CONT])
        return "huge-length", rng.random() < 0.5, frame(op, b"", length=length)[:14]
    if kind == 12:
        if rng.random() < 0.5:
            return "too-big", True, frame(BINARY, rng.randbytes(MAX_SIZE + rng.randrange(1, 5000)))
        half = rng.randbytes(40_000)
        return "too-big-fragmented", True, frame(TEXT, half, fin=False) + frame(CONT, half)
    if kind == 13:
        pings = [frame(PING, rng.randbytes(rng.randrange(0, 126)))
                 for _ in range(rng.randrange(1, 4))]
        return "ping", rng.random() < 0.5, b"".join(pings)
    if kind == 14:
        parts = rng.randrange(2, 5)
        body = json.dumps({"type": "typing"}).encode()
        step = max(1, len(body) // parts)
        chunks = [body[i:i + step] for i in range(0, len(body), step)]
        out = frame(TEXT, chunks[0], fin=len(chunks) == 1)
        for i, chunk in enumerate(chunks[1:], 1):
            out += frame(PING, b"mid") + frame(CONT, chunk, fin=i == len(chunks) - 1)
        return "fragmented-ok", True, out
    if kind == 15:
        msgs = [rng.choice(NONSENSE) for _ in range(rng.randrange(1, 5))]
        out = b"".join(text(m) for m in msgs)
        if rng.random() < 0.3:
            out += frame(BINARY, data)
        return "json-nonsense", True, out
    if kind == 16:
        if rng.random() < 0.25:
            return "hello-binary", False, frame(BINARY, b'{"type":"hello","user":"x"}')
        return "bad-hello", False, frame(TEXT, rng.choice(BAD_HELLOS))
    if kind == 17:
        frames = []
        for _ in range(rng.randrange(1, 5)):
            op = rng.choice([CONT, TEXT, BINARY, CLOSE, PING, PONG, 3, 11])
            payload = rng.randbytes(rng.choice([0, 1, 2, 5, 20, 126, 200]))
            frames.append(frame(op, payload, fin=rng.random() < 0.7,
                                rsv=rng.choice([0, 0, 0, 0, 1, 4]),
                                masked=rng.random() < 0.9))
        return "random-frames", True, b"".join(frames)
    if kind == 18:
        junk = rng.randbytes(rng.randrange(1, 200))
        return "random-bytes", True, junk
    return "truncated-then-valid", True, frame(TEXT, b'{"type":"typing"}')[:rng.randrange(2, 6)]


def complete(stream: bytes, *, hello: bool) -> tuple[bytes, Outcome]:
    """Pad ``stream`` with zeros until its last frame is complete; its outcome."""
    for _ in range(20):  # each round completes one more frame header or payload
        outcome = expect(stream, hello=hello)
        if not outcome.needed:
            return stream, outcome
        stream += bytes(outcome.needed)
    raise AssertionError("could not complete the stream")
