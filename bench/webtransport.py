"""Server CPU per delivery: WebTransport (aioquic) against WebSocket, N=100 and N=1000, one run.

    .venv/bin/python bench/webtransport.py                 # N=100 and 1000, 3 reps each, ~3 min
    .venv/bin/python bench/webtransport.py --profile       # + where the server's time goes
    .venv/bin/python bench/webtransport.py --ns 5 --messages 3 --reps 1     # a tiny run

For each N and each rep, WebSocket and WebTransport alternate (ws, wt, ws, wt ...), each on a
fresh chat server process (this file with ``--serve``: ``start_server(webtransport=True)``,
rate limits and admission control lifted for the load's joins; the stuck-client and hello
timeouts raised to an hour, because with a thousand pure-Python QUIC sessions the server or the
load process can take longer than the default 10 s to get to a session's ACKs or hello) pinned
to CPU 0 (``taskset -c 0`` where there is one). One load process (this file with ``--load``, on
CPU 1) opens N readers of one transport (chatlib's ``WebSocketClient`` /
``WebTransportClient``), waits until each has its history, then, between two readings of the
server's CPU time (``/proc/PID/stat``, user + system, 10 ms ticks), one WebSocket sender sends
M messages, each after the previous one's ack, and every reader receives all M. CPU per
delivery = that CPU time / (N * M): the server's whole cost of a message (parse, append, fan-
out, encode, encrypt, send) shared by its N deliveries. The sender's own cost is the same in
both columns.

``--profile`` runs one more WebTransport server at the smallest N (3 M messages) under
``cProfile`` and groups its own time (``tottime``) by where the code lives: aioquic's QUIC
state machine, its HTTP/3 layer, its packet builder, its crypto (the C extension), asyncio,
chatlib, the rest.

Output: a markdown table (medians of the reps, the WT/WS ratio) and, with ``--profile``, the
breakdown, on stdout; ``--json`` adds one JSON line per run. Figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
CONNECT_BATCH = 10  # readers connecting at once: more make each handshake wait (CPU-bound)


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() > 1 else []


def free_port() -> int:
    """A port free on TCP and UDP alike (the server binds both with one number)."""
    for _ in range(50):  # bounded: a port free on TCP is almost always free on UDP too
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on both TCP and UDP")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat, clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def readline(proc: subprocess.Popen, timeout: float) -> str:
    """The process's next stdout line, or RuntimeError after ``timeout`` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise RuntimeError(f"no answer within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process ended: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    return line.strip()


