"""Join storm: N WebSocket clients connecting within one second, each with its own nickname.

``python bench/join_storm.py --port P --server-pid PID [-n 1000] [--spacing-ms 1]
[--seed 5] [--history]`` prints one JSON line of results (bench/fanout.py, section
``join-storm``, runs it against chatlib and the baselines).

``python bench/join_storm.py --kernel --history [--reps 3]`` storms a server in a real
ipykernel instead, as a notebook starts it (``await chatlib.start_server(...)`` in a cell;
bench/classroom.py's kernel harness, the kernel on CPU 0, this process on CPU 1): one JSON
line per storm, a new kernel each. A kernel's collector is the learner's: chatlib leaves it
at Python's defaults there (chatlib.collector is the CLI server's); ``--settle`` has a cell
set it as the CLI server does first, to show what the defaults cost.

1. **Seed.** A client ``seeder`` says hello and sends ``--seed`` messages, waits for each to come
   back, and leaves; so chatlib's log is not empty and every joining client is sent a history
   of ``--seed`` messages (the baselines keep no log and send none).
2. **Storm (paced open loop).** Client i starts connecting at ``t0 + i × spacing`` (1 ms: 1000
   clients in one second), whatever happened to the clients before it: neither all at once nor
   one after the other. Each opens ``ws://127.0.0.1:P/ws`` and sends ``{"type": "hello",
   "user": "load<i+1>", "after": 0}`` (``--users shared``: all ``load``), then reads every
   frame it is sent. Per client:
   ``open`` = connect start → handshake done (101 read); with ``--history``, ``first
   history`` = connect start → the first ``message`` frame (chatlib sends the history after
   ``after`` before anything else: with a seeded log, its first message frame is history);
   presence frames and their bytes (the frames' UTF-8 payload, not counting the 2-4 bytes of
   WebSocket header). A client that fails records why (exception class and text).
3. **Ready.** Once every client is connected (or failed), ``load1`` sends ``sync <k>`` messages
   until every connected client has seen one: the server has registered all of them. With
   ``--history`` (chatlib) the storm then waits for presence to settle: every client has been
   told ``count == N`` and no presence frame came for 3 × 0.25 s (bounded by ``--timeout``).

Server CPU is read from /proc/PID/task/*/schedstat (all threads: Node's too) at t0, when the
last client was launched and at the end; VmRSS is sampled every 20 ms from t0 to the end.
``launch_lag`` (how late connection i started, p99/max) shows whether this process kept the
pace: if it did not, the figures are the load's, not the server's. This process's cyclic
garbage collector is off from the storm to the end (:func:`collector_off`): its full
collections, ~30 ms with 1,000 clients, stopped the launches, and the clients started
late then came in a burst the server's tail was blamed for (bench/README.md, "Join storm:
first history p99").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import time
from collections import Counter

from load_client import percentile, proc_cpu, status_kb, system_busy_s
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


class Client:
    __slots__ = ("i", "t_start", "t_open", "t_first", "presence", "presence_bytes",
                 "last_count", "synced", "error", "ws", "other", "port")

    def __init__(self, i: int) -> None:
        self.i = i
        self.t_start = self.t_open = self.t_first = 0
        self.presence = self.presence_bytes = self.other = 0
        self.last_count = -1
        self.synced = False
        self.error = ""
        self.ws = None
        self.port = 0  # its own port: the server's trace names it (split)


@contextlib.contextmanager
def collector_off():
    """This process's cyclic garbage collector off meanwhile (collected first): it is
    short-lived, and its storm must keep its pace (module docstring)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def split(clients_file: str, trace_file: str) -> dict:
    """Each client's first history (``--clients``) split at what the server saw of it
    (bench/gcstats/jointrace.py), in ms: ``server_101`` accept → 101 written (first
    bytes, upgrade), ``server_join`` hello read → history written, ``load`` 101 written
    → hello read plus history written → read by this process (the load's own delay and
    loopback), ``accept`` connect start → accepted. Mean and p99 of each; the p99 of
    the server's two parts together and of the load's."""
    with open(trace_file) as f:
        server = {t["port"]: t for t in json.load(f) if t.get("port")}
    with open(clients_file) as f:
        clients = json.load(f)
    parts: dict[str, list[float]] = {k: [] for k in (
        "accept", "server_101", "server_join", "load", "server", "total")}
    for port, start, _, first in clients:
        t = server.get(port)
        if not first or t is None or "hist" not in t or "hello" not in t:
            continue
        parts["accept"].append((t["accept"] - start) / 1e6)
        parts["server_101"].append((t["w101"] - t["accept"]) / 1e6)
        parts["server_join"].append((t["hist"] - t["hello"]) / 1e6)
        parts["load"].append((t["hello"] - t["w101"] + first - t["hist"]) / 1e6)
        parts["server"].append(parts["server_101"][-1] + parts["server_join"][-1])
        parts["total"].append((first - start) / 1e6)
    out: dict = {"clients": len(parts["total"])}
    for name, values in parts.items():
        values.sort()
        if values:
            out[f"{name}_mean_ms"] = sum(values) / len(values)
            out[f"{name}_p99_ms"] = percentile(values, 99)
    return out


