"""The ChatPanel's kernel side, without a browser.

What a view sends is fed in as the front end would (``_handle_custom_msg``, the path an
``on_msg`` message takes); what the view would draw is read from the synced traitlets.
The browser half (panel.js in real JupyterLab) is tested in test_jupyterlab.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from helpers import free_port
from test_send_path import Relay, stored

from chatlib import ChatPanel, ChatServer, Limits, MemoryLog, Message, WebSocketClient
from chatlib.closecode import CloseCode
from chatlib.panel import retryable

ROOT = Path(__file__).resolve().parent.parent


def from_view(panel: ChatPanel, **content) -> None:
    """A message from the panel's JavaScript view, as the kernel receives it."""
    panel._handle_custom_msg(content, [])


@pytest.fixture
async def panel(server):
    panel = ChatPanel(server, user="notebook")
    await panel.wait_connected()
    yield panel
    await panel.aclose()


async def test_enter_sends_the_whole_text_at_once(server, panel):
    async with WebSocketClient(server.url, "reader") as reader:
        text = "Hello visitor, this is the notebook. <b>not bold</b>"
        from_view(panel, type="send", text=text, client_id="c-1")
        # No settle delay: it is on its way before anything else happens in the kernel.
        assert [e["client_id"] for e in panel.outbox] == ["c-1"]
        message = await reader.receive(timeout=10)
        assert message.text == text and message.user == "notebook"
        await panel.wait_for(lambda p: not p.outbox and p.history, timeout=10)
        assert panel.history[-1] == message.to_dict()
        assert panel.messages[message.id] == message


async def test_pending_then_sent_in_order(server, panel):
    texts = [f"message {i}" for i in range(10)]
    for i, text in enumerate(texts):
        from_view(panel, type="send", text=text, client_id=f"id-{i}")
    states = {e["state"] for e in panel.outbox}
    assert states <= {"pending", "sent"} and len(panel.outbox) == 10
    await panel.wait_for(lambda p: not p.outbox and len(p.history) == 10, timeout=10)
    assert [m["text"] for m in panel.history] == texts


async def test_the_same_client_id_twice_is_one_message(server, panel):
    from_view(panel, type="send", text="once", client_id="same")
    from_view(panel, type="send", text="once", client_id="same")
    assert len(panel.outbox) == 1


async def test_empty_and_malformed_view_messages_are_ignored(panel):
    for content in ({"type": "send", "text": "   "}, {"type": "send", "text": 42},
                    {"type": "send"}, {"type": "nonsense"}, {"no": "type"}):
        from_view(panel, **content)
    assert panel.outbox == []
    # A client_id that breaks the rule (1..64 printable ASCII) is replaced by one that keeps it.
    from_view(panel, type="send", text="hi", client_id="bad id\n" * 20)
    assert re.fullmatch(r"[!-~]{1,64}", panel.outbox[0]["client_id"])


async def test_send_returns_once_sent_and_the_echo_settles_it(server, panel):
    result = await panel.send("from python", timeout=10)
    assert isinstance(result, Message) and result.text == "from python" and result.client_id
    message = await panel.wait_for_text("from python")
    assert message.id == result.id
    await panel.wait_for(lambda p: not p.outbox, timeout=10)
    assert panel.history[-1]["id"] == message.id


async def test_messages_wait_while_disconnected_and_go_after_reconnect():
    server = ChatServer(port=free_port())
    await server.start()
    panel = ChatPanel(server, user="notebook")
    try:
        await panel.wait_connected()
        await server.stop()
        await panel.wait_for(lambda p: p.state == "reconnecting", timeout=10)
        assert panel.retry_at > 0  # the view counts down to it
        from_view(panel, type="send", text="typed while the server was down", client_id="x1")
        assert panel.pending == ["typed while the server was down"]
        assert panel.outbox[0]["state"] == "pending"
        await panel.wait_for(lambda p: p.error, timeout=10)  # why, in the status line
        await server.start()
        await panel.wait_for_text("typed while the server was down", timeout=20)
        await panel.wait_for(lambda p: p.state == "connected" and not p.outbox, timeout=10)
        assert panel.error == ""
        texts = [m.text for m in panel.messages.values()]
        assert texts.count("typed while the server was down") == 1
    finally:
        await panel.aclose()
        await server.stop()


