"""Head-of-line blocking under loss: real packet loss (chatlib.lossylink) against netem's model.

    .venv/bin/python bench/hol.py                      # root; ~8 min
    .venv/bin/python bench/hol.py --loss 0,2 --repeats 3 --gap 0.02

A server pushes ``--messages`` numbered, time-stamped messages, one every ``--gap`` seconds,
to one client, three ways at the same time (the chapter 11 setup):

* **ws**: one WebSocket (``websockets``, TCP): one byte stream;
* **quic-one**: one QUIC stream (aioquic): one byte stream, QUIC's own loss recovery;
* **quic-many**: a new unidirectional QUIC stream per message, as a WebTransport page may do.

With ``--chat``, chatlib itself instead: a chat server (``webtransport=True``) posts the
messages (``Hub.post``) and two clients read them, **chat-ws** (``WebSocketClient``) and
**chat-wt** (``WebTransportClient``: chatlib puts every message on one stream, so it is
quic-one with the chat protocol on top). Write it to another file (``--output``).

Latency is the time from the server's write to the client's read of each message, in ms (one
clock: server and client run in this process). Each loss rate runs on two paths, alternating:

* **real**: a :class:`chatlib.lossylink.LossyLink` (``--delay`` one way, ``loss`` per packet,
  each direction): the servers live in namespace B, the clients in namespace A, and the
  kernel's TCP (fast retransmit, RACK-TLP, RTO) and aioquic recover from real losses;
* **model**: what the chapter uses on loopback: ``chatlib.netem``'s TCP proxy (a lost chunk
  arrives ``retransmit`` late, by default one RTT + 200 ms) for the WebSocket, and its UDP relay
  (real datagram loss) for QUIC.

Each (path, loss) runs ``--repeats`` times with different seeds; the JSON
(``bench/hol-results.json``) holds every run's p50/p95/p99/max and ``late`` (the share of
messages later than one round trip: lost, or held behind a loss), and the same figures for
all repeats' messages pooled. It prints a Markdown table (for bench/README.md): medians over
the repeats, then the pooled p95/p99 and late share. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import ssl
import statistics
import sys
import time
from pathlib import Path

import websockets
from aioquic.asyncio import connect as quic_connect
from aioquic.asyncio import serve as quic_serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived

from chatlib import lossylink, netem
from chatlib.clients import WebSocketClient, WebTransportClient
from chatlib.limits import Limits
from chatlib.server import ChatServer
from chatlib.webtransport import make_certificate

CASES = ("ws", "quic-one", "quic-many")
CHAT_CASES = ("chat-ws", "chat-wt")
PERCENTILES = (50, 95, 99, 100)
RESULTS = Path(__file__).with_name("hol-results.json")
RUN_TIMEOUT = 120.0
"""Seconds one run may take (all its messages, at any loss rate tried here), at most."""


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank p-th percentile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p * len(ordered) / 100)) - 1]


class Ticker(QuicConnectionProtocol):
    """QUIC server: a request "one N GAP" or "many N GAP" on a stream starts N messages."""

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived) and event.end_stream:
            mode, count, gap = event.data.decode().split()
            asyncio.ensure_future(self.tick(event.stream_id, mode, int(count), float(gap)))

    async def tick(self, stream_id: int, mode: str, count: int, gap: float) -> None:
        for i in range(count):
            line = f"{i} {time.perf_counter()!r}\n".encode()
            if mode == "one":  # every message on the request's stream: one byte stream
                self._quic.send_stream_data(stream_id, line)
            else:  # a new unidirectional stream per message
                sid = self._quic.get_next_available_stream_id(is_unidirectional=True)
                self._quic.send_stream_data(sid, line, end_stream=True)
            self.transmit()
            await asyncio.sleep(gap)


class Reader(QuicConnectionProtocol):
    """QUIC client: splits each stream into lines; latency per message number, in ms."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.buffers: dict[int, bytes] = {}
        self.latency: dict[int, float] = {}
        self.expect = 0
        self.done = asyncio.Event()

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            now = time.perf_counter()
            data = self.buffers.pop(event.stream_id, b"") + event.data
            *lines, rest = data.split(b"\n")
            if rest:
                self.buffers[event.stream_id] = rest
            for line in lines:
                number, sent = line.split()
                self.latency[int(number)] = (now - float(sent)) * 1000
            if len(self.latency) >= self.expect:
                self.done.set()


