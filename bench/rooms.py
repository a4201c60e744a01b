"""Server CPU per delivery against room size: the same users and message rate, split into rooms.

    .venv/bin/python bench/rooms.py               # 1 room of 1,000 against 100 rooms of 10, ~4 min
    .venv/bin/python bench/rooms.py --users 200 --sizes 200,20,2 --rate 20 --seconds 3 --reps 1

Every configuration has the same U WebSocket clients and the same message rate (R messages per
second in total, paced); only the split differs: U / S rooms of S members each (rooms
``r0``, ``r1``, ...; every client says ``hello`` with its room, so the connection is in that
room only). Message k goes to room ``k mod (U / S)``, sent by one of that room's members, and
reaches the S members of its room, the sender included: M messages make M * S deliveries.
So a room of 1,000 makes a hundred times the deliveries of rooms of 10 at the same message
rate, and CPU per delivery says what each of them costs.

For each rep the sizes run in turn (forward, then backward in the next rep, so that a slow
moment on the machine hits both), each on a fresh chat server process (this file with
``--serve``: ``start_server`` with the rate limits and admission control lifted for the load)
pinned to CPU 0 (``taskset -c 0`` where there is one), and one load process (this file with
``--load``, CPU 1: raw asyncio WebSockets, ``classroom_load.Client``) that

1. connects U clients, all named ``load`` (one nickname: presence traffic stays out of the
   figures), each with ``hello {"room": its room, "after": 0}``;
2. waits until every client has seen a ``sync`` message of its own room (a barrier: the
   server has registered everyone);
3. on ``go``, sends the M messages at R per second, then waits until every client has every
   message of its room, checking that each frame names the client's room (isolation) and
   that the ids a client sees go 1, 2, 3... with no gap or repeat (a room is its own log).

The server's CPU time (user + system, every thread, ``/proc/PID/task/*/schedstat``, ns) is
read around an idle window of ``--seconds`` (the U connections, nobody talking) and around
the chat (from ``go`` to the last delivery). CPU per delivery = the chat's CPU / (M * S); CPU
per message = the chat's CPU / M. ``other_cpu_s``: CPU that other processes used meanwhile.

Output: a markdown table (medians [min-max] of the reps, the ratio of medians to the largest
room, the median of the per-rep ratios) on stdout, and every run with the table as JSON in
``--out`` (default ``bench/rooms-results.json``). Figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from classroom_load import PAD, Client, Room, emit, raise_nofile  # noqa: E402  (after the path)
from load_client import proc_cpu, system_busy_s  # noqa: E402
from webtransport import readline  # noqa: E402

PY = sys.executable
OUT = os.path.join(BENCH, "rooms-results.json")


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() > 1 else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cpu(pid: int) -> float:
    """The server's CPU seconds so far, user + system, every thread (ns precision)."""
    return proc_cpu(pid)[2]


def read_json_line(proc: subprocess.Popen, timeout: float) -> dict:
    """The load process's next JSON line, or RuntimeError after ``timeout`` seconds."""
    result = json.loads(readline(proc, timeout))
    if result.get("phase") == "error":
        raise RuntimeError(result["error"])
    return result


