"""Chapter 7's ChatPanel in Notebook 7 (the classic notebook's successor), in a real browser.

``jupyter notebook`` runs as a subprocess exactly as ``jupyter lab`` does in
tests/test_jupyterlab.py (same isolation, same teardown checks), and headless Chromium opens
chapter 7 at ``/notebooks/``, runs all cells and chats both ways with the chat page, with the
same checks as the JupyterLab test (``chapter7_panel_chats``); and a notebook saved with a
live panel, reopened with a new kernel, says to run the cells. Screenshots:
tests/artifacts/notebook7-app.png, reopened-notebooks.png.
"""

from __future__ import annotations

import pytest
from helpers import needs_chromium
from test_jupyterlab import (
    JUPYTER,
    NOTEBOOK,
    PANEL_NOTEBOOK,
    chapter7_panel_chats,
    running_jupyter,
    saved_panel_reopens_with_a_new_kernel,
)

pytestmark = [
    needs_chromium(),
    pytest.mark.skipif(not JUPYTER.exists(), reason=f"no jupyter at {JUPYTER}"),
    pytest.mark.timeout(300),
]


@pytest.fixture
def jupyter_notebook(tmp_path):
    with running_jupyter(tmp_path, "notebook") as server:
        yield server


async def test_chapter7_runs_and_the_panel_chats_in_notebook7(jupyter_notebook):
    await chapter7_panel_chats(jupyter_notebook, "notebooks/" + NOTEBOOK.name,
                               "notebook7-app.png")


async def test_a_saved_panel_reopened_with_a_new_kernel_in_notebook7(jupyter_notebook):
    await saved_panel_reopens_with_a_new_kernel(jupyter_notebook, "notebooks/" + PANEL_NOTEBOOK)
