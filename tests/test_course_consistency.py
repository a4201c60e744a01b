"""The course tells one story: times and figures agree everywhere they are stated (issue 16).

See notebooks/AUTHORING.md ("Two tracks, honest times" and "Figures: measured, rendered, one
reference table") for the conventions these tests hold the chapters to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
sys.path.insert(0, str(NOTEBOOKS_DIR))

import estimate_times  # noqa: E402  (notebooks/estimate_times.py)
import figures  # noqa: E402  (notebooks/figures.py)


def notebook(cells: list[tuple[str, str] | tuple[str, str, list[str]]]) -> dict:
    return {"cells": [{"cell_type": c[0], "source": c[1], "metadata": {"tags": list(c[2:][0])}
                       if len(c) > 2 else {}} for c in cells]}


def test_every_reference_figure_names_its_regime_and_source():
    rows = json.loads(figures.TABLE.read_text(encoding="utf-8"))["figures"]
    assert rows
    for key, row in rows.items():
        assert set(row) == {"quantity", "regime", "value", "unit", "source"}, key
        assert row["regime"] and row["source"].startswith("bench/"), key
        assert isinstance(row["value"], (int, float)), key


def test_quote_renders_value_unit_and_regime():
    text = figures.quote("cpu_ws_in_flight_n1000")
    assert text.startswith("12.62 µs (") and "one message in flight" in text
    with pytest.raises(KeyError, match="not a reference figure"):
        figures.quote("cpu_per_delivery")


def test_estimate_counts_words_cells_and_exercises_per_track(tmp_path):
    path = tmp_path / "99-x.ipynb"
    path.write_text(json.dumps(notebook([
        ("markdown", "# Title\n\n*Core track: about 5 minutes · full chapter: about 20 minutes.*"),
        ("markdown", "## One · core\n" + "word " * 300),
        ("code", "print(1)"),
        ("markdown", "## Two · deep dive\n```python\nnot counted\n```\n" + "word " * 150),
        ("code", "x = 1"),
        ("code", "# Solution", ["solution"]),
    ])), encoding="utf-8")
    chapter = estimate_times.estimate(path)
    assert chapter.untagged == []
    assert (chapter.core.words, chapter.core.code_cells, chapter.core.exercises) == (
        len("# Title *Core track: about 5 minutes · full chapter: about 20 minutes.*".split())
        + len("## One · core".split()) + 300, 1, 0)
    assert (chapter.full.code_cells, chapter.full.exercises) == (2, 1)
    assert chapter.stated == (5, 20)
    assert chapter.core_minutes == 5 and chapter.full_minutes == 10
