"""``python -m chatlib serve --port 8765``: the same server, outside Jupyter.

``python -m chatlib user-token --user-secret S ada --room staff``: a token for user ada
only, letting her into the private room staff too, on a server started with
``serve --token T --user-secret S --private-room staff`` (S may instead come from the
environment, ``CHATLIB_USER_SECRET``; never give out S: it mints tokens for anyone).

``python -m chatlib netem --listen 9000 --target 127.0.0.1:8765 --delay 50ms``: a proxy in
front of it that makes loopback feel like a real network (see chatlib/netem.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from . import collector
from .auth import USER_SECRET_ENV, USER_TOKEN_TTL, page_link, user_token
from .closecode import CloseCode
from .limits import RETAIN_BYTES, RETAIN_MESSAGES, Limits
from .server import ChatServer
from .store import MemoryLog, SQLiteLog


async def serve(args: argparse.Namespace) -> None:
    if args.redis:
        from .redis_log import RedisLog

        log = RedisLog(args.redis, key=args.redis_key, max_len=args.retain,
                       max_bytes=args.retain_bytes, max_rooms=args.max_rooms)
    elif args.db:
        log = SQLiteLog(args.db, max_messages=args.retain, max_bytes=args.retain_bytes,
                        max_rooms=args.max_rooms)
    else:
        log = MemoryLog(max_messages=args.retain, max_bytes=args.retain_bytes,
                        max_rooms=args.max_rooms)
    limits = Limits(allowed_origins=set(args.allow_origin), allowed_hosts=set(args.allow_host),
                    rate=args.rate, burst=args.burst, max_queue=args.max_queue,
                    admit_rate=args.admit_rate, admit_burst=args.admit_burst,
                    header_timeout=args.header_timeout, max_rooms=args.max_rooms)
    server = ChatServer(args.host, args.port, log=log, limits=limits,
                        compression=args.compression, token=args.token,
                        forwarded_allow_ips=args.forwarded_allow_ips,
                        webtransport=args.webtransport, private_rooms=args.private_room,
                        user_secret=args.user_secret)
    await server.start()
    collector.settle()  # no full collection of the cyclic GC in the middle of a join storm
    link = page_link(server.url, server.token)
    print(f"chatlib serving on {link}  (Ctrl+C to stop)", flush=True)
    if server.wt_url:
        print(f"WebTransport on {server.wt_url} (UDP), certificate SHA-256 {server.wt_hash}",
              flush=True)
    # Ctrl+C (SIGINT): going away (1001). SIGTERM, what a deploy or chatlib.cluster's rolling
    # restart sends: restarting (1012), each push client told its own delay
    # (--restart-spread; ChatServer.restarting), so that they do not all come back at once.
    stopping: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda sig=sig: stopping.done() or stopping.set_result(sig))
    if await stopping == signal.SIGTERM:
        server.restarting(args.restart_spread)
        await server.stop(CloseCode.SERVICE_RESTART)
    else:
        await server.stop()
    await log.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chatlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the chat server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--db", help="SQLite file for a history that survives restarts")
    p.add_argument("--redis", metavar="URL",
                   help="share one chat with other processes through Redis,"
                        " e.g. redis://127.0.0.1:6379/0 (see chatlib/redis_log.py)")
    p.add_argument("--redis-key", default="chat", help="prefix of the chat's Redis keys")
    p.add_argument("--retain", type=int, default=RETAIN_MESSAGES, metavar="N",
                   help="messages the log keeps, the oldest dropped first (any log;"
                        f" default {RETAIN_MESSAGES:,})")
    p.add_argument("--retain-bytes", type=int, default=RETAIN_BYTES, metavar="B",
                   help=f"... and bytes of messages it keeps (default {RETAIN_BYTES:,})")
    p.add_argument("--allow-origin", action="append", default=[],
                   help="another browser origin allowed to connect (repeatable)")
    p.add_argument("--allow-host", action="append", default=[],
                   help="another name browsers may use for this server, e.g. a machine name"
                        " (repeatable; '*' allows any; IP addresses and localhost always work)")
    p.add_argument("--token", nargs="?", const=True, default=None,
                   help="token mode: every request must carry this token (without a value:"
                        " make one); the printed link carries it")
    p.add_argument("--forwarded-allow-ips", metavar="IPS", default=None,
                   help="behind a reverse proxy: its addresses (comma-separated, or '*'),"
                        " whose X-Forwarded-For names the client (default: trust nobody's)")
    p.add_argument("--webtransport", action="store_true",
                   help="also serve WebTransport over HTTP/3, on UDP at the same port"
                        " (chatlib/webtransport.py; the page tries it first)")
    p.add_argument("--compression", action="store_true",
                   help="offer permessage-deflate to WebSocket clients")
    defaults = Limits()
    p.add_argument("--rate", type=float, default=defaults.rate,
                   help=f"messages per second one client may send (default {defaults.rate:g})")
    p.add_argument("--burst", type=int, default=defaults.burst,
                   help=f"... with bursts of up to this many (default {defaults.burst})")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help="frames queued for one slow push client before it is closed with 1013"
                        f" (default {defaults.max_queue})")
    p.add_argument("--admit-rate", type=float, default=defaults.admit_rate,
                   help="new sessions admitted per second; the rest are told when to come"
                        f" back (0: admit all; default {defaults.admit_rate:g})")
    p.add_argument("--admit-burst", type=int, default=defaults.admit_burst,
                   help=f"... with bursts of up to this many (default {defaults.admit_burst})")
    p.add_argument("--restart-spread", type=float, default=None, metavar="S",
                   help="on SIGTERM, tell each push client a random delay in [0, S) s to come"
                        " back after (0: none, the naive restart; default: clients/admit-rate)")
    p.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                   help="seconds a connection may take to send a request's headers"
                        f" (default {defaults.header_timeout:g})")
    from . import netem  # python -m chatlib netem: a delaying proxy (chatlib/netem.py)

    p.add_argument("--max-rooms", type=int, default=defaults.max_rooms, metavar="N",
                   help="rooms the log holds at most, the default room included"
                        f" (default {defaults.max_rooms})")
    p.add_argument("--user-secret", metavar="S", default=os.environ.get(USER_SECRET_ENV),
                   help="what signs user tokens (token mode; default: $"
                        f"{USER_SECRET_ENV}, else a random one that only this process knows)")
    p.add_argument("--private-room", action="append", default=[], metavar="NAME",
                   help="a room only the user tokens that list it may join (token mode;"
                        " repeat for more; tokens: python -m chatlib user-token)")
    u = sub.add_parser("user-token", help="print a token for one user (token mode)")
    u.add_argument("user")
    u.add_argument("--user-secret", metavar="S", default=os.environ.get(USER_SECRET_ENV),
                   help=f"the server's --user-secret (default: ${USER_SECRET_ENV})")
    u.add_argument("--room", action="append", default=[], metavar="NAME",
                   help="a private room it may join (repeat for more)")
    u.add_argument("--ttl", type=float, default=USER_TOKEN_TTL, metavar="S",
                   help=f"seconds it is valid (default {USER_TOKEN_TTL})")
    netem.add_arguments(sub.add_parser("netem", help="a TCP proxy that adds delay, jitter, "
                                       "a bandwidth cap and cuts in front of the chat server"))
    args = parser.parse_args(argv)
    if args.command == "user-token":
        if not args.user_secret:
            parser.error(f"user-token needs --user-secret (or ${USER_SECRET_ENV})")
        print(user_token(args.user_secret, args.user, args.room, args.ttl))
        return
    asyncio.run(serve(args) if args.command == "serve" else netem.run(args))


if __name__ == "__main__":
    main()