@contextlib.contextmanager
def chat_server(port: int):
    """A chat server process (:func:`serve`) on CPU 0; stopped (SIGINT, then SIGKILL) at exit."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would block it
        proc = subprocess.Popen(
            [*pinned(0), PY, os.path.abspath(__file__), "--serve", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=log, text=True,
            env={**os.environ, "CHATLIB_NO_PORT_REUSE": "1"})
        try:
            deadline = time.monotonic() + 30
            while True:  # bounded by the deadline: until it accepts TCP connections
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start: {log.read()[-2000:]}")
                time.sleep(0.05)
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def messages_for(users: int, size: int, rate: float, seconds: float) -> int:
    """M: rate * seconds, rounded up to a whole number of messages per room."""
    rooms = users // size
    return -(-round(rate * seconds) // rooms) * rooms


def run_once(users: int, size: int, rate: float, seconds: float, idle: float) -> dict:
    """One server, one load process: the server's CPU for M messages in rooms of ``size``."""
    port = free_port()
    m = messages_for(users, size, rate, seconds)
    with chat_server(port) as server:
        load = subprocess.Popen(
            [*pinned(1), PY, os.path.abspath(__file__), "--load", "--port", str(port),
             "--users", str(users), "--sizes", str(size), "--messages", str(m),
             "--rate", str(rate)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = read_json_line(load, 120 + users * 0.1)
            idle0 = server_cpu(server.pid)
            time.sleep(idle)  # the idle window: U connections, nobody talking
            idle_cpu = server_cpu(server.pid) - idle0
            cpu0, busy0, started = server_cpu(server.pid), system_busy_s(), time.perf_counter()
            load.stdin.write("go\n")
            load.stdin.flush()
            done = read_json_line(load, 120 + m / rate * 3)
            cpu = server_cpu(server.pid) - cpu0
            wall = time.perf_counter() - started
            other = system_busy_s() - busy0 - cpu - done["load_cpu_s"]
        finally:
            load.kill()
            load.wait(10)
    deliveries = m * size
    return {"users": users, "size": size, "rooms": users // size, "rate": rate, "messages": m,
            "deliveries": deliveries, "delivered": done["delivered"],
            "all_delivered": done["all_delivered"], "errors": done["errors"],
            "connect_s": ready["connect_s"], "cpu_s": round(cpu, 6),
            "idle_cpu_s": round(idle_cpu, 6), "idle_s": idle, "wall_s": round(wall, 3),
            "us_per_delivery": cpu / deliveries * 1e6, "us_per_message": cpu / m * 1e6,
            "lat_p50_ms": done["lat_p50_ms"], "lat_p99_ms": done["lat_p99_ms"],
            "load_cpu_s": done["load_cpu_s"], "other_cpu_s": round(max(other, 0.0), 3)}


# -- the server process ------------------------------------------------------------------


async def serve(port: int) -> None:
    """The chat server until SIGINT: default limits except the load's rates and joins."""
    sys.path.insert(0, os.path.dirname(BENCH))
    import chatlib  # noqa: PLC0415  (after the path: this file runs from bench/)

    limits = chatlib.Limits(rate=1_000_000, burst=1_000_000, address_rate=1_000_000,
                            address_burst=1_000_000, admit_rate=0)  # admit_rate=0: no admission
    await chatlib.start_server(port=port, limits=limits)
    await asyncio.Event().wait()


# -- the load process --------------------------------------------------------------------


class Member(Client):
    """One client of :class:`Load`: in one room, the hello names it."""

    def __init__(self, load: Load, i: int, room: str) -> None:
        super().__init__(load, i)
        self.room_name = room

    def hello(self) -> dict:
        return {"type": "hello", "user": "load", "after": 0, "room": self.room_name}


class Load(Room):
    """U members in rooms of S: a classroom_load Room whose clients each see their own room."""

    def __init__(self, port: int, users: int, size: int) -> None:
        super().__init__(port, users)
        self.rooms = {f"r{j}": [] for j in range(users // size)}
        self.members = [Member(self, i, f"r{i // size}") for i in range(users)]
        for member in self.members:
            self.rooms[member.room_name].append(member)
        self.foreign = 0  # frames of another room: must stay 0

    def on_message(self, c: Member, payload: bytes) -> None:
        now = time.monotonic_ns()
        frame = json.loads(payload)
        if frame.get("room") != c.room_name:
            self.foreign += 1
            if len(self.errors) < 20:
                self.errors.append(f"client {c.i} in {c.room_name} got {payload[:120]!r}")
            return
        self.count(c, frame, now)


def percentile_ms(values: list[int], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] / 1e6


async def load(port: int, users: int, size: int, m: int, rate: float) -> None:
    """The load process (see the module's docstring), one JSON line per phase on stdout."""
    soft, hard = raise_nofile(users + 100)
    if soft < users + 50:
        emit({"phase": "error", "error": f"only {soft} open files allowed (hard {hard})"})
        return
    room = Load(port, users, size)
    gate = asyncio.Semaphore(100)  # connects in flight (the listen backlog)

    async def open_one(member: Member) -> None:
        async with gate:
            await room.loop.create_connection(lambda: member, "127.0.0.1", port)
            await asyncio.wait_for(member.opened, 30)

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(open_one(c) for c in room.members)), 120)
    connect_s = time.monotonic() - t0
    for k in range(600):  # bounded: <= 600 x 50 ms; one sync per room not yet synced
        waiting = [ms for ms in room.rooms.values() if not all(c.synced for c in ms)]
        if not waiting:
            break
        for members in waiting:
            members[0].send_json({"type": "message", "text": f"sync {k}",
                                  "room": members[0].room_name})
        await asyncio.sleep(0.05)
    else:
        emit({"phase": "error", "error": "sync barrier: not every client saw its room"})
        return
    await asyncio.sleep(0.5)  # in-flight sync copies drain before the idle window
    emit({"phase": "ready", "connect_s": round(connect_s, 3)})
    if (await room.loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
        return
    names = list(room.rooms)
    room.target = m // len(names)
    cpu0, start = time.process_time(), time.monotonic()
    for k in range(m):
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        members = room.rooms[names[k % len(names)]]
        sender = members[(k // len(names)) * 7919 % size]
        sender.send_json({"type": "message", "room": sender.room_name,
                          "text": f"{room.tag}{k} {time.monotonic_ns()} {PAD}"})
    try:
        await asyncio.wait_for(room.all_done.wait(), 60)
    except TimeoutError:
        room.errors.append("timed out waiting for the last deliveries")
    delivered = sum(c.got for c in room.members)
    emit({"phase": "done", "delivered": delivered,
          "all_delivered": delivered == m * size and not room.order_errors and not room.foreign,
          "errors": room.errors[:20], "lat_p50_ms": percentile_ms(room.lat_ns, 50),
          "lat_p99_ms": percentile_ms(room.lat_ns, 99),
          "load_cpu_s": round(time.process_time() - cpu0, 3)})
    for c in room.members:
        c.transport.close()


# -- main --------------------------------------------------------------------------------


def summarize(runs: list[dict], sizes: list[int]) -> list[dict]:
    """Per size: medians [min, max] of the reps, ratios to the largest room (of medians, and
    the median of the per-rep ratios)."""
    largest = max(sizes)
    reps = max(r["rep"] for r in runs) + 1
    base = {r["rep"]: r["us_per_delivery"] for r in runs if r["size"] == largest}
    rows = []
    for size in sizes:
        mine = [r for r in runs if r["size"] == size]
        per_delivery = [r["us_per_delivery"] for r in mine]
        rows.append({
            "size": size, "rooms": mine[0]["rooms"], "users": mine[0]["users"],
            "messages": mine[0]["messages"], "deliveries": mine[0]["deliveries"], "reps": reps,
            "us_per_delivery": statistics.median(per_delivery),
            "us_per_delivery_min": min(per_delivery), "us_per_delivery_max": max(per_delivery),
            "us_per_message": statistics.median(r["us_per_message"] for r in mine),
            "idle_cpu_ms_per_s": statistics.median(r["idle_cpu_s"] / r["idle_s"] * 1e3
                                                   for r in mine) if mine[0]["idle_s"] else None,
            "ratio": statistics.median(per_delivery) / statistics.median(base.values()),
            "paired_ratio": statistics.median(r["us_per_delivery"] / base[r["rep"]] for r in mine),
            "lat_p50_ms": statistics.median(r["lat_p50_ms"] for r in mine),
            "other_cpu_s": max(r["other_cpu_s"] for r in mine)})
    return rows


def table(rows: list[dict]) -> str:
    largest = max(r["size"] for r in rows)
    lines = ["| rooms × members | messages | deliveries | server CPU µs/delivery | "
             "µs/message | idle CPU ms/s | ratio (paired) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "1" if r["size"] == largest else f"{r['ratio']:.2f}× ({r['paired_ratio']:.2f}×)"
        idle = "-" if r["idle_cpu_ms_per_s"] is None else f"{r['idle_cpu_ms_per_s']:.1f}"
        lines.append(
            f"| {r['rooms']} × {r['size']} | {r['messages']} | {r['deliveries']:,} | "
            f"{r['us_per_delivery']:.2f} [{r['us_per_delivery_min']:.2f}–"
            f"{r['us_per_delivery_max']:.2f}] | {r['us_per_message']:.0f} | "
            f"{idle} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000, help="clients in every configuration")
    parser.add_argument("--sizes", default="1000,10", help="room sizes (members), each divides U")
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second, in total")
    parser.add_argument("--seconds", type=float, default=10.0, help="of chat")
    parser.add_argument("--idle", type=float, default=None,
                        help="seconds of the idle window (default: --seconds; 0: none)")
    parser.add_argument("--reps", type=int, default=3, help="runs per size")
    parser.add_argument("--out", default=OUT, help="the JSON file to write ('-': none)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.port))
        return
    if args.load:
        asyncio.run(load(args.port, args.users, sizes[0], args.messages, args.rate))
        return
    if any(args.users % size for size in sizes):
        parser.error(f"every room size must divide --users {args.users}")

    runs: list[dict] = []
    for rep in range(args.reps):
        for size in sizes if rep % 2 == 0 else sizes[::-1]:  # alternate the order
            idle = args.seconds if args.idle is None else args.idle
            run = {"rep": rep, **run_once(args.users, size, args.rate, args.seconds, idle)}
            runs.append(run)
            if not run["all_delivered"]:
                raise SystemExit(f"not every message reached its room once, in order: {run}")
            print(f"  {run['rooms']} × {size} rep {rep + 1}: "
                  f"{run['us_per_delivery']:.2f} µs/delivery", file=sys.stderr, flush=True)
    rows = summarize(runs, sizes)
    print(table(rows))
    print(f"\nmedians [min–max] of {args.reps} runs each; {args.users} clients, "
          f"{args.rate:g} messages/s in total in every configuration; server CPU (user + "
          "system) during the chat / deliveries; ratio to the largest room")
    if args.out != "-":
        with open(args.out, "w") as f:
            json.dump({"about": __doc__.split("\n\n")[0], "when": time.strftime(
                "%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
                "load_average": os.getloadavg()[0], "python": platform.python_version(),
                "args": {k: getattr(args, k) for k in ("users", "sizes", "rate", "seconds",
                                                       "idle", "reps")},
                "table": rows, "runs": runs}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
