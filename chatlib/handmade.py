"""A WebSocket chat server written by hand: the reference solution of notebook 10.

Notebook 10 has the learner build this server step by step on a raw ``asyncio`` socket and
the teaching codec (:mod:`chatlib.frames`, :mod:`chatlib.handshake`), with no web framework
and no WebSocket library. The same code lives here so that tests can import it:
tests/test_build_your_own.py chats with it from real Chromium (the real chat page, served by
this server) and runs a frame-level conformance battery on it (the cases of Autobahn|Testsuite
sections 1-7), and checks that the notebook's solution cells are this code, line for line.

    server = await HandmadeServer().start()    # 127.0.0.1, a free port
    server.url                                 # the chat page, served by this server
    await server.stop()

The five pieces, one per step of the notebook:

* :func:`parse_request`: the HTTP/1.1 request head as ``(method, target, headers)``,
  refusing what could be read two ways (a bare CR or LF, a second ``Host``);
* :func:`handshake_response`: ``101 Switching Protocols`` with ``Sec-WebSocket-Accept``, or an
  error status for a request that isn't a valid upgrade, names a foreign ``Host``
  (:func:`host_allowed`, against DNS rebinding) or comes from a foreign ``Origin``;
* :func:`read_message`: frames in, one whole message out: masked frames only, PINGs answered
  on the way (unless the client leaves :data:`MAX_UNSENT` bytes unread), fragments
  reassembled, UTF-8 checked fragment by fragment (fail fast), every frame and every whole
  message due within :data:`READ_TIMEOUT` (the server PINGs a quiet client every
  :data:`PING_INTERVAL`, so a live one always has a PONG to send);
* :func:`broadcast`: one TEXT frame, encoded once, written to every connection;
* :func:`close_reply`: the CLOSE frame that answers the peer's CLOSE (or refuses a bad one),
  and :func:`linger`, which ends the TCP connection after it without a reset.

:class:`HandmadeServer` puts them together and speaks the chat's JSON protocol (README, "The
chat protocol"): ``hello`` (with history after ``after``), ``message`` (a ``client_id`` gets
an ``ack`` carrying the stored message; a resend is acked with the original, stored once),
``typing``, ``presence``, ``error``, ``reset``. Besides ``/ws`` it serves the chat page
(``/``, ``/static/app.js``, ``/static/style.css``; GET and HEAD), and ``/echo``, a WebSocket
that sends every message back, as the conformance battery needs. After every answer it
lingers (:func:`linger`), so that what the client still sends cannot reset the answer.

What a server open to strangers must add, and this one does (each has a test in
tests/test_build_your_own.py): a ``Host`` allowlist; bad JSON of any shape (60,000 ``[``
nest deeper than Python's recursion limit) answered with an error, and a bug in a handler
closed with 1011 for that client only; nicknames without control or invisible characters
(:func:`nickname_problem`); read and write timeouts with keepalive PINGs, a PING flood
from a client that does not read closed (1008); presence coalesced (one
update per :data:`PRESENCE_DELAY`, not one per join per client: 300 joins made 45,150
frames); a join replays at most :data:`HISTORY_PAGE` messages; and a lingering close, so
the peer reads our CLOSE (1009, 1002, ...) before the connection ends.

Limits, and what it leaves out on purpose (a teaching server, not chatlib's): one request per
HTTP connection (``Connection: close``), in origin form (``GET /path``: an absolute URL as
target gets 400), HTTP/1.1 only (400 for any other version); a request head of at most
16 KiB (431), read within 10 s;
messages of at most 64 KiB; a client that lets more than 1 MiB pile up unread is dropped; no
extensions (permessage-deflate), no subprotocols, no TLS, no long polling or SSE, no rate
limits, and the history lives in memory without bound (only what a join replays is bounded).
Nicknames that merely look alike (Cyrillic "а" for Latin "a") are not refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import ipaddress
import json
import logging
import time
import unicodedata
from urllib.parse import urlsplit

from . import frames
from .app import STATIC_DIR
from .frames import CloseCode, Frame, FrameError, Opcode, ProtocolError
from .handshake import accept_key
from .validation import invisible

__all__ = ["HandmadeServer", "broadcast", "close_reply", "handshake_response", "host_allowed",
           "linger", "nickname_problem", "parse_request", "read_message"]

MAX_HEAD = 16 * 1024  # bytes of request head we read before answering 431
MAX_MESSAGE = 64 * 1024  # bytes of one message, all fragments together
MAX_UNSENT = 1024 * 1024  # bytes waiting to be sent to one client before we drop it
MAX_TEXT = 2000  # characters of one chat message, as chatlib.Limits
MAX_NICK = 32  # characters of a nickname, as chatlib.Limits
READ_TIMEOUT = 30.0  # seconds for a whole message (or a frame) to come in, or ours to go out
PING_INTERVAL = 10.0  # seconds between our PINGs: a live client answers each with a PONG
LINGER_SECONDS = 2.0  # after our last frame: how long we read and discard, at most ...
LINGER_BYTES = 4 * 1024 * 1024  # ... and how many bytes, before closing
HISTORY_PAGE = 100  # messages a join replays, at most (the newest ones)
PRESENCE_DELAY = 0.25  # seconds over which joins and leaves make one presence update
PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/static/style.css": ("style.css", "text/css; charset=utf-8")}
TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def http_response(status: int, reason: str, body: bytes = b"", *, content_type: str =
                  "text/plain; charset=utf-8", extra: str = "", connection: str = "close") -> bytes:
    """A complete HTTP/1.1 response that closes the connection after it."""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {connection}\r\n{extra}\r\n"
            ).encode() + body


# Step 1 ----------------------------------------------------------------------------------
def parse_request(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Split a request head into (method, target, headers); header names in lower case.

    Raises ValueError when the head is not an HTTP/1.1 request in origin form (a target
    starting with "/"), when a header name is not a token, a value holds CR, LF or NUL, or
    ``Host`` or ``Sec-WebSocket-Key`` comes twice. Other repeated headers are joined with
    ", " (RFC 9110, section 5.3).
    """
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ")  # ValueError unless exactly 3 parts
    if version != "HTTP/1.1" or not target.startswith("/"):
        raise ValueError(f"not an HTTP/1.1 request line: {request_line!r}")
    headers = {}
    for line in lines:
        if line == "":
            continue  # the empty line that ends the head
        name, colon, value = line.partition(":")
        if not colon or not name or not set(name) <= TOKEN:  # "Host :" has a space
            raise ValueError(f"malformed header line: {line!r}")
        if {"\r", "\n", "\0"} & set(value):  # a bare CR or LF could smuggle a line in
            raise ValueError(f"CR, LF or NUL in a header value: {line!r}")
        name, value = name.lower(), value.strip(" \t")
        if name in headers:
            if name in ("host", "sec-websocket-key"):  # which one would be the real one?
                raise ValueError(f"more than one {name} header")
            value = f"{headers[name]}, {value}"
        headers[name] = value
    return method, target, headers


