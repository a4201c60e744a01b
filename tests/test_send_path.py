"""The send path: every message a client sends is stored exactly once, whatever goes wrong.

The faults are real: a :class:`Relay` (a TCP relay between a client and the server) forwards
the client's bytes but loses the server's, then cuts every connection. So the message is
stored and its acknowledgement never arrives: the worst moment for the sender, which cannot
know whether to send again. It sends again with the same ``client_id``, and the server
answers with the original. The same with a server restart between the send and the ack
(with SQLite, with the same in-memory log as a notebook re-run keeps, and with a fresh one
as a new process has), and with plain duplicate sends.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from conftest import TRANSPORTS, wait_present
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from chatlib import MemoryLog, SQLiteLog, wire
from chatlib.clients import ChatRefused
from chatlib.store import StoreUnavailable

pytestmark = pytest.mark.timeout(120)


class Relay:
    """A TCP relay to ``127.0.0.1:port`` on an ephemeral port of its own.

    ``hold()``: from now on the server's bytes are dropped (the clients' still go through);
    ``hold("up")``: the clients' bytes are dropped instead (what they send is lost).
    ``cut()``: abort every connection (both sides see a reset) and relay normally again.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.holding: str | None = None  # "down" (the server's bytes) or "up" (the clients')
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    def hold(self, direction: str = "down") -> None:
        self.holding = direction

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self.holding = None

    async def stop(self) -> None:
        self.cut()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader, writer) -> None:
        self._tasks.add(asyncio.current_task())
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:  # the server is down (restarting): refuse like it would
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, False),
                                 self._pipe(up_reader, writer, True))
        finally:
            self._tasks.discard(asyncio.current_task())
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader, writer, from_server: bool) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            for _ in range(1 << 40):  # until either side closes
                data = await reader.read(65536)
                if not data:
                    break
                if self.holding == ("down" if from_server else "up"):
                    continue  # lost on the way
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def relay_to():
    relays: list[Relay] = []

    async def start(server) -> Relay:
        relay = await Relay(server.port).start()
        relays.append(relay)
        return relay

    try:
        yield start
    finally:
        for relay in relays:
            await relay.stop()


async def stored(log, text: str, timeout: float = 10.0) -> list:
    """The messages with ``text`` in ``log``, once there is at least one."""
    async with asyncio.timeout(timeout):
        while True:  # bounded by the timeout
            found = [m for m in await log.after(0, 10**6) if m.text == text]
            if found:
                return found
            await asyncio.sleep(0.01)


async def received_until(client, marker: str, timeout: float = 15.0) -> list[str]:
    """Texts ``client`` receives up to and including ``marker``."""
    texts: list[str] = []
    async with asyncio.timeout(timeout):
        while not texts or texts[-1] != marker:  # bounded by the timeout
            texts.append((await client.receive()).text)
    return texts


# -- the ack is lost ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ack_lost_then_resent_is_stored_once(transport, start_chat, make_client, log,
                                                    relay_to):
    server = await start_chat(log=log)
    relay = await relay_to(server)
    observer = await make_client("ws", server, "observer")
    ada = await make_client(transport, relay.url, "ada", ack_timeout=30)

    relay.hold()  # the server stores what ada sends, but ada hears nothing back
    sending = asyncio.create_task(ada.send("exactly once"))
    original = (await stored(server.log, "exactly once"))[0]
    assert original.client_id in ada.pending
    relay.cut()
    with pytest.raises((ConnectionClosed, httpx.TransportError, OSError)):
        await sending
    assert list(ada.pending.values()) == ["exactly once"]  # not acknowledged: kept

    await ada.reconnect()  # resends what is pending, with the same client_id
    assert ada.pending == {}
    assert await stored(server.log, "exactly once") == [original]

    await observer.send("marker")
    assert (await received_until(observer, "marker")).count("exactly once") == 1
    assert (await received_until(ada, "marker")).count("exactly once") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_send_returns_the_stored_message_and_clears_pending(transport, server,
                                                                  make_client):
    ada = await make_client(transport, server, "ada")
    message = await ada.send("hi", client_id="my-id")
    assert (message.user, message.text, message.client_id) == ("ada", "hi", "my-id")
    assert ada.pending == {}
    assert [m.id for m in await server.log.after(0)] == [message.id]
    again = await ada.send("hi", client_id="my-id")  # a duplicate send
    assert again == message
    fresh = await ada.send("hi")  # a fresh client_id each time: stored again
    assert fresh.id > message.id and fresh.client_id not in (None, "my-id")
    assert [m.text for m in await server.log.after(0)] == ["hi", "hi"]