def presence_count(raw: str) -> int:
    """The ``count`` of a presence frame, its last number: read without parsing the
    names before it (json.loads of a 1 KB frame: ~5 µs, a thousand frames a broadcast)."""
    at = raw.rfind('"count":') + len('"count":')
    end = at
    while end < len(raw) and raw[end].isdigit():  # bounded by the frame's length
        end += 1
    return int(raw[at:end]) if end > at else json.loads(raw)["count"]


def reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:80]}"


async def seed(url: str, count: int, timeout: float) -> None:
    """Post ``count`` messages as ``seeder`` and wait for each to come back, then leave."""
    if count <= 0:
        return
    async with connect(url, ping_interval=None, open_timeout=timeout, proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "seeder", "after": 0}))
        for k in range(count):
            await ws.send(json.dumps({"type": "message", "text": f"seed {k} of {count}"}))
        got = 0
        while got < count:  # bounded by the timeout
            frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            got += frame.get("type") == "message"


async def run(a: argparse.Namespace) -> dict:
    url = f"ws://127.0.0.1:{a.port}/ws"
    deadline = asyncio.get_running_loop().time() + a.timeout
    await seed(url, a.seed, a.timeout)
    await asyncio.sleep(0.3)  # the seeder's leave is told (presence) before the storm
    with collector_off():
        return await storm(a, url, deadline)


