"""WebTransport over HTTP/3 (chatlib.webtransport) with Python clients: chatting with the
other transports, resume, the checks every transport has (Origin, Host, token, hello,
limits), close codes, and bad input and floods that must hurt only their sender."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from chatlib import Limits, wire
from chatlib.clients import ChatRefused, SessionClosed, WebTransportClient
from chatlib.closecode import CloseCode
from chatlib.webtransport import (
    MAX_EXTRA_STREAMS,
    ClientSession,
    bind_udp,
    close_capsule,
    make_certificate,
    parse_close,
    read_capsules,
)

pytestmark = pytest.mark.timeout(60)
T = 10  # seconds: hang guard for one wait; never reached when things work


@pytest.fixture
async def wt_server(start_chat, limits: Limits):
    return await start_chat(limits=limits, webtransport=True)


@pytest.fixture
async def make_wt():
    """``await make_wt(server, "ada", **options)``: a connected WebTransportClient, closed
    at teardown."""
    clients: list[WebTransportClient] = []

    async def make(server, user: str, **options) -> WebTransportClient:
        client = WebTransportClient(server.url, user, **options)
        clients.append(client)
        await client.connect()
        return client

    yield make
    for client in clients:
        await client.close()


class Probe:
    """A raw session (no client logic): every line and datagram it got, and its end."""

    def __init__(self) -> None:
        self.lines: list[dict] = []
        self.datagrams: list[dict] = []
        self.end: tuple[int | None, str] | None = None
        self.changed = asyncio.Event()
        self.session = ClientSession(self._line, self._datagram, self._end)

    def _line(self, line: bytes) -> None:
        self.lines.append(wire.loads(line))
        self.changed.set()

    def _datagram(self, data: bytes) -> None:
        self.datagrams.append(wire.loads(data))
        self.changed.set()

    def _end(self, code, reason) -> None:
        self.end = (code, reason)
        self.changed.set()

    async def until(self, condition, timeout: float = T):
        """Wait until ``condition()`` is true (re-checked at every line, datagram, end)."""
        async with asyncio.timeout(timeout):
            while not condition():  # bounded by the timeout
                self.changed.clear()
                await self.changed.wait()
        return condition()

    def types(self) -> list[str]:
        return [line.get("type") for line in self.lines]


@pytest.fixture
async def probe():
    """``await probe(server, **open_options)``: an open raw session, closed at teardown."""
    probes: list[Probe] = []

    async def open_probe(server, expect: int = 200, **options) -> Probe:
        p = Probe()
        probes.append(p)
        status, error = await p.session.open(server.wt_url, server.wt_hash, **options)
        assert status == expect, error
        return p

    yield open_probe
    for p in probes:
        await p.session.close()


async def post_many(server, count: int) -> None:
    async with httpx.AsyncClient() as http:
        for i in range(count):
            await http.post(server.url + "api/messages", json={"user": "x", "text": f"m{i}"})


def hello(user: str, after: int = 0) -> bytes:
    return wire.ws_hello(user, after).encode() + b"\n"


# -- chatting ------------------------------------------------------------------------------


async def test_webtransport_chats_with_a_websocket(wt_server, make_wt, make_client):
    ws = await make_client("ws", wt_server, "bob")
    ada = await make_wt(wt_server, "ada")
    sent = await ada.send("hello over QUIC")
    assert sent.id == 1 and sent.user == "ada" and not ada.pending
    assert (await ws.receive(timeout=T)).text == "hello over QUIC"
    await ws.send("hello over TCP")
    texts = [m.text for m in await ada.receive_many(2, timeout=T)]
    assert texts == ["hello over QUIC", "hello over TCP"]
    assert ada.setup_time is not None and ada.setup_time < T


async def test_typing_goes_by_datagram_both_ways(wt_server, make_wt, make_client):
    ws = await make_client("ws", wt_server, "bob")
    ada = await make_wt(wt_server, "ada")
    await ada.send("here")  # the hello is handled: the session is subscribed
    await ada.send_typing()
    async with asyncio.timeout(T):
        for _ in range(1000):  # bounded: frames until the typing notice
            kind, data = wire.parse_ws(await ws.ws.recv())
            if kind == "typing" and data["user"] == "ada":
                break
    arrived = asyncio.Event()
    ada.on_event = lambda kind, data: kind == "typing" and arrived.set()
    await ws.send_typing()
    async with asyncio.timeout(T):
        await arrived.wait()
    assert "bob" in ada.typing


async def test_presence_and_resume_after_a_cursor(wt_server, make_wt, make_client):
    ws = await make_client("ws", wt_server, "bob")
    for i in range(5):
        await ws.send(f"m{i}")
    cy = await make_wt(wt_server, "cy", after=2)
    got = await cy.receive_many(3, timeout=T)
    assert [m.id for m in got] == [3, 4, 5]
    async with asyncio.timeout(T):
        while "cy" not in cy.presence:  # bounded by the timeout
            await asyncio.sleep(0.01)
    assert {"bob", "cy"} <= set(cy.presence)


async def test_fresh_join_gets_the_newest_page_and_older_on_request(start_chat, probe):
    server = await start_chat(limits=Limits(history=3), webtransport=True)
    await post_many(server, 5)
    p = await probe(server)
    p.session.send(hello("ada"))
    await p.until(lambda: sum(t == "message" for t in p.types()) == 3)
    assert p.lines[0] == {"type": "history", "before": 3}
    p.session.send(b'{"type": "older", "before": 3}\n')
    await p.until(lambda: "older" in p.types())
    older = p.lines[p.types().index("older")]
    assert [m["id"] for m in older["messages"]] == [1, 2]


async def test_gap_and_reset_on_resume(start_chat, probe):
    from chatlib import MemoryLog

    server = await start_chat(log=MemoryLog(max_messages=10), webtransport=True)
    await post_many(server, 30)
    gap = await probe(server)
    gap.session.send(hello("ada", after=2))
    await gap.until(lambda: "gap" in gap.types())
    assert gap.lines[0]["type"] == "gap" and gap.lines[0]["first_id"] > 3
    reset = await probe(server)
    reset.session.send(hello("bob", after=1000))
    await reset.until(lambda: "reset" in reset.types())
    assert reset.lines[0] == {"type": "reset"}


async def test_pending_message_is_resent_after_a_reconnect(wt_server, make_wt):
    ada = await make_wt(wt_server, "ada")
    ada.pending["c1"] = "kept while offline"
    await ada.reconnect()
    async with asyncio.timeout(T):
        while ada.pending:  # the resend's ack empties it
            await ada.receive(timeout=T)
    async with httpx.AsyncClient() as http:
        body = (await http.get(wt_server.url + "api/messages?after=0")).json()
    assert [m["text"] for m in body["messages"]] == ["kept while offline"]


# -- the server side: start, stop, the info route -----------------------------------------


async def test_info_route_and_stop_frees_the_udp_port(start_chat, http):
    server = await start_chat(webtransport=True)
    body = (await http.get(server.url + "api/webtransport")).json()
    assert body == {"available": True, "url": server.wt_url, "hash": server.wt_hash,
                    "hash_algorithm": "sha-256"}
    local = (await http.get(server.url.replace("127.0.0.1", "localhost")
                            + "api/webtransport")).json()
    assert local["url"] == server.wt_url.replace("127.0.0.1", "localhost")
    port = server.port
    await server.stop()
    for sock in bind_udp("127.0.0.1", port):  # free again, on both addresses
        sock.close()


async def test_without_webtransport_the_page_is_told_and_the_client_refused(server, http):
    assert (await http.get(server.url + "api/webtransport")).json() == {"available": False}
    assert server.wt_url is None
    with pytest.raises(ConnectionError):
        await WebTransportClient(server.url, "ada").connect()


async def test_a_taken_udp_port_is_an_error_or_another_port(start_chat):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    try:
        with pytest.raises(OSError):
            await start_chat(port=port, webtransport=True)
    finally:
        udp.close()


async def test_stop_closes_sessions_with_going_away(start_chat, probe):
    server = await start_chat(webtransport=True)
    p = await probe(server)
    p.session.send(hello("ada"))
    await p.until(lambda: p.lines)
    await server.stop()
    await p.until(lambda: p.end is not None)
    assert p.end[0] == CloseCode.GOING_AWAY


def test_certificate_is_what_server_certificate_hashes_accepts():
    from cryptography.hazmat.primitives.asymmetric import ec

    made = make_certificate()
    certificate = made.certificate
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime.days <= 14
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    assert certificate.public_key().curve.name == "secp256r1"
    assert certificate.issuer == certificate.subject  # self-signed


def test_capsules_round_trip():
    data = close_capsule(1008, "no hello") + close_capsule(1000, "é" * 600)
    found, rest = read_capsules(data + data[:3])
    assert rest == data[:3]
    assert parse_close(found[0][1]) == (1008, "no hello")
    code, reason = parse_close(found[1][1])
    assert code == 1000 and len(reason.encode()) <= 1024


# -- the checks every transport has -------------------------------------------------------


async def test_foreign_origin_and_host_are_refused(wt_server, probe):
    await probe(wt_server, expect=403, origin="http://evil.example")
    good = f"http://127.0.0.1:{wt_server.port}"
    await probe(wt_server, origin=good)


async def test_token_mode(start_chat, http):
    server = await start_chat(webtransport=True, token="sekrit")
    with pytest.raises(ChatRefused) as refused:
        await WebTransportClient(server.url, "ada", wt_url=server.wt_url,
                                 cert_hash=server.wt_hash).connect()
    assert refused.value.status == 401
    ada = WebTransportClient(server.url, "ada", token="sekrit")
    await ada.connect()
    try:
        assert (await ada.send("with a token")).id == 1
    finally:
        await ada.close()
    # The page's way: a single-use ticket in the URL that /api/webtransport gives.
    info = (await http.get(server.url + "api/webtransport",
                           headers={"Authorization": "Bearer sekrit"})).json()
    assert "?ticket=" in info["url"]
    for expect in (200, 401):  # used once: a second session with it is refused
        p = Probe()
        status, _ = await p.session.open(info["url"], info["hash"])
        await p.session.close()
        assert status == expect


async def test_bad_hello_and_no_hello_close_with_1008(start_chat, probe):
    server = await start_chat(limits=Limits(hello_timeout=0.3), webtransport=True)
    bad = await probe(server)
    bad.session.send(b'{"type": "message", "text": "no hello"}\n')
    await bad.until(lambda: bad.end is not None)
    assert bad.end[0] == CloseCode.POLICY_VIOLATION
    assert bad.types() == ["error"]
    silent = await probe(server)
    await silent.until(lambda: silent.end is not None)
    assert silent.end == (CloseCode.POLICY_VIOLATION, "no hello within 0.3 s")


async def test_rate_budget_applies(start_chat, make_wt):
    server = await start_chat(limits=Limits(rate=0.05, burst=2), webtransport=True)
    ada = await make_wt(server, "ada")
    await ada.send("1")
    await ada.send("2")
    with pytest.raises(ChatRefused) as refused:
        await ada.send("3")
    assert refused.value.status == 429


# -- bad input and floods: an error for the sender only ------------------------------------


async def bystander_still_chats(server, make_client) -> None:
    """Another client of the same server sends and receives as if nothing happened."""
    ws = await make_client("ws", server, "bystander")
    sent = await ws.send("still here")
    async with asyncio.timeout(T):
        while (await ws.receive()).id != sent.id:  # history first, then its own
            pass


async def test_garbage_lines_get_errors_and_the_session_stays(wt_server, probe, make_client):
    p = await probe(wt_server)
    p.session.send(hello("ada"))
    p.session.send(b"\xff\xfe not utf-8\n{not json\n[1,2]\n{\"type\": \"nope\"}\n")
    await p.until(lambda: p.types().count("error") == 4)
    p.session.send(b'{"type": "message", "text": "fine", "client_id": "c1"}\n')
    await p.until(lambda: "ack" in p.types())
    assert p.end is None
    await bystander_still_chats(wt_server, make_client)


async def test_a_line_longer_than_the_limit_closes_with_1009(wt_server, probe, make_client):
    p = await probe(wt_server)
    p.session.send(hello("ada"))
    p.session.send(b"x" * (wt_server.limits.max_frame + 10))
    await p.until(lambda: p.end is not None)
    assert p.end[0] == CloseCode.MESSAGE_TOO_BIG
    await bystander_still_chats(wt_server, make_client)


async def test_many_streams_close_the_session_only(wt_server, probe, make_client):
    p = await probe(wt_server)
    p.session.send(hello("ada"))
    await p.until(lambda: p.lines)
    h3 = p.session.protocol.h3
    for _ in range(MAX_EXTRA_STREAMS + 5):
        stream = h3.create_webtransport_stream(p.session.session_id)
        p.session.protocol.quic.send_stream_data(stream, b"junk\n")
    p.session.protocol.transmit()
    await p.until(lambda: p.end is not None)
    assert p.end[0] == CloseCode.POLICY_VIOLATION and "streams" in p.end[1]
    await bystander_still_chats(wt_server, make_client)


async def test_datagram_flood_is_dropped_and_told(start_chat, probe, make_client):
    server = await start_chat(limits=Limits(rate=5, burst=5), webtransport=True)
    p = await probe(server)
    p.session.send(hello("ada"))
    await p.until(lambda: p.lines)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(2000):
        p.session.send_datagram(b'{"type": "typing"}')
        if _ % 50 == 0:
            await asyncio.sleep(0)  # let the packets out
    await p.until(lambda: any(line.get("error", "").startswith("too many datagrams")
                              for line in p.lines))
    seconds = loop.time() - started  # a loaded machine takes longer: the budget refills
    told = [line for line in p.lines if line.get("type") == "error"]
    assert len(told) <= seconds + 1  # at most once a second
    passed = sum(d.get("type") == "typing" for d in p.datagrams)
    assert passed <= 5 + 5 * seconds + 1  # the budget: a burst of 5, then 5/s
    assert p.end is None
    await bystander_still_chats(server, make_client)


async def test_a_client_that_never_reads_is_closed(start_chat, probe, make_client):
    server = await start_chat(limits=Limits(stuck_timeout=0.5, max_queue=100000,
                                            rate=1e6, burst=1000000, address_rate=1e6,
                                            address_burst=1000000),
                              webtransport=True)
    p = await probe(server)
    p.session.send(hello("ada"))
    await p.until(lambda: p.lines)
    p.session._transport.pause_reading()  # reads (and acknowledges) nothing from now on
    ws = await make_client("ws", server, "bob")
    for i in range(300):
        await ws._send_frame(wire.ws_post("x" * 1500 + str(i)))
    last = await ws.send("last")
    async with asyncio.timeout(T):
        while True:  # bounded: the server closes the stuck session within the timeout
            if not [pr for pr in server._webtransport.protocols if pr.session is not None]:
                break
            await asyncio.sleep(0.05)
    assert (await ws.receive_many(last.id, timeout=T))[-1].id == last.id


async def test_the_first_look_at_a_busy_stream_is_not_stuck(wt_server, probe, monkeypatch):
    """wt-course saw idle readers closed as "stopped reading" right after connecting: the
    stuck clock started at 0, so a first sweep that found bytes not acknowledged yet (the
    peer's offset still 0) counted since the loop's start."""
    from chatlib import quicpath

    p = await probe(wt_server)
    p.session.send(hello("ada"))
    await p.until(lambda: p.lines)
    session = next(pr.session for pr in wt_server._webtransport.protocols if pr.session)
    monkeypatch.setattr(quicpath, "stream_backlog", lambda quic, stream_id: (1000, 0))
    now = asyncio.get_running_loop().time()
    assert not session.stuck(now)  # first look: the clock starts
    assert not session.stuck(now + wt_server.limits.stuck_timeout / 2)
    assert session.stuck(now + wt_server.limits.stuck_timeout)  # no progress since


async def test_a_foreign_host_in_authority_is_refused(wt_server):
    """A rebinding page names its own host in ``:authority``: refused as a WebSocket
    handshake with that Host is (chatlib.guard)."""
    check = wt_server._webtransport.check
    request = {b":method": b"CONNECT", b":protocol": b"webtransport", b":path": b"/wt"}
    status, error = check({**request, b":authority": b"evil.example:%d" % wt_server.port},
                          False)
    assert status == 403 and "host not allowed" in error
    assert check({**request, b":authority": b"localhost:%d" % wt_server.port}, False)[0] == 200
    assert check({**request, b":path": b"/other"}, False)[0] == 404
    assert check({b":method": b"GET", b":path": b"/wt"}, False)[0] == 405


async def test_lines_faster_than_handled_close_the_session_only(wt_server, probe,
                                                                make_client):
    """Lines wait in a queue while one is handled (a store may take its time): more than
    MAX_QUEUED_LINES waiting close the session. (Over the network, packets arrive one per
    loop callback and a quick store keeps up; here they all arrive at once.)"""
    p = await probe(wt_server)
    p.session.send(hello("ada"))
    await p.until(lambda: p.lines)
    session = next(pr.session for pr in wt_server._webtransport.protocols if pr.session)
    session.stream_data(session.stream_id, b'{"type": "typing"}\n' * 2000, False)
    await p.until(lambda: p.end is not None)
    assert p.end == (CloseCode.POLICY_VIOLATION, "sending too fast")
    await bystander_still_chats(wt_server, make_client)


async def test_a_bug_in_a_handler_closes_that_connection_only(wt_server, probe, make_client,
                                                              monkeypatch, caplog):
    from chatlib import webtransport

    p = await probe(wt_server)
    p.session.send(hello("ada"))
    await p.until(lambda: p.lines)

    def broken(self, data):
        raise RuntimeError("a bug")

    monkeypatch.setattr(webtransport.Session, "datagram", broken)
    p.session.send_datagram(b'{"type": "typing"}')
    await p.until(lambda: p.end is not None)
    assert "closing a connection after an error" in caplog.text
    monkeypatch.undo()
    await bystander_still_chats(wt_server, make_client)


# -- admission, close reasons, stats (chatlib.admission, chatlib.closecode) ----------------


async def test_admission_refuses_a_session_with_busy_and_its_delay(start_chat, probe):
    from chatlib.clients import SessionClosed, server_delay

    server = await start_chat(limits=Limits(admit_rate=0.5, admit_burst=1), webtransport=True)
    first = await probe(server)
    first.session.send(hello("ada"))
    await first.until(lambda: first.lines)
    refused = WebTransportClient(server.url, "bob")
    try:  # the CONNECT's 200, then the close (a page reads only that): at once or later
        with pytest.raises(SessionClosed) as closed:
            await refused.connect()
            await refused.receive(timeout=T)
    finally:
        await refused.close()
    assert closed.value.code == CloseCode.TRY_AGAIN_LATER
    assert closed.value.reason.startswith("busy: retry after ")
    assert 0 < server_delay(closed.value) <= 60
    assert first.end is None  # the admitted one goes on
    assert server.stats()["admission"]["refused"] == 1


async def test_stats_name_webtransport_and_restart_says_when(start_chat, probe):
    server = await start_chat(webtransport=True)
    p = await probe(server)
    p.session.send(hello("ada"))
    await p.until(lambda: p.lines)
    stats = server.stats()
    assert stats["connections"]["webtransport"] == 1
    assert [c["transport"] for c in stats["clients"]] == ["webtransport"]
    await server.restart(spread=5)
    await p.until(lambda: p.end is not None)
    assert p.end[0] == CloseCode.SERVICE_RESTART
    assert p.end[1].startswith("restart: retry after ")


async def test_loss_and_reordering_deliver_every_message_once_in_order(start_chat,
                                                                        make_client):
    """Through chatlib.netem's UDP relay, 5 % loss and 5 % reordering each way: QUIC
    retransmits, and the stream hands over every message once, in order, both ways."""
    from chatlib import netem

    wt_server = await start_chat(limits=Limits(rate=1000, burst=1000, address_rate=1000,
                                               address_burst=1000), webtransport=True)
    relay = await netem.start_udp(wt_server, delay=0.003, jitter=0.002, loss=0.05,
                                  reorder=0.05, seed=21)
    ada = WebTransportClient(wt_server.url, "ada", wt_url=f"https://127.0.0.1:{relay.port}/wt",
                             cert_hash=wt_server.wt_hash)
    try:
        await ada.connect()
        bob = await make_client("ws", wt_server, "bob")
        sent = [await bob.send(f"from bob {i}") for i in range(100)]
        got = await ada.receive_many(100, timeout=30)
        assert [m.id for m in got] == [m.id for m in sent]
        mine = [await ada.send(f"from ada {i}") for i in range(30)]
        async with httpx.AsyncClient() as http:
            body = (await http.get(wt_server.url + "api/messages?after=100")).json()
        assert [m["text"] for m in body["messages"]] == [m.text for m in mine]
        assert relay.stats.dropped > 0 and relay.stats.reordered > 0
    finally:
        await ada.close()
        await relay.stop()


async def test_the_panel_chats_over_webtransport(wt_server, make_client):
    from chatlib import ChatPanel

    bob = await make_client("ws", wt_server, "bob")
    panel = ChatPanel(wt_server, user="notebook", transport="webtransport")
    try:
        await panel.wait_connected()
        panel._handle_custom_msg({"type": "send", "text": "from the panel",
                                  "client_id": "p-1"}, [])
        assert (await bob.receive(timeout=T)).text == "from the panel"
        await bob.send("to the panel")
        await panel.wait_for(lambda p: not p.outbox and len(p.messages) == 2, timeout=T)
        assert [m.text for m in panel.messages.values()] == ["from the panel", "to the panel"]
        assert "over webtransport" in repr(panel)
    finally:
        await panel.aclose()


async def test_chatlib_serve_webtransport(tmp_path):
    """``python -m chatlib serve --webtransport``: says where, serves, frees both ports on
    SIGTERM."""
    import sys

    from helpers import end_process

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatlib", "serve", "--port", "0", "--webtransport",
        stdout=asyncio.subprocess.PIPE, cwd=tmp_path)
    try:
        async with asyncio.timeout(30):
            serving = (await process.stdout.readline()).decode()
            where = (await process.stdout.readline()).decode()
        url = serving.split("serving on ", 1)[1].split()[0]
        assert where.startswith("WebTransport on https://127.0.0.1:") and "SHA-256" in where
        async with WebTransportClient(url, "ada") as ada:
            assert (await ada.send("over the CLI's server")).id == 1
        port = int(url.rsplit(":", 1)[1].strip("/"))
    finally:
        await end_process(process)
    assert process.returncode == 0
    for sock in bind_udp("127.0.0.1", port):  # freed
        sock.close()


async def test_rerunning_start_server_keeps_the_port_for_webtransport_too():
    """A notebook's start cell run again: the new server takes the same port, UDP included,
    and a WebTransport client resumes on it (1012 from the old one, then its history)."""
    import chatlib

    try:
        first = await chatlib.start_server(webtransport=True)
        async with WebTransportClient(first.url, "ada") as ada:
            await ada.send("before")
            url, certificate = first.wt_url, first.wt_hash
            second = await chatlib.start_server(webtransport=True)  # the cell, re-run
            assert second.port == first.port and second.wt_url == url
            assert second.wt_hash != certificate  # a new certificate, made at start
            with pytest.raises(SessionClosed) as closed:
                await ada.receive_many(2, timeout=T)  # its own message, then the close
            assert closed.value.code == CloseCode.SERVICE_RESTART
            await ada.reconnect()  # with the new hash, from api/webtransport
            assert (await ada.send("after")).id == 2
    finally:
        await asyncio.wait_for(chatlib.stop_server(), 20)


async def test_a_close_capsule_split_in_two_is_read(wt_server, probe):
    """The client's CLOSE_WEBTRANSPORT_SESSION may come in two DATA frames (ch11 review,
    finding 18): the server keeps the first half and ends the session on the second."""
    p = await probe(wt_server)
    p.session.send(hello("ada"))
    await p.until(lambda: p.lines)
    capsule = close_capsule(1000, "bye, in two halves")
    h3 = p.session.protocol.h3
    for half in (capsule[:5], capsule[5:]):  # no FIN: only the capsule can end it
        h3.send_data(p.session.session_id, half, end_stream=False)
        p.session.protocol.transmit()
        await asyncio.sleep(0.05)  # two packets, two DATA events (not a wait for a result)
    await p.until(lambda: p.end is not None)
    assert p.end[0] == CloseCode.NORMAL


async def test_a_typing_datagram_sent_with_the_hello_is_not_lost(wt_server, make_client):
    """A datagram that arrives before the hello is handled (wt-course: 2 of 2 lost when
    sent right after connect) is kept, and handled once the session is subscribed."""
    bob = await make_client("ws", wt_server, "bob")
    ada = WebTransportClient(wt_server.url, "ada")
    try:
        await ada.connect()
        await ada.send_typing()
        async with asyncio.timeout(T):
            for _ in range(1000):  # bounded: frames until ada's typing notice
                kind, data = wire.parse_ws(await bob.ws.recv())
                if kind == "typing" and data["user"] == "ada":
                    break
    finally:
        await ada.close()


async def test_a_client_that_stops_its_stream_hurts_nobody_else(wt_server, probe,
                                                                make_client, make_wt):
    """STOP_SENDING on the chat stream resets the server's sending side, and aioquic then
    raises on every write: a write made inside the hub's fan-out must not break it."""
    p = await probe(wt_server)
    p.session.send(hello("mallory"))
    await p.until(lambda: p.lines)
    ada = await make_wt(wt_server, "ada")
    bob = await make_client("ws", wt_server, "bob")
    p.session.protocol.quic.stop_stream(p.session.stream_id, 0)
    p.session.protocol.transmit()
    await p.until(lambda: p.end is not None)  # its session ends
    sent = [await bob.send(f"after {i}") for i in range(3)]
    got = await ada.receive_many(3, timeout=T)
    assert [m.id for m in got] == [m.id for m in sent]


async def test_a_quiet_session_is_kept_alive(start_chat, monkeypatch):
    """wt-course: an idle session ended after QUIC's idle timeout (30 s), a quiet chat
    included. The server pings each session's client well within it."""
    from chatlib import webtransport

    monkeypatch.setattr(webtransport, "IDLE_TIMEOUT", 1.0)
    monkeypatch.setattr(webtransport, "PING_EVERY", 0.3)
    server = await start_chat(webtransport=True)
    async with WebTransportClient(server.url, "ada") as ada:
        ended = asyncio.Event()
        ada._session.on_end = lambda code, reason: ended.set()
        with pytest.raises(TimeoutError):  # nothing ends it in 3 idle timeouts
            await asyncio.wait_for(ended.wait(), 3.0)
        assert (await ada.send("still here")).id == 1
