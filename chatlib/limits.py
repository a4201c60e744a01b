"""Every limit the server enforces, in one place, with the reason for each.

A chat server accepts text from strangers. Without explicit limits one client can exhaust
memory (huge frames, a reader that never reads), CPU (a flood of messages) or the patience
of everyone else. Each limit here fails *that client only*, with a clear error.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

MAX_ID = 2**63 - 1
"""Message ids are SQLite INTEGERs: a cursor beyond this can only be nonsense."""

MAX_CLIENT_ID = 64
"""Characters in a client's own id for a message (``client_id``, ``Idempotency-Key``)."""

RETAIN_MESSAGES = 100_000
"""Messages every log keeps by default (``chatlib serve --retain``)."""
RETAIN_BYTES = 64 * 2**20
"""Bytes of messages every log keeps by default (``chatlib serve --retain-bytes``): 64 MiB,
so that 100,000 messages of 2,000 emoji (848 MB in a MemoryLog) cannot be held."""
TRIM_TO = 0.9
"""A log over a cap drops its oldest messages down to this share of the cap, so that
trimming runs once per ~10 % of the cap, not on every append."""

MAX_ROOMS = 1000
"""Rooms every log holds at most by default, the default room included: each room is a
log of its own (its messages, ids, retention), so their number is bounded like the rest."""

LINGER_SECONDS = 2.0
"""Longest a refused connection is drained before it is closed (nginx: lingering_time)."""
LINGER_BYTES = 4 * 1024 * 1024
"""Most bytes read and discarded from a refused connection before it is closed."""
MAX_FRAGMENTS = 1024
"""Frames one WebSocket message may come in (a first frame and its continuations); past
this the connection is closed with 1008. websockets parses each frame in Python, so a
message sent one byte per frame cost the event loop ~1 us a byte: two such connections
held a core (issue 18), the WebSocket twin of ``Limits.max_body_chunks``."""
READ_SLICE = 4 * 1024
"""Bytes of one WebSocket connection parsed per event-loop step: a read brings up to
256 KiB, which websockets parses in one go, and a flood of 1-byte frames made that ~37,000
frames while everyone else waited (chatlib.protocols)."""

FANOUT_SLICE = 256
"""Deliveries one event-loop step makes before the loop may run anything else.

A fan-out is a loop over every client, and nothing else runs on the event loop meanwhile:
in a Jupyter kernel with 5,000 clients, one message held the loop for tens of
milliseconds, and a cell waiting behind it as long (bench/classroom.py). Bigger fan-outs
go in slices of this many clients, one per loop step, all of one message's before the
next message's (chatlib.hub)."""

REPLAY_SLICE = 100
"""Messages of history written to one client per event-loop step (chatlib.hub.Hub.history):
a page of ``Limits.history`` messages encoded and written in one step holds the loop that
long, and a reconnect storm replays a page to every client it admits (bench/README.md,
"Reconnect storm")."""

LIVE_FIRST_STEPS = 64
"""Event-loop steps a replay waits at most, between two slices, for the fan-outs going out
then to end: live messages before catch-up, yet every replay moves on (chatlib.hub)."""

FANOUT_GROUP = 32
"""At most this many fan-outs waiting for the same clients go out together, client by
client: a burst's frames to one client in one write (chatlib.hub)."""

FD_LIMIT_WANTED = 4096
"""File descriptors below which the server warns at start: one per connection
(chatlib.server)."""

# -- the clients' and the course's code ---------------------------------------------------

MAX_OUTBOX = 100
"""Own messages waiting for the server at most; the chat panel's view refuses more until
some are sent (chatlib.panel)."""

MAX_HEAD_SIZE = 16 * 1024
"""Largest response head (status line and headers) the course's handshake client reads:
16 KiB (chatlib.handshake.open_raw)."""

DEFAULT_MAX_SIZE = 2**20
"""Largest payload the course's frame codec accepts by default: 1 MiB (chatlib.frames)."""