class Servers:
    """A WebSocket ticker (TCP) and a QUIC ticker (UDP) on ``host``, same port number."""

    def __init__(self, messages: int, gap: float) -> None:
        self.messages, self.gap = messages, gap
        self.ws = self.quic = None
        self.port = 0

    async def _ws_ticker(self, ws) -> None:
        await ws.recv()
        for i in range(self.messages):
            await ws.send(f"{i} {time.perf_counter()!r}")
            await asyncio.sleep(self.gap)
        await ws.wait_closed()

    async def start(self, host: str, port: int) -> None:
        certificate = make_certificate()
        config = QuicConfiguration(is_client=False, alpn_protocols=["ticker"])
        config.certificate, config.private_key = certificate.certificate, certificate.private_key
        self.ws = await websockets.serve(self._ws_ticker, host, port, compression=None)
        self.port = self.ws.sockets[0].getsockname()[1]
        self.quic = await quic_serve(host, self.port, configuration=config,
                                     create_protocol=Ticker)

    async def stop(self) -> None:
        if self.quic is not None:
            self.quic.close()
        if self.ws is not None:
            self.ws.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ws.wait_closed(), 5)


async def ws_latencies(host: str, port: int, messages: int) -> list[float]:
    latency: dict[int, float] = {}
    async with websockets.connect(f"ws://{host}:{port}/", compression=None,
                                  open_timeout=30, ping_interval=None) as ws:
        await ws.send("go")
        while len(latency) < messages:  # bounded: each within RUN_TIMEOUT
            number, sent = (await asyncio.wait_for(ws.recv(), RUN_TIMEOUT)).split()
            latency[int(number)] = (time.perf_counter() - float(sent)) * 1000
    return [latency[i] for i in range(messages)]


async def quic_latencies(host: str, port: int, mode: str, messages: int,
                         gap: float) -> list[float]:
    config = QuicConfiguration(is_client=True, alpn_protocols=["ticker"],
                               verify_mode=ssl.CERT_NONE)  # our own test server
    async with quic_connect(host, port, configuration=config, create_protocol=Reader,
                            local_port=0) as reader:
        reader.expect = messages
        stream = reader._quic.get_next_available_stream_id()
        reader._quic.send_stream_data(stream, f"{mode} {messages} {gap}".encode(),
                                      end_stream=True)
        reader.transmit()
        await asyncio.wait_for(reader.done.wait(), RUN_TIMEOUT)
        return [reader.latency[i] for i in range(messages)]


def clients(host: str, port: int, quic_port: int, messages: int, gap: float):
    """The three cases' coroutines, in CASES order."""
    return [ws_latencies(host, port, messages),
            quic_latencies(host, quic_port, "one", messages, gap),
            quic_latencies(host, quic_port, "many", messages, gap)]


async def run_real(args, loss: float, seed: int) -> tuple[dict, dict]:
    async with lossylink.LossyLink(delay=args.delay, loss=loss, seed=seed) as link:
        servers = Servers(args.messages, args.gap)
        with link.inside("b"):
            await servers.start(link.b_host, 0)
        try:
            with link.inside("a"):  # the clients' sockets are made in A, at their connect
                results = await asyncio.gather(*clients(
                    link.b_host, servers.port, servers.port, args.messages, args.gap))
        finally:
            await servers.stop()
        stats = link.stats
        return dict(zip(CASES, results, strict=True)), {
            "packets": stats.packets, "dropped": stats.dropped,
            "dropped_share": round(stats.dropped / max(1, stats.packets + stats.dropped), 4)}


