"""Run one chat server for the torture suite, in its own process, so its numbers are real.

``python launch.py '{"rate": 1e9}'`` starts a :class:`chatlib.ChatServer` on 127.0.0.1,
port 0, with those :class:`chatlib.Limits` overrides, prints ``PORT <n>`` and serves until
SIGTERM. A second JSON argument holds ChatServer options (``{"host": ...,
"ws_ping_interval": 2}``). Overrides naming a field this version of ``Limits`` lacks are
ignored (and reported on stderr), so the suite can ask for a limit before the server
grows it.

ChatServer.start raises the open-files soft limit to the hard limit (``raise_fd_limit``): the
exhaustion tests hold thousands of connections, and a server that runs out of descriptors
fails everyone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sys

from chatlib import ChatServer, Limits


async def main(overrides: dict, options: dict) -> None:
    known = {f.name for f in dataclasses.fields(Limits)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        print(f"launch.py: Limits has no {unknown}; ignored", file=sys.stderr, flush=True)
    limits = Limits(**{k: v for k, v in overrides.items() if k in known})
    server = ChatServer(options.pop("host", "127.0.0.1"), 0, limits=limits, **options)
    await server.start()
    print(f"PORT {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


if __name__ == "__main__":
    asyncio.run(main(*(json.loads(arg) for arg in (sys.argv[1:] + ["{}", "{}"])[:2])))
