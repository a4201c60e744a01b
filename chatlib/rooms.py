"""Rooms: one :class:`~chatlib.hub.Hub` per room in use, and who may be in which.

A room is a log of its own (chatlib.store, :meth:`MessageLog.room`) with a hub of its own:
its fan-out, long polls, presence and typing, exactly what the one chat had before rooms.
:class:`Rooms` holds them: the default room's hub (the server's ``hub``, never dropped)
and the others, made on first use (:meth:`Rooms.using`) and dropped when nobody is in them
(no subscriber, no parked long poll, no polling presence, no request using it), so that a
process holds, and with a shared log follows, only the rooms its clients are in. What a
process has once (admission of new sessions, the replay budget) is shared by every hub.

Who may be in a room (:meth:`Rooms.check`), the same on every transport:

* a room of direct messages, ``@A+B`` (chatlib.validation.dm_room): A and B only. In
  open mode whoever uses the nickname is that user; in token mode only a user token's
  user (chatlib.auth.Grant), never the shared token;
* a private room (``ChatServer(private_rooms=...)``, token mode only): the user tokens
  that list it;
* every other room: everyone.

A message in a room of direct messages is also told, as a ``dm`` event ``{"room",
"from"}``, to every push connection of the other user that is not in the room
(:meth:`Rooms.posted`), so that its page can open it.
"""

from __future__ import annotations

from collections.abc import Callable

from .closecode import CloseCode
from .hub import Hub, Subscriber
from .limits import RateLimits
from .store import DEFAULT_ROOM, Message
from .validation import ChatError, dm_users


