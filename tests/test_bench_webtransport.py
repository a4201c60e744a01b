"""bench/webtransport.py, in a tiny run: both transports deliver everything, the table and the
profile come out.

Real processes on 127.0.0.1 (two chat servers per N, a load process each), 3 readers and 2
messages. No figure is asserted (bench/README.md has them), only what holds on any machine:
every run delivered N * M messages and measured some server CPU time, the table has a row per
N with both columns and their ratio, and the profile found aioquic's code in a WebTransport
server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

pytestmark = pytest.mark.timeout(240)


def test_a_tiny_run_delivers_everything_and_reports():
    done = subprocess.run(
        [sys.executable, os.path.join(BENCH, "webtransport.py"), "--ns", "3", "--messages", "2",
         "--reps", "1", "--json", "--profile"],
        capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    runs = [json.loads(line) for line in lines if line.startswith("{")]
    assert sorted(r["kind"] for r in runs) == ["ws", "wt"]
    for run in runs:
        assert run["delivered"] == run["deliveries"] == 3 * 2, run
        assert run["cpu_s"] >= 0
    (row,) = [line for line in lines if line.startswith("| 3 | 2 |")]
    ratio = row.split("|")[-2].strip()
    assert ratio == "n/a" or ratio.endswith("×"), row  # n/a: no CPU tick for the WebSocket
    profile = lines[lines.index("| where | seconds | share |"):]
    assert any(line.startswith("| aioquic: QUIC connection") for line in profile), profile
