"""The opening handshake of a WebSocket connection, by hand (RFC 6455, section 4).

A WebSocket connection starts as an ordinary HTTP/1.1 request that asks to switch
protocols::

    GET /ws HTTP/1.1
    Host: 127.0.0.1:8000
    Upgrade: websocket
    Connection: Upgrade
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==
    Sec-WebSocket-Version: 13

A server that agrees answers ``101 Switching Protocols``::

    HTTP/1.1 101 Switching Protocols
    Upgrade: websocket
    Connection: Upgrade
    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=

and from the next byte on, the same TCP connection carries WebSocket frames in both
directions (:mod:`chatlib.frames`). Every line ends with CRLF and the head ends with an
empty line, exactly as in any HTTP/1.1 message.

Why the key and the accept value? They are not a secret and not authentication: anyone can
compute :func:`accept_key`. They prove that the server *understood* a WebSocket request,
rather than an HTTP server or a cache that happened to send back something that looks like
a 101 (section 1.3).

Security notes:

* Browsers always send ``Origin`` and give no same-origin protection to WebSockets: any page
  may open a socket to any server, with the user's cookies. A server must check ``Origin``
  itself (the chat answers 403 to a foreign one). A non-browser client such as this module
  can send whatever ``Origin`` it likes, so the check protects browser users, not the
  server against scripts.
* :func:`build_upgrade_request` refuses CR, LF and other control characters in every header,
  so that a value cannot smuggle in extra headers or a second request.
* :func:`open_raw` reads at most :data:`MAX_HEAD_SIZE` bytes of response head and gives up
  after ``timeout`` seconds: a server must not be able to make a client wait or buffer
  without limit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from .limits import MAX_HEAD_SIZE

__all__ = [
    "GUID",
    "MAX_HEAD_SIZE",
    "HandshakeError",
    "Response",
    "accept_key",
    "build_upgrade_request",
    "check_accept",
    "new_key",
    "open_raw",
    "parse_response",
]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""The fixed string the RFC appends to the key before hashing (section 1.3)."""

# RFC 9110, section 5.6.2: header names are "tokens".
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Header values we send: visible ASCII, spaces and tabs. No CR, LF or other control byte.
_VALUE = re.compile(r"[\t\x20-\x7e]*")
# Header values we receive: the same, plus bytes 0x80-0xFF ("obs-text", RFC 9110 5.5).
_RECEIVED_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# A request target: starts with "/", visible ASCII only (no space: it would end the target).
_PATH = re.compile(r"/[\x21-\x7e]*")
# "HTTP/1.1 101 Switching Protocols": version, 3-digit status, optional reason phrase.
_STATUS_LINE = re.compile(r"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")


class HandshakeError(Exception):
    """The server did not accept the WebSocket handshake, or answered something malformed.

    ``response`` is the parsed :class:`Response` when there was one, to look at in a notebook.
    """

    def __init__(self, message: str, response: Response | None = None) -> None:
        super().__init__(message)
        self.response = response


@dataclass(frozen=True)
class Response:
    """An HTTP response head, as parsed by :func:`parse_response`.

    ``headers`` maps lower-cased names to values; a header sent several times is joined with
    ``", "`` (RFC 9110, section 5.3). ``body`` holds whatever followed the empty line: after
    a 101 these would already be WebSocket frames.
    """

    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def accept_key(key: str) -> str:
    """Return the ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``.

    That is base64(SHA-1(key + GUID)). The example of RFC 6455, section 1.3:

    >>> accept_key("dGhlIHNhbXBsZSBub25jZQ==")
    's3pPLMBiTxaQ9kYGzzhZRbK+xOo='
    """
    digest = hashlib.sha1((key + GUID).encode()).digest()
    return base64.b64encode(digest).decode()


def new_key() -> str:
    """Return a fresh ``Sec-WebSocket-Key``: 16 random bytes, base64-encoded (24 characters)."""
    # The RFC asks for a random nonce. It needn't be secret, but it must differ every time,
    # so that no cache could replay an old 101 response: secrets is the simplest safe choice.
    return base64.b64encode(secrets.token_bytes(16)).decode()


