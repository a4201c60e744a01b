"""The course tells one story: times and figures agree everywhere they are stated (issue 16).

notebooks/AUTHORING.md ("Two tracks, honest times" and "Figures: measured, rendered, one
reference table") states the conventions; these tests hold the chapters, 01's overview, the
README and AUTHORING.md to them:

- **times**: every chapter states both tracks' times in its first cell, close to what
  notebooks/estimate_times.py estimates; 01's overview, the README's course table and
  AUTHORING.md's table list the same times, and each track's total is their sum;
- **drift**: a number with a unit of time, size or ratio in a chapter's Markdown is a setting
  of its code, a figure its saved outputs show, or a reference figure
  (notebooks/reference_figures.json); vague magnitudes ("a few milliseconds", "more than
  twice") never describe a measurement in Markdown; the README states the reference figures
  (CPU per delivery, loopback round trip, memory per connection) with the table's values; and
  each figure named in issue 16, sections 1-2, is rendered from the run or corrected.

Each check is a function of the repository's root returning a list of problems, so that the
planted-contradiction tests can run it on a copy.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "notebooks"))

import estimate_times  # noqa: E402  (notebooks/estimate_times.py)
import figures  # noqa: E402  (notebooks/figures.py)

CHAPTERS = range(1, 13)

# ---- reading the sources ------------------------------------------------------------------

def chapter_path(root: Path, number: int) -> Path:
    (path,) = (root / "notebooks").glob(f"{number:02d}-*.ipynb")
    return path


def cells(root: Path, number: int) -> list[dict]:
    return json.loads(chapter_path(root, number).read_text(encoding="utf-8"))["cells"]


def text(cell: dict) -> str:
    return "".join(cell["source"])


def prose(cell: dict) -> str:
    """A Markdown cell without fenced blocks and inline code (code, not claims)."""
    without_fences = estimate_times.FENCE.sub("", text(cell))
    return re.sub(r"`[^`\n]*`", "", without_fences)


def outputs(cell: dict) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append("".join(output.get("text", "")))
        for mime in ("text/plain", "text/markdown"):
            parts.append("".join(output.get("data", {}).get(mime, "")))
    return "\n".join(parts)


def markdown_outputs(cell: dict) -> str:
    """What a cell rendered with display(Markdown(...))."""
    return "\n".join("".join(o.get("data", {}).get("text/markdown", ""))
                     for o in cell.get("outputs", []))


def all_markdown(root: Path, number: int) -> str:
    return "\n".join(prose(c) for c in cells(root, number) if c["cell_type"] == "markdown")


def all_code(root: Path, number: int) -> str:
    return "\n".join(text(c) for c in cells(root, number) if c["cell_type"] == "code")


def all_outputs(root: Path, number: int) -> str:
    return "\n".join(outputs(c) for c in cells(root, number))


def all_rendered(root: Path, number: int) -> str:
    return "\n".join(markdown_outputs(c) for c in cells(root, number))


# ---- times --------------------------------------------------------------------------------

ROW_01 = re.compile(r"^\| (\d+) \| [^|]+ \| [^|]+ \| (\d+) min \| (\d+) min \|$", re.MULTILINE)
ROW_README = re.compile(
    r"^\| (\d+) \| \[[^]]+\]\(notebooks/[^)]+\) \| .+ \| (\d+) min \| (\d+) min \|$", re.MULTILINE)
ROW_AUTHORING = re.compile(
    r"^\| `(\d\d)-[^`]+` \| [^|]+ \| (\d+) min \| (\d+) min \|$", re.MULTILINE)
TOTAL = re.compile(
    r"^\| \| \*\*all [a-z]+ chapters\*\* \|(?: \|)? \*\*(\d+) min\*\* \| \*\*(\d+) min\*\* \|$",
    re.MULTILINE)


def time_problems(root: Path) -> list[str]:
    problems = []
    stated = {}
    for number in CHAPTERS:
        chapter = estimate_times.estimate(chapter_path(root, number))
        if chapter.stated is None:
            problems.append(f"chapter {number}: the first cell has no line "
                            "'*Core track: about N minutes · full chapter: about M minutes.*'")
            continue
        stated[number] = chapter.stated
        if chapter.untagged:
            problems.append(f"chapter {number}: sections without ' · core' / ' · deep dive': "
                            f"{chapter.untagged}")
        core, full = chapter.stated
        if not (estimate_times.within_tolerance(core, chapter.core_minutes)
                and estimate_times.within_tolerance(full, chapter.full_minutes)):
            problems.append(f"chapter {number}: states {core} / {full} min, the estimate is "
                            f"{chapter.core_minutes} / {chapter.full_minutes} "
                            "(python notebooks/estimate_times.py)")
    sources = {
        "01's overview": (text(cells(root, 1)[0]), ROW_01),
        "README.md": ((root / "README.md").read_text(encoding="utf-8"), ROW_README),
        "notebooks/AUTHORING.md": (
            (root / "notebooks" / "AUTHORING.md").read_text(encoding="utf-8"), ROW_AUTHORING),
    }
    for name, (source, row) in sources.items():
        listed = {int(m.group(1)): (int(m.group(2)), int(m.group(3))) for m in row.finditer(source)}
        for number in CHAPTERS:
            if number not in listed:
                problems.append(f"{name} has no row for chapter {number} with both times")
            elif number in stated and listed[number] != stated[number]:
                problems.append(f"{name} lists chapter {number} as {listed[number][0]} / "
                                f"{listed[number][1]} min, the chapter states "
                                f"{stated[number][0]} / {stated[number][1]}")
        total = TOTAL.search(source)
        sums = (sum(t[0] for t in listed.values()), sum(t[1] for t in listed.values()))
        if total is None:
            problems.append(f"{name} has no total row ('| | **all N chapters** | ...')")
        elif (int(total.group(1)), int(total.group(2))) != sums:
            problems.append(f"{name}'s total says {total.group(1)} / {total.group(2)} min, its "
                            f"rows add up to {sums[0]} / {sums[1]}")
    return problems


# ---- drift: numbers in prose --------------------------------------------------------------

UNIT = r"µs|ms|×|KiB|MiB"
PROSE_FIGURE = re.compile(rf"(?<![\w.])(\d[\d,]*(?:\.\d+)?)\s?({UNIT})(?!\w)")
LITERAL = re.compile(r"(?<![\w.])\d[\d_]*(?:\.\d+)?(?:[eE]-?\d+)?")
TO_CODE_UNITS = {"ms": (1, 1e-3), "µs": (1, 1e-6), "KiB": (1, 1024), "MiB": (1, 1024 ** 2),
                 "×": (1,)}
VAGUE = re.compile(
    r"\b(a few (?:milli|micro)seconds|a few hundredths of a millisecond|(?:around|about) a "
    r"millisecond|a millisecond or (?:so|two)|about a hundred times|more than twice|"
    r"two orders of magnitude)\b", re.IGNORECASE)


# Figures in prose that are neither measured nor a setting of the chapter's code: spec and OS
# values, and arithmetic on the chapter's settings. Keep it short, and say why for each.
NOT_MEASURED = {
    8: {"200 ms": "a common delayed-ACK timer (RFC 1122 allows up to 500 ms)",
        "250 ms": "T/2 of the chapter's 0.5 s poll interval"},
    10: {"256 KiB": "the payload of Autobahn cases 7.1.6 and 9.x.2 (the suite's definitions)"},
}


def decimals(number: str) -> int:
    return len(number.split(".")[1]) if "." in number else 0


def is_reference(number: str, unit: str) -> bool:
    """A reference figure with this unit, as stated or rounded to the prose's precision."""
    value = float(number.replace(",", ""))
    return any(f.unit == unit and round(f.value, decimals(number)) == value
               for f in figures.table().values())


