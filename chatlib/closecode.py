"""WebSocket close codes: the one table every part of chatlib (and the course) uses.

Each is a status code of RFC 6455 section 7.4.1, or of the IANA "WebSocket Close Code
Number Registry" that RFC 6455 section 11.7 set up (1012 and 1013 were registered there
later). Codes 1005, 1006 and 1015 are in the registry too but MUST NOT be sent in a CLOSE
frame, so they are not here (see :func:`chatlib.frames.sendable_close_code`).
"""

from __future__ import annotations

import enum


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
    """IANA registry: temporary condition (the chat: this client could not keep up)."""
