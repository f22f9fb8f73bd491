"""End-to-end hardening: overload, time limits, readiness, drain, disconnect storms, fuzzing, logs."""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import KEY, Server, run_server
from tests.test_properties import MESSAGES, OPENAI_NAMES, bodies

pytestmark = pytest.mark.e2e
AUTH = {"x-api-key": KEY}
LONG = {"prompt": "long", "max_new_tokens": 200, "ignore_eos": True}
# Outlasts the 1-2 s limits below on any CPU seen: 1,000 tokens (distilgpt2's context allows no
# more) took 5.5 s at one row on the fastest, a Zen 5 EPYC, where 200 took 0.8 s and ended first.
HOLD = {"prompt": "long", "max_new_tokens": 1000, "ignore_eos": True}
HOLD_LIMIT = {"MAX_NEW_TOKENS_LIMIT": "1000"}


def post(server: Server, body: object, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + "/generate", json=body, headers=AUTH, timeout=timeout)


def wait_for(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def active(server: Server) -> int:
    return int(httpx.get(server.url + "/health").json()["active_sequences"])


@pytest.fixture(scope="module")
def small(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Capacity 2 running + 2 waiting, so overload is easy to reach."""
    # QUEUE_TIMEOUT well past the time two short generations take, even on a busy machine.
    env = {"MODEL_NAME": str(gpt2_dir), "MAX_BATCH_SIZE": "2", "MAX_QUEUE": "2", "LOAD_ON_START": "1",
           "QUEUE_TIMEOUT": "300"}  # fmt: skip
    with run_server(tmp_path_factory.mktemp("small"), **env) as server:
        yield server


def test_ready_turns_200_without_traffic_when_loading_at_start(small: Server) -> None:
    wait_for(lambda: httpx.get(small.url + "/ready").status_code == 200, timeout=60)
    assert httpx.get(small.url + "/ready").json() == {"status": "ready"}


def test_ready_is_503_until_the_lazy_model_loads(gpt2_dir: Path, tmp_path: Path) -> None:
    with run_server(tmp_path, MODEL_NAME=str(gpt2_dir)) as lazy:
        response = httpx.get(lazy.url + "/ready")
        assert response.status_code == 503
        assert "not loaded" in response.json()["detail"]
        assert httpx.get(lazy.url + "/health").status_code == 200
        assert post(lazy, {"prompt": "wake up", "max_new_tokens": 2}).status_code == 200
        assert httpx.get(lazy.url + "/ready").status_code == 200


def test_four_times_capacity_gets_only_200_and_503(small: Server) -> None:
    """16 clients against 2 running + 2 waiting: the rest are refused at once, nobody hangs."""
    wait_for(lambda: httpx.get(small.url + "/ready").status_code == 200, timeout=60)
    health_latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            assert httpx.get(small.url + "/health", timeout=5).status_code == 200
            health_latencies.append(time.perf_counter() - start)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    body = {"prompt": "overload", "max_new_tokens": 40, "ignore_eos": True}
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: post(small, body), range(16)))
    stop.set()
    prober.join()
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 4
    assert statuses.count(503) >= 1
    for r in responses:
        if r.status_code == 200:
            assert r.json()["generated_tokens"] == 40  # every accepted request completes
        else:
            assert r.headers["retry-after"] == "1"
            assert "at capacity" in r.json()["detail"]
    assert max(health_latencies) < 2  # answered throughout (a loaded 2-core box, so not instant)


def test_disconnect_storm_empties_the_batch(small: Server) -> None:
    host, port = small.url.removeprefix("http://").split(":")
    body = json.dumps(LONG).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    rng = random.Random(7)
    for _ in range(12):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(head + body)
        time.sleep(rng.uniform(0, 0.2))
        sock.close()
    wait_for(lambda: active(small) == 0, timeout=3)
    assert post(small, {"prompt": "after the storm", "max_new_tokens": 3}).status_code == 200


@pytest.fixture(scope="module")
def slow(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MODEL_NAME": str(gpt2_dir), "MAX_BATCH_SIZE": "1", "QUEUE_TIMEOUT": "1", "REQUEST_TIMEOUT": "2",
           "MAX_NEW_TOKENS_LIMIT": "1000"}  # fmt: skip
    with run_server(tmp_path_factory.mktemp("slow"), **env) as server:
        yield server


def test_request_deadline_ends_with_timeout_and_the_text_so_far(slow: Server) -> None:
    post(slow, {"prompt": "load", "max_new_tokens": 1})
    # The 2 s deadline comes first (200 tokens once took ~2 s and made this a race).
    body = post(slow, HOLD).json()
    assert body["finish_reason"] == "timeout"
    assert 0 < body["generated_tokens"] < 1000
    assert body["generated_text"].startswith("long")


def test_waiting_past_the_queue_timeout_is_503(slow: Server) -> None:
    post(slow, {"prompt": "load", "max_new_tokens": 1})
    holder = threading.Thread(target=post, args=(slow, HOLD))
    holder.start()
    wait_for(lambda: active(slow) == 1)
    start = time.monotonic()
    response = post(slow, {"prompt": "waiting", "max_new_tokens": 2})
    waited = time.monotonic() - start
    holder.join()
    assert response.status_code == 503
    assert "QUEUE_TIMEOUT=1" in response.json()["detail"]
    assert 0.9 < waited < 1.9


CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", "", "json"]
KEYS: list[list[tuple[str, str]]] = [[("x-api-key", KEY)], [], [("x-api-key", KEY)] * 2, [("x-api-key", "bad")]]


ROUTES = ["/generate", "/generate", "/v1/completions", "/v1/chat/completions"]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, list[tuple[str, str]]]:
    """A route, a body (arbitrary JSON as text, or arbitrary bytes) and headers, mostly with a
    valid key (on /v1/ sometimes as a Bearer token)."""
    route, raw = draw(st.sampled_from(ROUTES)), draw(st.integers(0, 4)) == 0
    value = draw(bodies() if route == "/generate" else bodies(OPENAI_NAMES))
    if isinstance(value, dict) and route.endswith("chat/completions") and draw(st.booleans()):
        value["messages"] = draw(MESSAGES)
    body = draw(st.binary(max_size=300)) if raw else json.dumps(value).encode()  # \ud800 escapes
    headers = [("content-type", draw(st.sampled_from(CONTENT_TYPES)))]
    headers += draw(st.sampled_from(KEYS[:1] * 6 + KEYS[1:]))
    if route != "/generate" and headers[1:] == KEYS[0] and draw(st.booleans()):
        headers = [headers[0], ("authorization", f"Bearer {KEY}")]
    return route, body, headers


@pytest.fixture(scope="module")
def fuzzed(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short generations (MAX_NEW_TOKENS_LIMIT=4), so hundreds of accepted requests stay quick."""
    env = {"MODEL_NAME": str(gpt2_dir), "MAX_NEW_TOKENS_LIMIT": "4", "LOAD_ON_START": "1"}
    with run_server(tmp_path_factory.mktemp("fuzzed"), **env) as server:
        yield server


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests())
def test_arbitrary_requests_get_a_json_4xx_or_a_documented_200(fuzzed: Server, request: tuple) -> None:
    route, body, headers = request
    response = httpx.post(fuzzed.url + route, content=body, headers=headers, timeout=60)
    assert response.status_code < 500 or response.status_code == 503, response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):  # "stream": true
        assert response.status_code == 200
        assert response.text.rstrip().endswith("data: [DONE]" if route != "/generate" else "}")
        return
    if route != "/generate":
        if response.status_code == 200:
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert response.status_code != 422  # OpenAI says 400 for a bad field
        return
    if response.status_code == 200:
        answer = response.json()
        assert set(answer) == {"generated_text", "generated_tokens", "finish_reason"}
        assert answer["finish_reason"] in ("length", "stop", "eos")
        assert 0 <= answer["generated_tokens"] <= 4
    else:
        assert set(response.json()) == {"detail"}
        assert response.json()["detail"]


