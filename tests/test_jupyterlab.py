"""The ChatPanel in a real JupyterLab, in a real browser, as a learner would use it.

``jupyter lab`` runs as a subprocess (127.0.0.1, a free port, no token, its own HOME,
runtime, config and data directories, so nothing of the machine's Jupyter setup leaks in;
the venv's lab extensions and kernelspec are still found through ``sys.prefix``).

``test_notebook7_panel_chats_with_the_browser_page``: headless Chromium opens
``07-chat-notebook-and-browser.ipynb``, runs all cells, and then:

* the ChatPanel widget renders (so the anywidget lab extension works) and says connected;
* the chat page whose URL the notebook prints, opened in a second page as ``visitor``,
  sends a message that shows up in the panel's log, in view (the log follows new messages);
* text typed into the panel's input box (Enter) shows up on the chat page;
* typing notices go both ways, and both views show the same messages, once each, in order.

``test_panel_as_a_chat_window`` drives a small notebook of its own (``panel.ipynb``: a
server and a panel) the way a person chats, and measures:

* 20 messages typed at 10 ms and at 80 ms per key, JupyterLab's tab in front and behind
  another page, half sent with Enter and half with the Send button: each arrives at the
  chat page whole and once, in order, and the box is empty after each send;
* latency panel -> page and page -> panel (median, p95), printed (not asserted: limits
  on wall-clock time belong in bench/, not in tests on a shared machine);
* presence, typing, times as the page shows them, own messages on the right, the unread
  marker, a message typed while the server is down (pending, then sent once), the error
  in the status line, the notebook closed and reopened while its kernel runs (the saved
  copy shows the panel's line; displayed again, the panel is redrawn from the kernel's
  state), and what the saved notebook holds for readers without a kernel.

``test_a_saved_panel_reopened_with_a_new_kernel_says_run_the_cells``: saved with a live
panel, the kernel stopped, reopened: the cell says to run the cells, not "Error displaying
widget: model not found" (chatlib.save_hook; tests/test_notebook7.py does it in Notebook 7).

Screenshots go to tests/artifacts/ (jupyterlab-notebook7.png, panel-light.png,
panel-dark.png, panel-reconnecting.png, reopened-lab.png, reopened-lab-state.png).

Teardown stops JupyterLab with SIGTERM (it shuts its kernels down), SIGKILL after a bounded
wait, and then checks that no process it started (kernel, the kernel's own headless
Chromium) is left; any that is, is killed and reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from contrast import contrast
from helpers import free_port, needs_chromium
from playwright.async_api import async_playwright, expect

from chatlib.browser import launch

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "07-chat-notebook-and-browser.ipynb"
ARTIFACTS = Path(__file__).parent / "artifacts"
JUPYTER = Path(sys.prefix) / "bin" / "jupyter"

pytestmark = [
    needs_chromium(),
    pytest.mark.skipif(not JUPYTER.exists(), reason=f"no jupyter at {JUPYTER}"),
    pytest.mark.timeout(300),
]

STARTUP_S = 60         # jupyter lab answering /api/status
KERNEL_IDLE_MS = 60_000
RUN_ALL_S = 120        # every cell of notebook 7 (it takes ~10 s here)
UI_MS = 20_000         # a widget, a message, a status to show up


# -- processes (from /proc: psutil is not a dependency of the course) -------------------


def process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (ppid, start time)}`` of every process we can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it just ended
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(root: int) -> dict[int, int]:
    """``{pid: start time}`` of every process below ``root``."""
    table = process_table()
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:  # bounded: each pid is visited once
        parent = frontier.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def alive(pids: dict[int, int]) -> dict[int, int]:
    """Those of ``pids`` still running (the same process: same start time, not a zombie)."""
    table = process_table()
    left = {}
    for pid, start in pids.items():
        if table.get(pid, (0, None))[1] != start:
            continue
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                left[pid] = start
    return left


def wait_gone(pids: dict[int, int], timeout: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = alive(left)
    return left


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


# -- JupyterLab ---------------------------------------------------------------------------


def write_lab_settings(config_dir: Path) -> None:
    """User settings of the isolated JupyterLab.

    * Start the notebook's kernel without asking: JupyterLab 4.6 otherwise opens a
      "Select Kernel" dialog for a notebook opened by URL in a fresh profile.
    * No news / update checks (they would reach out to the internet).
    """
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab"
    files = {
        "docmanager-extension/plugin.jupyterlab-settings": {"autoStartDefaultKernel": True},
        "apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false", "checkForUpdates": False},
    }
    for name, value in files.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


PANEL_NOTEBOOK = "panel.ipynb"


def write_panel_notebook(path: Path) -> None:
    """A server and a panel; generous rate limits, so that typing fast tests the panel."""
    cells = [
        "import chatlib\n"
        "server = await chatlib.start_server(limits=chatlib.Limits(rate=100, burst=200))\n"
        "panel = chatlib.ChatPanel(server, user='notebook')\n"
        "panel",
        "print(f'open {server.url} in a browser tab')",
    ]
    notebook = {
        "cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                   "source": source} for source in cells],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook))


APP_OPTIONS = {
    "lab": ["--LabApp.expose_app_in_browser=True",  # window.jupyterapp, to drive commands
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
    "notebook": ["--JupyterNotebookApp.expose_app_in_browser=True"],  # Notebook 7
}


@pytest.fixture
def jupyter_lab(tmp_path):
    """A running ``jupyter lab`` serving a copy of notebook 7; see :func:`running_jupyter`."""
    with running_jupyter(tmp_path, "lab") as lab:
        yield lab


@contextlib.contextmanager
def running_jupyter(tmp_path: Path, app: str):
    """``jupyter <app>`` (``lab`` or ``notebook``) serving copies of chapter 7 and panel.ipynb.

    Yields ``{"base": URL, "log": path, "remember_children": callable, "root": folder,
    "config": its JUPYTER_CONFIG_DIR}``.
    """
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root)
    write_panel_notebook(root / PANEL_NOTEBOOK)
    write_lab_settings(tmp_path / "config")
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_TOKEN", None)
    port = free_port()
    log_path = tmp_path / "jupyter-lab.log"
    command = [
        str(JUPYTER), app, "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--IdentityProvider.token=", "--PasswordIdentityProvider.hashed_password=",
        f"--ServerApp.root_dir={root}",
        *APP_OPTIONS[app],
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers and CI often run as root
    base = f"http://127.0.0.1:{port}/"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=root, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    started: dict[int, int] = {}
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:  # bounded by the deadline
            if process.poll() is not None:
                pytest.fail(f"jupyter {app} exited ({process.returncode}):\n"
                            + log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(base + "api/status", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter {app} not ready in {STARTUP_S} s:\n"
                            + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

        def remember_children():
            started.update(descendants(process.pid))

        yield {"base": base, "log": log_path, "remember_children": remember_children,
               "root": root, "config": tmp_path / "config"}
    finally:
        started.update(descendants(process.pid))  # the kernel and what it started
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # shuts its kernels down too
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # Kernels run in sessions of their own, outside jupyter lab's process group.
        survivors = wait_gone(started, timeout=15)
        described = {pid: cmdline(pid) for pid in survivors}
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(survivors, timeout=5)
    assert not described, f"processes outlived jupyter {app}: {described}"


# "ename: evalue" of every error output in the open notebook (errors render as stderr text,
# so the model is the reliable place to look).
ERROR_OUTPUTS_JS = """() => {
    const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
    const found = [];
    for (let i = 0; i < cells.length; i++) {
        const cell = cells.get(i);
        if (cell.type !== 'code') continue;
        for (let j = 0; j < cell.outputs.length; j++) {
            const output = cell.outputs.get(j).toJSON();
            if (output.output_type === 'error') found.push(`${output.ename}: ${output.evalue}`);
        }
    }
    return found;
}"""


async def kernel_idle(page) -> None:
    await page.wait_for_function(
        "() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session"
        "?.kernel?.status === 'idle'", timeout=KERNEL_IDLE_MS)


async def run_all_cells(lab) -> None:
    """Run every cell of the open notebook (bounded by RUN_ALL_S); no cell may show an error."""
    ok = await lab.evaluate(
        """(ms) => Promise.race([
            window.jupyterapp.commands.execute('notebook:run-all-cells'),
            new Promise((resolve) => setTimeout(() => resolve('timeout'), ms)),
        ])""", RUN_ALL_S * 1000)
    errors = await lab.evaluate(ERROR_OUTPUTS_JS)
    assert ok is True and not errors, f"run all cells: {ok!r}, errors: {errors}"


async def shown_in_log(message) -> bool:
    """Is the message drawn inside the log's box (not scrolled away, not spilling out)?"""
    return await message.evaluate(
        """(m) => {
            const r = m.getBoundingClientRect();
            const box = m.closest('.chatlib-log').getBoundingClientRect();
            return r.height > 0 && r.top >= box.top - 1 && r.bottom <= box.bottom + 1;
        }""")


