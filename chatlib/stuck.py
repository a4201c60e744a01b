"""Finding push clients that stopped reading, and resetting their connections."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from functools import partial

from .closecode import CloseCode
from .fastpath import bytes_acked, reset_connection, transport_of, unsent_bytes
from .limits import FANOUT_SLICE, Limits
from .outbox import Outbox

log = logging.getLogger("chatlib")


class Progress:
    """The stuck-client rule for one connection: is its peer still taking what waits for it?

    Call :meth:`stuck` every so often. Bytes wait when asyncio's buffer or the kernel's
    holds them (a burst that fits in the kernel's buffers never shows in asyncio's); the
    peer takes them when its acknowledged byte count moves (Linux TCP_INFO; where that is
    unknown, the first look counts as the start of the wait).
    """

    __slots__ = ("timeout", "_acked", "_since")  # one per watched connection

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._acked: int | None = None  # at the last look; None: nothing was waiting
        self._since = 0.0

    def stuck(self, transport: asyncio.WriteTransport, now: float) -> bool | None:
        """None: nothing waits for the peer. False: something does, and the peer took a
        byte within ``timeout`` seconds (or this is the first look). True: it took none."""
        if not unsent_bytes(transport):
            self._acked = None
            return None
        acked = bytes_acked(transport)
        acked = -1 if acked is None else acked
        if self._acked is None or acked != self._acked:
            self._acked, self._since = acked, now
            return False
        return now - self._since >= self.timeout


class StuckWatch:
    """Finds push clients that stopped reading, and resets their connections.

    A client is stuck when bytes wait for it, in asyncio's buffer or the kernel's, and it
    acknowledged nothing for ``limits.stuck_timeout`` seconds. (Counting asyncio's buffer
    alone missed a burst that fits in the kernel's buffers: the connection then ended in a
    FIN behind 14.4 MB that sat in FIN-WAIT-1 for 340 s, issue 18.)
    A slow client that reads, however slowly, makes progress and is left alone. The kernel
    may hold megabytes for a peer with a shut window, so this can happen long before the
    client's outbox overflows (1013). One sweep for all clients, a few times per timeout:
    one ioctl per client, and a TCP_INFO read for those with unsent bytes (:class:`Progress`),
    :data:`~chatlib.limits.FANOUT_SLICE` clients per event-loop step (a sweep of 19,500
    clients in one step held a kernel's cells up to ~100 ms, bench/README.md).
    Without the fast path (no transport to watch) only the outbox's bound applies.
    (Plain HTTP responses get the same rule from chatlib.protocols.)
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._watched: dict[Outbox, tuple[asyncio.WriteTransport, Progress]] = {}
        self._sweeper: asyncio.Task | None = None
        self.resets = 0
        """Connections reset so far (chatlib.ChatServer.stats) ..."""
        self.closes: Counter[int] = Counter()
        """... and watched push clients the server closed, by close code (1013: fell
        behind), counted when decided (the close frame may never get through)."""

    def transport(self, outbox: Outbox) -> asyncio.WriteTransport | None:
        """The connection under a watched ``outbox`` (None: not watched)."""
        entry = self._watched.get(outbox)
        return entry[0] if entry is not None else None

    def watch(self, scope, outbox: Outbox) -> None:
        transport = transport_of(scope)
        if transport is None:
            return
        self._watched[outbox] = (transport, Progress(self.limits.stuck_timeout))
        outbox.on_close = partial(self._closed, transport)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    def forget(self, outbox: Outbox) -> None:
        self._watched.pop(outbox, None)
        if not self._watched and self._sweeper is not None:
            self._sweeper.cancel()  # nobody to watch: no task left behind at shutdown
            self._sweeper = None

    def _closed(self, transport: asyncio.WriteTransport, code: int) -> None:
        """The hub gave up on this client (1013): the close frame (or the end of the SSE
        stream) is on its way; if the client does not read it either, reset."""
        self.closes[code] += 1
        if code == CloseCode.TRY_AGAIN_LATER:
            asyncio.get_running_loop().call_later(self.limits.stuck_timeout, self._check,
                                                  transport)

    def _check(self, transport: asyncio.WriteTransport) -> None:
        if unsent_bytes(transport):
            self._reset(transport)

    def _reset(self, transport: asyncio.WriteTransport) -> None:
        log.info("resetting a connection that stopped reading (%s)",
                 transport.get_extra_info("peername"))
        self.resets += 1
        reset_connection(transport)

    async def _sweep(self) -> None:
        interval = max(self.limits.stuck_timeout / 4, 0.05)
        loop = asyncio.get_running_loop()
        while self._watched:
            await asyncio.sleep(interval)
            watched = list(self._watched.items())
            for start in range(0, len(watched), FANOUT_SLICE):  # bounded: one pass
                if start:
                    await asyncio.sleep(0)  # let the loop run between two slices
                now = loop.time()
                for outbox, entry in watched[start:start + FANOUT_SLICE]:
                    if self._watched.get(outbox) is not entry:
                        continue  # forgotten (or watched anew) since the pass began
                    transport, progress = entry
                    if progress.stuck(transport, now):
                        self._watched.pop(outbox, None)
                        outbox.close(CloseCode.TRY_AGAIN_LATER)
                        self._reset(transport)