# Step 2 ----------------------------------------------------------------------------------
def host_allowed(host: str, names=()) -> bool:
    """May a request with this ``Host`` header be answered? (Against DNS rebinding.)

    Yes for an IP address (``127.0.0.1:8000``, ``[::1]``), ``localhost`` and
    ``*.localhost`` (browsers resolve those to loopback themselves), and the names in
    ``names`` (e.g. the host of a proxy the server sits behind). A rebinding attacker's page
    can only name its own domain, which resolves to us but is none of these.
    """
    try:
        name = urlsplit("//" + host).hostname  # lower case, without port and brackets
    except ValueError:  # "[::1": not a host at all
        return False
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name == "localhost" or name.endswith(".localhost") or name in names


def handshake_response(headers: dict[str, str], names=()) -> bytes:
    """The answer to an upgrade request: 101 and the accept key, or why not (400, 403, 426).

    ``names``: host names allowed besides IP addresses and localhost (:func:`host_allowed`).
    """
    connection = [token.strip().lower() for token in headers.get("connection", "").split(",")]
    upgrade = [token.strip().lower() for token in headers.get("upgrade", "").split(",")]
    if "websocket" not in upgrade or "upgrade" not in connection:
        return http_response(400, "Bad Request", b"this is a WebSocket endpoint\n")
    if headers.get("sec-websocket-version") != "13":  # 426 says what to upgrade to
        return http_response(426, "Upgrade Required", b"WebSocket version 13 only\n",
                             connection="Upgrade, close",
                             extra="Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n")
    key = headers.get("sec-websocket-key", "")
    try:
        nonce = base64.b64decode(key, validate=True)
    except binascii.Error:
        nonce = b""
    if len(nonce) != 16:
        return http_response(400, "Bad Request", b"Sec-WebSocket-Key: 16 bytes in base64\n")
    host = headers.get("host")
    if host is None:
        return http_response(400, "Bad Request", b"Host header required\n")
    if not host_allowed(host, names):  # a rebound name: its Origin would match its Host
        return http_response(403, "Forbidden", b"host not allowed\n")
    origin = headers.get("origin")  # browsers send it; a page elsewhere must not get in
    try:
        same_origin = origin is None or urlsplit(origin).netloc == host
    except ValueError:  # "http://[": not an origin at all
        same_origin = False
    if not same_origin:
        return http_response(403, "Forbidden", b"origin not allowed\n")
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n").encode()


