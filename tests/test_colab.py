"""Colab mode: detected when ``google.colab`` imports; the page link becomes one sentence.

In a fresh interpreter with tests/colab (the stand-in ``google.colab`` that ``make test``
also gives the no-browser notebook pass) on PYTHONPATH: chatlib detects Colab, the server's
HTML says why the chat page cannot be opened instead of linking to it, anywidget turns on
Colab's custom widget manager for the ChatPanel, and the panel and a Python client chat.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import chatlib
from chatlib.colab import PAGE_UNREACHABLE, in_colab

STAND_IN = Path(__file__).parent / "colab"

IN_COLAB = """
import asyncio, json
import chatlib
from chatlib.colab import in_colab
import google.colab.output as output

async def main():
    server = await chatlib.start_server()
    try:
        panel = chatlib.ChatPanel(server, user="panel")
        await panel.wait_connected()
        async with chatlib.WebSocketClient(server.url, "python") as python:
            await python.send("hello from Python")
            await panel.wait_for_text("hello from Python")
            await panel.send("hello from the panel")
            got = await python.receive_many(2, timeout=10)
        await panel.aclose()
        return {"in_colab": in_colab(), "html": server._repr_html_(),
                "custom_widget_manager": output.enabled, "python_got": [m.text for m in got]}
    finally:
        await chatlib.stop_server()

print(json.dumps(asyncio.run(main())))
"""


def test_colab_is_detected_and_the_page_link_becomes_a_sentence():
    env = {**os.environ, "PYTHONPATH": str(STAND_IN), "CHATLIB_NO_PORT_REUSE": "1"}
    run = subprocess.run([sys.executable, "-c", IN_COLAB], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.splitlines()[-1])
    assert seen["in_colab"] is True
    assert PAGE_UNREACHABLE in seen["html"] and "<a " not in seen["html"], seen["html"]
    assert seen["custom_widget_manager"] >= 1
    assert seen["python_got"] == ["hello from Python", "hello from the panel"]


async def test_elsewhere_the_server_links_its_page(server):
    assert not in_colab()
    html = server._repr_html_()
    assert f'href="{chatlib.proxy.public_url(server)}"' in html and PAGE_UNREACHABLE not in html


def test_make_tests_notebook_pass_runs_its_kernels_in_colab_mode(monkeypatch):
    """The PYTHONPATH that ``make test`` gives the no-browser notebook pass reaches a kernel
    started in notebooks/, as nbval starts them (a relative path would silently not)."""
    root = Path(__file__).resolve().parent.parent
    makefile = (root / "Makefile").read_text()
    [path] = re.findall(r"CHATLIB_NO_BROWSER=1 PYTHONPATH=(\S+)", makefile)
    monkeypatch.setenv("PYTHONPATH", path.replace("$(CURDIR)", str(root)))
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from chatlib.colab import in_colab\nprint(in_colab())")])
    NotebookClient(notebook, timeout=60, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    assert notebook.cells[0].outputs[0]["text"].strip() == "True"
