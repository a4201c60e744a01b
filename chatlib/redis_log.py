"""The message log on Redis: many server processes, one chat.

One process serves a few thousand clients (bench/). Past that, start several and let them
share one log through a broker, the way Socket.IO's Redis adapter, Django Channels and
Phoenix PubSub do. :class:`RedisLog` is the same :class:`~chatlib.store.MessageLog` as the
others, on a real ``redis-server``::

    log = RedisLog("redis://127.0.0.1:6379/0")
    server = await chatlib.start_server(log=log)      # or: chatlib serve --redis URL

What lives in Redis, under ``key`` (``"chat"`` by default), for the default room (the keys
of a chat from before rooms, so its data is that room's):

* ``chat:messages``, a **stream**: the history, one entry per message, entry id ``N-0``
  for message id ``N``. A stream is a log with a cursor (chapter 3's ``after``), not
  pub/sub: a process that was away reads what it missed from where it stopped.
* ``chat:last_id``: the id counter. One Lua script increments it and appends the entry
  (and checks the ``client_id`` dedupe window): Redis runs a script alone, so ids strictly
  increase across every process, with no gap and no two messages on one id.
* ``chat:dedupe:<user>\\0<client_id>`` -> id, expiring after ``dedupe_ttl`` seconds: a
  repeated send answers the original message instead of storing it twice.
* ``chat:presence:*``, ``chat:processes`` and the pub/sub channels ``chat:typing`` and
  ``chat:presence`` belong to the presence and typing bus (chatlib.redis_bus), which the
  server runs beside the log (:meth:`RedisLog.bus`). The log is only the log.

Every other room (:meth:`RedisLog.room`) is a log of its own, with its own ids 1, 2, 3...,
retention and dedupe: ``chat:room:<name>:messages``, ``chat:room:<name>:last_id`` and
``chat:room:<name>:bytes``, and its dedupe keys ``chat:room-dedupe:<len>:<name>:...``. The
set ``chat:rooms`` names the rooms that have had a message; the append script adds a room
to it, or refuses the first message of one room more than ``max_rooms`` (429).

Each process follows the rooms it has clients in (:meth:`RedisLog.follow`, one per room
hub, multiplexed by :class:`_Follower`): the append script PUBLISHes each new id on the
room's channel ``chat:new`` (``chat:room:<name>:new``), and the process, SUBSCRIBEd to the
channels of its rooms on one connection, reads a room's stream after its cursor when its
notice comes. There is no polling loop, a process reads only its rooms' messages, and what it
sends per message does not grow with the rooms it follows. The stream is the truth, the
notice only a wake-up: each room's cursor makes a reconnect resume exactly where it
stopped. When Redis is
unreachable, appends and reads raise :class:`~chatlib.store.StoreUnavailable` (the server
answers 503: the client knows its message was *not* stored) and the follower reconnects
with exponential backoff.

Retention: each room's stream keeps at most ``max_len`` messages and ``max_bytes`` bytes (64 +
the field values' bytes per entry, summed in ``chat:bytes`` by the append script, which drops
the oldest with ``XTRIM MINID`` down to 90 % of a cap it passed); ``first_id()`` is the
oldest id kept. Redis must
persist (``appendonly yes``) for ids to survive a Redis restart: if it comes back empty,
the counter starts again at 1 and clients are told to reset, as with a replaced log.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .limits import MAX_ROOMS, RETAIN_BYTES, RETAIN_MESSAGES
from .store import (
    DEFAULT_ROOM,
    Message,
    Page,
    StoreUnavailable,
    reused_client_id,
    too_many_rooms,
)

if TYPE_CHECKING:
    from .redis_bus import RedisBus

# KEYS: stream, counter, dedupe key (the counter's without client_id), bytes held, room set
# ARGV: ts, user, text, client_id, max_len, dedupe_ttl, max_bytes, room ('' for the default
# room), max_rooms, the room's notice channel (PUBLISHed the new id: the followers' wake-up)
# Returns {id, ts, user, text, status}: the stored message (status 0), or the original one
# for a repeat (1; 2: the original has another text, a reused client_id); status 3: the
# room would be one more than max_rooms, nothing was stored.
APPEND = """
if ARGV[4] ~= '' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local entry = redis.call('XRANGE', KEYS[1], seen .. '-0', seen .. '-0')[1]
    if entry then
      local f = {}
      for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
      return {seen, f.ts, f.user, f.text, f.text == ARGV[3] and 1 or 2}
    end
    return {seen, ARGV[1], ARGV[2], ARGV[3], 1}  -- trimmed away: still the same id
  end
