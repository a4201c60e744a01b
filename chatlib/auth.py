"""Token mode: an optional shared secret, checked on every request and WebSocket handshake.

``ChatServer(token="s3cret")`` (or ``token=True`` for a random one, or ``chatlib serve
--token T``) refuses everything that does not carry the token: ``401`` with ``{"error": ...}``
for HTTP, and the same answer instead of ``101`` for a WebSocket handshake. Everything
means the page and ``/static`` too, not just the API: one rule with no exceptions is the
one that is easy to check, and the page's own link is how a browser gets the token anyway.

A request may carry the token three ways, checked in this order:

1. ``Authorization: Bearer T`` (RFC 6750): what the Python clients send, on HTTP requests
   and on the WebSocket handshake. A browser cannot: neither ``new WebSocket(url)`` nor
   ``new EventSource(url)`` lets a page set a header.
2. ``?token=T`` in the URL: the link the server prints and shows in the notebook. A
   request to the page authorised this way also gets a cookie:
3. the cookie ``chatlib-token-PORT`` (``HttpOnly``: the page's scripts cannot read it;
   ``SameSite=Strict``: the browser sends it only with requests from our own site, so
   another site's page cannot ride on it). The browser then sends it with every
   ``fetch``, ``EventSource`` and WebSocket handshake the page makes: that is how the
   page's four transports carry the token without headers.

Cookies ignore ports: a cookie for 127.0.0.1 goes to *every* server on 127.0.0.1, so a
cookie at path ``/`` handed our token to whatever else a learner opened on another port
(issue 18). So the page lives under a path of its own, :func:`page_path` (``/t/`` and 16
hex digits derived from the token, unguessable without it), and the cookie has no
``Path`` attribute: its default path is the page's directory, so the browser sends it
only to requests under that path, which no other server's page asks for. The page's
requests are relative (``api/messages``, ``ws``), so they stay under it; behind
jupyter-server-proxy the default path is the proxied one. :class:`TokenGate` serves every
route under that path as well as at ``/`` (``root_path``), and sends a ``GET /?token=T``
(an old link) there (303). The port stays in the cookie's name, so that two servers' pages
don't overwrite each other's.

What else people do (README, "Token mode"): a short-lived *ticket* in the WebSocket URL
(fetched with the token over HTTP just before connecting, valid once for a few seconds, so
a URL that leaks into a log is worthless), or the token in the *first message* on the
socket (the handshake is accepted, then closed if the first frame does not authenticate).

Tokens are compared in constant time (:func:`hmac.compare_digest`), so the time a refusal
takes does not tell how much of a guess was right.

User tokens (rooms and direct messages, chatlib.rooms): the shared token lets its holder
in as anyone, into every open room. ``ChatServer.user_token(user, rooms)`` mints a token
for one user, :func:`user_token`: its user, the private rooms it may join and its expiry,
signed with an HMAC keyed by the server's *user secret*. That secret is not the shared
token, nor derived from it: everyone in the class holds the shared token (it is in the
link), so a key made from it would let any of them mint a token for anyone else and read
their direct messages. The user secret never leaves the server: ``ChatServer`` makes a
random one (``user_secret=``, or ``serve --user-secret`` / ``CHATLIB_USER_SECRET``, to
give several processes, or ``chatlib user-token``, the same one). A user token is carried
exactly as the shared token (header, query, cookie) and lets in as that user only:
:class:`TokenGate` puts its :class:`Grant` in the request's scope (:data:`GRANT`) and the
transports refuse (403) a nickname other than its user, and let it into its direct
messages and the private rooms it lists.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import parse_qsl

from .web import Refusal, latin1, refuse

TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,256}")
"""A token goes unescaped into a URL, a header and a cookie: URL "unreserved" characters."""


def new_token() -> str:
    """A random token: 128 bits, URL-safe (it goes in links)."""
    return secrets.token_urlsafe(16)


def checked_token(token: str | bool | None) -> str | None:
    """``token=`` as given to the server: None (no token mode), True (make one), or a str."""
    if token is None or token is False:
        return None
    if token is True:
        return new_token()
    if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
        raise ValueError("token must be 1 to 256 characters from A-Z a-z 0-9 . _ ~ -")
    return token


GRANT = "chatlib.grant"
"""The key of a request's :class:`Grant` in its ASGI scope (absent: no user token)."""

USER_TOKEN_TTL = 24 * 3600
"""Seconds a user token is valid by default."""


@dataclass(frozen=True)
class Grant:
    """What a valid user token says: who its holder is, the private rooms it may join."""

    user: str
    rooms: frozenset[str]
    expires: float
    """Unix time after which the token is refused."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _nfkc(name: str) -> str:
    return unicodedata.normalize("NFKC", name).strip()


USER_SECRET_ENV = "CHATLIB_USER_SECRET"
"""The environment variable ``chatlib serve`` and ``chatlib user-token`` read it from."""


def new_user_secret() -> str:
    """A random secret that signs user tokens (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _user_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"chatlib user tokens", "sha256").digest()


def user_token(secret: str, user: str, rooms=(), ttl: float = USER_TOKEN_TTL) -> str:
    """A token for ``user`` only, letting it into the private ``rooms`` too, valid ``ttl``
    seconds, signed with a key derived from the server's user ``secret`` (never the shared
    token: see the module docstring):
    ``u.PAYLOAD.SIGNATURE`` (URL-safe base64 of its JSON and of its HMAC-SHA256)."""
    user, rooms = _nfkc(user), [_nfkc(room) for room in rooms]  # as the server reads names
    payload = _b64(json.dumps({"u": user, "r": sorted(rooms), "exp": int(time.time() + ttl)},
                              separators=(",", ":")).encode())
    signature = _b64(hmac.new(_user_key(secret), payload.encode(), "sha256").digest())
    return f"u.{payload}.{signature}"


