"""ChatPanel: a chat window in the notebook that is a real participant in the chat.

The panel is an ipywidgets widget (an :class:`anywidget.AnyWidget`) with two halves:

* the **kernel side** (this module) holds one of chatlib's clients (WebSocket by default)
  in a task on the kernel's event loop. It reconnects with backoff when the connection
  drops and resumes after the last message it has: no gaps, no duplicates. Everything the
  view draws is kept in synced traitlets, bounded (the newest ``shown`` messages), so a
  view opened later (the notebook closed and reopened) draws the same chat;
* the **view** (``panel.js`` and ``panel.css`` next to this file, plain ES module and CSS,
  no build step) only draws that state and reports what the person does. Pressing Enter
  (or Send) sends the whole text in *one* front-end message, ``{"type": "send", "text":
  ..., "client_id": ...}``: the text and the Enter cannot be separated, so a message cannot
  be cut short, and nothing waits for the input box to "settle".

Own messages go through an outbox: each gets a ``client_id`` (chosen by the view), is shown
as pending until the server has it, and is sent again after a reconnect until it has.

Rooms: ``ChatPanel(server, room="lab-1")`` starts in that room (default: the server's default
room, and then the panel is exactly the panel of a chat without rooms). :meth:`ChatPanel.switch`
shows another room (joining it), :meth:`ChatPanel.dm` opens the direct-message room with one
user; in the view, a switcher (shown once the panel is in more than one room) does the same,
and a click on a name under "Here" opens a DM with that person. Each room keeps its own
messages, cursor and gaps; the synced traits (history, presence, gaps) are the room on
screen's. Over WebSocket and WebTransport the one connection is in every room (messages of
the rooms not on screen count as unread in the switcher); over the HTTP transports the
connection follows the room on screen, and switching replaces it (resuming that room after
its cursor). A room the server refuses (private, too many rooms) is dropped, and the status
line says why.

Everything users type is drawn as text (``textContent``), never as HTML.
"""

from __future__ import annotations

import asyncio
import html
import logging
import secrets
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anywidget
import traitlets

from .clients import (
    Backoff,
    ChatRefused,
    LongPollClient,
    PollingClient,
    SSEClient,
    WebSocketClient,
    WebTransportClient,
    retryable,
    server_delay,
)
from .closecode import BUSY, CloseCode, read_close_reason
from .limits import MAX_OUTBOX, Limits
from .store import DEFAULT_ROOM, Message
from .validation import ChatError, printable, valid_client_id
from .wire import dm_room

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
CLIENTS = {"ws": WebSocketClient, "sse": SSEClient, "longpoll": LongPollClient,
           "poll": PollingClient, "webtransport": WebTransportClient}
MULTI_ROOM = {"ws", "webtransport"}
"""Transports whose one connection is in every room of the panel (join/leave frames)."""
ROOMS_EVERY_S = 5.0
"""HTTP transports: how often the other rooms' unread counts are read (as the page does)."""
BACKOFF = dict(base=0.4, cap=5.0)
"""The panel's :class:`~chatlib.clients.Backoff`: a server back on its port is found
within ~5 s."""
TYPING_SHOW_S = 3.0
"""Show "X is typing…" this long after X's last typing notice (as the chat page does)."""
SYNC_EVERY_S = 0.05
"""At most one history update to the view per this many seconds while messages pour in (a
replay of 500 after a reconnect is one or a few updates, not 500); a message that arrives
after a quiet moment goes to the view at once."""


@dataclass
class Outgoing:
    """One own message on its way: pending until the server has it, then sent."""

    client_id: str
    text: str
    room: str = DEFAULT_ROOM
    ts: float = field(default_factory=time.time)
    state: str = "pending"  # pending -> sent (acknowledged), or failed (refused)
    id: int | None = None  # the stored message's id, once the server told us
    error: str = ""  # why the server refused it (state "failed")
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def as_dict(self) -> dict:
        return {"client_id": self.client_id, "text": self.text, "ts": self.ts,
                "state": self.state, "id": self.id, "error": self.error}


@dataclass
class Room:
    """What the panel keeps of one room."""

    name: str
    label: str = ""
    """What the switcher calls it (a DM room: the other person's name)."""
    messages: dict[int, Message] = field(default_factory=dict)
    """Every message received (the newest ``keep``), by id (the room's own ids)."""
    last_id: int = 0
    gaps: list[int] = field(default_factory=list)
    presence: list[str] = field(default_factory=list)
    unread: int = 0
    """Messages of others that arrived while another room was on screen."""


