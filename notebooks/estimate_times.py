"""Estimate each chapter's time on the core track and in full, the way AUTHORING.md says.

A learner reads technical prose at about ``WORDS_PER_MINUTE`` words a minute, spends
``MINUTES_PER_CODE_CELL`` on each code cell (read the code, run it, read its output) and
``MINUTES_PER_EXERCISE`` on each exercise (trying it before opening the solution), on top of
reading its text and running its cells. Words are those of the Markdown cells outside fenced
blocks (code, Mermaid); code cells are all but the solutions; an exercise is a solution cell.

Sections are the Markdown ``## `` headings; each ends in `` · core`` or `` · deep dive``.
What comes before the first heading (title, objectives) is core. The core track reads the
core sections (Run All runs the deep dives' cells too, unread), so a chapter's core time
counts the core sections only. Each time is rounded to the nearest 5 minutes.

Usage: ``python notebooks/estimate_times.py [NN-*.ipynb ...]`` prints, per chapter, the
words, code cells and exercises, both estimates and what the chapter's first cell states;
``--check`` exits 1 when a stated time is off the estimate by more than ``TOLERANCE``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

WORDS_PER_MINUTE = 150
MINUTES_PER_CODE_CELL = 1.0
MINUTES_PER_EXERCISE = 6.0
# A stated time may differ from the estimate by one rounding step or 10 %, whichever is more:
# the estimate guides the statement, it does not have to be re-typed for every edited word.
TOLERANCE = (5, 0.10)

HERE = Path(__file__).parent
TAG = re.compile(r"^## .*? · (core|deep dive)\s*$")
HEADING = re.compile(r"^## ")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
# The first cell's time line, for both tracks (AUTHORING.md, "Two tracks").
TIME_LINE = re.compile(
    r"\*Core track: about (\d+) minutes · full chapter: about (\d+) minutes\.\*")


@dataclass
class Count:
    words: int = 0
    code_cells: int = 0
    exercises: int = 0

    def minutes(self) -> float:
        return (self.words / WORDS_PER_MINUTE + self.code_cells * MINUTES_PER_CODE_CELL
                + self.exercises * MINUTES_PER_EXERCISE)

    def add(self, other: Count) -> None:
        self.words += other.words
        self.code_cells += other.code_cells
        self.exercises += other.exercises


@dataclass
class Chapter:
    path: Path
    core: Count = field(default_factory=Count)
    full: Count = field(default_factory=Count)
    untagged: list[str] = field(default_factory=list)
    stated: tuple[int, int] | None = None   # (core, full) minutes from the first cell

    @property
    def number(self) -> int:
        return int(self.path.name[:2])

    @property
    def core_minutes(self) -> int:
        return rounded(self.core.minutes())

    @property
    def full_minutes(self) -> int:
        return rounded(self.full.minutes())


def rounded(minutes: float) -> int:
    return max(5, 5 * round(minutes / 5))


def within_tolerance(stated: int, estimate: int) -> bool:
    steps, share = TOLERANCE
    return abs(stated - estimate) <= max(steps, share * estimate)


def stated_times(first_cell: str) -> tuple[int, int] | None:
    match = TIME_LINE.search(first_cell)
    return (int(match.group(1)), int(match.group(2))) if match else None


def estimate(path: Path) -> Chapter:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    chapter = Chapter(path, stated=stated_times("".join(cells[0]["source"])))
    in_core = True   # the part before the first heading
    for cell in cells:
        text = "".join(cell["source"])
        here = Count()
        if cell["cell_type"] == "markdown":
            # A heading may start in the middle of a cell: split the words at each one.
            for line in FENCE.sub("", text).splitlines():
                if HEADING.match(line):
                    tag = TAG.match(line)
                    if tag is None:
                        chapter.untagged.append(line)
                    in_core = tag is None or tag.group(1) == "core"
                words = len(line.split())
                chapter.full.words += words
                chapter.core.words += words if in_core else 0
            continue
        if cell["cell_type"] != "code":
            continue
        if "solution" in cell.get("metadata", {}).get("tags", []):
            here.exercises = 1
        else:
            here.code_cells = 1
        chapter.full.add(here)
        if in_core:
            chapter.core.add(here)
    return chapter


def chapters(paths: list[Path] | None = None) -> list[Chapter]:
    return [estimate(p) for p in (paths or sorted(HERE.glob("[0-9][0-9]-*.ipynb")))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a chapter is untagged or states a time off the estimate")
    args = parser.parse_args(argv)
    found = chapters(args.notebooks or None)
    print(f"{'chapter':<44} {'words':>6} {'cells':>5} {'exerc.':>6}   core / full min"
          f"   stated core / full")
    problems = []
    for c in found:
        stated = f"{c.stated[0]:>4} / {c.stated[1]:<4}" if c.stated else "    (none)"
        print(f"{c.path.name:<44} {c.full.words:>6} {c.full.code_cells:>5} {c.full.exercises:>6}"
              f"   {c.core_minutes:>4} / {c.full_minutes:<4}      {stated}")
        if c.untagged:
            problems.append(f"{c.path.name}: untagged sections: {c.untagged}")
        if c.stated is None:
            problems.append(f"{c.path.name}: the first cell has no two-track time line")
        elif not (within_tolerance(c.stated[0], c.core_minutes)
                  and within_tolerance(c.stated[1], c.full_minutes)):
            problems.append(f"{c.path.name}: states {c.stated[0]} / {c.stated[1]} min, "
                            f"estimated {c.core_minutes} / {c.full_minutes}")
    print(f"{'all':<44} {sum(c.full.words for c in found):>6}"
          f" {sum(c.full.code_cells for c in found):>5} {sum(c.full.exercises for c in found):>6}"
          f"   {sum(c.core_minutes for c in found):>4} / {sum(c.full_minutes for c in found):<4}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
