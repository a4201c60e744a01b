"""Make the outputs saved in the notebooks make sense before anything runs.

``make notebooks`` executes every chapter and then runs this on it. A fresh run leaves
outputs that are only true while that kernel lives:

- links to the chat server's ephemeral port (``http://127.0.0.1:40123/``), dead for anyone
  who opens the notebook later (JupyterLab turns URLs in text outputs into links);
- widget views (the ChatPanel): without their kernel JupyterLab shows "Error displaying
  widget: model not found", and the notebook's saved widget state is useless without it
  (a notebook a learner saves loses its views to chatlib.save_hook instead).

Each is replaced by a line that says what running the cell will show. Usage:
``python notebooks/clean_outputs.py notebooks/0*.ipynb`` (rewrites the files in place).
"""

from __future__ import annotations

import re
import sys

import nbformat

from chatlib.save_hook import WIDGET_VIEW as WIDGET

SERVER_LINE = ("ChatServer: run this cell to start the chat server; "
               "the link to the chat page appears here.")
PANEL_LINE = "ChatPanel: run this cell to open the chat panel here."
# A URL with an explicit port on this machine: always an ephemeral server of a past run.
LOCAL_URL = re.compile(r"\b(?:https?|wss?)://(?:127\.0\.0\.1|localhost|\[::1\]):\d+/?[^\s'\"<>)]*")
URL_PLACEHOLDER = "[the chat's URL]"


def clean_text(text: str) -> str:
    return LOCAL_URL.sub(URL_PLACEHOLDER, text)


def clean_output(output: dict) -> dict:
    if output.get("output_type") == "stream":
        output["text"] = clean_text(output["text"])
        return output
    data = output.get("data")
    if data is None:
        return output
    plain = data.get("text/plain", "")
    if WIDGET in data:
        output["data"] = {"text/plain": PANEL_LINE}
    elif plain.startswith("<ChatServer"):
        output["data"] = {"text/plain": SERVER_LINE, "text/html": f"<i>{SERVER_LINE}</i>"}
    else:
        for mime in ("text/plain", "text/html", "text/markdown"):
            if mime in data:
                data[mime] = clean_text(data[mime])
    output.get("metadata", {}).pop(WIDGET, None)
    return output


def clean_notebook(path: str) -> None:
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata.pop("widgets", None)  # saved widget state: meaningless without the kernel
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [clean_output(output) for output in cell.outputs]
    nbformat.validate(notebook)
    nbformat.write(notebook, path)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        clean_notebook(name)
