"""Encode and decode WebSocket frames, byte by byte (RFC 6455, section 5).

This is a *teaching* codec. The chat server itself speaks WebSocket through the
``websockets`` library; notebooks 5 and 6 use this module to build frames by hand, send
them over a raw socket opened by :func:`chatlib.handshake.open_raw`, and take apart what
comes back. It favours code you can read next to the RFC over speed, but it is strict about
what it accepts: a frame parser is the first code that touches bytes sent by a stranger.

A frame on the wire (RFC 6455, section 5.2)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-------+-+-------------+-------------------------------+
    |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
    |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
    |N|V|V|V|       |S|             |   (if payload len==126/127)   |
    | |1|2|3|       |K|             |                               |
    +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
    |     Extended payload length continued, if payload len == 127  |
    + - - - - - - - - - - - - - - - +-------------------------------+
    |                               |Masking-key, if MASK set to 1  |
    +-------------------------------+-------------------------------+
    | Masking-key (continued)       |          Payload Data         |
    +-------------------------------- - - - - - - - - - - - - - - - +
    :                     Payload Data continued ...                :
    +---------------------------------------------------------------+

The examples of RFC 6455, section 5.7:

>>> encode(Frame(Opcode.TEXT, b"Hello"), mask_key=None).hex(" ")
'81 05 48 65 6c 6c 6f'
>>> encode(Frame(Opcode.TEXT, b"Hello"), mask_key=bytes.fromhex("37fa213d")).hex(" ")
'81 85 37 fa 21 3d 7f 9f 4d 51 58'
>>> encode(Frame(Opcode.PING, b"Hello"), mask_key=None).hex(" ")
'89 05 48 65 6c 6c 6f'
>>> encode(Frame(Opcode.BINARY, bytes(256)), mask_key=None)[:4].hex(" ")
'82 7e 01 00'
>>> encode(Frame(Opcode.BINARY, bytes(65536)), mask_key=None)[:10].hex(" ")
'82 7f 00 00 00 00 00 01 00 00'
>>> decode(bytes.fromhex("818537fa213d7f9f4d5158"))
(Frame(opcode=<Opcode.TEXT: 1>, payload=b'Hello', fin=True, rsv1=False, rsv2=False, rsv3=False), 11)
>>> describe(bytes.fromhex("818537fa213d7f9f4d5158"))
"FIN=1 RSV=000 opcode=1 (TEXT) MASK=1 len=5 key=37fa213d payload='Hello'"

Limits, and what this module does *not* do:

* One frame at a time. Reassembling a fragmented message (a TEXT or BINARY frame with FIN=0,
  then CONT frames up to one with FIN=1) and checking that a whole TEXT message is valid
  UTF-8 belong to the layer above: one UTF-8 character may be split across two frames.
* No extensions: RSV bits must be 0. (permessage-deflate, which sets RSV1, is only used when
  the client offers it, and :func:`chatlib.handshake.build_upgrade_request` never does.)
* :func:`decode` refuses a payload larger than ``max_size`` (1 MiB by default) as soon as
  the header announces it, before a single payload byte has to be buffered.

Security notes:

* Clients MUST mask every frame they send and servers MUST NOT mask theirs (section 5.1).
  Masking is not encryption (the key travels in the clear, next to the payload): it stops
  a script in a browser from choosing the exact bytes that cross the network, bytes that a
  confused proxy could take for an HTTP request and cache (section 10.3). That only works
  if the script cannot predict the key, so use :func:`new_mask_key` (from :mod:`secrets`),
  never a fixed key, outside of examples.
* A server must close the connection on an unmasked client frame; ``decode(...,
  masked=True)`` checks that for you.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import struct
from dataclasses import dataclass

from .closecode import CloseCode
from .limits import DEFAULT_MAX_SIZE

__all__ = [
    "DEFAULT_MAX_SIZE",
    "CloseCode",
    "Frame",
    "FrameError",
    "IncompleteFrame",
    "Opcode",
    "PayloadTooBig",
    "ProtocolError",
    "close_payload",
    "decode",
    "describe",
    "encode",
    "mask_bytes",
    "new_mask_key",
    "parse_close",
    "read_frame",
    "text",
]

MAX_CONTROL_PAYLOAD = 125
"""Control frames (CLOSE, PING, PONG) carry at most 125 bytes, so the length fits in 7 bits."""


class Opcode(enum.IntEnum):
    """What a frame carries (RFC 6455, section 5.2). Opcodes 3-7 and 11-15 are reserved."""

    CONT = 0x0  # the next piece of a fragmented message
    TEXT = 0x1  # UTF-8 text (a whole message, or its first fragment)
    BINARY = 0x2  # arbitrary bytes (a whole message, or its first fragment)
    CLOSE = 0x8  # "I'm closing": optional 2-byte code + UTF-8 reason
    PING = 0x9  # "are you there?": the peer answers with a PONG, same payload
    PONG = 0xA  # the answer to a PING (or an unsolicited heartbeat)

    @property
    def is_control(self) -> bool:
        """Control opcodes are the ones with the high bit of the 4-bit opcode set (8-15)."""
        return self >= 0x8


_OPCODES = frozenset(Opcode)  # IntEnum members hash like ints: `3 in _OPCODES` is False


_CLOSE_CODES = frozenset(CloseCode)


# Codes that may appear in a CLOSE frame, as in the IANA registry. 1004 is reserved; 1005
# ("no code"), 1006 ("closed without a CLOSE frame") and 1015 (TLS failure) MUST NOT be sent:
# APIs use them to *report* such closures. 1016-2999 are reserved for future RFCs, 3000-3999
# are registered by libraries and frameworks, 4000-4999 are for private use by applications.
_SENDABLE_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


def _is_sendable_close_code(code: int) -> bool:
    return code in _SENDABLE_CLOSE_CODES or 3000 <= code <= 4999


class IncompleteFrame(Exception):
    """``data`` stops before the frame ends: read more bytes and call :func:`decode` again.

    This is not an error, just "not yet". ``needed`` is how many bytes to add before trying
    again: the rest of the header while the header is incomplete, then the rest of the payload.
    It never counts past the end of this frame, so reading exactly ``needed`` bytes from a
    stream never eats into the next frame (:func:`read_frame` relies on that).
    """

    def __init__(self, needed: int) -> None:
        super().__init__(f"incomplete frame: {needed} more byte(s) needed")
        self.needed = needed


class FrameError(Exception):
    """The peer sent something unacceptable; close the connection with ``close_code``."""

    close_code: int = CloseCode.PROTOCOL_ERROR


class ProtocolError(FrameError):
    """The bytes break RFC 6455 (reserved opcode, unmasked client frame, bad length, ...)."""

    def __init__(self, message: str, close_code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


class PayloadTooBig(FrameError):
    """The header announces a payload larger than we accept (not an RFC violation: our limit)."""

    close_code = CloseCode.MESSAGE_TOO_BIG

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the limit of {max_size} bytes")
        self.size = size
        self.max_size = max_size


@dataclass(frozen=True)
class Frame:
    """One WebSocket frame, as the application sees it.

    MASK, the payload length and the masking key are not fields: they describe how the frame
    travels, not what it says. :func:`encode` computes them, :func:`decode` consumes them.

    ``payload`` is always the *unmasked* data. ``opcode`` accepts a plain int and normalises
    it to :class:`Opcode` (a reserved value raises :exc:`ValueError`: to put a reserved opcode
    on the wire, write the bytes yourself). Creating a frame checks nothing else, so that you
    can build invalid ones on purpose and see a server reject them; see ``encode(check=...)``.
    """

    opcode: Opcode
    payload: bytes = b""
    fin: bool = True
    rsv1: bool = False
    rsv2: bool = False
    rsv3: bool = False

    def __post_init__(self) -> None:
        # A frozen dataclass can only be normalised through object.__setattr__.
        object.__setattr__(self, "opcode", Opcode(self.opcode))
        if not isinstance(self.payload, bytes):
            # bytearray / memoryview -> immutable bytes, so frames are values. (memoryview()
            # first, because bytes(5) would silently make five zero bytes.)
            object.__setattr__(self, "payload", bytes(memoryview(self.payload)))


def new_mask_key() -> bytes:
    """Return a fresh, unpredictable 4-byte masking key for a client frame."""
    return secrets.token_bytes(4)


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated: byte ``i`` with ``key[i % 4]``.

    Masking and unmasking are the same operation, because ``(b ^ k) ^ k == b``.

    >>> mask_bytes(b"Hello", bytes.fromhex("37fa213d")).hex(" ")
    '7f 9f 4d 51 58'
    >>> mask_bytes(bytes.fromhex("7f9f4d5158"), bytes.fromhex("37fa213d"))
    b'Hello'
    """
    if len(key) != 4:
        raise ValueError(f"a masking key is exactly 4 bytes, not {len(key)}")
    n = len(payload)
    # The obvious version is
    #
    #     bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    #
    # and it gives exactly the same result, but it runs a Python loop per byte: about a
    # second per 10 MB. Instead, line the key up under the payload...
    repeated_key = key * (n // 4) + key[: n % 4]
    # ... and read both as one huge integer each. Python's big integers XOR all the bytes at
    # once in C, and the byte order ("big") doesn't matter as long as it's the same on both
    # sides and on the way back.
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(repeated_key, "big")
    return masked.to_bytes(n, "big")


def _check_rules(opcode: Opcode, *, fin: bool, rsv: tuple[bool, bool, bool], length: int) -> None:
    """Raise :exc:`ProtocolError` if a frame with these fields is forbidden (section 5)."""
    if any(rsv):
        raise ProtocolError("RSV bits must be 0: no extension was negotiated")
    if opcode.is_control:
        # Control frames may arrive in the middle of a fragmented message, so each must fit
        # in one small frame of its own (section 5.5).
        if not fin:
            raise ProtocolError(f"{opcode.name} frame must not be fragmented (FIN=0)")
        if length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError(
                f"{opcode.name} payload is {length} bytes, "
                f"control frames carry at most {MAX_CONTROL_PAYLOAD}"
            )


def encode(frame: Frame, *, mask_key: bytes | None, check: bool = True) -> bytes:
    """Return the bytes of ``frame`` on the wire.

    Args:
        frame: what to send.
        mask_key: a 4-byte key if you are a client (use :func:`new_mask_key`), ``None`` if you
            are a server. There is deliberately no default: each side must choose.
        check: refuse (with :exc:`ProtocolError`) a frame the RFC forbids: RSV bits set,
            fragmented control frame, control payload over 125 bytes. Pass ``False`` to
            produce such a frame anyway, e.g. to watch how a server reacts to it.

    The payload length takes the fewest bytes possible, as section 5.2 requires: 7 bits up
    to 125, else 126 and a 16-bit length up to 65535, else 127 and a 64-bit length.
    """
    if check:
        rsv = (frame.rsv1, frame.rsv2, frame.rsv3)
        _check_rules(frame.opcode, fin=frame.fin, rsv=rsv, length=len(frame.payload))
    if mask_key is not None and len(mask_key) != 4:
        raise ValueError(f"a masking key is exactly 4 bytes, not {len(mask_key)}")

    first = (
        (0b1000_0000 if frame.fin else 0)
        | (0b0100_0000 if frame.rsv1 else 0)
        | (0b0010_0000 if frame.rsv2 else 0)
        | (0b0001_0000 if frame.rsv3 else 0)
        | frame.opcode
    )
    mask_bit = 0b1000_0000 if mask_key is not None else 0
    length = len(frame.payload)
    if length <= 125:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", first, mask_bit | 126, length)  # H: 16-bit, big-endian
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)  # Q: 64-bit, big-endian

    if mask_key is None:
        return header + frame.payload
    return header + mask_key + mask_bytes(frame.payload, mask_key)


