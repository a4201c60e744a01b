"""The message log: one ordered history that every transport reads and writes.

A transport never talks to another transport. It appends to the log and reads the log
*after* a cursor (the last id its client has seen). That one idea is what makes resume
work everywhere: a client that reconnects sends its cursor (``after=``, ``Last-Event-ID``,
``{"type": "hello", "after": ...}``) and gets exactly what it missed, no gaps, no repeats.

Two stores implement :class:`MessageLog`:

* :class:`MemoryLog` (the default): a list in the server's process; history lives as long
  as the process (a re-run of the start cell in a notebook keeps it).
* :class:`SQLiteLog`: the same interface on an SQLite database file, for history that
  survives restarts and for several server processes sharing one history (each server
  looks for the others' messages every ``poll_interval`` seconds, :meth:`SQLiteLog.follow`,
  and fans them out).

Sending is made exactly-once in effect the same way receiving is, with an id: a client may
give each message a ``client_id`` of its own choosing, and :meth:`MessageLog.append` stores
a repeat of ``(user, client_id)`` only once, returning the original. A client that lost the
acknowledgement (connection dropped, server restarted) simply sends again with the same
``client_id``. MemoryLog remembers the client ids of the messages it still holds (so the
dedupe window is what it keeps); SQLiteLog keeps them in the table (across restarts, within
retention).

Rooms: a message belongs to a room, and each room is a log of its own, with its own ids
(1, 2, 3...), retention and dedupe: :meth:`MessageLog.room` returns it. The log a server is
given is the room :data:`DEFAULT_ROOM`'s, so everything that says nothing about rooms is
in that one, and its messages carry no ``room`` on the wire. Per-room ids, rather than one
id for all rooms and a filter, keep the resume protocol (cursors, gaps, pages) exactly as
it is, per room; what it costs a client in several rooms is one cursor per room.

Retention is explicit and bounded on every log: the newest ``max_messages`` messages
(:data:`RETAIN_MESSAGES` by default) and at most ``max_bytes`` of them
(:data:`RETAIN_BYTES`); the oldest go first. ``first_id()`` says which is the oldest
still kept, so a client resuming from before it can be told so (a gap), not silently
served what is left.

A client id is bound to its user and its text: another user's message with the same
``client_id`` is a message of its own, and the same user reusing it for a *different*
text gets :func:`reused_client_id` (422, as the IETF Idempotency-Key draft answers a key
reused with another payload) rather than the original, which its client would otherwise
take for an acknowledgement of its own text.
"""

from __future__ import annotations

import asyncio
import bisect
import sqlite3
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from .limits import MAX_ROOMS, RETAIN_BYTES, RETAIN_MESSAGES, TRIM_TO
from .validation import DEFAULT_ROOM, ChatError, printable


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. ``id`` strictly increases; ``ts`` is Unix time in seconds.

    ``client_id`` is the sender's own id for it, if it gave one (see the module docstring);
    it is part of the JSON only when set, so that a sender whose acknowledgement was lost
    recognises its message in the history it resumes. ``room`` is the room (the log) it
    belongs to; ``id`` is an id of that room's. It is part of the JSON only when it is not
    :data:`DEFAULT_ROOM`, so the default room's messages are what they were before rooms.
    """

    id: int
    ts: float
    user: str
    text: str
    client_id: str | None = None
    room: str = DEFAULT_ROOM

    def __str__(self) -> str:
        """``#id user: text``, safe to print: see :func:`chatlib.validation.printable`."""
        return f"#{self.id} {printable(self.user)}: {printable(self.text)}"

    def to_dict(self) -> dict:
        """The message's JSON object (the wire format's). Built once per message: the last
        message's is kept, and every encoding of it (WebSocket frame, SSE event, poll
        answer, the sender's ack) gets that same dict, which nobody may change."""
        global _last_dict
        if _last_dict[0] is self:
            return _last_dict[1]
        # Spelled out rather than dataclasses.asdict(), which copies field by field.
        if self.client_id is None:
            data = {"id": self.id, "ts": self.ts, "user": self.user, "text": self.text}
        else:
            data = {"id": self.id, "ts": self.ts, "user": self.user, "text": self.text,
                    "client_id": self.client_id}
        if self.room != DEFAULT_ROOM:
            data["room"] = self.room
        _last_dict = (self, data)
        return data