# -- the server restarts between the send and the ack ----------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("store", ["sqlite", "same-memory", "fresh-memory"])
async def test_restart_mid_send(transport, store, start_chat, make_client, relay_to,
                                tmp_path):
    path = tmp_path / "chat.db"
    first_log = SQLiteLog(path) if store == "sqlite" else MemoryLog()
    first = await start_chat(log=first_log)
    relay = await relay_to(first)
    ada = await make_client(transport, relay.url, "ada", ack_timeout=30)
    await ada.send("before")

    relay.hold()
    sending = asyncio.create_task(ada.send("mid-send"))
    original = (await stored(first.log, "mid-send"))[0]
    await first.stop()  # the server goes away before ada hears of it
    relay.cut()
    with pytest.raises((ConnectionClosed, httpx.TransportError, OSError)):
        await sending
    if store == "sqlite":
        await first_log.close()
        second_log = SQLiteLog(path)  # a new process on the same file
    else:  # a notebook re-run keeps its log; a new process starts empty
        second_log = first_log if store == "same-memory" else MemoryLog()
    second = await start_chat(log=second_log, port=first.port)
    try:
        await ada.reconnect()
        assert ada.pending == {}
        found = await stored(second.log, "mid-send")
        assert len(found) == 1
        if store != "fresh-memory":
            assert found == [original]  # the original, acknowledged at last
        assert [m.text for m in await second.log.after(0)].count("before") == (
            0 if store == "fresh-memory" else 1)
    finally:
        await second.stop()
        if store == "sqlite":
            await second_log.close()


# -- duplicates --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["poll", "longpoll"])
async def test_an_http_client_that_receives_before_connecting_joins(server, kind):
    """receive() on a client never connected connects (and joins the presence list) first,
    as chapter 3 does with its quiet listeners."""
    import chatlib

    client = (chatlib.LongPollClient(server.url, "quiet", wait=0.2) if kind == "longpoll"
              else chatlib.PollingClient(server.url, "quiet", interval=0.05))
    try:
        with pytest.raises(TimeoutError):
            await client.receive(timeout=0.3)
        await wait_present(server.url, "quiet")
    finally:
        await client.close()


async def test_concurrent_duplicates_from_two_connections_store_one(server, make_client):
    tab1 = await make_client("ws", server, "ada")
    tab2 = await make_client("sse", server, "ada")
    tab3 = await make_client("poll", server, "ada")
    results = await asyncio.gather(*(tab.send("twice?", client_id="shared")
                                     for tab in (tab1, tab2, tab3)))
    assert len({m.id for m in results}) == 1
    assert [m.text for m in await server.log.after(0)] == ["twice?"]


