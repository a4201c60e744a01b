"""chatlib.browser.unavailable(): a Chromium that is present but cannot start counts as missing.

Two fake binaries stand in for the broken installs learners meet (issue 22): a ``chromium``
file without execute permission (Playwright: ``spawn ... EACCES``, as with Ubuntu's snap shim
inside a container) and an executable that exits 1 at once. Each is tried in this process
(the module's ``CHROMIUM`` swapped) and in a real kernel through nbclient, with the
``CHROMIUM`` environment variable the Makefile exports, from a notebook cell (a running
event loop).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from chatlib import browser

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def fakes(tmp_path: Path) -> dict[str, Path]:
    """``{"not executable": path, "exits 1": path, "missing": path}``."""
    not_executable = tmp_path / "not-executable" / "chromium"
    not_executable.parent.mkdir()
    not_executable.write_text("#!/bin/sh\nexec /usr/bin/chromium \"$@\"\n")
    not_executable.chmod(0o644)
    exits_1 = tmp_path / "exits-1" / "chromium"
    exits_1.parent.mkdir()
    exits_1.write_text("#!/bin/sh\necho 'chromium: broken install' >&2\nexit 1\n")
    exits_1.chmod(0o755)
    return {"not executable": not_executable, "exits 1": exits_1,
            "missing": tmp_path / "missing" / "chromium"}


@pytest.fixture
def swap_chromium(monkeypatch):
    """``swap_chromium(path)``: this process's ``browser.CHROMIUM`` becomes ``path``."""
    monkeypatch.delenv("CHATLIB_NO_BROWSER", raising=False)

    def swap(path) -> None:
        monkeypatch.setattr(browser, "CHROMIUM", str(path))

    yield swap
    browser._start_once.cache_clear()


EXPECTED = {  # what the one line says, besides the path and the fix
    "not executable": "EACCES",
    "exits 1": "cannot start",
    "missing": "No Chromium at",
}


def check_line(line: str | None, kind: str, path: Path) -> None:
    assert line is not None, f"a {kind} Chromium counted as available"
    assert "\n" not in line, line
    assert str(path) in line and EXPECTED[kind] in line, line
    assert "CHROMIUM environment variable" in line and "apt-get install chromium" in line, line


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_broken_or_missing_chromium_is_unavailable_with_one_line(kind, fakes, swap_chromium):
    swap_chromium(fakes[kind])
    check_line(browser.unavailable(), kind, fakes[kind])


def test_the_environment_variable_is_honoured_and_no_browser_wins(fakes, monkeypatch):
    """A fresh interpreter reads $CHROMIUM at import; CHATLIB_NO_BROWSER needs no binary."""
    import subprocess

    code = "from chatlib import browser; print(browser.CHROMIUM); print(browser.unavailable())"
    env = {**os.environ, "CHROMIUM": str(fakes["exits 1"])}
    env.pop("CHATLIB_NO_BROWSER", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    assert out[0] == str(fakes["exits 1"])
    check_line(out[1], "exits 1", fakes["exits 1"])

    monkeypatch.setenv("CHATLIB_NO_BROWSER", "1")
    assert "CHATLIB_NO_BROWSER" in browser.unavailable()


def test_a_working_chromium_is_available(swap_chromium):
    swap_chromium(browser.CHROMIUM)
    if not os.access(browser.CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {browser.CHROMIUM} (make chromium)")
    assert browser.unavailable() is None


def test_a_notebook_cell_gets_the_line_for_a_broken_chromium(fakes, monkeypatch):
    """In a kernel (a running event loop) the trial start works and the fallback is taken."""
    monkeypatch.delenv("CHATLIB_NO_BROWSER", raising=False)
    monkeypatch.setenv("CHROMIUM", str(fakes["not executable"]))  # the kernel inherits it
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import asyncio\n"
        "from chatlib import browser\n"
        "reason = browser.unavailable()\n"
        "await asyncio.sleep(0)  # this cell runs inside the kernel's event loop\n"
        "print('fallback:', reason) if reason else print('Chromium')\n")])
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    printed = "".join(o.get("text", "") for o in notebook.cells[0].outputs)
    assert printed.startswith("fallback: "), printed
    check_line(printed.removeprefix("fallback: ").strip(), "not executable",
               fakes["not executable"])
