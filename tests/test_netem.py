"""chatlib.netem: the delaying TCP proxy, checked against the chat server and raw sockets.

Timing checks only assert what is logically certain: bytes cannot arrive *earlier* than the
delay, the stall or the bandwidth cap allows. The upper bounds are generous (a loaded 2-core
machine) and only catch a proxy that adds delay twice or never delivers. The figures are
printed (``pytest -s``). The proxy's own overhead is measured by bench/netem_overhead.py,
never asserted here.

What is checked:

* round trips through the proxy cost 2 x delay, over HTTP and over a WebSocket, and a new
  connection pays the TCP handshake's round trip too;
* jitter never reorders bytes; half-closes pass through; the target refusing means a reset;
* the bandwidth cap holds; a full buffer stops the reading (backpressure); stalls hold bytes;
* a cut is seen by every client type, and each one resumes without losing a message;
* the chat page works through the proxy in real Chromium (Host and Origin checks included),
  shows the delay as its latency, and reconnects after a cut;
* ``python -m chatlib netem`` runs the proxy from the shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import time

import httpx
import pytest
import websockets
from conftest import CLIENT_CLASSES, CLIENT_DEFAULTS, TRANSPORTS
from helpers import needs_chromium

from chatlib import netem
from chatlib.browser import launch

# Generous: only a broken proxy (delay applied twice, bytes held forever) exceeds these.
SLACK = 0.25
DELAY = 0.05

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def start_proxy():
    """``await start_proxy(target, **options)``: a started proxy, stopped at teardown."""
    async with stopped_at_exit(netem.start) as start:
        yield start


@contextlib.asynccontextmanager
async def stopped_at_exit(starter):
    """``start(target, **options)`` calling ``starter`` (netem.start or netem.start_udp);
    everything it started is stopped when the block ends."""
    started = []

    async def start(target, **options):
        proxy = await starter(target, **options)
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await asyncio.wait_for(proxy.stop(), 10)


@contextlib.asynccontextmanager
async def tcp_server(handler):
    """A raw TCP server on 127.0.0.1 (ephemeral port) running ``handler(reader, writer)``."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send back every byte; half-close when the client does."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    writer.close()


