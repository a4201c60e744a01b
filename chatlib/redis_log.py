"""The message log on Redis: many server processes, one chat.

One process serves a few thousand clients (bench/). Past that, start several and let them
share one log through a broker, the way Socket.IO's Redis adapter, Django Channels and
Phoenix PubSub do. :class:`RedisLog` is the same :class:`~chatlib.store.MessageLog` as the
others, on a real ``redis-server``::

    log = RedisLog("redis://127.0.0.1:6379/0")
    server = await chatlib.start_server(log=log)      # or: chatlib serve --redis URL

What lives in Redis, under ``key`` (``"chat"`` by default):

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

Each process follows the stream with a **blocking** ``XREAD`` on a connection of its own
(:meth:`RedisLog.follow`): Redis answers the moment an entry arrives, so there is no polling
loop, and the cursor makes a reconnect resume exactly where it stopped. When Redis is
unreachable, appends and reads raise :class:`~chatlib.store.StoreUnavailable` (the server
answers 503: the client knows its message was *not* stored) and the follower reconnects
with exponential backoff.

Retention: the stream keeps at most ``max_len`` messages and ``max_bytes`` bytes (64 + the
field values' bytes per entry, summed in ``chat:bytes`` by the append script, which drops
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

from .limits import RETAIN_BYTES, RETAIN_MESSAGES
from .store import (
    Message,
    Page,
    StoreUnavailable,
    reused_client_id,
)

if TYPE_CHECKING:
    from .redis_bus import RedisBus

# KEYS: stream, counter, dedupe key (the counter's without client_id), bytes held
# ARGV: ts, user, text, client_id, max_len, dedupe_ttl, max_bytes
# Returns {id, ts, user, text, repeat}: the stored message, or the original one for a repeat
# (repeat 2: the original has another text, a reused client_id).
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
local id = redis.call('INCR', KEYS[2])
local fields = {'ts', ARGV[1], 'user', ARGV[2], 'text', ARGV[3]}
if ARGV[4] ~= '' then
  table.insert(fields, 'client_id')
  table.insert(fields, ARGV[4])
  redis.call('SET', KEYS[3], id, 'EX', ARGV[6])
end
redis.call('XADD', KEYS[1], id .. '-0', unpack(fields))
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

def _entry(entry_id: str, fields: dict) -> Message:
    return Message(int(entry_id.partition("-")[0]), float(fields["ts"]), fields["user"],
                   fields["text"], fields.get("client_id"))


class RedisLog:
    """A :class:`~chatlib.store.MessageLog` on a Redis stream, shared by server processes.

    ``url``: ``redis://host:port/db``. ``key``: prefix of every key (one chat per prefix).
    ``max_len`` / ``max_bytes``: messages and bytes the stream keeps (retention, see the
    module docstring). ``dedupe_ttl``: seconds a
    ``(user, client_id)`` is remembered. ``heartbeat`` / ``presence_ttl``: how often a
    process refreshes its presence, and how long others keep it if it stops (dies), for
    the :meth:`bus` (chatlib.redis_bus).
    ``block``: seconds one blocking ``XREAD`` waits before it is re-issued (it returns at
    once when an entry arrives; the bound only notices a silently dead connection).
    ``backoff``: first and longest wait (seconds) between reconnection attempts.
    ``timeout``: seconds a command may take before it fails (503). ``max_connections``:
    commands in flight at once; more wait for a connection.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, key: str = "chat",
                 max_len: int = RETAIN_MESSAGES, max_bytes: int = RETAIN_BYTES,
                 dedupe_ttl: float = 3600.0, heartbeat: float = 1.0,
                 presence_ttl: float = 3.0, block: float = 5.0,
                 backoff: tuple[float, float] = (0.05, 2.0), timeout: float = 5.0,
                 max_connections: int = 32) -> None:
        self.url = url
        self.key = key
        self.max_len = max_len
        self.max_bytes = max_bytes
        self.dedupe_ttl = dedupe_ttl
        self.heartbeat = heartbeat
        self.presence_ttl = presence_ttl
        self.block = block
        self.backoff = backoff
        self.reconnects = 0  # how often the follower lost Redis and came back
        self._stream = f"{key}:messages"
        self._counter = f"{key}:last_id"
        self._bytes = f"{key}:bytes"
        # No automatic retries: an append whose reply was lost may have been stored, and
        # retrying it blindly could store it twice. The caller gets a 503 and decides
        # (with a client_id, resending is safe: the script dedupes it).
        options = dict(decode_responses=True, retry=Retry(NoBackoff(), 0),
                       socket_connect_timeout=timeout, socket_timeout=timeout)
        # A bounded pool that makes a burst of appends wait for a free connection (up to
        # ``timeout``) instead of failing: the default pool raises "Too many connections".
        self._redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, **options))
        # The follower's blocking reads hold a connection of their own.
        self._reader = aioredis.Redis.from_url(
            url, **{**options, "socket_timeout": block + timeout})
        self._append = self._redis.register_script(APPEND)
        self._backoff = Backoff(*backoff)

    def __repr__(self) -> str:
        return f"RedisLog({self.url!r}, key={self.key!r})"

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
            await self._drop_idle_connections()
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

    async def _drop_idle_connections(self) -> None:
        """The pool's other idle connections died with the one that failed (Redis
        restarted): drop them, so the first command after Redis is back opens a new one."""
        with contextlib.suppress(RedisError, OSError):
            await self._redis.connection_pool.disconnect(inuse_connections=False)

    # -- the MessageLog interface --------------------------------------------------------

    async def append(self, user: str, text: str,
                     client_id: str | None = None) -> tuple[Message, bool]:
        """Store a message with the next id: ``(message, False)``; a repeat of
        ``(user, client_id)`` within ``dedupe_ttl`` stores nothing: ``(original, True)``,
        or raises 422 if the original's text differs (chatlib.store.reused_client_id)."""
        dedupe = f"{self.key}:dedupe:{user}\0{client_id}" if client_id else ""
        reply = await self._call(self._append(
            keys=[self._stream, self._counter, dedupe or self._counter, self._bytes],
            args=[repr(time.time()), user, text, client_id or "", self.max_len,
                  max(1, int(self.dedupe_ttl)), self.max_bytes]), writes=True)
        id_, ts, user_, text_, repeat = reply
        message = Message(int(id_), float(ts), user_, text_, client_id)
        if repeat == 2:
            raise reused_client_id(message)
        return message, bool(repeat)

    async def after(self, after_id: int, limit: int = 1000) -> list[Message]:
        entries = await self._call(
            self._redis.xrange(self._stream, min=f"{max(after_id, 0) + 1}-0", count=limit))
        return [_entry(entry_id, fields) for entry_id, fields in entries]

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
        return Page([_entry(entry_id, fields) for entry_id, fields in entries[:limit]],
                    first, last)

    async def before(self, before_id: int, limit: int) -> list[Message]:
        if before_id <= 1:
            return []
        entries = await self._call(self._redis.xrevrange(
            self._stream, max=f"{before_id - 1}-0", count=limit))
        return [_entry(entry_id, fields) for entry_id, fields in reversed(entries)]

    async def last_id(self) -> int:
        return int(await self._call(self._redis.get(self._counter)) or 0)

    async def first_id(self) -> int:
        oldest = await self._call(self._redis.xrange(self._stream, count=1))
        if oldest:
            return int(oldest[0][0].partition("-")[0])
        return await self.last_id() + 1

    async def close(self) -> None:
        await self._reader.aclose()
        await self._redis.aclose(close_connection_pool=True)

    # -- following other processes -------------------------------------------------------

    shared = pushes = True
    """Other processes append to this log, and :meth:`follow` yields every append as it
    happens."""

    async def follow(self, after_id: int) -> AsyncIterator[list[Message]]:
        """Pages of the messages after ``after_id``, in id order, as they are appended by
        any process (this one's too), until cancelled.

        One blocking ``XREAD`` on a connection of its own: Redis answers the moment an
        entry arrives, so there is no polling loop, and the cursor makes a reconnect
        resume exactly where it stopped. When Redis fails, the read is retried with
        exponential backoff (:attr:`reconnects` counts it). A read that waited ``block``
        seconds for nothing checks the id counter: below the cursor, Redis was emptied
        (FLUSHALL) or replaced, and an empty page says so (the hub resets its clients);
        the cursor starts again from 0.
        """
        cursor = after_id
        for _ in range(1 << 62):  # one blocking XREAD per turn; ends when cancelled
            try:
                reply = await self._reader.xread({self._stream: f"{cursor}-0"}, count=500,
                                                 block=int(self.block * 1000))
                went_back = not reply and cursor > int(
                    await self._reader.get(self._counter) or 0)
            except (RedisError, OSError):
                self.reconnects += 1
                await self._drop_idle_connections()
                await self._backoff.wait()
                continue
            self._backoff.reset()
            if went_back:  # FLUSHALL, or a new Redis: the ids start again below the cursor
                cursor = 0
                yield []
            for _stream, entries in reply:
                if entries:
                    messages = [_entry(entry_id, fields) for entry_id, fields in entries]
                    cursor = messages[-1].id
                    yield messages

    def bus(self) -> RedisBus:
        """A new channel for presence and typing between the processes sharing this log
        (chatlib.redis_bus), on the same Redis and key; the server runs and closes it."""
        from .redis_bus import RedisBus

        return RedisBus(self.url, key=self.key, heartbeat=self.heartbeat,
                        presence_ttl=self.presence_ttl, backoff=self.backoff)


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