async def storm(a: argparse.Namespace, url: str, deadline: float) -> dict:
    """The storm, the ready and the settle phases (module docstring), and their figures."""
    loop = asyncio.get_running_loop()
    n, spacing = a.n, a.spacing_ms / 1000
    clients = [Client(i) for i in range(n)]
    pending = [n]  # clients not yet connected-and-served (or failed)
    served = asyncio.Event()
    last_presence = [0.0]
    mono = time.monotonic_ns

    def done_one() -> None:
        pending[0] -= 1
        if pending[0] == 0:
            served.set()

    async def one(c: Client) -> None:
        c.t_start = mono()
        try:
            # proxy=None: no proxy look-up (the environment, ~50 µs) per connection
            c.ws = ws = await connect(url, ping_interval=None, open_timeout=a.timeout,
                                      close_timeout=5, max_size=2**22, compression=None,
                                      proxy=None)
            c.t_open = mono()
            c.port = ws.local_address[1]
            user = f"load{c.i + 1}" if a.users == "distinct" else "load"
            await ws.send(json.dumps({"type": "hello", "user": user, "after": 0}))
        except Exception as exc:  # noqa: BLE001 -- every failure is counted with its reason
            c.error = reason(exc)
            done_one()
            return
        if not a.history:
            done_one()
        try:
            async for raw in ws:
                now = mono()
                if raw.startswith('{"type":"message"'):
                    if not c.t_first:
                        c.t_first = now
                        if a.history:
                            done_one()
                    if '"text":"sync ' in raw:
                        c.synced = True
                elif raw.startswith('{"type":"presence"'):
                    c.presence += 1
                    c.presence_bytes += len(raw.encode())
                    c.last_count = presence_count(raw)
                    last_presence[0] = loop.time()
                else:
                    frame = json.loads(raw)
                    if frame.get("type") == "message":  # a server with another key order
                        c.t_first = c.t_first or now
                        c.synced = c.synced or frame.get("text", "").startswith("sync ")
                    else:
                        c.other += 1
        except ConnectionClosed as exc:
            if not c.error:
                c.error = "closed by the server: " + (
                    f"{exc.rcvd.code} {exc.rcvd.reason}" if exc.rcvd else "no close frame")
        if a.history and not c.t_first:  # closed before its history came
            c.error = c.error or "closed by the server before any message"
            done_one()

    rss_max = [0]
    sampling = True

    async def sample_rss() -> None:
        while sampling:
            rss_max[0] = max(rss_max[0], status_kb(a.server_pid) or 0)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample_rss())
    tasks = []
    lag = []
    cpu0, my0, sys0 = proc_cpu(a.server_pid), time.process_time(), system_busy_s()
    t0 = loop.time() + 0.01
    t0_ns = mono() + 10_000_000
    for i in range(n):  # paced: connection i starts at t0 + i * spacing
        wait = t0 + i * spacing - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        lag.append(max(0.0, -wait))
        tasks.append(asyncio.create_task(one(clients[i])))
    cpu_launched = proc_cpu(a.server_pid)
    launched_s = (mono() - t0_ns) / 1e9
    try:
        await asyncio.wait_for(served.wait(), max(1.0, deadline - loop.time()))
        timed_out = False
    except TimeoutError:
        timed_out = True
    served_s = (mono() - t0_ns) / 1e9

    # Ready: every connected client has seen a message sent after the storm.
    ready_s = None
    live = [c for c in clients if c.ws is not None and not c.error]
    if live and not timed_out:
        for k in range(400):  # bounded: <= 400 x 25 ms
            await live[0].ws.send(json.dumps({"type": "message", "text": f"sync {k}"}))
            await asyncio.sleep(0.025)
            if all(c.synced for c in live if not c.error) or loop.time() > deadline:
                break
        ready_s = (mono() - t0_ns) / 1e9
    if a.history:  # presence settles: everyone told the final count, then quiet
        quiet = 3 * 0.25
        while loop.time() < deadline:  # bounded by the timeout
            everyone = len(live) if a.users == "distinct" else 1
            settled = all(c.last_count == everyone for c in live if not c.error)
            if settled and loop.time() - last_presence[0] > quiet:
                break
            await asyncio.sleep(0.05)
    end_s = (mono() - t0_ns) / 1e9
    cpu1, my1, sys1 = proc_cpu(a.server_pid), time.process_time(), system_busy_s()
    sampling = False
    await sampler
    rss_end = status_kb(a.server_pid)

    ok = [c for c in clients if not c.error and c.t_open]
    opens = sorted((c.t_open - c.t_start) / 1e6 for c in ok)
    firsts = sorted((c.t_first - c.t_start) / 1e6 for c in ok if c.t_first and a.history)
    presence = [c.presence for c in clients]
    lag.sort()
    server_cpu = cpu1[2] - cpu0[2]
    res = dict(
        N=n, spacing_ms=a.spacing_ms, seeded=a.seed, history=a.history, users=a.users,
        connected=len(ok), failed=n - len(ok),
        failures=dict(Counter(c.error for c in clients if c.error).most_common(5)),
        open_p50_ms=percentile(opens, 50), open_p99_ms=percentile(opens, 99),
        open_max_ms=opens[-1] if opens else None,
        first_history_n=len(firsts),
        first_history_p50_ms=percentile(firsts, 50) if firsts else None,
        first_history_p99_ms=percentile(firsts, 99) if firsts else None,
        first_history_max_ms=firsts[-1] if firsts else None,
        presence_frames=sum(presence), presence_bytes=sum(c.presence_bytes for c in clients),
        presence_max_per_client=max(presence), other_frames=sum(c.other for c in clients),
        launched_s=launched_s, served_s=served_s, ready_s=ready_s, total_s=end_s,
        timed_out=timed_out,
        launch_lag_p99_ms=percentile(lag, 99) * 1e3, launch_lag_max_ms=lag[-1] * 1e3,
        server_cpu_s=server_cpu, server_cpu_us_per_join=server_cpu / n * 1e6,
        server_utime_s=cpu1[0] - cpu0[0], server_stime_s=cpu1[1] - cpu0[1],
        server_busy_storm=(cpu_launched[2] - cpu0[2]) / max(launched_s, 1e-3),
        server_VmRSS_max_kB=rss_max[0], server_VmRSS_end_kB=rss_end,
        client_cpu_s=my1 - my0, client_busy=(my1 - my0) / max(end_s, 1e-3),
        other_cpu_s=max(0.0, (sys1 - sys0) - server_cpu - (my1 - my0)),
    )
    if a.clients:  # for split(): when each client started, opened, got its history
        with open(a.clients, "w") as f:
            json.dump([(c.port, c.t_start, c.t_open, c.t_first) for c in clients], f)
    for task in tasks:
        task.cancel()

    async def close(ws) -> None:
        try:
            await asyncio.wait_for(ws.close(), 5)
        except Exception:  # noqa: BLE001 -- already gone
            pass

    await asyncio.wait_for(asyncio.gather(*(close(c.ws) for c in clients if c.ws is not None),
                                          return_exceptions=True), 60)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int)
    p.add_argument("-n", type=int, default=1000, help="clients (default 1000)")
    p.add_argument("--spacing-ms", type=float, default=1.0,
                   help="connection i starts at i x this (default 1 ms)")
    p.add_argument("--seed", type=int, default=5, help="messages in the log before the storm")
    p.add_argument("--history", action="store_true",
                   help="the server sends history (chatlib): wait for each client's first "
                        "message frame, then for presence to settle")
    p.add_argument("--users", choices=["distinct", "shared"], default="distinct",
                   help="nicknames load1..loadN (default), or all 'load': presence then "
                        "never changes (to measure what presence costs)")
    p.add_argument("--server-pid", type=int, help="for CPU and RSS from /proc")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--clients", help="write each client's port, start, open and first "
                                     "history times (monotonic ns) to this JSON file")
    p.add_argument("--kernel", action="store_true",
                   help="start the server in a real ipykernel (no --port, --server-pid)")
    p.add_argument("--reps", type=int, default=1, help="--kernel: storms, a kernel each")
    p.add_argument("--settle", action="store_true",
                   help="--kernel: a cell first sets the kernel's collector as the CLI server "
                        "does (chatlib.collector.settle)")
    a = p.parse_args()
    if a.kernel:
        for _ in range(a.reps):
            print(json.dumps(in_kernel(a)), flush=True)
        return
    if a.port is None or a.server_pid is None:
        p.error("--port and --server-pid are required (or --kernel)")
    print(json.dumps(asyncio.run(run(a))), flush=True)