_last_dict: tuple[Message | None, dict] = (None, {})


def too_many_rooms(max_rooms: int) -> ChatError:
    """What a log raises for a room beyond its ``max_rooms``: 429."""
    return ChatError(429, f"too many rooms (at most {max_rooms})")


def reused_client_id(original: Message) -> ChatError:
    """What a log raises when ``(user, client_id)`` is stored with another text: 422."""
    return ChatError(422, f"client_id {original.client_id!r} was already used for another"
                          f" text (message {original.id}): use a new one")


class Page(NamedTuple):
    """One read of the log (:meth:`MessageLog.page`): messages after a cursor, and the
    log's bounds at that moment."""

    messages: list[Message]
    """Up to ``limit`` messages after the cursor, oldest first."""
    first_id: int
    """The oldest id the log keeps (``last_id + 1`` if it is empty)."""
    last_id: int
    """The newest id in the log (0 if it is empty)."""


class StoreUnavailable(Exception):
    """The store cannot be reached right now (e.g. Redis is restarting): nothing was stored
    or read. The server answers 503 and the client may try again."""


class MessageLog(Protocol):
    """What every store offers: the log of one room. All methods but :meth:`room` are
    coroutines so a store may do I/O."""

    name: str
    """The room this log is (:data:`DEFAULT_ROOM` for the log a server is given)."""

    shared: bool
    """Whether other processes append to this log too (then :meth:`follow` tells of
    their messages, and :meth:`bus` may connect the processes' presence and typing)."""

    pushes: bool
    """Whether :meth:`follow` yields every append, this process's too, as it happens: the
    hub then reads nothing back after its own appends (it fans them out as they come)."""

    async def append(self, user: str, text: str,
                     client_id: str | None = None) -> tuple[Message, bool]:
        """Store a message with the next id and a timestamp: ``(message, False)``.

        A repeat of ``(user, client_id)`` (``client_id`` not None) stores nothing and
        returns ``(original, True)``; with another text it raises :func:`reused_client_id`.
        """

    async def after(self, after_id: int, limit: int = 1000) -> list[Message]:
        """Up to ``limit`` messages with ``id > after_id``, oldest first."""

    async def page(self, after_id: int, limit: int) -> Page:
        """:meth:`after`, :meth:`first_id` and :meth:`last_id` in one read (one round trip
        to a store elsewhere): what a poll needs to answer, resume protocol included."""

    async def before(self, before_id: int, limit: int) -> list[Message]:
        """The newest ``limit`` messages with ``id < before_id``, oldest first (an older
        page, for a client that joined with the newest)."""

    async def last_id(self) -> int:
        """The newest id in the log, 0 if it is empty."""

    async def first_id(self) -> int:
        """The oldest id the log still keeps (retention), ``last_id() + 1`` if it is empty."""

    def follow(self, after_id: int) -> AsyncIterator[list[Message]]:
        """Pages of the messages after ``after_id`` that other processes append, in id
        order, as they come, until cancelled; they may hold this process's own too. A log
        that only this process writes (not :attr:`shared`) ends at once. An empty page
        says the log went back (its ids start again below ``after_id``: emptied, replaced);
        the pages after it start from the new log's beginning."""

    def bus(self) -> Bus | None:
        """A new channel for presence and typing between the processes sharing this log
        (the server runs and closes it); None: there is none."""

    def room(self, name: str) -> MessageLog:
        """The log of room ``name`` in the same store (no I/O): the same object for the
        same name, ``self`` for this log's own, and the default room's log for
        :data:`DEFAULT_ROOM` from any room's. A store may bound how many rooms it holds:
        one more raises ChatError 429, here or at the new room's first append."""

    async def rooms(self) -> dict[str, int]:
        """Every room the store holds with at least one message, and the default room,
        with its last id."""

    async def close(self) -> None:
        """Release what the store holds (files, connections); on any room's log, the
        whole store's."""