async def test_notebook7_panel_chats_with_the_browser_page(jupyter_lab):
    await chapter7_panel_chats(jupyter_lab, "lab/tree/" + NOTEBOOK.name,
                               "jupyterlab-notebook7.png")


async def chapter7_panel_chats(jupyter_lab: dict, path: str, screenshot: str) -> None:
    """Run all of chapter 7 at ``path`` (of JupyterLab or Notebook 7) and chat both ways."""
    base = jupyter_lab["base"]
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            lab_context = await browser.new_context(viewport={"width": 1300, "height": 1000})
            lab = await lab_context.new_page()
            await lab.goto(base + path)
            await kernel_idle(lab)
            jupyter_lab["remember_children"]()  # the kernel, in case teardown can't see it

            # The committed outputs must not count: clear them, then run everything.
            await lab.evaluate(
                "() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
            await expect(lab.locator(".chatlib-panel")).to_have_count(0)
            await run_all_cells(lab)
            await kernel_idle(lab)
            jupyter_lab["remember_children"]()

            # The panel (a widget view: the lab extension works) is connected. It is shown
            # twice (first and last cell); the last one is where a learner keeps chatting.
            panel = lab.locator(".chatlib-panel").last
            await expect(panel).to_be_visible(timeout=UI_MS)
            await expect(panel.locator(".chatlib-state")).to_have_text("connected",
                                                                      timeout=UI_MS)
            log = panel.locator(".chatlib-log")

            # The URL the notebook tells the learner to open.
            printed = await lab.locator(".jp-OutputArea-output").filter(
                has_text="in a browser tab").last.text_content()
            match = re.search(r"open (http://127\.0\.0\.1:\d+/) in a browser tab", printed)
            assert match, printed
            chat_url = match.group(1)

            visitor_context = await browser.new_context(viewport={"width": 900, "height": 700})
            visitor = await visitor_context.new_page()
            page_errors: list[str] = []
            visitor.on("pageerror", lambda exc: page_errors.append(str(exc)))
            await visitor.goto(chat_url + "?user=visitor&transport=ws")
            await expect(visitor.locator("#status")).to_have_attribute(
                "data-state", "connected", timeout=UI_MS)
            await expect(visitor.locator("#transport")).to_have_text("ws")
            await expect(visitor.locator("#presence li").filter(
                has_text=re.compile(r"^notebook$"))).to_have_count(1, timeout=UI_MS)

            # Browser page -> panel.
            await visitor.locator("#message-input").press_sequentially("hel", delay=20)
            await expect(panel).to_contain_text("visitor is typing…", timeout=UI_MS)
            await visitor.fill("#message-input", "Hello panel, a visitor here!")
            await visitor.press("#message-input", "Enter")
            from_visitor = log.locator(".chatlib-history .chatlib-msg").filter(
                has_text="Hello panel, a visitor here!")
            await expect(from_visitor).to_have_count(1, timeout=UI_MS)
            await expect(from_visitor.locator(".chatlib-user")).to_have_text("visitor")
            # ... and in view: the log follows the newest message.
            await panel.scroll_into_view_if_needed()
            await expect(from_visitor).to_be_in_viewport(timeout=UI_MS)
            assert await shown_in_log(from_visitor)

            # Panel -> browser page, typed into the widget's input box, sent with Enter.
            box = panel.locator("input.chatlib-input")
            await box.click()
            await box.press_sequentially("Hello visitor", delay=20)
            await expect(visitor.locator("#typing")).to_have_text("notebook is typing…",
                                                                  timeout=UI_MS)
            shown = visitor.locator("#messages li.message .text")
            before = await shown.count()
            await box.press_sequentially(", this is the notebook.", delay=5)
            await box.press("Enter")
            text = "Hello visitor, this is the notebook."
            await expect(shown).to_have_count(before + 1, timeout=UI_MS)
            sent = await shown.last.text_content()
            assert sent == text, f"typed {text!r} + Enter, the panel sent {sent!r}"
            await expect(box).to_have_value("", timeout=UI_MS)  # the panel cleared its box
            mine = log.locator(".chatlib-history .chatlib-msg").filter(has_text=text)
            await expect(mine).to_have_count(1, timeout=UI_MS)
            await expect(mine).to_be_in_viewport(timeout=UI_MS)
            assert await shown_in_log(mine)

            # Both views show the same messages, each once, in id order.
            await expect(log.locator(".chatlib-outbox li")).to_have_count(0, timeout=UI_MS)
            panel_ids = [int(i) for i in await log.locator(
                ".chatlib-history .chatlib-msg").evaluate_all("els => els.map(e => e.dataset.id)")]
            page_ids = await visitor.eval_on_selector_all(
                "#messages li.message", "els => els.map(e => Number(e.dataset.id))")
            assert len(panel_ids) == len(set(panel_ids)), panel_ids
            assert all(a < b for a, b in zip(panel_ids, panel_ids[1:], strict=False))
            assert page_ids == panel_ids, (page_ids, panel_ids)
            assert not page_errors, page_errors

            ARTIFACTS.mkdir(exist_ok=True)
            await lab.screenshot(path=str(ARTIFACTS / screenshot))
        finally:
            await browser.close()


# -- the panel as a chat window -----------------------------------------------------------

# Timestamps are performance.timeOrigin + performance.now(): milliseconds on one clock for
# every page of the browser, to a fraction of a millisecond.
NOW_JS = "(performance.timeOrigin + performance.now())"

# In the JupyterLab page: when Enter or Send hands a text to the panel (capture phase, so
# before the panel's own handler empties the box), and when a message row is drawn.
PANEL_PROBE_JS = f"""() => {{
    window.__sent = [];
    window.__drawn = [];
    const input = () => document.querySelector('.chatlib-panel input.chatlib-input');
    document.addEventListener('keydown', (e) => {{
        if (e.key === 'Enter' && e.target.matches('input.chatlib-input'))
            window.__sent.push({{text: e.target.value, t: {NOW_JS}, how: 'enter'}});
    }}, true);
    document.addEventListener('click', (e) => {{
        if (e.target.closest('.chatlib-send'))
            window.__sent.push({{text: input().value, t: {NOW_JS}, how: 'button'}});
    }}, true);
    window.__watchPanel = () => {{
        const list = document.querySelector('.chatlib-panel .chatlib-history');
        new MutationObserver((records) => {{
            const t = {NOW_JS};
            for (const r of records) for (const n of r.addedNodes)
                if (n.classList && n.classList.contains('chatlib-msg'))
                    window.__drawn.push({{text: n.querySelector('.chatlib-text').textContent,
                                          user: n.querySelector('.chatlib-user').textContent, t}});
        }}).observe(list, {{childList: true}});
    }};
    window.__watchPanel();
}}"""

# In the chat page: the same two events.
PAGE_PROBE_JS = f"""() => {{
    window.__sent = [];
    window.__drawn = [];
    document.addEventListener('keydown', (e) => {{
        if (e.key === 'Enter' && e.target.id === 'message-input')
            window.__sent.push({{text: e.target.value, t: {NOW_JS}}});
    }}, true);
    new MutationObserver((records) => {{
        const t = {NOW_JS};
        for (const r of records) for (const n of r.addedNodes)
            if (n.classList && n.classList.contains('message'))
                window.__drawn.push({{text: n.querySelector('.text').textContent,
                                      user: n.querySelector('.user').textContent, t}});
    }}).observe(document.getElementById('messages'), {{childList: true}});
}}"""


def latencies(sent: list[dict], drawn: list[dict], texts: list[str]) -> list[float]:
    """Milliseconds from handing each text over to seeing it drawn on the other side."""
    t_sent = {s["text"]: s["t"] for s in sent}
    t_drawn = {d["text"]: d["t"] for d in drawn}
    return [t_drawn[text] - t_sent[text] for text in texts]


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"median {statistics.median(ordered):6.1f} ms, p95 {p95:6.1f} ms, "
            f"max {ordered[-1]:6.1f} ms (n={len(ordered)})")