def figure_problems(root: Path, number: int) -> list[str]:
    """Numbers with units in a chapter's Markdown that neither its code, its outputs nor the
    reference table account for, and vague magnitudes standing in for a measurement."""
    code = all_code(root, number)
    literals = {float(x.replace("_", "")) for x in LITERAL.findall(code)}
    shown = all_outputs(root, number)
    problems = []
    for i, cell in enumerate(cells(root, number)):
        if cell["cell_type"] != "markdown":
            continue
        for match in PROSE_FIGURE.finditer(prose(cell)):
            digits, unit = match.groups()
            if match.group(0) in NOT_MEASURED.get(number, {}):
                continue
            value = float(digits.replace(",", ""))
            if any(abs(value * scale - x) <= 1e-9 * max(1.0, x)
                   for scale in TO_CODE_UNITS[unit] for x in literals):
                continue                                   # a setting of the chapter's code
            if re.search(rf"(?<![\d.]){re.escape(digits)}\s?{unit}", shown):
                continue                                   # what its outputs show
            if is_reference(digits, unit):
                continue                                   # notebooks/reference_figures.json
            problems.append(f"chapter {number}, cell {i}: '{match.group(0)}' is not in its code, "
                            "its outputs or the reference figures: render it from the run")
        for match in VAGUE.finditer(prose(cell)):
            problems.append(f"chapter {number}, cell {i}: '{match.group(0)}' in Markdown: render "
                            "the measured figure instead (AUTHORING.md, the drift rule)")
    return problems


