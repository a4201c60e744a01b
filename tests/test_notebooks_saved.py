"""The notebooks as a learner first opens them, before running anything (issue 8, section 2).

Saved outputs must make sense without a kernel (no dead links to a past run's ephemeral port,
no widget views that can only say "model not found"), every chapter states its time, and Run
All ends with a live chat: the only cell that stops the server is the optional last one.
(That the times agree with the course tables: tests/test_course_consistency.py.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]-*.ipynb"))
LOCAL_URL = re.compile(r"(?:https?|wss?)://(?:127\.0\.0\.1|localhost|\[::1\]):\d+")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_there_are_twelve_chapters():
    assert len(NOTEBOOKS) == 12, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_outputs_have_no_dead_links_or_widget_views(path):
    notebook = load(path)
    assert "widgets" not in notebook["metadata"], (
        "saved widget state: run notebooks/clean_outputs.py")
    for i, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {}), (
                f"cell {i}: a widget view is saved (it shows 'model not found' without a kernel)")
            text = json.dumps(output.get("data", {})) + "".join(output.get("text", ""))
            assert not LOCAL_URL.search(text), f"cell {i}: a link to a past run's port is saved"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_states_its_time(path):
    header = source(load(path)["cells"][0])
    # Both tracks (notebooks/AUTHORING.md, "Two tracks, honest times").
    assert re.search(r"\*Core track: about \d+ minutes · full chapter: about \d+ minutes\.\*",
                     header), "the first cell says how long each track takes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_run_all_leaves_the_chat_running(path):
    code = [source(c) for c in load(path)["cells"] if c["cell_type"] == "code"]
    assert code[-1].startswith("STOP = False"), "the last cell is the optional stop"
    for i, cell in enumerate(code[:-1]):
        assert "stop_server()" not in cell and "server.stop()" not in cell, (
            f"code cell {i} stops the server: Run All must end with a live chat")


def test_chapter_12_saved_storm_compares_every_policy():
    """Chapter 12's saved live storm has a row for each of bench/storm.py's policies,
    admission control included: a run saved from a chatlib without it once went unnoticed."""
    (path,) = [p for p in NOTEBOOKS if p.name.startswith("12-")]
    tables = [text for cell in load(path)["cells"] for output in cell.get("outputs", [])
              for text in ["".join(output.get("data", {}).get("text/markdown", ""))]
              if text.startswith("| policy | live storms |")]
    assert len(tables) == 1, "the live storm's table is missing from the saved outputs"
    for policy in ("naive", "jitter", "admission", "spread"):
        assert f"\n| {policy} |" in tables[0], f"no {policy} row in the saved storm table"
