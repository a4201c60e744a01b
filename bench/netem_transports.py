"""What each transport costs on a real network: the same measurements at several RTTs.

    .venv/bin/python bench/netem_transports.py                 # ~2 min
    .venv/bin/python bench/netem_transports.py --rtt 0,100 --samples 10

For each condition (RTT 0, 50, 100 ms, and 100 ms with +/- 10 ms of jitter per direction) it
starts ``python -m chatlib netem`` in front of one ``python -m chatlib serve`` (two processes,
rate limits raised) and measures, from this process:

* **first message**: a fresh client of each transport, through the proxy, until it holds the
  one message in the history: the round trips a connection costs before anything arrives
  (TCP handshake, then the request; WebSocket: handshake, upgrade, hello -> history). The
  SSE figure also includes building the httpx client (~30 ms: see the RTT 0 column);
* **short polling** (1 s interval): mean delivery latency of messages posted (directly, not
  through the proxy) at random moments: about interval/2 plus the response's trip;
* **long polling under a burst**: 20 messages 10 ms apart; each message's delivery latency
  (those posted while a poll is on its way back wait for the next poll: up to 1.5 RTT);
* **WebSocket and SSE**: delivery latency of single messages (one way: about RTT/2).

Prints medians (and max for the burst) in ms. Figures for the chapters' "loopback vs WAN"
tables; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import httpx
from netem_overhead import free_port, start, stop  # one way to run a chatlib process

from chatlib import LongPollClient, PollingClient, SSEClient, WebSocketClient

CLIENTS = {"poll": PollingClient, "longpoll": LongPollClient, "sse": SSEClient,
           "ws": WebSocketClient}


class Bench:
    def __init__(self, server_url: str, proxy_url: str, samples: int) -> None:
        self.server_url, self.proxy_url, self.samples = server_url, proxy_url, samples
        self.http = httpx.AsyncClient()
        self.n = 0

    async def post(self, text: str) -> float:
        sent = time.perf_counter()
        response = await self.http.post(self.server_url + "api/messages",
                                         json={"user": "bench", "text": text})
        response.raise_for_status()
        return sent

    async def last_id(self) -> int:
        response = await self.http.get(self.server_url + "api/messages?after=0")
        return response.json()["last_id"]

    async def first_message(self, transport: str) -> float:
        after = await self.last_id()
        await self.post("history")
        client = CLIENTS[transport](self.proxy_url, f"first-{transport}", after=after)
        started = time.perf_counter()
        try:
            await client.connect()
            if transport in ("poll", "longpoll"):
                started = time.perf_counter()  # connect() only built the HTTP client
            await client.receive(timeout=10)
            return time.perf_counter() - started
        finally:
            await client.close()

    async def latencies(self, transport: str, **options) -> list[float]:
        """Single messages posted at random moments; one-way delivery latency each."""
        client = CLIENTS[transport](self.proxy_url, f"rx-{transport}",
                                    after=await self.last_id(), **options)
        results = []
        try:
            await client.connect()
            for i in range(self.samples):
                await asyncio.sleep(random.uniform(0.05, 0.6))
                sent = await self.post(f"{transport} {i}")
                message = await client.receive(timeout=10)
                assert message.text == f"{transport} {i}", message
                results.append(time.perf_counter() - sent)
        finally:
            await client.close()
        return results

    async def burst(self) -> list[float]:
        """20 messages, 10 ms apart, to a long-polling client: each one's latency."""
        client = LongPollClient(self.proxy_url, "rx-burst", after=await self.last_id())
        arrivals: dict[str, float] = {}

        async def collect() -> None:
            for _ in range(20):
                message = await client.receive(timeout=20)
                arrivals[message.text] = time.perf_counter()

        try:
            await client.connect()
            collecting = asyncio.ensure_future(collect())
            await asyncio.sleep(0.3)  # its first poll (no wait) is done, a long poll waits
            sent = {}
            for i in range(20):
                sent[f"burst {i}"] = await self.post(f"burst {i}")
                await asyncio.sleep(0.01)
            await asyncio.wait_for(collecting, 20)
        finally:
            await client.close()
        return [arrivals[text] - t for text, t in sent.items()]


async def measure(server_url: str, proxy_url: str, samples: int) -> dict:
    bench = Bench(server_url, proxy_url, samples)
    row = {}
    try:
        for transport in ("poll", "longpoll", "sse", "ws"):
            firsts = [await bench.first_message(transport) for _ in range(5)]
            row[f"first {transport}"] = statistics.median(firsts)
        row["poll 1 s (mean)"] = statistics.mean(await bench.latencies("poll", interval=1.0))
        row["sse"] = statistics.median(await bench.latencies("sse"))
        row["ws"] = statistics.median(await bench.latencies("ws"))
        burst = await bench.burst()
        row["longpoll burst p50"] = statistics.median(burst)
        row["longpoll burst max"] = max(burst)
    finally:
        await bench.http.aclose()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt", default="0,50,100,100j",
                        help="RTTs in ms, comma-separated; a trailing j adds +/-10 ms jitter")
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    server_port = free_port()
    server = start(["serve", "--port", str(server_port), "--rate", "10000", "--burst", "10000"],
                   "serving on")
    table = {}
    try:
        for spec in args.rtt.split(","):
            jitter = spec.endswith("j")
            rtt = float(spec.rstrip("j"))
            port = free_port()
            proxy = start(["netem", "--listen", str(port), "--target",
                           f"127.0.0.1:{server_port}", "--delay", f"{rtt / 2}ms",
                           "--jitter", "10ms" if jitter else "0ms"], "netem:")
            try:
                label = f"RTT {rtt:g} ms" + (" ±10 ms jitter" if jitter else "")
                table[label] = asyncio.run(measure(f"http://127.0.0.1:{server_port}/",
                                                   f"http://127.0.0.1:{port}/", args.samples))
                print(label, {k: round(v * 1000, 1) for k, v in table[label].items()},
                      flush=True)
            finally:
                stop(proxy)
    finally:
        stop(server)
    keys = list(next(iter(table.values())))
    print("\n| ms | " + " | ".join(table) + " |")
    print("|---|" + "---:|" * len(table))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{row[key] * 1000:.1f}" for row in table.values())
              + " |")


if __name__ == "__main__":
    main()
