"""chatlib.lossylink: real packet loss and delay between two network namespaces.

Skipped (with the reason) where a link cannot be made: not root, no ``ip``, no /dev/net/tun.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from chatlib import lossylink
from chatlib.clients import WebSocketClient, WebTransportClient
from chatlib.limits import Limits
from chatlib.server import ChatServer

pytestmark = pytest.mark.skipif(lossylink.available() is not None,
                                reason=f"no lossy link here: {lossylink.available()}")

PORT = 9000  # inside the link's own namespaces: nothing else listens there


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          timeout=10).stdout


class Counter(asyncio.DatagramProtocol):
    """Counts datagrams; answers "ping" with "pong"."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.count += 1
        self.changed.set()
        if data == b"ping":
            self.transport.sendto(b"pong", addr)


async def udp_endpoint(link, side: str, **address) -> tuple[asyncio.DatagramTransport, Counter]:
    with link.inside(side):
        return await asyncio.get_running_loop().create_datagram_endpoint(Counter, **address)


async def wait_for(condition, event: asyncio.Event, timeout: float) -> None:
    """Until ``condition()`` holds, waking on ``event``; TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():  # each round waits for the event, bounded by the timeout
            event.clear()
            await event.wait()


async def send_in_batches(client, count: int, accounted, event: asyncio.Event) -> None:
    """Send ``count`` datagrams, 20 at a time, each batch once the last is ``accounted()``
    for (received or dropped): the receiver's socket buffer never overflows."""
    for start in range(0, count, 20):  # bounded: count / 20 rounds, each with a timeout
        end = min(count, start + 20)
        for _ in range(start, end):
            client.sendto(b"x" * 100)
        await wait_for(lambda end=end: accounted() >= end, event, 10)


async def test_loses_about_the_configured_share_of_packets():
    sent, loss = 3000, 0.10
    async with lossylink.LossyLink(loss=loss, seed=7) as link:
        server, counter = await udp_endpoint(link, "b", local_addr=(link.b_host, PORT))
        client, _ = await udp_endpoint(link, "a", remote_addr=(link.b_host, PORT))
        try:
            await send_in_batches(client, sent, lambda: counter.count + link.stats.dropped_ab,
                                  counter.changed)
        finally:
            client.close()
            server.close()
    # Binomial(3000, 0.1): mean 300, standard deviation 16.4; five of them either side.
    assert 300 - 82 <= sent - counter.count <= 300 + 82, counter.count
    assert counter.count == link.stats.packets_ab  # nothing else crossed, nothing else lost


async def test_without_loss_every_datagram_arrives():
    async with lossylink.LossyLink(seed=1) as link:
        server, counter = await udp_endpoint(link, "b", local_addr=(link.b_host, PORT))
        client, _ = await udp_endpoint(link, "a", remote_addr=(link.b_host, PORT))
        try:
            await send_in_batches(client, 500, lambda: counter.count, counter.changed)
        finally:
            client.close()
            server.close()
    assert link.stats.dropped == 0


async def test_reorders_when_asked():
    class Sequence(Counter):
        def __init__(self) -> None:
            super().__init__()
            self.numbers: list[int] = []

        def datagram_received(self, data: bytes, addr) -> None:
            self.numbers.append(int(data))
            super().datagram_received(data, addr)

    async with lossylink.LossyLink(delay=0.005, reorder=0.3, reorder_gap=0.05,
                                   seed=2) as link:
        with link.inside("b"):
            server, counter = await asyncio.get_running_loop().create_datagram_endpoint(
                Sequence, local_addr=(link.b_host, PORT))
        client, _ = await udp_endpoint(link, "a", remote_addr=(link.b_host, PORT))
        try:
            for i in range(100):  # bounded: 100 datagrams, 2 ms apart
                client.sendto(str(i).encode())
                await asyncio.sleep(0.002)
            await wait_for(lambda: counter.count >= 100, counter.changed, 30)
        finally:
            client.close()
            server.close()
    assert sorted(counter.numbers) == list(range(100))  # all there, none twice
    assert counter.numbers != list(range(100))  # but not in order
    assert link.stats.reordered > 0


async def test_delays_each_direction_as_configured():
    delay = 0.1
    async with lossylink.LossyLink(delay=delay) as link:
        server, _ = await udp_endpoint(link, "b", local_addr=(link.b_host, PORT))
        client, answers = await udp_endpoint(link, "a", remote_addr=(link.b_host, PORT))
        try:
            started = time.perf_counter()
            client.sendto(b"ping")
            await wait_for(lambda: answers.count >= 1, answers.changed, 10)
            round_trip = time.perf_counter() - started
            # A TCP connect costs one round trip (SYN, SYN-ACK) too.
            with link.inside("b"):
                listener = await asyncio.start_server(lambda r, w: w.close(), link.b_host,
                                                      PORT)
            started = time.perf_counter()
            with link.inside("a"):
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(link.b_host, PORT), 10)
            connect = time.perf_counter() - started
            writer.close()
            listener.close()
        finally:
            client.close()
            server.close()
    # Lower bounds are the contract; the upper ones only catch a delay applied twice.
    assert 2 * delay <= round_trip < 4 * delay, round_trip
    assert 2 * delay <= connect < 4 * delay, connect


