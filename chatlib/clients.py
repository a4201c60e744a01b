"""Python chat clients, one per transport, all with the same small async interface.

>>> async with WebSocketClient(server.url, "ada") as ada:     # doctest: +SKIP
...     await ada.send("hello")
...     message = await ada.receive(timeout=5)

Every client keeps ``last_id``, the cursor of the newest message it has received, and can
``reconnect()`` (or be created with ``after=``) to resume exactly after it.

Sending is exactly-once in effect: ``send(text)`` gives the message a fresh ``client_id``,
keeps it in ``pending`` until the server acknowledges it (the POST's answer; on a WebSocket
the ``ack`` frame, or the message itself coming back), and returns the stored
:class:`Message`. If the connection fails first, ``send`` raises and the message stays in
``pending``; ``reconnect()`` (and ``connect()``) sends everything pending again, in order,
with the same ``client_id``, and the server stores each one once.

Rooms (chatlib.wire has their frames): every client takes ``room=`` (default: the server's
default room, ``chatlib.store.DEFAULT_ROOM``, whose frames and URLs are exactly those of a
chat without rooms). An HTTP client (poll, long poll, SSE) reads and posts in that one room:
make one client per room. A WebSocket or WebTransport client starts in it and can
:meth:`~Client.join` and :meth:`~Client.leave` more; it keeps one cursor per room
(:attr:`Client.cursors`; ``last_id`` is its first room's), resumes each room after its own
cursor on ``reconnect()``, and :meth:`~Client.send` takes ``room=``. Each received
:class:`Message` says its ``room``. A direct message goes to the room
:func:`chatlib.wire.dm_room` names; a ``dm`` event (see ``on_event`` and :attr:`Client.dms`)
tells a user that someone wrote to them.

``token=`` is for a server started with one (``ChatServer(token=...)``): it goes in an
``Authorization: Bearer`` header, on every request and on the WebSocket handshake.

Coming back after a failure: ``await client.come_back(error)`` waits as the server asked
(a close reason's "retry after S s", a 503's ``retry_after``: chatlib.closecode,
chatlib.admission), or else :attr:`Client.backoff`'s next delay (:class:`Backoff`:
exponential, full jitter, capped), then reconnects, and tries again while it fails.

Each one counts
what it costs in ``stats``: requests made and bytes on the wire (HTTP bytes are counted from
the request and response as sent; WebSocket bytes by RFC 6455 framing rules, uncompressed).
"""

from __future__ import annotations

import asyncio
import random
import time
import unicodedata
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin

import httpx
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from . import wire
from .closecode import read_close_reason
from .store import DEFAULT_ROOM, Message


@dataclass
class Backoff:
    """When to try again after a failure: exponential backoff with full jitter, capped.

    Attempt n (from 0) waits a random time in ``[0, min(cap, base * 2**n))``: the bound
    doubles with each failure, and the randomness spreads the clients that failed together
    over the whole interval instead of bringing them back together ("full jitter", Marc
    Brooker's "Exponential Backoff And Jitter", AWS Architecture Blog, 2015). When the
    server said how long to wait (its delay is already spread per client:
    chatlib.admission), that delay is used as it is, up to ``max_wait``. :meth:`reset` after
    a success.
    """

    base: float = 0.5
    cap: float = 30.0
    max_wait: float = 300.0
    """The longest server delay honoured (seconds): a bound against a broken server."""
    attempt: int = 0

    def delay(self, retry_after: float | None = None) -> float:
        """Seconds to wait before the next attempt (and count this one)."""
        bound = min(self.cap, self.base * 2 ** min(self.attempt, 60))
        self.attempt += 1
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        return random.uniform(0, bound)

    def reset(self) -> None:
        self.attempt = 0


