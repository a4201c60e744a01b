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
import subprocess
import sys
from pathlib import Path

import h11
import pytest
import uvicorn
import websockets
from websockets.asyncio.client import connect as ws_connect

from chatlib import fastpath, protocols, wire

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


def test_the_installed_uvicorn_has_what_the_protocols_override():
    """chatlib.protocols subclasses uvicorn's protocols: what it overrides, calls and reads
    (protocols.EXPECTED) must be there, or it falls back to uvicorn's own protocols."""
    assert fastpath.probe(protocols.EXPECTED) is None, \
        f"uvicorn {uvicorn.__version__}: update chatlib.protocols.EXPECTED"
    assert protocols.MISSING is None
    assert "max_incomplete_event_size" in inspect.signature(h11.Connection).parameters
    assert fastpath.H11_MAX_INCOMPLETE_EVENT_SIZE > 0


WITHOUT_INTERNALS = """
import asyncio, json, logging, sys
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
del WebSocketsSansIOProtocol.handle_cont  # an upgrade that renamed what chatlib overrides
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("chatlib").addHandler(handler)
import httpx
from websockets.asyncio.client import connect
from chatlib import ChatServer, protocols

async def main():
    async with ChatServer("127.0.0.1", 0) as server, httpx.AsyncClient() as http:
        kinds = set()
        async with connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "hello", "user": "ada"}))
            posted = await http.post(server.url + "api/messages",
                                     json={"user": "bob", "text": "hi"})
            for _ in range(10):  # the history marker, presence, ... then the message
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["type"] == "message":
                    break
            kinds = {type(c).__name__ for c in server._server.server_state.connections}
        print(json.dumps({"missing": protocols.MISSING, "warnings": warnings,
                          "posted": posted.status_code, "received": frame, "kinds": sorted(kinds)}))

asyncio.run(main())
"""


def test_without_the_internals_it_overrides_the_server_runs_uvicorns_own():
    """Remove a uvicorn method chatlib.protocols overrides: the probe names it, one warning
    says so, and the server runs uvicorn's stock protocols, which still chat."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_INTERNALS], capture_output=True,
                          text=True, timeout=50, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["missing"] == (
        "uvicorn.protocols.websockets.websockets_sansio_impl:WebSocketsSansIOProtocol"
        ".handle_cont")
    assert len(result["warnings"]) == 1 and "handle_cont" in result["warnings"][0]
    assert result["posted"] == 201 and result["received"]["text"] == "hi"
    assert "WebSocketsSansIOProtocol" in result["kinds"]
    assert not any(kind.startswith("Bounded") for kind in result["kinds"])


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
                        "typing", "admission", "closecode", "limits", "presence", "store"}, imported
