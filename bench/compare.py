"""Compare chatlib checkouts (before/after an optimisation) and the baseline on one load.

    .venv/bin/python bench/compare.py /tmp/chatlib-before . baseline -n 100 -m 1000 --reps 7

Each positional argument is a directory holding a ``chatlib/`` package (and ``static/``), run as
``python -m chatlib serve`` from there so that that copy is imported, or ``baseline``. Runs
alternate between them (A B C, C B A, ...), same pinning and load as ``fanout.py``; prints the
median deliveries/s and server CPU µs/delivery of each, and the ratio to the last one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import fanout
import join_storm

BENCH = os.path.dirname(os.path.abspath(__file__))


def serve_args(where: str) -> list[str]:
    """fanout.RATE_ARGS without the options that checkout's CLI does not have yet (an
    older chatlib, e.g. one from before admission control, refuses `--admit-rate`): the
    option, the same for both, or left at that checkout's (absent) default."""
    with open(os.path.join(where, "chatlib", "__main__.py"), encoding="utf-8") as f:
        cli = f.read()
    args = fanout.RATE_ARGS
    pairs = zip(args[::2], args[1::2], strict=True)
    return [item for option, value in pairs if f'"{option}"' in cli for item in (option, value)]


def start(where: str, port: int) -> subprocess.Popen:
    if where == "baseline":
        return fanout.start_server("baseline", port, False)
    cmd = [fanout.PY, "-m", "chatlib", "serve", "--port", str(port), *serve_args(where)]
    return fanout.start_command(cmd, f"chatlib in {where}", cwd=where)


def segments(r: dict) -> float:
    """TCP segments sent on the machine (data and ACKs, both ways) per delivery."""
    return r.get("counters", {}).get("OutSegs", float("nan")) / max(r["delivered"], 1)


def gc_line(r: dict) -> str:
    """The server's cyclic-GC collections (--gc-stats): count per generation, CPU in all."""
    gc = r.get("gc")
    if gc is None:
        return ""
    return (f"GC {'/'.join(map(str, gc['collections']))} collections, {gc['gc_cpu_ms']:.0f} ms "
            f"CPU, longest {gc['longest_cpu_ms']:.1f} ms CPU ({gc['longest_wall_ms']:.1f} wall)")


