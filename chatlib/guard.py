"""The front door: which browser requests may reach the chat app at all.

:class:`Guard` is an ASGI middleware that runs three checks on every HTTP request and every
WebSocket handshake, before any route, and refuses with a short ``{"error": ...}``:

1. **Host** (403), against DNS rebinding. A page on ``evil.example`` can make its own name
   resolve to 127.0.0.1; the browser then treats the chat server as *same origin* with the
   attacker's page (``Host: evil.example:PORT``, ``Origin: http://evil.example:PORT``), so an
   Origin check alone passes. The ``Host`` header is the one thing such a page cannot
   choose: it names the site the browser thinks it is talking to. See :class:`HostPolicy`.
2. **Origin** (403), against cross-site WebSocket hijacking and cross-site POSTs: see
   :func:`origin_allowed`.
3. **Content-Type** (415) of a POST must be ``application/json``. A cross-site HTML form can
   only send ``text/plain``, urlencoded or multipart bodies; a cross-site ``fetch`` with JSON
   needs a CORS preflight, which this server never grants. So even a browser that omits
   ``Origin`` cannot post from another site.

The middleware only looks at the connection's ``scope``: it adds nothing per WebSocket frame
or per body chunk (``receive`` and ``send`` pass through untouched).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from .limits import Limits
from .web import Refusal, refuse

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_NAMES = frozenset({"localhost"})


def split_host(host: str) -> tuple[str, int | None]:
    """``"Example.org.:8080"`` -> ``("example.org", 8080)``; ``"[::1]"`` -> ``("::1", None)``.

    A malformed port gives ``-1`` (it can match no listening port).
    """
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    if not port:
        return name.rstrip("."), None
    return name.rstrip("."), int(port) if port.isascii() and port.isdigit() else -1


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """Which ``Host`` header values the server answers.

    Allowed are: every IP literal (``127.0.0.1``, ``[::1]``, a LAN address: rebinding needs
    a *name* the attacker controls, and a page whose origin is an IP address of ours was
    served by us), ``localhost`` and ``*.localhost`` (browsers resolve them to loopback
    themselves), and ``names``: the bound host name, the public URL's host,
    ``Limits(allowed_hosts=...)`` and ``chatlib serve --allow-host``. ``"*"`` in ``names``
    turns the check off.

    ``relayed_ok`` is for JupyterHub and Binder, where the browser reaches the server only
    through jupyter-server-proxy with the hub's own name in ``Host`` (which the kernel
    cannot know). A browser always names in ``Host`` the port it connected to, so a request
    whose ``Host`` port is not the one we listen on has come through a relay that connected
    for it (the hub's proxy, which checks the learner's login); and a rebinding page in a
    browser on another machine cannot reach a kernel on the hub. The check stays strict
    for a request whose ``Host`` port is ours.
    """

    names: frozenset[str] = frozenset()
    port: int | None = None
    relayed_ok: bool = False

    def allows(self, host: str | None, scheme: str = "http") -> bool:
        if host is None:  # HTTP/1.0 without Host: not a browser
            return True
        name, port = split_host(host)
        if ("*" in self.names or name in self.names or name in LOCAL_NAMES
                or name.endswith(".localhost") or is_ip_literal(name)):
            return True
        if self.relayed_ok and self.port is not None:
            effective = port if port is not None else (443 if scheme in ("https", "wss") else 80)
            return effective != self.port
        return False

    def hint(self, host: str) -> str:
        name, _ = split_host(host)
        local = f"http://127.0.0.1:{self.port}/" if self.port else "http://127.0.0.1:PORT/"
        return (f"host not allowed: {host[:100]!r}. Open {local} instead, or allow the name: "
                f"Limits(allowed_hosts={{{name[:60]!r}}}) or chatlib serve "
                f"--allow-host {name[:60]}")


def host_policy(bound_host: str, port: int | None, limits: Limits,
                public_url: str | None = None) -> HostPolicy:
    """The policy for a server bound to ``bound_host:port`` (see :class:`HostPolicy`)."""
    names = {name.lower().rstrip(".") for name in limits.allowed_hosts}
    names.add(split_host(bound_host)[0] if bound_host.startswith("[") else bound_host.lower())
    if public_url:
        public_host = urlsplit(public_url).hostname
        if public_host:
            names.add(public_host)
    relayed_ok = bool(os.environ.get("JUPYTERHUB_SERVICE_PREFIX"))
    return HostPolicy(frozenset(names), port, relayed_ok)


def origin_allowed(origin: str | None, host: str | None, forwarded_host: str | None,
                   limits: Limits) -> bool:
    """Is a browser on ``origin`` allowed to use this server?

    Browsers send ``Origin`` with every WebSocket handshake and POST. Checking it stops
    cross-site WebSocket hijacking: a page on another site could otherwise open a
    WebSocket to 127.0.0.1 from the learner's own browser. Clients that are not browsers
    send no ``Origin`` (None) and are allowed. Same origin means the Origin's host:port is
    the ``host`` the browser asked for (or, behind a proxy, one of ``forwarded_host``'s,
    ``X-Forwarded-Host``, which a page cannot set on a WebSocket handshake nor on a
    cross-site POST without a CORS preflight).
    """
    if origin is None:
        return True
    if origin in limits.allowed_origins or "*" in limits.allowed_origins:
        return True
    netloc = urlsplit(origin).netloc
    hosts = {host}
    hosts.update(h.strip() for h in (forwarded_host or "").split(",") if h.strip())
    return bool(netloc) and netloc in hosts


def json_content_type(content_type: str | None) -> bool:
    """``application/json``, with or without parameters (``; charset=utf-8``)."""
    if content_type is None:
        return False
    return content_type.partition(";")[0].strip().lower() == "application/json"


GUARDED = (b"host", b"origin", b"x-forwarded-host", b"content-type")
"""The request headers :meth:`Guard.verdict` reads (the first of a repeated one)."""


class Guard:
    """ASGI middleware: the Host, Origin and Content-Type checks of this module's docstring.

    ``Guard(app, limits, hosts)``. A refused HTTP request gets the status and
    ``{"error": ...}``; a refused WebSocket handshake gets the same as an HTTP response
    (the browser's ``WebSocket`` fires ``error`` then ``close`` with 1006). The checks
    are :meth:`verdict`'s, which the paths that bypass the middleware run too
    (chatlib.pollpath, chatlib.webtransport).
    """

    def __init__(self, app, limits: Limits, hosts: HostPolicy | None = None) -> None:
        self.app = app
        self.limits = limits
        self.hosts = hosts or host_policy("127.0.0.1", None, limits)

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            headers = {}
            for name, value in scope["headers"]:
                if name in GUARDED and name not in headers:
                    headers[name] = value.decode("latin-1")
            refusal = self.verdict(
                scope.get("method", "GET"), headers.get(b"host"), headers.get(b"origin"),
                forwarded_host=headers.get(b"x-forwarded-host"),
                content_type=headers.get(b"content-type"), scheme=scope.get("scheme", "http"),
                handshake=kind == "websocket")
            if refusal is not None:
                # The body of a refused POST is not read: tell the client this connection ends.
                await refuse(kind, send, refusal.status, refusal.error,
                             headers=[(b"connection", b"close")] if kind == "http" else [])
                return
        await self.app(scope, receive, send)

    def verdict(self, method: str, host: str | None, origin: str | None = None, *,
                forwarded_host: str | None = None, content_type: str | None = None,
                scheme: str = "http", handshake: bool = False) -> Refusal | None:
        """The checks, on a request's plain values: None if it may go on, else the
        :class:`~chatlib.web.Refusal` that answers it (403 or 415, ``{"error": ...}``).

        ``method``: the HTTP method; ``host``, ``origin``, ``forwarded_host``,
        ``content_type``: the ``Host``, ``Origin``, ``X-Forwarded-Host`` and ``Content-Type``
        headers (None: absent), the *first* of a repeated one (:data:`GUARDED`; the
        middleware passes that); ``scheme``: the URL's (``http``, ``https``, ``ws``, ...);
        ``handshake``: a WebSocket handshake, whose Origin is checked although it is a GET.
        """
        if not self.hosts.allows(host, scheme):
            return Refusal(403, self.hosts.hint(host))
        if handshake or method not in SAFE_METHODS:
            if not origin_allowed(origin, host, forwarded_host, self.limits):
                return Refusal(403, "origin not allowed")
        if method == "POST" and not json_content_type(content_type):
            return Refusal(415, "Content-Type must be application/json")
        return None