def text(data: str, *, mask_key: bytes | None) -> bytes:
    """Return the bytes of a single, unfragmented TEXT frame carrying ``data``.

    >>> text("Hello", mask_key=None).hex(" ")
    '81 05 48 65 6c 6c 6f'
    """
    return encode(Frame(Opcode.TEXT, data.encode("utf-8")), mask_key=mask_key)


@dataclass(frozen=True)
class _Header:
    """The header fields as found on the wire, before any validation."""

    fin: bool
    rsv1: bool
    rsv2: bool
    rsv3: bool
    opcode: int  # the raw 4 bits: may be a reserved value
    masked: bool
    length: int  # payload length
    length_size: int  # bytes of extended length after the first two: 0, 2 or 8
    mask_key: bytes | None
    size: int  # total header size: 2 + length_size + (4 if masked)


def _parse_header(data: bytes | bytearray | memoryview) -> _Header:
    """Read the header at the front of ``data``; raise :exc:`IncompleteFrame` if it's cut."""
    if len(data) < 2:
        raise IncompleteFrame(2 - len(data))
    first, second = data[0], data[1]
    masked = bool(second & 0b1000_0000)
    length = second & 0b0111_1111
    # 126 and 127 aren't lengths: they announce a 16-bit or 64-bit length after these 2 bytes.
    length_size = {126: 2, 127: 8}.get(length, 0)
    size = 2 + length_size + (4 if masked else 0)
    # The first two bytes tell how long the whole header is, so ask for exactly the rest.
    if len(data) < size:
        raise IncompleteFrame(size - len(data))
    if length_size:
        length = int.from_bytes(data[2 : 2 + length_size], "big")
    return _Header(
        fin=bool(first & 0b1000_0000),
        rsv1=bool(first & 0b0100_0000),
        rsv2=bool(first & 0b0010_0000),
        rsv3=bool(first & 0b0001_0000),
        opcode=first & 0b0000_1111,
        masked=masked,
        length=length,
        length_size=length_size,
        mask_key=bytes(data[size - 4 : size]) if masked else None,
        size=size,
    )


