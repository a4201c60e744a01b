"""Capacity: the most clients for which 95 % of broadcasts reach every client within 500 ms.

``python bench/capacity.py [--setups one,three] [--start 250] [--max 16000] [--broadcasts 20]
[--json out.json] [--add-to saved.json]`` searches, for one chat server process and for
three behind nginx on Redis (:data:`THREE`), the largest N (to within ``--resolution``,
10 %) that meets the criterion, and prints (and saves) every step. ``capacity.measure(n)``
runs one step from a notebook (chapter 12).

One step (one process): a :class:`chatlib.ChatServer` in this process (127.0.0.1, an
ephemeral port, per-address budgets lifted: every client is 127.0.0.1, see bench/storm.py),
and N WebSocket clients in another (``capacity.py clients``). Once all are connected and a
first message reached all of them, the server posts ``broadcasts`` messages, one every
``interval`` s (``hub.post``: the server's own sender, no client's upload in the way; with
three processes, ``POST /api/messages`` through nginx, timed from before the request). The
clients' process keeps, per message id, how many clients got it and when the last one did
(``time.monotonic``, one clock for both processes on Linux). A broadcast *reached all within
500 ms* when all N got it and the last one no later than 500 ms after it was posted.

Per step: ``within_share`` (the share of broadcasts that did), ``p50_all_ms`` / ``p95_all_ms``
(time until the last client had it; ``to_all_ms``: each broadcast's, None if not every
client got it), ``server_cpu_s`` and ``clients_cpu_share`` (the clients'
process's CPU time over the step's wall time: near 1.0, the load generator was the limit,
and the step measures it, not the server).

The search doubles N from ``--start`` while the criterion holds, then bisects between the
last N that met it and the first that did not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import storm  # noqa: E402  (bench/storm.py: Child, bench_limits, message_id, percentile)

WITHIN = 0.5
"""Seconds within which a broadcast must reach every client."""
SHARE = 0.95
"""The share of broadcasts that must."""
INTERVAL = 0.2
"""Seconds between broadcasts."""


async def run_clients(a: argparse.Namespace) -> None:
    """The clients' process: connect N, then report per message id (count, last arrival)."""
    url = f"ws://127.0.0.1:{a.port}/ws"
    seen: dict[int, list] = {}  # id -> [clients that got it, monotonic time of the last]
    connected = 0
    all_in = asyncio.Event()
    reached: dict[int, asyncio.Event] = {}

    async def client(i: int) -> None:
        nonlocal connected
        for _ in range(20):  # a few tries (a full listen backlog refuses), bounded
            try:
                ws = await connect(url, ping_interval=None, compression=None, open_timeout=60)
                break
            except (OSError, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.2)
        else:
            return
        async with ws:
            await ws.send(json.dumps({"type": "hello", "user": f"cap{i}", "after": a.after}))
            connected += 1
            if connected == a.n:
                all_in.set()
            try:
                async for raw in ws:
                    if raw.startswith('{"type":"message"'):
                        now = time.monotonic()
                        entry = seen.setdefault(storm.message_id(raw), [0, 0.0])
                        entry[0] += 1
                        entry[1] = now
                        if entry[0] == a.n:
                            event = reached.get(storm.message_id(raw))
                            if event is not None:
                                event.set()
            except ConnectionClosed:
                pass

    commands = await storm.read_commands()
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(a.n):  # paced: client i starts at start + i * spacing
        await asyncio.sleep(max(0.0, start + i * a.spacing - loop.time()))
        tasks.append(asyncio.ensure_future(client(i)))
    await asyncio.wait_for(all_in.wait(), a.timeout)
    print("connected", flush=True)
    cpu0 = wall0 = 0.0
    while True:  # bounded: ends at "final" or EOF
        words = (await commands.readline()).decode().split()
        if not words:
            break
        last = int(words[1])
        event = reached.setdefault(last, asyncio.Event())
        if seen.get(last, [0])[0] >= a.n:
            event.set()
        try:
            await asyncio.wait_for(event.wait(), a.timeout)
        except TimeoutError:
            pass  # the report says who is missing
        if words[0] == "sync":
            cpu0, wall0 = time.process_time(), time.monotonic()
            print("ready", flush=True)
        else:
            share = (time.process_time() - cpu0) / max(1e-9, time.monotonic() - wall0)
            print(json.dumps(dict(seen={k: v for k, v in seen.items() if k > int(words[2])},
                                  clients_cpu_share=share)), flush=True)
            break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


