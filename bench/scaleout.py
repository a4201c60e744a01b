"""Scale-out benchmark: one chat on several processes through Redis vs one process in memory.

    .venv/bin/python bench/scaleout.py            # 3 reps of everything, ~3 min on 2 cores
    .venv/bin/python bench/scaleout.py --reps 1 -n 300

Configurations (each a fresh set of ``python -m chatlib serve`` processes, and a fresh
redis-server where used; runs alternate A B C A B C ..., medians reported):

* ``memory 1x900``: one process, MemoryLog, 900 WebSocket clients (today's path);
* ``redis 1x900``: one process, RedisLog, 900 clients: the Redis path's own cost;
* ``redis 3x300``: three processes on one Redis, 300 clients each (the sender on process 0).

The load runs in this process (pinned to the last CPU; servers and Redis to the others when
there are 2+ CPUs). Client 0 sends; every client must receive every message. Two phases:

* ``closed``: message i+1 goes out when every client has message i: unloaded latency,
  p50/p99 for the sender's own process and for the other processes (the extra hop);
* ``paced``: M messages at a fixed rate (10/s), the same arrival pattern for every
  configuration: server CPU per delivery = CPU time of all chat processes (utime+stime
  from /proc) during the phase / deliveries;
* ``burst``: M messages back to back: deliveries/s and messages/s through Redis (and CPU
  per delivery, lower where a burst lets writers send several frames per wake-up). Redis's
  own CPU is reported apart.

Shared nickname for receivers (``load``), as in bench/fanout.py: N distinct nicknames would
add the presence broadcasts' cost, measured there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chatlib.cluster import ChatProcess, RedisProcess, free_port  # noqa: E402

PAD = "x" * 40
RATE = ("--rate", "1000000", "--burst", "1000000", "--admit-rate", "0")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(len(ordered) * p / 100 + 0.999999) - 1))]


class ServerProcess(ChatProcess):
    """``chatlib serve`` with or without Redis."""

    def command(self) -> list[str]:
        profile = os.environ.get("SCALEOUT_PROFILE")  # a directory: cProfile each server
        python = [sys.executable] + (["-m", "cProfile", "-o", f"{profile}/{self.port}.prof"]
                                     if profile else [])
        base = [*python, "-m", "chatlib", "serve", "--port", str(self.port), *RATE]
        return base + (["--redis", self.redis_url] if self.redis_url else [])


def pin(pid: int, cpus: set[int]) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid, cpus)


async def run_once(kind: str, processes: int, n: int, m_closed: int, m_burst: int,
                   m_paced: int, rate: float) -> dict:
    ncpu = os.cpu_count() or 1
    load_cpu, server_cpus = {ncpu - 1}, set(range(max(1, ncpu - 1)))
    pin(0, load_cpu)
    tmp = Path(tempfile.mkdtemp(prefix="scaleout-"))
    redis = RedisProcess(tmp / "redis") if kind == "redis" else None
    if redis:
        await redis.start()
        pin(redis.process.pid, server_cpus)
    servers = [ServerProcess(redis.url if redis else "", free_port()) for _ in range(processes)]
    for server in servers:
        await server.start()
        pin(server.process.pid, server_cpus)
    try:
        return await load(servers, redis, n, m_closed, m_burst, m_paced, rate)
    finally:
        for server in servers:
            await server.stop()
        if redis:
            await redis.stop()


async def load(servers, redis, n: int, m_closed: int, m_burst: int, m_paced: int,
               rate: float) -> dict:
    per = n // len(servers)
    sockets, home = [], []
    for i in range(n):
        s = min(i // per, len(servers) - 1)
        ws = await connect(f"ws://127.0.0.1:{servers[s].port}/ws", compression=None,
                           max_queue=None, ping_interval=None, open_timeout=30)
        await ws.send(json.dumps({"type": "hello", "user": "sender" if i == 0 else "load"}))
        sockets.append(ws)
        home.append(s)
    seen = [0] * n          # highest "seq" each client got
    lat: list[list[float]] = [[] for _ in range(n)]
    progress = asyncio.Event()
    record = {"on": False}

    async def reader(i: int) -> None:
        async for raw in sockets[i]:
            data = json.loads(raw)
            if data.get("type") != "message":
                continue
            _, seq, sent_ns, _pad = data["text"].split(" ", 3)
            seen[i] = max(seen[i], int(seq))
            if record["on"]:
                lat[i].append((time.monotonic_ns() - int(sent_ns)) / 1e6)
            progress.set()

    readers = [asyncio.create_task(reader(i)) for i in range(n)]
    seq = 0

    async def send() -> None:
        nonlocal seq
        seq += 1
        await sockets[0].send(json.dumps({"type": "message",
                                          "text": f"m {seq} {time.monotonic_ns()} {PAD}"}))

    async def everyone_has(target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while min(seen) < target:  # bounded by the deadline
            progress.clear()
            if time.monotonic() > deadline:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), 0.5)
        return True

    try:
        for _ in range(30):  # barrier: until every client got a message sent after it joined
            await send()
            if await everyone_has(seq, 2.0):
                break
        else:
            raise RuntimeError("clients never all caught up")
        # closed loop: unloaded latency
        record["on"] = True
        for _ in range(m_closed):
            await send()
            if not await everyone_has(seq, 30):
                raise RuntimeError("closed loop: a message did not reach everyone")
        record["on"] = False
        same = [v for i in range(n) if home[i] == 0 for v in lat[i]]
        other = [v for i in range(n) if home[i] != 0 for v in lat[i]]
        pids = [s.process.pid for s in servers]
        # paced: the same arrival pattern for every configuration -> CPU per delivery
        cpu0 = sum(cpu_seconds(p) for p in pids)
        first = seq + 1
        for _ in range(m_paced):
            await send()
            await asyncio.sleep(1 / rate)
        if not await everyone_has(seq, 120):
            raise RuntimeError("paced: a message did not reach everyone")
        paced_cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / ((seq - first + 1) * n)
        # burst: as fast as the sender can: throughput
        cpu0 = sum(cpu_seconds(p) for p in pids)
        rcpu0 = cpu_seconds(redis.process.pid) if redis else 0.0
        t0 = time.monotonic()
        first = seq + 1
        for _ in range(m_burst):
            await send()
        if not await everyone_has(seq, 120):
            behind = [(i, seen[i], sockets[i].close_code) for i in range(n) if seen[i] < seq]
            raise RuntimeError(f"burst: {len(behind)} clients behind (id, seen, close code):"
                               f" {behind[:5]}, sent {seq}")
        elapsed = time.monotonic() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        rcpu = (cpu_seconds(redis.process.pid) - rcpu0) if redis else 0.0
        deliveries = (seq - first + 1) * n
        return {
            "same_p50": pct(same, 50), "same_p99": pct(same, 99),
            "other_p50": pct(other, 50) if other else None,
            "other_p99": pct(other, 99) if other else None,
            "deliveries_per_s": deliveries / elapsed,
            "messages_per_s": m_burst / elapsed,
            "cpu_us_per_delivery": paced_cpu * 1e6,
            "burst_cpu_us_per_delivery": cpu / deliveries * 1e6,
            "redis_cpu_us_per_message": rcpu / m_burst * 1e6 if redis else None,
        }
    finally:
        for task in readers:
            task.cancel()
        for ws in sockets:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


async def main(args: argparse.Namespace) -> None:
    n = args.n
    configs = [(f"memory 1x{n}", "memory", 1), (f"redis 1x{n}", "redis", 1),
               (f"redis 3x{n // 3}", "redis", 3)]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    if args.only:
        configs = [c for c in configs if c[0].startswith(args.only)]
    for rep in range(args.reps):
        for name, kind, processes in configs:
            result = await run_once(kind, processes, args.n, args.closed, args.burst,
                                    args.paced, args.rate)
            results[name].append(result)
            print(f"rep {rep + 1} {name}: " + json.dumps({k: round(v, 2) if v else v
                                                          for k, v in result.items()}),
                  flush=True)
    base = median([r["cpu_us_per_delivery"] for r in results[configs[0][0]]])
    print(f"\nN={args.n} WebSocket clients, closed loop M={args.closed}, burst M={args.burst}, "
          f"median of {args.reps}; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| configuration | p50 ms same process | p99 ms same | p50 ms other processes "
          "| p99 ms other | deliveries/s (burst) | messages/s | server CPU µs/delivery "
          "| × memory | burst CPU µs/delivery | Redis CPU µs/message |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, _, _ in configs:
        rs = results[name]
        cpu = median([r["cpu_us_per_delivery"] for r in rs])
        print(f"| {name} | {fmt(median([r['same_p50'] for r in rs]))} "
              f"| {fmt(median([r['same_p99'] for r in rs]))} "
              f"| {fmt(median([r['other_p50'] for r in rs]))} "
              f"| {fmt(median([r['other_p99'] for r in rs]))} "
              f"| {fmt(median([r['deliveries_per_s'] for r in rs]), ',.0f')} "
              f"| {fmt(median([r['messages_per_s'] for r in rs]), ',.0f')} "
              f"| {fmt(cpu)} | {fmt(cpu / base)} "
              f"| {fmt(median([r['burst_cpu_us_per_delivery'] for r in rs]))} "
              f"| {fmt(median([r['redis_cpu_us_per_message'] for r in rs]), '.1f')} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=900, help="WebSocket clients in all")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--closed", type=int, default=50, help="closed-loop messages")
    parser.add_argument("--burst", type=int, default=200, help="burst messages")
    parser.add_argument("--paced", type=int, default=100, help="paced messages")
    parser.add_argument("--rate", type=float, default=10.0, help="paced messages per second")
    parser.add_argument("--only", help="run only the configurations whose name starts so")
    asyncio.run(main(parser.parse_args()))