end
if ARGV[8] ~= '' and redis.call('SISMEMBER', KEYS[5], ARGV[8]) == 0 then
  if redis.call('SCARD', KEYS[5]) + 1 >= tonumber(ARGV[9]) then  -- + the default room
    return {'0', '', '', '', 3}
  end
  redis.call('SADD', KEYS[5], ARGV[8])
end
local id = redis.call('INCR', KEYS[2])
local fields = {'ts', ARGV[1], 'user', ARGV[2], 'text', ARGV[3]}
if ARGV[4] ~= '' then
  table.insert(fields, 'client_id')
  table.insert(fields, ARGV[4])
  redis.call('SET', KEYS[3], id, 'EX', ARGV[6])
end
redis.call('XADD', KEYS[1], id .. '-0', unpack(fields))
redis.call('PUBLISH', ARGV[10], id)
-- Retention: an entry holds 64 + its field values' bytes (the same sum below).
local held = redis.call('INCRBY', KEYS[4], 64 + #ARGV[1] + #ARGV[2] + #ARGV[3] + #ARGV[4])
local count = redis.call('XLEN', KEYS[1])
local max_len, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[7])
if count > max_len or held > max_bytes then
  -- Drop the oldest down to 90 % of both caps, at most 1000 per append; the newest stays.
  local keep_len, keep_bytes = math.floor(max_len * 0.9), math.floor(max_bytes * 0.9)
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1000)
  local cut = nil
  for i = 1, #oldest - 1 do
    if count <= keep_len and held <= keep_bytes then break end
    local size = 64
    for j = 2, #oldest[i][2], 2 do size = size + #oldest[i][2][j] end
    held, count, cut = held - size, count - 1, oldest[i][1]
  end
  if cut then
    redis.call('XTRIM', KEYS[1], 'MINID', (tonumber(string.match(cut, '^%d+')) + 1) .. '-0')
    redis.call('SET', KEYS[4], math.max(held, 0))
  end
end
return {tostring(id), ARGV[1], ARGV[2], ARGV[3], 0}
"""


def _entry(entry_id: str, fields: dict, room: str) -> Message:
    return Message(int(entry_id.partition("-")[0]), float(fields["ts"]), fields["user"],
                   fields["text"], fields.get("client_id"), room)


class _Store:
    """What every room's log of one :class:`RedisLog` shares: the options, the connections,
    the append script, the room logs made so far and the one follower."""

    def __init__(self, url: str, key: str, options: dict, max_connections: int,
                 timeout: float, block: float, backoff: tuple[float, float]) -> None:
        # A bounded pool that makes a burst of appends wait for a free connection (up to
        # ``timeout``) instead of failing: the default pool raises "Too many connections".
        self.redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, **options))
        self.append = self.redis.register_script(APPEND)
        self.rooms: dict[str, RedisLog] = {}
        self.room_set = f"{key}:rooms"
        # The follower holds two connections of its own, named for CLIENT LIST: one per
        # process each, whatever the number of rooms.
        self.follower = _Follower(url, options, self, block, backoff)

    async def drop_idle_connections(self) -> None:
        """The pool's other idle connections died with the one that failed (Redis
        restarted): drop them, so the first command after Redis is back opens a new one."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.connection_pool.disconnect(inuse_connections=False)


