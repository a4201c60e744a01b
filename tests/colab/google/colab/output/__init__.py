"""The part of Colab's ``google.colab.output`` that anywidget calls."""

from types import SimpleNamespace

_widgets = SimpleNamespace(_installed_url=None)
enabled = 0
"""How many times a widget turned the custom widget manager on (tests read it)."""


def enable_custom_widget_manager(version: str = "") -> None:
    global enabled
    enabled += 1
