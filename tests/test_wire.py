"""chatlib.wire: the SSE parser against the WHATWG rules, and encodings that no parser can
split in the wrong place (issue 6, defect 1). Unit tests; no sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatlib import Limits, MemoryLog, Message, wire
from chatlib.hub import Hub
from chatlib.outbox import Outbox
from chatlib.wire import SSE, WEBSOCKET, SSEEvent, SSEParser

# Everything str.splitlines() takes for a line end. Only CR, LF and CRLF end an SSE line;
# the rest must reach the application inside the data, and never appear raw on the wire.
LINE_BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
               "\u2028", "\u2029"]
NOT_SSE_LINE_ENDS = [c for c in LINE_BREAKS if c not in ("\n", "\r", "\r\n")]


def feed_all(data: bytes, cuts=()) -> tuple[list[SSEEvent], SSEParser]:
    """Events from ``data`` fed in pieces cut at ``cuts``."""
    parser, events, start = SSEParser(), [], 0
    for cut in [*cuts, len(data)]:
        events += parser.feed(data[start:cut])
        start = cut
    return events, parser


# -- the parser, rule by rule ---------------------------------------------------------------


@pytest.mark.parametrize("end", ["\n", "\r", "\r\n"])
def test_lines_end_with_lf_cr_or_crlf(end):
    stream = end.join(["event: a", "data: 1", "", "data: 2", "", ""]).encode()
    for cut in range(len(stream) + 1):  # every way of splitting it in two chunks
        events, _ = feed_all(stream, [cut])
        assert events == [SSEEvent("a", "1", ""), SSEEvent("message", "2", "")], cut


def test_a_cr_at_the_end_of_a_chunk_dispatches_at_once():
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\r") == [SSEEvent("message", "x", "")]  # no wait for a third byte
    assert parser.feed(b"\ndata: y\n\n") == [SSEEvent("message", "y", "")]  # LF: a new line


@pytest.mark.parametrize("char", NOT_SSE_LINE_ENDS)
def test_other_unicode_line_breaks_are_data(char):
    events, _ = feed_all(f"data: a{char}b\n\n".encode())
    assert events == [SSEEvent("message", f"a{char}b", "")]


def test_fields_comments_and_spaces():
    stream = (b": a comment\n"
              b"data\n"                 # no colon: the field name, an empty value
              b"data:no space\n"
              b"data:  two spaces\n"    # only one space is removed
              b"unknown: ignored\n"
              b"event: custom\n\n"
              b"data: after\n\n")       # the event type does not carry over
    events, _ = feed_all(stream)
    assert events == [SSEEvent("custom", "\nno space\n two spaces", ""),
                      SSEEvent("message", "after", "")]


def test_id_persists_and_an_id_with_nul_is_ignored():
    stream = b"id: 7\ndata: a\n\ndata: b\n\nid: 8\0\ndata: c\n\nid\ndata: d\n\n"
    events, parser = feed_all(stream)
    assert [e.last_event_id for e in events] == ["7", "7", "7", ""]
    assert parser.last_event_id == ""


def test_an_event_without_data_is_not_dispatched_but_its_id_counts():
    events, parser = feed_all(b"id: 5\nevent: x\n\ndata: y\n\n")
    assert events == [SSEEvent("message", "y", "5")]


@pytest.mark.parametrize(("line", "retry"), [
    ("retry: 1000", 1000), ("retry: 10a", None), ("retry: -1", None), ("retry:", None),
    ("retry: \u0662", None),  # an Arabic-Indic digit is a digit to str.isdigit(), not ASCII
    ("retry: " + "9" * 5000, None),  # beyond any sane delay: ignored, not an error
])
def test_retry_takes_ascii_digits_only(line, retry):
    _, parser = feed_all(f"{line}\n\n".encode())
    assert parser.retry == retry


def test_bom_is_dropped_once_and_bad_utf8_is_replaced():
    events, _ = feed_all(b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\ndata: \xff\n\n", [1, 2])
    # The second BOM makes "\ufeffdata" a field name (unknown: ignored).
    assert events == [SSEEvent("message", "a", ""), SSEEvent("message", "\ufffd", "")]
    events, _ = feed_all(b"data: \xff\xe2\x82\n\n")
    assert events == [SSEEvent("message", "\ufffd\ufffd", "")]


def test_an_unfinished_event_is_not_dispatched():
    events, _ = feed_all(b"data: a\n\ndata: b\n")
    assert events == [SSEEvent("message", "a", "")]


# -- encodings ------------------------------------------------------------------------------


def test_sse_message_bytes_for_every_line_break():
    """Literal expected bytes: data is JSON with every non-ASCII character escaped."""
    text = "".join(LINE_BREAKS)
    payload = wire.sse_message(Message(3, 1.5, "b\u00f6b", text))
    assert payload == ('id: 3\nevent: message\ndata: {"id":3,"ts":1.5,"user":"b\\u00f6b",'
                       '"text":"\\n\\r\\r\\n\\u000b\\f\\u001c\\u001d\\u001e\\u0085\\u2028'
                       '\\u2029"}\n\n')
    # Even a parser that splits lines like str.splitlines() finds the lines intact.
    assert payload.splitlines() == payload.split("\n")[:-2] + [""]


@pytest.mark.parametrize("char", LINE_BREAKS)
async def test_typing_and_presence_events_never_carry_a_raw_line_break(char):
    # Nicknames with line breaks are refused at the door (validation); the hub must still
    # never emit one, whatever name it is given.
    hub = Hub(MemoryLog(), Limits(presence_interval=0))
    sse = hub.subscribe(Outbox(SSE, ""))
    hub.typing(f"a{char}b")
    hub.subscribe(Outbox(WEBSOCKET, f"c{char}d"))
    payloads = [p for _, p in await sse.get(timeout=0)]
    assert len(payloads) == 2
    for payload in payloads:
        assert payload.isascii() and "\r" not in payload
        assert payload.count("\n") == 3 and payload.endswith("\n\n")
    [typing, presence] = SSEParser().feed("".join(payloads))
    assert json.loads(typing.data) == {"user": f"a{char}b"}
    assert json.loads(presence.data) == {"users": [f"c{char}d"], "count": 1}


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(min_size=1, max_size=32), st.lists(st.integers(0, 400), max_size=5))
def test_any_message_survives_sse_in_any_chunking(text, user, cuts):
    message = Message(12, 1234.5, user, text)
    stream = (wire.SSE_RETRY + wire.SSE_PING + wire.sse_message(message)).encode()
    events, parser = feed_all(stream, sorted(min(c, len(stream)) for c in cuts))
    assert [(e.event, e.last_event_id) for e in events] == [("message", "12")]
    assert wire.message(json.loads(events[0].data)) == message
    assert parser.retry == 1000


def test_ws_frame_round_trip():
    message = Message(1, 2.0, "ada", "x\u2028y")
    assert wire.ws_frame(message) == ('{"type":"message","id":1,"ts":2.0,"user":"ada",'
                                      '"text":"x\u2028y"}')
    kind, data = wire.parse_ws(wire.ws_frame(message))
    assert kind == "message" and wire.message(data) == message


def test_a_message_is_encoded_once_for_every_client_that_joins():
    """The newest page of history goes to every client that joins: its payloads are made
    once (wire.recent), and a message that is not the same object, even with the same id
    (a replaced log, another room), is encoded anew."""
    first = Message(1, 1.5, "ada", "hello")
    for encode in (wire.ws_frame, wire.sse_message):
        assert encode(first) is encode(first)
        again = Message(1, 1.5, "ada", "hello, again")  # same id, another message
        assert "again" in encode(again) and "again" not in encode(first)
    for i in range(2 * wire.RECENT):  # bounded: what it keeps does not grow
        wire.ws_frame(Message(i, 1.0, "bob", f"m{i}"))
    assert '"text":"hello"' in wire.ws_frame(first)
