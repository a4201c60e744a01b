"""chatlib inside a REAL Jupyter kernel: the traps of kernel_probe_uvicorn.md, as tests.

One ipykernel (the venv's ``python3`` kernelspec) is started for this module and shut down
at the end. The tests share it and run in file order, like a notebook: start the server,
chat with it, check signals, block the loop, interrupt, re-run the start cell, hit a busy
port, stop. Cells run through ``jupyter_client`` (``execute_interactive``); a cell reports
what it measured on a line ``RESULT {json}``.

No timing asserts: every timeout here is a hang guard, far above what a healthy run needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import pytest
import pytest_asyncio
from kernels import CELL_TIMEOUT, Kernel, started_kernel
from websockets.exceptions import ConnectionClosed

from chatlib import SSEClient, WebSocketClient

IO_TIMEOUT = 10.0  # hang guard for one client operation

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]


# -- sockets ----------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """Can we listen on 127.0.0.1:port? (SO_REUSEADDR: TIME_WAIT leftovers don't count,
    a listening socket does.)"""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            return False
        return True


def connection_refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


async def get_messages(url: str) -> dict:
    async with httpx.AsyncClient(timeout=IO_TIMEOUT) as http:
        response = await http.get(url + "api/messages")
        assert response.status_code == 200, response.text
        return response.json()


async def post_message(url: str, user: str, text: str) -> dict:
    async with httpx.AsyncClient(timeout=IO_TIMEOUT) as http:
        response = await http.post(url + "api/messages", json={"user": user, "text": text})
        assert response.status_code == 201, response.text
        return response.json()


async def settle(*tasks) -> None:
    """Cancel what is still running of ``tasks`` (None allowed) and wait for it to end."""
    for task in tasks:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, IO_TIMEOUT)


async def close_quietly(*clients) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), IO_TIMEOUT)


# -- fixtures ---------------------------------------------------------------------------

SETUP_CELL = """
import asyncio, json, os, signal, time
import chatlib

# Signal handlers as the kernel has them: inside a plain cell, and while the kernel idles
# (sampled by a loop callback, which can only run when no cell is blocking the loop).
sync_sigint = signal.getsignal(signal.SIGINT)
sync_sigterm = signal.getsignal(signal.SIGTERM)
_idle_samples = []

def _sample(label):
    _idle_samples.append((label, signal.getsignal(signal.SIGINT),
                          signal.getsignal(signal.SIGTERM)))

def _sample_when_idle(label):
    asyncio.get_running_loop().call_later(0.2, _sample, label)

