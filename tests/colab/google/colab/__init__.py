"""A stand-in for Colab's ``google.colab`` (``make test`` puts tests/colab on PYTHONPATH for
its no-browser notebook pass, so every chapter also runs as it would in Colab).

Like the real package it imports ``google.colab.output`` at once, which is what anywidget
looks for in ``sys.modules`` to turn on Colab's custom widget manager.
"""

from google.colab import output  # noqa: F401
