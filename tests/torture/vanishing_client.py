"""One chat client that keeps its connection alive until it is killed: run inside a client
namespace of netns.Topology by test_torture_vanished.py.

``python vanishing_client.py TRANSPORT URL USER [OPTION=SECONDS]`` connects a
:mod:`chatlib.clients` client (``ws``, ``sse``, ``longpoll``, ``poll``), reads whatever
comes, and prints ``READY`` once it is connected. It never closes: the test cuts its link,
then kills it.
"""

from __future__ import annotations

import asyncio
import sys

from chatlib import clients

KINDS = {"ws": clients.WebSocketClient, "sse": clients.SSEClient,
         "longpoll": clients.LongPollClient, "poll": clients.PollingClient}


async def main(kind: str, url: str, user: str, options: dict[str, float]) -> None:
    client = KINDS[kind](url, user, **options)
    await client.connect()
    print("READY", flush=True)
    for _ in range(10**6):  # bounded; the test kills this process long before
        try:
            await client.receive(timeout=60)
        except TimeoutError:
            continue
        except Exception as exc:  # the link is cut: say so, keep the process (and ports)
            print(f"client error: {exc!r}", file=sys.stderr, flush=True)
            await asyncio.sleep(1)


if __name__ == "__main__":
    kind, url, user, *rest = sys.argv[1:]
    asyncio.run(main(kind, url, user, {k: float(v) for k, v in
                                       (item.split("=", 1) for item in rest)}))
