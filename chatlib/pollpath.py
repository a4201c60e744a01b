"""The long poll's own HTTP path: ``GET /api/messages`` answered without h11 and ASGI.

Why it exists: a long poll is one small request and one small response for every message
or two, so the HTTP exchange itself is most of what a delivery costs. Through uvicorn that
exchange is h11 parsing the request and serialising the response in pure Python, a
request cycle with its task and event, Starlette's middleware and routing, and two writes;
the poll's own work (chatlib.polling.poll: read the cursor, ask the hub, encode the answer)
is a small part of it (bench/README.md, "Long polling").

The contract, with chatlib.protocols.BoundedH11Protocol (which calls :meth:`PollPath.take`
for a read that arrives on an idle keep-alive connection, nothing of an earlier request
left in h11's buffer):

* **Only the plain case is taken.** The read must be exactly one complete request head:
  ``GET /api/messages[?query] HTTP/1.1``, every header line well formed (h11's grammar for
  names and values), exactly one ``Host``, no body (no ``Transfer-Encoding``, no
  ``Content-Length`` but one ``0``), no ``Connection`` but ``keep-alive``, no ``Upgrade`` or
  ``Expect``, and it must pass the same front door as every route: the checks of
  chatlib.guard (:meth:`~chatlib.guard.Guard.verdict`; for a GET: the Host) and, in token
  mode, chatlib.auth (:meth:`~chatlib.auth.TokenGate.verdict`), the very functions the
  app's middleware runs, on the same header values. Anything else (a
  partial head, pipelined requests in one read, another route, a request the front door
  refuses, a malformed one) is left as it came: it goes the general way, through h11 and
  the app, which answers it as it answers every request (400 for what h11 cannot parse,
  401, 403, ...). So there is one way to refuse each thing, and this module refuses
  nothing.
* **The same answer.** The request runs :func:`chatlib.polling.poll`, the code the ASGI
  route runs: 200 with its JSON body and the same headers; a ChatError or
  StoreUnavailable through the app's own exception handlers (the same status, body and
  ``Retry-After``); nothing at all if the client hung up while its poll waited (the ASGI
  route's 499, which no client ever reads): the protocol cancels the poll when its
  connection is lost, so that no task watches for the hang-up. An unexpected Exception
  from the poll is logged and answered 500, and the connection closed; a poll cancelled
  otherwise (uvicorn's graceful shutdown timed out) or anything raised past that gets
  no answer, and its connection is closed.
* **Keep-alive and pipelining.** The connection stays open after the answer, as h11's
  would; bytes that arrive while a poll waits (a pipelined request) are kept, reading is
  paused, and they are read once the answer is written, the general way or this one.
* **Only for chatlib's app.** This path runs the checks of chatlib.app's middleware
  (Guard, TokenGate) and what its ``/api/messages`` route runs, without running the
  middleware and the route themselves. So it answers only for the app
  :func:`chatlib.app.create_app` makes: :meth:`PollPath.of` gives no path for any other
  app (another front door, another endpoint for the route, another ASGI app), and
  everything goes the general way. The app takes no change after it is built (chatlib.app.
  ChatApp): a middleware put in front wraps it, and this path is then off too.
* **The edge bounds hold**: the head is complete in the read that carried it, so it has no
  header timeout to run (a partial head goes to h11, with the protocol's header timer
  running); a request with a body goes the general way (body budget); an answer the
  client has not taken holds back its next request, as uvicorn's ``send`` does (write
  backpressure: at most one answer waits in the server's buffer); answers are written
  by the protocol, whose closes linger (lingering close) and whose stuck-client watch
  covers them; malformed input is h11's to refuse (400, never a 5xx).
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from starlette.requests import Request

from .app import MESSAGES_PATH, ChatApp
from .auth import GRANT, Pass, TokenGate
from .guard import GUARDED, Guard
from .polling import POLL_HEADERS, Messages, poll
from .web import latin1

PATH = MESSAGES_PATH.encode()

_REQUEST_LINE = re.compile(rb"GET (/[\x21-\x7e]*) HTTP/1\.1")
# h11's grammar (RFC 9110 5.1, 5.5): a token, a colon, optional whitespace, a value of
# visible characters, obs-text and inner spaces or tabs, optional whitespace.
_HEADER_LINE = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)[ \t]*")
_GENERAL_WAY = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
"""Headers that make a request the general path's: a body, or a protocol change (and a
``Content-Length`` other than one ``0``, a ``Connection`` other than ``keep-alive``)."""


class PollPath:
    """``GET /api/messages`` for one app (see the module docstring)."""

    def __init__(self, app: ChatApp, max_head: int = 16384) -> None:
        self.app = app
        self.state = app.state
        self.handlers = app.error_handlers
        options = dict(app.front_door)  # the app's own checks, with its options
        self.guard = Guard(None, **options[Guard])
        self.gate = TokenGate(None, **options[TokenGate]) if TokenGate in options else None
        self.paths = {PATH} | ({self.gate.page.encode() + PATH} if self.gate else set())
        self.max_head = max_head
        self._last = (None, None, b"")  # the last 200: its default headers, body, bytes

    @classmethod
    def of(cls, app) -> PollPath | None:
        """The poll path for ``app`` if it is chatlib's app as chatlib.app.create_app makes
        it (this path runs its front door's checks and its route's poll, without the
        middleware and the route: the module docstring); else None, and every request goes
        the general way."""
        if fronts(app):
            return cls(app)
        logging.getLogger("chatlib").info(
            "GET /api/messages goes the general way: not the app this path answers for")
        return None

    def take(self, data: bytes, server, client, scheme: str) -> dict | None:
        """The ASGI scope of the request ``data`` is, if this path answers it; else None
        (nothing was read: the general way reads ``data``)."""
        if not data.startswith(b"GET ") or len(data) > self.max_head:
            return None
        end = data.find(b"\r\n\r\n")
        if end != len(data) - 4:  # partial, or more than one head
            return None
        lines = data[:end].split(b"\r\n")
        request = _REQUEST_LINE.fullmatch(lines[0])
        if request is None:
            return None
        path, _, query = request[1].partition(b"?")
        if path not in self.paths:
            return None
        headers = []
        guarded = {}  # what Guard.verdict reads: the first of each
        hosts = lengths = 0
        for line in lines[1:]:
            header = _HEADER_LINE.fullmatch(line)
            if header is None:
                return None
            name, value = header[1].lower(), header[2]
            if name in _GENERAL_WAY or (name == b"connection" and value.lower() != b"keep-alive"):
                return None
            if name in GUARDED:
                hosts += name == b"host"
                guarded.setdefault(name, value)
            elif name == b"content-length":
                lengths += 1
                if value != b"0":
                    return None
            headers.append((name, value))
        if hosts != 1 or lengths > 1:
            return None
        if self.guard.verdict(
                "GET", guarded[b"host"].decode("latin-1"), latin1(guarded.get(b"origin")),
                forwarded_host=latin1(guarded.get(b"x-forwarded-host")),
                content_type=latin1(guarded.get(b"content-type")), scheme=scheme) is not None:
            return None  # the general way refuses it
        scope = {"type": "http", "http_version": "1.1", "method": "GET", "scheme": scheme,
                 "server": server, "client": client, "root_path": "",
                 "path": path.decode("ascii"), "raw_path": path, "query_string": query,
                 "headers": headers, "app": self.app}
        if self.gate is not None:
            last = dict(headers)  # what TokenGate.verdict reads: the last of each
            verdict = self.gate.verdict(
                latin1(last.get(b"authorization")), query.decode("latin-1"),
                latin1(last.get(b"cookie")), server[1] if server else 0)
            if not isinstance(verdict, Pass):
                return None  # the general way refuses it
            if verdict.grant is not None:
                scope[GRANT] = verdict.grant
        return scope

    async def answer(self, scope, default_headers) -> tuple[bytes, bool]:
        """The response to the request ``scope`` (status line, headers, body) and whether
        the connection stays open. The caller cancels it if the client hangs up."""
        try:
            body = await poll(self.state, scope)
        except Exception as exc:  # noqa: BLE001 - as the app's error middleware
            handler = next((self.handlers[kind] for kind in type(exc).__mro__
                            if kind in self.handlers), None)
            if handler is None:
                logging.getLogger("chatlib").exception("GET /api/messages failed")
                return response(500, [(b"content-type", b"text/plain; charset=utf-8"),
                                      (b"connection", b"close")],
                                b"Internal Server Error", default_headers), False
            refusal = await handler(Request(scope), exc)  # the request, as the app's
            return response(refusal.status_code, refusal.raw_headers, refusal.body,
                            default_headers), True
        return self.ok(body, default_headers), True

    def ok(self, body: bytes, default_headers) -> bytes:
        """The 200 response with ``body``. The polls that one message wakes get the same
        body (chatlib.polling.poll_answer) with the same default headers (uvicorn makes a
        new list when its ``date`` changes): the last response is kept and sent to each."""
        last_headers, last_body, data = self._last
        if body is not last_body or default_headers is not last_headers:
            data = response(200, [*POLL_HEADERS, (b"content-length", b"%d" % len(body))],
                            body, default_headers)
            self._last = (default_headers, body, data)
        return data


def fronts(app) -> bool:
    """Whether ``app`` is chatlib's app with the front door whose checks this path runs:
    Guard, then TokenGate or nothing (chatlib.app.ChatApp.front_door), and with
    chatlib.polling.Messages at ``/api/messages``."""
    return (type(app) is ChatApp and isinstance(app.messages, Messages)
            and [cls for cls, _ in app.front_door] in ([Guard], [Guard, TokenGate]))


def response(status: int, headers, body: bytes, default_headers) -> bytes:
    """An HTTP/1.1 response, in one piece (the server's default headers first, as uvicorn
    writes them)."""
    head = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    head += [b"%s: %s\r\n" % pair for pair in default_headers]
    head += [b"%s: %s\r\n" % pair for pair in headers]
    if not any(name == b"content-length" for name, _ in headers):
        head.append(b"content-length: %d\r\n" % len(body))
    head.append(b"\r\n")
    return b"".join(head) + body