@pytest.mark.parametrize("transport", ["ws", "sse", "longpoll", "poll"])
async def test_a_gap_after_retention_is_given_to_the_view(transport):
    """The panel reads 1-3; while the server is down 40 more are written and its log keeps
    10; resuming after 3, the panel gets ``gap`` and the view its first id (``gaps``)."""
    server = ChatServer(port=free_port(), log=MemoryLog(max_messages=10))
    await server.start()
    panel = ChatPanel(server, user="notebook", transport=transport)
    try:
        for i in range(1, 4):
            await server.log.append("bob", f"early {i}")
        await panel.wait_for(lambda p: len(p.messages) == 3, timeout=10)
        assert panel.gaps == []
        await server.stop()
        for i in range(4, 44):
            await server.log.append("bob", f"late {i}")
        first = await server.log.first_id()
        await server.start()
        await panel.wait_for(lambda p: p.last_id == 43, timeout=20)
        assert panel.gaps == [first] and first > 5
        assert list(panel.messages) == [1, 2, 3, *range(first, 44)]
    finally:
        await panel.aclose()
        await server.stop()


async def test_a_planned_restart_is_told_in_the_status_line_not_on_stderr(caplog):
    """A restart (close 1012) is an expected event: the panel's status line says so while it
    reconnects, and nothing reaches the log at WARNING (which the kernel's stderr would show
    as a pink box under the cell that made the panel)."""
    server = ChatServer(port=free_port())
    await server.start()
    panel = ChatPanel(server, user="notebook")
    try:
        await panel.wait_connected()
        with caplog.at_level(logging.INFO, logger="chatlib.panel"):
            await server.stop(CloseCode.SERVICE_RESTART)
            await panel.wait_for(lambda p: "restarting" in p.error, timeout=10)
            assert panel.error == "the server is restarting (close 1012)"
            assert panel.state == "reconnecting"
            await server.start()
            await panel.wait_for(lambda p: p.state == "connected", timeout=20)
        assert panel.error == ""
        loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not loud, loud
        assert any("restarting" in r.getMessage() for r in caplog.records)  # at INFO
    finally:
        await panel.aclose()
        await server.stop()


async def test_the_panel_takes_its_servers_text_limit(start_chat):
    """The view's length counter counts towards the server's Limits.max_text (the
    defaults' for a server given by URL)."""
    server = await start_chat(limits=Limits(max_text=300))
    panel = ChatPanel(server, user="notebook")
    by_url = ChatPanel(server.url, user="reader")
    try:
        assert panel.max_text == 300
        assert by_url.max_text == Limits().max_text
    finally:
        await panel.aclose()
        await by_url.aclose()


@pytest.mark.parametrize("panel_transport", ["ws", "sse"])
async def test_ack_lost_then_resent_after_reconnect_is_stored_once(server, panel_transport):
    """The worst moment: the server stored the message, the connection died before the
    acknowledgement came back. The panel sends it again (same client_id); it is stored once
    and shown once."""
    relay = await Relay(server.port).start()
    panel = ChatPanel(relay.url, user="notebook", transport=panel_transport)
    try:
        await panel.wait_connected()
        connections = panel.connections
        relay.hold()  # the server's answers are lost from now on
        from_view(panel, type="send", text="exactly once", client_id="the-one")
        original = (await stored(server.log, "exactly once"))[0]
        assert panel.outbox[0]["state"] == "pending"  # no ack: it does not know
        relay.cut()
        await panel.wait_for(lambda p: p.connections > connections and not p.outbox,
                             timeout=20)
        assert await stored(server.log, "exactly once") == [original]
        assert [m for m in panel.messages.values() if m.text == "exactly once"] == [original]
        assert [m["text"] for m in panel.history].count("exactly once") == 1
    finally:
        await panel.aclose()
        await relay.stop()


@pytest.mark.parametrize("panel_transport", ["ws", "poll"])
async def test_a_refused_message_is_marked_failed_and_can_be_discarded(start_chat,
                                                                      panel_transport):
    server = await start_chat(limits=Limits(max_text=10))
    panel = ChatPanel(server, user="notebook", transport=panel_transport)
    try:
        await panel.wait_connected()
        from_view(panel, type="send", text="far too long for this server", client_id="long")
        await panel.wait_for(lambda p: p.outbox and p.outbox[0]["state"] == "failed",
                             timeout=10)
        assert "10" in panel.outbox[0]["error"]  # the server's reason, for the view
        assert panel.state == "connected"  # one refused message does not end the chat
        from_view(panel, type="send", text="short", client_id="ok")  # the chat goes on
        await panel.wait_for_text("short")
        from_view(panel, type="discard", client_id="long")
        assert panel.outbox == []
        with pytest.raises(Exception, match="10|long"):
            await panel.send("also far too long", timeout=10)
    finally:
        await panel.aclose()