async def test_http_repeat_answers_200_with_the_original(server, http):
    url = server.url + "api/messages"
    first = await http.post(url, json={"user": "ada", "text": "one", "client_id": "k1"})
    assert first.status_code == 201
    body = first.json()
    assert body["client_id"] == "k1" and body["text"] == "one"
    repeat = await http.post(url, json={"user": "ada", "text": "one", "client_id": "k1"})
    assert (repeat.status_code, repeat.json()) == (200, body)
    # The Idempotency-Key header is the same key.
    by_header = await http.post(url, json={"user": "ada", "text": "one"},
                                headers={"Idempotency-Key": "k1"})
    assert (by_header.status_code, by_header.json()) == (200, body)
    other_user = await http.post(url, json={"user": "bob", "text": "one", "client_id": "k1"})
    assert other_user.status_code == 201
    plain = [await http.post(url, json={"user": "ada", "text": "no key"}) for _ in range(2)]
    assert [r.status_code for r in plain] == [201, 201]
    assert "client_id" not in plain[0].json()
    assert len(await server.log.after(0)) == 4


@pytest.mark.parametrize("bad", ["", "x" * 65, "tab\there", "é", "nul\x00", 42, ["a"], True])
async def test_bad_client_id_is_a_clear_400(server, http, bad):
    url = server.url + "api/messages"
    response = await http.post(url, json={"user": "ada", "text": "hi", "client_id": bad})
    assert response.status_code == 400
    assert response.json() == {"error": "client_id must be 1 to 64 printable ASCII characters"}
    if isinstance(bad, str) and bad.isascii() and "\x00" not in bad and "\t" not in bad:
        header = await http.post(url, json={"user": "ada", "text": "hi"},
                                 headers={"Idempotency-Key": bad})
        assert header.status_code == 400
        assert "Idempotency-Key" in header.json()["error"]
    assert await server.log.after(0) == []


async def test_client_id_and_idempotency_key_must_agree(server, http):
    response = await http.post(server.url + "api/messages",
                               json={"user": "ada", "text": "hi", "client_id": "a"},
                               headers={"Idempotency-Key": "b"})
    assert (response.status_code, response.json()) == (
        400, {"error": "client_id and Idempotency-Key differ"})
    assert await server.log.after(0) == []


async def test_websocket_ack_goes_to_the_sender_only(server):
    async with ws_connect(server.ws_url) as sender, ws_connect(server.ws_url) as other:
        await sender.send(wire.dumps({"type": "hello", "user": "ada"}))
        await other.send(wire.dumps({"type": "hello", "user": "ada"}))  # a second tab
        await wait_present(server.url, "ada")
        await sender.send(wire.dumps({"type": "message", "text": "hi", "client_id": "c1"}))
        await sender.send(wire.dumps({"type": "message", "text": "hi", "client_id": "c1"}))
        await sender.send(wire.dumps({"type": "message", "text": "no id"}))
        await sender.send(wire.dumps({"type": "message", "text": "end"}))

        async def frames(ws) -> list[tuple[str, dict]]:
            seen = []
            async with asyncio.timeout(10):
                while not seen or seen[-1][1].get("text") != "end":  # bounded by the timeout
                    kind, data = wire.parse_ws(await ws.recv())
                    if kind in ("message", "ack"):
                        seen.append((kind, data))
            return seen

        mine, theirs = await frames(sender), await frames(other)
        stored_one = (await server.log.after(0))[0]
        ack = ("ack", stored_one.to_dict())
        assert ack[1]["client_id"] == "c1" and ack[1]["id"] == stored_one.id
        assert [kind for kind, _ in mine] == ["message", "ack", "ack", "message", "message"]
        assert mine[1] == mine[2] == ack  # the repeat is acknowledged with the original
        assert [kind for kind, _ in theirs] == ["message", "message", "message"]
        assert [data["text"] for _, data in theirs] == ["hi", "no id", "end"]
        assert theirs[0][1]["client_id"] == "c1"


async def test_websocket_bad_client_id_is_an_error_frame_and_the_socket_stays(server):
    async with ws_connect(server.ws_url) as ws:
        await ws.send(wire.dumps({"type": "hello", "user": "ada"}))
        await ws.send(wire.dumps({"type": "message", "text": "hi", "client_id": "x" * 65}))
        await ws.send(wire.dumps({"type": "message", "text": "fine", "client_id": "ok"}))
        kinds = []
        async with asyncio.timeout(10):
            while "ack" not in kinds:  # bounded by the timeout
                kind, data = wire.parse_ws(await ws.recv())
                kinds.append(kind)
                if kind == "error":
                    assert data["error"] == ("client_id must be 1 to 64 printable ASCII "
                                             "characters")
        assert "error" in kinds
    assert [m.text for m in await server.log.after(0)] == ["fine"]


