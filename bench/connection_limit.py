"""Six connections per host over HTTP/1.1, measured in real Chromium (issue 9, part 3).

    .venv/bin/python bench/connection_limit.py            # ~3 min, needs Chromium (chatlib.browser)
    .venv/bin/python bench/connection_limit.py --max-tabs 8 --cap 3 --transports sse,ws

For each transport and each N = 1..8: one browser profile (a Playwright context: one
connection pool), N tabs of the chat page on that transport, then the last tab sends a
message with ``fetch`` POST and we time it, giving up after ``--cap`` seconds ("stalled").
Chromium opens at most 6 HTTP/1.1 connections per host for all tabs of a profile: an SSE tab
holds one for as long as it lives, a long-polling tab holds one while its poll waits, a
WebSocket is not counted in that pool. Expected: SSE and long polling stall from the 6th tab
on, WebSocket never.

Writes bench/results/connection_limit.json and connection_limit.png and prints a table; with
``--save`` also bench/connection_limit-results.json, the committed reference run that a
notebook can plot on a machine without a browser. The chat server runs in this process
(``chatlib.ChatServer``, 127.0.0.1, port 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

from playwright.async_api import async_playwright, expect

from chatlib import ChatServer
from chatlib.app import create_app
from chatlib.browser import launch
from chatlib.hub import Hub
from chatlib.limits import Limits
from chatlib.store import MemoryLog

RESULTS = Path(__file__).parent / "results"

TIMED_POST = """async ([text, capMs]) => {
  const started = performance.now();
  try {
    const r = await fetch('api/messages', {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({user: 'last-tab', text}), signal: AbortSignal.timeout(capMs)});
    return r.status === 201 ? performance.now() - started : -r.status;
  } catch (e) {
    return null;  // aborted at the cap: stalled
  }
}"""


class H2Server:
    """The same chat app served over HTTP/2 (hypercorn, TLS with a throwaway certificate).

    Browsers speak HTTP/2 only over TLS. ``trustme`` makes a CA and a certificate for
    127.0.0.1; the test browser context ignores that the CA is unknown to it. Also used by
    tests/test_connection_limit.py.
    """

    async def start(self) -> H2Server:
        import socket
        import tempfile

        import trustme
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        self._dir = tempfile.TemporaryDirectory()
        certfile, keyfile = Path(self._dir.name, "cert.pem"), Path(self._dir.name, "key.pem")
        cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
        cert.private_key_pem.write_to_path(str(keyfile))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}/"
        self.hub = Hub(MemoryLog(), Limits())
        await self.hub.start()
        config = Config()
        config.bind = [f"fd://{self._sock.fileno()}"]
        config.certfile, config.keyfile = str(certfile), str(keyfile)
        config.alpn_protocols = ["h2", "http/1.1"]
        config.loglevel = "WARNING"
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(
            serve(create_app(self.hub), config, shutdown_trigger=self._stop.wait))
        for _ in range(200):  # bounded: until it accepts connections (or 10 s)
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return self
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("hypercorn did not start")

    async def stop(self) -> None:
        self.hub.close()
        self._stop.set()
        await asyncio.wait_for(self._task, 15)
        self._sock.detach()  # hypercorn closed the file descriptor it was given
        self._dir.cleanup()


async def post_time(browser, url: str, transport: str, tabs: int, cap: float) -> float | None:
    context = await browser.new_context(ignore_https_errors=True)
    try:
        pages = []
        for i in range(tabs):
            page = await context.new_page()
            await page.goto(f"{url}?user=tab{i}&transport={transport}")
            await expect(page.locator("#status")).to_have_attribute(
                "data-state", "connected", timeout=20_000)
            pages.append(page)
        if transport == "longpoll":
            await asyncio.sleep(0.5)  # past the first (immediate) poll: every tab now waits
        ms = await pages[-1].evaluate(TIMED_POST, [f"{transport} x{tabs}", cap * 1000])
        return None if ms is None else ms
    finally:
        await context.close()


async def run(args) -> dict:
    server = await ChatServer("127.0.0.1", 0).start()
    h2 = await H2Server().start() if args.http2 else None
    results: dict[str, list] = {}
    try:
        async with async_playwright() as p:
            browser = await launch(p)
            version = browser.version
            try:
                runs = [(t, t, server.url) for t in args.transports.split(",")]
                if h2 is not None:
                    runs.append(("sse over HTTP/2", "sse", h2.url))
                for label, transport, url in runs:
                    results[label] = []
                    for tabs in range(1, args.max_tabs + 1):
                        ms = await post_time(browser, url, transport, tabs, args.cap)
                        results[label].append(ms)
                        shown = "stalled" if ms is None else f"{ms:.1f} ms"
                        print(f"{label:15} {tabs} tab(s): POST {shown}", flush=True)
            finally:
                await browser.close()
    finally:
        if h2 is not None:
            await h2.stop()
        await server.stop()
    return {"chromium": version, "python": platform.python_version(), "cap_s": args.cap,
            "date": time.strftime("%Y-%m-%d"), "tabs": list(range(1, args.max_tabs + 1)),
            "post_ms": results}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap_ms = data["cap_s"] * 1000
    fig, ax = plt.subplots(figsize=(7, 4))
    for transport, times in data["post_ms"].items():
        ys = [cap_ms if t is None else t for t in times]
        ax.plot(data["tabs"], ys, marker="o", label=transport)
    ax.axhline(cap_ms, color="grey", linestyle=":", linewidth=1)
    ax.text(1, cap_ms * 0.9, f"stalled (gave up at {data['cap_s']:g} s)", color="grey",
            fontsize=8, va="top")
    ax.set_yscale("log")
    ax.set_xlabel("open tabs of the chat page (one Chromium profile)")
    ax.set_ylabel("POST from the last tab (ms)")
    ax.set_title("HTTP/1.1: 6 connections per host, shared by all tabs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tabs", type=int, default=8)
    parser.add_argument("--cap", type=float, default=3.0, help="seconds before 'stalled'")
    parser.add_argument("--transports", default="sse,longpoll,ws")
    parser.add_argument("--http2", action="store_true",
                        help="also SSE over HTTP/2 (needs hypercorn and trustme)")
    parser.add_argument("--save", action="store_true",
                        help="also write bench/connection_limit-results.json (committed)")
    args = parser.parse_args()
    data = asyncio.run(run(args))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "connection_limit.json").write_text(json.dumps(data, indent=1) + "\n")
    if args.save:
        saved = Path(__file__).parent / "connection_limit-results.json"
        saved.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, RESULTS / "connection_limit.png")
    print(f"\n| tabs | {' | '.join(data['post_ms'])} |")
    print("|---:|" + "---:|" * len(data["post_ms"]))
    for i, tabs in enumerate(data["tabs"]):
        cells = ["stalled" if t[i] is None else f"{t[i]:.1f}" for t in data["post_ms"].values()]
        print(f"| {tabs} | " + " | ".join(cells) + " |")
    print(f"\nsaved {RESULTS / 'connection_limit.json'} and connection_limit.png")


if __name__ == "__main__":
    main()
