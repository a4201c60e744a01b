"""bench/load_client.py's open loop: the receivers' kernel receive stamps are really read.

A short run (3 clients, 10 messages at 50/s) against bench/baseline_server.py, both real
processes on 127.0.0.1. No timing is asserted, only what must hold whatever the machine:
every delivery of every receiver carries a kernel stamp, and a frame is never read before
the kernel received it (read - delivered >= 0 for each, so every "delivered" percentile is
at most the "read" one).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys

from helpers import free_port

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_open_loop_receivers_carry_kernel_stamps() -> None:
    port = free_port()  # for the baseline server
    server = subprocess.Popen([sys.executable, os.path.join(BENCH, "baseline_server.py"),
                               str(port)], stdout=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as sel:  # ready when it says so (bounded: 20 s)
            sel.register(server.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=20), "baseline server did not start"
            assert "serving on" in server.stdout.readline()
        n, m = 3, 10
        done = subprocess.run(
            [sys.executable, "load_client.py", "--port", str(port), "-n", str(n), "-m", str(m),
             "--mode", "open", "--rate", "50", "--server-pid", str(server.pid),
             "--timeout", "30"], cwd=BENCH, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr[-2000:]
        res = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    assert res["delivered"] == res["expected"] == n * m
    assert res["kern_n"] == (n - 1) * m  # every receiver's every delivery (not the sender's)
    assert res["unstamped_reads"] == 0
    assert min(res["gap_by_decile_p50_ms"]) >= 0 and res["gap_p50_ms"] >= 0
    assert 0 < res["kern_p50_ms"] <= res["kern_max_ms"] <= res["lat_max_ms"]
    assert res["spread_p50_ms"] >= 0 and res["first_p50_ms"] > 0
