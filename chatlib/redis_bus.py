"""Presence and typing between server processes that share one Redis (chatlib.redis_log).

Messages need a log (ordered, durable, resumable); presence and typing do not: who is
connected changes all the time and only its latest value matters, and a typing notice is
worth nothing a second later. So they travel beside the log, on this bus, under the log's
key (``"chat"`` by default):

* ``chat:presence:<process>``: the users connected to that process, room by room (a
  JSON object, room -> users), expiring after ``presence_ttl`` seconds unless its
  heartbeat refreshes it; ``chat:processes`` lists them. Who is in a room is the union; a
  process that dies drops out within ``presence_ttl``.
* pub/sub channels ``chat:typing``, ``chat:dm`` and ``chat:presence``: typing notices,
  with their room, and "a direct message was posted" notices (ephemeral: at-most-once is
  right for them: the message itself is in the log), and "my presence changed" nudges.

Every room of a process shares one bus, as every room shares one log follower: one
subscription, one heartbeat (one key written and the others' read per beat, whatever the
number of rooms). The server wires it (chatlib.server, chatlib.rooms): the default room's
hub runs :meth:`RedisBus.run` with its ``here`` and callbacks for what the other processes
say; each other room's hub runs the view :meth:`RedisBus.room` gives, the same way;
:meth:`RedisBus.typing` tells of this process's typing; :meth:`RedisBus.close` when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Callable
from typing import NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .redis_log import Backoff
from .store import DEFAULT_ROOM


class _Callbacks(NamedTuple):
    """What one room's hub gave :meth:`RedisBus.run`."""

    here: Callable[[], set[str]]
    typing: Callable[[str], None]
    elsewhere: Callable[[frozenset[str]], None]