def _check_header(header: _Header, *, max_size: int | None, masked: bool | None) -> None:
    """Raise :exc:`ProtocolError` or :exc:`PayloadTooBig` if the header is unacceptable.

    Everything is checked on the header alone, so a bad frame is refused before its
    payload is read.
    """
    if header.opcode not in _OPCODES:
        raise ProtocolError(f"reserved opcode {header.opcode:#x}")
    if masked is True and not header.masked:
        raise ProtocolError("client frames must be masked (RFC 6455, section 5.1)")
    if masked is False and header.masked:
        raise ProtocolError("server frames must not be masked (RFC 6455, section 5.1)")
    if header.length_size == 8 and header.length >> 63:
        raise ProtocolError("the most significant bit of a 64-bit length must be 0")
    # "The minimal number of bytes MUST be used to encode the length" (section 5.2): one
    # value, one encoding, so that no two parsers can disagree about where a frame ends.
    if (header.length_size == 2 and header.length <= 125) or (
        header.length_size == 8 and header.length <= 0xFFFF
    ):
        raise ProtocolError(
            f"length {header.length} sent in {header.length_size} bytes: "
            "the shortest encoding must be used"
        )
    rsv = (header.rsv1, header.rsv2, header.rsv3)
    _check_rules(Opcode(header.opcode), fin=header.fin, rsv=rsv, length=header.length)
    if max_size is not None and header.length > max_size:
        raise PayloadTooBig(header.length, max_size)


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int | None = DEFAULT_MAX_SIZE,
    masked: bool | None = None,
) -> tuple[Frame, int]:
    """Decode the frame at the front of ``data``; return it and how many bytes it took.

    Bytes after the frame are left alone: they belong to the next frame.

    Args:
        data: received bytes, starting at a frame boundary.
        max_size: largest payload accepted, in bytes; ``None`` means no limit (only for
            trusted input: a 10-byte header can announce 2**63 bytes).
        masked: ``True`` on a server (client frames must be masked), ``False`` on a client
            (server frames must not be), ``None`` to accept both, e.g. to inspect a capture.

    Raises:
        IncompleteFrame: ``data`` ends before the frame does; ``.needed`` says how much more.
        ProtocolError: the frame breaks RFC 6455: reserved opcode, RSV bit set, wrong
            masking, length not in its shortest encoding or with the top bit set, control
            frame fragmented or longer than 125 bytes.
        PayloadTooBig: the payload is larger than ``max_size``.

    A TEXT payload is *not* checked for UTF-8 here; see the module docstring.
    """
    header = _parse_header(data)
    _check_header(header, max_size=max_size, masked=masked)
    end = header.size + header.length
    if len(data) < end:
        raise IncompleteFrame(end - len(data))
    payload = bytes(data[header.size : end])
    if header.mask_key is not None:
        payload = mask_bytes(payload, header.mask_key)
    frame = Frame(Opcode(header.opcode), payload, header.fin, header.rsv1, header.rsv2, header.rsv3)
    return frame, end


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    max_size: int | None = DEFAULT_MAX_SIZE,
    masked: bool | None = None,
) -> Frame:
    """Read exactly one frame from ``reader`` (see :func:`decode` for the arguments).

    Never reads past the end of the frame. Raises :exc:`asyncio.IncompleteReadError` (an
    :exc:`EOFError`) if the connection ends in the middle of a frame. A client reading what
    a server sends should pass ``masked=False``.
    """
    data = b""
    needed = 2
    # At most three reads: the first two bytes (they give the header's size), the rest of
    # the header (it gives the payload's size, checked against max_size before reading it),
    # then the payload.
    for _ in range(3):
        data += await reader.readexactly(needed)
        try:
            frame, _ = decode(data, max_size=max_size, masked=masked)
        except IncompleteFrame as exc:
            needed = exc.needed
        else:
            return frame
    raise AssertionError("unreachable: a frame is complete after three reads")


