"""Notebook 7 in a real JupyterLab, in a real browser, as a learner would use it.

``jupyter lab`` runs as a subprocess (127.0.0.1, a free port, no token, its own HOME,
runtime, config and data directories, so nothing of the machine's Jupyter setup leaks in;
the venv's lab extensions and kernelspec are still found through ``sys.prefix``). Headless
Chromium opens ``07-chat-notebook-and-browser.ipynb``, runs all cells, and then:

* the ChatPanel widget renders (so the ipywidgets lab extension works) and says connected;
* the chat page whose URL the notebook prints, opened in a second page as ``visitor``,
  sends a message that shows up in the panel's log, in view (the log follows new messages);
* text typed into the panel's input box (Enter) shows up on the chat page;
* typing notices go both ways, and both views show the same messages, once each, in order.

A screenshot of the notebook goes to tests/artifacts/jupyterlab-notebook7.png.

Teardown stops JupyterLab with SIGTERM (it shuts its kernels down), SIGKILL after a bounded
wait, and then checks that no process it started (kernel, the kernel's own headless
Chromium) is left; any that is, is killed and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "07-chat-notebook-and-browser.ipynb"
ARTIFACTS = Path(__file__).parent / "artifacts"
JUPYTER = Path(sys.prefix) / "bin" / "jupyter"

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.skipif(not JUPYTER.exists(), reason=f"no jupyter at {JUPYTER}"),
    pytest.mark.timeout(300),
]

STARTUP_S = 60         # jupyter lab answering /api/status
KERNEL_IDLE_MS = 60_000
RUN_ALL_S = 120        # every cell of notebook 7 (it takes ~10 s here)
UI_MS = 20_000         # a widget, a message, a status to show up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture
def jupyter_lab(tmp_path):
    """A running ``jupyter lab`` serving a copy of notebook 7; yields its base URL."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root)
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
        str(JUPYTER), "lab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--IdentityProvider.token=", "--PasswordIdentityProvider.hashed_password=",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp, to drive commands
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
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
                pytest.fail(f"jupyter lab exited ({process.returncode}):\n"
                            + log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(base + "api/status", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab not ready in {STARTUP_S} s:\n"
                            + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

        def remember_children():
            started.update(descendants(process.pid))

        yield {"base": base, "log": log_path, "remember_children": remember_children}
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
    assert not described, f"processes outlived jupyter lab: {described}"


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


async def shown_in_log(message) -> bool:
    """Is the message drawn inside the log's box (not scrolled away, not spilling out)?"""
    return await message.evaluate(
        """(m) => {
            const r = m.getBoundingClientRect();
            const box = m.closest('.chatlib-log').getBoundingClientRect();
            return r.height > 0 && r.top >= box.top - 1 && r.bottom <= box.bottom + 1;
        }""")


async def test_notebook7_panel_chats_with_the_browser_page(jupyter_lab):
    base = jupyter_lab["base"]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            lab_context = await browser.new_context(viewport={"width": 1300, "height": 1000})
            lab = await lab_context.new_page()
            await lab.goto(base + "lab/tree/" + NOTEBOOK.name)
            await kernel_idle(lab)
            jupyter_lab["remember_children"]()  # the kernel, in case teardown can't see it

            # The committed outputs must not count: clear them, then run everything.
            await lab.evaluate(
                "() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
            await expect(lab.locator(".chatlib-panel")).to_have_count(0)
            ok = await lab.evaluate(
                """(ms) => Promise.race([
                    window.jupyterapp.commands.execute('notebook:run-all-cells'),
                    new Promise((resolve) => setTimeout(() => resolve('timeout'), ms)),
                ])""", RUN_ALL_S * 1000)
            errors = await lab.evaluate(ERROR_OUTPUTS_JS)
            assert ok is True and not errors, f"run all cells: {ok!r}, errors: {errors}"
            await kernel_idle(lab)
            jupyter_lab["remember_children"]()

            # The panel (a widget view: the lab extension works) is connected. It is shown
            # twice (first and last cell); the last one is where a learner keeps chatting.
            panel = lab.locator(".chatlib-panel").last
            await expect(panel).to_be_visible(timeout=UI_MS)
            await expect(panel.locator(".chatlib-state")).to_have_text("● connected",
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
            from_visitor = log.locator(".chatlib-msg").filter(
                has_text="Hello panel, a visitor here!")
            await expect(from_visitor).to_have_count(1, timeout=UI_MS)
            await expect(from_visitor.locator(".chatlib-user")).to_have_text("visitor")
            # ... and in view: the log follows the newest message.
            await panel.scroll_into_view_if_needed()
            await expect(from_visitor).to_be_in_viewport(timeout=UI_MS)
            assert await shown_in_log(from_visitor)

            # Panel -> browser page, typed into the widget's input box, sent with Enter.
            box = panel.locator(".chatlib-input input")
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
            mine = log.locator(".chatlib-msg").filter(has_text=text)
            await expect(mine).to_have_count(1, timeout=UI_MS)
            await expect(mine).to_be_in_viewport(timeout=UI_MS)
            assert await shown_in_log(mine)

            # Both views show the same messages, each once, in id order.
            panel_ids = [int(i) for i in await log.locator(".chatlib-msg").evaluate_all(
                "els => els.map(e => e.dataset.id)")]
            page_ids = await visitor.eval_on_selector_all(
                "#messages li.message", "els => els.map(e => Number(e.dataset.id))")
            assert len(panel_ids) == len(set(panel_ids)), panel_ids
            assert all(a < b for a, b in zip(panel_ids, panel_ids[1:], strict=False))
            assert page_ids == panel_ids, (page_ids, panel_ids)
            assert not page_errors, page_errors

            ARTIFACTS.mkdir(exist_ok=True)
            await lab.screenshot(path=str(ARTIFACTS / "jupyterlab-notebook7.png"))
        finally:
            await browser.close()


async def test_panel_enter_sends_keystrokes_that_arrive_after_it():
    """The race the browser test above found, without a browser: ipywidgets may deliver the
    box's last value *after* the Enter event; the panel must still send the whole text."""
    from chatlib import ChatPanel, ChatServer, WebSocketClient

    async with ChatServer(port=0) as server, WebSocketClient(server.url, "reader") as reader:
        panel = ChatPanel(server, user="notebook")
        try:
            await panel.wait_connected()
            panel._input.value = "Hello visitor, this is the noteboo"  # what arrived so far
            panel._submit()                                          # Enter
            await asyncio.sleep(0.05)                                # a round trip later ...
            panel._input.value = "Hello visitor, this is the notebook."  # ... the rest
            message = await reader.receive(timeout=10)
            assert message.text == "Hello visitor, this is the notebook."
            await panel.wait_for(lambda p: p._input.value == "", timeout=5)
            # Enter on an empty box sends nothing.
            panel._submit()
            await asyncio.wait_for(asyncio.gather(*panel._submits), 5)
            with pytest.raises(TimeoutError):
                await reader.receive(timeout=0.5)
        finally:
            await panel.aclose()
