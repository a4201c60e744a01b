"""The URL a browser should open, locally or behind JupyterHub / Binder.

On a laptop the chat page is simply ``http://127.0.0.1:PORT/``. On JupyterHub or Binder the
kernel's ports are not reachable from the learner's browser; ``jupyter-server-proxy`` makes
them reachable under the Jupyter server's own URL, at ``<base_url>proxy/PORT/`` (the final
``/`` matters: the page's URLs are relative to it).

:func:`public_url` decides, first match wins:

1. ``CHATLIB_PUBLIC_URL``, when set: an explicit override for what cannot be detected, e.g.
   a container that publishes only Jupyter's port (``http://localhost:8888/proxy/{port}/``)
   or a port forwarder (``https://NAME-{port}.app.github.dev/``). ``{port}`` becomes the
   chat server's port.
2. ``JUPYTERHUB_SERVICE_PREFIX``: JupyterHub (and so Binder) sets it for the single-user
   server, and its kernels inherit it: ``<prefix>proxy/PORT/``.
3. The Jupyter server that started this kernel (our parent process, which describes itself
   in ``jpserver-<pid>.json`` in the Jupyter runtime directory) has a base URL other than
   ``/``: ``<base_url>proxy/PORT/``.
4. Otherwise the port is reachable as it is: ``server.url``.

Cases 2 and 3 give a path without scheme and host. It is meant for a link in the notebook,
which the browser resolves against the origin the notebook itself was loaded from.

Behind the proxy every transport works unchanged (tests/test_proxy.py runs them all through a
real Jupyter server): it forwards ``Host``, ``Origin`` and cookies as the browser sent them,
so the chat server's same-origin check sees the Jupyter origin on both sides; it leaves the
XSRF check of POSTs to the proxied application; it streams a response only when the request
says ``Accept: text/event-stream`` (as ``EventSource`` does); it relays WebSocket frames but
not close codes (the browser sees ``1005``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .auth import page_link


def _with_slash(path: str) -> str:
    return path if path.endswith("/") else path + "/"


def _parent_server_base_url() -> str | None:
    """The base URL of the Jupyter server whose kernel we are, if we are one."""
    try:
        from jupyter_core.paths import jupyter_runtime_dir
    except ImportError:
        return None
    info = Path(jupyter_runtime_dir()) / f"jpserver-{os.getppid()}.json"
    try:
        base_url = json.loads(info.read_text()).get("base_url")
    except (OSError, ValueError, AttributeError):
        return None  # no such server (not a kernel, or started by something else)
    return base_url if isinstance(base_url, str) else None


def jupyter_base_url() -> str | None:
    """The Jupyter server's base URL if it is not plain ``/`` (i.e. we sit behind a hub)."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or _parent_server_base_url()
    if prefix and prefix != "/":
        return _with_slash(prefix)
    return None


def public_url(server) -> str:
    """Where a browser reaches ``server``: its own URL, or the proxied one under a hub.

    For a server in token mode (chatlib.auth) the link is the page's own path
    (``t/<16 hex>/``) and ends in ``?token=T``: opening it gives the browser the cookie
    that its page's requests then carry, scoped to that path.
    """
    token = getattr(server, "token", None)
    override = os.environ.get("CHATLIB_PUBLIC_URL")
    if override:
        return page_link(_with_slash(override.replace("{port}", str(server.port))), token)
    base = jupyter_base_url()
    if base is None:
        return page_link(server.url, token)
    return page_link(f"{base}proxy/{server.port}/", token)
