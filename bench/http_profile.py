"""Flame graph of the chat server under the http section's load (issue 11, target 3).

    .venv/bin/python bench/http_profile.py --transport sse --out bench/profiles/sse-before.svg

Starts ``python -m chatlib serve`` under ``py-spy record`` (``pip install py-spy``) pinned to
CPU 0, runs ``http_fanout.py`` (or ``load_client.py`` for ``ws``) on CPU 1 with N=100 and
``-m`` messages, and saves py-spy's SVG flame graph. Sampling costs the server some CPU: read
the graph for where the time goes, and bench/fanout.py --sections http for how much.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time

import fanout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", choices=["longpoll", "sse", "ws"], required=True)
    p.add_argument("--out", required=True, help="SVG flame graph to write (.txt: collapsed stacks)")
    p.add_argument("-m", type=int, default=1000)
    p.add_argument("--rate", type=int, default=499, help="py-spy samples per second")
    a = p.parse_args()
    port = fanout.free_port(19600)
    fmt = "raw" if a.out.endswith(".txt") else "flamegraph"  # .txt: collapsed stacks
    cmd = ["py-spy", "record", "--format", fmt, "--rate", str(a.rate), "-o",
           os.path.abspath(a.out), "--", fanout.PY, "-m", "chatlib", "serve", "--port",
           str(port), *fanout.RATE_ARGS]
    py_spy = os.path.join(os.path.dirname(fanout.PY), "py-spy")
    cmd[0] = py_spy if os.path.exists(py_spy) else "py-spy"
    proc = subprocess.Popen(fanout.taskset(0) + cmd, cwd=fanout.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):  # bounded: 20 s
            line = proc.stdout.readline()
            if "serving on" in line or not line:
                break
        server = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                    text=True).stdout.split()[0])
        load = (["load_client.py"] if a.transport == "ws" else
                ["http_fanout.py", "--transport", a.transport])
        done = subprocess.run(fanout.taskset(1) + [fanout.PY, *load, "-n", "100", "-m",
                                                   str(a.m), "--port", str(port),
                                                   "--server-pid", str(server)],
                              cwd=fanout.BENCH, capture_output=True, text=True, timeout=300)
        print(done.stdout.strip()[-400:] or done.stderr[-800:])
        os.kill(server, signal.SIGINT)
        time.sleep(0.2)
    finally:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(proc.stderr.read()[-300:])


if __name__ == "__main__":
    fanout.PIN = os.cpu_count() >= 2
    main()
