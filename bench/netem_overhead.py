"""What does chatlib.netem itself add to a round trip, at zero delay?

    .venv/bin/python bench/netem_overhead.py            # ~20 s
    .venv/bin/python bench/netem_overhead.py --rounds 20 --per-round 200

Starts ``python -m chatlib serve`` and ``python -m chatlib netem --delay 0`` in front of it
(two processes, as a learner would run them), then, from this process, measures round trips
to the server directly and through the proxy, alternating in rounds (direct, proxy, proxy,
direct, ...) so that both see the same machine load:

* **WebSocket ping**: a PING frame answered with a PONG by the server's WebSocket layer
  (websockets), the smallest round trip the server can do;
* **HTTP GET** ``/api/presence`` on a kept-alive connection (raw asyncio streams, so the client
  library's own cost stays small).

Prints the medians, the median of the per-round differences (proxy - direct) and the p90.
The issue's target is < 0.2 ms added per round trip at zero delay.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], ready: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "chatlib", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if ready not in line:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r} {proc.stderr.read()}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def ws_rtts(port: int, n: int) -> list[float]:
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", compression=None) as ws:
        await ws.send('{"type": "hello", "user": "bench", "after": 0}')
        await (await ws.ping())
        rtts = []
        for _ in range(n):
            started = time.perf_counter()
            await (await ws.ping())
            rtts.append(time.perf_counter() - started)
        return rtts


async def http_rtts(port: int, n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /api/presence HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    rtts = []
    try:
        for i in range(n + 1):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if i:  # the first one warms up
                rtts.append(time.perf_counter() - started)
    finally:
        writer.close()
    return rtts


async def measure(direct: int, proxied: int, rounds: int, per_round: int) -> None:
    results = {kind: {"direct": [], "netem": [], "diff": []} for kind in ("ws ping", "http get")}
    for r in range(rounds):
        order = [("direct", direct), ("netem", proxied)]
        if r % 2:
            order.reverse()
        for kind, fn in (("ws ping", ws_rtts), ("http get", http_rtts)):
            medians = {}
            for name, port in order:
                rtts = await fn(port, per_round)
                results[kind][name] += rtts
                medians[name] = statistics.median(rtts)
            results[kind]["diff"].append(medians["netem"] - medians["direct"])
    print(f"{'round trip':10} {'direct p50':>11} {'netem p50':>10} {'added p50':>10} "
          f"{'direct p90':>11} {'netem p90':>10}   (ms; {rounds} rounds x {per_round})")
    for kind, r in results.items():
        p90 = {k: statistics.quantiles(r[k], n=10)[-1] for k in ("direct", "netem")}
        print(f"{kind:10} {statistics.median(r['direct']) * 1e3:11.3f} "
              f"{statistics.median(r['netem']) * 1e3:10.3f} "
              f"{statistics.median(r['diff']) * 1e3:10.3f} "
              f"{p90['direct'] * 1e3:11.3f} {p90['netem'] * 1e3:10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    server_port, proxy_port = free_port(), free_port()
    server = start(["serve", "--port", str(server_port)], "serving on")
    try:
        proxy = start(["netem", "--listen", str(proxy_port),
                       "--target", f"127.0.0.1:{server_port}"], "netem:")
        try:
            asyncio.run(measure(server_port, proxy_port, args.rounds, args.per_round))
        finally:
            stop(proxy)
    finally:
        stop(server)


if __name__ == "__main__":
    main()
