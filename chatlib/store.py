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
  looks for the others' messages every ``poll_interval`` seconds and fans them out).

Sending is made exactly-once in effect the same way receiving is, with an id: a client may
give each message a ``client_id`` of its own choosing, and :meth:`MessageLog.append` stores
a repeat of ``(user, client_id)`` only once, returning the original. A client that lost the
acknowledgement (connection dropped, server restarted) simply sends again with the same
``client_id``. MemoryLog remembers the client ids of the messages it still holds (so the
dedupe window is ``max_messages``); SQLiteLog keeps them in the table, across restarts.

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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .validation import ChatError, printable


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. ``id`` strictly increases; ``ts`` is Unix time in seconds.

    ``client_id`` is the sender's own id for it, if it gave one (see the module docstring);
    it is part of the JSON only when set, so that a sender whose acknowledgement was lost
    recognises its message in the history it resumes.
    """

    id: int
    ts: float
    user: str
    text: str
    client_id: str | None = None

    def __str__(self) -> str:
        """``#id user: text``, safe to print: see :func:`chatlib.validation.printable`."""
        return f"#{self.id} {printable(self.user)}: {printable(self.text)}"

    def to_dict(self) -> dict:
        # Spelled out rather than dataclasses.asdict(), which copies field by field
        # recursively: 0.07 µs instead of 3 µs, on every message fanned out or polled.
        if self.client_id is None:
            return {"id": self.id, "ts": self.ts, "user": self.user, "text": self.text}
        return {"id": self.id, "ts": self.ts, "user": self.user, "text": self.text,
                "client_id": self.client_id}


def reused_client_id(original: Message) -> ChatError:
    """What a log raises when ``(user, client_id)`` is stored with another text: 422."""
    return ChatError(422, f"client_id {original.client_id!r} was already used for another"
                          f" text (message {original.id}): use a new one")


class StoreUnavailable(Exception):
    """The store cannot be reached right now (e.g. Redis is restarting): nothing was stored
    or read. The server answers 503 and the client may try again."""


class MessageLog(Protocol):
    """What every store offers. All methods are coroutines so a store may do I/O."""

    poll_interval: float | None
    """For a store that other processes append to as well: how often (seconds) a server
    should look for their messages, to fan them out to its own clients. None: only this
    process writes."""

    async def append(self, user: str, text: str,
                     client_id: str | None = None) -> tuple[Message, bool]:
        """Store a message with the next id and a timestamp: ``(message, False)``.

        A repeat of ``(user, client_id)`` (``client_id`` not None) stores nothing and
        returns ``(original, True)``; with another text it raises :func:`reused_client_id`.
        """

    async def after(self, after_id: int, limit: int = 1000) -> list[Message]:
        """Up to ``limit`` messages with ``id > after_id``, oldest first."""

    async def last_id(self) -> int:
        """The newest id in the log, 0 if it is empty."""

    async def close(self) -> None:
        """Release what the store holds (files, connections)."""


class MemoryLog:
    """The in-memory log: a list ordered by id, searched with :func:`bisect`.

    ``max_messages`` bounds memory: the oldest messages are dropped beyond it (a client
    that resumes from before the window simply gets what is left). It is also the dedupe
    window: a repeated ``client_id`` is recognised while its original is still held (at
    least the newest ``max_messages * 9 // 10`` messages), by one dict entry per message
    that has a ``client_id``. A repeat of an older one is stored again.
    """

    def __init__(self, max_messages: int = 100_000) -> None:
        self._messages: list[Message] = []
        self._ids: list[int] = []
        self._by_client_id: dict[tuple[str, str], Message] = {}
        self._next_id = 1
        self.max_messages = max_messages
        self.poll_interval = None

    async def append(self, user: str, text: str,
                     client_id: str | None = None) -> tuple[Message, bool]:
        if client_id is not None:
            original = self._by_client_id.get((user, client_id))
            if original is not None:
                if original.text != text:
                    raise reused_client_id(original)
                return original, True
        message = Message(self._next_id, time.time(), user, text, client_id)
        self._next_id += 1
        self._messages.append(message)
        self._ids.append(message.id)
        if client_id is not None:
            self._by_client_id[(user, client_id)] = message
        if len(self._messages) > self.max_messages:
            # Trim in chunks so appends stay O(1) amortised.
            drop = len(self._messages) - self.max_messages + self.max_messages // 10
            if self._by_client_id:
                for old in self._messages[:drop]:
                    if old.client_id is not None:
                        self._by_client_id.pop((old.user, old.client_id), None)
            del self._messages[:drop], self._ids[:drop]
        return message, False

    async def after(self, after_id: int, limit: int = 1000) -> list[Message]:
        start = bisect.bisect_right(self._ids, after_id)
        return self._messages[start : start + limit]

    async def last_id(self) -> int:
        return self._next_id - 1

    async def close(self) -> None:
        pass


class SQLiteLog:
    """The log in an SQLite file (WAL mode), so history survives restarts.

    SQLite calls block, so each runs in one worker thread of its own and the event loop keeps
    serving. One thread also means one statement at a time on the connection, so ids are
    handed out in the order messages are published.

    Client ids live in a ``client_id`` column with a unique index on ``(user, client_id)``:
    the dedupe survives restarts and holds between processes sharing the file (SQLite
    treats NULLs as distinct, so messages without one never collide). A file made before
    that column existed is migrated when opened (one ``ALTER TABLE``, old rows get NULL).
    """

    def __init__(self, path: str | Path, poll_interval: float = 0.1) -> None:
        self.path = str(path)
        self.poll_interval = poll_interval  # several server processes may share the file
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
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatlib-sqlite")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

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
        return Message(cursor.lastrowid, ts, user, text, client_id), False

    def _select(self, after_id: int, limit: int) -> list[Message]:
        rows = self._db.execute(
            "SELECT id, ts, user, text, client_id FROM messages WHERE id > ? ORDER BY id"
            " LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [Message(*row) for row in rows]

    def _max_id(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]

    async def append(self, user: str, text: str,
                     client_id: str | None = None) -> tuple[Message, bool]:
        return await self._run(self._insert, user, text, client_id)

    async def after(self, after_id: int, limit: int = 1000) -> list[Message]:
        return await self._run(self._select, after_id, limit)

    async def last_id(self) -> int:
        return await self._run(self._max_id)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._thread.shutdown()
