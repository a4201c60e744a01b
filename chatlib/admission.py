"""Admission control: how fast the server takes new sessions, and when it tells the rest
to come back.

After a restart or a failover every client reconnects at once, and each arrival costs
more than a message does: a handshake, a history replay, a presence change broadcast to
everyone. :class:`Admission` admits new sessions at ``Limits.admit_rate`` per second
(bursts of ``admit_burst``) and hands each refused client its own slot in the future,
``1/admit_rate`` after the previous one's, kept for it: told when to come back, the
refused return spread out at the rate the server admits, instead of all at once again,
and get in when they do.

What counts as a session (one :meth:`Admission.admit` each), and why:

* a WebSocket connection, right after its handshake (chatlib.ws): it holds a subscriber,
  gets a replay and joins presence. It is refused with close 1013 and the reason
  ``"busy: retry after S s"`` (chatlib.closecode): the handshake must be accepted for a
  browser to read a close code at all (a refused handshake is 1006, nothing more);
* an SSE stream (``GET /api/events``, chatlib.sse): the same costs; refused with ``503``,
  ``Retry-After`` (whole seconds, RFC 9110 section 10.2.3) and ``"retry_after"`` (the
  exact delay) in the JSON body;
* a polling join (``POST /api/presence`` of a name not present yet, chatlib.polling):
  the one request that starts a polling session (a GET joins nobody); refused the same
  way.

Polls, posts and typing are not sessions: each is one bounded request, already
budgeted per connection and address (chatlib.limits.SendBudget), and a resume's replay is
paced by the replay budget. The page's SSE session joins (POST) before it streams: two
admissions.

The other half, clients honouring the delay with exponential backoff and full jitter, is
``chatlib.clients.Backoff`` (Python), ``scheduleReconnect`` (static/app.js) and the
ChatPanel (chatlib/panel.py).
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from collections.abc import Callable

from .closecode import BEHIND, RESTART, CloseCode, close_reason
from .limits import Limits

MAX_DELAY = 60.0
"""The longest delay a refused client is told (seconds): the queue of slots stops there."""

EARLY = 0.001
"""How early (seconds) a client may come back for its slot: a timer's slack. Delays are
told rounded up to 0.01 s, and a client counts its delay from when it reads it, so one that
waits what it was told is not early."""

LATE = 3.0
"""How long (seconds) a slot waits for someone to take it: a client that comes back later
than its slot (its own delay, a busy client process, or the server's loop was busy when it
arrived) still finds it. A slot nobody takes within this time is given up: the rate is not
saved up. (At 1 s, in a storm of 2,000 whose clients' process was saturated, ~2-7 % of
the slots were given up and their clients refused again: the server accepted 41-47
sessions/s against 50; at 3 s, 47-49: bench/README.md, "Reconnect storm".)"""


class Admission:
    """A schedule of admissions, ``1/admit_rate`` apart: new sessions take the free places
    in it (GCRA: at most ``admit_burst`` at once), refused ones are handed a place of
    their own (a slot) and told when it is, and the reasons push connections are closed
    with.

    A slot is taken by the first session that arrives once it is due (from :data:`EARLY`
    before it until :data:`LATE` after it), in the order the slots were handed out: a
    session is not told apart from another, so whoever comes takes the oldest due slot.
    A refused client that comes back when it was told therefore gets in, and the server
    admits at its rate as long as the refused keep coming back: a slot is never lost to a
    client that is a moment early, nor to a loop that was busy at its instant. (A token
    bucket forgets both: its tokens overflow while the refused wait, and the refused
    return to find the latecomers took the rest.)

    What it promises: over time, ``admit_rate`` sessions per second plus the burst; in any
    one second, at most the slots due in ``1 + LATE`` seconds plus the burst (a catch-up
    after the loop could not take arrivals for a while: they waited in the kernel, and
    their slots for them).

    One per hub (``hub.admission``): every transport calls :meth:`admit` once per new
    session, before it does any work for it.
    """

    def __init__(self, limits: Limits) -> None:
        self.rate = limits.admit_rate
        self.burst = limits.admit_burst
        self._gap = 1 / self.rate if self.rate > 0 else 0.0
        self._tolerance = (max(1, self.burst) - 1) * self._gap  # GCRA: the burst
        self._next = -math.inf  # the schedule's next free place (monotonic time)
        self._slots: collections.deque[float] = collections.deque()  # handed out, untaken
        self.admitted = 0
        self.refused = 0
        self.restart_window: float | None = None
        """Set by ``ChatServer.restart``: each push client closed with 1012 from now on is
        told to come back after a random delay in ``[0, restart_window)`` seconds; 0 or
        None: told nothing (the naive restart, for comparison; a log that went back)."""

    def admit(self) -> float | None:
        """Admit a new session (None), or refuse it: the seconds after which it should
        come back, to the slot it is handed, at most :data:`MAX_DELAY` (a client told
        ``MAX_DELAY`` holds no slot: the schedule is full)."""
        if self.rate <= 0:
            self.admitted += 1
            return None
        now = time.monotonic()
        slots = self._slots
        while slots and slots[0] < now - LATE:
            slots.popleft()  # nobody came for it
        if slots and slots[0] <= now + EARLY:
            slots.popleft()  # a slot that is due: already counted in the schedule
            self.admitted += 1
            return None
        if self._next <= now + self._tolerance:  # a free place now (within the burst)
            self._next = max(self._next, now) + self._gap
            self.admitted += 1
            return None
        self.refused += 1
        slot = max(self._next - self._tolerance, now)  # its earliest place in the schedule
        if slot - now >= MAX_DELAY:
            return MAX_DELAY
        self._next = max(self._next, slot) + self._gap
        slots.append(slot)
        return math.ceil((slot - now) * 100 - 1e-6) / 100  # up: never early

    def closing(self, code: int) -> str:
        """The reason to close a push connection with ``code`` (chatlib.closecode.CLOSES):
        1013 "behind"; 1012 "restart" with this client's random delay while a restart
        spreads its clients; "" for other codes (and a 1012 without a delay)."""
        if code == CloseCode.TRY_AGAIN_LATER:
            return close_reason(BEHIND)
        if code == CloseCode.SERVICE_RESTART:
            window = self.restart_window
            if window:
                return close_reason(RESTART, random.uniform(0, window))
        return ""

    def stats(self) -> dict:
        """``{"rate", "burst", "admitted", "refused", "slots", "tokens"}``: what it decided
        since the server started, the slots handed out and not taken yet, and how many new
        sessions it would admit at once now (None: no admission control)."""
        if self.rate <= 0:
            tokens = None
        else:
            free = (time.monotonic() + self._tolerance - self._next) / self._gap + 1
            tokens = round(min(max(1, self.burst), max(0.0, free)), 1)
        return {"rate": self.rate, "burst": self.burst, "admitted": self.admitted,
                "refused": self.refused, "slots": len(self._slots), "tokens": tokens}


BUSY_ERROR = "server busy: too many new sessions; come back after retry_after seconds"
"""The error of a refused HTTP session (503): ``retry_after`` is in the body and, in
whole seconds, in ``Retry-After``."""


FIRST_BYTES_PER_STEP = 8
"""New connections whose first bytes are handled per event-loop step (:class:`FirstBytes`;
read when a server starts)."""


class FirstBytes:
    """New connections' first bytes: at most ``per_step`` of them handled per event-loop
    step, the others on the next steps, in the order they came.

    When a restart sends every client back at once, most are refused (1013, after the
    handshake: a browser reads nothing else). One refusal costs little, but asyncio runs
    the callback of every readable socket in one step: a crowd's handshakes, arriving
    together, made steps of thousands of callbacks, and each step that a live message
    for the clients already connected needs (its read, its post, its fan-out) waited
    behind one (bench/README.md, "Reconnect storm"; bench/handshake_burst.py). A
    connection whose first bytes wait has its reading paused till its turn (the kernel
    holds what follows), so its bytes stay in order.

    One per server: chatlib.protocols.http_protocol gives it to every HTTP connection.
    """

    def __init__(self, per_step: int | None = None) -> None:
        self.per_step = FIRST_BYTES_PER_STEP if per_step is None else per_step
        """0: no gate (every connection's first bytes at once, as asyncio runs them)."""
        self._waiting: collections.deque[
            tuple[asyncio.Transport, Callable[[bytes], None], bytes]] = collections.deque()
        self._taken = 0  # first bytes handled in this step
        self._step: asyncio.Handle | None = None  # the next step's turn, once scheduled

    def hold(self, transport: asyncio.Transport, handle: Callable[[bytes], None],
             data: bytes) -> bool:
        """A new connection's first bytes ``data``: False, handle them now; True, they
        wait (``transport``'s reading paused) and ``handle(data)`` is called on a later
        step."""
        if self.per_step <= 0:
            return False
        if self._step is None:  # the count starts anew on the next step
            self._step = asyncio.get_running_loop().call_soon(self._next_step)
        if not self._waiting and self._taken < self.per_step:
            self._taken += 1
            return False
        transport.pause_reading()
        self._waiting.append((transport, handle, data))
        return True

    @property
    def waiting(self) -> int:
        """Connections whose first bytes wait for a step."""
        return len(self._waiting)

    def _next_step(self) -> None:
        self._taken = 0
        self._step = (asyncio.get_running_loop().call_soon(self._next_step)
                      if self._waiting else None)
        while self._waiting and self._taken < self.per_step:  # bounded: per_step
            transport, handle, data = self._waiting.popleft()
            if transport.is_closing():
                continue  # gone while it waited
            self._taken += 1
            transport.resume_reading()
            handle(data)