class Rooms:
    """The hubs of the rooms in use, around the default room's hub ``default``."""

    def __init__(self, default: Hub, private_rooms: frozenset[str] = frozenset(),
                 token_mode: bool = False) -> None:
        if private_rooms and not token_mode:
            raise ValueError("private rooms need token mode (token=...): in open mode "
                             "anyone may join any room")
        self.default = default
        self.log = default.log
        self.limits = default.limits
        self.admission = default.admission
        self.replays: RateLimits = default.replays
        self.private = frozenset(private_rooms)
        """Rooms only the user tokens that list them may join."""
        self.token_mode = token_mode
        self.hubs: dict[str, Hub] = {DEFAULT_ROOM: default}
        """The hubs held now, by room."""
        self._busy: dict[str, int] = {}  # requests using a room's hub now (using())
        self._default_use = _Held(default)
        self._users: dict[str, dict[object, Callable[[str, dict], None]]] = {}
        default.rooms = self
        bus = default.bus
        if bus is not None and hasattr(bus, "dm"):  # direct messages posted elsewhere
            bus.dm_elsewhere = self._tell_dm

    @classmethod
    def of(cls, hub: Hub) -> Rooms:
        """The registry around ``hub`` (made with no private rooms if it has none)."""
        rooms = getattr(hub, "rooms", None)
        return rooms if rooms is not None else cls(hub)

    # -- hubs ----------------------------------------------------------------------------

    async def hub(self, room: str) -> Hub:
        """The hub of ``room``, made and started if this process holds none (StoreUnavailable
        if the log cannot be read). Use it inside :meth:`using` or keep it by subscribing,
        or it may be dropped at the next :meth:`release`."""
        hub = self.hubs.get(room)
        if hub is not None:
            return hub
        bus = self.default.bus  # presence and typing between processes, per room
        hub = Hub(self.log.room(room), self.limits,
                  bus=bus.room(room) if bus is not None and hasattr(bus, "room") else None,
                  admission=self.admission, replays=self.replays)
        hub.rooms = self
        self._enter(room)  # no one drops it while it starts
        try:
            await hub.start()
        finally:
            self._leave(room)
        held = self.hubs.get(room)
        if held is not None:  # another request made one meanwhile: use that one
            hub.close()
            return held
        if self.default.closing.is_set():  # the server is stopping: closed like the rest
            hub.close()  # (a long poll answers at once instead of parking for its wait)
        self.hubs[room] = hub
        return hub

    def using(self, room: str) -> _Using:
        """``async with rooms.using(room) as hub``: the hub of ``room`` for the time of a
        request (it is not dropped meanwhile); :meth:`release` after. Every request and
        every join goes through this, so it is a small class, not an async generator
        (contextlib's costs a generator, its registration with the loop and a dozen calls
        more per request); the default room's hub is never dropped: nothing to count."""
        return self._default_use if room == DEFAULT_ROOM else _Using(self, room)

    def _enter(self, room: str) -> None:
        busy = self._busy
        busy[room] = busy.get(room, 0) + 1

    def _leave(self, room: str) -> None:
        busy = self._busy
        left = busy[room] - 1
        if left:
            busy[room] = left
        else:
            del busy[room]

    def release(self, hub: Hub) -> None:
        """Drop ``hub`` if nobody is in its room any more (not the default room's): no
        subscriber, no long poll, no polling presence, no request using it."""
        room = hub.room
        if (room == DEFAULT_ROOM or self.hubs.get(room) is not hub or hub.subscribed
                or hub.parked or room in self._busy or hub.presence.here()):
            return
        del self.hubs[room]
        hub.close()

    def sweep(self) -> None:
        """Presence of polling users who went quiet, in every room (``presence_ttl``);
        rooms nobody is in any more are dropped."""
        for hub in list(self.hubs.values()):
            hub.presence.changed()
            self.release(hub)

    def polled_in(self, user: str) -> int:
        """In how many rooms HTTP user ``user`` is present (``POST /api/presence``), at
        most ``rooms_per_client``, as a push connection's rooms."""
        return sum(hub.presence.last_seen(user) is not None for hub in self.hubs.values())

    @property
    def subscribers(self) -> list[Subscriber]:
        """Every push client of every room (a connection in two rooms counts twice)."""
        return [s for hub in self.hubs.values() for s in hub.subscribers]

    def close(self, code: int = CloseCode.GOING_AWAY) -> None:
        """The server is stopping: close every room's hub (:meth:`Hub.close`)."""
        for hub in list(self.hubs.values()):
            hub.close(code)

    # -- who may be where ----------------------------------------------------------------

    def check(self, room: str, user: str, grant=None) -> None:
        """Raise ChatError 403 unless a client named ``user`` ("" for none), holding
        ``grant`` (its user token's chatlib.auth.Grant, None for none), may read and post
        in ``room``."""
        if grant is not None and user and user != grant.user:
            raise ChatError(403, f"forbidden: this token is {grant.user!r}'s")
        pair = dm_users(room)
        if pair is not None:
            if self.token_mode and grant is None:
                raise ChatError(403, "forbidden: direct messages need a user token")
            who = grant.user if grant is not None else user
            if who not in pair:
                raise ChatError(403, f"forbidden: {room} is {pair[0]} and {pair[1]}'s only"
                                     + ("" if who else " (say who you are: user=)"))
        elif room in self.private and (grant is None or room not in grant.rooms):
            raise ChatError(403, f"forbidden: {room} is a private room")

    def readable(self, grant=None) -> set[str]:
        """The private rooms ``grant`` lets its user into (chatlib.app's room list)."""
        return set(grant.rooms) & self.private if grant is not None else set()

    # -- direct messages -----------------------------------------------------------------

    def connected(self, user: str, key: object, tell: Callable[[str, dict], None]) -> None:
        """A push connection (``key``) of ``user`` opened: ``tell(event, data)`` gives it an
        event of no room (a ``dm`` notice; the connection ignores one about a room it is
        in: it reads the message itself)."""
        if user:
            self._users.setdefault(user, {})[key] = tell

    def disconnected(self, user: str, key: object) -> None:
        connections = self._users.get(user)
        if connections is not None:
            connections.pop(key, None)
            if not connections:
                del self._users[user]

    def connections(self, user: str) -> int:
        """How many push connections of ``user`` would be told of a direct message."""
        return len(self._users.get(user, ()))

    def posted(self, message: Message) -> None:
        """``message`` was stored: in a room of direct messages, tell the other user's
        connections (``dm`` ``{"room", "from"}``) that are not in that room, here and
        (through the bus) on the other processes, which may not follow that room."""
        if dm_users(message.room) is None:
            return
        self._tell_dm(message.room, message.user)
        bus = self.default.bus
        if bus is not None and hasattr(bus, "dm"):
            bus.dm(message.room, message.user)

    def _tell_dm(self, room: str, sender: str) -> None:
        pair = dm_users(room)
        if pair is None or sender not in pair:
            return
        other = pair[1] if sender == pair[0] else pair[0]
        data = {"room": room, "from": sender}
        for tell in list(self._users.get(other, {}).values()):
            tell("dm", data)


class _Using:
    """:meth:`Rooms.using` for a room other than the default one."""

    __slots__ = ("rooms", "room")

    def __init__(self, rooms: Rooms, room: str) -> None:
        self.rooms, self.room = rooms, room

    async def __aenter__(self) -> Hub:
        rooms, room = self.rooms, self.room
        rooms._enter(room)
        try:
            return await rooms.hub(room)
        except BaseException:
            self._done()
            raise

    async def __aexit__(self, *exc) -> None:
        self._done()

    def _done(self) -> None:
        rooms, room = self.rooms, self.room
        rooms._leave(room)
        hub = rooms.hubs.get(room)
        if hub is not None:
            rooms.release(hub)


class _Held:
    """:meth:`Rooms.using` for the default room, whose hub is never dropped."""

    __slots__ = ("hub",)

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def __aenter__(self) -> Hub:
        return self.hub

    async def __aexit__(self, *exc) -> None:
        return None
