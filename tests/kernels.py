"""One way to run cells in a REAL Jupyter kernel (the venv's ``python3`` kernelspec).

``async with started_kernel() as kernel:`` starts an ipykernel and always shuts it down;
``await kernel.run(code)`` runs one cell through ``jupyter_client`` and returns its
:class:`Cell` (the execute_reply and the iopub messages it produced); ``run_ok`` also asserts
that the cell succeeded. A cell may report what it measured on a line ``RESULT {json}``
(:attr:`Cell.result`). Timeouts are hang guards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

ROOT = Path(__file__).resolve().parent.parent
CELL_TIMEOUT = 30.0  # hang guard for one cell

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Cell:
    """The execute_reply of one cell and the iopub messages it produced."""

    def __init__(self, reply: dict, outputs: list[dict]) -> None:
        self.reply = reply
        self.outputs = outputs

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    @property
    def ename(self) -> str | None:
        return self.reply["content"].get("ename")

    def stream(self, name: str = "stdout") -> str:
        return "".join(m["content"]["text"] for m in self.outputs
                       if m["msg_type"] == "stream" and m["content"]["name"] == name)

    @property
    def msg_id(self) -> str:
        """The id of the execute request (the parent of every message the cell caused)."""
        return self.reply["parent_header"]["msg_id"]

    def shown(self) -> str:
        """The text/plain of the cell's value (its execute_result), "" if it had none."""
        return "".join(m["content"]["data"]["text/plain"] for m in self.outputs
                       if m["msg_type"] == "execute_result")

    @property
    def result(self) -> dict:
        """The JSON the cell printed after ``RESULT``."""
        lines = [ln for ln in self.stream().splitlines() if ln.startswith("RESULT ")]
        assert lines, f"the cell printed no RESULT line\n{self}"
        return json.loads(lines[-1][len("RESULT "):])

    def __str__(self) -> str:
        content = self.reply["content"]
        traceback = ANSI.sub("", "\n".join(content.get("traceback", [])))
        return (f"status={self.status} ename={self.ename} evalue={content.get('evalue')}\n"
                f"stdout:\n{self.stream()}\nstderr:\n{self.stream('stderr')}\n{traceback}")


class Kernel:
    """A started kernel: its manager, its client, and the pid it had at start."""

    def __init__(self, km: AsyncKernelManager, kc) -> None:
        self.km = km
        self.kc = kc
        self.pid: int | None = None

    async def run(self, code: str, *, timeout: float = CELL_TIMEOUT,
                  marker: str | None = None, seen: asyncio.Event | None = None) -> Cell:
        """Execute ``code``; ``seen`` is set as soon as ``marker`` appears on its stdout."""
        outputs: list[dict] = []

        def hook(msg: dict) -> None:
            outputs.append(msg)
            if seen is not None and marker is not None and msg["msg_type"] == "stream":
                if marker in "".join(m["content"].get("text", "") for m in outputs
                                     if m["msg_type"] == "stream"):
                    seen.set()

        try:
            reply = await self.kc.execute_interactive(
                code, timeout=timeout, output_hook=hook, allow_stdin=False,
                stop_on_error=False)
        except TimeoutError:
            alive = await self.km.is_alive()
            if alive:  # don't leave the next tests queued behind a stuck cell
                await self.km.interrupt_kernel()
            pytest.fail(f"no reply within {timeout} s (kernel alive: {alive}) to the cell:\n"
                        f"{code}\noutput so far:\n{Cell({'content': {'status': '?'}}, outputs)}")
        return Cell(reply, outputs)

    async def run_ok(self, code: str, **kwargs) -> Cell:
        cell = await self.run(code, **kwargs)
        assert cell.status == "ok", str(cell)
        return cell


@contextlib.asynccontextmanager
async def started_kernel(*, extra_arguments: list[str] | None = None):
    """A started :class:`Kernel` with its working directory at the repository root."""
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel(cwd=str(ROOT), extra_arguments=extra_arguments or [])
    kc = km.client()
    try:
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        yield Kernel(km, kc)
    finally:
        kc.stop_channels()
        try:
            await asyncio.wait_for(km.shutdown_kernel(), 30)
        except (TimeoutError, RuntimeError):
            await asyncio.wait_for(km.shutdown_kernel(now=True), 30)
