"""Admission control: how fast the server takes new sessions, and when it tells the rest
to come back.

After a restart or a failover every client reconnects at once, and each arrival costs
more than a message does: a handshake, a history replay, a presence change broadcast to
everyone. :class:`Admission` admits new sessions at ``Limits.admit_rate`` per second
(bursts of ``admit_burst``) and hands each refused client its own slot in the future,
``1/admit_rate`` after the previous one's: told when to come back, the refused return
spread out at the rate the server admits, instead of all at once again.

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

import random
import time

from .closecode import BEHIND, RESTART, CloseCode, close_reason
from .limits import Limits, RateLimit

MAX_DELAY = 60.0
"""The longest delay a refused client is told (seconds): the queue of slots stops there."""


class Admission:
    """A token bucket for new sessions, the slots handed to the refused, and the reasons
    push connections are closed with.

    One per hub (``hub.admission``): every transport calls :meth:`admit` once per new
    session, before it does any work for it.
    """

    def __init__(self, limits: Limits) -> None:
        self.rate = limits.admit_rate
        self.burst = limits.admit_burst
        self._bucket = RateLimit(self.rate, self.burst) if self.rate > 0 else None
        self._next_slot = 0.0  # monotonic time of the next free slot for a refused client
        self.admitted = 0
        self.refused = 0
        self.restart_window: float | None = None
        """Set by ``ChatServer.restart``: each push client closed with 1012 from now on is
        told to come back after a random delay in ``[0, restart_window)`` seconds; 0 or
        None: told nothing (the naive restart, for comparison; a log that went back)."""

    def admit(self) -> float | None:
        """Admit a new session (None), or refuse it: the seconds after which it should try
        again, its own slot in the queue of refused clients (plus up to one slot of
        jitter), at most :data:`MAX_DELAY`."""
        if self._bucket is None:
            self.admitted += 1
            return None
        if self._bucket.allow():
            self.admitted += 1
            return None
        self.refused += 1
        now = time.monotonic()
        gap = 1 / self.rate
        slot = max(self._next_slot, now + self._bucket.wait())
        self._next_slot = min(slot + gap, now + MAX_DELAY)
        return round(min(slot - now + random.uniform(0, gap), MAX_DELAY), 2)

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
        """``{"rate", "burst", "admitted", "refused", "tokens"}``: the bucket and what it
        decided since the server started."""
        tokens = round(self._bucket.tokens(), 1) if self._bucket is not None else None
        return {"rate": self.rate, "burst": self.burst, "admitted": self.admitted,
                "refused": self.refused, "tokens": tokens}


BUSY_ERROR = "server busy: too many new sessions; come back after retry_after seconds"
"""The error of a refused HTTP session (503): ``retry_after`` is in the body and, in
whole seconds, in ``Retry-After``."""
