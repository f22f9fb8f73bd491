"""End-to-end: connections that never finish a request cannot hold the server (slowloris)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.conftest import KEY, Server, run_server

pytestmark = pytest.mark.e2e
AUTH = {"x-api-key": KEY}


@pytest.fixture(scope="module")
def server(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MODEL_NAME": str(gpt2_dir), "HEAD_TIMEOUT": "1", "BODY_TIMEOUT": "1", "LOAD_ON_START": "1"}
    with run_server(tmp_path_factory.mktemp("conn"), **env) as s:
        yield s


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=15)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Read until the server closes (True) or `within` seconds pass (False); answers are skipped."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_a_connection_that_sends_nothing_is_closed_after_head_timeout(server: Server) -> None:
    with ExitStack() as stack:
        silent = [stack.enter_context(connect(server)) for _ in range(10)]
        partial = [stack.enter_context(connect(server)) for _ in range(10)]
        for sock in partial:
            sock.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\n")  # the head never ends
        start = time.monotonic()
        assert all(closed_by_server(sock, within=5) for sock in silent + partial)
        assert time.monotonic() - start < 5


def test_trickling_bytes_does_not_keep_a_head_open(server: Server) -> None:
    with connect(server) as sock:
        start = time.monotonic()
        sock.settimeout(0.2)
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nhost: x\r\nx-a: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
        assert closed
        assert time.monotonic() - start < 4


def test_keep_alive_then_a_slow_next_head_is_closed(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's head, never finished
        assert closed_by_server(sock, within=5)


def raw_post(sock: socket.socket, head: str, body: bytes = b"") -> bytes:
    sock.sendall(head.encode() + body)
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(4096)
    return reply


@pytest.mark.parametrize(
    ("head", "body", "status"),
    [
        # 408: promised 100 bytes, sent 10
        (f"POST /generate HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\n"
         "content-length: 100\r\n\r\n", b'{"prompt":', b"408"),
        # 413: declared too large, body unread
        (f"POST /generate HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\n"
         "content-length: 99999999\r\n\r\n", b"{", b"413"),
        # 401: body unread
        ("POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n",
         b"{", b"401"),
        # 415: body unread
        (f"POST /generate HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-type: text/plain\r\n"
         "content-length: 50\r\n\r\n", b"{", b"415"),
    ],
)  # fmt: skip
def test_answers_before_the_body_was_read_close_the_connection(
    server: Server, head: str, body: bytes, status: bytes
) -> None:
    with connect(server) as sock:
        reply = raw_post(sock, head, body)
        assert reply.startswith(b"HTTP/1.1 " + status)
        assert b"connection: close" in reply.lower()
        try:
            sock.sendall(b"x")  # one more trickled byte must not revive it
        except (BrokenPipeError, ConnectionResetError):
            return
        assert closed_by_server(sock, within=3)


def test_past_max_connections_a_new_connection_gets_a_json_503_at_once(tmp_path: Path) -> None:
    with run_server(tmp_path, MODEL_NAME="/nonexistent", MAX_CONNECTIONS="20", HEAD_TIMEOUT="30") as small:
        with ExitStack() as stack:
            for _ in range(20):
                stack.enter_context(connect(small))
            time.sleep(0.3)
            start = time.monotonic()
            response = httpx.get(small.url + "/health", timeout=5)
            assert time.monotonic() - start < 1
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "MAX_CONNECTIONS=20" in response.json()["detail"]
        assert httpx.get(small.url + "/health").status_code == 200  # the idle ones are gone: served again


def test_with_500_idle_sockets_health_answers_and_generation_completes(gpt2_dir: Path, tmp_path: Path) -> None:
    env = {"MODEL_NAME": str(gpt2_dir), "LOAD_ON_START": "1"}  # default HEAD_TIMEOUT and MAX_CONNECTIONS
    with run_server(tmp_path, **env) as fresh, ExitStack() as stack:
        for _ in range(500):
            stack.enter_context(connect(fresh))
        start = time.monotonic()
        assert httpx.get(fresh.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 1
        body = {"prompt": "still serving", "max_new_tokens": 5, "ignore_eos": True}
        response = httpx.post(fresh.url + "/generate", json=body, headers=AUTH, timeout=120)
        assert response.status_code == 200
        assert json.loads(response.text)["generated_tokens"] == 5
