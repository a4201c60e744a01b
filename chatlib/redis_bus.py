"""Presence and typing between server processes that share one Redis (chatlib.redis_log).

Messages need a log (ordered, durable, resumable); presence and typing do not: who is
connected changes all the time and only its latest value matters, and a typing notice is
worth nothing a second later. So they travel beside the log, on this bus, under the log's
key (``"chat"`` by default):

* ``chat:presence:<process>``: the users connected to that process, expiring after
  ``presence_ttl`` seconds unless its heartbeat refreshes it; ``chat:processes`` lists
  them. Who is here is the union; a process that dies drops out within ``presence_ttl``.
* pub/sub channels ``chat:typing`` and ``chat:presence``: typing notices (ephemeral:
  at-most-once is right for them) and "my presence changed" nudges.

The server wires it (chatlib.server): :meth:`RedisBus.run` with the hub's ``here``, and
callbacks for what the other processes say; :meth:`RedisBus.typing` for this process's
typing notices; :meth:`RedisBus.close` when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .redis_log import Backoff


class RedisBus:
    """Presence and typing across processes, on Redis at ``url`` under ``key``.

    ``heartbeat``: seconds between refreshes of this process's presence (and reads of the
    others'). ``presence_ttl``: how long the others keep it if the refreshes stop (this
    process died). ``backoff``: first and longest wait between reconnection attempts.
    ``timeout``: seconds a command may take; the subscription's silent connection is
    re-checked (re-subscribed) after twice that.
    """

    def __init__(self, url: str, *, key: str = "chat", heartbeat: float = 1.0,
                 presence_ttl: float = 3.0, backoff: tuple[float, float] = (0.05, 2.0),
                 timeout: float = 5.0) -> None:
        self.url = url
        self.heartbeat = heartbeat
        self.presence_ttl = presence_ttl
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._backoff = backoff
        self._processes = f"{key}:processes"
        self._typing = f"{key}:typing"
        self._presence = f"{key}:presence"
        self._redis = aioredis.Redis.from_url(url, decode_responses=True,
                                              socket_connect_timeout=timeout,
                                              socket_timeout=2 * timeout)
        self._nudge = asyncio.Event()
        self._running = False

    def __repr__(self) -> str:
        return f"RedisBus({self.url!r}, process_id={self.process_id!r})"

    async def run(self, here: Callable[[], set[str]], typing: Callable[[str], None],
                  elsewhere: Callable[[frozenset[str]], None]) -> None:
        """Until cancelled: publish ``here()`` (the users connected to this process) and
        call ``elsewhere(users)`` when the users connected to the others change, and
        ``typing(user)`` when someone types on another process."""
        self._running = True
        tasks = [asyncio.ensure_future(self._retrying(lambda: self._listen(typing))),
                 asyncio.ensure_future(self._retrying(lambda: self._beat(here, elsewhere)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            self._running = False

    def typing(self, user: str) -> None:
        """Tell the other processes that ``user`` is typing here (at most once)."""
        if not self._running:
            return
        payload = json.dumps({"from": self.process_id, "user": user})
        task = asyncio.ensure_future(self._redis.publish(self._typing, payload))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # ephemeral

    async def close(self) -> None:
        """Leave: drop out of the presence list now rather than after ``presence_ttl``."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._leave(), self.heartbeat + 1)
        await self._redis.aclose()

    async def _retrying(self, attempt) -> None:
        """Run ``attempt()`` until cancelled; when Redis fails, wait (exponential backoff,
        jitter) and run it again."""
        backoff = Backoff(*self._backoff)
        for _ in range(1 << 62):  # ends when cancelled
            try:
                await attempt()
                backoff.reset()
            except (RedisError, OSError):
                await backoff.wait()

    async def _listen(self, typing: Callable[[str], None]) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._typing, self._presence)
            self._nudge.set()  # (re)subscribed: others may have changed meanwhile
            async for item in pubsub.listen():
                data = json.loads(item["data"])
                if data.get("from") == self.process_id:
                    continue
                if item["channel"] == self._typing:
                    typing(data["user"])
                else:
                    self._nudge.set()
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def _beat(self, here: Callable[[], set[str]],
                    elsewhere: Callable[[frozenset[str]], None]) -> None:
        """Write this process's users (with a TTL) and read everyone else's: every
        ``heartbeat`` seconds, and at once when someone says theirs changed."""
        mine: list[str] | None = None  # after an outage: write and announce again
        others: frozenset[str] | None = None
        for _ in range(1 << 62):  # ends on error or cancel
            users = sorted(here())
            await self._redis.set(f"{self._presence}:{self.process_id}", json.dumps(users),
                                  px=int(self.presence_ttl * 1000))
            if users != mine:
                await self._redis.sadd(self._processes, self.process_id)
                await self._redis.publish(self._presence, json.dumps({"from": self.process_id}))
                mine = users
            now = await self._read_presence()
            if now != others:
                others = now
                elsewhere(now)
            self._nudge.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), self.heartbeat)

    async def _read_presence(self) -> frozenset[str]:
        others = [p for p in await self._redis.smembers(self._processes)
                  if p != self.process_id]
        values = await self._redis.mget([f"{self._presence}:{p}" for p in others]) \
            if others else []
        gone = [p for p, value in zip(others, values, strict=True) if value is None]
        if gone:  # expired: that process stopped refreshing (it died)
            await self._redis.srem(self._processes, *gone)
        return frozenset(u for value in values if value for u in json.loads(value))

    async def _leave(self) -> None:
        await self._redis.delete(f"{self._presence}:{self.process_id}")
        await self._redis.srem(self._processes, self.process_id)
        await self._redis.publish(self._presence, json.dumps({"from": self.process_id}))