KERNEL_CELL = ("import chatlib\nserver = await chatlib.start_server(limits=chatlib.Limits("
               "admit_rate=0, rate=1e6, burst=1_000_000))\nserver.port")
"""The cell that starts the server: admission control and the send rate limit off, as
bench/compare.py starts the CLI server (``fanout.RATE_ARGS``)."""

SETTLE_CELL = "import chatlib.collector\nchatlib.collector.settle()"
"""``--settle``: the collector set as ``python -m chatlib serve`` sets it (chatlib.collector),
by the notebook itself (chatlib leaves a kernel's collector to the learner)."""


def in_kernel(a: argparse.Namespace) -> dict:
    """One storm against a server started in a fresh ipykernel (bench/classroom.py's)."""
    import os

    import classroom

    kernel = classroom.Kernel()
    try:
        kernel.cells(1.0, 0.1)  # warm-up: the first cells import things
        if a.settle:
            kernel.run(SETTLE_CELL)
        a.port = int(kernel.run(KERNEL_CELL)["result"])
        a.server_pid = kernel.pid
        os.sched_setaffinity(0, {1})  # the load on the other core (the kernel is on CPU 0)
        return {"where": "kernel", "settled": a.settle, **asyncio.run(run(a))}
    finally:
        kernel.close()


if __name__ == "__main__":
    main()
