"""The headless Chromium that the notebooks and the tests drive, in one place.

The course drives the system's Chromium (Debian's ``chromium`` package) with Playwright's
``executable_path``; it never downloads a browser of Playwright's own.

* :data:`CHROMIUM`: the binary, ``$CHROMIUM`` if set (the Makefile exports its own
  ``CHROMIUM ?= /usr/bin/chromium``), else ``/usr/bin/chromium``.
* :data:`CHROMIUM_ARGS`: the command-line flags every launch uses.
* :func:`unavailable`: ``None`` when a real Chromium can be driven here, else one line saying
  why not and how to fix it. It really starts the browser (once per process and binary), so a
  binary that is present but cannot start (no execute permission, Ubuntu's ``chromium``
  snap shim inside a container, a broken install) counts as missing, exactly like no binary.
* :func:`launch`: ``await launch(playwright)`` starts it.

A notebook falls back to a Python client when ``unavailable()`` returns a reason, and prints
the reason; a test module skips with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os

CHROMIUM: str = os.environ.get("CHROMIUM", "/usr/bin/chromium")
"""The Chromium binary: ``$CHROMIUM``, else Debian's ``/usr/bin/chromium``."""

CHROMIUM_ARGS: list[str] = [
    # Containers and CI run as users without the user namespaces the sandbox needs.
    "--no-sandbox",
    # No GPU here; software rendering without the GPU process's start-up probing.
    "--disable-gpu",
    # No traffic of the browser's own (updates, field trials, sync, first-run pages): every
    # connection a test sees is one the page made, and nothing leaves 127.0.0.1.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
"""The flags of every launch (Playwright adds ``--headless`` itself)."""

LAUNCH_TIMEOUT_S = 60.0
"""How long :func:`unavailable` lets the trial start take (a loaded machine is slow)."""

FIX = ("install a working Chromium (make chromium, or apt-get install chromium) "
       "or point the CHROMIUM environment variable at one")


def unavailable() -> str | None:
    """``None`` when a real Chromium can be driven here; else one line saying why and how to fix it.

    The reasons, in the order they are checked: ``CHATLIB_NO_BROWSER`` is set (asked for, read
    at every call); Playwright is not installed; no file at :data:`CHROMIUM`; the binary cannot
    start (the first line of Playwright's error). The last two really start the browser once per
    process and binary path (the answer is cached), so it may take a second or two the first
    time. Safe to call from a running event loop (a Jupyter cell): the trial start runs in a
    thread of its own.
    """
    if os.environ.get("CHATLIB_NO_BROWSER"):
        return "CHATLIB_NO_BROWSER is set, so no browser is started (unset it to use Chromium)."
    return _start_once(CHROMIUM)


async def launch(playwright, **options):
    """Start :data:`CHROMIUM` with :data:`CHROMIUM_ARGS`; return Playwright's ``Browser``.

    ``playwright`` is a started ``async_playwright()``; ``options`` go to
    ``playwright.chromium.launch`` as they are (e.g. ``slow_mo=100``).
    """
    return await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                            **options)


@functools.cache
def _start_once(executable: str) -> str | None:
    """Start and close ``executable`` once through Playwright; the reason it failed, or None."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed: pip install playwright (make setup installs it)."
    if not os.path.exists(executable):
        return f"No Chromium at {executable}: {FIX}."
    # A thread with its own event loop: the caller may be inside one (a notebook cell).
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chromium-probe") as pool:
        try:
            return pool.submit(asyncio.run, _try_start(executable)).result()
        except Exception as error:  # noqa: BLE001 (any failure to start means: not usable)
            first = next((line for line in str(error).splitlines() if line.strip()),
                         type(error).__name__)
            return f"Chromium at {executable} cannot start ({first.strip()}): {FIX}."


async def _try_start(executable: str) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT_S * 1000)
        await browser.close()