class Bus(Protocol):
    """Presence and typing between server processes (chatlib.redis_bus.RedisBus)."""

    async def run(self, here: Callable[[], set[str]], typing: Callable[[str], None],
                  elsewhere: Callable[[frozenset[str]], None]) -> None:
        """Until cancelled: publish ``here()``, this process's users; call
        ``elsewhere(users)`` when the other processes' users change and ``typing(user)``
        when someone types on another process."""

    def typing(self, user: str) -> None:
        """Tell the other processes that ``user`` is typing here."""

    async def close(self) -> None:
        """Leave (this process's users are gone) and release connections."""


class MemoryLog:
    """The in-memory log: a list ordered by id, searched with :func:`bisect`.

    ``max_messages`` and ``max_bytes`` bound memory: beyond either, the oldest messages are
    dropped (down to :data:`TRIM_TO` of the cap). Bytes are what the process holds for a
    message: its strings (``sys.getsizeof``: 4 bytes per character once a text has an
    emoji) and :data:`MESSAGE_OVERHEAD`. The log is also the dedupe window: a repeated
    ``client_id`` is recognised while its original is still held, by one dict entry per
    message that has a ``client_id``. A repeat of an older one is stored again.
    """

    MESSAGE_OVERHEAD = 200
    """Bytes per message besides its strings: the Message, its id and its list slots."""

    def __init__(self, max_messages: int = RETAIN_MESSAGES,
                 max_bytes: int = RETAIN_BYTES, *, max_rooms: int = MAX_ROOMS) -> None:
        self.name = DEFAULT_ROOM
        self.max_rooms = max_rooms
        """Rooms this store holds at most (the default room included): the first message
        of one more is refused (429)."""
        # Shared by every room's log: the rooms with messages, and the logs of rooms without
        # any that someone holds (a hub, a request): reading a room makes nothing that stays.
        self._rooms: dict[str, MemoryLog] = {DEFAULT_ROOM: self}
        self._empty: weakref.WeakValueDictionary[str, MemoryLog] = \
            weakref.WeakValueDictionary()
        self._messages: list[Message] = []
        self._ids: list[int] = []
        self._by_client_id: dict[tuple[str, str], Message] = {}
        self._next_id = 1
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.bytes = 0
        """Bytes the kept messages hold (see the class docstring)."""

    def _size(self, message: Message) -> int:
        size = self.MESSAGE_OVERHEAD + sys.getsizeof(message.text) + sys.getsizeof(message.user)
        return size if message.client_id is None else size + sys.getsizeof(message.client_id)

    async def append(self, user: str, text: str,
                     client_id: str | None = None) -> tuple[Message, bool]:
        if client_id is not None:
            original = self._by_client_id.get((user, client_id))
            if original is not None:
                if original.text != text:
                    raise reused_client_id(original)
                return original, True
        if self._next_id == 1 and self.name not in self._rooms:  # a room's first message
            if len(self._rooms) >= self.max_rooms:
                raise too_many_rooms(self.max_rooms)
            self._rooms[self.name] = self
            self._empty.pop(self.name, None)
        message = Message(self._next_id, time.time(), user, text, client_id, self.name)
        self._next_id += 1
        self._messages.append(message)
        self._ids.append(message.id)
        self.bytes += self._size(message)
        if client_id is not None:
            self._by_client_id[(user, client_id)] = message
        if len(self._messages) > self.max_messages or self.bytes > self.max_bytes:
            self._trim()
        return message, False

    def _trim(self) -> None:
        """Drop the oldest messages down to TRIM_TO of both caps (in one slice, so that
        appends stay O(1) amortised); the newest message always stays."""
        keep_messages = int(self.max_messages * TRIM_TO)
        keep_bytes = int(self.max_bytes * TRIM_TO)
        messages, drop, held = self._messages, 0, self.bytes
        while drop < len(messages) - 1 and (len(messages) - drop > keep_messages
                                            or held > keep_bytes):
            held -= self._size(messages[drop])
            drop += 1
        if self._by_client_id:
            for old in messages[:drop]:
                if old.client_id is not None:
                    self._by_client_id.pop((old.user, old.client_id), None)
        del messages[:drop], self._ids[:drop]
        self.bytes = held

    async def after(self, after_id: int, limit: int = 1000) -> list[Message]:
        start = bisect.bisect_right(self._ids, after_id)
        return self._messages[start : start + limit]

    async def page(self, after_id: int, limit: int) -> Page:
        start = bisect.bisect_right(self._ids, after_id)
        return Page(self._messages[start : start + limit],
                    self._ids[0] if self._ids else self._next_id, self._next_id - 1)

    async def before(self, before_id: int, limit: int) -> list[Message]:
        end = bisect.bisect_left(self._ids, before_id)
        return self._messages[max(end - limit, 0) : end]

    async def last_id(self) -> int:
        return self._next_id - 1

    async def first_id(self) -> int:
        return self._ids[0] if self._ids else self._next_id

    shared = pushes = False  # only this process writes it

    async def follow(self, after_id: int) -> AsyncIterator[list[Message]]:
        return
        yield  # an async generator that ends at once

    def bus(self) -> None:
        return None

    def room(self, name: str) -> MemoryLog:
        log = self._rooms.get(name) or self._empty.get(name)
        if log is None:
            log = MemoryLog(self.max_messages, self.max_bytes, max_rooms=self.max_rooms)
            log.name, log._rooms, log._empty = name, self._rooms, self._empty
            self._empty[name] = log
        return log

    async def rooms(self) -> dict[str, int]:
        return {name: log._next_id - 1 for name, log in self._rooms.items()}

    async def close(self) -> None:
        pass


