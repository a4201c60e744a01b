"""The wire format, in one place: how each transport frames an event, and how to read it back.

Every event is a JSON object. A message is ``{"id", "ts", "user", "text"}``; other events are
``presence`` ``{"users": [...], "count": N}`` (at most ``Limits.presence_names`` names),
``typing`` ``{"user": ...}``, ``error`` ``{"error": ...}`` and ``reset`` ``{}`` (the
server's log was replaced: start over from id 0). A message sent with a ``client_id``
carries it; the WebSocket sender of one gets ``ack``, the stored message
(``{"type": "ack", "id", "ts", "user", "text", "client_id"}``), on its connection only.

* WebSocket: one text frame per event, ``{"type": EVENT, ...data}``.
* SSE: ``event: EVENT`` and ``data: JSON`` lines (messages also carry ``id: N``, which a
  reconnecting ``EventSource`` sends back as ``Last-Event-ID``).
* HTTP: a JSON body; ``GET /api/messages`` answers ``{"messages": [...], "last_id": N}``
  (plus the resume protocol's events as fields: ``"reset": true``, ``"gap"``, ``"history"``).

Rooms (chatlib.rooms; README, "Rooms and direct messages"): every event of a room other
than the default one carries ``"room": NAME`` (a message, an ack, presence, typing, the
resume protocol's events, ``older``, an error about it; a poll's answer at its top level);
the default room's events are what they were before rooms. A WebSocket (and WebTransport)
client is in one or more rooms: ``join`` is answered by ``joined`` ``{"room"}`` and then that
room's resume events and history, ``leave`` by ``left`` ``{"room"}``; ``dm`` ``{"room",
"from"}`` tells a user's connections of a direct message in a room they are not in
(:func:`dm_room`).

The resume protocol (decided in one place, chatlib.hub.Resume.of; README,
"Resuming"), the same on every transport and in every room (one cursor per room):

* a **fresh join** (no cursor, or 0) gets the newest page (at most ``Limits.history``
  messages), preceded by ``history`` ``{"before": ID}`` when older messages exist: ask for
  them with ``GET /api/messages?before=ID`` (any client, whatever its transport), which
  answers ``{"messages": [...], "first_id": F, "before": ID2?}``, or on a WebSocket with
  ``{"type": "older", "before": ID}``, answered by an ``older`` frame with those fields;
* a **resume** (a cursor) gets everything after it, in order, paced in pages;
* a cursor older than the oldest message kept (retention) gets ``gap`` ``{"first_id": F}``
  and then everything from F: the client knows that it missed ids up to F-1;
* a cursor past the end (a new or emptied log) gets ``reset`` and then a fresh join; a
  client connected when its log goes back is closed with 1012 and reconnects to that.

The server (chatlib.polling, sse, ws), the Python clients and the tests all use this
module, so that the format has one definition (both directions). The SSE parser follows
the WHATWG HTML standard, section "Server-sent events", exactly: https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from dataclasses import dataclass

from .limits import Limits
from .store import DEFAULT_ROOM, Message
from .validation import ChatError, cursor, dm_room, dm_users, json_object, nickname, room_name

__all__ = ["dm_room", "dm_users"]  # rooms of direct messages (chatlib.validation's)

# One encoder per flavour, made once: json.dumps() with options builds a new JSONEncoder on
# every call.
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# SSE data is JSON with every non-ASCII character escaped. JSON already escapes CR and LF,
# the only line ends of SSE; but U+0085, U+2028 and U+2029 are line ends to parsers that
# split lines the way Python's str.splitlines() or other languages' "readline" do, and one
# such character in a message would then cut its data line in two for every reader, forever
# (issue 6, defect 1). ensure_ascii escapes them at no cost over the non-ASCII encoder,
# where a search-and-replace after encoding costs more (bench/README.md, "Lab notes").
_sse_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))

dumps = _encoder.encode
"""Compact JSON text, non-ASCII characters as they are (WebSocket frames, HTTP bodies)."""


def loads(raw: str | bytes):
    """Parse JSON (what the clients receive); the server validates with validation.py."""
    return json.loads(raw)


def message(data: dict) -> Message:
    """A :class:`Message` from its JSON object (in any transport's event)."""
    return Message(data["id"], data["ts"], data["user"], data["text"], data.get("client_id"),
                   data.get("room", DEFAULT_ROOM))


# -- WebSocket ----------------------------------------------------------------------------


def recent(encode: Callable[[Message], str]) -> Callable[[Message], str]:
    """``encode``, remembering the payloads of the last :data:`RECENT` messages it
    encoded (by identity: a log in memory hands out the same :class:`Message` each time).
    Every client that joins is sent the same newest page of history: it is encoded once,
    not once per join."""
    made: dict[int, tuple[Message, str]] = {}

    def cached(message: Message) -> str:
        hit = made.get(id(message))
        if hit is not None and hit[0] is message:
            return hit[1]
        if len(made) >= RECENT:
            made.clear()
        payload = made[id(message)] = message, encode(message)
        return payload[1]

    return cached


RECENT = 256
"""Messages whose payloads :func:`recent` keeps, per encoding."""


@recent
def ws_frame(message: Message) -> str:
    """The WebSocket text frame for a message: ``{"type": "message", ...message}``."""
    return dumps({"type": "message", **message.to_dict()})


def ws_event(event: str, data: dict) -> str:
    """The WebSocket text frame for an event that is not a message."""
    return dumps({"type": event, **data})


WS_RESET = ws_event("reset", {})


def parse_ws(text: str | bytes) -> tuple[str, dict]:
    """``(event, data)`` from one WebSocket frame; ``data`` without its ``type``."""
    data = json.loads(text)
    return data.pop("type", ""), data



# -- WebSocket, client to server ------------------------------------------------------------
# {"type": "hello", "user", "after"[, "room"]} first, then {"type": "message", "text"[,
# "client_id"][, "room"]}, {"type": "typing"[, "room"]}, {"type": "older", "before"[,
# "room"]}, {"type": "join", "room", "after"} and {"type": "leave", "room"}. A frame without
# "room" is about the default room. Built here for the Python clients, read here for the
# server.


def _in_room(data: dict, room: str | None) -> dict:
    if room is not None and room != DEFAULT_ROOM:
        data["room"] = room
    return data


def ws_hello(user: str, after: int = 0, room: str | None = None) -> str:
    """The first frame a client sends: its nickname and its cursor (resume after it); the
    connection starts in ``room`` (the default room if None), ``after`` is that room's."""
    return dumps(_in_room({"type": "hello", "user": user, "after": after}, room))


def ws_post(text: str, client_id: str | None = None, room: str | None = None) -> str:
    """A message from a client, to ``room`` (which the connection is in); with a
    ``client_id`` the server answers ``ack`` (or an ``error`` naming it) on this
    connection."""
    data = {"type": "message", "text": text}
    if client_id is not None:
        data["client_id"] = client_id
    return dumps(_in_room(data, room))


WS_TYPING = dumps({"type": "typing"})
"""A client's typing notice (in the default room)."""


def ws_typing(room: str | None = None) -> str:
    """A client's typing notice in ``room``."""
    return dumps(_in_room({"type": "typing"}, room))


def ws_older(before: int, room: str | None = None) -> str:
    """Ask for the page of ``room``'s messages below id ``before`` (answered by ``older``,
    the fields of ``GET /api/messages?before=ID``)."""
    return dumps(_in_room({"type": "older", "before": before}, room))


def ws_join(room: str, after: int = 0) -> str:
    """Join ``room`` too, resuming after ``after`` (that room's cursor; 0: a fresh join).
    Answered by ``joined`` ``{"room"}``, then that room's resume events and history."""
    return dumps({"type": "join", "room": room, "after": after})


def ws_leave(room: str) -> str:
    """Leave ``room``: answered by ``left`` ``{"room"}``, after which nothing of it comes."""
    return dumps({"type": "leave", "room": room})


def read_hello(frame: str | None, limits: Limits) -> tuple[str, int, str]:
    """``(user, after, room)`` from a client's first frame; ChatError (400) if it is no
    hello."""
    if frame is None:
        raise ChatError(400, "expected a text frame")
    data = json_object(frame)
    if data.get("type") != "hello":
        raise ChatError(400, 'the first frame must be {"type": "hello", "user": ...}')
    after = data.get("after", 0)
    if not isinstance(after, int) or isinstance(after, bool):
        raise ChatError(400, "after must be an integer")
    return nickname(data, limits), cursor(after), room_name(data.get("room"), limits)


CLIENT_FRAMES = ("message", "typing", "older", "join", "leave")


def read_client_frame(frame: str | None, limits: Limits) -> tuple[str, dict]:
    """``(type, data)`` of a frame after the hello: ``"message"``, ``"typing"``,
    ``"older"`` (``{"before": ID}``: an older page, answered with an ``older`` frame shaped
    like ``GET /api/messages?before=ID``), ``"join"`` or ``"leave"``; ChatError if it is
    none of them (the fields are checked by the caller, in its order)."""
    if frame is None:
        raise ChatError(400, "binary frames are not supported: send JSON text")
    # Don't parse what can't be valid. JSON may escape each character of the text as
    # "\ud83d\ude00" (12 characters; json.dumps does by default): bound by that, not less.
    if len(frame) > 12 * limits.max_text + 200:
        raise ChatError(413, f"text is longer than {limits.max_text} characters")
    data = json_object(frame)
    kind = data.get("type")
    if kind not in CLIENT_FRAMES:
        raise ChatError(400, f"unknown type: {str(kind)[:40]!r}")
    return kind, data


# -- Server-Sent Events -------------------------------------------------------------------


@recent
def sse_message(message: Message) -> str:
    """The SSE event for a message; its ``id:`` is what ``Last-Event-ID`` resumes from."""
    return f"id: {message.id}\nevent: message\ndata: {_sse_encoder.encode(message.to_dict())}\n\n"


def sse_event(event: str, data: dict) -> str:
    """The SSE event for an event that is not a message (no ``id:``: the cursor stays)."""
    return f"event: {event}\ndata: {_sse_encoder.encode(data)}\n\n"


SSE_RETRY = "retry: 1000\n\n"
"""First thing on every stream: reconnect after 1 s (the browser's default is ~3 s)."""
SSE_RESET = sse_event("reset", {})
SSE_PING = ": ping\n\n"
"""A comment line: keeps idle proxies from closing the stream; parsers ignore it."""


@dataclass(frozen=True, eq=False)
class Encoding:
    """How one push transport writes events: the hub fans out to subscribers grouped by
    their encoding, and encodes each message once per encoding, not once per client."""

    message: Callable[[Message], str]
    """The payload for a message."""
    event: Callable[[str, dict], str]
    """The payload for an event that is not a message (``event`` name, ``data``)."""
    reset: str
    """The payload telling the client that the log was replaced: start over from id 0."""


WEBSOCKET = Encoding(ws_frame, ws_event, WS_RESET)
SSE = Encoding(sse_message, sse_event, SSE_RESET)


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event: its type, its data (lines joined by "\\n"), the last event id."""

    event: str
    data: str
    last_event_id: str


class SSEParser:
    """An incremental parser for ``text/event-stream``, as the WHATWG standard specifies.

    Feed it bytes as they arrive; it returns the events each chunk completes. The stream is
    UTF-8 (invalid bytes become U+FFFD, one leading BOM is dropped); lines end with CRLF, LF
    or CR, and nothing else (not U+2028, not U+0085). A line starting with ":" is a comment;
    ``field: value`` loses one space after the colon; ``data`` lines accumulate; ``event``
    names the type; ``id`` sets the last event id unless it contains NUL; ``retry`` (ASCII
    digits only) sets :attr:`retry`; other fields are ignored. A blank line dispatches the
    event, unless no ``data`` line came (then the event is dropped, but its ``id`` counts).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._buffer = ""
        self._after_cr = False
        self._data: list[str] = []
        self._event = ""
        self._id_buffer = ""
        self.last_event_id = ""
        self.retry: int | None = None
        """The reconnection time the server asked for, in milliseconds."""

    def feed(self, chunk: bytes | str) -> list[SSEEvent]:
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        if self._after_cr and text[:1] == "\n":
            text = text[1:]  # the LF of a CRLF split between two chunks
        self._after_cr = False
        buffer = self._buffer + text
        events: list[SSEEvent] = []
        start, n = 0, len(buffer)
        while start < n:
            cr, lf = buffer.find("\r", start), buffer.find("\n", start)
            if cr < 0 and lf < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                end = cr
                if cr + 1 == n:
                    after, self._after_cr = n, True
                else:
                    after = cr + 2 if buffer[cr + 1] == "\n" else cr + 1
            else:
                end, after = lf, lf + 1
            event = self._line(buffer[start:end])
            if event is not None:
                events.append(event)
            start = after
        self._buffer = buffer[start:]
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None  # a comment
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry":
            if value and value.isascii() and value.isdigit() and len(value) < 19:
                self.retry = int(value)  # (longer: more than 300 million years; ignored)
        return None

    def _dispatch(self) -> SSEEvent | None:
        self.last_event_id = self._id_buffer
        data, event = self._data, self._event or "message"
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEEvent(event, "\n".join(data), self.last_event_id)


# -- HTTP ---------------------------------------------------------------------------------


def messages_body(messages: list[Message], last_id: int,
                  events: list[tuple[str, dict]] = (), room: str = DEFAULT_ROOM) -> dict:
    """The body of ``GET /api/messages`` (encoded with :func:`dumps`, as every HTTP body).

    ``events`` are the resume protocol's (chatlib.hub.Resume.events): ``"reset": true``,
    ``"gap": {"first_id": F}``, ``"history": {"before": ID}``. The answer about a ``room``
    other than the default one says which: ``"room": NAME``.
    """
    body = {"messages": [m.to_dict() for m in messages], "last_id": last_id}
    for name, data in events:
        body[name] = data or True
    return _in_room(body, room)


def older_body(messages: list[Message], first_id: int, room: str = DEFAULT_ROOM) -> dict:
    """The body of ``GET /api/messages?before=ID``: the newest page of messages below ID
    (oldest first), ``first_id`` (the oldest kept), and ``"before"`` if older ones remain;
    ``"room"`` for a room other than the default one."""
    body = {"messages": [m.to_dict() for m in messages], "first_id": first_id}
    if messages and messages[0].id > first_id:
        body["before"] = messages[0].id
    return _in_room(body, room)
