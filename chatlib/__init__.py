"""chatlib: a real chat server to run inside a Jupyter kernel, and clients for every transport.

>>> import chatlib
>>> server = await chatlib.start_server()   # in a notebook cell; returns at once
>>> server.url
"""

import importlib

from .limits import Limits
from .server import ChatServer, start_server, stop_server
from .store import MemoryLog, Message, MessageLog, SQLiteLog, StoreUnavailable

# The clients (httpx) and the ChatPanel (ipywidgets, IPython) load on first use, so that
# `python -m chatlib serve` doesn't carry them (their memory at rest: bench/README.md).
_LAZY = {
    "ChatPanel": ".panel",
    "LongPollClient": ".clients",
    "PollingClient": ".clients",
    "RedisLog": ".redis_log",
    "SSEClient": ".clients",
    "WebSocketClient": ".clients",
    "WebTransportClient": ".clients",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'chatlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ChatPanel", "ChatServer", "Limits", "LongPollClient", "MemoryLog", "Message", "MessageLog",
    "PollingClient", "RedisLog", "SQLiteLog", "SSEClient", "StoreUnavailable", "WebSocketClient",
    "WebTransportClient", "start_server", "stop_server",
]
__version__ = "0.1.0"