class RedisBus:
    """Presence and typing across processes, on Redis at ``url`` under ``key``: the
    default room's, and through :meth:`room` every other room's.

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
        self.name = DEFAULT_ROOM
        self.heartbeat = heartbeat
        self.presence_ttl = presence_ttl
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._backoff = backoff
        self._processes = f"{key}:processes"
        self._typing = f"{key}:typing"
        self._presence = f"{key}:presence"
        self._dms = f"{key}:dm"
        self._redis = aioredis.Redis.from_url(url, decode_responses=True,
                                              socket_connect_timeout=timeout,
                                              socket_timeout=2 * timeout)
        self._nudge = asyncio.Event()
        self._running = False
        # The hubs running (on) this bus, by room (two, briefly, when two requests made one
        # room's hub at once), and what each one's elsewhere was last told.
        self._rooms: dict[str, list[_Callbacks]] = {}
        self._others: dict[_Callbacks, frozenset[str]] = {}
        self.dm_elsewhere: Callable[[str, str], None] | None = None
        """Called ``(room, sender)`` when a direct message was posted on another process
        (:meth:`dm`): the server tells its connections of the other user (chatlib.rooms)."""

    def __repr__(self) -> str:
        return f"RedisBus({self.url!r}, process_id={self.process_id!r})"

    def room(self, name: str) -> RedisBus | RoomBus:
        """The bus of room ``name`` (this one for the default room): the same Bus
        interface, on this bus's connections and heartbeat."""
        return self if name == DEFAULT_ROOM else RoomBus(self, name)

    async def run(self, here: Callable[[], set[str]], typing: Callable[[str], None],
                  elsewhere: Callable[[frozenset[str]], None]) -> None:
        """Until cancelled: publish ``here()`` (the users of the default room connected to
        this process) and call ``elsewhere(users)`` when the room's users connected to the
        others change, and ``typing(user)`` when someone types in it on another process.
        The rooms' views (:meth:`room`) are served while this runs."""
        self._running = True
        callbacks = _Callbacks(here, typing, elsewhere)
        self._join(DEFAULT_ROOM, callbacks)
        tasks = [asyncio.ensure_future(self._retrying(self._listen)),
                 asyncio.ensure_future(self._retrying(self._beat))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            self._running = False
            self._leave_room(DEFAULT_ROOM, callbacks)

    def typing(self, user: str, room: str = DEFAULT_ROOM) -> None:
        """Tell the other processes that ``user`` is typing in ``room`` here (at most once)."""
        if not self._running:
            return
        data = {"from": self.process_id, "user": user}
        if room != DEFAULT_ROOM:
            data["room"] = room
        task = asyncio.ensure_future(self._redis.publish(self._typing, json.dumps(data)))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # ephemeral

    def dm(self, room: str, sender: str) -> None:
        """Tell the other processes that ``sender`` posted in the room of direct messages
        ``room`` (at most once, like typing): the other user's connections there hear of
        it (their :attr:`dm_elsewhere`), though their process does not follow that room."""
        if not self._running:
            return
        payload = json.dumps({"from": self.process_id, "room": room, "user": sender})
        task = asyncio.ensure_future(self._redis.publish(self._dms, payload))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        """Leave: drop out of the presence list now rather than after ``presence_ttl``."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._leave(), self.heartbeat + 1)
        await self._redis.aclose()

    def _join(self, room: str, callbacks: _Callbacks) -> None:
        self._rooms.setdefault(room, []).append(callbacks)
        self._nudge.set()  # tell its hub what the others have, at the next beat

    def _leave_room(self, room: str, callbacks: _Callbacks) -> None:
        held = self._rooms.get(room, [])
        if callbacks in held:
            held.remove(callbacks)
            if not held:
                del self._rooms[room]
        self._others.pop(callbacks, None)
        self._nudge.set()  # its users leave the presence the others read

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

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._typing, self._presence, self._dms)
            self._nudge.set()  # (re)subscribed: others may have changed meanwhile
            async for item in pubsub.listen():
                data = json.loads(item["data"])
                if data.get("from") == self.process_id:
                    continue
                if item["channel"] == self._typing:
                    # No hub of that room here: nobody to tell.
                    for callbacks in self._rooms.get(data.get("room", DEFAULT_ROOM), ()):
                        callbacks.typing(data["user"])
                elif item["channel"] == self._dms:
                    if self.dm_elsewhere is not None:
                        self.dm_elsewhere(data["room"], data["user"])
                else:
                    self._nudge.set()
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def _beat(self) -> None:
        """Write this process's users room by room (with a TTL) and read everyone else's:
        every ``heartbeat`` seconds, and at once when a room here or someone elsewhere says
        theirs changed."""
        mine: dict[str, list[str]] | None = None  # after an outage: write and announce again
        self._others.clear()
        for _ in range(1 << 62):  # ends on error or cancel
            rooms = {room: list(held) for room, held in self._rooms.items()}
            users = {room: sorted(set().union(*(callbacks.here() for callbacks in held)))
                     for room, held in rooms.items()}
            users = {room: names for room, names in users.items() if names}
            await self._redis.set(f"{self._presence}:{self.process_id}", json.dumps(users),
                                  px=int(self.presence_ttl * 1000))
            if users != mine:
                await self._redis.sadd(self._processes, self.process_id)
                await self._redis.publish(self._presence, json.dumps({"from": self.process_id}))
                mine = users
            self._nudge.clear()
            now = await self._read_presence()
            for room, held in rooms.items():
                theirs = now.get(room, frozenset())
                for callbacks in held:
                    if callbacks in self._rooms.get(room, ()) and \
                            self._others.get(callbacks) != theirs:
                        self._others[callbacks] = theirs
                        callbacks.elsewhere(theirs)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), self.heartbeat)

    async def _read_presence(self) -> dict[str, frozenset[str]]:
        """The users connected to the other processes, room by room."""
        others = [p for p in await self._redis.smembers(self._processes)
                  if p != self.process_id]
        values = await self._redis.mget([f"{self._presence}:{p}" for p in others]) \
            if others else []
        gone = [p for p, value in zip(others, values, strict=True) if value is None]
        if gone:  # expired: that process stopped refreshing (it died)
            await self._redis.srem(self._processes, *gone)
        rooms: dict[str, set[str]] = {}
        for value in values:
            if value:
                held = json.loads(value)
                if isinstance(held, list):  # a process from before rooms: the default room's
                    held = {DEFAULT_ROOM: held}
                for room, users in held.items():
                    rooms.setdefault(room, set()).update(users)
        return {room: frozenset(users) for room, users in rooms.items()}

    async def _leave(self) -> None:
        await self._redis.delete(f"{self._presence}:{self.process_id}")
        await self._redis.srem(self._processes, self.process_id)
        await self._redis.publish(self._presence, json.dumps({"from": self.process_id}))


class RoomBus:
    """The bus of one room other than the default (:meth:`RedisBus.room`): the same
    interface, served by the default room's :meth:`RedisBus.run` (its subscription and
    heartbeat), which must be running for it to carry anything."""

    def __init__(self, bus: RedisBus, name: str) -> None:
        self.name = name
        self._bus = bus
        self._callbacks: _Callbacks | None = None

    def __repr__(self) -> str:
        return f"<RoomBus {self.name!r} of {self._bus!r}>"

    async def run(self, here: Callable[[], set[str]], typing: Callable[[str], None],
                  elsewhere: Callable[[frozenset[str]], None]) -> None:
        """Until cancelled: as :meth:`RedisBus.run`, for this room."""
        self._callbacks = _Callbacks(here, typing, elsewhere)
        self._bus._join(self.name, self._callbacks)
        try:
            await asyncio.Future()  # until cancelled: the default room's bus does the work
        finally:
            await self.close()

    def typing(self, user: str) -> None:
        self._bus.typing(user, self.name)

    async def close(self) -> None:
        """Leave: this room's users here drop out of the others' presence at the next beat
        (the connections are the default room's bus's, closed with it)."""
        if self._callbacks is not None:
            self._bus._leave_room(self.name, self._callbacks)
        self._callbacks = None
