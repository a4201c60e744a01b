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
* ``chat:presence:<process>``: the users connected to that process, expiring after
  ``presence_ttl`` seconds unless its heartbeat refreshes it; ``chat:processes`` lists
  them. Who is here is the union; a process that dies drops out within ``presence_ttl``.
* pub/sub channels ``chat:typing`` and ``chat:presence``: typing notices (ephemeral:
  at-most-once is right for them) and "my presence changed" nudges.

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
import json
import os
import random
import time
import uuid

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .store import (
    RETAIN_BYTES,
    RETAIN_MESSAGES,
    Message,
    StoreUnavailable,
    reused_client_id,
)

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
    ``(user, client_id)`` is remembered. ``heartbeat`` / ``presence_ttl``: how often this
    process refreshes its presence, and how long others keep it if it stops (dies).
    ``block``: seconds one blocking ``XREAD`` waits before it is re-issued (it returns at
    once when an entry arrives; the bound only notices a silently dead connection).
    ``backoff``: first and longest wait (seconds) between reconnection attempts.
    ``timeout``: seconds a command may take before it fails (503). ``max_connections``:
    commands in flight at once; more wait for a connection.
    """

    poll_interval = None  # the hub follows this log with follow(), not by polling

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
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.reconnects = 0  # how often the follower lost Redis and came back
        self._stream = f"{key}:messages"
        self._counter = f"{key}:last_id"
        self._bytes = f"{key}:bytes"
        self._processes = f"{key}:processes"
        self._typing = f"{key}:typing"
        self._presence = f"{key}:presence"
        # No automatic retries: an append whose reply was lost may have been stored, and
        # retrying it blindly could store it twice. The caller gets a 503 and decides
        # (with a client_id, resending is safe: the script dedupes it).
        options = dict(decode_responses=True, retry=Retry(NoBackoff(), 0),
                       socket_connect_timeout=timeout, socket_timeout=timeout)
        # A bounded pool that makes a burst of appends wait for a free connection (up to
        # ``timeout``) instead of failing: the default pool raises "Too many connections".
        self._redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, **options))
        # The follower's blocking reads and the pub/sub subscription each hold a connection.
        self._reader = aioredis.Redis.from_url(
            url, **{**options, "socket_timeout": block + timeout})
        self._append = self._redis.register_script(APPEND)
        self._tasks: list[asyncio.Task] = []

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
                    f"message store did not answer ({exc.__class__.__name__}): the message"
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

    async def last_id(self) -> int:
        return int(await self._call(self._redis.get(self._counter)) or 0)

    async def first_id(self) -> int:
        oldest = await self._call(self._redis.xrange(self._stream, count=1))
        if oldest:
            return int(oldest[0][0].partition("-")[0])
        return await self.last_id() + 1

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(RedisError, OSError):
            await asyncio.wait_for(self._leave(), self.heartbeat + 1)
        await self._reader.aclose()
        await self._redis.aclose(close_connection_pool=True)

    # -- following other processes -------------------------------------------------------

    async def follow(self, hub) -> None:
        """Feed ``hub`` what other processes do, until cancelled: their messages (in id
        order, from the hub's cursor), who is connected to them, who is typing.

        The hub calls this instead of polling (Hub.start); it gives the hub
        ``relay_typing`` so this process's typing notices reach the others.
        """
        hub.relay_typing = self._relay_typing
        self._nudge = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._read_stream(hub)),
                       asyncio.ensure_future(self._listen(hub)),
                       asyncio.ensure_future(self._heartbeat(hub))]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()

    async def _retrying(self, attempt) -> None:
        """Run ``attempt()`` forever; when Redis fails, wait (exponential backoff, jitter)
        and run it again. ``attempt`` resumes from its own state (a cursor)."""
        delay = self.backoff[0]
        while True:  # ends when cancelled
            try:
                await attempt()
                delay = self.backoff[0]
            except (RedisError, OSError):
                self.reconnects += 1
                await self._drop_idle_connections()
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.backoff[1])

    async def _read_stream(self, hub) -> None:
        cursor = hub.published

        async def read() -> None:
            nonlocal cursor
            for _ in range(1_000_000):  # one blocking XREAD per turn; ends on error/cancel
                reply = await self._reader.xread({self._stream: f"{cursor}-0"}, count=500,
                                                 block=int(self.block * 1000))
                for _stream, entries in reply:
                    if entries:
                        messages = [_entry(entry_id, fields) for entry_id, fields in entries]
                        cursor = messages[-1].id
                        await hub.deliver(messages)

        await self._retrying(read)

    async def _listen(self, hub) -> None:
        async def listen() -> None:
            pubsub = self._reader.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._typing, self._presence)
                self._nudge.set()  # (re)subscribed: others may have changed meanwhile
                async for item in pubsub.listen():
                    data = json.loads(item["data"])
                    if data.get("from") == self.process_id:
                        continue
                    if item["channel"] == self._typing:
                        hub.typing(data["user"], relay=False)
                    else:
                        self._nudge.set()
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

        await self._retrying(listen)

    def _relay_typing(self, user: str) -> None:
        payload = json.dumps({"from": self.process_id, "user": user})
        task = asyncio.ensure_future(self._redis.publish(self._typing, payload))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # ephemeral

    async def _heartbeat(self, hub) -> None:
        """Write this process's users (with a TTL) and read everyone else's: every
        ``heartbeat`` seconds, and at once when someone says theirs changed."""
        mine: list[str] | None = None

        async def beat() -> None:
            nonlocal mine
            for _ in range(1_000_000_000):  # ends on error or cancel
                here = sorted(hub.here())
                await self._redis.set(f"{self._presence}:{self.process_id}", json.dumps(here),
                                      px=int(self.presence_ttl * 1000))
                if here != mine:
                    await self._redis.sadd(self._processes, self.process_id)
                    await self._redis.publish(self._presence,
                                              json.dumps({"from": self.process_id}))
                    mine = here
                await self._read_presence(hub)
                self._nudge.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._nudge.wait(), self.heartbeat)

        async def attempt() -> None:
            nonlocal mine
            mine = None  # after an outage: write and announce again
            await beat()

        await self._retrying(attempt)

    async def _read_presence(self, hub) -> None:
        others = [p for p in await self._redis.smembers(self._processes)
                  if p != self.process_id]
        values = await self._redis.mget([f"{self._presence}:{p}" for p in others]) \
            if others else []
        gone = [p for p, value in zip(others, values, strict=True) if value is None]
        if gone:  # expired: that process stopped refreshing (it died)
            await self._redis.srem(self._processes, *gone)
        elsewhere = frozenset(u for value in values if value for u in json.loads(value))
        if elsewhere != hub.elsewhere:
            hub.elsewhere = elsewhere
            hub.presence_changed()

    async def _leave(self) -> None:
        """A clean stop: drop out of the presence list now rather than after the TTL."""
        await self._redis.delete(f"{self._presence}:{self.process_id}")
        await self._redis.srem(self._processes, self.process_id)
        await self._redis.publish(self._presence, json.dumps({"from": self.process_id}))