async def wait_until(condition, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` is true (checked every 5 ms), or fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():  # bounded by the timeout
            await asyncio.sleep(0.005)


async def post(http: httpx.AsyncClient, url: str, user: str, text: str) -> dict:
    response = await http.post(url + "api/messages", json={"user": user, "text": text})
    assert response.status_code == 201, response.text
    return response.json()


# -- delay ---------------------------------------------------------------------------------


async def test_http_round_trip_costs_twice_the_delay(server, start_proxy):
    proxy = await start_proxy(server, delay=DELAY)
    timings = {}
    for name, url in (("direct", server.url), ("netem", proxy.url)):
        async with httpx.AsyncClient() as http:
            await http.get(url + "api/presence")  # open the connection first
            rtts = []
            for _ in range(8):
                started = time.perf_counter()
                response = await http.get(url + "api/presence")
                rtts.append(time.perf_counter() - started)
                assert response.status_code == 200
        timings[name] = rtts
    print(f"\nHTTP RTT, median of 8: direct {statistics.median(timings['direct']) * 1000:.2f} ms,"
          f" through netem (delay {DELAY * 1000:g} ms) "
          f"{statistics.median(timings['netem']) * 1000:.2f} ms")
    assert min(timings["netem"]) >= 2 * DELAY, "a round trip came back faster than 2 x delay"
    assert statistics.median(timings["netem"]) < 2 * DELAY + SLACK


async def test_websocket_round_trip_costs_twice_the_delay(server, start_proxy):
    proxy = await start_proxy(server, delay=DELAY)
    ws_url = proxy.url.replace("http", "ws", 1) + "ws"
    async with websockets.connect(ws_url, compression=None) as ws:
        await ws.send('{"type": "hello", "user": "ada", "after": 0}')
        rtts = []
        for i in range(6):
            started = time.perf_counter()
            await ws.send(f'{{"type": "message", "text": "ping {i}"}}')
            async with asyncio.timeout(10):
                while True:  # skip presence and acks: wait for our own message to come back
                    frame = await ws.recv()
                    if f'"ping {i}"' in frame and '"message"' in frame:
                        break
            rtts.append(time.perf_counter() - started)
        started = time.perf_counter()
        await (await ws.ping())  # a control frame: answered by the WebSocket layer, no app code
        pong_rtt = time.perf_counter() - started
    print(f"\nWebSocket through netem (delay {DELAY * 1000:g} ms): message RTT median "
          f"{statistics.median(rtts) * 1000:.2f} ms, ping/pong {pong_rtt * 1000:.2f} ms")
    assert min(rtts) >= 2 * DELAY and pong_rtt >= 2 * DELAY
    assert statistics.median(rtts) < 2 * DELAY + SLACK


async def test_a_new_connection_pays_the_tcp_handshake(server, start_proxy):
    # connect (1 RTT, emulated) + request/response (1 RTT) before the first byte comes back
    proxy = await start_proxy(server, delay=DELAY)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"GET /api/presence HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n"
                 "Connection: close\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    elapsed = time.perf_counter() - started
    writer.close()
    print(f"\nfirst response on a new connection: {elapsed * 1000:.1f} ms (4 x delay = "
          f"{4 * DELAY * 1000:g} ms)")
    assert head.startswith(b"HTTP/1.1 200")
    assert 4 * DELAY <= elapsed < 4 * DELAY + SLACK


async def test_jitter_never_reorders_bytes(start_proxy):
    async with tcp_server(echo) as (host, port):
        proxy = await start_proxy((host, port), delay=0.01, jitter=0.01, seed=9)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        sent = b""
        for i in range(100):  # many small writes: many chunks, each with its own delay
            piece = f"{i:04d},".encode()
            sent += piece
            writer.write(piece)
            await writer.drain()
            if i % 10 == 0:
                await asyncio.sleep(0.002)  # let the chunks go out separately
        writer.write_eof()  # the half-close must pass through, after the last byte
        received = await asyncio.wait_for(reader.read(), 10)  # until the echo's EOF
        writer.close()
    assert received == sent


async def test_a_refused_target_resets_the_client(start_proxy):
    async with tcp_server(echo) as (host, port):
        pass  # the port is free again: nothing listens there
    proxy = await start_proxy((host, port))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        data = await asyncio.wait_for(reader.read(), 10)
        if not data:
            raise ConnectionError("closed")  # EOF also tells the client there is no server
    writer.close()


# -- bandwidth, backpressure, stalls -----------------------------------------------------


async def test_bandwidth_cap_holds(start_proxy):
    rate, burst, size = 256 * 1024, 16 * 1024, 384 * 1024
    received = asyncio.Event()

    async def sink(reader, writer):
        total = 0
        while total < size and (data := await reader.read(65536)):
            total += len(data)
        received.set()
        writer.close()

    async with tcp_server(sink) as target:
        proxy = await start_proxy(target, rate=rate, burst=burst)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.perf_counter()
        writer.write(bytes(size))
        await asyncio.wait_for(received.wait(), 20)
        elapsed = time.perf_counter() - started
        writer.close()
    print(f"\n{size} B at a cap of {rate} B/s: {elapsed:.2f} s = {size / elapsed:.0f} B/s")
    # The bucket starts full (burst bytes free), everything else waits for its tokens.
    assert elapsed >= (size - burst) / rate
    assert proxy.stats.bytes_up == size


async def test_a_full_buffer_stops_reading(start_proxy):
    # A target that never reads: only the proxy's bounded buffer and the kernel's socket
    # buffers can take the client's bytes. If the proxy buffered without limit, the client
    # could write all 64 MiB.
    release = asyncio.Event()

    async def stuck(reader, writer):
        await release.wait()
        writer.close()

    async with tcp_server(stuck) as target:
        proxy = await start_proxy(target, buffer=64 * 1024)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(bytes(64 * 1024 * 1024))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(writer.drain(), 2)
        (connection,) = proxy._connections
        up = connection.directions[0]
        held = up.bytes_read - proxy.stats.bytes_up
        print(f"\nclient still holds {writer.transport.get_write_buffer_size()} B; "
              f"the proxy read {up.bytes_read} B, holds {held} B")
        # The queue's chunks, plus one in the write loop's hands and one waiting to be queued.
        assert held <= proxy.buffer + 2 * up.chunk
        writer.transport.abort()
        release.set()


async def test_stall_holds_bytes_then_delivers_them_in_order(start_proxy):
    async with tcp_server(echo) as target:
        proxy = await start_proxy(target)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 10) == b"before"
        proxy.stall(0.3)
        started = time.perf_counter()
        writer.write(b"during")
        assert await asyncio.wait_for(reader.readexactly(6), 10) == b"during"
        elapsed = time.perf_counter() - started
        writer.close()
    assert elapsed >= 0.3 - 0.01  # the stall's clock started just before ours


async def test_scheduled_cut(start_proxy):
    async with tcp_server(echo) as target:
        proxy = await start_proxy(target)
        reader, _ = await asyncio.open_connection("127.0.0.1", proxy.port)
        proxy.cut(after=0.1)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(reader.read(), 10)
    assert proxy.stats.cuts == 1


# -- a cut, seen by every client type ---------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_client_sees_a_cut_and_resumes_without_loss(transport, server,
                                                                 start_proxy, http):
    proxy = await start_proxy(server)
    cls = CLIENT_CLASSES[transport]
    client = cls(proxy.url, "ada", **CLIENT_DEFAULTS[transport])
    try:
        await client.connect()
        first = await post(http, server.url, "bob", "before the cut")
        assert (await client.receive(timeout=10)).id == first["id"]

        connections = proxy.stats.connections
        pending = None
        if transport == "longpoll":
            # Cut while a long poll is in flight: wait until the request reached the server.
            sent = proxy.stats.bytes_up
            pending = asyncio.ensure_future(client.receive(timeout=10))
            await wait_until(lambda: proxy.stats.bytes_up > sent)
        proxy.cut()
        lost = [await post(http, server.url, "bob", f"while away {i}") for i in range(2)]

        seen = None
        try:
            got = [await pending] if pending else []
            got += await client.receive_many(2 - len(got), timeout=10)
        except (httpx.HTTPError, ConnectionError, websockets.ConnectionClosed) as exc:
            seen = exc
            await client.reconnect()  # resume after last_id
            got = await client.receive_many(2, timeout=10)
        print(f"\n{transport}: the cut showed as {type(seen).__name__ if seen else 'nothing'};"
              f" connections {connections} -> {proxy.stats.connections}")
        assert [m.id for m in got] == [m["id"] for m in lost]
        assert [m.text for m in got] == ["while away 0", "while away 1"]
        if transport == "poll":
            # Between two polls no request is open: the client simply opens a new connection.
            assert seen is not None or proxy.stats.connections > connections
        else:
            assert seen is not None, f"{transport} did not notice its connection was cut"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 5)


# -- the chat page in Chromium, through the proxy ---------------------------------------------


@needs_chromium()
@pytest.mark.parametrize("transport", ["ws", "sse", "longpoll"])
async def test_chat_page_works_through_the_proxy(transport, server, start_proxy, http):
    from playwright.async_api import async_playwright, expect

    delay = 0.04
    proxy = await start_proxy(server, delay=delay)
    errors: list[str] = []
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # Host and Origin are both 127.0.0.1:PROXYPORT: the server's checks pass.
            await page.goto(f"{proxy.url}?user=ada&transport={transport}")
            status = page.locator("#status")
            await expect(status).to_have_attribute("data-state", "connected", timeout=15_000)

            await page.fill("#message-input", "hello through netem")
            await page.press("#message-input", "Enter")
            mine = page.locator("#messages li.message", has_text="hello through netem")
            await expect(mine).to_have_count(1, timeout=15_000)
            latency_ms = int(await mine.locator(".latency").get_attribute("data-ms"))
            print(f"\n{transport}: own message's latency through netem {latency_ms} ms "
                  f"(RTT {2 * delay * 1000:g} ms)")
            # Send to echo crosses the proxy at least twice (a POST and its answer, or a
            # frame up and one down).
            assert latency_ms >= 2 * delay * 1000 - 1

            # A cut: the page reconnects and shows what was said meanwhile, once.
            proxy.cut()
            await post(http, server.url, "bob", "said during the cut")
            texts = page.locator("#messages li.message .text")
            await expect(texts.filter(has_text="said during the cut")).to_have_count(
                1, timeout=20_000)
            await expect(status).to_have_attribute("data-state", "connected", timeout=15_000)
            assert await texts.all_text_contents() == ["hello through netem",
                                                       "said during the cut"]
        finally:
            await browser.close()
    assert not errors, errors


# -- loss on TCP (modelled) and TLS ----------------------------------------------------------


async def test_a_lost_chunk_holds_every_chunk_behind_it(start_proxy):
    arrivals: list[tuple[bytes, float]] = []
    both = asyncio.Event()

    async def sink(reader, writer):
        while len(arrivals) < 2 and (data := await reader.read(65536)):
            for piece in data.split(b";")[:-1]:
                arrivals.append((piece, time.perf_counter()))
        both.set()
        writer.close()

    async with tcp_server(sink) as target:
        proxy = await start_proxy(target, delay=0.01, retransmit=0.3, loss=1.0)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.perf_counter()
        writer.write(b"lost;")  # the first chunk is "lost": 0.3 s late
        await writer.drain()
        await wait_until(lambda: proxy.stats.losses == 1)
        proxy.loss = 0.0
        writer.write(b"behind;")  # not lost, but TCP delivers in order: it waits
        await writer.drain()
        await asyncio.wait_for(both.wait(), 10)
        writer.close()
    print(f"\narrivals after {[(p.decode(), round((t - started) * 1000)) for p, t in arrivals]} ms")
    assert [piece for piece, _ in arrivals] == [b"lost", b"behind"]
    assert arrivals[0][1] - started >= 0.3
    assert proxy.stats.losses == 1


def test_loss_defaults_to_a_round_trip_plus_the_minimum_rto():
    proxy = netem.Netem(("127.0.0.1", 1), delay=0.05, loss=1.0, seed=1)
    assert proxy._sample_loss() == pytest.approx(0.3)
    with pytest.raises(ValueError):
        netem.Netem(("127.0.0.1", 1), loss=1.5)


async def test_tls_is_decrypted_behind_the_delay(server, start_proxy):
    proxy = await start_proxy(server, delay=DELAY, tls=True)
    assert proxy.url.startswith("https://127.0.0.1:")
    context = proxy.client_ssl_context()
    async with httpx.AsyncClient(verify=context) as http:  # its first creation takes a while
        started = time.perf_counter()
        response = await http.get(proxy.url + "api/presence")
        elapsed = time.perf_counter() - started
    assert response.status_code == 200
    ws_url = proxy.url.replace("https", "wss", 1) + "ws"
    # The closing handshake must end with the server's close passed on (not after the
    # client's close_timeout, 10 s: TLS has no half-close to pass on).
    async with asyncio.timeout(5), websockets.connect(ws_url, ssl=context,
                                                      compression=None) as ws:
        await ws.send('{"type": "hello", "user": "ada", "after": 0}')
        first = await ws.recv()
    print(f"\nfirst HTTPS response on a new connection: {elapsed * 1000:.1f} ms "
          f"(TCP + TLS 1.3 + request = 6 x delay = {6 * DELAY * 1000:g} ms)")
    assert '"type"' in first
    # TCP's round trip (emulated), TLS 1.3's one round trip, then the request's.
    assert 6 * DELAY <= elapsed < 6 * DELAY + SLACK
    with pytest.raises(httpx.ConnectError):  # the certificate is no public CA's
        async with httpx.AsyncClient() as http:
            await http.get(proxy.url + "api/presence")


# -- the UDP relay ---------------------------------------------------------------------------


class _Datagrams(asyncio.DatagramProtocol):
    """A UDP endpoint that records (data, address, time) and, if ``echo``, answers."""

    def __init__(self, echo: bool = False) -> None:
        self.echo, self.received, self.changed = echo, [], asyncio.Event()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.received.append((data, addr, time.perf_counter()))
        self.changed.set()
        if self.echo:
            self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def udp_endpoint(echo: bool = False, remote=None):
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _Datagrams(echo), local_addr=("127.0.0.1", 0), remote_addr=remote)
    try:
        yield transport, protocol
    finally:
        transport.close()


@pytest.fixture
async def start_relay():
    """``await start_relay(target, **options)``: a started UDP relay, stopped at teardown."""
    async with stopped_at_exit(netem.start_udp) as start:
        yield start


async def test_udp_delay_applies_each_way(start_relay):
    async with udp_endpoint(echo=True) as (target, _):
        relay = await start_relay(target.get_extra_info("sockname"), delay=DELAY)
        async with udp_endpoint(remote=relay.address) as (client, inbox):
            rtts = []
            for i in range(5):
                started = time.perf_counter()
                client.sendto(b"ping %d" % i)
                await wait_until(lambda n=i + 1: len(inbox.received) == n)
                rtts.append(inbox.received[-1][2] - started)
    print(f"\nUDP round trips through the relay (delay {DELAY * 1000:g} ms): "
          f"{[round(r * 1000, 1) for r in rtts]} ms")
    assert min(rtts) >= 2 * DELAY
    assert statistics.median(rtts) < 2 * DELAY + SLACK
    assert (relay.stats.datagrams_up, relay.stats.datagrams_down) == (5, 5)


async def test_udp_loss_rate_is_within_bounds_and_repeatable(start_relay):
    n, loss = 2000, 0.1
    outcomes = []
    for _ in range(2):  # the same seed drops the same datagrams
        async with udp_endpoint() as (target, sink):
            relay = await start_relay(target.get_extra_info("sockname"), loss=loss, seed=21)
            async with udp_endpoint(remote=relay.address) as (client, _):
                for i in range(n):
                    client.sendto(b"%d" % i)
                    # One loop step per datagram: asyncio reads one datagram per step, and
                    # the kernel's socket buffer (a few hundred small datagrams) is finite.
                    await asyncio.sleep(0)
                await wait_until(lambda r=relay: len(sink.received) + r.stats.dropped == n)
            outcomes.append(sorted(int(data) for data, _, _ in sink.received))
    dropped = n - len(outcomes[0])
    print(f"\n{n} datagrams at loss={loss}: {dropped} dropped")
    # Binomial(2000, 0.1): mean 200, standard deviation 13.4; these bounds are 4.5 of those.
    assert 140 <= dropped <= 260
    assert outcomes[0] == outcomes[1]
    assert len(set(outcomes[0])) == len(outcomes[0])  # nothing duplicated


async def test_udp_drop_schedule_drops_the_same_datagrams_every_run(start_relay):
    n = 100
    for _ in range(2):
        async with udp_endpoint() as (target, sink):
            relay = await start_relay(target.get_extra_info("sockname"),
                                      drop=lambda i, up: up and i % 10 == 9)
            async with udp_endpoint(remote=relay.address) as (client, _):
                for i in range(n):
                    client.sendto(b"%d" % i)
                    await asyncio.sleep(0)
                await wait_until(lambda r=relay: len(sink.received) + r.stats.dropped == n)
        got = sorted(int(data) for data, _, _ in sink.received)
        assert got == [i for i in range(n) if i % 10 != 9]
        assert (relay.stats.dropped, relay.stats.dropped_down) == (10, 0)


async def test_udp_reordering_lets_later_datagrams_overtake(start_relay):
    n = 500
    async with udp_endpoint() as (target, sink):
        relay = await start_relay(target.get_extra_info("sockname"), delay=0.005,
                                  reorder=0.2, reorder_gap=0.02, seed=5)
        async with udp_endpoint(remote=relay.address) as (client, _):
            for i in range(n):
                client.sendto(b"%d" % i)
                await asyncio.sleep(0.001 if i % 10 == 0 else 0)
            await wait_until(lambda: len(sink.received) == n)
    order = [int(data) for data, _, _ in sink.received]
    highest, late = -1, 0
    for seq in order:
        late += seq < highest
        highest = max(highest, seq)
    print(f"\n{n} datagrams at reorder=0.2: {relay.stats.reordered} held, {late} arrived late")
    assert sorted(order) == list(range(n))  # all delivered, once
    assert 0.12 * n <= relay.stats.reordered <= 0.28 * n
    assert 0 < late <= relay.stats.reordered


async def test_udp_each_client_gets_its_own_flow(start_relay):
    async with udp_endpoint(echo=True) as (target, seen):
        relay = await start_relay(target.get_extra_info("sockname"))
        async with udp_endpoint(remote=relay.address) as (a, inbox_a), \
                udp_endpoint(remote=relay.address) as (b, inbox_b):
            a.sendto(b"from a")
            b.sendto(b"from b")
            await wait_until(lambda: inbox_a.received and inbox_b.received)
    assert [d for d, _, _ in inbox_a.received] == [b"from a"]
    assert [d for d, _, _ in inbox_b.received] == [b"from b"]
    assert len({addr for _, addr, _ in seen.received}) == 2
    assert relay.stats.flows == 2


async def test_udp_relay_cleans_up(start_relay):
    async with udp_endpoint() as (target, sink):
        relay = await start_relay(target.get_extra_info("sockname"), delay=0.2)
        async with udp_endpoint(remote=relay.address) as (client, _):
            client.sendto(b"first")
            await wait_until(lambda: relay.stats.flows == 1 and relay._pending)
            flows = list(relay._flows.values())
            port = relay.port
            await relay.stop()
            assert not relay._pending and not relay._flows
            assert all(flow.transport.is_closing() for flow in flows)
            await asyncio.sleep(0.3)  # past the datagram's delay: it must never arrive
    assert sink.received == []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))  # the relay's port is free


# -- the command line --------------------------------------------------------------------


def test_parse_duration_and_rate():
    assert netem.parse_duration("50ms") == 0.05
    assert netem.parse_duration("0.1s") == 0.1
    assert netem.parse_duration("2") == 2.0
    assert netem.parse_rate("1mbit") == 125_000
    assert netem.parse_rate("100kB") == 100_000
    for bad in ("fast", "50 parsecs", "-1ms"):
        with pytest.raises(ValueError):
            netem.parse_duration(bad)
    with pytest.raises(ValueError):
        netem.parse_rate("1 lightyear")
    with pytest.raises(ValueError):
        netem.Netem("127.0.0.1:1", delay=-1)


async def test_command_line(server):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatlib", "netem", "--listen", "0",
        "--target", f"127.0.0.1:{server.port}", "--delay", "20ms",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line.startswith("netem: http://127.0.0.1:"), line
        url = line.split()[1]
        async with httpx.AsyncClient() as http:
            started = time.perf_counter()
            response = await http.get(url + "api/presence")
            elapsed = time.perf_counter() - started
        assert response.status_code == 200
        assert elapsed >= 4 * 0.02  # a new connection: the handshake RTT, then the request
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 15)
    assert process.returncode == 0, (await process.stderr.read()).decode()


async def test_command_line_udp():
    async with udp_endpoint(echo=True) as (target, _):
        host, port = target.get_extra_info("sockname")[:2]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatlib", "netem", "--udp", "--listen", "0",
            "--target", f"{host}:{port}", "--delay", "20ms", "--seed", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
            assert line.startswith("netem: udp://127.0.0.1:"), line
            relay_port = int(line.split()[1].rsplit(":", 1)[1])
            async with udp_endpoint(remote=("127.0.0.1", relay_port)) as (client, inbox):
                started = time.perf_counter()
                client.sendto(b"ping")
                await wait_until(lambda: inbox.received)
            assert inbox.received[0][0] == b"ping"
            assert inbox.received[0][2] - started >= 2 * 0.02  # the delay, each way
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 15)
        assert process.returncode == 0, (await process.stderr.read()).decode()
