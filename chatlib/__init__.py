"""chatlib: a real chat server to run inside a Jupyter kernel, and clients for every transport.

>>> import chatlib
>>> server = await chatlib.start_server()   # in a notebook cell; returns at once
>>> server.url
"""

from .clients import LongPollClient, PollingClient, SSEClient, WebSocketClient
from .limits import Limits
from .panel import ChatPanel
from .server import ChatServer, start_server, stop_server
from .store import MemoryLog, Message, MessageLog, SQLiteLog

__all__ = [
    "ChatPanel", "ChatServer", "Limits", "LongPollClient", "MemoryLog", "Message", "MessageLog",
    "PollingClient", "SQLiteLog", "SSEClient", "WebSocketClient", "start_server",
    "stop_server",
]
__version__ = "0.1.0"
