"""Does hiredis help RedisLog? Client CPU per call, with whatever parser redis-py picks.

    .venv/bin/python bench/redis_parser.py                     # with hiredis (installed)
    .venv/bin/pip uninstall -y hiredis && .venv/bin/python bench/redis_parser.py

Starts its own redis-server (chatlib.cluster.RedisProcess) in a temporary directory, stores
500 messages of 80 characters, then times (process CPU time, this process only) appends,
history pages of 500 (what a joining or resuming client reads) and reads of one message.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from chatlib.cluster import RedisProcess  # noqa: E402
from chatlib.redis_log import RedisLog  # noqa: E402


async def main() -> None:
    redis = await RedisProcess(Path(tempfile.mkdtemp(prefix="redis-parser-"))).start()
    try:
        log = RedisLog(redis.url)
        for _ in range(500):
            await log.append("ada", "x" * 80)
        calls = [("append", lambda: log.append("ada", "y" * 80), 2000),
                 ("after(0, 500)", lambda: log.after(0, 500), 200),
                 ("after(499, 1)", lambda: log.after(499, 1), 2000)]
        parser = "hiredis" if HIREDIS_AVAILABLE else "pure Python"
        for name, call, count in calls:
            t0 = time.process_time()
            for _ in range(count):
                await call()
            print(f"{parser:>11} {name:>14}: {(time.process_time() - t0) / count * 1e6:8.1f}"
                  " µs client CPU per call")
        await log.close()
    finally:
        await redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