class _SQLiteReads:
    """What the default room's log and the other rooms' share: every call runs in the
    store's one worker thread (see :class:`SQLiteLog`), and :meth:`follow` polls."""

    _thread: ThreadPoolExecutor
    poll_interval: float

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def append(self, user: str, text: str,
                     client_id: str | None = None) -> tuple[Message, bool]:
        return await self._run(self._insert, user, text, client_id)

    async def after(self, after_id: int, limit: int = 1000) -> list[Message]:
        return await self._run(self._select, after_id, limit)

    async def page(self, after_id: int, limit: int) -> Page:
        return await self._run(self._page, after_id, limit)

    async def before(self, before_id: int, limit: int) -> list[Message]:
        return await self._run(self._select_before, before_id, limit)

    async def last_id(self) -> int:
        return await self._run(self._max_id)

    async def first_id(self) -> int:
        return await self._run(self._min_id)

    pushes = False  # follow() polls

    @property
    def shared(self) -> bool:
        """Several server processes may share the file: :meth:`follow` polls it."""
        return bool(self.poll_interval)

    async def follow(self, after_id: int) -> AsyncIterator[list[Message]]:
        """Every ``poll_interval`` seconds, the messages appended since (SQLite has no way
        to tell another process that a row was inserted)."""
        if not self.poll_interval:
            return
        for _ in range(1 << 62):  # ends when cancelled
            await asyncio.sleep(self.poll_interval)
            for _ in range(1 << 62):  # pages, until caught up
                page = await self.after(after_id, 500)
                if not page:
                    break
                yield page
                after_id = page[-1].id

    def bus(self) -> None:
        return None  # presence and typing stay per process