SAVED_PANEL_LINE = "Run the notebook's cells to join the chat"
"""What a saved ChatPanel output says (its text/html and text/plain), with no widget view."""


async def run_new_cell(lab, code: str) -> None:
    """Add a cell below the active one with ``code`` and run it, as a learner would."""
    await lab.evaluate(
        """async (code) => {
            const app = window.jupyterapp;
            await app.commands.execute('notebook:insert-cell-below');
            app.shell.currentWidget.content.activeCell.model.sharedModel.setSource(code);
            await app.commands.execute('notebook:run-cell');
        }""", code)


async def open_panel_notebook(browser, jupyter_lab):
    """Open ``panel.ipynb`` in JupyterLab and run all its cells (a server and a panel).

    Returns JupyterLab's page, the list its uncaught errors go to, and the panel, connected.
    """
    lab = await (await browser.new_context(viewport={"width": 1100, "height": 900})).new_page()
    errors: list[str] = []
    lab.on("pageerror", lambda exc: errors.append(str(exc)))
    await lab.goto(jupyter_lab["base"] + "lab/tree/" + PANEL_NOTEBOOK)
    await kernel_idle(lab)
    jupyter_lab["remember_children"]()  # the kernel, in case teardown can't see it
    await run_all_cells(lab)
    await kernel_idle(lab)
    jupyter_lab["remember_children"]()
    panel = lab.locator(".chatlib-panel")
    await expect(panel).to_have_attribute("data-state", "connected", timeout=UI_MS)
    return lab, errors, panel