README_FIGURE_LINES = {
    # quantity (as README words it): a line matching this states figures of that kind
    "CPU per delivery": (re.compile(r"per delivery|µs/delivery|µs each"), "µs"),
    "loopback round trip": (re.compile(r"loopback.*round trip|round trip.*loopback", re.I), "ms"),
    "memory per connection": (re.compile(r"per connection"), "KiB"),
}


def readme_problems(root: Path) -> list[str]:
    """README.md states CPU per delivery, loopback RTT and memory per connection as the table
    of reference figures has them (rounded to the README's precision)."""
    problems = []
    readme = (root / "README.md").read_text(encoding="utf-8")
    for line_number, line in enumerate(readme.splitlines(), 1):
        for quantity, (names, unit) in README_FIGURE_LINES.items():
            if not names.search(line):
                continue
            for digits in re.findall(rf"(?<![\w.])(\d+(?:\.\d+)?)\s?{unit}\b", line):
                if not is_reference(digits, unit):
                    problems.append(f"README.md line {line_number}: {quantity} '{digits} {unit}' "
                                    "is not in notebooks/reference_figures.json")
    return problems


# ---- the figures of issue 16, sections 1-2 -------------------------------------------------

def must(condition: bool, message: str) -> list[str]:
    return [] if condition else [message]


def cell_with(root: Path, number: int, needle: str, kind: str = "code") -> dict:
    hits = [c for c in cells(root, number) if c["cell_type"] == kind and needle in text(c)]
    assert len(hits) == 1, f"chapter {number}: {len(hits)} cells contain {needle!r}"
    return hits[0]


def issue_16_01(root):   # c12 "a few milliseconds" beside a 76.5 ms slowest answer
    rendered = markdown_outputs(cell_with(root, 1, "the slowest **"))
    return must("slowest" in rendered and "median" in rendered,
                "01: the slowest and median answers outside the band are rendered by the cell")


def issue_16_03(root):   # c19 "about a hundred times" (49x); recap "no traffic" vs 144/hour
    rendered = all_rendered(root, 3)
    recap = prose(cell_with(root, 3, "## Recap", "markdown"))
    return (must(re.search(r"\*\*\d+×\*\* long polling's", rendered) is not None,
                 "03: the latency ratio of the 0.25 s poller is rendered from the table")
            + must("no traffic at all" not in all_markdown(root, 3),
                   "03: the recap says 'no traffic at all' while quiet; c23 counts 144 an hour")
            + must("144" in recap, "03: the recap states the quiet hour's 144 requests"))


def issue_16_04(root):   # c5 chunk size; c13 quoted code; c18 probe; c37 1.88x and 1.95 ms
    rendered = all_rendered(root, 4)
    chunks = re.findall(r"`([0-9a-f]+)` \((\d+) bytes\)", rendered)
    markdown = all_markdown(root, 4)
    return (must(bool(chunks) and all(int(h, 16) == int(n) for h, n in chunks),
                 "04: the chunk sizes are rendered from the stream, hex and decimal agreeing")
            + must(not re.search(r"\d+-byte \(`[0-9a-f]+`\)", "".join(
                text(c) for c in cells(root, 4) if c["cell_type"] == "markdown")),
                   "04: a chunk size is typed into Markdown")
            + must("last_event_id.isdigit()" not in "".join(text(c) for c in cells(root, 4)),
                   "04: the quoted `last_event_id.isdigit()` is not the server's code")
            + must("def cursor(" in rendered and "last-event-id" in rendered,
                   "04: the server's cursor code is printed from chatlib")
            + must("200 OK" in outputs(cell_with(root, 4, 'int("²")')),
                   "04: a Last-Event-ID of '²' gets 200 (ignored), not a crash")
            + must("different TCP connection" in markdown or "*another* TCP connection" in
                   "".join(text(c) for c in cells(root, 4)),
                   "04: what the presence probe cannot show (another TCP connection)")
            + must(re.search(r"\*\*\d+\.\d+×\*\* SSE's bytes", rendered) is not None,
                   "04: the bytes ratio of long polling to SSE is rendered"))