@dataclass
class Limits:
    max_text: int = 2000
    """Characters in one message's text (longer: 413 / error frame)."""
    max_user: int = 32
    """Characters in a nickname."""
    max_frame: int = 64 * 1024
    """Bytes in one WebSocket message; bigger ones are closed with 1009 by the protocol."""
    max_body: int = 64 * 1024
    """Bytes in one HTTP request body (POST); bigger: 413."""
    max_body_chunks: int = 1024
    """Chunks in one chunked request body: h11 parses each in Python, holding the event
    loop for everyone meanwhile; past this: 413 (chatlib.protocols)."""
    body_timeout: float = 10.0
    """Seconds a request body may take to arrive once its headers have; then 408."""
    header_timeout: float = 10.0
    """Seconds a connection may take to send a request's headers (slowloris); then 408,
    or a plain close if it sent nothing."""
    rate: float = 5.0
    """Messages (and typing notices) per second a connection may send, on average ..."""
    burst: int = 20
    """... with bursts of up to this many."""
    address_rate: float = 50.0
    """Messages and typing notices per second from one client address, all its connections
    and nicknames together (more connections or new names do not buy more) ...
    The default lets a classroom of about 30 behind one NAT address chat at full speed
    (a person sends well under 1 message/s); raise it for a bigger room behind one address."""
    address_burst: int = 200
    """... with bursts of up to this many."""
    max_queue: int = 1024
    """Frames waiting for one slow client before it is closed (1013) to protect the others."""
    stuck_timeout: float = 10.0
    """Seconds a push client may go without acknowledging a byte while bytes wait for it
    (and, after a 1013 close or the end of its SSE stream, to read them) before its
    connection is reset: a client that never reads costs nothing (no socket, no kernel
    buffer) after about this long (chatlib.stuck)."""
    max_wait: float = 25.0
    """Longest a long poll hangs (seconds); below common proxy idle timeouts."""
    history: int = 500
    """Messages replayed to a client that joins or resumes, per request."""
    replay_rate: float = 20.0
    """Pages of history (``history`` messages each) per second that one client address may
    be replayed beyond the first page, all its connections together (a resume pages
    through everything after its cursor; the first page, a fresh join's, is free) ..."""
    replay_burst: int = 20
    """... with bursts of up to this many: four clients resuming 20,000 messages each
    from one address held a core (issue 18); past the budget a replay waits, paced."""
    admit_rate: float = 100.0
    """New sessions per second the server admits (WebSocket handshakes, SSE streams, polling
    joins; chatlib.admission), all clients together: after a restart or a failover every
    client comes back at once, and each arrival costs a handshake, a history replay (a page
    of ``history`` messages) and a presence change; at this rate a storm of full-page resumes
    leaves about half a core for live traffic (README, "Limits and security"; bench/storm.py).
    The rest are told when to come back (503 + ``Retry-After``, close 1013 "busy"). 0
    admits everyone. A classroom joining at once fits in the burst ..."""
    admit_burst: int = 400
    """... with bursts of up to this many."""
    heartbeat: float = 15.0
    """Seconds between SSE comment lines that keep idle proxies from closing the stream."""
    presence_ttl: float = 30.0
    """Seconds an HTTP polling user stays in the presence list after its last request."""
    presence_names: int = 100
    """Names in a presence event (the first ones, sorted); ``count`` says how many there are.
    Bounds each event at a few KB however many nicknames are made up."""
    polled_per_address: int = 64
    """Polling nicknames tracked per client address (a classroom behind one NAT fits);
    a request that would add one more is answered 429."""
    new_names_rate: float = 2.0
    """New polling nicknames per second one client address may announce (presence changes
    are broadcast to everyone) ..."""
    new_names_burst: int = 40
    """... with bursts of up to this many (a classroom behind one NAT joining at once)."""
    presence_interval: float = 0.25
    """At most one presence broadcast per this many seconds: when a classroom joins at once,
    N joins would otherwise send N presence lists to up to N clients (N² frames; bench/
    README.md, "Join storm")."""
    presence_audience: int = 250
    """Push clients one ``presence_interval`` is for: with N more, broadcasts are at least
    ``presence_interval × N / presence_audience`` seconds apart. A broadcast is one write
    per client, so presence costs at most ~``presence_audience / presence_interval``
    writes a second (1,000 by default) however many listen. 0: no such bound."""
    presence_interval_max: float = 5.0
    """... but never more than this many seconds apart: a list of who is here that is older
    than that is one users stop trusting (at 20,000 push clients: 4,000 writes a second)."""
    hello_timeout: float = 10.0
    """Seconds a new WebSocket has to say hello before it is closed."""
    max_rooms: int = MAX_ROOMS
    """Rooms a log made by the server holds at most (the default room included); a new one
    beyond is refused (429). A log given to the server keeps its own bound."""
    rooms_per_client: int = 20
    """Rooms one WebSocket or WebTransport connection may be in at once, and one polling
    user present in (``POST /api/presence``); 429 beyond: each room it is in is one more
    subscription, one more queue or presence entry of its own."""
    allowed_origins: set[str] = field(default_factory=set)
    """Extra browser origins allowed besides the server's own (e.g. a JupyterLab origin)."""
    allowed_hosts: set[str] = field(default_factory=set)
    """Extra names a browser may use in ``Host`` (chatlib.guard; ``"*"``: any), besides
    IP addresses, localhost, the bound host and the public URL's host."""


