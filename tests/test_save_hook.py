"""chatlib.save_hook: a saved notebook keeps no widget view that no saved state can restore.

The browser test (tests/test_jupyterlab.py, tests/test_notebook7.py) saves a live panel
through a real Jupyter server and reopens it with a new kernel; these check the rule itself.
"""

from __future__ import annotations

import nbformat

from chatlib import ChatPanel
from chatlib.save_hook import KERNEL_ONLY, NO_VIEW, WIDGET_STATE, WIDGET_VIEW, pre_save_hook

PANEL_TEXT = ("ChatPanel: a live chat window (ada over ws). "
              "Run the notebook's cells to join the chat.")


def view(model_id: str, **fallback) -> dict:
    return nbformat.v4.new_output("display_data", data={
        WIDGET_VIEW: {"model_id": model_id, "version_major": 2, "version_minor": 1},
        **fallback}, metadata={WIDGET_VIEW: {"note": "about the view"}})


def notebook(*outputs, state: dict | None = None) -> dict:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("panel", outputs=list(outputs)),
                                         nbformat.v4.new_markdown_cell("text")])
    if state is not None:
        nb.metadata["widgets"] = {WIDGET_STATE: {"state": state, "version_major": 2,
                                                 "version_minor": 0}}
    return nb


def save(nb: dict) -> dict:
    model = {"type": "notebook", "format": "json", "content": nb}
    pre_save_hook(model, path="x.ipynb", contents_manager=None)
    return model["content"]


def test_a_view_without_saved_state_keeps_only_its_words():
    saved = save(notebook(view("a1", **{"text/plain": PANEL_TEXT, "text/html": "<b>chat</b>"}),
                          view("b2")))
    first, second = saved["cells"][0]["outputs"]
    assert first["data"] == {"text/plain": PANEL_TEXT, "text/html": "<b>chat</b>"}
    assert WIDGET_VIEW not in first["metadata"]
    assert second["data"] == {"text/plain": NO_VIEW}
    nbformat.validate(nbformat.from_dict(saved))


def test_a_view_whose_state_is_saved_stays():
    nb = notebook(view("a1", **{"text/plain": PANEL_TEXT}), view("b2"),
                  state={"a1": {"model_name": "AnyModel", "state": {}}})
    first, second = save(nb)["cells"][0]["outputs"]
    assert first["data"][WIDGET_VIEW]["model_id"] == "a1"
    assert WIDGET_VIEW not in second["data"]


def test_a_chat_panel_keeps_neither_view_nor_state_it_cannot_chat_from():
    [panel_id] = KERNEL_ONLY
    assert panel_id == f"{ChatPanel.__module__}.{ChatPanel.__name__}"  # anywidget's id
    nb = notebook(view("p1", **{"text/plain": PANEL_TEXT}), view("a1"),
                  state={"p1": {"model_name": "AnyModel", "state": {"_anywidget_id": panel_id}},
                         "a1": {"model_name": "AnyModel", "state": {"_anywidget_id": "x.Y"}}})
    saved = save(nb)
    panel, other = saved["cells"][0]["outputs"]
    assert panel["data"] == {"text/plain": PANEL_TEXT}
    assert WIDGET_VIEW in other["data"]
    assert set(saved["metadata"]["widgets"][WIDGET_STATE]["state"]) == {"a1"}


def test_other_files_and_outputs_are_left_alone():
    text = {"type": "file", "format": "text", "content": "{}"}
    pre_save_hook(dict(text))
    assert text["content"] == "{}"
    plain = nbformat.v4.new_output("stream", text="hello\n")
    assert save(notebook(plain))["cells"][0]["outputs"] == [plain]


def test_this_environment_enables_the_hook():
    # make setup (and postBuild) install the wheel's server config into the venv; a fresh
    # clone must come out with the extension on, or the browser reopen tests fail.
    from jupyter_core.paths import jupyter_config_path
    from jupyter_server.extension.config import ExtensionConfigManager

    config = ExtensionConfigManager(read_config_path=jupyter_config_path())
    assert config.enabled("chatlib.save_hook"), "run make setup (or postBuild) again"