def new_client_id() -> str:
    return secrets.token_hex(16)


PLANNED_CLOSES = {CloseCode.GOING_AWAY: "the server went away",
                  CloseCode.SERVICE_RESTART: "the server is restarting"}
"""WebSocket close codes of a server that stops on purpose (RFC 6455 7.4.1, IANA registry),
as the status line says them."""


def describe(exc: BaseException) -> str:
    """One line saying what went wrong, for the status line."""
    close = getattr(exc, "rcvd", None)  # websockets' ConnectionClosed
    code = getattr(close, "code", None)
    if code == CloseCode.TRY_AGAIN_LATER and read_close_reason(close.reason)[0] == BUSY:
        return f"the server is busy (close {int(code)})"
    if code in PLANNED_CLOSES:
        return f"{PLANNED_CLOSES[code]} (close {int(code)})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def refusal(exc: BaseException) -> str:
    """Why the server refused an HTTP request: its answer's ``error``, else :func:`describe`."""
    try:
        return str(exc.response.json()["error"])
    except Exception:  # no response, not JSON, no "error": say what we know
        return describe(exc)


class ChatPanel(anywidget.AnyWidget):
    """A chat window for the notebook.

    ``target`` is a :class:`~chatlib.ChatServer` or any chat server's URL (a classmate's,
    an instructor's). ``transport`` is one of ``ws``, ``sse``, ``longpoll``, ``poll``, or
    ``webtransport`` (a server started with ``webtransport=True``, on this machine).
    ``shown`` bounds what the view gets (the newest messages); ``keep`` bounds
    :attr:`messages` (per room). ``room`` is the room to start in (default: the server's
    default room). ``token`` is for a server in token mode (default: a server's own shared
    token): a user token (``server.user_token(user, rooms=[...])``) lets the panel into its
    user's DMs and the private rooms it lists, which the shared token does not.
    """

    _esm = HERE / "panel.js"
    _css = HERE / "panel.css"

    # What the view draws. Synced with every view; a view that opens later draws from it.
    user = traitlets.Unicode().tag(sync=True)
    url = traitlets.Unicode().tag(sync=True)
    transport = traitlets.Unicode("ws").tag(sync=True)
    state = traitlets.Unicode("connecting").tag(sync=True)
    """connecting, connected, reconnecting, closed, or failed (an error that retrying
    cannot fix; see :attr:`error`)."""
    error = traitlets.Unicode("").tag(sync=True)
    """The last connection problem, as one line ("" while all is well)."""
    retry_at = traitlets.Float(0.0).tag(sync=True)
    """Unix time of the next reconnect attempt while reconnecting (the view counts down)."""
    presence = traitlets.List(traitlets.Unicode()).tag(sync=True)
    typing = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    """Who (other than us) is typing right now, if anyone."""
    history = traitlets.List(traitlets.Dict()).tag(sync=True)
    """The newest ``shown`` messages, oldest first: ``{id, ts, user, text}``."""
    gaps = traitlets.List(traitlets.Int()).tag(sync=True)
    """Where the server's retention cut messages out (the ``first_id`` of each ``gap``
    event, README "Resuming"): the view says so before the message with that id."""
    outbox = traitlets.List(traitlets.Dict()).tag(sync=True)
    """Own messages not yet in :attr:`history`: ``{client_id, text, ts, state, id, error}``."""
    room = traitlets.Unicode(DEFAULT_ROOM).tag(sync=True)
    """The room on screen (history, presence, gaps and typing are its)."""
    rooms = traitlets.List(traitlets.Dict()).tag(sync=True)
    """Every room the panel is in, in the order it joined them: ``{room, label, unread}``."""
    max_text = traitlets.Int(Limits().max_text).tag(sync=True)
    """The server's longest text (its :class:`~chatlib.Limits`; the defaults for a URL): the
    view counts characters as the text nears it."""

    def __init__(self, target, user: str = "notebook", *, room: str | None = None,
                 transport: str = "ws", token: str | None = None, shown: int = 200,
                 keep: int = 10_000, max_reconnects: int = 10_000) -> None:
        if transport not in CLIENTS:
            raise ValueError(f"transport must be one of {', '.join(CLIENTS)}, not {transport!r}")
        limits = getattr(target, "limits", None)
        home = unicodedata.normalize("NFKC", room).strip() if room else DEFAULT_ROOM
        self._rooms: dict[str, Room] = {home: Room(home)}
        self._home = home  # the connection's first room (ws, webtransport)
        self._previous = home  # where to go back to if the room on screen is refused
        self._room_error = ""  # why the last room asked for was refused
        super().__init__(url=target if isinstance(target, str) else target.url,
                         user=user, transport=transport, room=home,
                         rooms=[{"room": home, "label": home, "unread": 0}],
                         max_text=limits.max_text if isinstance(limits, Limits)
                         else Limits().max_text)
        self._token = token or (None if isinstance(target, str)
                                else getattr(target, "token", None))
        self.shown = shown
        self.keep = keep
        self.max_reconnects = max_reconnects
        self.connections = 0  # successful (re)connections so far
        self._client = None
        self._client_was_connected = False
        self._loop = asyncio.get_running_loop()  # the kernel's: everything runs on it
        self._changed = asyncio.Event()
        self._switched = asyncio.Event()  # HTTP transports: the room on screen changed
        self._joins: dict[str, asyncio.Task] = {}  # ws, webtransport: a join on its way
        self._outbox: dict[str, Outgoing] = {}  # insertion order is sending order
        self._wake_sender = asyncio.Event()
        self._typing_timer: asyncio.TimerHandle | None = None
        self._sync_handle: asyncio.Handle | None = None
        self._last_sync = 0.0
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget tasks, referenced until done
        self.on_msg(self._on_view_message)
        self._task = self._loop.create_task(self._run())

    @property
    def messages(self) -> dict[int, Message]:
        """Every message received in the room on screen (the newest ``keep``), by id."""
        return self._rooms[self.room].messages

    @property
    def last_id(self) -> int:
        """The cursor of the room on screen: the newest id received there."""
        return self._rooms[self.room].last_id

    # -- rooms ---------------------------------------------------------------------------

    def switch(self, room: str, label: str = "") -> None:
        """Show ``room``, joining it first if the panel is not in it yet. A refusal (a
        private room, too many rooms) comes back in :attr:`error`, and the panel goes back
        to the room it showed."""
        name = unicodedata.normalize("NFKC", room).strip()
        self._room_error = ""
        new = name not in self._rooms
        if new:
            self._rooms[name] = Room(name, label)
        if name != self.room:
            self._previous = self.room
            shown = self._rooms[name]
            shown.unread = 0
            self._set(room=name, gaps=list(shown.gaps), presence=list(shown.presence),
                      typing=None)
            self._sync_history(now=True)
            if self.transport not in MULTI_ROOM:
                self._switched.set()  # a connection of this room replaces the current one
        if new and self.transport in MULTI_ROOM and self._client is not None:
            self._joins[name] = self._spawn(self._join(self._client, name))
        self._sync_rooms()

    def dm(self, user: str) -> None:
        """Show the direct-message room with ``user`` (only the two of you read it)."""
        self.switch(dm_room(self.user, user), label=user)

    async def _join(self, client, name: str) -> None:
        try:
            await client.join(name)
        except ChatRefused as exc:
            self._room_refused(name, exc.error)

    def _room_refused(self, name: str, error: str) -> None:
        """The server would not let us into ``name``: say so (until the next switch), and
        leave it."""
        if name in self._rooms and name != self._home:
            if self.room == name:
                self.switch(self._previous if self._previous in self._rooms
                            and self._previous != name else self._home)
            del self._rooms[name]
            for entry in [e for e in self._outbox.values() if e.room == name]:
                self._fail(entry, f"cannot join {name}")
            self._sync_rooms()
        self._room_error = f"cannot join {name}: {error}"
        self._set(error=self._room_error)

    def _sync_rooms(self) -> None:
        self._set(rooms=[{"room": r.name, "label": r.label or r.name, "unread": r.unread}
                         for r in self._rooms.values()])

    # -- what a saved notebook shows without a kernel -------------------------------------

    def __repr__(self) -> str:
        return (f"<ChatPanel {self.user!r} over {self.transport} to {self.url}: {self.state}, "
                f"{len(self.messages)} messages>")

    def _repr_mimebundle_(self, **kwargs):
        """The widget, plus what a notebook shows where no widget can be drawn.

        A notebook opened fresh (not trusted, no kernel) or rendered on a website shows the
        text/html or text/plain of this bundle instead of the widget: a short snapshot and
        how to bring the chat to life, never the widget's internals and no link to a port
        that no longer answers.
        """
        data, metadata = super()._repr_mimebundle_(**kwargs)
        data["text/plain"] = (f"ChatPanel: a live chat window ({self.user} over "
                              f"{self.transport}). Run the notebook's cells to join the chat.")
        data["text/html"] = self._snapshot_html()
        return data, metadata

    def _snapshot_html(self, last: int = 10) -> str:
        rows = "".join(
            f"<li><b>{html.escape(m['user'])}</b>: {html.escape(printable(m['text']))}</li>"
            for m in self.history[-last:])
        return (
            '<div class="chatlib-snapshot" style="border:1px solid #bbb;border-radius:6px;'
            'padding:6px 10px;max-width:640px">'
            f"<b>ChatPanel</b>: a live chat window ({html.escape(self.user)} over "
            f"{html.escape(self.transport)}).<br><i>Run the notebook's cells to join the "
            f"chat.</i>{f'<ul>{rows}</ul>' if rows else ''}</div>")

    # -- the connection ------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(**BACKOFF)
        error: BaseException | None = None
        self._planned = False  # the last close was a planned one (PLANNED_CLOSES)
        switched = False  # the last connection ended for a switch of rooms: no pause
        try:
            for attempt in range(self.max_reconnects):
                if attempt and not switched:
                    # As the server asked (a close reason's delay, a 503's retry_after), else
                    # exponential backoff with full jitter, so that a restarted server isn't
                    # hit by everyone at the same instant (chatlib.clients.Backoff). The view
                    # counts down to retry_at. Who is here and typing is unknown until we
                    # are back.
                    pause = backoff.delay(server_delay(error))
                    self._set(state="reconnecting", retry_at=time.time() + pause,
                              presence=[], typing=None)
                    await asyncio.sleep(pause)
                    self._set(retry_at=0.0)
                try:
                    switched = await self._connection()
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error, switched = exc, False
                    if not retryable(exc):
                        logger.error("ChatPanel %s: stopped by an error", self.url, exc_info=exc)
                        self._set(state="failed", error=describe(exc))
                        return
                    # Shown in the panel's own status line (with the countdown); the log gets
                    # it at INFO only: a WARNING would land on the kernel's stderr, under the
                    # cell that made the panel, for what is an expected event (a restart).
                    if isinstance(exc, ConnectionRefusedError) and self._planned:
                        continue  # a restarting server is not listening yet: keep saying so
                    self._planned = getattr(getattr(exc, "rcvd", None), "code",
                                            None) in PLANNED_CLOSES
                    if describe(exc) != self.error:  # once per kind of problem, not per retry
                        logger.info("ChatPanel %s: connection lost (%s); reconnecting",
                                    self.url, describe(exc))
                    self._set(error=describe(exc))
                    if self._client_was_connected:
                        backoff.reset()  # it worked until now: retry soon
            self._set(state="closed")
        finally:
            if self.state not in ("closed", "failed"):
                self._set(state="closed")

    async def _connection(self) -> bool:
        """One connection: receive messages and send the outbox until either fails (raises
        what ended it), or, on an HTTP transport, until the room on screen changes (returns
        True). WebSocket and WebTransport join every room of the panel, each after its own
        cursor; an HTTP transport follows the room on screen."""
        self._client_was_connected = False
        multi = self.transport in MULTI_ROOM
        first = self._rooms[self._home if multi else self.room]
        client = CLIENTS[self.transport](self.url, self.user, after=first.last_id,
                                         room=first.name,
                                         token=self._token)  # a server in token mode
        if multi:
            client.cursors.update({r.name: r.last_id for r in self._rooms.values()})
        client.on_event = lambda kind, data: self._on_event(kind, data, client.event_room(data))
        self._switched.clear()
        try:
            try:
                await client.connect()
            except Exception as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if multi or status != 403 or first.name == self._home:
                    raise
                self._room_refused(first.name, refusal(exc))  # we may not read that room
                return True
            self._client = client
            self._client_was_connected = True
            self.connections += 1
            self._set(state="connected", error=self._room_error)
            receiver = self._loop.create_task(self._receive_loop(client))
            sender = self._loop.create_task(self._send_loop(client))
            switch = self._loop.create_task(self._switched.wait())
            tasks = {receiver, sender, switch}
            if not multi:
                tasks.add(self._loop.create_task(self._watch_rooms(client)))
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in done - {switch}:
                task.result()  # raises what ended the connection
            if switch in done:
                return True
            raise ConnectionError("the connection ended")
        finally:
            self._client = None
            for name, cursor in client.cursors.items():
                if name in self._rooms:
                    room = self._rooms[name]
                    room.last_id = max(room.last_id, cursor)
            try:
                await client.close()
            except Exception as exc:  # closing a broken connection may fail: nothing to do
                logger.debug("ChatPanel: close failed: %s", describe(exc))

    async def _watch_rooms(self, client) -> None:
        """HTTP transports, whose connection follows the room on screen only: every
        ROOMS_EVERY_S, the rooms' last ids (``GET /api/rooms``) give the other rooms'
        unread counts (ids are per room: last id minus our cursor there), and its ``dms``
        the DM rooms someone opened with us (what a ``dm`` event tells a WebSocket)."""
        while True:  # ends when the connection does (cancelled)
            try:
                listed = await client.rooms()
            except Exception as exc:  # unread counts are a convenience: try again later
                logger.debug("ChatPanel: GET api/rooms failed: %s", describe(exc))
            else:
                for entry in listed.get("dms", []):
                    if entry.get("last_id", 0) > 0:
                        self._dm_arrived(entry["room"], entry.get("with"))
                for entry in [*listed.get("rooms", []), *listed.get("dms", [])]:
                    room = self._rooms.get(entry.get("room"))
                    if room is not None and room.name != self.room:
                        room.unread = max(0, entry.get("last_id", 0) - room.last_id)
                self._sync_rooms()
            await asyncio.sleep(ROOMS_EVERY_S)

    async def _receive_loop(self, client) -> None:
        while True:  # ends when the connection does
            self._add(await client.receive())

    def _on_event(self, kind: str, data: dict, room: str = DEFAULT_ROOM) -> None:
        """One event that is not a message, about ``room`` (the client says which)."""
        here = self._rooms.get(room)
        on_screen = room == self.room
        if kind == "presence" and here is not None:
            here.presence = [u for u in data.get("users", []) if isinstance(u, str)]
            if on_screen:
                self._set(presence=list(here.presence))
        elif kind == "typing" and on_screen and data.get("user") != self.user:
            self._set(typing=data.get("user"))
            if self._typing_timer:
                self._typing_timer.cancel()
            self._typing_timer = self._loop.call_later(TYPING_SHOW_S, self._clear_typing)
        elif kind == "reset" and here is not None:  # the room's history was replaced
            here.messages.clear()
            here.last_id = 0
            here.gaps = []
            if on_screen:
                self._set(gaps=[])
        elif kind == "gap" and here is not None and isinstance(data.get("first_id"), int):
            if data["first_id"] not in here.gaps:  # messages up to first_id - 1 are lost
                here.gaps = [*here.gaps, data["first_id"]]
            if on_screen:
                self._set(gaps=list(here.gaps))
                self._sync_history(now=True)
        elif kind == "dm" and isinstance(data.get("room"), str):
            self._dm_arrived(data["room"], data.get("from"))
        elif kind == "ack":
            entry = self._outbox.get(data.get("client_id"))
            if entry is not None and isinstance(data.get("id"), int):
                self._mark_sent(entry, data["id"], None)
        elif kind == "error":
            entry = self._outbox.get(data.get("client_id"))
            if entry is not None:  # the server refused this message
                self._fail(entry, str(data.get("error", "refused")))
            elif room != self._home and "client_id" not in data:  # a join refused
                self._room_refused(room, str(data.get("error", "")))
            else:
                self._set(error=str(data.get("error", "")))
        self._notify()

    def _dm_arrived(self, room: str, sender) -> None:
        """Someone wrote to us in DM room ``room``: it joins the switcher (unread)."""
        if room in self._rooms:
            return
        self._rooms[room] = Room(room, sender if isinstance(sender, str) else "")
        if self.transport in MULTI_ROOM and self._client is not None:
            self._joins[room] = self._spawn(self._join(self._client, room))
        self._sync_rooms()

    def _clear_typing(self) -> None:
        self._set(typing=None)

    def _add(self, message: Message) -> None:
        room = self._rooms.get(message.room)
        if room is None or message.id in room.messages:
            return  # a room we left, or a repeat
        room.messages[message.id] = message
        while len(room.messages) > self.keep:  # dicts keep insertion (= id) order
            del room.messages[next(iter(room.messages))]
        room.last_id = max(room.last_id, message.id)
        if message.room != self.room:
            if message.user == self.user:
                self._settle_own(message)
            else:
                room.unread += 1
                self._sync_rooms()
            self._notify()
            return
        if message.user == self.user:
            self._settle_own(message)
        elif message.user == self.typing:
            self._clear_typing()  # who just sent a message has stopped typing
        self._sync_history()
        self._notify()

    # -- state for the view ---------------------------------------------------------------

    def _set(self, **traits) -> None:
        with self.hold_sync():  # one message to the view for all of them
            for name, value in traits.items():
                setattr(self, name, value)
        self._notify()

    def _sync_history(self, now: bool = False) -> None:
        """Send the newest ``shown`` messages (and the outbox) to the view, coalesced."""
        if now and self._sync_handle is not None:
            self._sync_handle.cancel()
            self._sync_handle = None
        if self._sync_handle is not None:
            return  # one is scheduled already
        wait = 0.0 if now else self._last_sync + SYNC_EVERY_S - time.monotonic()
        if wait <= 0:
            self._flush()
        else:
            self._sync_handle = self._loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        self._sync_handle = None
        self._last_sync = time.monotonic()
        newest = list(self.messages.values())[-self.shown:]
        self._set(history=[m.to_dict() for m in newest],
                  outbox=[e.as_dict() for e in self._outbox.values() if e.room == self.room])

    def _notify(self) -> None:
        """Wake everyone in :meth:`wait_for`, then arm a fresh event for the next change."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- sending -------------------------------------------------------------------------

    def _on_view_message(self, _widget, content, _buffers) -> None:
        """One message from a view: what the person did (see panel.js)."""
        if not isinstance(content, dict):
            return
        kind = content.get("type")
        if kind == "send":
            text = content.get("text")
            client_id = content.get("client_id")
            if isinstance(text, str) and text.strip():
                try:
                    self._enqueue(text, client_id if valid_client_id(client_id) else None)
                except OverflowError as exc:
                    self._set(error=f"not sent: {exc}")
        elif kind == "typing":
            client = self._client
            if client is not None:
                self._spawn(client.send_typing(self.room))
        elif kind == "switch" and isinstance(content.get("room"), str):
            self._from_view(self.switch, content["room"])
        elif kind == "dm" and isinstance(content.get("user"), str):
            self._from_view(self.dm, content["user"])
        elif kind == "discard":
            entry = self._outbox.get(content.get("client_id"))
            if entry is not None and entry.state == "failed":
                del self._outbox[entry.client_id]
                self._sync_outbox()
        elif kind == "hello":  # a view asks whether a kernel is there: yes
            self.send({"type": "hello"})

    def _from_view(self, action, value: str) -> None:
        """A room switch or DM the person asked for; a name the server's rules refuse (or a
        DM with oneself) is said in the status line."""
        try:
            action(value)
        except (ChatError, ValueError) as exc:
            self._set(error=str(exc))

    def _enqueue(self, text: str, client_id: str | None = None) -> Outgoing:
        if client_id in self._outbox:  # the same message again (a view resent it)
            return self._outbox[client_id]
        if len(self._outbox) >= MAX_OUTBOX:
            raise OverflowError(f"{MAX_OUTBOX} messages are waiting to be sent already")
        entry = Outgoing(client_id or new_client_id(), text, self.room)
        self._outbox[entry.client_id] = entry
        self._wake_sender.set()
        self._sync_outbox()
        return entry

    def _sync_outbox(self) -> None:
        # With the history, in one update: a message leaving the outbox is in the history.
        self._sync_history(now=True)

    async def _send_loop(self, client) -> None:
        """Send what the outbox holds, oldest first, one at a time (so in order)."""
        # A message that was on its way when the last connection broke (still pending: no
        # ack) is sent again, with the same client_id: the server stores it once.
        while True:  # ends when the connection does (an exception) or is cancelled
            entry = next((e for e in self._outbox.values() if e.state == "pending"), None)
            if entry is None:
                self._wake_sender.clear()
                await self._wake_sender.wait()
                continue
            joining = self._joins.get(entry.room)
            if joining is not None and not joining.done():
                # Its room's join first: a message the server reads before it is refused
                # (not in that room), and the join runs in a task of its own.
                await asyncio.shield(joining)
                continue  # (the room may have been refused: its messages failed)
            try:
                # Returns once the server has stored it (a WebSocket waits for the ack).
                message = await client.send(entry.text, client_id=entry.client_id,
                                            room=entry.room)
            except ChatRefused as exc:
                if retryable(exc):  # 429, 5xx: the connection starts over, then resends
                    raise
                self._fail(entry, exc.error or str(exc))
                continue
            self._mark_sent(entry, message.id, message)

    def _mark_sent(self, entry: Outgoing, message_id: int | None,
                   message: Message | None) -> None:
        if entry.client_id not in self._outbox:
            return
        entry.state, entry.id = "sent", message_id
        stored = self._rooms[entry.room].messages if entry.room in self._rooms else {}
        if not entry.done.done():
            entry.done.set_result(message or stored.get(message_id))
        if message_id is not None and message_id in stored:
            del self._outbox[entry.client_id]  # its echo is here already
        self._sync_history(now=True)
        self._notify()

    def _fail(self, entry: Outgoing, error: str) -> None:
        entry.state, entry.error = "failed", error
        if not entry.done.done():
            entry.done.set_exception(ChatRefused(400, error))
            entry.done.exception()  # retrieved: nobody may be awaiting it
        self._sync_outbox()
        self._notify()

    def _settle_own(self, message: Message) -> None:
        """Our own message came back from the server: it leaves the outbox. (It may come
        back before its ack, or instead of one that was lost: its client_id tells.)"""
        entry = self._outbox.get(message.client_id) if message.client_id else None
        if entry is None:
            return
        del self._outbox[entry.client_id]
        if not entry.done.done():
            entry.done.set_result(message)

    def send(self, text, buffers=None, *, timeout: float | None = 10.0):
        """``await panel.send(text)``: send ``text`` as this panel's user, once the server
        has it.

        Returns the stored :class:`Message` (with its id) once the server has acknowledged
        it. While disconnected the message waits in the outbox (shown as pending) and goes
        out after reconnecting, with the same ``client_id``, so it is stored once; on
        ``TimeoutError`` it is still waiting there. A refusal raises ``ChatRefused``.

        Called with a dict this is ipywidgets' ``Widget.send`` (a custom message to the
        views), which ipywidgets itself uses (``focus()``, ``blur()``).
        """
        if isinstance(text, str):
            return self._send_text(text, timeout)
        return super().send(text, buffers)

    async def _send_text(self, text: str, timeout: float | None) -> Message:
        entry = self._enqueue(text)
        return await asyncio.wait_for(asyncio.shield(entry.done), timeout)

    @property
    def pending(self) -> list[str]:
        """Texts of own messages the server has not confirmed yet, oldest first."""
        return [e.text for e in self._outbox.values() if e.state == "pending"]

    def _spawn(self, coroutine) -> asyncio.Task:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A lost typing notice is not worth more: the connection's own loop reports
            # a broken connection.
            logger.debug("ChatPanel: %s", describe(task.exception()))

    # -- waiting (for notebooks and tests: wait on events, not sleeps) --------------------

    async def wait_for(self, predicate: Callable[[ChatPanel], bool],
                       timeout: float = 10.0) -> None:
        """Wait until ``predicate(panel)`` is true; ``TimeoutError`` after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while not predicate(self):  # each round waits for a change
                await self._changed.wait()

    async def wait_for_text(self, text: str, timeout: float = 10.0) -> Message:
        """Wait until a message with exactly ``text`` is shown, and return it."""
        await self.wait_for(lambda p: any(m.text == text for m in p.messages.values()),
                            timeout)
        return next(m for m in self.messages.values() if m.text == text)

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await self.wait_for(lambda p: p.state == "connected", timeout)

    async def aclose(self) -> None:
        """Disconnect and stop reconnecting (the view stays, saying closed)."""
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        for task in list(self._tasks):
            task.cancel()
        if self._sync_handle is not None:
            self._sync_handle.cancel()
            self._flush()
        self._set(state="closed", retry_at=0.0)

    def close(self) -> None:
        """Close the widget (its views disappear) and stop its connection."""
        task = getattr(self, "_task", None)  # absent if __init__ failed early
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:  # the loop is closed already (interpreter shutdown)
                pass
        super().close()