def test_each_request_logs_one_json_line_without_secrets(small: Server) -> None:
    mine = {"x-request-id": "trace-abc-123", **AUTH}
    response = httpx.post(small.url + "/generate", json={"prompt": "secret prompt", "max_new_tokens": 2}, headers=mine)
    assert response.headers["x-request-id"] == "trace-abc-123"
    made_up = httpx.get(small.url + "/health").headers["x-request-id"]
    assert len(made_up) == 32
    time.sleep(0.2)
    lines = [json.loads(line) for line in small.log().splitlines() if line.startswith("{")]
    requests = {e["request_id"]: e for e in lines if e["message"] == "request"}
    entry = requests["trace-abc-123"]
    assert (entry["path"], entry["status"], entry["tokens"], entry["finish_reason"]) == ("/generate", 200, 2, "length")
    assert entry["latency_ms"] > 0
    assert requests[made_up]["path"] == "/health"
    assert KEY not in small.log()
    assert "secret prompt" not in small.log()  # LOG_PROMPTS is off


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(gpt2_dir: Path, tmp_path: Path) -> None:
    with run_server(tmp_path, MODEL_NAME=str(gpt2_dir), LOAD_ON_START="1", DRAIN_TIMEOUT="240") as server:
        wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200, timeout=60)
        body = {"prompt": "drain", "max_new_tokens": 60, "ignore_eos": True}
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post, server, body) for _ in range(3)]
            wait_for(lambda: active(server) == 3)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError):  # no new connections while draining
                httpx.get(server.url + "/ready", timeout=2)
            responses = [f.result() for f in futures]
        assert server.process.wait(timeout=60) == 0
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(r.json()["generated_tokens"] == 60 for r in responses)


def test_past_the_drain_timeout_generations_end_with_what_they_have(gpt2_dir: Path, tmp_path: Path) -> None:
    with run_server(tmp_path, MODEL_NAME=str(gpt2_dir), LOAD_ON_START="1", DRAIN_TIMEOUT="1", **HOLD_LIMIT) as server:
        wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200, timeout=60)
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(post, server, HOLD) for _ in range(2)]
            wait_for(lambda: active(server) == 2)
            server.process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert server.process.wait(timeout=60) == 0
    for response in responses:
        assert response.status_code == 200
        body = response.json()
        assert body["finish_reason"] == "timeout"
        assert 0 < body["generated_tokens"] < 1000
    assert "drain timeout reached" in server.log()


def test_a_stream_cut_short_by_the_drain_ends_with_an_error_event(gpt2_dir: Path, tmp_path: Path) -> None:
    with run_server(tmp_path, MODEL_NAME=str(gpt2_dir), LOAD_ON_START="1", DRAIN_TIMEOUT="1", **HOLD_LIMIT) as server:
        wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200, timeout=60)
        lines: list[str] = []
        with httpx.stream("POST", server.url + "/generate", json={**HOLD, "stream": True}, headers=AUTH) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 2:  # the first event is in: the stream has begun
                    server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    assert lines[0] == "event: token"
    assert "event: error" in lines
    assert "shutting down" in lines[lines.index("event: error") + 1]
