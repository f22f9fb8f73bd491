"""End-to-end: the real server process (`python server.py`, as `make run` starts it) over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server import GENERATE_ERRORS, Limits
from tests.conftest import KEY, ROOT, Server, run_server

pytestmark = pytest.mark.e2e
AUTH = {"x-api-key": KEY}


@pytest.fixture(scope="module")
def server(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MODEL_NAME": str(gpt2_dir), "MAX_BATCH_SIZE": "8", "BODY_TIMEOUT": "2"}
    with run_server(tmp_path_factory.mktemp("gpt2"), **env) as s:
        yield s


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(
        tmp_path_factory.mktemp("broken"), MODEL_NAME="/nonexistent/model-dir", MODEL_RETRY_SECONDS="1"
    ) as s:
        yield s


def post(server: Server, body: object, content: bytes | None = None, json_type: bool = False) -> httpx.Response:
    headers = {**AUTH, "content-type": "application/json"} if json_type else AUTH
    return httpx.post(server.url + "/generate", json=body, content=content, headers=headers, timeout=120)


def test_health_is_the_originals_shape(server: Server) -> None:
    body = httpx.get(server.url + "/health").json()
    assert body["status"] == "ok"
    assert body["service"] == "LLM-Generator"


def test_generation_starts_with_the_prompt(server: Server) -> None:
    response = post(server, {"prompt": "Hello, world", "max_new_tokens": 7, "ignore_eos": True})
    assert response.status_code == 200
    body = response.json()
    assert body["generated_text"].startswith("Hello, world")
    assert len(body["generated_text"]) > len("Hello, world")
    assert body["generated_tokens"] == 7
    assert body["finish_reason"] == "length"


def test_default_max_new_tokens_is_50(server: Server) -> None:
    assert post(server, {"prompt": "abc", "ignore_eos": True}).json()["generated_tokens"] == 50


def test_same_seed_same_text(server: Server) -> None:
    body = {"prompt": "Seeds", "max_new_tokens": 12, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    texts = {post(server, body).json()["generated_text"] for _ in range(3)}
    assert len(texts) == 1
    other = post(server, {**body, "seed": 6}).json()["generated_text"]
    assert other not in texts


def test_missing_and_wrong_keys_are_401(server: Server) -> None:
    body = {"prompt": "hi"}
    assert httpx.post(server.url + "/generate", json=body).status_code == 401
    wrong = httpx.post(server.url + "/generate", json=body, headers={"x-api-key": "nope"})
    assert wrong.status_code == 401
    assert wrong.json() == {"detail": "invalid API key"}
    assert "nope" not in server.log()


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b'"just a string"', "application/json", 422),
        (b'{"prompt": ""}', "application/json", 422),
        (b'{"prompt": "a", "max_new_tokens": 201}', "application/json", 422),
        (b'{"prompt": "a", "max_new_tokens": 2.5}', "application/json", 422),
        (b'{"prompt": "a", "temperature": -1}', "application/json", 422),
        (b'{"prompt": "a", "top_p": 1.01}', "application/json", 422),
        (b'{"prompt": "a", "extra": 1}', "application/json", 422),
        (b'{"prompt": "a"}', "text/plain", 415),
        (b"\xc3\x28", "application/json", 400),
    ],
)
def test_bad_input_over_http(server: Server, content: bytes, content_type: str, status: int) -> None:
    headers = {**AUTH, "content-type": content_type}
    response = httpx.post(server.url + "/generate", content=content, headers=headers)
    assert response.status_code == status
    assert response.json()["detail"]


def test_prompt_longer_than_the_context_says_what_fits(server: Server) -> None:
    response = post(server, {"prompt": "word " * 1100, "max_new_tokens": 24})
    assert response.status_code == 422
    assert "at most 1000 prompt tokens fit in the model's context of 1024" in response.json()["detail"]


def test_oversized_chunked_body_is_refused_while_reading(server: Server) -> None:
    """Send a chunked body with no end: the 413 must come back before we stop sending."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = f"POST /generate HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\n"
        sock.sendall((head + "transfer-encoding: chunked\r\n\r\n").encode())
        chunk = b"x" * 8192
        for _ in range(Limits().max_body_bytes // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = b""  # the final zero-length chunk is never sent
        while not reply.endswith(b"}"):
            reply += sock.recv(4096)
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413")
    assert "limit" in reply


def slow_body_status(server: Server) -> tuple[int, float]:
    """Promise 100 bytes, send 10, then stall: the server must give up after BODY_TIMEOUT."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST /generate HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\n"
        sock.sendall((head + "content-length: 100\r\n\r\n").encode() + b'{"prompt":')
        start = time.monotonic()
        reply = sock.recv(4096).decode()
    return int(reply.split()[1]), time.monotonic() - start


def test_a_slow_body_gets_408(server: Server) -> None:
    status, waited = slow_body_status(server)
    assert status == 408
    assert 1.5 < waited < 10


def test_health_answers_at_once_during_long_generations(server: Server) -> None:
    body = {"prompt": "long", "max_new_tokens": 200, "ignore_eos": True}
    workers = [threading.Thread(target=post, args=(server, body)) for _ in range(4)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 5
    while httpx.get(server.url + "/health").json()["active_sequences"] == 0:  # wait for them to start
        assert time.monotonic() < deadline
    # Each probe's own answer says whether the generations still ran when it was served, so the
    # test counts those probes rather than betting on how long 200 tokens take on this CPU.
    busy_latencies = []
    while any(w.is_alive() for w in workers):
        start = time.perf_counter()
        response = httpx.get(server.url + "/health", timeout=5)
        latency = time.perf_counter() - start
        assert response.status_code == 200
        if response.json()["active_sequences"] > 0:
            busy_latencies.append(latency)
    assert len(busy_latencies) >= 10  # probed while the generations ran
    assert max(busy_latencies) < 0.5


def test_client_that_leaves_frees_its_place(server: Server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "bye", "max_new_tokens": 200, "ignore_eos": True}).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode() + body)
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["active_sequences"] != 1:
        assert time.monotonic() < deadline
    sock.close()
    left = time.monotonic()
    while httpx.get(server.url + "/health").json()["active_sequences"] != 0:
        assert time.monotonic() - left < 2, "the abandoned sequence kept generating"
        time.sleep(0.02)
    assert post(server, {"prompt": "still fine", "max_new_tokens": 3}).status_code == 200


def test_docs_are_openapi_with_the_real_limits(server: Server) -> None:
    spec = httpx.get(server.url + "/docs").json()
    assert spec["openapi"].startswith("3.")
    props = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["max_new_tokens"]["maximum"] == Limits().max_new_tokens
    assert spec["components"]["securitySchemes"]["apiKey"]["name"] == "x-api-key"


def test_every_documented_error_status_is_produced(server: Server, broken_server: Server) -> None:
    produced = {
        400: post(server, None, content=b"{", json_type=True).status_code,
        401: httpx.post(server.url + "/generate", json={"prompt": "a"}).status_code,
        408: slow_body_status(server)[0],
        413: post(server, None, content=b" " * (Limits().max_body_bytes + 1), json_type=True).status_code,
        415: httpx.post(
            server.url + "/generate", content=b"{}", headers={**AUTH, "content-type": "text/csv"}
        ).status_code,
        422: post(server, {"prompt": 1}).status_code,
        503: post(broken_server, {"prompt": "a"}).status_code,
    }
    assert set(produced) == set(GENERATE_ERRORS)
    assert all(code == status for code, status in produced.items())


def test_unloadable_model_is_503_with_advice_and_retried(broken_server: Server) -> None:
    failures_before = broken_server.log().count("loading the model failed")
    for _ in range(2):  # a later request tries again, and fails the same clear way
        time.sleep(1.1)  # past MODEL_RETRY_SECONDS
        response = post(broken_server, {"prompt": "a"})
        assert response.status_code == 503
        assert "MODEL_NAME" in response.json()["detail"]
        assert response.headers["retry-after"]
    health = httpx.get(broken_server.url + "/health").json()
    assert (health["status"], health["model_loaded"]) == ("ok", False)
    assert broken_server.log().count("loading the model failed") == failures_before + 2


def test_no_route_to_the_hub_names_the_offline_compose_file_in_generate_and_health(tmp_path: Path) -> None:
    """What `docker compose up` gives a user with no route to the hub (the image's distilgpt2, an
    empty cache): /generate and /health (which shows the reason's first 300 characters) say how to
    mount a model instead. The hub is pointed at 127.0.0.1:443, where nothing listens."""
    env = {"MODEL_NAME": "distilgpt2", "TRANSFORMERS_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)}
    with run_server(tmp_path, HF_ENDPOINT="https://127.0.0.1", **env) as offline:
        response = post(offline, {"prompt": "a"})
        health = httpx.get(offline.url + "/health").json()
    way_out = "docker compose -f docker-compose.yml -f docker-compose.offline.yml up"
    assert response.status_code == 503
    assert "(127.0.0.1)" in response.json()["detail"]  # the hub it tried
    assert way_out in response.json()["detail"]
    assert way_out in health["model_error"]


def test_concurrent_first_requests_load_the_model_once(gpt2_dir: Path, tmp_path: Path) -> None:
    with run_server(tmp_path, MODEL_NAME=str(gpt2_dir)) as fresh:
        assert httpx.get(fresh.url + "/health").json()["model_loaded"] is False
        results: list[int] = []
        body = {"prompt": "first", "max_new_tokens": 4}
        workers = [threading.Thread(target=lambda: results.append(post(fresh, body).status_code)) for _ in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert results == [200] * 6
        assert fresh.log().count("loaded in") == 1
        health = httpx.get(fresh.url + "/health").json()
        assert (health["model_loaded"], health["model_family"]) == (True, "gpt2")


def test_real_model_generates_sense(smollm2_dir: Path, tmp_path: Path) -> None:
    with run_server(tmp_path, MODEL_NAME=str(smollm2_dir)) as real:
        response = post(real, {"prompt": "The capital of France is", "max_new_tokens": 8})
    assert response.status_code == 200
    text = response.json()["generated_text"]
    assert text.startswith("The capital of France is")
    assert "Paris" in text


def test_server_refuses_to_start_without_api_key() -> None:
    env = {"PATH": "/usr/bin:/bin", "PORT": "1"}
    done = subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "API_KEY is not set" in done.stderr


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """Server-sent events as (name, data); comments (keep-alives) are skipped."""
    events, name = [], ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_streaming_sends_pieces_then_the_same_answer(server: Server) -> None:
    body = {"prompt": "Stream me", "max_new_tokens": 12, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    whole = post(server, body).json()
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert (response.headers["cache-control"], response.headers["x-accel-buffering"]) == ("no-cache", "no")
        events = read_events(response)
    *tokens, (last, done) = events
    assert last == "done"
    assert done == whole
    assert all(name == "token" for name, _ in tokens)
    assert "Stream me" + "".join(piece["text"] for _, piece in tokens) == whole["generated_text"]
    assert [piece["generated_tokens"] for _, piece in tokens] == sorted(p["generated_tokens"] for _, p in tokens)


def test_errors_before_the_first_event_are_json_statuses(server: Server, broken_server: Server) -> None:
    bad = httpx.post(server.url + "/generate", json={"prompt": "", "stream": True}, headers=AUTH)
    assert (bad.status_code, bad.headers["content-type"]) == (422, "application/json")
    down = httpx.post(broken_server.url + "/generate", json={"prompt": "a", "stream": True}, headers=AUTH)
    assert down.status_code == 503
    assert "MODEL_NAME" in down.json()["detail"]


def test_a_failed_load_shows_in_health_and_ready(broken_server: Server) -> None:
    post(broken_server, {"prompt": "a"})
    health = httpx.get(broken_server.url + "/health").json()
    assert (health["status"], health["model_state"]) == ("ok", "failed")
    assert "loading the model failed" in health["model_error"]
    ready = httpx.get(broken_server.url + "/ready")
    assert ready.status_code == 503
    assert "loading the model failed" in ready.json()["detail"]
    assert "tries again" in ready.json()["detail"]