class RedisLog:
    """A :class:`~chatlib.store.MessageLog` on Redis streams, shared by server processes:
    the default room's; :meth:`room` gives the others'.

    ``url``: ``redis://host:port/db``. ``key``: prefix of every key (one chat per prefix).
    ``max_len`` / ``max_bytes``: messages and bytes each room's stream keeps (retention,
    see the module docstring). ``max_rooms``: rooms the chat holds at most, the default
    room included (the first message of one more is refused, 429). ``dedupe_ttl``: seconds a
    ``(user, client_id)`` is remembered. ``heartbeat`` / ``presence_ttl``: how often a
    process refreshes its presence, and how long others keep it if it stops (dies), for
    the :meth:`bus` (chatlib.redis_bus).
    ``block``: seconds the follower waits for a notice before it checks its rooms' id
    counters and pings Redis (a notice wakes it at once; the bound only notices a log that
    went back with nobody appending, or a silently dead connection).
    ``backoff``: first and longest wait (seconds) between reconnection attempts.
    ``timeout``: seconds a command may take before it fails (503). ``max_connections``:
    commands in flight at once; more wait for a connection.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, key: str = "chat",
                 max_len: int = RETAIN_MESSAGES, max_bytes: int = RETAIN_BYTES,
                 max_rooms: int = MAX_ROOMS, dedupe_ttl: float = 3600.0,
                 heartbeat: float = 1.0, presence_ttl: float = 3.0, block: float = 5.0,
                 backoff: tuple[float, float] = (0.05, 2.0), timeout: float = 5.0,
                 max_connections: int = 32) -> None:
        self.url = url
        self.key = key
        self.max_len = max_len
        self.max_bytes = max_bytes
        self.max_rooms = max_rooms
        self.dedupe_ttl = dedupe_ttl
        self.heartbeat = heartbeat
        self.presence_ttl = presence_ttl
        self.block = block
        self.backoff = backoff
        # No automatic retries: an append whose reply was lost may have been stored, and
        # retrying it blindly could store it twice. The caller gets a 503 and decides
        # (with a client_id, resending is safe: the script dedupes it).
        options = dict(decode_responses=True, retry=Retry(NoBackoff(), 0),
                       socket_connect_timeout=timeout, socket_timeout=timeout)
        self._store = _Store(url, key, options, max_connections, timeout, block, backoff)
        self._as_room(DEFAULT_ROOM, key)

    def _as_room(self, name: str, prefix: str) -> None:
        self.name = name
        self._stream = f"{prefix}:messages"
        self._counter = f"{prefix}:last_id"
        self._bytes = f"{prefix}:bytes"
        self._channel = f"{prefix}:new"  # a pub/sub channel: the append script's notices
        # Not under the room's prefix: a room and a user name, both free to hold colons,
        # could spell another room's key there. The name's length makes it unambiguous
        # (and a user name holds no NUL).
        self._dedupe = (f"{self.key}:dedupe:" if name == DEFAULT_ROOM
                        else f"{self.key}:room-dedupe:{len(name)}:{name}:")
        self._redis = self._store.redis
        self._store.rooms[name] = self

    def __repr__(self) -> str:
        room = "" if self.name == DEFAULT_ROOM else f", room={self.name!r}"
        return f"RedisLog({self.url!r}, key={self.key!r}{room})"

    @property
    def reconnects(self) -> int:
        """How often the follower lost Redis and came back (every room's: there is one)."""
        return self._store.follower.reconnects

    # -- rooms ---------------------------------------------------------------------------

    def room(self, name: str) -> RedisLog:
        """The log of room ``name``: its keys are under ``KEY:room:NAME``, the default
        room's are ``KEY``'s (today's keys). No I/O: a room exists in Redis from its first
        message; one more than ``max_rooms`` is refused then (429)."""
        rooms = self._store.rooms
        log = rooms.get(name)
        if log is None:
            if len(rooms) >= 2 * self.max_rooms:  # views of rooms nobody follows: drop them
                followed = self._store.follower.followed()
                for other in [n for n, r in rooms.items() if n != DEFAULT_ROOM
                              and r._stream not in followed]:
                    del rooms[other]
            log = object.__new__(RedisLog)
            log.__dict__.update({k: v for k, v in self.__dict__.items()
                                 if not k.startswith("_") or k == "_store"})
            log._as_room(name, f"{self.key}:room:{name}")
        return log

    async def rooms(self) -> dict[str, int]:
        """Every room with a message and the default room, with its last id."""
        names = sorted(await self._call(self._redis.smembers(self._store.room_set)))
        default = self._store.rooms[DEFAULT_ROOM]
        logs = [default, *(self.room(name) for name in names)]
        counters = await self._call(self._redis.mget([log._counter for log in logs]))
        return {log.name: int(value or 0) for log, value in zip(logs, counters, strict=True)}

    async def _call(self, coro, *, writes: bool = False):
        """Await a Redis command; every Redis failure becomes StoreUnavailable (a JSON 503,
        or an error frame on a WebSocket), never a 500 with a traceback.

        Unreachable, refusing (OOM at ``maxmemory``, loading, read-only replica, a script
        error) or not answering in time (hung: SIGSTOP, ``DEBUG SLEEP``). A write
        (``writes``) that timed out or lost its connection may have been carried out by
        Redis after all: its error says so, and that resending with the same client_id is
        the safe way to find out (the script dedupes it); a refusal stored nothing.
        """
        try:
            return await coro
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await self._store.drop_idle_connections()
            if writes:
                raise StoreUnavailable(
                    f"message store unavailable ({exc.__class__.__name__}): the message"
                    " may or may not be stored; send it again with the same client_id"
                ) from exc
            raise StoreUnavailable(f"message store unavailable ({exc.__class__.__name__}):"
                                   " try again") from exc
        except RedisError as exc:  # Redis answered with an error: nothing was done
            reason = exc.__class__.__name__  # OutOfMemoryError, ReadOnlyError, ...
            raise StoreUnavailable(f"message store refused ({reason}): nothing was"
                                   " stored; try again later") from exc

    # -- the MessageLog interface --------------------------------------------------------

    async def append(self, user: str, text: str,
                     client_id: str | None = None) -> tuple[Message, bool]:
        """Store a message with the room's next id: ``(message, False)``; a repeat of
        ``(user, client_id)`` in this room within ``dedupe_ttl`` stores nothing:
        ``(original, True)``, or raises 422 if the original's text differs
        (chatlib.store.reused_client_id). The first message of a room beyond
        ``max_rooms`` raises 429 (chatlib.store.too_many_rooms)."""
        dedupe = f"{self._dedupe}{user}\0{client_id}" if client_id else ""
        room = "" if self.name == DEFAULT_ROOM else self.name
        reply = await self._call(self._store.append(
            keys=[self._stream, self._counter, dedupe or self._counter, self._bytes,
                  self._store.room_set],
            args=[repr(time.time()), user, text, client_id or "", self.max_len,
                  max(1, int(self.dedupe_ttl)), self.max_bytes, room, self.max_rooms,
                  self._channel]),
            writes=True)
        id_, ts, user_, text_, status = reply
        if status == 3:
            raise too_many_rooms(self.max_rooms)
        message = Message(int(id_), float(ts), user_, text_, client_id, self.name)
        if status == 2:
            raise reused_client_id(message)
        return message, bool(status)

    async def after(self, after_id: int, limit: int = 1000) -> list[Message]:
        entries = await self._call(
            self._redis.xrange(self._stream, min=f"{max(after_id, 0) + 1}-0", count=limit))
        return [_entry(entry_id, fields, self.name) for entry_id, fields in entries]

    async def page(self, after_id: int, limit: int) -> Page:
        """One round trip: the entries after ``after_id``, the id counter and the oldest
        entry.

        A plain pipeline, not MULTI/EXEC: at ``maxmemory`` Redis refuses to queue any command
        in a transaction, reads included, and reads must go on working when writes cannot.
        Read in this order, a message trimmed between two reads can only make ``first``
        larger than the page's oldest id: a gap reported that the page already covers, never
        one it hides."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xrange(self._stream, min=f"{max(after_id, 0) + 1}-0", count=max(limit, 1))
        pipe.get(self._counter)
        pipe.xrange(self._stream, count=1)
        entries, counter, oldest = await self._call(pipe.execute())
        last = int(counter or 0)
        first = int(oldest[0][0].partition("-")[0]) if oldest else last + 1
        return Page([_entry(entry_id, fields, self.name) for entry_id, fields in
                     entries[:limit]], first, last)

    async def before(self, before_id: int, limit: int) -> list[Message]:
        if before_id <= 1:
            return []
        entries = await self._call(self._redis.xrevrange(
            self._stream, max=f"{before_id - 1}-0", count=limit))
        return [_entry(entry_id, fields, self.name) for entry_id, fields in reversed(entries)]

    async def last_id(self) -> int:
        return int(await self._call(self._redis.get(self._counter)) or 0)

    async def first_id(self) -> int:
        oldest = await self._call(self._redis.xrange(self._stream, count=1))
        if oldest:
            return int(oldest[0][0].partition("-")[0])
        return await self.last_id() + 1

    async def close(self) -> None:
        """Close the whole store (every room's log): the follower and the connections."""
        await self._store.follower.close()
        await self._redis.aclose(close_connection_pool=True)

    # -- following other processes -------------------------------------------------------

    shared = pushes = True
    """Other processes append to this log, and :meth:`follow` yields every append as it
    happens."""

    def follow(self, after_id: int) -> AsyncIterator[list[Message]]:
        """Pages of this room's messages after ``after_id``, in id order, as they are
        appended by any process (this one's too), until cancelled.

        Every room followed in this process is subscribed to on one pub/sub connection and
        read after its cursor when a notice of a new id comes (:class:`_Follower`): no
        polling loop and no connection per room, and each room's cursor makes a reconnect
        resume exactly where it stopped. When Redis fails, the follower reconnects with
        exponential backoff (:attr:`reconnects` counts it) and reads every room again after
        its cursor. A room whose id counter is below a cursor was emptied (FLUSHALL) or
        Redis was replaced: an empty page says so (the hub resets its clients), and that
        room's cursor starts again from 0.
        """
        return self._store.follower.follow(self, after_id)

    def bus(self) -> RedisBus | None:
        """A new channel for presence and typing between the processes sharing this log
        (chatlib.redis_bus), on the same Redis and key; the server runs and closes it.
        Only the default room's log makes one: the other rooms' buses are its
        :meth:`~chatlib.redis_bus.RedisBus.room` views (None here)."""
        if self.name != DEFAULT_ROOM:
            return None
        from .redis_bus import RedisBus

        return RedisBus(self.url, key=self.key, heartbeat=self.heartbeat,
                        presence_ttl=self.presence_ttl, backoff=self.backoff)


class _Subscriber:
    """One :meth:`RedisLog.follow` in progress: its room's log, its cursor, its pages."""

    def __init__(self, log: RedisLog, cursor: int) -> None:
        self.log = log
        self.cursor = cursor
        self.pages: asyncio.Queue[list[Message]] = asyncio.Queue()


class _Follower:
    """The one reader of a :class:`RedisLog` and its rooms in this process.

    The append script PUBLISHes each new id on its room's channel (``KEY:new`` for the
    default room, ``KEY:room:NAME:new``). The follower SUBSCRIBEs, on one pub/sub connection
    (named ``chatlib-follower``), to the channels of the rooms some :meth:`RedisLog.follow`
    follows, and reads a room with ``XRANGE`` after its cursor, on a second connection
    (``chatlib-follower-reads``), when that room's notice comes; what it reads goes to each
    follower of that room past its own cursor. A room followed anew costs one ``SUBSCRIBE``,
    a message one notice and one read: nothing a follower sends grows with the rooms it
    follows.

    The stream is the truth, a notice only a wake-up (pub/sub drops what is published while
    a connection is away). So a room is read after its cursor when Redis confirms its
    subscription, which it does again for every new follower of the room, and on every
    reconnection: subscribed first, then read, nothing appended in between is missed (read
    first, the notice of an append between the read and the subscription would be lost).

    Every read also gets the room's id counter: one below a cursor means the room's log went
    back (FLUSHALL, or a new Redis); an empty page says so (the hub resets its clients) and
    that cursor starts again from 0. With no notice for ``block`` seconds, the follower
    checks every followed room's counter and pings its pub/sub connection (a silently dead
    one fails then).
    """

    PAGE = 500  # entries per XRANGE; a room further behind is read page after page

    def __init__(self, url: str, options: dict, store: _Store, block: float,
                 backoff: tuple[float, float]) -> None:
        self._url, self._options = url, options
        self._store = store
        self._block = block
        self._backoff = Backoff(*backoff)
        self._subscribers: dict[str, list[_Subscriber]] = {}  # stream -> its followers
        self._streams: dict[str, str] = {}  # channel -> stream, of the rooms followed
        self._task: asyncio.Task | None = None
        self._unsubscribing: set[asyncio.Task] = set()
        self._connect()
        self._sending = asyncio.Lock()  # SUBSCRIBE/UNSUBSCRIBE go out in the order decided
        self._sent: set[str] = set()  # channels subscribed (or asked) on this connection
        self.reconnects = 0

    def _connect(self) -> None:
        options = {**self._options, "socket_timeout": None}  # a subscriber waits for notices
        self._pubsub_client = aioredis.Redis.from_url(
            self._url, **options, client_name="chatlib-follower")
        self._pubsub = self._pubsub_client.pubsub()
        self._reader = aioredis.Redis.from_url(
            self._url, **self._options, client_name="chatlib-follower-reads")

    def followed(self) -> set[str]:
        return set(self._subscribers)

    async def follow(self, log: RedisLog, after_id: int) -> AsyncIterator[list[Message]]:
        subscriber = _Subscriber(log, after_id)
        self._subscribers.setdefault(log._stream, []).append(subscriber)
        self._streams[log._channel] = log._stream
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        else:  # its confirmation makes the reader read the room from this cursor
            await self._sync(again=log._channel)
        try:
            for _ in range(1 << 62):  # ends when cancelled
                yield await subscriber.pages.get()
        finally:
            followers = self._subscribers.get(log._stream, [])
            with contextlib.suppress(ValueError):
                followers.remove(subscriber)
            if not followers:
                self._subscribers.pop(log._stream, None)
                self._streams.pop(log._channel, None)
                if self._task is not None and not self._task.done():
                    task = asyncio.ensure_future(self._sync())
                    self._unsubscribing.add(task)
                    task.add_done_callback(self._unsubscribing.discard)

    async def _sync(self, again: str | None = None) -> None:
        """Subscribe to the channels of the rooms followed, and only those; ``again``:
        subscribe to it even if it is, so Redis confirms it again (a catch-up read)."""
        async with self._sending:
            wanted = set(self._streams)
            new = wanted - self._sent | ({again} & wanted)
            gone = self._sent - wanted
            self._sent = (self._sent | new) - gone
            try:
                if new:
                    await self._pubsub.subscribe(*sorted(new))
                if gone:
                    await self._pubsub.unsubscribe(*sorted(gone))
            except (RedisError, OSError):  # the reader reconnects; the next _sync resends
                self._sent -= new

    async def _run(self) -> None:
        for _ in range(1 << 62):  # one batch of notices per turn; ends when cancelled
            if not self._subscribers:
                return
            try:
                await self._turn()
            except (RedisError, OSError):
                self.reconnects += 1
                await self._reset_connections()
                await self._store.drop_idle_connections()
                await self._backoff.wait()

    async def _reset_connections(self) -> None:
        await self._disconnect()
        self._connect()
        self._sent = set()

    async def _disconnect(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()
        for client in (self._pubsub_client, self._reader):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose(close_connection_pool=True)

    async def _turn(self) -> None:
        """Subscribe if need be, wait for notices (at most ``block`` s), read the rooms
        they name; until the connection fails."""
        await self._sync()
        if self._pubsub.connection is None:
            return  # every room was left meanwhile: nothing subscribed
        due: set[str] = set()  # streams to read after their cursor
        stale: set[str] = set()  # streams with a notice at or below every cursor
        checked = time.monotonic()
        pinged = False
        for _ in range(1 << 62):
            message = await self._pubsub.get_message(timeout=self._block)
            if message is None:
                if not self._subscribers:
                    return  # every room was left
                if pinged:  # not even the PING's answer in ``block`` s: a dead connection
                    raise RedisConnectionError("no answer from the pub/sub connection")
                await self._check_counters()
                await self._pubsub.ping()
                pinged = True
                continue
            pinged = False
            self._backoff.reset()
            for _ in range(10_000):  # take what else has come, to read each room once
                self._notice(message, due, stale)
                message = await self._pubsub.get_message(timeout=0)
                if message is None:
                    break
            if stale and time.monotonic() - checked >= self._block:
                # Mostly notices of entries read already; but after FLUSHALL the new ids
                # are below the cursors too: read those rooms (and counters) now and then.
                due |= stale & set(self._subscribers)
                stale.clear()
                checked = time.monotonic()
            for _ in range(1 << 62):
                if not due:
                    break
                due = await self._read(due)

    def _notice(self, message: dict, due: set[str], stale: set[str]) -> None:
        if message["type"] not in ("message", "subscribe"):
            return  # pong, unsubscribe
        stream = self._streams.get(message["channel"])
        if stream is None:
            return  # a room nobody follows any more
        if message["type"] == "message" and str(message["data"]).isdigit() and int(
                message["data"]) <= min(s.cursor for s in self._subscribers[stream]):
            stale.add(stream)  # read already (queued behind a read), or the log went back
            return
        due.add(stream)

    async def _read(self, due: set[str]) -> set[str]:
        """Read each stream in ``due`` after its lowest cursor (and its counter), in one
        round trip; hand each follower what is past its own cursor. The streams with more
        to read (a full page, or a log that went back) are returned."""
        watched = [(stream, list(self._subscribers.get(stream, ()))) for stream in sorted(due)]
        watched = [(stream, followers) for stream, followers in watched if followers]
        starts = [min(s.cursor for s in followers) for _stream, followers in watched]
        pipe = self._reader.pipeline(transaction=False)
        for (stream, followers), start in zip(watched, starts, strict=True):
            pipe.xrange(stream, min=f"{start + 1}-0", count=self.PAGE)
            pipe.get(followers[0].log._counter)
        replies = await pipe.execute()
        more: set[str] = set()
        for i, ((stream, followers), start) in enumerate(zip(watched, starts, strict=True)):
            entries, counter = replies[2 * i], int(replies[2 * i + 1] or 0)
            room = followers[0].log.name
            messages = [_entry(entry_id, fields, room) for entry_id, fields in entries]
            for subscriber in followers:
                if subscriber.cursor < start:
                    continue  # came during this read, from further back: its own read
                new = [m for m in messages if m.id > subscriber.cursor]
                if new:
                    subscriber.cursor = new[-1].id
                    subscriber.pages.put_nowait(new)
                if subscriber.cursor > counter:  # the room's log went back
                    subscriber.cursor = 0
                    subscriber.pages.put_nowait([])
                    more.add(stream)
            if len(entries) >= self.PAGE:
                more.add(stream)
        return more

    async def _check_counters(self) -> None:
        """No notice for ``block`` s: did a room's log go back with nobody appending?"""
        watched = [list(followers) for followers in self._subscribers.values()]
        if not watched:
            return
        counters = await self._reader.mget([followers[0].log._counter
                                            for followers in watched])
        for followers, counter in zip(watched, counters, strict=True):
            for subscriber in followers:
                if subscriber.cursor > int(counter or 0):
                    subscriber.cursor = 0
                    subscriber.pages.put_nowait([])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._disconnect()


class Backoff:
    """Exponential backoff with jitter between reconnection attempts: the first wait is
    ``first`` seconds (±50 %), each next one twice as long, up to ``longest``."""

    def __init__(self, first: float, longest: float) -> None:
        self.first, self.longest = first, longest
        self.delay = first

    async def wait(self) -> None:
        await asyncio.sleep(self.delay * (0.5 + random.random()))
        self.delay = min(self.delay * 2, self.longest)

    def reset(self) -> None:
        self.delay = self.first