class SQLiteLog(_SQLiteReads):
    """The log in an SQLite file (WAL mode), so history survives restarts.

    SQLite calls block, so each runs in one worker thread of its own and the event loop keeps
    serving. One thread also means one statement at a time on the connection, so ids are
    handed out in the order messages are published.

    Client ids live in a ``client_id`` column with a unique index on ``(user, client_id)``:
    the dedupe survives restarts and holds between processes sharing the file (SQLite
    treats NULLs as distinct, so messages without one never collide). A file made before
    that column existed is migrated when opened (one ``ALTER TABLE``, old rows get NULL).

    Retention: after each insert the oldest rows beyond ``max_messages`` or ``max_bytes``
    go (down to :data:`TRIM_TO` of the cap). Bytes are the UTF-8 bytes of a row's strings
    plus :data:`ROW_OVERHEAD`, summed by triggers into the one-row table ``log_size``, so
    every process sharing the file sees the same total without scanning the table.

    Rooms: this log is the default room's, in the table ``messages`` as before rooms (a
    file from before them is the default room's log, unchanged). The other rooms'
    messages are in one table ``room_messages`` keyed by ``(room, id)``, each room's ids
    counted from 1 in the insert itself (atomic between processes), their bytes per room
    in ``room_size`` (:class:`SQLiteRoom`). A room exists once it has a message; the
    first message of one room more than ``max_rooms`` is refused (429).
    """

    ROW_OVERHEAD = 64
    """Bytes per row besides its strings: the id, the timestamp, the record and index."""

    def __init__(self, path: str | Path, poll_interval: float = 0.1, *,
                 max_messages: int = RETAIN_MESSAGES, max_bytes: int = RETAIN_BYTES,
                 max_rooms: int = MAX_ROOMS) -> None:
        self.name = DEFAULT_ROOM
        self.max_rooms = max_rooms
        self._rooms: dict[str, SQLiteRoom] = {}
        self.path = str(path)
        self.poll_interval = poll_interval  # several server processes may share the file
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS messages ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,"
            " user TEXT NOT NULL, text TEXT NOT NULL, client_id TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
        if "client_id" not in columns:  # a chat.db from before client ids: migrate it
            self._db.execute("ALTER TABLE messages ADD COLUMN client_id TEXT")
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS messages_client_id"
                         " ON messages (user, client_id)")
        size = (f"({self.ROW_OVERHEAD} + length(CAST({{0}}.user AS BLOB))"
                " + length(CAST({0}.text AS BLOB))"
                " + COALESCE(length(CAST({0}.client_id AS BLOB)), 0))")
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'log_size'"
                                ).fetchone():  # a new file, or one from before retention
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("CREATE TABLE IF NOT EXISTS log_size (bytes INTEGER NOT NULL)")
            self._db.execute("INSERT INTO log_size SELECT COALESCE(SUM("
                             f"{size.format('messages')}), 0) FROM messages")
            self._db.execute("CREATE TRIGGER IF NOT EXISTS log_size_in AFTER INSERT ON"
                             " messages BEGIN UPDATE log_size SET bytes = bytes +"
                             f" {size.format('NEW')}; END")
            self._db.execute("CREATE TRIGGER IF NOT EXISTS log_size_out AFTER DELETE ON"
                             " messages BEGIN UPDATE log_size SET bytes = bytes -"
                             f" {size.format('OLD')}; END")
            self._db.execute("COMMIT")
        SQLiteRoom.create_tables(self._db, size)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatlib-sqlite")

    def _insert(self, user: str, text: str, client_id: str | None) -> tuple[Message, bool]:
        ts = time.time()
        try:
            cursor = self._db.execute(
                "INSERT INTO messages (ts, user, text, client_id) VALUES (?, ?, ?, ?)",
                (ts, user, text, client_id),
            )
        except sqlite3.IntegrityError:  # the unique index: (user, client_id) is stored
            row = self._db.execute(
                "SELECT id, ts, user, text, client_id FROM messages"
                " WHERE user = ? AND client_id = ?", (user, client_id),
            ).fetchone()
            original = Message(*row)
            if original.text != text:
                raise reused_client_id(original) from None
            return original, True
        self._trim(cursor.lastrowid)
        return Message(cursor.lastrowid, ts, user, text, client_id), False

    def _trim(self, newest: int) -> None:
        """Drop the oldest rows beyond either cap, down to TRIM_TO of it; ``newest`` stays.
        Two index lookups when under both caps (the common case)."""
        first, held = self._db.execute(
            "SELECT (SELECT MIN(id) FROM messages), (SELECT bytes FROM log_size)").fetchone()
        if newest - first + 1 > self.max_messages:  # ids are consecutive: a row count
            keep = max(int(self.max_messages * TRIM_TO), 1)
            self._db.execute("DELETE FROM messages WHERE id <= ?", (newest - keep,))
            held = self._db.execute("SELECT bytes FROM log_size").fetchone()[0]
        if held <= self.max_bytes:
            return
        for _ in range(100):  # the oldest 5 % of rows at a time; bounded
            first = self._db.execute("SELECT MIN(id) FROM messages").fetchone()[0]
            if held <= self.max_bytes * TRIM_TO or first >= newest:
                return
            cut = min(first + max((newest - first) // 20, 1), newest)
            self._db.execute("DELETE FROM messages WHERE id < ?", (cut,))
            held = self._db.execute("SELECT bytes FROM log_size").fetchone()[0]

    def _select(self, after_id: int, limit: int) -> list[Message]:
        rows = self._db.execute(
            "SELECT id, ts, user, text, client_id FROM messages WHERE id > ? ORDER BY id"
            " LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [Message(*row) for row in rows]

    def _select_before(self, before_id: int, limit: int) -> list[Message]:
        rows = self._db.execute(
            "SELECT id, ts, user, text, client_id FROM messages WHERE id < ? ORDER BY id DESC"
            " LIMIT ?", (before_id, limit)).fetchall()
        return [Message(*row) for row in reversed(rows)]

    def _page(self, after_id: int, limit: int) -> Page:
        first, last = self._db.execute("SELECT MIN(id), COALESCE(MAX(id), 0) FROM messages"
                                       ).fetchone()
        messages = self._select(after_id, limit) if limit else []
        return Page(messages, first if first is not None else last + 1, last)

    def _max_id(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]

    def _min_id(self) -> int:
        first = self._db.execute("SELECT MIN(id) FROM messages").fetchone()[0]
        return first if first is not None else self._max_id() + 1

    def room(self, name: str) -> SQLiteLog | SQLiteRoom:
        if name == DEFAULT_ROOM:
            return self
        log = self._rooms.get(name)
        if log is None:
            if len(self._rooms) >= 2 * self.max_rooms:  # views of rooms never written to
                self._rooms = {n: room for n, room in self._rooms.items() if room._known}
            log = self._rooms[name] = SQLiteRoom(self, name)
        return log

    def _room_names(self) -> dict[str, int]:
        rooms = {DEFAULT_ROOM: self._max_id()}
        rooms.update(self._db.execute(
            "SELECT room, (SELECT MAX(id) FROM room_messages m WHERE m.room = s.room)"
            " FROM room_size s ORDER BY room").fetchall())
        return rooms

    async def rooms(self) -> dict[str, int]:
        return await self._run(self._room_names)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._thread.shutdown()


class SQLiteRoom(_SQLiteReads):
    """The log of one room other than the default one, in an :class:`SQLiteLog`'s file
    (:meth:`SQLiteLog.room`): the rows of ``room_messages`` with its name, the same
    retention and dedupe as the default room's, per room."""

    def __init__(self, store: SQLiteLog, name: str) -> None:
        self.store, self.name = store, name
        self._db, self._thread = store._db, store._thread
        self.poll_interval = store.poll_interval
        self._known = False  # the room has a row in room_size: it counts in max_rooms

    @staticmethod
    def create_tables(db: sqlite3.Connection, size: str) -> None:
        """The rooms' tables and triggers, in a file that lacks them (``size`` is the SQL of
        a row's bytes, :class:`SQLiteLog`'s)."""
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'room_size'").fetchone():
            return
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE IF NOT EXISTS room_messages ("
                   " room TEXT NOT NULL, id INTEGER NOT NULL, ts REAL NOT NULL,"
                   " user TEXT NOT NULL, text TEXT NOT NULL, client_id TEXT,"
                   " PRIMARY KEY (room, id))")
        db.execute("CREATE UNIQUE INDEX IF NOT EXISTS room_messages_client_id"
                   " ON room_messages (room, user, client_id)")
        db.execute("CREATE TABLE IF NOT EXISTS room_size ("
                   " room TEXT PRIMARY KEY, bytes INTEGER NOT NULL)")
        db.execute("CREATE TRIGGER IF NOT EXISTS room_size_in AFTER INSERT ON room_messages"
                   " BEGIN INSERT INTO room_size VALUES (NEW.room,"
                   f" {size.format('NEW')}) ON CONFLICT (room) DO UPDATE SET"
                   " bytes = bytes + excluded.bytes; END")
        db.execute("CREATE TRIGGER IF NOT EXISTS room_size_out AFTER DELETE ON room_messages"
                   f" BEGIN UPDATE room_size SET bytes = bytes - {size.format('OLD')}"
                   " WHERE room = OLD.room; END")
        db.execute("COMMIT")

    def room(self, name: str) -> SQLiteLog | SQLiteRoom:
        return self.store.room(name)

    async def rooms(self) -> dict[str, int]:
        return await self.store.rooms()

    _COLUMNS = "id, ts, user, text, client_id, room"

    def _insert(self, user: str, text: str, client_id: str | None) -> tuple[Message, bool]:
        db, room = self._db, self.name
        if not self._known:
            self._known = bool(db.execute("SELECT 1 FROM room_size WHERE room = ?",
                                          (room,)).fetchone())
            store = self.store
            if not self._known and db.execute("SELECT COUNT(*) FROM room_size").fetchone()[0] \
                    >= store.max_rooms - 1:  # the default room is one
                raise too_many_rooms(store.max_rooms)
        ts = time.time()
        try:
            (message_id,) = db.execute(
                "INSERT INTO room_messages (room, id, ts, user, text, client_id)"
                " SELECT ?, COALESCE(MAX(id), 0) + 1, ?, ?, ?, ? FROM room_messages"
                " WHERE room = ? RETURNING id",
                (room, ts, user, text, client_id, room)).fetchone()
        except sqlite3.IntegrityError:  # the unique index: (room, user, client_id) is stored
            original = Message(*db.execute(
                f"SELECT {self._COLUMNS} FROM room_messages"
                " WHERE room = ? AND user = ? AND client_id = ?",
                (room, user, client_id)).fetchone())
            if original.text != text:
                raise reused_client_id(original) from None
            return original, True
        self._known = True
        self._trim(message_id)
        return Message(message_id, ts, user, text, client_id, room), False

    def _trim(self, newest: int) -> None:
        """:meth:`SQLiteLog._trim`, for this room's rows."""
        db, room, store = self._db, self.name, self.store
        first, held = db.execute(
            "SELECT (SELECT MIN(id) FROM room_messages WHERE room = ?),"
            " (SELECT bytes FROM room_size WHERE room = ?)", (room, room)).fetchone()
        if newest - first + 1 > store.max_messages:
            keep = max(int(store.max_messages * TRIM_TO), 1)
            db.execute("DELETE FROM room_messages WHERE room = ? AND id <= ?",
                       (room, newest - keep))
            held = db.execute("SELECT bytes FROM room_size WHERE room = ?", (room,)
                              ).fetchone()[0]
        if held <= store.max_bytes:
            return
        for _ in range(100):  # the oldest 5 % of rows at a time; bounded
            first = self._min_id()
            if held <= store.max_bytes * TRIM_TO or first >= newest:
                return
            cut = min(first + max((newest - first) // 20, 1), newest)
            db.execute("DELETE FROM room_messages WHERE room = ? AND id < ?", (room, cut))
            held = db.execute("SELECT bytes FROM room_size WHERE room = ?", (room,)
                              ).fetchone()[0]

    def _select(self, after_id: int, limit: int) -> list[Message]:
        rows = self._db.execute(
            f"SELECT {self._COLUMNS} FROM room_messages WHERE room = ? AND id > ?"
            " ORDER BY id LIMIT ?", (self.name, after_id, limit)).fetchall()
        return [Message(*row) for row in rows]

    def _select_before(self, before_id: int, limit: int) -> list[Message]:
        rows = self._db.execute(
            f"SELECT {self._COLUMNS} FROM room_messages WHERE room = ? AND id < ?"
            " ORDER BY id DESC LIMIT ?", (self.name, before_id, limit)).fetchall()
        return [Message(*row) for row in reversed(rows)]

    def _page(self, after_id: int, limit: int) -> Page:
        first, last = self._db.execute(
            "SELECT MIN(id), COALESCE(MAX(id), 0) FROM room_messages WHERE room = ?",
            (self.name,)).fetchone()
        messages = self._select(after_id, limit) if limit else []
        return Page(messages, first if first is not None else last + 1, last)

    def _max_id(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM room_messages"
                                " WHERE room = ?", (self.name,)).fetchone()[0]

    def _min_id(self) -> int:
        first = self._db.execute("SELECT MIN(id) FROM room_messages WHERE room = ?",
                                 (self.name,)).fetchone()[0]
        return first if first is not None else self._max_id() + 1

    async def close(self) -> None:
        await self.store.close()