@contextlib.contextmanager
def chat_server(port: int, profile_to: str | None = None):
    """A chat server process (:func:`serve`) on CPU 0; stopped (SIGINT) at exit."""
    runner = [PY, "-m", "cProfile", "-o", profile_to] if profile_to else [PY]
    proc = subprocess.Popen(
        [*pinned(0), *runner, os.path.abspath(__file__), "--serve", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CHATLIB_NO_PORT_REUSE": "1"})
    try:
        deadline = time.monotonic() + 30
        while True:  # bounded by the deadline: wait until it accepts TCP connections
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)  # a clean exit, so that cProfile writes its file
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_once(kind: str, n: int, m: int, profile_to: str | None = None) -> dict:
    """One server, one load process: the server's CPU seconds for M messages to N readers."""
    port = free_port()
    with chat_server(port, profile_to) as server:
        load = subprocess.Popen(
            [*pinned(1), PY, os.path.abspath(__file__), "--load", kind, "--port", str(port),
             "--ns", str(n), "--messages", str(m)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if readline(load, 60 + n * 3.0) != "ready":
                raise RuntimeError("the load process did not get ready")
            before = cpu_seconds(server.pid)
            started = time.perf_counter()
            load.stdin.write("go\n")
            load.stdin.flush()
            result = json.loads(readline(load, 60 + n * m * 0.01))
            cpu = cpu_seconds(server.pid) - before
            wall = time.perf_counter() - started
            with contextlib.suppress(subprocess.TimeoutExpired):
                # Let its clients close their sessions: a QUIC peer killed mid-session
                # sends nothing (no FIN over UDP), and the server, stopped next, may still
                # hold its session.
                load.wait(30)
        finally:
            load.kill()
            load.wait(10)
    deliveries = n * m
    return {"kind": kind, "n": n, "m": m, "cpu_s": cpu, "wall_s": wall,
            "delivered": result["delivered"], "deliveries": deliveries,
            "us_per_delivery": cpu / deliveries * 1e6}


# -- the server process and the load process ---------------------------------------------


async def serve(port: int) -> None:
    """The chat server, WebTransport on, until SIGINT (see the module's docstring)."""
    sys.path.insert(0, os.path.dirname(BENCH))
    import chatlib  # noqa: PLC0415  (after the path: this file runs from bench/)

    limits = chatlib.Limits(rate=1_000_000, burst=1_000_000, stuck_timeout=3600.0,
                            hello_timeout=3600.0, admit_rate=0)  # admit_rate=0: no admission
    await chatlib.start_server(port=port, webtransport=True, limits=limits)
    await asyncio.Event().wait()  # until SIGINT ends asyncio.run (and cProfile writes)


async def load(kind: str, port: int, n: int, m: int) -> None:
    """N readers of ``kind``; on "go", a WebSocket sender sends M messages, all are read."""
    sys.path.insert(0, os.path.dirname(BENCH))
    import httpx  # noqa: PLC0415

    import chatlib  # noqa: PLC0415  (after the path: this file runs from bench/)

    url = f"http://127.0.0.1:{port}/"
    if kind == "wt":  # ask GET /api/webtransport once, not once per reader
        async with httpx.AsyncClient() as http:
            info = (await http.get(url + "api/webtransport", timeout=30)).json()
        readers = [chatlib.WebTransportClient(url, f"r{i}", wt_url=info["url"],
                                              cert_hash=info["hash"]) for i in range(n)]
    else:
        readers = [chatlib.WebSocketClient(url, f"r{i}") for i in range(n)]
    async def connect(reader) -> None:
        # A server busy with the joins' presence fan-out (every join tells everyone: N**2/2
        # deliveries in all, in Python per QUIC packet) can answer a CONNECT after the
        # client's timeout: close that attempt and try again (bounded).
        for attempt in range(5):
            try:
                return await reader.connect()
            except TimeoutError:
                with contextlib.suppress(Exception):
                    await reader.close()
                if attempt == 4:
                    raise

    for start in range(0, n, CONNECT_BATCH):  # bounded: n / CONNECT_BATCH rounds
        await asyncio.gather(*(connect(r) for r in readers[start:start + CONNECT_BATCH]))
    sender = chatlib.WebSocketClient(url, "sender")
    await sender.connect()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    delivered = 0

    async def read_all(reader) -> None:
        nonlocal delivered
        for _ in range(m):
            await reader.receive(timeout=120)
            delivered += 1

    reading = [asyncio.ensure_future(read_all(r)) for r in readers]
    for i in range(m):
        await sender.send(f"message {i}")
    await asyncio.wait_for(asyncio.gather(*reading), 300)
    print(json.dumps({"delivered": delivered}), flush=True)
    for client in [sender, *readers]:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 2)


# -- the profile -------------------------------------------------------------------------

GROUPS = [  # (label, substring of the code's file path or built-in's name), first match wins
    ("aioquic: QUIC connection (frames, streams, ACKs)", "aioquic/quic/connection"),
    ("aioquic: packet builder", "aioquic/quic/packet_builder"),
    ("aioquic: loss recovery and congestion", "aioquic/quic/recovery"),
    ("aioquic: packet protection (AEAD and header, C)", "_crypto"),
    ("aioquic: packet protection (AEAD and header, C)", "aioquic/quic/crypto"),
    ("aioquic: streams", "aioquic/quic/stream"),
    ("aioquic: TLS 1.3 handshakes", "aioquic/tls"),
    ("aioquic: HTTP/3", "aioquic/h3"),
    ("aioquic: buffers (C)", "aioquic._buffer"),
    ("aioquic: other", "aioquic"),
    ("cryptography (handshake signatures, key exchange)", "cryptography"),
    ("socket sends and receives", "_socket.socket"),
    ("asyncio and the selector", "asyncio"),
    ("chatlib", "chatlib"),
    ("uvicorn, websockets, starlette", "site-packages/"),
]


IDLE = "poll' of 'select.epoll"  # cProfile counts wall time: the loop's wait is not work


def profile_groups(path: str) -> list[tuple[str, float]]:
    """The profile's own time (tottime) per group, largest first, in seconds; the event
    loop's idle wait in ``epoll`` left out."""
    stats = pstats.Stats(path)
    totals: dict[str, float] = {}
    for (filename, _, function), (_, _, tottime, _, _) in stats.stats.items():
        if IDLE in function:
            continue
        where = filename if filename != "~" else function  # "~": built-ins, named by function
        label = next((g for g, needle in GROUPS if needle in where), "built-ins and the rest")
        totals[label] = totals.get(label, 0.0) + tottime
    return sorted(totals.items(), key=lambda item: -item[1])


# -- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="100,1000", help="numbers of readers, e.g. 100,1000")
    parser.add_argument("--messages", type=int, default=None,
                        help="messages per run (default: 100 at N <= 100, else 20)")
    parser.add_argument("--reps", type=int, default=3, help="runs per transport and N")
    parser.add_argument("--profile", action="store_true", help="profile a WebTransport server")
    parser.add_argument("--json", action="store_true", help="print one JSON line per run")
    parser.add_argument("--load", choices=("ws", "wt"), help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    if args.serve:
        # SIGINT is how this server is stopped; a shell runs background jobs with SIGINT
        # ignored, and children inherit that (CI started that way never stopped it).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.port))
        return
    if args.load:
        asyncio.run(load(args.load, args.port, ns[0], args.messages))
        return

    runs: list[dict] = []
    for n in ns:
        m = args.messages or (100 if n <= 100 else 20)
        for rep in range(args.reps):  # alternating, so that a slow moment hits both
            for kind in ("ws", "wt"):
                run = run_once(kind, n, m)
                runs.append(run)
                if args.json:
                    print(json.dumps(run), flush=True)
                assert run["delivered"] == run["deliveries"], run
                print(f"  N={n} {kind} rep {rep + 1}: {run['us_per_delivery']:.1f} µs/delivery",
                      file=sys.stderr, flush=True)
    print("| N | M | WebSocket µs/delivery | WebTransport µs/delivery | WT / WS |")
    print("|---:|---:|---:|---:|---:|")
    for n in ns:
        median = {kind: statistics.median(r["us_per_delivery"] for r in runs
                                          if r["n"] == n and r["kind"] == kind)
                  for kind in ("ws", "wt")}
        m = next(r["m"] for r in runs if r["n"] == n)
        # A tiny run may measure no tick at all (10 ms each) for the WebSocket: no ratio.
        ratio = f"{median['wt'] / median['ws']:.2f}×" if median["ws"] else "n/a"
        print(f"| {n} | {m} | {median['ws']:.1f} | {median['wt']:.1f} | {ratio} |")
    print(f"\nmedians of {args.reps} runs each (server CPU, user + system, / (N * M))")
    if args.profile:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "server.prof")
            n = ns[0]
            m = 3 * (args.messages or (100 if n <= 100 else 20))  # messages outweigh the setup
            run_once("wt", n, m, profile_to=path)
            groups = profile_groups(path)
        total = sum(seconds for _, seconds in groups)
        print(f"\nWebTransport server under cProfile, N={n}, M={m}, whole process "
              f"(start, handshakes, messages; idle waits left out): own time by where the "
              f"code lives")
        print("| where | seconds | share |")
        print("|---|---:|---:|")
        for label, seconds in groups:
            print(f"| {label} | {seconds:.2f} | {seconds / total:.0%} |")


if __name__ == "__main__":
    main()