ONE, THREE = "one process", "three processes behind nginx on Redis"
"""The setups: a ChatServer in this process; ``chatlib.cluster.Cluster(3)``."""


class OneProcess:
    """A ChatServer in this process; broadcasts posted with ``hub.post`` (its own sender)."""

    async def start(self) -> OneProcess:
        import chatlib

        self.log = chatlib.MemoryLog()
        self.server = await chatlib.ChatServer(port=0, log=self.log,
                                               limits=storm.bench_limits(),
                                               ws_ping_interval=None).start()
        self.port = self.server.port
        return self

    async def last_id(self) -> int:
        return await self.log.last_id()

    async def post(self, text: str) -> int:
        message, _ = await self.server.hub.post("bench", text)
        return message.id

    def cpu(self) -> float:
        return time.process_time()

    async def stop(self) -> None:
        await self.server.stop()


class ThreeProcesses:
    """``chatlib.cluster.Cluster(3)``: Redis, three ``chatlib serve --redis`` and nginx in
    front (deploy/nginx.conf, its worker allowed 16,384 connections: each client holds two,
    and the deploy's 4,096 would be the limit). Broadcasts are posted through nginx
    (``POST /api/messages``: one process stores it in Redis, all three fan it out); the
    servers' CPU is all five processes' (``/proc``)."""

    async def start(self) -> ThreeProcesses:
        import httpx

        from chatlib.cluster import Cluster

        self.cluster = Cluster(3)
        nginx = self.cluster.nginx
        config = nginx.config
        nginx.config = lambda: config().replace("worker_connections 4096;",
                                                "worker_connections 16384;")
        await self.cluster.start()
        self.port = nginx.port
        self.http = httpx.AsyncClient(base_url=self.cluster.url, timeout=30)
        return self

    async def last_id(self) -> int:
        return await self.post("start")

    async def post(self, text: str) -> int:
        answer = await self.http.post("api/messages", json={"user": "bench", "text": text})
        answer.raise_for_status()
        return answer.json()["id"]

    def cpu(self) -> float:
        pids = [part.process.pid for part in
                (self.cluster.redis, *self.cluster.servers, self.cluster.nginx)]
        with open(f"/proc/{self.cluster.nginx.process.pid}/task/"
                  f"{self.cluster.nginx.process.pid}/children") as f:
            pids += [int(pid) for pid in f.read().split()]  # nginx's worker
        total = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> None:
        await self.http.aclose()
        await self.cluster.stop()


SETUPS = {ONE: OneProcess, THREE: ThreeProcesses}


async def measure(n: int, broadcasts: int = 20, *, interval: float = INTERVAL,
                  timeout: float = 120.0, spacing: float = 0.001, setup: str = ONE) -> dict:
    """One step: N clients, ``broadcasts`` messages; returns the step's figures."""
    server = await SETUPS[setup]().start()
    clients = None
    try:
        clients = await storm.Child.start_script(
            os.path.abspath(__file__), "clients", "--port", str(server.port), "-n", str(n),
            "--after", str(await server.last_id()), "--timeout", str(timeout),
            "--spacing", str(spacing))
        assert await clients.expect(timeout + n * spacing) == "connected"
        sync = await server.post("sync")
        clients.send(f"sync {sync}")
        assert await clients.expect(timeout) == "ready"
        loop = asyncio.get_running_loop()
        posted: dict[int, float] = {}
        cpu0, start = server.cpu(), loop.time()
        for k in range(broadcasts):
            await asyncio.sleep(max(0.0, start + k * interval - loop.time()))  # the schedule
            sent = time.monotonic()
            message_id = await server.post(f"broadcast {k + 1} of {broadcasts}")
            posted[message_id] = sent
        clients.send(f"final {message_id} {sync}")
        report = json.loads(await clients.expect(timeout + 10))
        server_cpu = server.cpu() - cpu0
    finally:
        if clients is not None:
            await clients.stop()
        await server.stop()
    to_all = []
    within = 0
    for message_id, t_posted in posted.items():
        count, last = report["seen"].get(str(message_id), [0, 0.0])
        if count == n:
            to_all.append(last - t_posted)
            within += last - t_posted <= WITHIN
        else:
            to_all.append(float("inf"))  # not every client got it
    return dict(n=n, broadcasts=broadcasts, interval=interval,
                within_share=within / broadcasts,
                p50_all_ms=storm.percentile(to_all, 50) * 1000,
                p95_all_ms=storm.percentile(to_all, 95) * 1000,
                incomplete=sum(t == float("inf") for t in to_all),
                to_all_ms=[round(t * 1000, 1) if t < float("inf") else None for t in to_all],
                server_cpu_s=server_cpu, clients_cpu_share=report["clients_cpu_share"])