async def run_model(args, loss: float, seed: int) -> tuple[dict, dict]:
    servers = Servers(args.messages, args.gap)
    await servers.start("127.0.0.1", 0)
    options = dict(delay=args.delay, loss=loss, seed=seed)
    proxy = await netem.start(("127.0.0.1", servers.port), retransmit=args.retransmit,
                              **options)
    relay = await netem.start_udp(("127.0.0.1", servers.port), **options)
    try:
        results = await asyncio.gather(*clients(
            "127.0.0.1", proxy.port, relay.port, args.messages, args.gap))
    finally:
        await relay.stop()
        await proxy.stop()
        await servers.stop()
    return dict(zip(CASES, results, strict=True)), {"tcp_chunks_late": proxy.stats.losses,
                                       "udp_dropped": relay.stats.dropped}


async def chat_latencies(server, ws_options: dict, wt_options: dict, messages: int,
                         gap: float, namespace=contextlib.nullcontext) -> list[list[float]]:
    """chatlib itself: the server (in this process) posts ``messages`` time-stamped messages,
    one every ``gap`` s; a WebSocketClient and a WebTransportClient (one stream) read them.
    Latency from the post to each client's ``receive()``, in ms, per client."""
    with namespace():
        readers = [WebSocketClient(user="ws", **ws_options),
                   WebTransportClient(user="wt", **wt_options)]
        await asyncio.gather(*(asyncio.wait_for(r.connect(), 30) for r in readers))

    async def read(reader) -> list[float]:
        latency: dict[int, float] = {}
        while len(latency) < messages:  # bounded: each receive within RUN_TIMEOUT
            message = await reader.receive(timeout=RUN_TIMEOUT)
            if message.user == "ticker":
                number, sent = message.text.split()
                latency[int(number)] = (time.perf_counter() - float(sent)) * 1000
        return [latency[i] for i in range(messages)]

    async def post() -> None:
        for i in range(messages):
            await server.hub.post("ticker", f"{i} {time.perf_counter()!r}")
            await asyncio.sleep(gap)

    try:
        *results, _ = await asyncio.gather(*(read(r) for r in readers), post())
        return results
    finally:
        for reader in readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.close(), 10)


def chat_server(host: str) -> ChatServer:
    return ChatServer(host, 0, webtransport=True, limits=Limits(rate=1000, burst=1000))


async def run_chat_real(args, loss: float, seed: int) -> tuple[dict, dict]:
    async with lossylink.LossyLink(delay=args.delay, loss=loss, seed=seed) as link:
        server = chat_server(link.b_host)
        with link.inside("b"):
            await server.start()
        try:
            options = {"url": server.url}
            results = await chat_latencies(server, options, options, args.messages, args.gap,
                                           namespace=lambda: link.inside("a"))
        finally:
            await server.stop()
        stats = link.stats
        return dict(zip(CHAT_CASES, results, strict=True)), {
            "packets": stats.packets, "dropped": stats.dropped}


async def run_chat_model(args, loss: float, seed: int) -> tuple[dict, dict]:
    server = chat_server("127.0.0.1")
    await server.start()
    options = dict(delay=args.delay, loss=loss, seed=seed)
    proxy = await netem.start(server, retransmit=args.retransmit, **options)
    relay = await netem.start_udp(server, **options)
    try:
        results = await chat_latencies(
            server, {"url": proxy.url},
            {"url": server.url, "wt_url": f"https://127.0.0.1:{relay.port}/wt",
             "cert_hash": server.wt_hash}, args.messages, args.gap)
    finally:
        await relay.stop()
        await proxy.stop()
        await server.stop()
    return dict(zip(CHAT_CASES, results, strict=True)), {
        "tcp_chunks_late": proxy.stats.losses, "udp_dropped": relay.stats.dropped}


