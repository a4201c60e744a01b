"""The real Autobahn|Testsuite cases against both WebSocket servers of the course.

`kosoku <https://pypi.org/project/kosoku/>`_ runs Autobahn|Testsuite's own case files (a
native fuzzing client; Autobahn's runner needs Python 2) against:

* ``handmade``: chapter 10's reference server (chatlib/handmade.py), its ``/echo`` endpoint;
* ``chatlib``: chatlib's WebSocket stack exactly as :class:`chatlib.ChatServer` configures
  uvicorn (``BoundedWebSocketProtocol`` over websockets' sans-I/O protocol, ``max_frame``,
  pings, compression setting), with a test-only echo ASGI app in place of the chat app.

The cases (:data:`CASES`): sections 1-7 and 10 whole; from section 9 (limits and
performance) only what fits chatlib's 64 KiB message limit (9.1.1 and 9.2.1: 64 KiB in one
frame; 9.7 and 9.8: 1000 small messages one after another) and four over-limit cases that
must be refused with 1009 (256 KiB in one frame, text and binary; 4 MiB in 64-byte
fragments; 1 MiB in 64-byte chops). Sections 12-13 (permessage-deflate) run only if the
production server negotiates compression, which it does not (``ChatServer.compression`` is
off by default). The whole run takes a few seconds per server.

Each server's outcome must equal :data:`EXPECTED`: every case not listed there is ``OK`` /
``OK``; every listed case carries the suite's verdict and the reason for it. A case that
regresses, or one that improves (its explanation would be stale), fails the test. The
suite's own report (index.json / index.html and one file per case, kosoku's writer of
Autobahn's format) goes to tests/artifacts/autobahn/<server>/, with summary.json (the
counts and the run time).
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

kosoku = pytest.importorskip("kosoku")
from kosoku._report import write_reports  # noqa: E402 (kosoku's writer of Autobahn's report)

import chatlib.server  # noqa: E402
from chatlib import handmade  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts" / "autobahn"
CONCURRENCY = 8  # cases in parallel: several wait 1-2 s on purpose (6.4.x)

OVER_LIMIT = ["9.1.2", "9.2.2", "9.3.1", "9.5.1"]
CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.1.1", "9.2.1", "9.7.*", "9.8.*",
         *OVER_LIMIT, "10.*"]
COMPRESSION_CASES = ["12.*", "13.*"]

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Expected:
    """The suite's verdict for a case (behavior, closing behavior), and why it is right.

    ``behavior`` may name several verdicts where the outcome depends on timing (the reason
    says why); any other verdict fails the test.
    """

    behavior: str | tuple[str, ...]
    close: str
    why: str
    code: int | None = None  # the close code we must have sent, when it matters


def over_limit(size: str) -> Expected:
    return Expected("FAILED", "FAILED", f"{size}, over the 64 KiB message limit: refused with "
                    "1009 by design (Autobahn expects an echo of any size).", code=1009)


LIMITS = {"9.1.2": over_limit("256 KiB text in one frame"),
          "9.2.2": over_limit("256 KiB binary in one frame"),
          "9.3.1": over_limit("4 MiB text in 64-byte fragments"),
          "9.5.1": over_limit("1 MiB text in one frame, sent in 64-byte chops")}
SPEC_UNDEFINED = {
    "7.1.6": Expected("INFORMATIONAL", "INFORMATIONAL", "256 KiB, then a small text, then "
                      "CLOSE: over the 64 KiB limit, so we close with 1009 (the case is "
                      "informational: it only records the order).", code=1009),
    "7.13.1": Expected("INFORMATIONAL", "INFORMATIONAL", "CLOSE with code 5000: RFC 6455 "
                       "defines no such code; we answer 1002 (the case is informational)."),
    "7.13.2": Expected("INFORMATIONAL", "INFORMATIONAL", "CLOSE with code 65535: as 7.13.1."),
}
HANDMADE_CHOPS = ("Fail fast inside one frame: the invalid UTF-8 arrives in the second of three "
                  "chops of ONE frame, a second apart. chatlib.frames.read_frame returns a "
                  "frame only when all of it is in, so the decoder sees the bytes at the end "
                  "(1007 then). Non-strict, as RFC 6455 8.1 allows; frames are checked one by "
                  "one, so 6.4.1-6.4.2 (separate frames) pass strictly.")
CHATLIB_EARLY_FAIL = ("A valid message, then a bad frame: when both are in the same read, "
                      "websockets' parser fails the connection at the bad frame before "
                      "uvicorn hands the valid message to the app, so its echo never comes "
                      "(NON-STRICT; websockets' compliance notes list the same cases). When "
                      "the bytes arrive in separate reads (these cases send them in one chop, "
                      "frame by frame or byte by byte) the echo can go out first: OK. Which "
                      "one depends on timing, so both are accepted.")
CHATLIB_DECODE_AT_END = ("uvicorn's websockets-sansio protocol joins the fragments and decodes "
                         "the text once the last one arrives (send_receive_event_to_app), so "
                         "invalid UTF-8 is refused at the end of the message, not at the "
                         "first bad byte. Non-strict: RFC 6455 8.1 allows either.")

EXPECTED: dict[str, dict[str, Expected]] = {
    "handmade": {
        **LIMITS, **SPEC_UNDEFINED,
        "6.4.3": Expected("NON-STRICT", "OK", HANDMADE_CHOPS, code=1007),
        "6.4.4": Expected("NON-STRICT", "OK", HANDMADE_CHOPS, code=1007),
    },
    "chatlib": {
        **LIMITS, **SPEC_UNDEFINED,
        **{case: Expected(("NON-STRICT", "OK"), "OK", CHATLIB_EARLY_FAIL, code=1002)
           for case in ("3.2", "3.3", "3.4", "4.1.3", "4.1.4", "4.1.5", "4.2.3", "4.2.4",
                        "4.2.5", "5.15")},
        **{case: Expected("NON-STRICT", "OK", CHATLIB_DECODE_AT_END, code=1007)
           for case in ("6.4.1", "6.4.2", "6.4.3", "6.4.4")},
        "7.1.5": Expected("FAILED", "WRONG CODE", "A CLOSE between two fragments of a message: "
                          "RFC 6455 5.4 allows control frames there, and Autobahn expects "
                          "1000 back; websockets (protocol.py, recv_frame) treats it as "
                          "'incomplete fragmented message' and closes with 1002. A choice of "
                          "the websockets library, harmless for the chat: the client was "
                          "leaving anyway, and learns why.", code=1002),
    },
}


async def echo_app(scope, receive, send):
    """A WebSocket that sends every message back (Autobahn's cases need an echo)."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:  # ends when the client disconnects
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        if event.get("text") is not None:
            await send({"type": "websocket.send", "text": event["text"]})
        else:
            await send({"type": "websocket.send", "bytes": event["bytes"]})


async def run_suite(name: str, url: str, cases: list[str]) -> list:
    """Run ``cases`` against ``url``; save the suite's report; return the results."""
    started = time.perf_counter()
    try:
        results = await kosoku.run_fuzzingclient(url, cases=cases, concurrency=CONCURRENCY)
    except kosoku.FailureError as failure:  # some case FAILED: the comparison below decides
        results = failure.results
    seconds = time.perf_counter() - started
    outdir = ARTIFACTS / name
    shutil.rmtree(outdir, ignore_errors=True)  # no case files left from an older run
    write_reports(results, str(outdir))
    counts = collections.Counter(r.behavior.value for r in results)
    summary = {"server": name, "url": url, "cases": len(results), "seconds": round(seconds, 1),
               "behavior": dict(sorted(counts.items()))}
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nAutobahn {name}: {summary}")
    return results


def differences(results, expected: dict[str, Expected]) -> list[str]:
    """Every case whose verdict (or close code, where it matters) is not the expected one."""
    seen, wrong = set(), []
    for r in results:
        seen.add(r.case_id)
        want = expected.get(r.case_id, Expected("OK", "OK", ""))
        allowed = want.behavior if isinstance(want.behavior, tuple) else (want.behavior,)
        got = (r.behavior.value, r.behavior_close.value)
        if got[0] not in allowed or got[1] != want.close or (
                want.code is not None and r.remote_close_code != want.code):
            wrong.append(f"{r.case_id}: got {got} close {r.remote_close_code} ({r.result} / "
                         f"{r.result_close}); expected {(allowed, want.close)} close "
                         f"{want.code}: {want.why or 'a pass'}")
    wrong += [f"{case}: expected but not run" for case in sorted(set(expected) - seen)]
    return wrong


@pytest.fixture
async def handmade_url():
    server = await handmade.HandmadeServer().start()
    try:
        yield f"ws://127.0.0.1:{server.port}/echo"
    finally:
        await server.stop()


@pytest.fixture
async def chatlib_url(monkeypatch):
    """chatlib's uvicorn configuration as ChatServer.start builds it, serving echo_app."""
    monkeypatch.setattr(chatlib.server, "create_app", lambda hub, *config: echo_app)
    server = await chatlib.server.ChatServer().start()
    monkeypatch.undo()
    try:
        yield server.ws_url, server.compression
    finally:
        await server.stop()


async def test_handmade_server(handmade_url):
    results = await run_suite("handmade", handmade_url, CASES)
    assert len(results) > 250  # the globs matched the suite's cases
    wrong = differences(results, EXPECTED["handmade"])
    assert not wrong, "\n".join(wrong)


async def test_chatlib_stack(chatlib_url):
    url, compression = chatlib_url
    results = await run_suite("chatlib", url, CASES + (COMPRESSION_CASES if compression else []))
    assert len(results) > 250
    wrong = differences(results, EXPECTED["chatlib"])
    assert not wrong, "\n".join(wrong)


async def test_a_regression_is_caught(handmade_url, monkeypatch):
    """The comparison is not vacuous: a server that decodes text only at the end of a message
    turns 6.4.1 and 6.4.2 into NON-STRICT, and the test names them."""
    real = handmade.read_message

    async def decode_at_end(reader, writer):
        opcode, payload = await real(reader, writer)  # with a decoder that accepts anything
        if opcode == handmade.Opcode.TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise handmade.ProtocolError("text is not UTF-8", 1007) from None
        return opcode, payload

    monkeypatch.setattr(handmade, "read_message", decode_at_end)
    monkeypatch.setattr(handmade, "codecs", SimpleNamespace(
        getincrementaldecoder=lambda encoding: LenientDecoder))
    results = await asyncio.wait_for(
        kosoku.run_fuzzingclient(handmade_url, cases=["6.4.1", "6.4.2"], concurrency=2), 60)
    assert not {"6.4.1", "6.4.2"} & set(EXPECTED["handmade"])  # both must pass strictly ...
    wrong = differences(results, {})
    assert [line.split(":")[0] for line in wrong] == ["6.4.1", "6.4.2"], wrong  # ... and don't


class LenientDecoder:
    """An incremental decoder that accepts everything (the regression above)."""

    def __init__(self, errors: str = "strict") -> None:
        pass

    def decode(self, data: bytes, final: bool = False) -> str:
        return ""