async def test_an_unexpected_error_is_logged_and_shown_not_retried(server, caplog,
                                                                   monkeypatch):
    async def broken(self, timeout=None):
        raise TypeError("a bug in a client")

    monkeypatch.setattr(WebSocketClient, "receive", broken)
    with caplog.at_level(logging.ERROR, logger="chatlib.panel"):
        panel = ChatPanel(server, user="notebook")
        try:
            await panel.wait_for(lambda p: p.state == "failed", timeout=10)
        finally:
            await panel.aclose()
    assert panel.error == "TypeError: a bug in a client"
    assert any("a bug in a client" in str(r.exc_info[1]) for r in caplog.records
               if r.exc_info)


async def test_a_refused_handshake_is_shown_and_not_retried():
    # A server that answers every request 403 (as one does for a wrong token or Host).
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    refuser = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = refuser.sockets[0].getsockname()[1]
    panel = ChatPanel(f"http://127.0.0.1:{port}/", user="notebook")
    try:
        await panel.wait_for(lambda p: p.state == "failed", timeout=10)
        assert "403" in panel.error
    finally:
        await panel.aclose()
        refuser.close()
        await refuser.wait_closed()


async def test_retryable():
    assert retryable(ConnectionRefusedError(111, "refused"))
    assert retryable(TimeoutError())
    assert not retryable(TypeError("bug"))
    from chatlib.clients import ChatRefused
    assert retryable(ChatRefused(429, "slow down")) and retryable(ChatRefused(503, "later"))
    assert not retryable(ChatRefused(413, "too long"))


async def test_presence_typing_and_hello(server, panel, monkeypatch):
    sent = []
    monkeypatch.setattr(panel, "_send", lambda msg, buffers=None: sent.append(msg))
    from_view(panel, type="hello")
    assert sent == [{"method": "custom", "content": {"type": "hello"}}]
    panel.focus()  # ipywidgets' own use of Widget.send still works
    assert sent[-1] == {"method": "custom", "content": {"do": "focus"}}
    async with WebSocketClient(server.url, "visitor") as visitor:
        await panel.wait_for(lambda p: "visitor" in p.presence, timeout=10)
        await visitor.send_typing()
        await panel.wait_for(lambda p: p.typing == "visitor", timeout=10)
        # Typing in the view reaches the others.
        from_view(panel, type="typing")
        await asyncio.wait_for(_typing_from(visitor, "notebook"), 10)
        await visitor.send("done typing")
        await panel.wait_for(lambda p: p.typing is None, timeout=10)


async def _typing_from(client, user):
    while user not in client.typing:
        await client._fetch()


async def test_history_is_bounded_and_a_new_view_gets_it(start_chat):
    server = await start_chat(limits=Limits(rate=1000, burst=1000))
    async with WebSocketClient(server.url, "bot") as bot:
        for i in range(30):
            await bot.send(f"m{i}")
        panel = ChatPanel(server, user="notebook", shown=10)
        try:
            await panel.wait_for(lambda p: p.history and p.history[-1]["text"] == "m29",
                                 timeout=10)
            assert [m["text"] for m in panel.history] == [f"m{i}" for i in range(20, 30)]
            assert len(panel.messages) == 30
            # What a view opened later (notebook closed and reopened) is drawn from.
            state = panel.get_state()
            assert state["history"] == panel.history and state["state"] == "connected"
        finally:
            await panel.aclose()


async def test_saved_output_reads_well_without_a_kernel(server):
    panel = ChatPanel(server, user="<script>x</script>")
    try:
        data, _ = panel._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in data
        assert "run the notebook's cells" in data["text/plain"].lower()
        assert "children=" not in data["text/plain"]
        assert "<script>" not in data["text/html"] and "&lt;script&gt;" in data["text/html"]
        assert server.url not in data["text/html"]  # no link to a port that will be gone
    finally:
        await panel.aclose()


def test_panel_and_page_format_times_the_same_way():
    """Both draw times with the same function and options (`11:48 PM` where that is the
    locale's way), so the panel and the page show one message at the same time."""
    pattern = re.compile(r"^ *const TIME_FORMAT = .*\n *function formatTime\(.*$", re.M)
    panel_js = pattern.search((ROOT / "chatlib" / "panel.js").read_text()).group(0)
    page_js = pattern.search((ROOT / "static" / "app.js").read_text()).group(0)
    assert panel_js.split() == page_js.split()


def test_the_view_renders_text_never_html():
    source = (ROOT / "chatlib" / "panel.js").read_text()
    assert not re.search(r"\.(inner|outer)HTML\s*[+]?=|insertAdjacentHTML|createContextualFragment"
                         r"|document\.write", source)


