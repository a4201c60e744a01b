"""Who is here: the names in the chat's presence list, and telling everyone when it changes.

Three kinds of users are here:

* push clients (WebSocket, SSE) with a nickname, while connected: the hub reports each
  one that subscribes and unsubscribes (:meth:`Presence.connected`,
  :meth:`Presence.disconnected`); two tabs of one name count once;
* HTTP clients that joined with ``POST /api/presence`` (:meth:`Presence.touch`), for
  ``presence_ttl`` seconds after their last poll (:meth:`Presence.refresh`);
* with several processes sharing one log, the users of the others (told by the bus,
  :meth:`Presence.set_elsewhere`).

A change is told to everyone as one ``presence`` event (``{"users": [...], "count": N}``),
at most every ``presence_interval`` seconds (longer with many push clients:
:meth:`Presence.interval`): the changes in between go out together. The
event goes out through the function :class:`Presence` is given (the hub's broadcast, which
fans it out to every push client); pull clients ask ``GET /api/presence``
(:meth:`Presence.event`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

from .limits import Limits, RateLimits, retry_after


class Presence:
    """The presence list of one process, and its ``presence`` events."""

    def __init__(self, limits: Limits, broadcast: Callable[[str, dict], None]) -> None:
        self.limits = limits
        self._broadcast = broadcast  # (event name, data) to every push client
        self._connected: Counter[str] = Counter()  # WebSocket and SSE users
        self._push = 0  # push clients with a nickname (the sum of _connected)
        self._polled: dict[str, tuple[float, str]] = {}  # HTTP user -> (last seen, address)
        self._polled_per_address: Counter[str] = Counter()
        self._new_names = RateLimits(limits.new_names_rate, limits.new_names_burst)
        self._elsewhere: frozenset[str] = frozenset()  # users of other processes (bus)
        self._sent: list[str] = []
        self._told: frozenset[str] = frozenset()  # the names of _sent: told() per join
        self._sent_at = float("-inf")  # loop time of the last presence broadcast
        self._due: asyncio.TimerHandle | None = None
        self.data: dict = {"users": [], "count": 0}
        """What the last ``presence`` event said (nobody may change it)."""

    # -- push clients --------------------------------------------------------------------

    def told(self, user: str) -> bool:
        """Whether the last ``presence`` event listed ``user`` (a second tab of a name that
        is here already changes nothing: it is told :attr:`data` on its own)."""
        return user in self._told

    def connected(self, user: str) -> None:
        """A push client named ``user`` subscribed."""
        self._connected[user] += 1
        self._push += 1
        self.changed()

    def disconnected(self, user: str) -> None:
        """A push client named ``user`` unsubscribed."""
        self._connected[user] -= 1
        self._push -= 1
        if self._connected[user] <= 0:
            del self._connected[user]
        self.changed()

    # -- HTTP clients --------------------------------------------------------------------

    def touch(self, user: str, address: str = "") -> tuple[str, int]:
        """An HTTP client named ``user`` at ``address`` joins (``POST /api/presence``).

        Returns ``("", 0)`` or, when ``user`` is new and may not join the presence list, why
        not and the seconds after which asking again may succeed (``Retry-After``): one
        address may have at most ``polled_per_address`` polling names (a name that stops
        polling leaves within ``presence_ttl``), and announce new ones at most at
        ``new_names_rate`` (each new name is broadcast to everyone).
        """
        now = time.monotonic()
        seen = self._polled.get(user)
        if seen is not None:
            self._polled[user] = (now, seen[1])
            return "", 0
        self._expire_polled(now)
        if self._polled_per_address[address] >= self.limits.polled_per_address:
            return (f"too many nicknames polling from this address "
                    f"(at most {self.limits.polled_per_address})",
                    retry_after(self.limits.presence_ttl))
        if not self._new_names.allow(address):
            return ("too many new nicknames from this address: slow down",
                    retry_after(self._new_names.wait(address)))
        self._polled[user] = (now, address)
        self._polled_per_address[address] += 1
        self.changed()
        return "", 0

    def refresh(self, user: str) -> bool:
        """A poll named ``user``: keep it present if it joined (:meth:`touch`, from
        ``POST /api/presence``); True if so. A GET adds no name."""
        seen = self._polled.get(user)
        if seen is None or seen[0] < time.monotonic() - self.limits.presence_ttl:
            return False
        self._polled[user] = (time.monotonic(), seen[1])
        return True

    def last_seen(self, user: str) -> float | None:
        """When (``time.monotonic()``) HTTP user ``user`` last joined or polled; None if it
        is not here as an HTTP client."""
        seen = self._polled.get(user)
        return None if seen is None else seen[0]

    def take(self, user: str) -> bool:
        """An event stream named ``user`` takes over its join: True if ``user`` joined
        (:meth:`touch`); the stream then holds the name (:meth:`connected`), which leaves
        when the stream ends rather than ``presence_ttl`` later."""
        if not self.refresh(user):
            return False
        self._forget_polled(user)
        return True

    def _forget_polled(self, user: str) -> None:
        address = self._polled.pop(user)[1]
        self._polled_per_address[address] -= 1
        if self._polled_per_address[address] <= 0:
            del self._polled_per_address[address]

    def _expire_polled(self, now: float) -> None:
        expired = now - self.limits.presence_ttl
        for user in [u for u, (seen, _) in self._polled.items() if seen < expired]:
            self._forget_polled(user)

    # -- the list ------------------------------------------------------------------------

    def here(self) -> set[str]:
        """Users connected to this process: push clients with a nickname, recent pollers."""
        self._expire_polled(time.monotonic())
        return set(self._connected) | set(self._polled)

    def users(self) -> list[str]:
        """Everyone here (sorted), in this process and (with a shared log) elsewhere."""
        return sorted(self.here() | self._elsewhere)

    def event(self, users: list[str] | None = None) -> dict:
        """What a presence event says: the first ``presence_names`` names and the count."""
        users = self.users() if users is None else users
        return {"users": users[:self.limits.presence_names], "count": len(users)}

    def set_elsewhere(self, users: frozenset[str]) -> None:
        """The users connected to the other processes (told by the bus) changed."""
        self._elsewhere = users
        self.changed()

    def changed(self) -> None:
        """Tell everyone who is here, if that changed: now, or with the next broadcast.

        Broadcasts are at least :meth:`interval` apart; changes in between are told
        together when it has passed. (The server also calls this every few seconds, for
        HTTP users whose ``presence_ttl`` ran out.)
        """
        if self._due is not None:
            return  # a broadcast is already scheduled: it will say what is true then
        loop = asyncio.get_running_loop()
        wait = self._sent_at + self.interval() - loop.time()
        if wait > 0:
            self._due = loop.call_later(wait, self._tell)
        else:
            self._tell()

    def interval(self) -> float:
        """Seconds from one broadcast to the next at least: ``presence_interval``, longer
        in proportion with more than ``presence_audience`` push clients with a nickname,
        up to ``presence_interval_max`` (chatlib.limits.Limits.presence_audience)."""
        limits = self.limits
        audience = limits.presence_audience
        if audience <= 0 or self._push <= audience:
            return limits.presence_interval
        return max(limits.presence_interval, min(limits.presence_interval * self._push / audience,
                                                 limits.presence_interval_max))

    def _tell(self) -> None:
        self._due = None
        users = self.users()
        if users != self._sent:
            self._sent, self._told = users, frozenset(users)
            self.data = self.event(users)
            self._sent_at = asyncio.get_running_loop().time()
            self._broadcast("presence", self.data)

    def close(self) -> None:
        """The server is stopping: no broadcast after this."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