async def run_in_kernel(lab, code: str) -> None:
    """Run ``code`` in the notebook's kernel (as a cell would) and wait until it is done."""
    status = await lab.evaluate(
        """async (code) => {
            const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            const reply = await kernel.requestExecute({code}).done;
            return reply.content.status;
        }""", code)
    assert status == "ok", f"{code!r}: {status}"


@pytest.mark.timeout(600)
async def test_panel_as_a_chat_window(jupyter_lab):
    report: list[str] = []
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            lab, lab_errors, panel = await open_panel_notebook(browser, jupyter_lab)
            lab_context = lab.context
            # Accessible: a labelled input, a live log.
            box = lab.get_by_label("Message to the chat, as notebook")
            await expect(box).to_have_count(1)
            history = panel.locator(".chatlib-history")
            await expect(history).to_have_attribute("aria-live", "polite")
            await expect(history).to_have_attribute("role", "log")
            await expect(panel.locator(".chatlib-kernel-note")).to_be_hidden(timeout=UI_MS)
            send_button = panel.locator(".chatlib-send")
            outbox = panel.locator(".chatlib-outbox li")

            printed = await lab.locator(".jp-OutputArea-output").filter(
                has_text="in a browser tab").last.text_content()
            chat_url = re.search(r"open (http://127\.0\.0\.1:\d+/) in a browser tab",
                                 printed).group(1)
            visitor_context = await browser.new_context(viewport={"width": 900, "height": 700})
            visitor = await visitor_context.new_page()
            page_errors: list[str] = []
            visitor.on("pageerror", lambda exc: page_errors.append(str(exc)))
            await visitor.goto(chat_url + "?user=visitor&transport=ws")
            await expect(visitor.locator("#status")).to_have_attribute(
                "data-state", "connected", timeout=UI_MS)
            await expect(panel.locator(".chatlib-presence .chatlib-person").filter(
                has_text=re.compile("^visitor$"))).to_have_count(1, timeout=UI_MS)
            await lab.evaluate(PANEL_PROBE_JS)
            await visitor.evaluate(PAGE_PROBE_JS)

            # -- typing into the panel: fast and slow, in front and behind, Enter and Send
            other = await lab_context.new_page()  # the page in front of JupyterLab's tab
            await other.goto(chat_url + "static/style.css")
            received = visitor.locator("#messages li.message")
            typed: list[str] = []
            panel_to_page: dict[str, list[float]] = {}
            for delay, words in ((10, "the quick brown fox jumps #{i}."), (80, "hi #{i}.")):
                for front in (True, False):
                    await (lab if front else other).bring_to_front()
                    visibility = await lab.evaluate("document.visibilityState")
                    phase = f"{delay:2d} ms/key, JupyterLab {'in front' if front else 'behind'}"
                    texts = [f"k{delay}{'f' if front else 'b'}-{i:02d} " + words.format(i=i)
                             for i in range(20)]
                    await box.focus()
                    before = await received.count()
                    for i, text in enumerate(texts):
                        await box.press_sequentially(text, delay=delay)
                        if i % 2:
                            await send_button.click()
                        else:
                            await box.press("Enter")
                        await expect(box).to_have_value("", timeout=UI_MS)
                    typed += texts
                    await expect(received).to_have_count(before + len(texts), timeout=UI_MS)
                    got = await visitor.evaluate(
                        "(n) => [...document.querySelectorAll('#messages li.message')]"
                        ".slice(-n).map(li => li.querySelector('.text').textContent)",
                        len(texts))
                    assert got == texts, f"{phase}: typed {texts}, the page got {got}"
                    sent = await lab.evaluate("window.__sent")
                    drawn = await visitor.evaluate("window.__drawn")
                    panel_to_page[f"{phase} ({visibility})"] = latencies(sent, drawn, texts)
            await lab.bring_to_front()
            await expect(outbox).to_have_count(0, timeout=UI_MS)
            panel_texts = await history.locator(".chatlib-msg .chatlib-text").all_text_contents()
            assert [t for t in panel_texts if t in typed] == typed  # each once, in order

            # -- the page -> the panel, JupyterLab in front and behind
            page_to_panel: dict[str, list[float]] = {}
            panel_msgs = history.locator(".chatlib-msg")
            for front in (True, False):
                await (lab if front else other).bring_to_front()
                visibility = await lab.evaluate("document.visibilityState")
                texts = [f"from the page {'f' if front else 'b'}-{i:02d}" for i in range(20)]
                for text in texts:
                    before = await panel_msgs.count()
                    await visitor.fill("#message-input", text)
                    await visitor.press("#message-input", "Enter")
                    await expect(panel_msgs).to_have_count(before + 1, timeout=UI_MS)
                    await expect(panel_msgs.last.locator(".chatlib-text")).to_have_text(text)
                sent = await visitor.evaluate("window.__sent")
                drawn = await lab.evaluate("window.__drawn")
                page_to_panel[f"JupyterLab {'in front' if front else 'behind'} "
                              f"({visibility})"] = latencies(sent, drawn, texts)
            await lab.bring_to_front()
            await other.close()

            report.append("ChatPanel latency (ms, this machine, loopback):")
            for name, values in panel_to_page.items():
                report.append(f"  panel -> page, {name}: {summary(values)}")
            for name, values in page_to_panel.items():
                report.append(f"  page -> panel, {name}: {summary(values)}")
            everything = [v for values in panel_to_page.values() for v in values]
            report.append(f"  panel -> page, all {len(everything)}: {summary(everything)}")

            # -- what the panel shows, compared with the page
            last = panel_msgs.last
            message_id = await last.get_attribute("data-id")
            on_page = visitor.locator(f'#messages li[data-id="{message_id}"] .time')
            await expect(last.locator(".chatlib-time")).to_have_text(
                await on_page.text_content())  # the same time format as the page
            await expect(panel.locator(".chatlib-history .chatlib-day").first).to_have_text(
                "Today")
            mine = history.locator(".chatlib-mine").last
            theirs = panel_msgs.last
            await expect(mine.locator(".chatlib-mark")).to_have_text("sent ✓")
            mine_box, theirs_box = await mine.bounding_box(), await theirs.bounding_box()
            assert mine_box["x"] > theirs_box["x"], "own messages are on the right"
            await visitor.locator("#message-input").press_sequentially("typing…", delay=20)
            await expect(panel.locator(".chatlib-typing")).to_have_text(
                "visitor is typing…", timeout=UI_MS)
            await visitor.fill("#message-input", "")

            # Scrolled up, a new message shows the unread marker instead of yanking the view.
            scroller = panel.locator(".chatlib-log")
            await scroller.evaluate("(el) => { el.scrollTop = 0; }")
            await expect(panel.locator(".chatlib-unread")).to_be_hidden()
            await visitor.fill("#message-input", "Did you see this one? <b>not bold</b>")
            await visitor.press("#message-input", "Enter")
            unread = panel.locator(".chatlib-unread")
            await expect(unread).to_have_text("1 new message ↓", timeout=UI_MS)
            assert await scroller.evaluate("(el) => el.scrollTop") == 0
            ARTIFACTS.mkdir(exist_ok=True)
            await panel.screenshot(path=str(ARTIFACTS / "panel-light.png"))
            await unread.click()
            await expect(unread).to_be_hidden()
            await expect(panel_msgs.last).to_be_in_viewport()
            await expect(panel_msgs.last.locator(".chatlib-text")).to_have_text(
                "Did you see this one? <b>not bold</b>")  # as text, not markup

            # -- the server goes away: the status line says why and counts down; what is
            # typed meanwhile waits (pending) and is sent once, after the reconnect.
            await run_in_kernel(lab, "await server.stop()")
            await expect(panel).to_have_attribute("data-state", "reconnecting", timeout=UI_MS)
            await expect(panel.locator(".chatlib-countdown")).to_contain_text(
                "retrying", timeout=UI_MS)
            # Why: the server went away (close 1001), then refused connections.
            await expect(panel.locator(".chatlib-error")).to_contain_text(
                re.compile("went away|Error"), timeout=UI_MS)
            await box.fill("typed while the server was down")
            await box.press("Enter")
            waiting = outbox.filter(has_text="typed while the server was down")
            await expect(waiting).to_have_attribute("data-status", "pending", timeout=UI_MS)
            await expect(outbox.locator(".chatlib-mark")).to_have_text("sending…")
            await panel.screenshot(path=str(ARTIFACTS / "panel-reconnecting.png"))
            await run_in_kernel(
                lab, "server = await chatlib.start_server(limits=server.limits)")
            await expect(panel).to_have_attribute("data-state", "connected", timeout=UI_MS)
            await expect(outbox).to_have_count(0, timeout=UI_MS)
            resent = history.locator(".chatlib-msg").filter(
                has_text="typed while the server was down")
            await expect(resent).to_have_count(1, timeout=UI_MS)
            await expect(resent.locator(".chatlib-mark")).to_have_text("sent ✓")
            await expect(panel.locator(".chatlib-error")).to_have_text("")
            await expect(visitor.locator("#messages li.message .text").filter(
                has_text="typed while the server was down")).to_have_count(1, timeout=UI_MS)

            # -- dark theme: the panel follows JupyterLab's theme variables
            await lab.evaluate("() => window.jupyterapp.commands.execute("
                               "'apputils:change-theme', {theme: 'JupyterLab Dark'})")
            await lab.wait_for_function("document.body.dataset.jpThemeLight === 'false'",
                                        timeout=UI_MS)
            # Changing the theme shows JupyterLab's splash (the Jupyter logo) over the page
            # while the new theme loads; the screenshot is of the panel, not of the splash.
            await lab.wait_for_selector("#jupyterlab-splash", state="detached", timeout=UI_MS)
            colours = await panel.evaluate(
                "(el) => [getComputedStyle(el).backgroundColor, getComputedStyle(el).color]")
            report.append(f"dark theme panel background/text: {colours}")
            await panel.screenshot(path=str(ARTIFACTS / "panel-dark.png"))
            await lab.evaluate("() => window.jupyterapp.commands.execute("
                               "'apputils:change-theme', {theme: 'JupyterLab Light'})")

            # -- closed and reopened while the kernel runs: the saved copy has no view (see
            # chatlib.save_hook), only the panel's line; displayed again, the panel is drawn
            # from the kernel's state, every message included.
            shown = await panel_msgs.count()
            await lab.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
            await lab.evaluate("() => window.jupyterapp.shell.currentWidget.close()")
            await expect(lab.locator(".chatlib-panel")).to_have_count(0, timeout=UI_MS)
            await lab.evaluate("(path) => window.jupyterapp.commands.execute("
                               "'docmanager:open', {path})", PANEL_NOTEBOOK)
            await expect(lab.locator(".jp-OutputArea-output").filter(
                has_text=SAVED_PANEL_LINE).first).to_be_visible(timeout=UI_MS)
            await kernel_idle(lab)
            await run_new_cell(lab, "panel")
            await expect(panel).to_have_attribute("data-state", "connected", timeout=UI_MS)
            await expect(panel_msgs).to_have_count(shown, timeout=UI_MS)
            await visitor.fill("#message-input", "still here after the reopen?")
            await visitor.press("#message-input", "Enter")
            await expect(panel_msgs.last.locator(".chatlib-text")).to_have_text(
                "still here after the reopen?", timeout=UI_MS)

            # -- the saved notebook, for a reader without a kernel: words, not internals
            saved = json.loads((jupyter_lab["root"] / PANEL_NOTEBOOK).read_text())
            output = saved["cells"][0]["outputs"][0]["data"]
            plain = "".join(output["text/plain"])
            assert "Run the notebook's cells to join the chat" in plain, plain
            assert "children=" not in plain and "ChatPanel" in plain
            assert "join the chat" in "".join(output["text/html"])

            assert not page_errors, page_errors
            assert not lab_errors, lab_errors
        finally:
            await browser.close()
            print("\n" + "\n".join(report))


