"""Save no widget view that a reopened notebook cannot draw (a Jupyter server extension).

A widget's output in a notebook is a reference, ``application/vnd.jupyter.widget-view+json``
``{"model_id": ...}``, to a model that lives in the kernel. JupyterLab and Notebook 7 save
that reference with the notebook, but, unless their "save widget state" setting is on, not
the model. Reopened with a new kernel, the reference points at nothing and the cell shows
"Error displaying widget: model not found" where the ChatPanel was.

This extension's pre-save hook drops every widget view whose model state is not saved in the
notebook's ``metadata.widgets``, keeping the rest of the output's bundle: for a ChatPanel its
``text/plain`` and ``text/html`` say "Run the notebook's cells to join the chat" (with the
last messages). A view whose state *is* saved (the setting is on) can be drawn again, so it
stays, except a ChatPanel's (:data:`KERNEL_ONLY`): its chat lives in the kernel, and drawn
from saved state it would show a stale "connected" panel that cannot chat, so its state and
view go too. The open notebook is not changed: the live panel keeps working until its tab
closes.

Installed from a wheel, chatlib puts ``etc/jupyter/jupyter_server_config.d/chatlib.json``
into the environment, which enables the extension for every Jupyter server started there;
an editable install (``make setup``, ``environment.yml``) does not, so there
``jupyter server extension enable --sys-prefix chatlib.save_hook`` does it (``make setup``
runs it; ``jupyter server extension list`` shows it). ``notebooks/clean_outputs.py`` does
the same for the committed notebooks, which have no kernel at all.
"""

from __future__ import annotations

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
NO_VIEW = "A widget: run this cell to show it again."
"""The text/plain of a dropped view that came without one."""
KERNEL_ONLY = frozenset({"chatlib.panel.ChatPanel"})
"""anywidget ids (``_anywidget_id``) of widgets that only work with their kernel."""


def saved_models(notebook: dict) -> set[str]:
    """The model ids whose saved state can draw them again; drops the :data:`KERNEL_ONLY` ones'
    state from the notebook's metadata."""
    saved = notebook.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {})
    models = saved.get("state", {})
    for model_id in [k for k, v in models.items()
                     if v.get("state", {}).get("_anywidget_id") in KERNEL_ONLY]:
        del models[model_id]
    return set(models)


def drop_unrestorable_views(notebook: dict) -> int:
    """Remove from ``notebook`` (nbformat 4, as a dict) each widget view it cannot restore.

    The output keeps its other representations; one with none left says :data:`NO_VIEW`.
    Returns how many views were dropped.
    """
    restorable = saved_models(notebook)
    dropped = 0
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None or view.get("model_id") in restorable:
                continue
            del output["data"][WIDGET_VIEW]
            output.get("metadata", {}).pop(WIDGET_VIEW, None)
            output["data"].setdefault("text/plain", NO_VIEW)
            dropped += 1
    return dropped


def pre_save_hook(model: dict, **_) -> None:
    """A ``ContentsManager`` pre-save hook: notebooks are saved without unrestorable views."""
    if model.get("type") == "notebook" and isinstance(model.get("content"), dict):
        drop_unrestorable_views(model["content"])


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "chatlib.save_hook"}]


def _load_jupyter_server_extension(serverapp) -> None:
    serverapp.contents_manager.register_pre_save_hook(pre_save_hook)