def close_payload(code: int, reason: str = "") -> bytes:
    """Return the payload of a CLOSE frame: the code on 2 bytes, then the reason in UTF-8.

    >>> close_payload(CloseCode.NORMAL, "bye").hex(" ")
    '03 e8 62 79 65'

    Raises :exc:`ValueError` for a code that must not be sent (e.g. 1005 or 1006) or a
    reason longer than 123 bytes once encoded (a control payload holds at most 125).
    """
    if not _is_sendable_close_code(code):
        raise ValueError(f"close code {code} must not be sent in a CLOSE frame")
    encoded = reason.encode("utf-8")
    if 2 + len(encoded) > MAX_CONTROL_PAYLOAD:
        raise ValueError(
            f"close reason is {len(encoded)} bytes of UTF-8, at most "
            f"{MAX_CONTROL_PAYLOAD - 2} fit in a CLOSE frame"
        )
    return struct.pack("!H", code) + encoded


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """Return ``(code, reason)`` from the payload of a CLOSE frame.

    An empty payload is allowed and means "no code": ``(None, "")``. A known code comes back
    as a :class:`CloseCode` (which is an ``int``).

    >>> parse_close(bytes.fromhex("03e8627965"))
    (<CloseCode.NORMAL: 1000>, 'bye')

    Raises :exc:`ProtocolError` for a 1-byte or too long payload, a code that may not be
    sent, or a reason that isn't UTF-8 (with ``close_code`` 1007, as the RFC asks).
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError("CLOSE payload of 1 byte: a close code takes 2")
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(f"CLOSE payload of {len(payload)} bytes, at most 125 allowed")
    (code,) = struct.unpack("!H", payload[:2])
    if not _is_sendable_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"close reason is not valid UTF-8: {exc}", CloseCode.INVALID_DATA
        ) from None
    if code in _CLOSE_CODES:
        code = CloseCode(code)
    return code, reason


_PREVIEW = 32  # payload bytes (or characters) that describe() shows before eliding the rest


def _describe_payload(opcode: int, payload: bytes, *, complete: bool) -> str:
    """The ``payload=...`` (or ``close=...``) part of :func:`describe`."""
    if opcode == Opcode.CLOSE and complete:
        try:
            code, reason = parse_close(payload)
        except ProtocolError:
            pass  # shown as raw bytes below
        else:
            if code is None:
                return "close=(no code)"
            name = f" ({code.name})" if isinstance(code, CloseCode) else ""
            return f"close={int(code)}{name} reason={reason!r}"
    if opcode == Opcode.TEXT:
        try:
            chars = payload.decode("utf-8")
        except UnicodeDecodeError:
            pass  # not UTF-8 (or cut inside a character, e.g. a fragment): show the bytes
        else:
            if len(chars) <= _PREVIEW:
                return f"payload={chars!r}"
            return f"payload={chars[:_PREVIEW]!r}...(+{len(chars) - _PREVIEW} chars)"
    if len(payload) <= _PREVIEW:
        return f"payload={payload!r}"
    return f"payload={payload[:_PREVIEW]!r}...(+{len(payload) - _PREVIEW} bytes)"


def describe(data: bytes | bytearray | memoryview) -> str:
    """Explain, on one line, the frame at the front of ``data``. Never raises.

    Made for notebooks: it shows the header fields as they are on the wire (even reserved or
    forbidden values), the key, and the *unmasked* payload, then says what, if anything, is
    wrong, missing or left over. The output depends only on ``data``.

    >>> describe(bytes.fromhex("8905 48656c6c6f"))
    "FIN=1 RSV=000 opcode=9 (PING) MASK=0 len=5 payload=b'Hello'"
    >>> describe(bytes.fromhex("88 02 03e8"))
    "FIN=1 RSV=000 opcode=8 (CLOSE) MASK=0 len=2 close=1000 (NORMAL) reason=''"
    >>> describe(bytes.fromhex("81 05 48 65 6c"))
    "FIN=1 RSV=000 opcode=1 (TEXT) MASK=0 len=5 payload='Hel' (incomplete: 2 more byte(s))"
    >>> describe(bytes.fromhex("8b 00"))
    "FIN=1 RSV=000 opcode=11 (reserved) MASK=0 len=0 payload=b'' (invalid: reserved opcode 0xb)"
    """
    data = bytes(data)
    if not data:
        return "(empty: no frame)"
    first = data[0]
    opcode = first & 0x0F
    name = Opcode(opcode).name if opcode in _OPCODES else "reserved"
    parts = [f"FIN={first >> 7}", f"RSV={(first >> 4) & 0b111:03b}", f"opcode={opcode} ({name})"]
    try:
        header = _parse_header(data)
    except IncompleteFrame as exc:
        parts.append(f"(incomplete header: {exc.needed} more byte(s))")
        return " ".join(parts)

    parts.append(f"MASK={int(header.masked)}")
    width = {0: "", 2: " (16-bit)", 8: " (64-bit)"}[header.length_size]
    parts.append(f"len={header.length}{width}")
    if header.mask_key is not None:
        parts.append(f"key={header.mask_key.hex()}")
    end = header.size + header.length
    payload = data[header.size : end]
    if header.mask_key is not None:
        payload = mask_bytes(payload, header.mask_key)  # a prefix unmasks fine: same offsets
    parts.append(_describe_payload(opcode, payload, complete=len(data) >= end))
    if len(data) < end:
        parts.append(f"(incomplete: {end - len(data)} more byte(s))")
    elif len(data) > end:
        parts.append(f"(+{len(data) - end} byte(s) after this frame)")
    try:
        _check_header(header, max_size=None, masked=None)
    except ProtocolError as exc:
        parts.append(f"(invalid: {exc})")
    return " ".join(parts)
