"""WebSocket fuzz: 5,000 cases after a valid handshake, each must end as RFC 6455 says.

wscases.py generates the frames (unmasked, RSV bits, reserved opcodes, fragmented or
oversized control frames, invalid UTF-8, bad close codes, continuation without a start,
interleaved fragments, huge lengths, random bytes, JSON-level nonsense) and its oracle says
which close code each must get (or that the connection stays open, with error frames).
A bystander pair chats meanwhile and must lose and duplicate nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import struct
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from torturekit import SEED
from wscases import CLOSE, PONG, TEXT, close_frame, complete, frame, text
from wscases import case as ws_case

from chatlib import frames

CASES = int(os.environ.get("TORTURE_WS_CASES", "5000"))
CONCURRENCY = 24
DEADLINE = 30.0
"""Longest one case may take on a loaded machine; a healthy server needs milliseconds."""


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return head[0] & 0x0F, await reader.readexactly(n)


async def run_case(port: int, family: str, hello: bool, stream: bytes, after: int):
    """Returns ``(ok, detail)``."""
    stream, outcome = complete(stream, hello=hello)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            return False, f"handshake: {head[:80]!r}"
        if hello:
            writer.write(text({"type": "hello", "user": "wsfuzz", "after": after}))
        writer.write(stream)
        errors, pongs, sent_close = 0, [], False
        expected = set(outcome.close)
        if not expected:  # stays open: then our close is echoed (or breaks a fragmented one)
            expected = {1002} if outcome.fragmented else {1000}
        while True:  # bounded by the caller's deadline and the server's close
            if not outcome.close and not sent_close and errors >= outcome.errors \
                    and len(pongs) >= len(outcome.pongs):
                writer.write(close_frame(1000))
                sent_close = True
            try:
                opcode, payload = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionResetError):
                return False, f"no close frame (expected {sorted(expected, key=str)})"
            if opcode == TEXT and json.loads(payload).get("type") == "error":
                errors += 1
            elif opcode == PONG:
                pongs.append(payload)
            elif opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if payload else None
                if code not in expected:
                    return False, f"close {code}, expected {sorted(expected, key=str)}"
                if pongs[:len(outcome.pongs)] != outcome.pongs:
                    return False, f"pongs {pongs} != {outcome.pongs}"
                if not outcome.close and errors < outcome.errors:  # (a close may overtake them)
                    return False, f"{errors} error frames, expected {outcome.errors}"
                return True, f"close {code}"
    finally:
        writer.transport.abort()


async def test_websocket_fuzz(spawn, bystander, figures):
    server = await spawn(limits={"admit_rate": 0})  # frames, not admissions: 5,000 sessions
    rng = random.Random(SEED)
    cases = [ws_case(rng) for _ in range(CASES)]
    results: Counter[str] = Counter()
    families: Counter[str] = Counter()
    failures: list = []
    queue = iter(cases)
    async with bystander(server.ws_url, name="ws-bystander") as pair:

        async def worker() -> None:
            for family, hello, stream in queue:  # bounded: CASES shared by the workers
                after = max(pair.ids["a"] + pair.ids["b"] or [0])
                try:
                    async with asyncio.timeout(DEADLINE):
                        ok, detail = await run_case(server.port, family, hello, stream, after)
                except TimeoutError:
                    ok, detail = False, "hang"
                families[family] += 1
                results[detail if ok else "FAILED"] += 1
                if not ok:
                    failures.append((family, hello, detail, stream[:60].hex()))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        report = await pair.finish()
    figures("WebSocket fuzz", cases=CASES, outcomes=dict(results.most_common()),
            families=len(families), failures=len(failures), bystander=report,
            server_cpu_s=round(server.cpu_seconds(), 1),
            server_rss_mib=round(server.rss_kib() / 1024))
    assert server.alive, server.stderr_tail()
    assert not failures, (len(failures), Counter(f[0] for f in failures), failures[:10])
    assert report["lost"] == report["duplicated"] == report["out_of_order"] == 0, report
    assert report["errors"] == 0, pair.errors[:5]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(opcode=st.sampled_from([0, 1, 2, 8, 9, 10]), fin=st.booleans(),
       rsv=st.integers(0, 7), key=st.one_of(st.none(), st.binary(min_size=4, max_size=4)),
       payload=st.one_of(st.binary(max_size=200),
                         st.sampled_from([125, 126, 65535, 65536]).map(bytes)))
def test_fuzzer_frames_match_the_teaching_codec(opcode, fin, rsv, key, payload):
    """The fuzzer's frame builder writes the same bytes as chatlib.frames for any frame both
    can write, so the cases above are the frames they claim to be."""
    expected = frames.encode(frames.Frame(opcode, payload, fin, bool(rsv & 4), bool(rsv & 2),
                                          bool(rsv & 1)), mask_key=key, check=False)
    assert frame(opcode, payload, fin=fin, rsv=rsv, masked=key is not None,
                 key=key) == expected
