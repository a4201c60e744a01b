"""The URL a browser should open, locally or behind JupyterHub / Binder.

On a laptop the chat page is simply ``http://127.0.0.1:PORT/``. On JupyterHub or Binder the
kernel's ports are not reachable from the learner's browser; ``jupyter-server-proxy`` makes
them reachable under the Jupyter server's own URL, at ``<base_url>proxy/PORT/``.
"""

from __future__ import annotations

import os


def jupyter_base_url() -> str | None:
    """The Jupyter server's base URL if it is not plain ``/`` (i.e. we sit behind a hub)."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if prefix:
        return prefix if prefix.endswith("/") else prefix + "/"
    return None


def public_url(server) -> str:
    """Where a browser reaches ``server``: its own URL, or the proxied one under a hub."""
    base = jupyter_base_url()
    if base is None:
        return server.url
    return f"{base}proxy/{server.port}/"
