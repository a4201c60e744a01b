"""chatlib.fastpath's contract with the installed uvicorn, websockets and h11.

The fast path reads other libraries' private state. These tests pin what it expects, so
that an upgrade that moves it fails here by name (not as a slow server), and check that a
server without it still works (tests/test_transports.py runs every transport test on the
public path too)."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import h11
import pytest
import uvicorn
import websockets
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import connect as ws_connect

from chatlib import fastpath, wire

pytestmark = pytest.mark.timeout(60)


def test_the_installed_libraries_have_what_the_fast_path_reads():
    versions = f"uvicorn {uvicorn.__version__}, websockets {websockets.__version__}, " \
               f"h11 {h11.__version__}"
    assert fastpath.probe() is None, f"{versions}: update chatlib.fastpath.EXPECTED"
    assert fastpath.MISSING is None


def test_the_probe_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(fastpath.EXPECTED, "h11:Connection", ((), ("our_state", "gone")))
    monkeypatch.setitem(fastpath.EXPECTED, "uvicorn.nowhere:Cycle", ((), ()))
    assert fastpath.probe() == "h11:Connection.gone, uvicorn.nowhere:Cycle"


def test_the_protocols_override_what_uvicorn_has():
    """chatlib.protocols subclasses uvicorn's protocols; these are the methods it overrides
    or calls and the state it reads. A rename upstream would silently skip a bound."""
    for method in ("connection_made", "connection_lost", "data_received", "eof_received",
                   "on_response_complete", "handle_websocket_upgrade", "send_400_response",
                   "shutdown"):
        assert callable(getattr(H11Protocol, method, None)), method
    for method in ("data_received", "connection_lost", "handle_parser_exception"):
        assert callable(getattr(WebSocketsSansIOProtocol, method, None)), method
    ws_state = set(WebSocketsSansIOProtocol.__init__.__code__.co_names)
    assert {"handshake_initiated", "handshake_complete", "close_sent", "queue",
            "close_timer", "transport", "conn"} <= ws_state
    cycle = set(H11Protocol.__init__.__code__.co_names)
    assert {"conn", "cycle", "transport", "config"} <= cycle
    assert "max_incomplete_event_size" in inspect.signature(h11.Connection).parameters
    assert fastpath.H11_MAX_INCOMPLETE_EVENT_SIZE > 0


def sink_of(server, encoding):
    """The sink the server gave its push client of ``encoding`` (None: the public path)."""
    [subscriber] = [s for s in server.hub.subscribers if s.encoding is encoding]
    return subscriber.sink


@pytest.mark.parametrize("switched_off", [False, True], ids=["fast path", "public path"])
async def test_live_connections_take_the_path_the_probe_chose(server, http, monkeypatch,
                                                             switched_off):
    if switched_off:
        monkeypatch.setattr(fastpath, "MISSING", "switched off by the test")
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada"}))
        await ws.recv()  # its first frame (presence): the writer has set the sink up
        assert (sink_of(server, wire.WEBSOCKET) is None) == switched_off
        async with http.stream("GET", server.url + "api/events") as response:
            assert response.status_code == 200
            await anext(response.aiter_bytes())  # "retry:": the sink was set up before it
            assert (sink_of(server, wire.SSE) is None) == switched_off


CHATLIB = Path(fastpath.__file__).parent
PRIVATE = re.compile(r"__self__|write_paused|\.writable\b|conn\.writes|our_state|close_sent"
                     r"|\bh11\._|uvicorn\.protocols")


def test_only_the_fast_path_reads_other_libraries_private_state():
    """fastpath.py holds every reach into uvicorn/websockets/h11 internals (protocols.py,
    which subclasses uvicorn's protocols, is the one other module that may)."""
    found = [f"{path.name}:{n}" for path in sorted(CHATLIB.glob("*.py"))
             if path.name not in ("fastpath.py", "protocols.py")
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if PRIVATE.search(line)]
    assert found == []


def test_the_hub_imports_nothing_about_transports():
    """The hub fans out to Subscribers grouped by an Encoding it is given: it imports no
    transport, no wire format, no web framework."""
    tree = ast.parse((CHATLIB / "hub.py").read_text(encoding="utf-8"))
    imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names}
    assert imported <= {"__future__", "asyncio", "time", "collections", "collections.abc",
                        "typing", "closecode", "limits", "store"}, imported