def issue_16_05(root):   # c26 cookies today; c29 a table; c32-33 three methods, no "ticket"
    markdown = "".join(text(c) for c in cells(root, 5) if c["cell_type"] == "markdown")
    code = all_code(root, 5)
    return (must("Total Cookie Protection" in markdown and "| Chromium" in markdown,
                 "05: what browsers do today is a table (Chromium, Firefox, Safari)")
            + must("WebSockets since 147" in markdown or "WebSocket" in markdown
                   and "Local Network Access" in markdown,
                   "05: Local Network Access covers WebSockets in current Chromium")
            + must("(a ticket)" not in code, "05: a reusable ?token= is labelled a ticket")
            + must("1008" in outputs(cell_with(root, 5, "first_message_auth(ws)")),
                   "05: the first-message method is shown live (closed with 1008)"))


def issue_16_06(root):   # c34 ended with the 1009 section's intro before the UTF-8 demo
    chapter = cells(root, 6)
    (demo,) = [i for i, c in enumerate(chapter)
               if c["cell_type"] == "code" and "codecs" in text(c)]
    return must("1009" not in text(chapter[demo - 1]),
                "06: the text before the UTF-8 decoder demo introduces the 1009 section")


def issue_16_07(root):   # c11: RFC 6455 section 7.4.1 also defines 1015
    return must("1015" in all_markdown(root, 7) + all_code(root, 7),
                "07: close code 1015 (RFC 6455, 7.4.1) is missing")


def issue_16_08(root):   # c21 netem is from chapter 2; c38-40 a clamped "0 µs per delivery"
    shown = all_outputs(root, 8)
    return (must(not re.search(r"\(\s*0 µs per delivery\)", shown),
                 "08: a clamped '0 µs per delivery' is shown")
            + must(not re.search(r"netem[^.]{0,80}chapter 5|chapter 5[^.]{0,80}netem",
                                 all_markdown(root, 8)),
                   "08: netem is introduced in chapter 2, not 5"))


def issue_16_09(root):   # 3 µs per delivery; "pipelines"; lifetime; pub/sub adapters; retention
    everything = all_markdown(root, 9) + all_code(root, 9) + all_outputs(root, 9)
    return (must(not re.search(r"(?<![\d.])3 µs", everything),
                 "09: plans with 3 µs per delivery (an old burst figure)")
            + must("pipelines them" not in everything, "09: concurrent commands called pipelining")
            + must("lifetime" in everything or "maximum life" in everything,
                   "09: proxies that cap a connection's total lifetime")
            + must("Redis Streams" in everything,
                   "09 c0: only Socket.IO's Redis Streams adapter resumes; pub/sub does not")
            + must("MAXLEN" in "".join(map(text, cells(root, 9))) and "retention" in everything,
                   "09 c6: a reader resumes only within retention (XADD MAXLEN ~)"))


def issue_16_10(root):   # same-origin vs DNS rebinding; Autobahn labels; RST after CLOSE
    markdown = all_markdown(root, 10)
    return (must("rebinding" in markdown, "10: same-origin by Host alone: DNS rebinding")
            + must("NON-STRICT" in markdown, "10: Autobahn grades decode-at-end NON-STRICT")
            + must("6.4.1 invalid UTF-8 in a first fragment" not in markdown,
                   "10: the label of Autobahn case 6.4.1")
            + must("RST" in markdown and "linger" in markdown,
                   "10: a CLOSE then close() with unread input may send RST: linger"))


ISSUE_16: dict[int, Callable[[Path], list[str]]] = {
    1: issue_16_01, 3: issue_16_03, 4: issue_16_04, 5: issue_16_05, 6: issue_16_06, 7: issue_16_07,
    8: issue_16_08, 9: issue_16_09, 10: issue_16_10,
}


# ---- the tests ----------------------------------------------------------------------------

def test_times_agree_everywhere_and_add_up():
    assert time_problems(ROOT) == []


@pytest.mark.parametrize("number", CHAPTERS)
def test_prose_figures_come_from_the_run_or_the_reference_table(number):
    assert figure_problems(ROOT, number) == []


@pytest.mark.parametrize("number", sorted(ISSUE_16))
def test_issue_16_figures_are_rendered_or_corrected(number):
    assert ISSUE_16[number](ROOT) == []


def test_readme_states_the_reference_figures():
    assert readme_problems(ROOT) == []


@pytest.fixture
def copy(tmp_path):
    """The chapters, AUTHORING.md, the reference table and README.md, to plant errors in."""
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return tmp_path