# -- the chat page, in Chromium ------------------------------------------------------------

PAGE_MS = 20_000  # generous: it only matters when something is broken


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", ["message lost", "ack lost", "server restart"])
async def test_chromium_page_sends_exactly_once_through_faults(
        chromium, transport, fault, start_chat, make_client, relay_to):
    from playwright.async_api import expect

    log = MemoryLog()  # a restart keeps it, as a notebook re-run does
    server = await start_chat(log=log)
    relay = await relay_to(server)
    page = await (await chromium.new_context()).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{relay.url}?user=ada&transport={transport}")
    status = page.locator("#status")
    await expect(status).to_have_attribute("data-state", "connected", timeout=PAGE_MS)

    # "message lost": what the page sends is lost on the way (at-most-once loses it);
    # otherwise it reaches the server and nothing comes back (at-least-once doubles it).
    relay.hold("up" if fault == "message lost" else "down")
    await page.fill("#message-input", "exactly once")
    await page.press("#message-input", "Enter")
    pending = page.locator("#messages li.outgoing.pending")
    await expect(pending).to_have_count(1, timeout=PAGE_MS)  # shown at once, as pending
    await expect(pending.locator(".text")).to_have_text("exactly once")
    if fault == "message lost":  # handed to the transport (sendMessage ran), and lost
        original = None
        assert await log.after(0) == []
    else:
        original = (await stored(log, "exactly once"))[0]
    if fault == "server restart":
        await server.stop()
        relay.cut()
        server = await start_chat(log=log, port=server.port)
    else:
        relay.cut()

    # The page reconnects, sends it again with the same client_id, and shows it once.
    texts = page.locator("#messages li.message .text")
    await expect(texts.filter(has_text="exactly once")).to_have_count(1, timeout=PAGE_MS)
    await expect(page.locator("#messages li[data-client-id]")).to_have_count(0)
    found = await stored(log, "exactly once")
    assert len(found) == 1 and found[0] == (original or found[0])
    observer = await make_client("ws", server, "observer")
    await observer.send("marker")
    await expect(texts.filter(has_text="marker")).to_have_count(1, timeout=PAGE_MS)
    assert (await received_until(observer, "marker")).count("exactly once") == 1
    ids = await page.eval_on_selector_all("#messages li.message",
                                          "els => els.map(e => Number(e.dataset.id))")
    assert ids == [m.id for m in await log.after(0)]
    assert errors == []


class FlakyLog(MemoryLog):
    """A store that cannot store the next ``failures`` messages (as Redis when it is down)."""

    failures = 0

    async def append(self, user, text, client_id=None):
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the message store is unavailable")
        return await super().append(user, text, client_id)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_5xx_keeps_the_message_pending_and_a_4xx_does_not(transport, start_chat,
                                                                  make_client):
    log = FlakyLog()
    server = await start_chat(log=log)
    ada = await make_client(transport, server, "ada")
    log.failures = 1
    with pytest.raises(ChatRefused) as refused:
        await ada.send("try again", client_id="c-503")
    assert refused.value.status == 503
    assert ada.pending == {"c-503": "try again"}  # the server's trouble: sent again later
    await ada.reconnect()
    assert ada.pending == {}
    assert [(m.text, m.client_id) for m in await log.after(0)] == [("try again", "c-503")]
    with pytest.raises(ChatRefused) as refused:
        await ada.send("x" * (server.limits.max_text + 1))
    assert refused.value.status == 413 and ada.pending == {}  # no use sending it again