# Step 3 ----------------------------------------------------------------------------------
async def read_message(reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> tuple[Opcode, bytes]:
    """The next whole message, (TEXT or BINARY, payload), or (CLOSE, payload).

    Answers PINGs, ignores PONGs, reassembles fragments. Raises a FrameError (its close_code
    says how to close) for anything RFC 6455 forbids; for a peer that sends no frame for
    READ_TIMEOUT seconds (silent, or stuck in the middle of a frame) or takes longer than
    that from a message's first fragment to its last (PONGs in between don't count); and
    for one that PINGs while more than MAX_UNSENT bytes wait for it to read (1008).
    """
    opcode, parts, size = None, [], 0
    utf8 = codecs.getincrementaldecoder("utf-8")()
    loop, deadline = asyncio.get_running_loop(), None  # deadline: set by a first fragment
    while True:  # one frame per round: returns with a message or a CLOSE, or raises
        timeout = READ_TIMEOUT if deadline is None else deadline - loop.time()
        try:
            frame = await asyncio.wait_for(
                frames.read_frame(reader, masked=True, max_size=MAX_MESSAGE), timeout)
        except TimeoutError:
            raise ProtocolError(f"no whole frame or message in {READ_TIMEOUT:g} s",
                                CloseCode.INTERNAL_ERROR) from None
        if frame.opcode == Opcode.PING:
            if writer.transport.get_write_buffer_size() > MAX_UNSENT:  # PINGs, never reads
                raise ProtocolError("PINGs while not reading", CloseCode.POLICY_VIOLATION)
            writer.write(frames.encode(Frame(Opcode.PONG, frame.payload), mask_key=None))
            continue
        if frame.opcode == Opcode.PONG:
            continue
        if frame.opcode == Opcode.CLOSE:
            return Opcode.CLOSE, frame.payload
        if opcode is None and frame.opcode == Opcode.CONT:
            raise ProtocolError("continuation frame, but no message to continue")
        if opcode is not None and frame.opcode != Opcode.CONT:
            raise ProtocolError("new message before the previous one ended")
        if opcode is None:  # a message starts: all of it must be here within READ_TIMEOUT
            opcode, deadline = frame.opcode, loop.time() + READ_TIMEOUT
        size += len(frame.payload)
        if size > MAX_MESSAGE:
            raise frames.PayloadTooBig(size, MAX_MESSAGE)
        if opcode == Opcode.TEXT:
            try:  # checks this fragment now: no need to wait for the end of the message
                utf8.decode(frame.payload, final=frame.fin)
            except UnicodeDecodeError:
                raise ProtocolError("text is not UTF-8", CloseCode.INVALID_DATA) from None
        parts.append(frame.payload)
        if frame.fin:
            return opcode, b"".join(parts)


# Step 4 ----------------------------------------------------------------------------------
def broadcast(writers, text: str) -> None:
    """Send ``text`` in one TEXT frame to every writer; drop those that stopped reading."""
    wire = frames.encode(Frame(Opcode.TEXT, text.encode("utf-8")), mask_key=None)
    for writer in list(writers):
        if writer.transport.get_write_buffer_size() > MAX_UNSENT:
            writer.transport.abort()  # its session's read ends (IncompleteReadError)
        elif not writer.is_closing():
            writer.write(wire)


# Step 5 ----------------------------------------------------------------------------------
def close_reply(payload: bytes) -> bytes:
    """The CLOSE frame answering the peer's CLOSE: its own code back, 1002/1007 if invalid."""
    try:
        code, _reason = frames.parse_close(payload)
    except ProtocolError as exc:
        code = exc.close_code
    reply = b"" if code is None else frames.close_payload(code)
    return frames.encode(Frame(Opcode.CLOSE, reply), mask_key=None)


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End the connection after our last frame so that the peer can read that frame.

    Closing a socket whose receive buffer still holds unread bytes makes Linux send RST
    instead of FIN, "which will then cause recv() to fail for the party that received the
    RST, even if there was data waiting to be read" (RFC 6455, section 1.4): our CLOSE (say,
    1009 after a 4 MB frame) is lost. So: FIN after our last byte, then read and discard
    until the peer closes too, for at most LINGER_SECONDS and LINGER_BYTES.
    """
    drained = 0
    try:
        writer.write_eof()
        async with asyncio.timeout(LINGER_SECONDS):
            while drained <= LINGER_BYTES:  # bounded by the byte budget and the timeout
                chunk = await reader.read(64 * 1024)
                if not chunk:
                    break  # the peer closed its side: nothing more to read
                drained += len(chunk)
    except (TimeoutError, OSError):
        writer.transport.abort()  # it kept sending (or stopped reading): don't wait
    writer.close()


# Putting it together ------------------------------------------------------------------------
def close_frame(code: int, reason: str = "") -> bytes:
    return frames.encode(Frame(Opcode.CLOSE, frames.close_payload(code, reason)), mask_key=None)


def send_json(writer: asyncio.StreamWriter, event: dict) -> None:
    broadcast([writer], json.dumps(event))


def nickname_problem(nick) -> str | None:
    """Why ``nick`` can't be a nickname, or None if it can.

    Refused: not a string, empty or blank, longer than MAX_NICK, or holding a control (NUL,
    newline, ESC), a format character (the right-to-left override U+202E, zero-width
    joiners), a line or paragraph separator, a surrogate, a private-use or unassigned code
    point, or a character that draws nothing (``chatlib.validation.invisible``: the Hangul
    fillers U+3164, U+115F, U+1160, U+FFA0, the blank Braille pattern U+2800). Spaces
    inside a name are fine. Look-alikes get through: Cyrillic "а" in "аdmin" is a letter.
    """
    if not isinstance(nick, str) or not nick.strip() or len(nick) > MAX_NICK:
        return f"user: 1 to {MAX_NICK} characters, not all blank"
    for char in nick:
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") or (
                invisible(char)):
            return f"user: no control or invisible characters (U+{ord(char):04X})"
    return None


async def keep_alive(writer: asyncio.StreamWriter) -> None:
    """PING every PING_INTERVAL seconds, so that a live but quiet client sends a frame."""
    ping = frames.encode(Frame(Opcode.PING, b"still there?"), mask_key=None)
    while not writer.is_closing():  # ends with the connection (or when cancelled)
        await asyncio.sleep(PING_INTERVAL)
        writer.write(ping)


class HandmadeServer:
    """The chat server of notebook 10: asyncio streams, the teaching codec, the chat's JSON."""

    def __init__(self, names=()) -> None:
        self.names = frozenset(names)  # Host names allowed besides IPs and localhost
        self.history: list[dict] = []  # message id N is history[N - 1]
        self.users: dict[asyncio.StreamWriter, str] = {}  # connections that said hello
        self.acked: dict[tuple[str, str], int] = {}  # (user, client_id) -> message id
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.StreamWriter, asyncio.Task] = {}  # connection -> session
        self._handlers: set[asyncio.Task] = set()  # one per connection, lingering included
        self._presence: asyncio.TimerHandle | None = None  # a presence update on its way

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self, port: int = 0) -> HandmadeServer:
        self._server = await asyncio.start_server(self.handle, "127.0.0.1", port, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._server.close()
        if self._presence is not None:
            self._presence.cancel()
        for writer, session in list(self._sessions.items()):
            writer.write(close_frame(CloseCode.GOING_AWAY))
            session.cancel()  # its handler lingers, so that this CLOSE gets read
        if self._handlers:  # lingering ones end within LINGER_SECONDS
            await asyncio.wait(self._handlers, timeout=LINGER_SECONDS + 1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, headers = parse_request(head)
        except asyncio.LimitOverrunError:
            writer.write(http_response(431, "Request Header Fields Too Large",
                                       b"request head over 16 KiB\n"))
        except (ValueError, asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.write(http_response(400, "Bad Request", b"malformed request\n"))
        else:
            await self.respond(reader, writer, method, target.split("?")[0], headers)
        await linger(reader, writer)  # what the client still sends must not reset our answer

    async def respond(self, reader, writer, method: str, path: str, headers) -> None:
        """Answer one request: a WebSocket session on /ws and /echo, a page, or an error."""
        allow = "GET" if path in ("/ws", "/echo") else "GET, HEAD" if path in PAGES else None
        if allow is None:
            writer.write(http_response(404, "Not Found", b"not found\n"))
        elif method not in allow.split(", "):
            writer.write(http_response(405, "Method Not Allowed", b"", extra=f"Allow: {allow}\r\n"))
        elif path in PAGES:
            name, content_type = PAGES[path]
            body = (STATIC_DIR / name).read_bytes()
            response = http_response(200, "OK", body, content_type=content_type)
            writer.write(response if method == "GET" else response[:len(response) - len(body)])
        else:
            answer = handshake_response(headers, self.names)
            writer.write(answer)
            if answer.startswith(b"HTTP/1.1 101 "):
                self._sessions[writer] = asyncio.ensure_future(
                    self.session(reader, writer, echo=path == "/echo"))
                await asyncio.wait([self._sessions[writer]])  # the peer's, ours or stop()'s end
                del self._sessions[writer]

    async def session(self, reader, writer, *, echo: bool) -> None:
        """Messages in until a CLOSE, an error or a lost connection; our CLOSE is the last frame."""
        pinger = asyncio.ensure_future(keep_alive(writer))
        try:
            while True:  # one message per round
                opcode, payload = await read_message(reader, writer)
                if opcode == Opcode.CLOSE:
                    writer.write(close_reply(payload))
                    break
                if echo:
                    writer.write(frames.encode(Frame(opcode, payload), mask_key=None))
                elif opcode == Opcode.BINARY:
                    writer.write(close_frame(CloseCode.UNSUPPORTED_DATA, "text frames only"))
                    break
                elif not self.on_event(writer, payload.decode("utf-8")):
                    break
                try:  # a client that stops reading must not hold us here either
                    await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
                except TimeoutError:
                    writer.transport.abort()
                    break
        except FrameError as exc:  # the peer broke RFC 6455: fail the connection
            writer.write(close_frame(exc.close_code, str(exc)[:100]))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the peer vanished without a CLOSE
        except Exception:  # a bug of ours: this client learns it (1011), the others carry on
            logging.getLogger(__name__).exception("hand-made server: session failed")
            writer.write(close_frame(CloseCode.INTERNAL_ERROR, "internal error"))
        finally:
            pinger.cancel()
            if self.users.pop(writer, None) is not None:
                self.send_presence()

    def on_event(self, writer, text: str) -> bool:
        """Handle one chat event; False when the connection must end (it was told why)."""
        try:
            event = json.loads(text)
            kind = event["type"]
        # RecursionError: json.loads("[" * 60000) nests deeper than Python's recursion limit.
        except (ValueError, TypeError, KeyError, RecursionError):
            send_json(writer, {"type": "error", "error": "expected a JSON object with a type"})
            return True
        user = self.users.get(writer)
        if user is None:  # the first event must be hello, with a valid nickname
            nick, after = event.get("user"), event.get("after", 0)
            if kind != "hello":
                writer.write(close_frame(CloseCode.POLICY_VIOLATION, "say hello first"))
                return False
            problem = nickname_problem(nick)
            if problem is not None:
                writer.write(close_frame(CloseCode.POLICY_VIOLATION, problem))
                return False
            if not isinstance(after, int) or after < 0 or after > len(self.history):
                send_json(writer, {"type": "reset"})  # a cursor from another server's log
                after = 0
            self.users[writer] = nick
            missed = self.history[after:]
            if len(missed) > HISTORY_PAGE:  # replay the newest page only, and say so
                if after > 0:
                    send_json(writer, {"type": "error", "error": f"{len(missed) - HISTORY_PAGE}"
                                       " older messages are not shown"})
                missed = missed[-HISTORY_PAGE:]
            for message in missed:
                send_json(writer, {"type": "message", **message})
            self.send_presence()
        elif kind == "message":
            text, client_id = event.get("text"), event.get("client_id")
            if not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT:
                send_json(writer, {"type": "error", "error": "text: 1 to 2000 characters"})
                return True
            if client_id is not None and not (isinstance(client_id, str) and 0 < len(
                    client_id) <= 64 and client_id.isascii() and client_id.isprintable()):
                send_json(writer, {"type": "error", "error": "client_id: 1 to 64 ASCII chars"})
                return True
            message = None
            if (user, client_id) not in self.acked:  # else: a repeat, acked with the old id
                message = {"id": len(self.history) + 1, "ts": time.time(), "user": user,
                           "text": text}
                if client_id is not None:
                    message["client_id"] = client_id
                    self.acked[user, client_id] = message["id"]
                self.history.append(message)
            if client_id is not None:  # the sender learns its message is stored, then all do
                stored = self.history[self.acked[user, client_id] - 1]
                send_json(writer, {"type": "ack", **stored})
            if message is not None:
                broadcast(self.users, json.dumps({"type": "message", **message}))
        elif kind == "typing":
            others = [w for w in self.users if w is not writer]
            broadcast(others, json.dumps({"type": "typing", "user": user}))
        else:
            send_json(writer, {"type": "error", "error": f"unknown type {kind!r}"})
        return True

    def send_presence(self) -> None:
        """Presence changed: everyone gets the list once, PRESENCE_DELAY seconds from now.

        Without the delay every join sends the list to everyone: N joins, N (N + 1) / 2
        frames (300 joins: 45,150). With it, joins in the same PRESENCE_DELAY share one.
        """
        if self._presence is None:
            self._presence = asyncio.get_running_loop().call_later(PRESENCE_DELAY,
                                                                   self._send_presence_now)

    def _send_presence_now(self) -> None:
        self._presence = None
        users = sorted(set(self.users.values()))
        broadcast(self.users, json.dumps({"type": "presence", "users": users}))
