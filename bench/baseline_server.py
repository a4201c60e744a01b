"""The baseline: a raw ``websockets`` server that broadcasts every frame it receives, verbatim.

``python bench/baseline_server.py PORT`` (127.0.0.1 only). It is the reference design's
``srv_a_websockets.py`` with chatlib's wire protocol in mind: the load client sends it the same
frames it sends chatlib (``hello`` first, then ``{"type": "message", "text": ...}``), and it
forwards each ``message`` frame unchanged with :func:`websockets.asyncio.server.broadcast` to every
open connection (the sender included, as chatlib does). The ``hello`` frame is read and dropped.
It keeps no log, validates nothing and sends no presence: it is the floor for "one Python
process, one event loop, write each frame to N sockets".

``websockets.serve`` negotiates permessage-deflate when the client offers it (its default),
with the same settings uvicorn uses for chatlib (12-bit windows, memLevel 5).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from websockets.asyncio.server import broadcast, serve


async def main(port: int) -> None:
    holder = {}

    async def handler(ws) -> None:
        await ws.recv()  # the hello frame: chatlib's protocol starts with it
        async for frame in ws:
            broadcast(holder["server"].connections, frame)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, "127.0.0.1", port, max_queue=32, ping_interval=20) as server:
        holder["server"] = server
        print(f"baseline serving on ws://127.0.0.1:{port}/ws", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