# -- saved with a live panel, reopened with a new kernel ----------------------------------


@pytest.mark.parametrize("save_state", [False, True], ids=["default", "widget-state-saved"])
async def test_a_saved_panel_reopened_with_a_new_kernel_says_run_the_cells(jupyter_lab,
                                                                         save_state):
    await saved_panel_reopens_with_a_new_kernel(jupyter_lab, "lab/tree/" + PANEL_NOTEBOOK,
                                                save_state=save_state)


async def saved_panel_reopens_with_a_new_kernel(jupyter: dict, path: str, *,
                                                save_state: bool = False) -> None:
    """The learner saves a notebook with a live panel, stops the kernel and opens it again.

    The saved file holds no view of the panel (chatlib.save_hook drops views that no saved
    state can draw again, and the panel's state even when the widgets setting "save widget
    state" is on), so the reopened cell shows the panel's "run the cells" line instead of
    "Error displaying widget: model not found" (or a stale panel that cannot chat); the open
    notebook kept its live panel.
    """
    if save_state:  # read when the page loads
        setting = (jupyter["config"] / "lab" / "user-settings" / "@jupyter-widgets"
                   / "jupyterlab-manager" / "plugin.jupyterlab-settings")
        setting.parent.mkdir(parents=True, exist_ok=True)
        setting.write_text(json.dumps({"saveState": True}))
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            page = await (await browser.new_context(
                viewport={"width": 1100, "height": 900})).new_page()
            await page.goto(jupyter["base"] + path)
            await kernel_idle(page)
            jupyter["remember_children"]()
            await run_all_cells(page)
            await kernel_idle(page)
            panel = page.locator(".chatlib-panel")
            await expect(panel).to_have_attribute("data-state", "connected", timeout=UI_MS)

            assert await page.evaluate(
                "() => window.jupyterapp.commands.execute('docmanager:save')") is not False
            await expect(panel).to_have_attribute("data-state", "connected")  # still live
            saved = json.loads((jupyter["root"] / PANEL_NOTEBOOK).read_text())
            data = saved["cells"][0]["outputs"][0]["data"]
            assert "application/vnd.jupyter.widget-view+json" not in data, data.keys()
            assert SAVED_PANEL_LINE in "".join(data["text/plain"]), data
            state = saved["metadata"].get("widgets", {}).get(
                "application/vnd.jupyter.widget-state+json", {}).get("state", {})
            assert not [m for m in state.values() if "ChatPanel" in json.dumps(m)], state
            assert bool(state) == save_state  # the setting was in force (its layout is left)

            await page.evaluate(
                "() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
            await page.goto(jupyter["base"] + path)  # reopened: a new kernel starts
            await kernel_idle(page)
            jupyter["remember_children"]()
            await expect(page.locator(".jp-OutputArea-output").filter(
                has_text=SAVED_PANEL_LINE).first).to_be_visible(timeout=UI_MS)
            await expect(page.get_by_text("model not found")).to_have_count(0)
            await expect(panel).to_have_count(0)
            ARTIFACTS.mkdir(exist_ok=True)
            name = f"reopened-{path.split('/')[0]}{'-state' if save_state else ''}.png"
            await page.screenshot(path=str(ARTIFACTS / name))
        finally:
            await browser.close()


# -- a refused paste, a planned restart, both themes -------------------------------------

STDERR_OUTPUTS = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'


async def test_panel_refused_paste_restart_and_themes(jupyter_lab):
    """A 3,000-character paste: the counter says it is too long; refused, its bubble is
    short with the reason in view, and a message that arrives after it is in view or
    announced by the unread marker. A planned restart (close 1012) is told in the status
    line, with nothing on the cell's stderr. Small print is at least 4.5:1 in the light and
    the dark theme; screenshots: panel-paste-light.png, panel-paste-dark.png."""
    async with async_playwright() as p:
        browser = await launch(p)
        try:
            lab, lab_errors, panel = await open_panel_notebook(browser, jupyter_lab)
            history = panel.locator(".chatlib-history .chatlib-msg")
            # Connection changes are announced; the dot and the countdown are not read out.
            await expect(panel.locator(".chatlib-status")).to_have_attribute("role", "status")
            for quiet in (".chatlib-dot", ".chatlib-countdown"):
                await expect(panel.locator(quiet)).to_have_attribute("aria-hidden", "true")
            await run_in_kernel(lab, "await panel.send('Welcome! ' + 'שלום')")
            await run_in_kernel(
                lab, "async with chatlib.WebSocketClient(server.url, 'visitor') as v:\n"
                     "    await v.send('Hello from a visitor')")
            await expect(history).to_have_count(2, timeout=UI_MS)
            await expect(history.last.locator(".chatlib-text")).to_have_attribute("dir", "auto")

            box = panel.locator("input.chatlib-input")
            count = panel.locator(".chatlib-count")
            await box.fill("y" * 1700)
            await expect(count).to_have_text("1700 / 2000")
            await box.fill("lorem ipsum " * 250)  # 3,000 characters
            await expect(count).to_have_text("3000 / 2000: 1000 too many")
            await box.press("Enter")
            failed = panel.locator('.chatlib-outbox [data-status="failed"]')
            await expect(failed).to_have_count(1, timeout=UI_MS)
            reason = failed.locator(".chatlib-mark")
            await expect(reason).to_have_text("not sent: text is longer than 2000 characters")
            assert await shown_in_log(reason)  # the reason, in view
            assert (await failed.bounding_box())["height"] < 130  # cut short ...
            await expect(failed.get_by_role("button", name="Show all")).to_be_visible()

            # A message after it: in view, or announced.
            await run_in_kernel(
                lab, "async with chatlib.WebSocketClient(server.url, 'visitor') as v:\n"
                     "    await v.send('after the paste')")
            newest = history.filter(has_text="after the paste")
            await expect(newest).to_have_count(1, timeout=UI_MS)
            unread = panel.locator(".chatlib-unread")
            assert await shown_in_log(newest) or await unread.is_visible()

            ARTIFACTS.mkdir(exist_ok=True)
            for theme in ("light", "dark"):
                if theme == "dark":
                    await lab.evaluate("() => window.jupyterapp.commands.execute("
                                       "'apputils:change-theme', {theme: 'JupyterLab Dark'})")
                    await lab.wait_for_function(
                        "document.body.dataset.jpThemeLight === 'false'", timeout=UI_MS)
                    await lab.wait_for_selector("#jupyterlab-splash", state="detached",
                                                timeout=UI_MS)
                ratios = {
                    "time, others'": await contrast(
                        history.filter(has_text="visitor").locator(".chatlib-time")),
                    "time, own": await contrast(
                        panel.locator(".chatlib-history .chatlib-mine .chatlib-time")),
                    "sent ✓": await contrast(
                        panel.locator('.chatlib-history [data-status="sent"] .chatlib-mark')),
                    "not sent": await contrast(reason),
                }
                low = {k: round(v, 2) for k, v in ratios.items() if v < 4.5}
                assert not low, f"{theme} theme: contrast below 4.5:1: {low}"
                await panel.screenshot(path=str(ARTIFACTS / f"panel-paste-{theme}.png"))
            await lab.evaluate("() => window.jupyterapp.commands.execute("
                               "'apputils:change-theme', {theme: 'JupyterLab Light'})")
            await lab.wait_for_function("document.body.dataset.jpThemeLight === 'true'",
                                        timeout=UI_MS)

            await failed.get_by_role("button", name="Discard").click()
            await expect(failed).to_have_count(0, timeout=UI_MS)

            # A planned restart (the start cell run again: close 1012) is calm.
            await expect(lab.locator(STDERR_OUTPUTS)).to_have_count(0)
            await panel.locator(".chatlib-error").evaluate("""(el) => {
                window.__said = [];
                new MutationObserver(() => window.__said.push(el.textContent))
                    .observe(el, {childList: true, characterData: true, subtree: true});
            }""")
            await run_in_kernel(lab, "server = await chatlib.start_server(limits=server.limits)")
            await expect(panel).to_have_attribute("data-state", "connected", timeout=UI_MS)
            said = await lab.evaluate("window.__said")
            assert any("the server is restarting (close 1012)" in text for text in said), said
            await expect(lab.locator(STDERR_OUTPUTS)).to_have_count(0)
            assert not lab_errors, lab_errors
        finally:
            await browser.close()
