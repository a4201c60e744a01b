"""Finding push clients that stopped reading, and resetting their connections."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from .closecode import CloseCode
from .fastpath import bytes_acked, reset_connection, transport_of, unsent_bytes
from .limits import Limits
from .outbox import Outbox

log = logging.getLogger("chatlib")


class StuckWatch:
    """Finds push clients that stopped reading, and resets their connections.

    A client is stuck when bytes wait for it, in asyncio's buffer or the kernel's, and it
    acknowledged nothing for ``limits.stuck_timeout`` seconds. (Counting asyncio's buffer
    alone missed a burst that fits in the kernel's buffers: the connection then ended in a
    FIN behind 14.4 MB that sat in FIN-WAIT-1 for 340 s, issue 18.)
    A slow client that reads, however slowly, makes progress and is left alone. The kernel
    may hold megabytes for a peer with a shut window, so this can happen long before the
    client's outbox overflows (1013). One sweep for all clients, a few times per timeout:
    one ioctl per client, and a TCP_INFO read for those with unsent bytes. Without the fast path (no
    transport to watch) only the outbox's bound applies.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._watched: dict[Outbox, list] = {}  # outbox -> [transport, acked, since]
        self._sweeper: asyncio.Task | None = None

    def watch(self, scope, outbox: Outbox) -> None:
        transport = transport_of(scope)
        if transport is None:
            return
        self._watched[outbox] = [transport, None, 0.0]
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
        if code == CloseCode.TRY_AGAIN_LATER:
            asyncio.get_running_loop().call_later(self.limits.stuck_timeout, self._check,
                                                  transport)

    def _check(self, transport: asyncio.WriteTransport) -> None:
        if unsent_bytes(transport):
            self._reset(transport)

    def _reset(self, transport: asyncio.WriteTransport) -> None:
        log.info("resetting a connection that stopped reading (%s)",
                 transport.get_extra_info("peername"))
        reset_connection(transport)

    async def _sweep(self) -> None:
        interval = max(self.limits.stuck_timeout / 4, 0.05)
        loop = asyncio.get_running_loop()
        while self._watched:
            await asyncio.sleep(interval)
            now = loop.time()
            for outbox, entry in list(self._watched.items()):
                transport, acked, since = entry
                if not unsent_bytes(transport):  # asyncio's buffer and the kernel's
                    entry[1] = None  # nothing waits for it: not stuck
                    continue
                now_acked = bytes_acked(transport)
                if acked is None or now_acked != acked:
                    entry[1:] = [now_acked if now_acked is not None else -1, now]
                elif now - since >= self.limits.stuck_timeout:
                    self._watched.pop(outbox, None)
                    outbox.close(CloseCode.TRY_AGAIN_LATER)
                    self._reset(transport)