def build_upgrade_request(
    host: str,
    path: str = "/ws",
    key: str | None = None,
    origin: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Return the exact bytes of the HTTP/1.1 request that opens a WebSocket.

    >>> request = build_upgrade_request("localhost:8000", key="dGhlIHNhbXBsZSBub25jZQ==")
    >>> for line in request.split(b"\\r\\n"):
    ...     print(line)
    b'GET /ws HTTP/1.1'
    b'Host: localhost:8000'
    b'Upgrade: websocket'
    b'Connection: Upgrade'
    b'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=='
    b'Sec-WebSocket-Version: 13'
    b''
    b''

    The two empty pieces at the end: the last header's CRLF, then the CRLF of the empty
    line that ends the head.

    Args:
        host: the ``Host`` header, with the port if it isn't 80, e.g. ``"127.0.0.1:8000"``.
        path: the request target, e.g. ``"/ws"`` or ``"/ws?room=1"``.
        key: the ``Sec-WebSocket-Key``; keep it to check the answer with
            :func:`check_accept`. ``None`` makes a fresh one, which you then can't check
            unless you read it back from the request: prefer ``key=new_key()``.
        origin: the ``Origin`` header, sent only if given (a browser always sends one).
        extra: more headers, in order. A name that matches a header above (in any case)
            replaces its value in place, to send a deliberately wrong handshake, e.g.
            ``{"Sec-WebSocket-Version": "8"}``.

    Raises :exc:`ValueError` for a path, header name or value that would break the request
    (spaces in the path, CR or LF anywhere, non-ASCII text: percent-encode it first).
    """
    if key is None:
        key = new_key()
    if not _PATH.fullmatch(path):
        raise ValueError(f"invalid request path {path!r}: must start with / and be visible ASCII")

    headers = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]
    if origin is not None:
        headers.append(("Origin", origin))
    for name, value in (extra or {}).items():
        for i, (existing, _) in enumerate(headers):
            if existing.lower() == name.lower():
                headers[i] = (name, value)
                break
        else:
            headers.append((name, value))

    lines = [f"GET {path} HTTP/1.1"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if not _VALUE.fullmatch(value):
            raise ValueError(f"invalid value for header {name}: {value!r}")
        lines.append(f"{name}: {value}")
    # The head ends with an empty line: the last header's CRLF, then one more CRLF.
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_response(data: bytes) -> Response:
    """Parse an HTTP/1.x response head (and keep what follows it as ``body``).

    >>> r = parse_response(b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\n\\r\\n")
    >>> r.status, r.reason, r.headers
    (101, 'Switching Protocols', {'upgrade': 'websocket'})

    Raises :exc:`HandshakeError` if ``data`` has no empty line ending the head, or if the
    status line or a header line is malformed. Lines must end with CRLF, as HTTP requires.
    """
    head, blank, body = bytes(data).partition(b"\r\n\r\n")
    if not blank:
        hint = " (lines must end with CRLF, not just LF)" if b"\n\n" in data else ""
        raise HandshakeError(f"incomplete response: no empty line ends the head{hint}")
    # Latin-1 maps every byte to one character, so decoding can't fail; the regular
    # expressions below then decide what's acceptable.
    status_line, *header_lines = head.decode("latin-1").split("\r\n")

    match = _STATUS_LINE.fullmatch(status_line)
    if match is None or match[1] != "1":
        raise HandshakeError(f"malformed status line {status_line!r}")
    status, reason = int(match[3]), match[4] or ""

    headers: dict[str, str] = {}
    for line in header_lines:
        if line[:1] in (" ", "\t"):
            raise HandshakeError(f"obsolete line folding is not supported: {line!r}")
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        if not colon or not _TOKEN.fullmatch(name) or not _RECEIVED_VALUE.fullmatch(value):
            raise HandshakeError(f"malformed header line {line!r}")
        name = name.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Response(status, reason, headers, body)


def _tokens(value: str | None) -> list[str]:
    """Split a comma-separated header value into lower-cased tokens."""
    return [token.strip(" \t").lower() for token in (value or "").split(",")]


def check_accept(response: Response, key: str) -> None:
    """Check that ``response`` accepts the WebSocket handshake sent with ``key``.

    That is what a client MUST check (section 4.1): status 101, ``Upgrade: websocket``,
    ``Connection: Upgrade``, and ``Sec-WebSocket-Accept`` equal to ``accept_key(key)``.
    Raises :exc:`HandshakeError`, carrying the response, if any of them is wrong.

    If you asked for a subprotocol or an extension (with ``extra`` headers), checking the
    server's choice is up to you.
    """
    if response.status != 101:
        raise HandshakeError(
            f"expected status 101 Switching Protocols, got {response.status} {response.reason}",
            response,
        )
    if "websocket" not in _tokens(response.headers.get("upgrade")):
        raise HandshakeError(
            f"expected Upgrade: websocket, got {response.headers.get('upgrade')!r}", response
        )
    if "upgrade" not in _tokens(response.headers.get("connection")):
        raise HandshakeError(
            f"expected Connection: Upgrade, got {response.headers.get('connection')!r}",
            response,
        )
    accept = response.headers.get("sec-websocket-accept")
    expected = accept_key(key)
    if accept is None:
        raise HandshakeError("missing Sec-WebSocket-Accept header", response)
    # A plain comparison is fine: neither value is a secret.
    if accept != expected:
        raise HandshakeError(
            f"Sec-WebSocket-Accept is {accept!r}, expected {expected!r} "
            f"= base64(SHA-1({key!r} + GUID))",
            response,
        )


def _host_header(host: str, port: int) -> str:
    # An IPv6 address needs brackets, or its colons would be mistaken for the port's.
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """Read the response head, up to and including the empty line, and not a byte more."""
    try:
        # readuntil() stops right after the separator: frames the server sends straight
        # after its 101 stay in the reader, ready for read_frame(). The reader's limit
        # (MAX_HEAD_SIZE, set in open_raw) bounds how much it buffers looking for it.
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HandshakeError(f"response head longer than {MAX_HEAD_SIZE} bytes") from None
    except asyncio.IncompleteReadError as exc:
        raise HandshakeError(
            f"connection closed during the handshake, after {len(exc.partial)} bytes: "
            f"{exc.partial[:200]!r}"
        ) from None


async def open_raw(
    host: str,
    port: int,
    path: str = "/ws",
    origin: str | None = None,
    key: str | None = None,
    timeout: float = 5.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Response]:
    """Open a TCP connection and perform the WebSocket handshake by hand.

    Returns the stream reader and writer, now carrying WebSocket frames, and the server's
    response. Nothing else is done for you: frames you write must be masked
    (:func:`chatlib.frames.encode` with ``mask_key=new_mask_key()``), pings aren't answered
    unless you answer them, and closing is up to you (send a CLOSE frame, then
    ``writer.close()``).

    Args:
        host, port: where the server listens.
        path: the request target.
        origin: the ``Origin`` header to send, if any (the chat server checks it).
        key: the ``Sec-WebSocket-Key``; a fresh one by default.
        timeout: seconds for the whole handshake: connecting, sending, reading the answer.

    Raises:
        HandshakeError: the server refused (e.g. 403) or answered something invalid.
        TimeoutError: no complete answer within ``timeout`` seconds.
        OSError: the connection failed (e.g. ConnectionRefusedError).
    """
    key = new_key() if key is None else key
    request = build_upgrade_request(_host_header(host, port), path, key=key, origin=origin)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=MAX_HEAD_SIZE), timeout
        )
    # Before Python 3.11, asyncio.TimeoutError was not the builtin TimeoutError: catch it
    # by that name and raise the builtin, so callers catch one exception on every version.
    except asyncio.TimeoutError:  # noqa: UP041
        raise TimeoutError(f"could not connect to {host}:{port} within {timeout} s") from None
    try:
        writer.write(request)
        await asyncio.wait_for(writer.drain(), deadline - loop.time())
        head = await asyncio.wait_for(_read_head(reader), deadline - loop.time())
        response = parse_response(head)
        check_accept(response, key)
    except asyncio.TimeoutError:  # noqa: UP041
        writer.close()
        raise TimeoutError(f"no complete handshake response within {timeout} s") from None
    except BaseException:
        # Whatever went wrong (including cancellation), don't leak the socket.
        writer.close()
        raise
    return reader, writer, response