class RateLimit:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def tokens(self) -> float:
        """Tokens saved up now; takes nothing."""
        return min(self.burst, self._tokens + (time.monotonic() - self._stamp) * self.rate)

    def wait(self) -> float:
        """Seconds until :meth:`allow` would say yes (0 if it would now); takes nothing."""
        tokens = self._tokens + (time.monotonic() - self._stamp) * self.rate
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate


class RateLimits:
    """Token buckets per key (e.g. an HTTP client's address and nickname), bounded in number.

    When full, the least recently used bucket is forgotten (a forgotten key starts again
    with a full bucket): a flood of new keys evicts only other idle keys, never a client
    that is being throttled right now.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[object, RateLimit] = OrderedDict()

    def allow(self, key) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = RateLimit(self.rate, self.burst)
        else:
            self._buckets.move_to_end(key)
        return bucket.allow()

    def wait(self, key) -> float:
        """Seconds until ``key``'s bucket has a token (0 for a key it does not hold)."""
        bucket = self._buckets.get(key)
        return bucket.wait() if bucket is not None else 0.0

    def __len__(self) -> int:
        return len(self._buckets)


class SendBudget:
    """What a client may send: its own bucket and its address's bucket must both allow it.

    Its own bucket is one per WebSocket connection, or one per (address, nickname) for HTTP.
    The address's bucket is shared by all of them: 50 connections, or a new nickname for
    every request, get the address's budget, not 50 times a client's. The address budget is
    never smaller than one client's (``--rate 1000000`` in bench/ lifts both).
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.http = RateLimits(limits.rate, limits.burst)
        self.addresses = RateLimits(max(limits.address_rate, limits.rate),
                                    max(limits.address_burst, limits.burst))

    def connection(self) -> RateLimit:
        """A bucket for one WebSocket connection."""
        return RateLimit(self.limits.rate, self.limits.burst)

    def allow(self, address: str, bucket: RateLimit | None = None, user: str = "") -> bool:
        """Take a token from ``bucket`` (or the HTTP bucket of ``address, user``) and from
        ``address``'s bucket; False (and the client gets 429) if either is empty."""
        if bucket is None:
            return self.http.allow((address, user)) and self.addresses.allow(address)
        return bucket.allow() and self.addresses.allow(address)

    def retry_after(self, address: str, bucket: RateLimit | None = None,
                    user: str = "") -> int:
        """After a refusal by :meth:`allow` (same arguments): whole seconds until both
        buckets have a token again, at least 1: a 429's ``Retry-After`` (RFC 9110,
        section 10.2.3) and a WebSocket error frame's ``retry_after``. Rounded up, so that
        a client that waits that long is not refused again (unless it spent the token)."""
        own = self.http.wait((address, user)) if bucket is None else bucket.wait()
        return retry_after(max(own, self.addresses.wait(address)))


def retry_after(wait: float) -> int:
    """A refusal's ``Retry-After`` (and error frame's ``retry_after``) for a wait of ``wait``
    seconds: whole seconds (RFC 9110, section 10.2.3), rounded up, at least 1."""
    return max(1, math.ceil(wait))
