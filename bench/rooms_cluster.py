"""What one chat process reads from Redis, with 3 processes and 100 rooms (issue 23).

    .venv/bin/python bench/rooms_cluster.py                 # ~1 min on 2 cores
    .venv/bin/python bench/rooms_cluster.py --rooms 100 --size 10 --messages 20 --reps 3
    .venv/bin/python bench/rooms_cluster.py --messages 2 --rate 20     # paced: 10 s a run

Each room is a stream of its own (chatlib.redis_log), and a process follows only the rooms
its clients are in, woken by a notice per room. What that saves depends on where the
clients are, so the same traffic (``--messages`` per room, every room, from one of its
members, as a burst or at ``--rate`` messages per second) runs under three placements of
``--rooms`` rooms of ``--size`` users over 3 processes:

* ``every room everywhere``: every process has a client in every room. Each process then
  reads every message: what one shared stream for all rooms costs every process (the
  baseline; a shared stream's entries would also carry their room, a few bytes more).
* ``users spread``: each user on a process drawn at random (seeded), as a load balancer
  that knows nothing of rooms spreads them (nginx round-robin, least_conn): a process
  follows every room with one of its users on it.
* ``rooms together``: every room's users on one process (room i on process i mod 3), as
  a balancer that routes by room would (nginx ``hash $arg_room consistent``).

Users of one room on one process add nothing to what that process reads from Redis (one
follower per room per process, whatever its clients), so each (room, process) pair with a
member gets one WebSocket client, not one per user; the fan-out to clients is
bench/rooms.py's and bench/fanout.py's.

What a process reads is counted on the wire: each process reaches Redis through a relay
in this script that counts the bytes Redis sends it, apart on the follower's connection
(the one named ``chatlib-follower``) and on the others (append replies, the presence bus),
the stream entries among them (the ``ts`` field every entry has, ``$2\\r\\nts\\r\\n``;
no bench user or text is "ts"), and the bytes the follower sends. Counted from the first
message to the last delivery (the joins' history reads happen before). Runs alternate the
placements; medians over reps.

``--baseline REF`` also runs every placement with chatlib as it was at git ``REF`` (its
``chatlib/`` extracted to a temporary directory, first on the processes' ``sys.path``),
alternating with the working tree's: before and after a change, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chatlib.cluster import ChatProcess, RedisProcess, free_port  # noqa: E402

PROCESSES = 3
RATE = ("--rate", "1000000", "--burst", "1000000", "--admit-rate", "0")
MARKER = b"$2\r\nts\r\n"
PLACEMENTS = ("every room everywhere", "users spread", "rooms together")
ROOT = Path(__file__).resolve().parent.parent


class VersionedChatProcess(ChatProcess):
    """A chat process that imports chatlib from ``code`` (a directory holding a
    ``chatlib/``) when given, else the working tree's."""

    def __init__(self, redis_url: str, code: Path | None, **options) -> None:
        super().__init__(redis_url, **options)
        self.code = code

    def command(self) -> list[str]:
        command = super().command()
        if self.code is None:
            return command
        # Not PYTHONPATH: ``python -m`` puts the working directory (this repository) first.
        run = (f"import runpy, sys; sys.path.insert(0, {str(self.code)!r}); "
               "runpy.run_module('chatlib', run_name='__main__', alter_sys=True)")
        return [command[0], "-c", run, *command[3:]]


