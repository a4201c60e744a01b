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



def test_readme_and_reference_figures_show_the_saved_run():
    """bench/README.md's rooms table is the saved JSON's, the saved run delivered everything
    to its own room only, and the reference figures the chapters and README.md quote are its
    medians (one run behind every copy of a figure)."""
    sys.path.insert(0, BENCH)
    import rooms  # noqa: PLC0415  (bench/ is no package)

    with open(os.path.join(BENCH, "rooms-results.json")) as f:
        saved = json.load(f)
    with open(os.path.join(BENCH, "README.md")) as f:
        readme = f.read()
    assert rooms.table(saved["table"]) in readme
    assert all(run["all_delivered"] and not run["errors"] for run in saved["runs"])
    root = os.path.dirname(BENCH)
    with open(os.path.join(root, "notebooks", "reference_figures.json")) as f:
        reference = json.load(f)["figures"]
    by_split = {(row["rooms"], row["size"]): row for row in saved["table"]}
    for key, split in (("cpu_room_1x1000", (1, 1000)), ("cpu_room_100x10", (100, 10))):
        assert reference[key]["value"] == round(by_split[split]["us_per_delivery"], 2), key