def plant(root: Path, number: int, needle: str, old: str, new: str) -> None:
    path = chapter_path(root, number)
    notebook = json.loads(path.read_text(encoding="utf-8"))
    (cell,) = [c for c in notebook["cells"] if needle in "".join(c["source"])]
    source = "".join(cell["source"])
    assert old in source
    cell["source"] = source.replace(old, new, 1)
    path.write_text(json.dumps(notebook, ensure_ascii=False), encoding="utf-8")


def test_a_typed_figure_that_contradicts_the_outputs_fails(copy):
    plant(copy, 3, "## Recap", "We measured a latency of one HTTP response time",
          "We measured a latency of 987.6 ms")
    assert not any("'987.6 ms'" in p for p in figure_problems(ROOT, 3))
    assert any("'987.6 ms' is not in its code, its outputs or the reference figures" in p
               for p in figure_problems(copy, 3))


def test_a_vague_magnitude_in_prose_fails(copy):
    plant(copy, 4, "**Reading the plot.**", "(its median is in the line under the table)",
          "(usually around a millisecond)")
    assert any("around a millisecond" in p for p in figure_problems(copy, 4))


def test_a_chapter_time_that_disagrees_with_the_tables_fails(copy):
    plant(copy, 2, "*Core track:", "*Core track: about 20 minutes", "*Core track: about 25 minutes")
    assert any("README.md lists chapter 2" in p for p in time_problems(copy))


def test_a_total_that_is_not_the_sum_fails(copy):
    readme = copy / "README.md"
    text_ = readme.read_text(encoding="utf-8")
    total = TOTAL.search(text_)
    readme.write_text(text_.replace(total.group(0), total.group(0).replace(
        f"**{total.group(1)} min**", f"**{int(total.group(1)) + 5} min**", 1)), encoding="utf-8")
    assert any("README.md's total" in p for p in time_problems(copy))


def test_the_readme_and_the_table_disagreeing_fails(copy):
    readme = copy / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8")
                      + "\nOne delivery costs 3 µs per delivery here.\n", encoding="utf-8")
    assert any("'3 µs'" in p for p in readme_problems(copy))
    # ... and so does a chapter quoting the table's quantity with another value
    plant(copy, 4, "**Reading the plot.**", "(its median is in the line under the table)",
          "(the benchmark's 27 µs per delivery)")
    assert any("'27 µs'" in p for p in figure_problems(copy, 4))


def test_a_reverted_issue_16_figure_fails(copy):
    plant(copy, 3, "## Recap", "while the chat is quiet one request per timeout",
          "no traffic at all while the chat is quiet, one request per timeout")
    assert issue_16_03(copy)


def test_every_reference_figure_names_its_regime_and_source():
    rows = json.loads(figures.TABLE.read_text(encoding="utf-8"))["figures"]
    assert rows
    for key, row in rows.items():
        assert set(row) == {"quantity", "regime", "value", "unit", "source"}, key
        assert row["regime"] and row["source"].startswith("bench/"), key
        assert isinstance(row["value"], (int, float)), key


def test_quote_renders_value_unit_and_regime():
    text_ = figures.quote("cpu_ws_in_flight_n1000")
    assert text_.startswith("12.62 µs (") and "one message in flight" in text_
    with pytest.raises(KeyError, match="not a reference figure"):
        figures.quote("cpu_per_delivery")


def test_estimate_counts_words_cells_and_exercises_per_track(tmp_path):
    def cell(kind, source, tags=()):
        return {"cell_type": kind, "source": source, "metadata": {"tags": list(tags)}}

    path = tmp_path / "99-x.ipynb"
    title = "# Title\n\n*Core track: about 5 minutes · full chapter: about 20 minutes.*"
    path.write_text(json.dumps({"cells": [
        cell("markdown", title),
        cell("markdown", "## One · core\n" + "word " * 300),
        cell("code", "print(1)"),
        cell("markdown", "## Two · deep dive\n```python\nnot counted\n```\n" + "word " * 150),
        cell("code", "x = 1"),
        cell("code", "# Solution", ["solution"]),
    ]}), encoding="utf-8")
    chapter = estimate_times.estimate(path)
    assert chapter.untagged == []
    assert (chapter.core.words, chapter.core.code_cells, chapter.core.exercises) == (
        len(title.split()) + len("## One · core".split()) + 300, 1, 0)
    assert (chapter.full.code_cells, chapter.full.exercises) == (2, 1)
    assert chapter.stated == (5, 20)
    assert chapter.core_minutes == 5 and chapter.full_minutes == 10