def read_user_token(secret: str, value: str) -> Grant | None:
    """The grant of a user token made with :func:`user_token` with this ``secret``; None if
    ``value`` is no such token, is forged or has expired."""
    prefix, _, rest = value.partition(".")
    payload, _, signature = rest.partition(".")
    if prefix != "u" or not payload or not signature or len(value) > 4096:
        return None
    expected = _b64(hmac.new(_user_key(secret), payload.encode(), "sha256").digest())
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    try:
        data = json.loads(_unb64(payload))
        grant = Grant(data["u"], frozenset(data["r"]), float(data["exp"]))
    except (ValueError, KeyError, TypeError):
        return None
    return grant if grant.expires > time.time() else None


def cookie_name(port: int) -> str:
    return f"chatlib-token-{port}"


def page_path(token: str) -> str:
    """Where the page is served in token mode: ``/t/`` + 16 hex digits of an HMAC of the
    token (stable across restarts with the same token, so open tabs keep working)."""
    return "/t/" + hmac.new(token.encode(), b"chatlib page path", "sha256").hexdigest()[:16]


def page_link(base: str, token: str | None) -> str:
    """The page's link on a server whose URL is ``base`` (ending in "/"): ``base`` itself,
    or in token mode its page path with ``?token=T``."""
    return f"{base}{page_path(token)[1:]}/?token={token}" if token else base


class Pass(NamedTuple):
    """A request that carries a valid token (:meth:`TokenGate.verdict`)."""

    source: str
    """Where it carries it: "header" (``Authorization: Bearer``), "query" or "cookie"."""
    token: str
    """The token itself: the shared one or a user token."""
    grant: Grant | None = None
    """What a user token lets in; None: the shared token."""


class TokenGate:
    """ASGI middleware: refuse (401) every HTTP request and handshake without ``token``.

    Only the connection's ``scope`` is looked at; WebSocket frames and bodies pass through
    untouched (nothing per message). See the module docstring for where the token may be.
    The check is :meth:`verdict`'s, which the paths that bypass the middleware run too
    (chatlib.pollpath, chatlib.webtransport).
    """

    def __init__(self, app, token: str, user_secret: str | None = None) -> None:
        self.app = app
        self.user_secret = user_secret
        """What signs user tokens (None: none is accepted)."""
        self.token = token.encode()
        self.page = page_path(token)

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        port = scope["server"][1] if scope.get("server") else 0
        headers = dict(scope["headers"])  # the last of a repeated header; fine for these
        verdict = self.verdict(latin1(headers.get(b"authorization")),
                               scope.get("query_string", b"").decode("latin-1"),
                               latin1(headers.get(b"cookie")), port)
        if isinstance(verdict, Refusal):
            await refuse(kind, send, *verdict)
            return
        path, root = scope["path"], scope.get("root_path", "")
        under = root + self.page
        if verdict.grant is not None:  # a user token: the routes see who it lets in
            scope = {**scope, GRANT: verdict.grant}
        if path == under or path.startswith(under + "/"):
            # The routes see the path below the page's (ASGI: path includes root_path).
            scope = {**scope, "root_path": under}
            if verdict.source == "query" and kind == "http" and path == under + "/":
                send = self._setting_cookie(send, cookie_name(port), verdict.token)
        elif verdict.source == "query" and kind == "http" and path == root + "/":
            await see_other(send, self.page[1:] + "/?" + scope["query_string"].decode("latin-1"))
            return
        await self.app(scope, receive, send)

    def verdict(self, authorization: str | None, query: str, cookies: str | None,
                port: int) -> Pass | Refusal:
        """The check, on a request's plain values: the :class:`Pass` of the first valid
        token it carries, or :data:`REFUSED` (401).

        ``authorization`` and ``cookies``: the ``Authorization`` and ``Cookie`` headers
        (None: absent), the *last* of a repeated one (the middleware passes that, as
        ``dict(scope["headers"])`` keeps it); ``query``: the query string; ``port``: the
        server's, which names its cookie (:func:`cookie_name`). Where a token may be, and
        in which order: the module docstring."""
        found = []
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() == "bearer":
            found.append(("header", credentials.strip(_ASCII_SPACE)))
        found += [("query", value) for name, value in parse_qsl(query) if name == "token"]
        cookie = cookie_name(port)
        for part in (cookies or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == cookie:
                found.append(("cookie", value))
        for source, value in found:
            if value[:2] == "u.":
                grant = self.grant(value)
                if grant is not None:
                    return Pass(source, value, grant)
            elif hmac.compare_digest(value.encode("utf-8", "replace"), self.token):
                return Pass(source, value)
        return REFUSED

    def grant(self, value: str) -> Grant | None:
        """What the user token ``value`` lets in, None if it is not a valid one."""
        if self.user_secret is None:
            return None
        return read_user_token(self.user_secret, value)

    def _setting_cookie(self, send, name: str, value: str):
        header = (f"{name}={value}; HttpOnly; SameSite=Strict").encode()

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"set-cookie", header)]}
            await send(message)

        return send_with_cookie


_ASCII_SPACE = " \t\n\r\x0b\x0c"
"""What ``bytes.strip`` strips (``str.strip`` would strip more of latin-1)."""


async def see_other(send, location: str) -> None:
    """303 to ``location`` (relative, so that it holds behind a proxy's path too)."""
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode("latin-1")),
                            (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


ERROR = "a token is required: open the link the server printed (it ends in ?token=...)"

REFUSED = Refusal(401, ERROR, ((b"www-authenticate", b'Bearer realm="chatlib"'),))
"""The answer to a request without a valid token (RFC 9110 15.5.2: a 401 names the
scheme that would work)."""
