"""Google Colab: the panel and the Python clients work there, the chat page does not.

Colab runs the kernel on a Google machine and shows its outputs in colab.research.google.com.
The ChatPanel reaches the kernel over the widget comm (anywidget turns on Colab's custom
widget manager itself), and the Python clients talk to the server inside the kernel, so both
work. The chat page cannot: a browser reaches a kernel's port only through Colab's port
proxy, which carries neither WebSockets nor POSTs. So where a notebook would show the page's
link, chatlib shows :data:`PAGE_UNREACHABLE` instead.
"""

from __future__ import annotations

PAGE_UNREACHABLE = ("In Colab the chat page cannot be opened (Colab's port proxy carries no "
                    "WebSockets or POSTs to this kernel): chat with the panel and the Python "
                    "clients instead.")


def in_colab() -> bool:
    """Is this a Colab kernel (``google.colab`` importable)?"""
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True