def split_line(r: dict) -> str:
    """--join-trace: the first history's p99, the server's part and the load's."""
    sp = r.get("split")
    if not sp:
        return ""
    return (f" | server p99 {sp['server_p99_ms']:.1f} (101 {sp['server_101_p99_ms']:.1f}, "
            f"join {sp['server_join_p99_ms']:.1f}, mean {sp['server_join_mean_ms']:.2f}) "
            f"load p99 {sp['load_p99_ms']:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stacks", nargs="+", help="chatlib checkout directories, or 'baseline'")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("-m", type=int, default=1000)
    p.add_argument("--mode", choices=["burst", "closed", "open"], default="burst")
    p.add_argument("--rate", type=float, default=100, help="open mode: messages per second")
    p.add_argument("--transport", choices=["ws", "longpoll", "sse", "join"], default="ws",
                   help="longpoll, sse: bench/http_fanout.py's load (burst only); join:"
                        " bench/join_storm.py's storm of N joins in one second (-m unused)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--port", type=int, default=19100)
    p.add_argument("--gc-stats", action="store_true",
                   help="record the server's cyclic-GC collections (bench/gcstats)")
    p.add_argument("--join-trace", action="store_true",
                   help="join: split each client's first history into the server's part and "
                        "the load's (bench/gcstats/jointrace.py, join_storm.split)")
    p.add_argument("--jsonl", help="append every run's record (with its 'stack') to this file")
    a = p.parse_args()
    stacks = [s if s == "baseline" else os.path.abspath(s) for s in a.stacks]
    results: dict[str, list[dict]] = {s: [] for s in stacks}
    load = (["load_client.py", "--mode", a.mode, "--rate", str(a.rate)] if a.transport == "ws"
            else ["http_fanout.py", "--transport", a.transport])
    if a.transport == "join":
        load = ["join_storm.py", "--spacing-ms", "1", "--seed", "5", "--history"]
    port = a.port
    for rep in range(a.reps):
        for where in stacks if rep % 2 == 0 else stacks[::-1]:
            port = fanout.free_port(port + 1)
            gc_file = f"/tmp/compare-gc-{os.getpid()}-{port}.jsonl"
            trace = a.join_trace and a.transport == "join"
            trace_file, clients_file = (f"/tmp/compare-{kind}-{os.getpid()}-{port}.json"
                                        for kind in ("trace", "clients"))
            if a.gc_stats:  # for the server only: its environment is copied at start
                os.environ["CHATLIB_GC_STATS"] = gc_file
            if trace:
                os.environ["CHATLIB_JOIN_TRACE"] = trace_file
            if a.gc_stats or trace:
                os.environ["PYTHONPATH"] = os.path.join(BENCH, "gcstats")
            try:
                proc = start(where, port)
            finally:
                for name in ("CHATLIB_GC_STATS", "CHATLIB_JOIN_TRACE", "PYTHONPATH"):
                    os.environ.pop(name, None)
            try:
                time.sleep(0.3)
                done = subprocess.run(
                    fanout.taskset(1) + [fanout.PY, *load, "--port", str(port),
                                         "-n", str(a.n), "--server-pid", str(proc.pid)]
                    + ([] if a.transport == "join" else ["-m", str(a.m)])
                    + (["--clients", clients_file] if trace else []),
                    cwd=BENCH, capture_output=True, text=True, timeout=300)
            finally:
                fanout.stop_server(proc)
            if done.returncode != 0:
                print(f"{where}: load failed: {done.stderr[-300:]}", file=sys.stderr)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            if a.gc_stats and os.path.exists(gc_file):
                with open(gc_file) as f:
                    r["gc"] = json.loads(f.read().splitlines()[-1])
                os.unlink(gc_file)
            if trace and os.path.exists(trace_file) and os.path.exists(clients_file):
                r["split"] = join_storm.split(clients_file, trace_file)
                os.unlink(trace_file)
                os.unlink(clients_file)
            results[where].append(r)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps({"stack": where, "rep": rep, **r}) + "\n")
            if a.transport == "join":
                print(f"rep {rep} {where[-32:]:>32}: {r['connected']}/{r['N']} first history "
                      f"p50 {r['first_history_p50_ms']:.1f} p99 {r['first_history_p99_ms']:.1f} "
                      f"ms {r['server_cpu_us_per_join']:.0f} µs/join "
                      f"other_cpu={r['other_cpu_s']:.2f}s {gc_line(r)}{split_line(r)}", flush=True)
                continue
            print(f"rep {rep} {where[-32:]:>32}: {r['deliveries_per_s']:>9,.0f} del/s "
                  f"p50 {r['lat_p50_ms']:.2f} p99 {r['lat_p99_ms']:.2f} ms "
                  f"{r['server_cpu_us_per_delivery']:.2f} µs/delivery "
                  + (f"{r['responses_per_client']:.0f} responses/client "
                     if r.get("responses_per_client") else "")
                  + f"other_cpu={r['other_cpu_s']:.2f}s", flush=True)
    med = statistics.median
    if a.transport == "join":
        print(f"\njoin storm N={a.n} in one second, medians of {a.reps}:\n"
              "| server | connected | first history p50 ms | p99 ms | server CPU µs/join "
              "| GC CPU ms | longest collection, CPU ms |\n|---|---:|---:|---:|---:|---:|---:|")
        for where, rr in results.items():
            if rr:
                gcs = [r["gc"] for r in rr if "gc" in r]
                print(f"| {where} | {min(r['connected'] for r in rr)}/{a.n} (min) "
                      f"| {med([r['first_history_p50_ms'] for r in rr]):.1f} "
                      f"| {med([r['first_history_p99_ms'] for r in rr]):.1f} "
                      f"| {med([r['server_cpu_us_per_join'] for r in rr]):.0f} "
                      + (f"| {med([g['gc_cpu_ms'] for g in gcs]):.0f} "
                         f"| {med([g['longest_cpu_ms'] for g in gcs]):.1f} |" if gcs else "| | |"))
        splits = {where: [r["split"] for r in rr if "split" in r] for where, rr in results.items()}
        if any(splits.values()):
            print("\nwhere the first history went (--join-trace), medians of the runs' ms:\n"
                  "| server | server p99 | accept → 101 p99 | hello → history mean / p99 "
                  "| load p99 |\n|---|---:|---:|---:|---:|")
            for where, sps in splits.items():
                if sps:
                    print(f"| {where} | {med([x['server_p99_ms'] for x in sps]):.1f} "
                          f"| {med([x['server_101_p99_ms'] for x in sps]):.1f} "
                          f"| {med([x['server_join_mean_ms'] for x in sps]):.2f} / "
                          f"{med([x['server_join_p99_ms'] for x in sps]):.1f} "
                          f"| {med([x['load_p99_ms'] for x in sps]):.1f} |")
        return
    last = results[stacks[-1]]
    base_cpu = med([r["server_cpu_us_per_delivery"] for r in last]) if last else float("nan")
    print(f"\n{a.transport} N={a.n} M={a.m} {a.mode}, medians of {a.reps}:")
    # CPU (user+sys): the split from /proc/PID/stat ticks (10 ms), medians of each. TCP
    # segments: all of the machine's (load_client.kernel_counters), per delivery.
    print("| server | deliveries/s | p50 ms | p99 ms | server CPU µs/delivery (user+sys) "
          "| × last | TCP segments/delivery |\n|---|---:|---:|---:|---:|---:|---:|")
    for where, rr in results.items():
        if rr:
            cpu = med([r["server_cpu_us_per_delivery"] for r in rr])
            print(f"| {where} | {med([r['deliveries_per_s'] for r in rr]):,.0f} "
                  f"| {med([r['lat_p50_ms'] for r in rr]):.2f} "
                  f"| {med([r['lat_p99_ms'] for r in rr]):.2f} | {cpu:.2f} "
                  f"({med([r['server_user_us_per_delivery'] for r in rr]):.1f}"
                  f"+{med([r['server_sys_us_per_delivery'] for r in rr]):.1f}) "
                  f"| {cpu / base_cpu:.2f} "
                  f"| {med([segments(r) for r in rr]):.2f} |")


if __name__ == "__main__":
    fanout.PIN = os.cpu_count() >= 2
    main()
