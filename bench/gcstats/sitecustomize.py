"""Bench only: records every cyclic-GC collection of the process that imports it.

``bench/compare.py --gc-stats`` puts this directory on the server's ``PYTHONPATH``, so
Python imports this module at start-up (``sitecustomize``). Each collection after the server
froze its start-up objects (``gc.freeze()``): its generation,
wall time and CPU time (``time.process_time``: not inflated when another process takes
the core meanwhile) are kept; at exit one JSON line goes to the file named by
``CHATLIB_GC_STATS``. With ``CHATLIB_JOIN_TRACE`` (``compare.py --join-trace``) it also
imports ``jointrace`` (this directory): when each connection's handshake, hello and first
history passed the server.
"""

import atexit
import gc
import json
import os
import time

_out = os.environ.get("CHATLIB_GC_STATS")
if _out:
    _runs: list[tuple[int, float, float]] = []
    _start = [0.0, 0.0]

    _frozen = [False]

    def _record(phase: str, info: dict) -> None:
        if not _frozen[0]:  # still starting (chatlib serve freezes once up)? Asked until
            # it has: get_freeze_count() walks every frozen object, ~2 ms a collection.
            if not gc.get_freeze_count():
                return
            _frozen[0] = True
        if phase == "start":
            _start[:] = time.perf_counter(), time.process_time()
        else:
            _runs.append((info["generation"], time.perf_counter() - _start[0],
                          time.process_time() - _start[1]))

    gc.callbacks.append(_record)

    @atexit.register
    def _dump() -> None:
        by_gen = {g: [r for r in _runs if r[0] == g] for g in (0, 1, 2)}
        with open(_out, "a") as f:
            f.write(json.dumps({
                "collections": [len(by_gen[g]) for g in (0, 1, 2)],
                "gc_cpu_ms": sum(r[2] for r in _runs) * 1e3,
                "gc_wall_ms": sum(r[1] for r in _runs) * 1e3,
                "longest_wall_ms": max((r[1] for r in _runs), default=0) * 1e3,
                "longest_cpu_ms": max((r[2] for r in _runs), default=0) * 1e3,
                "full_cpu_ms": [round(r[2] * 1e3, 1) for r in by_gen[2]],
            }) + "\n")

if os.environ.get("CHATLIB_JOIN_TRACE"):  # compare.py --join-trace: bench/gcstats/jointrace.py
    import jointrace  # noqa: F401