def server_delay(error: BaseException | None) -> float | None:
    """The delay (seconds) the server asked for when it refused or closed us, else None:
    a WebSocket close reason's "retry after S s" (chatlib.closecode), an SSE stream's last
    ``event: close`` (:class:`StreamClosed`), a refused handshake's or request's
    ``Retry-After`` (a 503's or 429's body ``retry_after`` first: it is exact)."""
    if isinstance(error, ConnectionClosed):
        close = error.rcvd
        return read_close_reason(close.reason)[1] if close is not None else None
    if isinstance(error, StreamClosed):
        return read_close_reason(error.reason)[1]
    if isinstance(error, ChatRefused):
        return error.retry_after
    response = getattr(error, "response", None)  # httpx.HTTPStatusError, InvalidStatus
    if response is None:
        return None
    headers = response.headers
    try:
        body = wire.loads(response.content if isinstance(error, httpx.HTTPStatusError)
                          else response.body)
        if isinstance(body, dict) and isinstance(body.get("retry_after"), (int, float)):
            return float(body["retry_after"])
    except (ValueError, TypeError, httpx.ResponseNotRead):
        pass
    try:
        return float(headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def retryable(error: BaseException) -> bool:
    """Does this failure go away by reconnecting (network, server restart, overload)?

    A refusal that the same request would get again (401, 403, 400 ...) does not, and
    neither does a bug: a client should stop and show those rather than hide them behind
    endless reconnecting.
    """
    status = getattr(getattr(error, "response", None), "status_code", None)  # httpx, websockets
    status = getattr(error, "status", status)  # ChatRefused
    if status is not None:
        return status == 429 or status >= 500 or status == 408
    # OSError: refused, reset, unreachable; TimeoutError; ConnectionClosed (websockets),
    # TransportError (httpx) and ConnectionError (ours) cover a connection that ended.
    return isinstance(error, (OSError, TimeoutError, ConnectionClosed, InvalidHandshake,
                              httpx.TransportError, EOFError))


@dataclass
class Stats:
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0


class Client:
    """What every client does; subclasses implement ``_fetch`` (and ``send``)."""

    transport = "?"

    def __init__(self, url: str, user: str, *, after: int = 0, room: str | None = None,
                 token: str | None = None, ack_timeout: float = 10.0) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.user = user
        self.room = unicodedata.normalize("NFKC", room).strip() if room else DEFAULT_ROOM
        """The room this client starts in (``after`` is its cursor there)."""
        self.cursors: dict[str, int] = {self.room: after}
        """The rooms this client is in, each with its cursor (the newest id received)."""
        self.dms: set[str] = set()
        """DM rooms someone wrote to us in (``dm`` events); join one to read it."""
        self.token = token
        self.ack_timeout = ack_timeout
        """Seconds ``send`` waits for the server's acknowledgement (WebSocket)."""
        self.pending: dict[str, str] = {}
        """Sent but not acknowledged yet: ``client_id -> text``, oldest first."""
        self._pending_rooms: dict[str, str] = {}  # client_id -> its room, if not self.room
        self.stats = Stats()
        self.presence: list[str] = []
        """Who is here (the server sends at most Limits.presence_names names) ..."""
        self.presence_count = 0
        """... and how many they are in all."""
        self.typing: deque[str] = deque(maxlen=100)  # who said they were typing, newest last
        self.errors: deque[str] = deque(maxlen=100)  # error events the server sent us
        self.resets = 0
        self.on_event: Callable[[str, dict], None] | None = None
        """Called with ``(type, data)`` for every event that is not a message."""
        self._inbox: deque[Message] = deque()
        self._acked: dict[str, asyncio.Future[Message]] = {}  # sends waiting for their ack
        self._joining: dict[str, asyncio.Future[None]] = {}  # joins waiting for `joined`
        self.backoff = Backoff()
        """How :meth:`come_back` waits when the server gave no delay."""

    @property
    def last_id(self) -> int:
        """The cursor of :attr:`room`: the newest id received there."""
        return self.cursors[self.room]

    @last_id.setter
    def last_id(self, value: int) -> None:
        self.cursors[self.room] = value

    def _room_query(self, room: str | None = None, **params) -> str:
        """``params`` as a query string (``?...``, or "" if none), with ``room=`` unless
        the room is the default one (whose URLs stay those of a chat without rooms)."""
        room = room or self.room
        if room != DEFAULT_ROOM:
            params["room"] = room
        return "?" + urlencode(params) if params else ""

    async def join(self, room: str, after: int = 0) -> None:
        """Join ``room`` too (WebSocket, WebTransport) and receive its messages after
        ``after`` (0: its newest page). Returns once the server confirmed (``joined``); a
        refusal (403 a room we may not read, 429 too many rooms, 400 a bad name) raises
        :class:`ChatRefused`, and the client is not in that room. Not connected yet: the
        room is joined by :meth:`connect`."""
        room = unicodedata.normalize("NFKC", room).strip()  # as the server names it
        self.cursors.setdefault(room, after)
        if not self.connected:
            return
        waiting = self._joining[room] = asyncio.get_running_loop().create_future()
        try:
            await self._control(wire.ws_join(room, self.cursors[room]))
            await self._wait(waiting)
        finally:
            self._joining.pop(room, None)
        waiting.result()

    async def leave(self, room: str) -> None:
        """Stop receiving ``room``'s messages (not the room this client started in)."""
        if room == self.room:
            raise ValueError(f"a client cannot leave its first room ({room!r})")
        if self.cursors.pop(room, None) is not None and self.connected:
            await self._control(wire.ws_leave(room))

    async def _control(self, frame: str) -> None:
        raise TypeError(f"a {self.transport} client is in one room: make one client per room")

    async def _wait(self, waiting: asyncio.Future) -> None:
        """Until ``waiting`` is done (events are handled meanwhile), at most ack_timeout."""
        raise NotImplementedError

    async def _rejoin(self) -> None:
        """After (re)connecting: join every other room again, each after its cursor."""
        for room, after in list(self.cursors.items()):
            if room != self.room:
                await self._control(wire.ws_join(room, after))

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def reconnect(self) -> None:
        """Drop the connection and open a new one that resumes after ``last_id``."""
        await self.close()
        await self.connect()

    async def come_back(self, error: BaseException | None = None, *,
                        attempts: int = 1000) -> None:
        """Reconnect after ``error`` (what ``receive``, ``send`` or ``connect`` raised), as
        the server asks: after the delay it gave (:func:`server_delay`), else after
        :attr:`backoff`'s next delay; an attempt that fails in a way reconnecting can cure
        (:func:`retryable`) waits again, at most ``attempts`` times, then raises. Resumes
        after ``last_id`` and resends what is pending, as :meth:`reconnect` does. A
        WebSocket refused as busy is accepted and then closed: that shows at its next
        ``receive`` (or ``send``); call ``come_back`` with that error again.
        """
        for _ in range(attempts):
            await asyncio.sleep(self.backoff.delay(server_delay(error)))
            try:
                await self.reconnect()
                return
            except Exception as exc:
                if not retryable(exc):
                    raise
                error = exc
        raise error

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def send(self, text: str, client_id: str | None = None, *,
                   room: str | None = None) -> Message:
        """Send a message (to ``room``, default :attr:`room`) and return it as stored, once
        the server has acknowledged it.

        ``client_id`` defaults to a fresh UUID. The message stays in :attr:`pending` if
        the connection fails before the acknowledgement (the error is raised): the next
        ``connect()``/``reconnect()`` sends it again. A refusal (``ChatRefused``) with a 4xx
        status (too long, rate limited, ...) removes it from ``pending``; with a 5xx (the
        store is unavailable) it stays there, to be sent again.
        """
        client_id = client_id or uuid.uuid4().hex
        if not self.connected:
            await self.connect()  # before it is pending: connect() sends what is pending
        self.pending[client_id] = text
        if room is not None and room != self.room:
            self._pending_rooms[client_id] = room
        return await self._send_pending(client_id, text)

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    async def _send_pending(self, client_id: str, text: str) -> Message:
        raise NotImplementedError

    def _room_of(self, client_id: str) -> str:
        return self._pending_rooms.get(client_id, self.room)

    def event_room(self, data: dict) -> str:
        """The room an event is about: its ``room`` field, absent for the default room."""
        return data.get("room", DEFAULT_ROOM)

    def _wire_room(self, room: str) -> str | None:
        """``room`` as the frames carry it: None for the default room (no field)."""
        return None if room == DEFAULT_ROOM else room

    async def _resend(self) -> None:
        """After (re)connecting: send every pending message again, oldest first."""
        for client_id, text in list(self.pending.items()):
            if client_id in self.pending:
                await self._send_pending(client_id, text)

    def _refused(self, client_id: str | None, error: ChatRefused) -> None:
        """The server refused our message ``client_id``: a 4xx means sending it again cannot
        help (it is no longer pending); a 5xx (the server's trouble) keeps it pending."""
        if client_id in self.pending:
            if not 500 <= error.status < 600:
                del self.pending[client_id]
                self._pending_rooms.pop(client_id, None)
            waiting = self._acked.pop(client_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_exception(error)

    def _acknowledged(self, message: Message) -> None:
        """``message`` (ours) is stored: it is no longer pending."""
        self.pending.pop(message.client_id, None)
        self._pending_rooms.pop(message.client_id, None)
        waiting = self._acked.pop(message.client_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(message)

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message (after its room's cursor); ``TimeoutError`` if none within
        ``timeout``."""
        async with asyncio.timeout(timeout):
            while not self._inbox:  # each round waits on the network, bounded by timeout
                await self._fetch()
        return self._inbox.popleft()

    async def receive_many(self, count: int, timeout: float) -> list[Message]:
        """Exactly ``count`` messages, or ``TimeoutError`` after ``timeout`` seconds in all."""
        async with asyncio.timeout(timeout):
            return [await self.receive() for _ in range(count)]

    async def _fetch(self) -> None:
        raise NotImplementedError

    def _accept(self, data: dict) -> None:
        message = wire.message(data)
        if message.client_id in self.pending and message.user == self.user:
            self._acknowledged(message)  # ours came back (its ack may have been lost)
        room = self.event_room(data)
        cursor = self.cursors.get(room)
        if cursor is not None and message.id > cursor:  # never deliver one twice
            self.cursors[room] = message.id
            self.stats.messages += 1
            self._inbox.append(message)

    def _reset(self, room: str = DEFAULT_ROOM) -> None:
        """The server's log of ``room`` was replaced (it restarted without a database):
        start over in that room."""
        self.resets += 1
        if room in self.cursors:
            self.cursors[room] = 0
        self._inbox = deque(m for m in self._inbox if m.room != room)

    def _handle(self, kind: str, data: dict) -> None:
        """One event from the server, whatever the transport."""
        self.backoff.attempt = 0  # the server took us: the next failure starts from base
        if kind == "message":
            self._accept(data)
            return
        if kind == "ack":
            self._acknowledged(wire.message(data))
        elif kind == "presence" and self.event_room(data) == self.room:
            self.presence = data["users"]
            self.presence_count = data.get("count", len(self.presence))
        elif kind == "typing":
            self.typing.append(data["user"])
        elif kind == "error":
            self.errors.append(data["error"])
            self._refused(data.get("client_id"), ChatRefused(data.get("status", 0), data["error"]))
            if data.get("client_id") is None and data.get("room", self.room) != self.room:
                # A refused join, or a frame about a room this connection is not in (the
                # server names the room, not the message): not in that room.
                refused = ChatRefused(data.get("status", 0), data["error"])
                self.cursors.pop(data["room"], None)
                waiting = self._joining.get(data["room"])
                if waiting is not None and not waiting.done():
                    waiting.set_exception(refused)
                for client_id, room in list(self._pending_rooms.items()):
                    if room == data["room"]:
                        self._refused(client_id, refused)
        elif kind == "joined":
            waiting = self._joining.get(data.get("room"))
            if waiting is not None and not waiting.done():
                waiting.set_result(None)
        elif kind == "reset":
            self._reset(self.event_room(data))
        elif kind == "dm" and isinstance(data.get("room"), str):
            self.dms.add(data["room"])
        if self.on_event is not None:
            self.on_event(kind, data)


def _head_size(headers: httpx.Headers) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


def _status_line_size(response: httpx.Response) -> int:
    return len(f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n")


class HTTPClient(Client):
    """Shared by the HTTP transports: an httpx client, POST to send, byte accounting."""

    def __init__(self, url: str, user: str, *, after: int = 0, origin: str | None = None,
                 **options):
        super().__init__(url, user, after=after, **options)
        self.origin = origin
        self._http: httpx.AsyncClient | None = None

    JOIN_EVERY = 10.0
    """Seconds between two joins (``POST /api/presence``): a server restarted meanwhile has
    forgotten the name, and its presence list holds a name 30 s after its last request."""
    _joined = float("-inf")  # not joined yet: receive() may come before connect()

    async def connect(self) -> None:
        headers = {"Origin": self.origin} if self.origin else {}
        self._http = httpx.AsyncClient(headers={**headers, **self._auth},
                                       timeout=httpx.Timeout(10.0, read=40.0))
        self._joined = float("-inf")
        await self._join()
        await self._resend()

    async def _join(self) -> None:
        """Join the presence list (POST-only: a GET names no one), at most every JOIN_EVERY s."""
        if self.user and time.monotonic() - self._joined >= self.JOIN_EVERY:
            response = await self._post("api/presence" + self._room_query(),
                                        {"user": self.user})
            response.raise_for_status()
            self._joined = time.monotonic()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def connected(self) -> bool:
        return self._http is not None

    def _count(self, response: httpx.Response) -> None:
        request = response.request
        self.stats.requests += 1
        self.stats.bytes_sent += (len(request.method) + len(request.url.raw_path) + 12
                                  + _head_size(request.headers) + len(request.content))
        self.stats.bytes_received += (_status_line_size(response) + _head_size(response.headers)
                                      + len(response.content))

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        if self._http is None:
            await self.connect()
        response = await self._http.request(method, urljoin(self.url, path), **kwargs)
        self._count(response)
        return response

    async def _post(self, path: str, body: dict) -> httpx.Response:
        return await self._request("POST", path, content=wire.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})

    async def _send_pending(self, client_id: str, text: str) -> Message:
        """POST the message; the answer (201, or 200 for a repeat) is the stored message."""
        response = await self._post("api/messages" + self._room_query(self._room_of(client_id)),
                                    {"user": self.user, "text": text, "client_id": client_id})
        if response.status_code not in (200, 201):
            body = response.json()
            error = ChatRefused(response.status_code, body.get("error", ""),
                                body.get("retry_after"))
            self._refused(client_id, error)
            raise error
        message = wire.message(wire.loads(response.content))
        self._acknowledged(message)
        return message

    async def send_typing(self, room: str | None = None) -> None:
        await self._post("api/typing" + self._room_query(room), {"user": self.user})

    def event_room(self, data: dict) -> str:
        return self.room  # one room per HTTP client: every event is about it

    async def rooms(self) -> dict:
        """``GET /api/rooms``: ``{"rooms": [{"room", "last_id"}, ...], "dms": [{"room",
        "with", "last_id"}, ...]}``, the rooms this client may join and its direct messages
        (a room's unread count is its last id minus the client's cursor there)."""
        response = await self._request("GET", "api/rooms?" + urlencode({"user": self.user}))
        response.raise_for_status()
        return wire.loads(response.content)

    async def _poll(self, wait: float) -> int:
        """One GET of the messages after our cursor; returns how many arrived."""
        await self._join()
        params = {"after": self.last_id, "user": self.user}
        if wait:
            params["wait"] = wait
        response = await self._request("GET", "api/messages" + self._room_query(**params))
        response.raise_for_status()
        body = wire.loads(response.content)
        if body.get("reset"):
            self._handle("reset", {})
        if body.get("gap"):  # retention dropped messages after our cursor (README "Resuming")
            self._handle("gap", body["gap"])
        before = len(self._inbox)
        for data in body["messages"]:
            self._accept(data)
        return len(self._inbox) - before


class ChatRefused(Exception):
    """The server refused what we sent: the HTTP status (a WebSocket error frame gives the
    same status) and the server's error message."""

    def __init__(self, status: int, error: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {error}")
        self.status, self.error, self.retry_after = status, error, retry_after


class StreamClosed(ConnectionError):
    """The server ended an SSE stream, saying why as a WebSocket close would (its last
    ``event: close``: the close ``code`` and ``reason``, chatlib.closecode.CLOSES)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"the server ended the event stream ({code} {reason})".strip())
        self.code, self.reason = code, reason


class PollingClient(HTTPClient):
    """Short polling: ask "anything new?" every ``interval`` seconds."""

    transport = "poll"

    def __init__(self, url: str, user: str, *, after: int = 0, interval: float = 1.0,
                 origin: str | None = None,
                 **options):
        super().__init__(url, user, after=after, origin=origin, **options)
        self.interval = interval
        self._next_poll = 0.0

    async def _fetch(self) -> None:
        delay = self._next_poll - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._next_poll = time.monotonic() + self.interval
        await self._poll(wait=0)


class LongPollClient(HTTPClient):
    """Long polling: the server holds each request until there is news (or ``wait`` s)."""

    transport = "longpoll"

    def __init__(self, url: str, user: str, *, after: int = 0, wait: float = 25.0,
                 origin: str | None = None,
                 **options):
        super().__init__(url, user, after=after, origin=origin, **options)
        self.wait = wait

    async def _fetch(self) -> None:
        await self._poll(wait=self.wait)


class SSEClient(HTTPClient):
    """Server-Sent Events: one long response the server keeps writing events into."""

    transport = "sse"

    def __init__(self, url: str, user: str, *, after: int = 0, origin: str | None = None,
                 **options):
        super().__init__(url, user, after=after, origin=origin, **options)
        self._stream = None
        self._chunks = None
        self._parser = wire.SSEParser()
        self._events: deque[wire.SSEEvent] = deque()

    async def connect(self) -> None:
        await super().connect()
        query = self._room_query(after=self.last_id, user=self.user)
        # Say what we want, as EventSource does: jupyter-server-proxy streams a response
        # only to a request with exactly this Accept (it buffers any other until it ends).
        request = self._http.build_request("GET", urljoin(self.url, "api/events" + query),
                                           headers={"Accept": "text/event-stream"})
        self._stream = await self._http.send(request, stream=True)
        if self._stream.status_code != 200:
            await self._stream.aread()  # a refusal's body: its retry_after (server_delay)
        self._stream.raise_for_status()
        self.stats.requests += 1
        self.stats.bytes_sent += len(request.url.raw_path) + 15 + _head_size(request.headers)
        self.stats.bytes_received += (_status_line_size(self._stream)
                                      + _head_size(self._stream.headers))
        self._chunks = self._stream.aiter_bytes()
        self._parser, self._events = wire.SSEParser(), deque()
        self._ended_by = (1006, "")  # no close event: what a WebSocket would say

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = self._chunks = None
        await super().close()

    async def _fetch(self) -> None:
        """Read until at least one event arrived (with wire.SSEParser) and handle them."""
        if self._chunks is None:
            await self.connect()
        while not self._events:  # each round reads from the network
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                raise StreamClosed(*self._ended_by) from None
            self.stats.bytes_received += len(chunk)
            self._events.extend(self._parser.feed(chunk))
        event = self._events.popleft()
        data = wire.loads(event.data)
        if event.event == "close":  # the stream's last event: why it ends
            self._ended_by = (data.get("code", 1006), str(data.get("reason", "")))
        self._handle(event.event, data)


def _frame_size(payload: bytes, masked: bool) -> int:
    n = len(payload)
    return 2 + (0 if n < 126 else 2 if n < 65536 else 8) + (4 if masked else 0) + n


class WebSocketClient(Client):
    """WebSocket: one full-duplex connection; JSON text frames both ways."""

    transport = "ws"

    def __init__(self, url: str, user: str, *, after: int = 0, origin: str | None = None,
                 max_size: int | None = 2**20, **options):
        super().__init__(url, user, after=after, **options)
        self.origin = origin
        self.max_size = max_size
        self.ws = None
        self._reading = asyncio.Lock()  # one reader at a time: receive() or a send's wait

    @property
    def ws_url(self) -> str:
        return urljoin(self.url, "ws").replace("http", "ws", 1)

    async def connect(self) -> None:
        self.ws = await ws_connect(self.ws_url, origin=self.origin, max_size=self.max_size,
                                   compression=None, open_timeout=10,
                                   additional_headers=self._auth)
        self.stats.requests += 1
        await self._send_frame(wire.ws_hello(self.user, self.last_id,
                                             self._wire_room(self.room)))
        await self._rejoin()
        await self._resend()

    @property
    def connected(self) -> bool:
        return self.ws is not None

    async def close(self) -> None:
        if self.ws is not None:
            # More than max_queue (16) unread frames pause reading (websockets' flow
            # control), and then the server's CLOSE reply is never read: close() would hang
            # for close_timeout (10 s). Read on: the closing handshake needs that frame.
            self.ws.transport.resume_reading()
            await self.ws.close()
            self.ws = None

    async def _send_frame(self, text: str) -> None:
        self.stats.bytes_sent += _frame_size(text.encode(), masked=True)
        await self.ws.send(text)

    async def _send_pending(self, client_id: str, text: str) -> Message:
        """Send the frame, then read (queueing what arrives) until it is acknowledged."""
        waiting = self._acked.get(client_id)
        if waiting is None:
            waiting = self._acked[client_id] = asyncio.get_running_loop().create_future()
        await self._send_frame(wire.ws_post(text, client_id,
                                            self._wire_room(self._room_of(client_id))))
        try:
            await self._wait(waiting)
        finally:
            if not waiting.done():
                self._acked.pop(client_id, None)
        return waiting.result()

    async def _wait(self, waiting: asyncio.Future) -> None:
        async with asyncio.timeout(self.ack_timeout):
            while not waiting.done():  # each round reads one frame, bounded by the timeout
                async with self._reading:  # or waits while receive() reads one
                    if not waiting.done():
                        await self._read_frame()

    async def send_typing(self, room: str | None = None) -> None:
        await self._send_frame(wire.ws_typing(self._wire_room(room or self.room)))

    async def _control(self, frame: str) -> None:
        await self._send_frame(frame)

    async def _fetch(self) -> None:
        if self.ws is None:
            await self.connect()
        async with self._reading:
            if not self._inbox:  # a send() waiting for its ack may have read one for us
                await self._read_frame()

    async def _read_frame(self) -> None:
        raw = await self.ws.recv()
        self.stats.bytes_received += _frame_size(
            raw.encode() if isinstance(raw, str) else raw, masked=False)
        self._handle(*wire.parse_ws(raw))


class SessionClosed(StreamClosed):
    """A WebTransport session ended: the server's close capsule's ``code`` and ``reason``
    (chatlib.closecode.CLOSES, read by :func:`server_delay`), or code None if the
    connection ended without one."""

    def __init__(self, code: int | None, reason: str) -> None:
        ConnectionError.__init__(self, f"the WebTransport session ended ({code} {reason})")
        self.code, self.reason = code, reason


class WebTransportClient(Client):
    """WebTransport over HTTP/3 (aioquic): one QUIC connection, one bidirectional stream of
    JSON lines both ways, typing notices as datagrams (chatlib.webtransport).

    ``connect()`` asks ``GET /api/webtransport`` for the session's URL and the certificate's
    SHA-256 (or takes ``wt_url=`` and ``cert_hash=``), opens the QUIC connection, checks that
    the server's certificate has that hash (what a browser's ``serverCertificateHashes``
    does), sends the CONNECT (with ``Authorization`` in token mode), then the hello.
    :attr:`close_code` and :attr:`close_reason` are the server's close capsule's, once it
    sent one.
    """

    transport = "webtransport"

    def __init__(self, url: str, user: str, *, after: int = 0, origin: str | None = None,
                 wt_url: str | None = None, cert_hash: str | None = None, **options):
        super().__init__(url, user, after=after, **options)
        self.origin = origin
        self.wt_url, self.cert_hash = wt_url, cert_hash
        self.close_code: int | None = None
        self.close_reason = ""
        self.setup_time: float | None = None
        """Seconds from the first QUIC packet to the session's 200 (handshake + CONNECT)."""
        self._session = None  # chatlib.webtransport.ClientSession while connected
        self._arrived = asyncio.Event()

    async def connect(self) -> None:
        from .webtransport import ClientSession

        wt_url, cert_hash = self.wt_url, self.cert_hash
        if wt_url is None or cert_hash is None:
            async with httpx.AsyncClient(headers=self._auth, timeout=10.0) as http:
                response = await http.get(urljoin(self.url, "api/webtransport"))
                self.stats.requests += 1
            response.raise_for_status()
            info = response.json()
            if not info.get("available"):
                raise ConnectionError("the server runs without WebTransport")
            wt_url, cert_hash = wt_url or info["url"], cert_hash or info["hash"]
        self.close_code, self.close_reason = None, ""
        self._session = session = ClientSession(self._line, self._datagram, self._ended)
        started = time.perf_counter()
        status, error = await session.open(wt_url, cert_hash, origin=self.origin,
                                           headers=self._auth)
        if status != 200:
            self._session = None
            raise ChatRefused(status, error)
        self.setup_time = time.perf_counter() - started
        self.stats.requests += 1
        self._send_line(wire.ws_hello(self.user, self.last_id, self._wire_room(self.room)))
        await self._rejoin()
        await self._resend()

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.ended

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _send_line(self, text: str) -> None:
        if self._session.ended:  # e.g. refused as busy right after the CONNECT's 200
            raise SessionClosed(self.close_code, self.close_reason)
        data = text.encode() + b"\n"
        self.stats.bytes_sent += len(data)
        self._session.send(data)

    async def _send_pending(self, client_id: str, text: str) -> Message:
        """Write the line, then wait (events arrive meanwhile) until it is acknowledged."""
        waiting = self._acked.get(client_id)
        if waiting is None:
            waiting = self._acked[client_id] = asyncio.get_running_loop().create_future()
        self._send_line(wire.ws_post(text, client_id, self._wire_room(self._room_of(client_id))))
        try:
            async with asyncio.timeout(self.ack_timeout):
                return await asyncio.shield(waiting)
        finally:
            if not waiting.done():
                self._acked.pop(client_id, None)

    async def send_typing(self, room: str | None = None) -> None:
        """A typing notice, as a datagram (it may be lost)."""
        self._session.send_datagram(wire.ws_typing(self._wire_room(room or self.room)).encode())

    async def _control(self, frame: str) -> None:
        self._send_line(frame)

    async def _wait(self, waiting: asyncio.Future) -> None:
        async with asyncio.timeout(self.ack_timeout):
            await asyncio.shield(waiting)

    async def _fetch(self) -> None:
        if not self.connected:
            if self._session is not None and self._session.ended:
                raise SessionClosed(self.close_code, self.close_reason)
            await self.connect()
        self._arrived.clear()
        await self._arrived.wait()

    def _line(self, line: bytes) -> None:
        self.stats.bytes_received += len(line) + 1
        self._handle(*wire.parse_ws(line))
        self._arrived.set()

    def _datagram(self, data: bytes) -> None:
        self.stats.bytes_received += len(data)
        self._handle(*wire.parse_ws(data))
        self._arrived.set()

    def _ended(self, code: int | None, reason: str) -> None:
        """The session ended: a pending send fails (its message stays pending)."""
        self.close_code, self.close_reason = code, reason
        for waiting in [*self._acked.values(), *self._joining.values()]:
            if not waiting.done():
                waiting.set_exception(SessionClosed(code, reason))
        self._acked.clear()
        self._arrived.set()