def summary(latencies: list[float], late_after: float) -> dict[str, float]:
    """Percentiles in ms, and ``late``: the share of messages later than ``late_after`` ms
    (a lost one, or one held behind a loss)."""
    figures = {f"p{p}" if p < 100 else "max": round(percentile(latencies, p), 1)
               for p in PERCENTILES}
    figures["late"] = round(sum(v > late_after for v in latencies) / len(latencies), 4)
    return figures


def table(runs: list[dict], pooled: dict) -> str:
    """Markdown: medians over repeats of each figure, per path, loss and case; then the
    percentiles of all repeats' messages pooled, and the share of late messages."""
    rows = ["| loss | path | case | p50 | p95 | p99 | max | pooled p95 | pooled p99 | late |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["loss"], r["path"]) for r in runs}, key=lambda k: (k[0], k[1] != "real"))
    for loss, path in keys:
        group = [r for r in runs if (r["loss"], r["path"]) == (loss, path)]
        for case in group[0]["cases"]:
            cells = [statistics.median(r["cases"][case][k] for r in group)
                     for k in ("p50", "p95", "p99", "max")]
            everything = pooled[f"{path} {loss:g} {case}"]
            rows.append(f"| {loss:.0%} | {path} | {case} | "
                        + " | ".join(f"{c:.0f}" for c in cells)
                        + f" | {everything['p95']:.0f} | {everything['p99']:.0f}"
                        + f" | {everything['late']:.1%} |")
    return "\n".join(rows)


async def main(args) -> None:
    reason = lossylink.available()
    if reason:
        sys.exit(f"bench/hol.py needs a lossy link: {reason}")
    losses = [float(x) / 100 for x in args.loss.split(",")]
    runs = []
    every: dict[str, list[float]] = {}  # "path loss case" -> all repeats' latencies
    late_after = args.delay * 1000 * 2  # ms: more than a round trip for a one-way trip
    started = time.time()
    for repeat in range(args.repeats):
        for loss in losses:
            paths = ((("real", run_chat_real), ("model", run_chat_model)) if args.chat
                     else (("real", run_real), ("model", run_model)))
            for path, run in paths:
                seed = 1000 * repeat + round(loss * 100)
                latencies, link = await run(args, loss, seed)
                entry = {"loss": loss, "path": path, "repeat": repeat, "seed": seed,
                         "link": link,
                         "cases": {case: summary(values, late_after)
                                   for case, values in latencies.items()}}
                for case, values in latencies.items():
                    every.setdefault(f"{path} {loss:g} {case}", []).extend(values)
                runs.append(entry)
                print(f"repeat {repeat} loss {loss:.0%} {path:5}: " + "  ".join(
                    f"{case} p50/p99 {figures['p50']:.0f}/{figures['p99']:.0f}"
                    for case, figures in entry["cases"].items()), flush=True)
    pooled = {key: summary(values, late_after) for key, values in every.items()}
    result = {
        "method": {"cases": "chat" if args.chat else "tickers", "late_after_ms": late_after,
                   "messages": args.messages, "gap": args.gap,
                   "delay": args.delay,
                   "rtt": 2 * args.delay, "repeats": args.repeats,
                   "retransmit": args.retransmit, "units": "ms",
                   "load": os.getloadavg()[0], "cpus": os.cpu_count(),
                   "python": platform.python_version(), "kernel": platform.release(),
                   "duration_s": round(time.time() - started)},
        "pooled": pooled,
        "runs": runs,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(table(runs, pooled))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", default="0,1,2,5", help="loss rates in %%, comma-separated")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between messages")
    parser.add_argument("--delay", type=float, default=0.05, help="one-way delay, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--retransmit", type=float, default=None,
                        help="netem model: how late a lost chunk arrives (default RTT + 200 ms)")
    parser.add_argument("--chat", action="store_true",
                        help="measure chatlib itself instead (chat-ws, chat-wt): see above")
    parser.add_argument("--output", default=str(RESULTS), help="JSON file ('' for none)")
    asyncio.run(main(parser.parse_args()))