def readme_table(results: dict, setup: str = "one process") -> str:
    """bench/README.md's table of a saved search, steps by size (tests/test_bench_capacity.py
    checks that the README shows the saved JSON's figures)."""
    rows = ["| clients | broadcasts reaching all within 500 ms | p50 / p95 time to all (ms) "
            "| server CPU (s) | clients' process CPU share |", "|---:|---:|---:|---:|---:|"]
    for step in sorted(results["setups"][setup]["steps"], key=lambda s: s["n"]):
        rows.append(f"| {step['n']} | {step['within_share']:.0%} | {step['p50_all_ms']:.0f} / "
                    f"{step['p95_all_ms']:.0f} | {step['server_cpu_s']:.2f} "
                    f"| {step['clients_cpu_share']:.2f} |")
    return "\n".join(rows)


def meets(step: dict) -> bool:
    return step["within_share"] >= SHARE


async def search(start: int, most: int, broadcasts: int, resolution: float,
                 setup: str = ONE) -> dict:
    """Double from ``start`` while the criterion holds, then bisect; every step is kept."""
    steps = []

    async def step(n: int) -> bool:
        result = await measure(n, broadcasts, setup=setup)
        print(json.dumps(result), file=sys.stderr, flush=True)
        steps.append(result)
        return meets(result)

    good, bad = 0, None
    n = start
    while n <= most:  # bounded: n doubles
        if not await step(n):
            bad = n
            break
        good, n = n, n * 2
    while bad is not None and good and bad - good > resolution * good:  # bounded: halves
        middle = (good + bad) // 2
        if await step(middle):
            good = middle
        else:
            bad = middle
    return dict(capacity=good, first_failing=bad, steps=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    storm.common_arguments(parser)
    parser.add_argument("role", nargs="?", default="search", choices=("search", "clients"))
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--start", type=int, default=250)
    parser.add_argument("--max", type=int, default=16000)
    parser.add_argument("--broadcasts", type=int, default=20)
    parser.add_argument("--resolution", type=float, default=0.1)
    parser.add_argument("--setups", type=lambda s: s.split(","), default=["one", "three"],
                        help="one (a process), three (behind nginx on Redis), or both")
    parser.add_argument("--add-to", help="a saved results JSON: add these setups to it")
    a = parser.parse_args()
    if a.role == "clients":
        asyncio.run(run_clients(a))
        return
    results = dict(within_s=WITHIN, share=SHARE, interval_s=INTERVAL, broadcasts=a.broadcasts,
                   cores=os.cpu_count(), setups={})
    if a.add_to:
        with open(a.add_to) as f:
            results = json.load(f)
        assert results["broadcasts"] == a.broadcasts, "a search with other broadcasts"
    for name in a.setups:
        setup = {"one": ONE, "three": THREE}[name]
        results["setups"][setup] = asyncio.run(search(a.start, a.max, a.broadcasts,
                                                      a.resolution, setup))
        results["setups"][setup]["load_average"] = os.getloadavg()[0]
    print(json.dumps({k: v["capacity"] for k, v in results["setups"].items()}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
