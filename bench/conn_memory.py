"""Memory per idle WebSocket connection, and where it goes (issue 24, target 1).

    .venv/bin/python bench/conn_memory.py /tmp/chatlib-before . -n 10000 --reps 3
    .venv/bin/python bench/conn_memory.py . -n 2000 --breakdown      # where each KiB goes

Each positional argument is a directory holding a ``chatlib/`` package, run as ``python -m
chatlib serve`` (through this script's ``--serve``, which imports that copy) on CPU 0 with
admission control off. ``classroom_load.py`` (CPU 1) opens N WebSockets, says hello with
distinct nicknames, and waits at its barrier (every client has seen a message): the
connections are then open, registered and idle. **KiB per connection** = (VmRSS with N
connected − VmRSS idle) / N. Checkouts alternate (A B, B A, ...); medians and the ratio to
the first.

``--breakdown`` runs each checkout once more under ``tracemalloc`` (one frame per
allocation; it costs memory of its own, so RSS is not read from that run) and prints, per
connection: what was allocated by which line (the snapshot diff, idle → connected), and
which objects the connections added, by type (``gc.get_objects()`` after a ``gc.freeze()``
at idle, so only new objects; ``sys.getsizeof`` of each, plus the untracked ``str``/
``bytes``/... it refers to). RSS − tracemalloc's total is what Python's allocator does not
see (C libraries, pymalloc's free space and fragmentation). Kernel socket buffers are
kernel memory, not in VmRSS: they do not count here (an idle socket's are nearly empty).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)


# -- the server side (--serve) ---------------------------------------------------------------


def serve(port: int, report: str, trace: bool) -> None:
    """``python -m chatlib serve`` in this process, from the current directory's chatlib;
    SIGUSR1 writes a snapshot to ``report`` (first: idle, second: connected + diff, how
    many objects the GC tracks and how long a full collection of them took)."""
    import gc

    sys.path.insert(0, os.getcwd())
    if trace:
        import tracemalloc

        tracemalloc.start(1)
    state: dict = {}

    def snapshot(signum, frame) -> None:
        start = time.perf_counter()
        gc.collect()
        full_gc_ms = (time.perf_counter() - start) * 1e3
        if "idle" not in state:
            gc.freeze()  # what exists now is not per connection: later get_objects() skip it
            state["idle"] = tracemalloc.take_snapshot() if trace else None
            with open(report, "w") as f:
                json.dump({"phase": "idle"}, f)
            return
        out = {"phase": "connected", "full_gc_ms": full_gc_ms, "tracked": len(gc.get_objects()),
               "types": by_type(gc.get_objects())}
        if trace:
            diff = tracemalloc.take_snapshot().compare_to(state["idle"], "lineno")
            out["lines"] = [[str(d.traceback[0]), d.size_diff, d.count_diff]
                            for d in diff if d.size_diff > 0][:200]
            out["traced_diff"] = sum(d.size_diff for d in diff)
        with open(report, "w") as f:
            json.dump(out, f)

    signal.signal(signal.SIGUSR1, snapshot)
    from chatlib.__main__ import main

    main(["serve", "--port", str(port), "--admit-rate", "0"])


def by_type(objects: list) -> dict[str, list[int]]:
    """{type name: [count, bytes]} of ``objects`` and of the untracked objects (str, bytes,
    int, ...) they refer to, each counted once."""
    import gc

    seen: set[int] = set()
    out: dict[str, list[int]] = {}

    def add(obj) -> None:
        seen.add(id(obj))
        t = type(obj)
        row = out.setdefault(f"{t.__module__}.{t.__qualname__}", [0, 0])
        row[0] += 1
        row[1] += sys.getsizeof(obj)

    for obj in objects:
        seen.add(id(obj))
    for obj in objects:
        add(obj)
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not gc.is_tracked(ref) and not isinstance(ref, type):
                add(ref)
    return out


# -- the orchestrator ---------------------------------------------------------------------------


def status_kb(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def wait_file(path: str, phase: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("phase") == phase:
                return data
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no {phase} report in {timeout} s")


def one_run(where: str, n: int, trace: bool) -> dict:
    import classroom
    import fanout

    port = classroom.free_port()
    report = f"/tmp/conn_memory-{os.getpid()}-{port}.json"
    cmd = [sys.executable, os.path.join(BENCH, "conn_memory.py"), "--serve", str(port),
           "--report", report] + (["--trace"] if trace else [])
    proc = subprocess.Popen(classroom.taskset(0) + cmd, cwd=where, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    load = None
    try:
        line = proc.stdout.readline()  # bounded by the server: it prints or exits
        if "serving on" not in line:
            raise RuntimeError(f"server did not start: {proc.stderr.read()[-800:]}")
        time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)
        wait_file(report, "idle")
        res = {"stack": where, "N": n, "trace": trace, "VmRSS_idle_kB": status_kb(proc.pid)}
        load = classroom.Load(port, proc.pid, n, 1, 1)
        connected = load.next(timeout=300)
        res["connect_s"] = connected["connect_s"]
        res["VmRSS_connected_kB"] = status_kb(proc.pid)
        proc.send_signal(signal.SIGUSR1)
        res.update(wait_file(report, "connected", 600))
        res["KiB_per_connection"] = (res["VmRSS_connected_kB"] - res["VmRSS_idle_kB"]) / n
        return res
    finally:
        if load is not None:
            load.stop()
        fanout.stop_server(proc)
        if os.path.exists(report):
            os.unlink(report)


def breakdown_table(r: dict) -> str:
    n = r["N"]
    out = [f"\n**{r['stack']}**, N={n:,}, under tracemalloc: traced +{r['traced_diff'] / n:,.0f}"
           f" B per connection\n", "| allocated in | B per connection |", "|---|---:|"]
    files: dict[str, int] = {}
    lines = []
    for where, size, count in r["lines"]:
        where = where.replace(r["stack"] + "/", "").split("site-packages/")[-1]
        where = where.split("lib/python3")[-1].split("/", 1)[-1]  # the stdlib: asyncio/...
        files[where.rsplit(":", 1)[0]] = files.get(where.rsplit(":", 1)[0], 0) + size
        lines.append(f"| {where} | {size / n:,.0f} | {count / n:.2f} |")
    out += [f"| {name} | {size / n:,.0f} |" for name, size in
            sorted(files.items(), key=lambda kv: -kv[1]) if size / n >= 50]
    out += ["\n| allocated at | B per connection | blocks per connection |", "|---|---:|---:|",
            *lines[:40]]
    types = sorted(r["types"].items(), key=lambda kv: -kv[1][1])
    total = sum(b for _, b in r["types"].values())
    out += [f"\nobjects added, by type (getsizeof, shallow): {total / n:,.0f} B per connection\n",
            "| type | per connection | B per connection |", "|---|---:|---:|"]
    for name, (count, size) in types[:30]:
        out.append(f"| {name} | {count / n:.2f} | {size / n:,.0f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stacks", nargs="*", help="chatlib checkout directories")
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--breakdown", action="store_true",
                   help="one tracemalloc run per checkout instead of the RSS runs")
    p.add_argument("--jsonl", help="append every run's record to this file")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.report, a.trace)
        return
    import classroom

    classroom.PIN = os.cpu_count() >= 2
    stacks = [os.path.abspath(s) for s in a.stacks]
    results: dict[str, list[dict]] = {s: [] for s in stacks}
    for rep in range(1 if a.breakdown else a.reps):
        for where in stacks if rep % 2 == 0 else stacks[::-1]:
            busy0 = classroom.system_busy_s()
            r = one_run(where, a.n, a.breakdown)
            r["other_busy_s"] = round(classroom.system_busy_s() - busy0, 1)
            r["loadavg"] = os.getloadavg()[0]
            results[where].append(r)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
            types = r["types"]
            total = sum(b for _, b in types.values())
            print(f"rep {rep} {where[-28:]:>28}: idle {r['VmRSS_idle_kB'] / 1024:.1f} MiB, "
                  f"{a.n:,} connected {r['VmRSS_connected_kB'] / 1024:.1f} MiB, "
                  f"{r['KiB_per_connection']:.2f} KiB/connection (objects {total / a.n / 1024:.2f}"
                  f" KiB, {r['tracked'] / a.n:.0f} tracked by the GC; a full collection "
                  f"{r['full_gc_ms']:.0f} ms), load avg {r['loadavg']:.1f}", flush=True)
            if a.breakdown:
                print(breakdown_table(r), flush=True)
    if a.breakdown:
        return
    med = statistics.median
    first = med([r["KiB_per_connection"] for r in results[stacks[0]]])
    print(f"\nidle WebSocket connections, N={a.n:,}, medians of {a.reps}:\n")
    print("| chatlib | VmRSS idle MiB | connected MiB | KiB per connection | × first |")
    print("|---|---:|---:|---:|---:|")
    for where, rr in results.items():
        kib = med([r["KiB_per_connection"] for r in rr])
        print(f"| {where} | {med([r['VmRSS_idle_kB'] for r in rr]) / 1024:.1f} "
              f"| {med([r['VmRSS_connected_kB'] for r in rr]) / 1024:.1f} | {kib:.2f} "
              f"| {kib / first:.2f} |")


if __name__ == "__main__":
    main()