def extract(ref: str) -> Path:
    """chatlib/ (and the page it serves, static/) as at git ``ref``, in a new directory."""
    directory = Path(tempfile.mkdtemp(prefix="rooms-cluster-code-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "chatlib", "static"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


class Relay:
    """A TCP relay from one chat process to Redis that counts what Redis sends it: on the
    follower's connection (the one that names itself ``chatlib-follower``) and on the
    others (appends, history reads, the presence bus)."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = free_port()
        self.counts = {"follower": 0, "other": 0, "entries": 0, "follower_sent": 0}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def _accept(self, client_r, client_w) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        kind = ["other"]  # until the connection names itself the follower
        up = asyncio.ensure_future(self._pump(client_r, redis_w, kind, down=False))
        down = asyncio.ensure_future(self._pump(redis_r, client_w, kind, down=True))
        self._tasks |= {up, down}
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
            self._tasks.discard(task)
        for writer in (client_w, redis_w):
            writer.close()

    async def _pump(self, reader, writer, kind: list[str], down: bool) -> None:
        tail = b""
        for _ in range(1 << 62):  # until the connection ends
            chunk = await reader.read(65536)
            if not chunk:
                return
            if not down and b"chatlib-follower" in chunk:  # CLIENT SETNAME, at connect
                kind[0] = "follower"
            if not down and kind[0] == "follower":  # its XREADs name every room followed
                self.counts["follower_sent"] += len(chunk)
            if down:
                self.counts[kind[0]] += len(chunk)
                window = tail + chunk  # a marker may straddle two reads
                self.counts["entries"] += window.count(MARKER)
                tail = window[-(len(MARKER) - 1):] if not window.endswith(MARKER) else b""
            writer.write(chunk)
            await writer.drain()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()


def placement(kind: str, rooms: int, size: int, rng: random.Random) -> list[set[int]]:
    """For each room, the processes that have at least one of its users."""
    if kind == "every room everywhere":
        return [set(range(PROCESSES)) for _ in range(rooms)]
    if kind == "rooms together":
        return [{room % PROCESSES} for room in range(rooms)]
    return [{rng.randrange(PROCESSES) for _ in range(size)} for _ in range(rooms)]


async def run_once(kind: str, rooms: int, size: int, messages: int, rate: float,
                   seed: int, code: Path | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="rooms-cluster-"))
    redis = await RedisProcess(tmp / "redis").start()
    relays = [await Relay(redis.port).start() for _ in range(PROCESSES)]
    servers = [VersionedChatProcess(relay.url, code, args=RATE) for relay in relays]
    try:
        await asyncio.gather(*(server.start() for server in servers))
        where = placement(kind, rooms, size, random.Random(seed))
        return await traffic(servers, relays, where, messages, rate)
    finally:
        for server in servers:
            await server.stop()
        for relay in relays:
            await relay.stop()
        await redis.stop()


async def traffic(servers, relays, where: list[set[int]], messages: int,
                  rate: float) -> dict:
    clients: list[tuple[int, int, object]] = []  # (room, process, websocket)
    for room, processes in enumerate(where):
        for process in sorted(processes):
            ws = await connect(f"ws://127.0.0.1:{servers[process].port}/ws", compression=None,
                               max_queue=None, ping_interval=None, open_timeout=30)
            await ws.send(json.dumps({"type": "hello", "user": f"u{room}p{process}",
                                      "room": f"room-{room}"}))
            clients.append((room, process, ws))
    got = [0] * len(clients)
    done = asyncio.Event()
    expected = len(clients) * messages

    async def read(i: int) -> None:
        async for raw in clients[i][2]:
            if json.loads(raw).get("type") == "message":
                got[i] += 1
                if sum(got) >= expected:
                    done.set()

    readers = [asyncio.ensure_future(read(i)) for i in range(len(clients))]
    try:
        await asyncio.sleep(1.0)  # joins' history reads and presence settle
        before = [dict(relay.counts) for relay in relays]
        t0 = time.monotonic()
        members: dict[int, list[int]] = {}
        for i, (room, _process, _ws) in enumerate(clients):
            members.setdefault(room, []).append(i)
        # One member of each room sends, on a process taken in turn: the append replies
        # are spread like the follower's reads.
        senders = {room: ids[room % len(ids)] for room, ids in members.items()}
        for n in range(messages):
            for room, i in senders.items():
                await clients[i][2].send(json.dumps({"type": "message", "room": f"room-{room}",
                                                     "text": f"message {n} of its room"}))
                if rate:
                    await asyncio.sleep(1 / rate)
        async with asyncio.timeout(120):
            await done.wait()
        elapsed = time.monotonic() - t0
        total = len(where) * messages
        per_process = []
        for p, relay in enumerate(relays):
            read = {key: relay.counts[key] - before[p][key] for key in relay.counts}
            per_process.append({"rooms": sum(1 for processes in where if p in processes),
                                **read, "entry_share": read["entries"] / total})
        return {"messages": total, "seconds": elapsed, "processes": per_process}
    finally:
        for task in readers:
            task.cancel()
        for _room, _process, ws in clients:
            with contextlib.suppress(Exception):
                await ws.close()


def summarise(runs: list[dict]) -> dict:
    """Medians over runs of the mean over processes, and of the busiest process."""
    def per_process(key: str, pick=statistics.mean) -> float:
        return statistics.median(pick([p[key] for p in r["processes"]]) for r in runs)

    return {"messages": runs[0]["messages"],
            "seconds": statistics.median(r["seconds"] for r in runs),
            **{key: per_process(key) for key in ("rooms", "entries", "follower", "other",
                                                  "follower_sent")},
            "max_entries": per_process("entries", max)}


async def main(args: argparse.Namespace) -> dict:
    versions = {"": None}
    if args.baseline:
        versions = {f"{args.baseline}: ": extract(args.baseline), "working tree: ": None}
    results: dict[str, list[dict]] = {v + kind: [] for v in versions for kind in PLACEMENTS}
    for rep in range(args.reps):
        for kind in PLACEMENTS:  # alternated: A B C A B C (each version in turn)
            for version, code in versions.items():
                results[version + kind].append(await run_once(
                    kind, args.rooms, args.size, args.messages, args.rate, args.seed + rep,
                    code))
                print(f"rep {rep + 1} {version}{kind}: " + ", ".join(
                    f"{p['entries']} entries, {p['follower']} + {p['other']} B, sent "
                    f"{p['follower_sent']} B" for p in results[version + kind][-1]["processes"]),
                    file=sys.stderr, flush=True)
    summary = {key: summarise(runs) for key, runs in results.items()}
    pace = f"{args.rate:g} messages/s" if args.rate else "as fast as they go"
    first = summary[next(iter(summary))]
    print(f"\n{args.rooms} rooms of {args.size} users on {PROCESSES} processes, "
          f"{args.messages} messages per room ({first['messages']} in all, {pace}); per process "
          f"(mean of the {PROCESSES}), median of {args.reps} runs:\n")
    print("| placement | rooms followed | messages read (busiest) | follower bytes read |"
          " vs one shared stream | other bytes | follower bytes sent | sent per message read |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for version in versions:
        base = summary[version + PLACEMENTS[0]]
        for kind in PLACEMENTS:
            row = summary[version + kind]
            print(f"| {version}{kind} | {row['rooms']:.1f} | {row['entries']:.0f} "
                  f"({row['max_entries']:.0f}) | {row['follower'] / 1e3:.0f} kB | "
                  f"{row['follower'] / base['follower']:.2f} | {row['other'] / 1e3:.0f} kB | "
                  f"{row['follower_sent'] / 1e3:.1f} kB | "
                  f"{row['follower_sent'] / max(row['entries'], 1):.0f} B |")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--size", type=int, default=10, help="users per room")
    parser.add_argument("--messages", type=int, default=20, help="messages per room")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="messages per second over all rooms (default 0: a burst)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline", metavar="REF",
                        help="also run chatlib as at this git ref (e.g. main), alternated")
    parser.add_argument("--json", help="also write the summary to this file")
    arguments = parser.parse_args()
    outcome = asyncio.run(main(arguments))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(outcome, indent=1) + "\n")