async def test_a_tcp_transfer_survives_five_percent_loss_intact():
    blob = os.urandom(512 * 1024)

    async def echo(reader, writer):
        while data := await reader.read(65536):  # bounded: ends at the client's EOF
            writer.write(data)
            await writer.drain()
        writer.close()

    async with lossylink.LossyLink(delay=0.01, loss=0.05, seed=3) as link:
        with link.inside("b"):
            listener = await asyncio.start_server(echo, link.b_host, PORT)
        try:
            with link.inside("a"):
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(link.b_host, PORT), 30)
            writer.write(blob)
            writer.write_eof()
            echoed = await asyncio.wait_for(reader.read(), 120)  # to the server's EOF
            writer.close()
        finally:
            listener.close()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()
    assert link.stats.dropped_ab > 10 and link.stats.dropped_ba > 10  # loss was real


async def test_chat_over_a_lossy_link_delivers_every_message_once_in_order():
    """chatlib's own server in B; a WebSocket sender and a WebTransport reader in A."""
    count = 30
    async with lossylink.LossyLink(delay=0.02, loss=0.05, seed=5) as link:
        server = ChatServer(link.b_host, 0, webtransport=True,
                            limits=Limits(rate=1000, burst=1000))
        with link.inside("b"):
            await server.start()
        try:
            with link.inside("a"):
                ada = WebSocketClient(server.url, "ada")
                await asyncio.wait_for(ada.connect(), 30)
                bob = WebTransportClient(server.url, "bob")
                await asyncio.wait_for(bob.connect(), 30)
            try:
                for i in range(count):
                    await ada.send(f"m{i}")
                got = await bob.receive_many(count, timeout=60)
            finally:
                await ada.close()
                await bob.close()
        finally:
            await server.stop()
    assert [m.text for m in got] == [f"m{i}" for i in range(count)]
    assert link.stats.dropped > 0


async def test_a_server_spawned_in_b_serves_clients_in_a():
    """``python -m chatlib serve`` in namespace B, a client in A: the CLI binds B's address."""
    async with lossylink.LossyLink(delay=0.005) as link:
        server = await link.spawn(
            "b", sys.executable, "-m", "chatlib", "serve", "--webtransport",
            "--host", link.b_host, "--port", str(PORT), stdout=asyncio.subprocess.PIPE)
        banner = await asyncio.wait_for(server.stdout.readline(), 60)
        assert b"chatlib serving on" in banner, banner
        url = f"http://{link.b_host}:{PORT}/"
        with link.inside("a"):
            ada = WebSocketClient(url, "ada")
            await asyncio.wait_for(ada.connect(), 30)
            bob = WebTransportClient(url, "bob")
            await asyncio.wait_for(bob.connect(), 30)
        try:
            sent = await ada.send("over the link")
            got = await bob.receive(timeout=30)
        finally:
            await ada.close()
            await bob.close()
    assert (got.id, got.text) == (sent.id, "over the link")
    assert server.returncode is not None  # stop() ended it


async def test_stop_removes_namespaces_devices_and_processes():
    link = lossylink.LossyLink()
    await link.start()
    names = list(link.namespaces.values())
    assert all(name in namespaces() for name in names)
    devices = subprocess.run(link.command("a", "ip", "-o", "link"), capture_output=True,
                             text=True, timeout=10).stdout
    assert lossylink.DEVICE in devices
    process = await link.spawn("b", sys.executable, "-c", "import time; time.sleep(60)")
    await link.stop()
    assert process.returncode is not None
    listed = namespaces()
    assert not any(name in listed for name in names)
    assert not any(os.path.exists(f"/run/netns/{name}") for name in names)


async def test_an_error_inside_the_block_still_cleans_up():
    with pytest.raises(ZeroDivisionError):
        async with lossylink.LossyLink() as link:
            names = list(link.namespaces.values())
            raise ZeroDivisionError
    listed = namespaces()
    assert not any(name in listed for name in names)


async def test_overlapping_inside_blocks_are_refused():
    async with lossylink.LossyLink() as link:
        with link.inside("a"):
            with pytest.raises(RuntimeError, match="must not overlap"):
                with link.inside("b"):
                    pass


def test_an_exiting_process_removes_its_links():
    """The atexit hook: a process that never calls stop() leaves nothing behind."""
    code = ("import asyncio; from chatlib import lossylink\n"
            "async def main():\n"
            "    link = await lossylink.LossyLink().start()\n"
            "    print(*link.namespaces.values(), flush=True)\n"
            "asyncio.run(main())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    names = done.stdout.split()
    assert len(names) == 2
    listed = namespaces()
    assert not any(name in listed for name in names)


async def test_start_removes_namespaces_of_killed_processes():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=30)
    stale = f"chatlib-lossy-{int(gone.stdout)}-0-a"  # as a SIGKILLed process leaves it
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        async with lossylink.LossyLink():
            pass
        assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=10)


@pytest.mark.parametrize("chat", [False, True], ids=["tickers", "chat"])
def test_the_head_of_line_bench_runs_and_writes_its_figures(tmp_path, chat):
    """bench/hol.py, shortened: every case measured on both paths, every message counted."""
    output = tmp_path / "hol.json"
    bench = os.path.join(os.path.dirname(__file__), "..", "bench", "hol.py")
    done = subprocess.run([sys.executable, bench, "--messages", "10", "--gap", "0.01",
                           "--delay", "0.005", "--loss", "2", "--repeats", "1",
                           "--output", str(output), *(["--chat"] if chat else [])],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    cases = {"chat-ws", "chat-wt"} if chat else {"ws", "quic-one", "quic-many"}
    assert {(run["path"], case) for run in result["runs"] for case in run["cases"]} == {
        (path, case) for path in ("real", "model") for case in cases}
    assert all(set(figures) == {"p50", "p95", "p99", "max", "late"}
               for run in result["runs"] for figures in run["cases"].values())
    assert "| 2% | real |" in done.stdout  # the Markdown table
