"""WebSocket close codes: the one table every part of chatlib (and the course) uses.

Each is a status code of RFC 6455 section 7.4.1, or of the IANA "WebSocket Close Code
Number Registry" that RFC 6455 section 11.7 set up (1012 and 1013 were registered there
later). Codes 1005, 1006 and 1015 are in the registry too but MUST NOT be sent in a CLOSE
frame, so they are not here (see :func:`chatlib.frames.sendable_close_code`).
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple


class CloseCode(enum.IntEnum):
    """Status codes sent in CLOSE frames, with what each one means."""

    NORMAL = 1000
    """RFC 6455: normal closure, the purpose of the connection is fulfilled."""
    GOING_AWAY = 1001
    """RFC 6455: an endpoint is going away (server shutting down, browser tab closed)."""
    PROTOCOL_ERROR = 1002
    """RFC 6455: the peer broke the protocol."""
    UNSUPPORTED_DATA = 1003
    """RFC 6455: a data type the endpoint cannot accept (e.g. binary where only text is)."""
    INVALID_DATA = 1007
    """RFC 6455: data inconsistent with the message type (e.g. TEXT that is not UTF-8)."""
    POLICY_VIOLATION = 1008
    """RFC 6455: a message that violates the endpoint's policy (the chat: no hello)."""
    MESSAGE_TOO_BIG = 1009
    """RFC 6455: a message too big to process."""
    INTERNAL_ERROR = 1011
    """RFC 6455 (as amended in the IANA registry): the server hit an unexpected condition
    (the chat: also its message store is unavailable; the reason says to reconnect in a few
    seconds with the last id, chatlib.ws.STORE_DOWN)."""
    SERVICE_RESTART = 1012
    """IANA registry: the service is restarting; the client may reconnect in a moment (the
    chat: also its log went back, FLUSHALL; the reconnect is told to reset)."""
    TRY_AGAIN_LATER = 1013
    """IANA registry: try again later, a temporary condition (the chat: this client could
    not keep up, or the server admits no more sessions now: the reason tells, see
    :data:`CLOSES`)."""


# -- why a connection ends, and what the client does next ---------------------------------
#
# 1013 carries two meanings ("you fell behind", "the server is busy, come back later"), so
# every close chatlib sends with a meaning names its *kind* as the first word of its
# reason, and a delay the server asks for as "retry after S s".
# A reason is at most 123 bytes (RFC 6455 section 5.5.1: a control frame's payload is at
# most 125 bytes, 2 of them the code); these are ASCII and far shorter. The same code and
# reason end an SSE stream, as its last event (``event: close``), so every push client
# reads one table.

BEHIND = "behind"
BUSY = "busy"
RESTART = "restart"
STORE = "store"


class Close(NamedTuple):
    """One row of :data:`CLOSES`."""

    code: CloseCode
    kind: str
    reason: str
    """The reason sent, a template: ``{s}`` is the delay in seconds."""
    then: str
    """What a client does next."""


CLOSES: tuple[Close, ...] = (
    Close(CloseCode.TRY_AGAIN_LATER, BEHIND, "behind: you fell behind; resume from your last id",
          "reconnect at once (with jittered backoff) and resume after its last id"),
    Close(CloseCode.TRY_AGAIN_LATER, BUSY, "busy: retry after {s} s",
          "wait the given delay (the server spreads it: do not shorten it), then reconnect"),
    Close(CloseCode.SERVICE_RESTART, RESTART, "restart: retry after {s} s",
          "wait the given delay (each client is told its own), then resume"),
    Close(CloseCode.INTERNAL_ERROR, STORE,
          "store: message store unavailable; reconnect in a few seconds with your last id",
          "reconnect with jittered backoff and resume after its last id"),
)
"""Every close (and end of an SSE stream) chatlib sends with a meaning beyond its code;
README, "WebSocket close codes". A 1012 without a reason is a restart that gave no delay
(a naive one, or uvicorn's own at shutdown) or a log that went back (the reconnect is then
told to reset): reconnect with jittered backoff. Other codes (1008, 1009, ...) carry a
free-text reason or none."""


def close_reason(kind: str, retry_after: float | None = None) -> str:
    """The reason for a close of ``kind`` (a row of :data:`CLOSES`), with ``retry_after``
    seconds when the row asks for a delay."""
    for row in CLOSES:
        if row.kind == kind and ("{s}" in row.reason) == (retry_after is not None):
            return row.reason if retry_after is None else row.reason.format(s=f"{retry_after:.2f}")
    raise ValueError(f"no close of kind {kind!r} with retry_after={retry_after!r}")


RETRY_AFTER = re.compile(r"\bretry after (\d{1,6}(?:\.\d{1,6})?) s\b")


def read_close_reason(reason: str) -> tuple[str, float | None]:
    """``(kind, retry_after)`` of a close reason: the kind is the reason's first word ("" if
    it names none of :data:`CLOSES`), ``retry_after`` the delay it asks for, in seconds, or
    None. The inverse of :func:`close_reason`; chatlib/panel.py and static/app.js read
    reasons the same way."""
    kind = re.match(r"[a-z]*", reason or "").group()
    kind = kind if any(row.kind == kind for row in CLOSES) else ""
    found = RETRY_AFTER.search(reason or "")
    return kind, float(found.group(1)) if found else None
