"""A plain (non-editable) install serves the chat page: static/ ships as package data.

Builds a wheel of this checkout (``pip wheel``, build isolation as ``pip install .`` does),
installs it into a fresh venv in a temporary directory together with the packages the
server imports (pinned to the versions installed here, so pip's cache answers), starts
``python -m chatlib serve`` from that venv in a directory that is not the checkout, and
fetches the page and its assets.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from helpers import end_process

ROOT = Path(__file__).resolve().parent.parent
SERVER_IMPORTS = ("starlette", "uvicorn", "websockets")  # what `chatlib serve` imports
pytestmark = pytest.mark.timeout(600)


def run(*command, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT),
        cwd=out)
    [built] = out.glob("chatlib-*.whl")
    return built


def test_wheel_holds_the_page_and_every_front_end_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for page in ("index.html", "app.js", "style.css"):
        assert f"chatlib/static/{page}" in names
    for path in (ROOT / "chatlib").rglob("*"):
        if path.suffix in (".js", ".css", ".html") and "__pycache__" not in path.parts:
            assert path.relative_to(ROOT).as_posix() in names, path
    # The server config that enables chatlib.save_hook in the environment it installs into.
    config = "etc/jupyter/jupyter_server_config.d/chatlib.json"
    assert any(name.endswith(f".data/data/{config}") for name in names), sorted(names)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", str(home / "venv"), cwd=home)
    python = home / "venv" / "bin" / "python"
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in SERVER_IMPORTS]
    run(str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel), cwd=home)
    run(str(python), "-m", "pip", "install", "-q", *pins, cwd=home)
    return python


async def test_installed_wheel_serves_the_chat_page(venv, tmp_path):
    where = run(str(venv), "-c", "import chatlib.app as a; print(a.STATIC_DIR)", cwd=tmp_path)
    assert "site-packages" in where and str(ROOT) not in where, where
    process = await asyncio.create_subprocess_exec(
        str(venv), "-m", "chatlib", "serve", "--port", "0", cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    try:
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode()
        assert "serving on" in line, line
        url = line.split("serving on ")[1].split()[0]
        async with httpx.AsyncClient(timeout=10) as http:
            page = await http.get(url)
            assert page.status_code == 200 and 'src="static/app.js"' in page.text
            for asset in ("static/app.js", "static/style.css"):
                response = await http.get(url + asset)
                assert response.status_code == 200, asset
                assert response.content == (ROOT / asset).read_bytes()
    finally:
        await end_process(process)