_sample_when_idle("no server yet")
print("RESULT", json.dumps({"pid": os.getpid()}))
"""

START_CELL = """
import chatlib, json, os, signal
before = signal.getsignal(signal.SIGINT)
before_term = signal.getsignal(signal.SIGTERM)
server = await chatlib.start_server()
print(server.port)
print("RESULT", json.dumps({
    "port": server.port, "pid": os.getpid(), "running": server.running,
    "sigint_kept": signal.getsignal(signal.SIGINT) is before,
    "sigterm_kept": signal.getsignal(signal.SIGTERM) is before_term,
    "sigint": repr(signal.getsignal(signal.SIGINT)), "before": repr(before),
}))
"""


async def wait_for_idle_samples(kernel: Kernel, count: int) -> None:
    """Leave the kernel idle until ``_idle_samples`` holds ``count`` samples.

    A sample is a loop callback: it cannot run while a plain (synchronous) cell blocks the
    loop, so checking with such cells never produces an in-cell sample.
    """
    for _ in range(20):
        await asyncio.sleep(0.5)
        cell = await kernel.run_ok('print("RESULT", json.dumps(len(_idle_samples)))')
        if cell.result >= count:
            return
    pytest.fail(f"the kernel never took idle sample #{count}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kernel():
    """A real ipykernel (the venv's ``python3`` kernelspec); always shut down."""
    async with started_kernel() as kernel:
        kernel.pid = (await kernel.run_ok(SETUP_CELL)).result["pid"]
        await wait_for_idle_samples(kernel, 1)  # before any cell awaits something
        yield kernel


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def started(kernel):
    """The start cell, run once; its :class:`Cell` (asserted on by test 1)."""
    return await kernel.run(START_CELL)


@pytest.fixture
def url(started) -> str:
    assert started.status == "ok", str(started)
    return f"http://127.0.0.1:{started.result['port']}/"


# -- start ------------------------------------------------------------------------------


async def test_start_cell_returns_and_server_serves_while_idle(kernel, started):
    assert started.status == "ok", str(started)
    result = started.result
    assert isinstance(result["port"], int) and result["port"] > 0
    assert str(result["port"]) in started.stream().splitlines()
    assert result["running"] is True
    assert result["pid"] == kernel.pid

    # The cell has completed and the kernel is idle: the server keeps serving.
    base = f"http://127.0.0.1:{result['port']}/"
    async with httpx.AsyncClient(timeout=IO_TIMEOUT) as http:
        page = await http.get(base)
        assert page.status_code == 200
        assert "html" in page.headers["content-type"]
        body = (await http.get(base + "api/messages")).json()
        assert body["messages"] == [] and body["last_id"] == 0
        presence = await http.get(base + "api/presence")
        assert presence.status_code == 200 and presence.json() == {"users": [], "count": 0}


# -- chat -------------------------------------------------------------------------------


async def test_websocket_and_sse_clients_chat_with_the_kernel_server(url):
    last = (await get_messages(url))["last_id"]
    ws = WebSocketClient(url, "ws-ada", after=last)
    sse = SSEClient(url, "sse-bob", after=last)
    try:
        await asyncio.wait_for(ws.connect(), IO_TIMEOUT)
        await asyncio.wait_for(sse.connect(), IO_TIMEOUT)

        await ws.send("hello from a websocket")
        got = await sse.receive(timeout=IO_TIMEOUT)
        assert (got.user, got.text) == ("ws-ada", "hello from a websocket")

        sent = await sse.send("hello from sse")  # SSE clients send with POST
        echo, reply = await ws.receive_many(2, timeout=IO_TIMEOUT)
        assert (echo.user, echo.text) == ("ws-ada", "hello from a websocket")
        assert (reply.id, reply.user, reply.text) == (sent.id, "sse-bob", "hello from sse")
        assert echo.id == got.id < reply.id
    finally:
        await close_quietly(ws, sse)


async def test_a_cell_chats_with_its_own_server_using_top_level_await(kernel, url):
    last = (await get_messages(url))["last_id"]
    sse = SSEClient(url, "sse-watcher", after=last)  # a client outside the kernel listens
    try:
        await asyncio.wait_for(sse.connect(), IO_TIMEOUT)
        cell = await kernel.run_ok(f"""
import json, chatlib
async with chatlib.WebSocketClient(server.url, "cell-ws", after={last}) as c:
    await c.send("hello from a cell")
    m = await c.receive(timeout=10)
async with chatlib.PollingClient(server.url, "cell-poll", after={last}, interval=0.1) as p:
    polled = await p.receive(timeout=10)
print("RESULT", json.dumps({{"ws": [m.user, m.text], "poll": [polled.user, polled.text]}}))
""")
        assert cell.result == {"ws": ["cell-ws", "hello from a cell"],
                               "poll": ["cell-ws", "hello from a cell"]}
        got = await sse.receive(timeout=IO_TIMEOUT)
        assert (got.user, got.text) == ("cell-ws", "hello from a cell")
    finally:
        await close_quietly(sse)


# -- signals ----------------------------------------------------------------------------


async def test_server_leaves_the_kernels_signal_handlers_alone(kernel, started):
    # In the start cell itself, after the server started (uvicorn would have replaced both).
    assert started.result["sigint_kept"] is True, started.result
    assert started.result["sigterm_kept"] is True, started.result

    # While the kernel idles with the server running, and inside a later plain cell.
    await kernel.run_ok('_sample_when_idle("server running")')
    await wait_for_idle_samples(kernel, 2)
    cell = await kernel.run_ok("""
print("RESULT", json.dumps({
    "labels": [s[0] for s in _idle_samples],
    "idle": [[s[0], repr(s[1]), repr(s[2])] for s in _idle_samples],
    "idle_sigint_kept": all(s[1] == _idle_samples[0][1] for s in _idle_samples),
    "idle_sigterm_kept": all(s[2] == _idle_samples[0][2] for s in _idle_samples),
    "sync_sigint_kept": signal.getsignal(signal.SIGINT) is sync_sigint,
    "sync_sigterm_kept": signal.getsignal(signal.SIGTERM) is sync_sigterm,
}))
""")
    result = cell.result
    assert result["labels"] == ["no server yet", "server running"], result
    assert result["idle_sigint_kept"] and result["idle_sigterm_kept"], result
    assert result["sync_sigint_kept"] and result["sync_sigterm_kept"], result


# -- a blocking cell stalls the server (teaching fact) ----------------------------------


async def test_time_sleep_in_a_cell_stalls_the_server(kernel, url):
    """A request sent while a cell runs ``time.sleep`` is answered only after the cell.

    The order is read on the kernel's own clock: the server stamps the message (``ts``)
    when it handles the request, and the cell prints the time its sleep ended.
    """
    last = (await get_messages(url))["last_id"]
    ws = WebSocketClient(url, "ws-stall", after=last)
    cell_task = post_task = received_task = None
    try:
        await asyncio.wait_for(ws.connect(), IO_TIMEOUT)
        sleeping = asyncio.Event()
        cell_task = asyncio.create_task(kernel.run("""
import json, time
print("RESULT", json.dumps({"start": time.time()}), flush=True)
time.sleep(2)
print("RESULT", json.dumps({"end": time.time()}))
""", marker="start", seen=sleeping))
        await asyncio.wait_for(sleeping.wait(), CELL_TIMEOUT)
        # The kernel is inside time.sleep now (or about to be): ask over HTTP and WS.
        post_task = asyncio.create_task(post_message(url, "http-stall", "http during the sleep"))
        await ws.send("ws during the sleep")
        # the server handles the two in either order once the loop is free again
        received_task = asyncio.create_task(ws.receive_many(2, timeout=CELL_TIMEOUT))

        cell = await cell_task
        assert cell.status == "ok", str(cell)
        end = cell.result["end"]
        posted = await asyncio.wait_for(post_task, CELL_TIMEOUT)
        received = {m.text: m for m in await received_task}
    finally:
        await settle(cell_task, post_task, received_task)
        await close_quietly(ws)
    assert set(received) == {"ws during the sleep", "http during the sleep"}
    assert received["http during the sleep"].id == posted["id"]
    assert posted["ts"] >= end, (posted, end)  # handled after the cell's sleep ended
    assert received["ws during the sleep"].ts >= end, (received, end)


# -- interrupt --------------------------------------------------------------------------


async def test_interrupt_stops_a_blocking_cell_and_the_server_survives(kernel, url):
    sleeping = asyncio.Event()
    cell_task = asyncio.create_task(kernel.run(
        "import time\nprint('sleeping now', flush=True)\ntime.sleep(30)\nprint('woke')",
        timeout=20, marker="sleeping now", seen=sleeping))
    try:
        await asyncio.wait_for(sleeping.wait(), 15)
        await kernel.km.interrupt_kernel()
        cell = await cell_task  # the 20 s guard, well before the 30 s sleep would end
    finally:
        await settle(cell_task)
    assert cell.status == "error", str(cell)
    assert cell.ename == "KeyboardInterrupt", str(cell)
    assert "woke" not in cell.stream()

    # The server still answers, and the kernel still runs cells (the same process).
    await get_messages(url)  # 200 with a JSON body
    after = await kernel.run_ok(
        'print("RESULT", json.dumps({"pid": os.getpid(), "running": server.running}))')
    assert after.result == {"pid": kernel.pid, "running": True}


# -- re-run the start cell --------------------------------------------------------------


async def test_rerunning_the_start_cell_keeps_port_and_history(kernel, started, url):
    posted = await post_message(url, "history", "posted before the re-run")

    rerun = await kernel.run(START_CELL)
    assert rerun.status == "ok", str(rerun)
    assert rerun.result["port"] == started.result["port"]
    assert rerun.result["pid"] == kernel.pid
    assert rerun.result["running"] is True
    assert rerun.result["sigint_kept"] and rerun.result["sigterm_kept"], rerun.result

    body = await get_messages(url)
    assert posted in body["messages"]
    assert body["last_id"] == posted["id"]
    # and the new server keeps numbering after the old log
    again = await post_message(url, "history", "posted after the re-run")
    assert again["id"] == posted["id"] + 1


# -- busy port --------------------------------------------------------------------------


async def test_busy_port_is_an_oserror_in_the_cell_not_a_dead_kernel(kernel, url):
    with socket.socket() as blocker:  # no SO_REUSEADDR, listening: the port is taken
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        busy = blocker.getsockname()[1]
        cell = await kernel.run(f"await chatlib.ChatServer(port={busy}).start()")
        assert cell.status == "error", str(cell)
        assert cell.ename == "OSError", str(cell)

    assert await kernel.km.is_alive()
    after = await kernel.run_ok(
        'print("RESULT", json.dumps({"pid": os.getpid(), "running": server.running}))')
    assert after.result == {"pid": kernel.pid, "running": True}  # same process: no restart
    await get_messages(url)  # 200 with a JSON body


# -- stop -------------------------------------------------------------------------------


async def _close_code(ws: WebSocketClient) -> int | None:
    for _ in range(10_000):  # presence and other frames until the close
        try:
            await ws.receive(timeout=CELL_TIMEOUT)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
    raise AssertionError("the WebSocket was never closed")


async def _stream_end(sse: SSEClient) -> str:
    for _ in range(10_000):
        try:
            await sse.receive(timeout=CELL_TIMEOUT)
        except ConnectionError:
            return "ended"  # the response finished: the server ended the stream
        except httpx.HTTPError as exc:
            return f"broken: {exc!r}"
    raise AssertionError("the event stream never ended")


async def test_stop_with_clients_connected_frees_the_port(kernel, url):
    port = int(url.rsplit(":", 1)[1].strip("/"))
    last = (await get_messages(url))["last_id"]
    ws = WebSocketClient(url, "ws-stop", after=last)
    sse = SSEClient(url, "sse-stop", after=last)
    stop = closed = ended = None
    try:
        await asyncio.wait_for(ws.connect(), IO_TIMEOUT)
        await asyncio.wait_for(sse.connect(), IO_TIMEOUT)
        await post_message(url, "stopper", "both of you are connected")
        assert (await ws.receive(timeout=IO_TIMEOUT)).text == "both of you are connected"
        assert (await sse.receive(timeout=IO_TIMEOUT)).text == "both of you are connected"

        stop = asyncio.create_task(kernel.run(
            'await server.stop()\nprint("RESULT", json.dumps({"running": server.running}))',
            timeout=20))
        closed = asyncio.create_task(_close_code(ws))
        ended = asyncio.create_task(_stream_end(sse))
        cell = await stop
        code = await asyncio.wait_for(closed, IO_TIMEOUT)
        end = await asyncio.wait_for(ended, IO_TIMEOUT)
    finally:
        await settle(stop, closed, ended)
        await close_quietly(ws, sse)

    assert cell.status == "ok", str(cell)
    assert cell.result == {"running": False}
    assert code in (1001, 1012), code
    assert end == "ended", end
    assert connection_refused(port)
    assert port_is_free(port)
