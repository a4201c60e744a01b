"""The long-poll floor: what one long-poll delivery costs a Python server doing the minimum.

    .venv/bin/python bench/http_floor.py                     # 5 reps, N=100, M=300
    .venv/bin/python bench/http_floor.py --chatlib /tmp/chatlib-before .   # two chatlib rows

The same load as ``fanout.py --sections http`` (``http_fanout.py --transport longpoll``: N
clients looping ``GET /api/messages?after=<cursor>&wait=25``, one sender ``POST``ing M messages
one at a time), the same pinning (server on CPU 0, load on CPU 1), the servers alternating
(A B C D, B C D A, ...), medians. The servers:

* ``bare``: one ``asyncio.Protocol``, HTTP/1.1 keep-alive parsed by hand, the messages in a
  list; a parked poll is answered from ``POST``'s own call (no task, no timer per message);
* ``h11``: uvicorn + h11 (what chatlib runs on) + :func:`asgi_app`, the same logic as a raw
  ASGI app (no Starlette, no middleware, no disconnect watch; parked polls share a future);
* ``httptools``: the same app on uvicorn's httptools parser (``pip install httptools``; the
  row is skipped when it is not installed);
* ``chatlib``: ``python -m chatlib serve`` from each ``--chatlib`` directory (default: this
  checkout).

Every server answers the same JSON (``{"messages": [...], "last_id": N}``, at most 100
messages, encoded once per cursor). The table gives server CPU per delivery and per response
(a response carries every message after the cursor: the fewer responses, the cheaper each
delivery). ``python bench/http_floor.py --serve bare|h11|httptools --port P`` runs one server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from functools import partial

import compare
import fanout

HISTORY = 100  # messages per answer at most (chatlib's Limits.history)


# -- the minimal servers ----------------------------------------------------------------


class Chat:
    """The message list, one encoded answer per cursor, and who waits for the next message."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.answers: dict[int, bytes] = {}  # cursor -> body, for the current last id
        self.arrived: asyncio.Future | None = None  # the ASGI app's parked polls share it
        self.parked: dict[BareProtocol, int] = {}  # the bare server's parked polls

    def answer(self, after: int) -> bytes | None:
        """The body for a poll at ``after``, or None if nothing is newer."""
        if after >= len(self.messages):
            return None
        body = self.answers.get(after)
        if body is None:
            found = self.messages[max(after, 0):max(after, 0) + HISTORY]
            body = json.dumps({"messages": found, "last_id": len(self.messages)}).encode()
            self.answers[after] = body
        return body

    def empty(self) -> bytes:
        return json.dumps({"messages": [], "last_id": len(self.messages)}).encode()

    def post(self, body: bytes) -> bytes:
        data = json.loads(body)
        message = {"id": len(self.messages) + 1, "ts": time.time(), "user": data["user"],
                   "text": data["text"]}
        self.messages.append(message)
        self.answers.clear()
        if self.arrived is not None:
            self.arrived.set_result(None)
            self.arrived = None
        return json.dumps(message).encode()


CHAT = Chat()


def poll_params(query: str) -> tuple[int, float]:
    params = dict(part.partition("=")[::2] for part in query.split("&") if part)
    return int(params.get("after", 0)), float(params.get("wait", 0))


def http_response(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (status, len(body), body))


class BareProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, parsed by hand: just enough for the load (no chunked bodies)."""

    def connection_made(self, transport) -> None:
        self.transport, self.buffer, self.timer = transport, b"", None

    def connection_lost(self, exc) -> None:
        CHAT.parked.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:  # bounded: every turn consumes a request from the buffer, or returns
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            stop = end + 4 + length
            if len(self.buffer) < stop:
                return
            body, self.buffer = self.buffer[end + 4:stop], self.buffer[stop:]
            method, target, _ = lines[0].split(" ", 2)
            self.request(method, target, body)

    def request(self, method: str, target: str, body: bytes) -> None:
        if method == "POST":
            self.transport.write(http_response(b"201 Created", CHAT.post(body)))
            parked, CHAT.parked = CHAT.parked, {}
            for protocol, after in parked.items():
                protocol.reply(CHAT.answer(after))
            return
        after, wait = poll_params(target.partition("?")[2])
        answer = CHAT.answer(after)
        if answer is not None or wait <= 0:
            self.reply(answer or CHAT.empty())
        else:
            CHAT.parked[self] = after
            self.timer = asyncio.get_running_loop().call_later(wait, self.timed_out)

    def reply(self, body: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.write(http_response(b"200 OK", body))

    def timed_out(self) -> None:
        self.timer = None
        CHAT.parked.pop(self, None)
        self.reply(CHAT.empty())


async def asgi_app(scope, receive, send) -> None:
    """The same logic as :class:`BareProtocol`, as a raw ASGI app."""
    if scope["type"] != "http":
        return
    if scope["method"] == "POST":
        body, more = b"", True
        while more:  # bounded by the request's Content-Length
            event = await receive()
            body, more = body + event.get("body", b""), event.get("more_body", False)
        await respond(send, 201, CHAT.post(body))
        return
    after, wait = poll_params(scope["query_string"].decode("latin-1"))
    answer = CHAT.answer(after)
    if answer is None and wait > 0:
        if CHAT.arrived is None:
            CHAT.arrived = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(CHAT.arrived)
        except TimeoutError:
            pass
        answer = CHAT.answer(after)
    await respond(send, 200, answer or CHAT.empty())


async def respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(kind: str, port: int) -> None:
    sock = socket.create_server(("127.0.0.1", port), backlog=2048)
    print(f"{kind} serving on 127.0.0.1:{port}", flush=True)
    if kind == "bare":
        async def main() -> None:
            server = await asyncio.get_running_loop().create_server(BareProtocol, sock=sock)
            await server.serve_forever()
        asyncio.run(main())
        return
    import uvicorn
    config = uvicorn.Config(asgi_app, http=kind, ws="none", lifespan="off",
                            log_level="warning", access_log=False)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


# -- the benchmark ----------------------------------------------------------------------


def httptools_missing() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "httptools is not installed (pip install httptools)"
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=["bare", "h11", "httptools"], help="run one server")
    p.add_argument("--port", type=int, default=19300)
    p.add_argument("--chatlib", nargs="*", default=[fanout.ROOT],
                   help="chatlib checkout directories, one row each (default: this one)")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("-m", type=int, default=300)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-other", type=float, default=0.2,
                   help="repeat a run (twice at most) if other processes used more than "
                        "this fraction of a core meanwhile")
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.port)
        return
    fanout.PIN = os.cpu_count() >= 2
    starts = {kind: partial(start_floor, kind) for kind in ("bare", "h11", "httptools")}
    missing = httptools_missing()
    if missing:
        print(f"httptools row skipped: {missing}.")
        del starts["httptools"]
    for where in a.chatlib:
        where = os.path.abspath(where)
        name = "chatlib" if where == fanout.ROOT else f"chatlib {os.path.basename(where)}"
        starts[name] = partial(compare.start, where)
    load = ["http_fanout.py", "--transport", "longpoll", "-n", str(a.n), "-m", str(a.m)]
    results: dict[str, list[dict]] = {name: [] for name in starts}
    names, port = list(starts), a.port
    for rep in range(a.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for _attempt in range(3):  # bounded: a disturbed run is repeated twice at most
                port = fanout.free_port(port + 1)
                r = fanout.one_run(name, load, port, False, 120, start=starts[name])
                if not fanout.disturbed(r, a.max_other):
                    break
            if "error" in r:
                print(f"rep {rep} {name}: {r['error'][-300:]}", file=sys.stderr)
                continue
            results[name].append(r)
            print(f"rep {rep} {name:>12}: {r['server_cpu_us_per_delivery']:6.1f} µs/delivery "
                  f"{r['responses_per_client']:5.0f} responses/client "
                  f"other_cpu={r['other_cpu_s']:.2f}s", flush=True)
    print(table(results, a.n, a.m))


def start_floor(kind: str, port: int):
    return fanout.start_command([fanout.PY, os.path.abspath(__file__), "--serve", kind,
                                 "--port", str(port)], kind)




def table(results: dict[str, list[dict]], n: int, m: int) -> str:
    med = statistics.median
    out = [f"\nlong poll, N={n} pollers, M={m} messages POSTed one at a time; medians of the "
           f"runs in the first column\n",
           "| server | server CPU µs/delivery (user+sys) | responses per client "
           "| µs per response | × bare |", "|---|---:|---:|---:|---:|"]
    bare = med([r["server_cpu_us_per_delivery"] for r in results.get("bare", [])] or [0])
    for name, rr in results.items():
        if not rr:
            continue
        cpu = med([r["server_cpu_us_per_delivery"] for r in rr])
        responses = med([r["responses_per_client"] for r in rr])
        per_response = med([r["server_cpu_us_per_delivery"] * m / r["responses_per_client"]
                            for r in rr])
        out.append(f"| {name} ({len(rr)} runs) | {cpu:.1f} "
                   f"({med([r['server_user_us_per_delivery'] for r in rr]):.1f}"
                   f"+{med([r['server_sys_us_per_delivery'] for r in rr]):.1f}) "
                   f"| {responses:.0f} | {per_response:.0f} "
                   f"| {cpu / bare if bare else float('nan'):.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
