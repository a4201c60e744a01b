"""bench/rooms.py, in a tiny run: every message reaches its own room once and only its room,
and the table and the JSON come out.

Real processes on 127.0.0.1 (a chat server and a load process per configuration), 12 clients
in 1 room of 12 and in 4 rooms of 3. No figure is asserted (bench/README.md has them), only
what holds on any machine: each run delivered M * S messages with no frame of another room
and no gap, some server CPU was measured, the JSON has a row per size with its ratio to the
largest room (1 for itself), and the markdown table has a row per size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

pytestmark = pytest.mark.timeout(240)


def test_a_tiny_run_keeps_rooms_apart_and_reports(tmp_path):
    out = tmp_path / "rooms.json"
    done = subprocess.run(
        [sys.executable, os.path.join(BENCH, "rooms.py"), "--users", "12", "--sizes", "12,3",
         "--rate", "20", "--seconds", "0.5", "--reps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {run["size"]: run for run in result["runs"]}
    assert sorted(runs) == [3, 12]
    for size, run in runs.items():
        assert run["rooms"] == 12 // size
        assert run["messages"] % run["rooms"] == 0, run      # the same number in every room
        assert run["delivered"] == run["deliveries"] == run["messages"] * size, run
        assert run["all_delivered"] and not run["errors"], run
        assert run["cpu_s"] > 0, run
    rows = {row["size"]: row for row in result["table"]}
    assert rows[12]["ratio"] == rows[12]["paired_ratio"] == 1
    assert rows[3]["ratio"] > 0
    lines = done.stdout.splitlines()
    assert any(line.startswith("| 1 × 12 | ") for line in lines), done.stdout
    assert any(line.startswith("| 4 × 3 | ") for line in lines), done.stdout

