"""End-to-end: streaming /generate through Debian's haproxy, configured by deploy/haproxy.cfg.

Tokens arrive through the proxy as they are made, not in one piece at the end; a request waiting
for a place gets keep-alive comments through it; and a client that leaves, mid-stream or still
queued, frees its place: at once when it talks to the server directly, and through haproxy at once
mid-stream but only within two keep-alive intervals while queued (see `route`). MAX_BATCH_SIZE=1
makes "waiting for a place" easy to arrange: one long generation holds the only place.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import KEEPALIVE_SECONDS
from tests.conftest import KEY, Server, run_server
from tests.sse import Event, events, read_all, until
from tests.test_replicas import Haproxy, Replica, start_haproxy, wait_for

pytestmark = pytest.mark.e2e
AUTH = {"x-api-key": KEY}
# The holder must outlast haproxy's notice of a client leaving (up to 13 s, below). distilgpt2's
# 1,024-token context gave 5.5 s on a Zen 5 EPYC, so SmolLM2 (30 layers, 8,192 tokens): a minute
# or more at ~10 ms a token, always cut short.
LONG = {"prompt": "Hold the place", "max_new_tokens": 8000, "ignore_eos": True}
FREED_WITHIN = 3.0  # seconds from a client leaving until its place is free: a step is ~10 ms, the rest is
# margin for a busy 2-core machine; a place that is not given back would be held for a minute


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MODEL_NAME": str(smollm2_dir), "MAX_BATCH_SIZE": "1", "MAX_NEW_TOKENS_LIMIT": "8000",
           "MAX_CONTEXT_TOKENS": "8192", "LOAD_ON_START": "1"}  # fmt: skip
    with run_server(tmp_path_factory.mktemp("stream"), **env) as s:
        wait_for(lambda: httpx.get(s.url + "/ready").status_code == 200, 120, "the model loaded")
        yield s


@pytest.fixture(scope="module")
def haproxy(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Haproxy]:
    """deploy/haproxy.cfg as shipped, with both of its required replicas pointing at the one server."""
    tmp = tmp_path_factory.mktemp("haproxy")
    port = int(server.url.rsplit(":", 1)[1])
    proxy = start_haproxy([Replica(f"r{i}", port, {}, tmp) for i in (1, 2)], tmp)
    try:
        proxy.wait_up(["r1", "r2"])
        yield proxy
    finally:
        proxy.process.terminate()
        proxy.process.wait(timeout=10)


@dataclass(frozen=True)
class Route:
    url: str
    notices_leaving: float  # seconds within which the server learns that a queued client left


@pytest.fixture(params=["direct", "haproxy"])
def route(request: pytest.FixtureRequest, server: Server) -> Route:
    """The way to the server: straight, or through haproxy. uvicorn hears a client close at once.
    haproxy 2.6 hears it only when a write to the client fails, the second one after the close:
    for a queued stream that is the second keep-alive comment (`option abortonclose` and `timeout
    client-fin` change nothing here: tried). A stream that has tokens flowing is cut at once."""
    if request.param == "direct":
        return Route(server.url, FREED_WITHIN)
    return Route(str(request.getfixturevalue("haproxy").url), 2 * KEEPALIVE_SECONDS + FREED_WITHIN)


def stream(stack: ExitStack, url: str, body: dict[str, object]) -> tuple[httpx.Response, Iterator[Event]]:
    """Open a streaming /generate that stays open until the stack closes (or response.close())."""
    client = stack.enter_context(httpx.Client(base_url=url, headers=AUTH, timeout=30))
    response = stack.enter_context(client.stream("POST", "/generate", json={**body, "stream": True}))
    return response, events(response)


def gauge(server: Server, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0  # a labelled counter not seen yet


def active(server: Server) -> int:
    return int(httpx.get(server.url + "/health", timeout=5).json()["active_sequences"])


def settles(condition: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until `condition` holds; fails past `within`."""
    start = time.monotonic()
    wait_for(condition, within, what)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# Through the proxy: tokens as they are made


def test_tokens_arrive_through_haproxy_as_they_are_made(server: Server, haproxy: Haproxy) -> None:
    body = {"prompt": "Through the proxy", "max_new_tokens": 120, "ignore_eos": True}
    with httpx.Client(base_url=haproxy.url, headers=AUTH, timeout=60) as client:
        start = time.monotonic()
        with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
            headers = response.headers
            seen = read_all(events(response), timeout=60)
        plain = client.post("/generate", json=body).json()
    tokens, last = [e for e in seen if e.kind == "token"], seen[-1]
    total, first = last.at - start, tokens[0].at - start
    instants = {round(e.at, 2) for e in tokens}  # events 10 ms apart or more count as separate arrivals
    print(f"\n120 tokens through haproxy: first event after {first:.2f} s, last after {total:.2f} s, "
          f"{len(tokens)} token events at {len(instants)} distinct instants")  # fmt: skip
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert last.kind == "done" and last.data["finish_reason"] == "length"
    assert first < 0.3 * total
    assert len(instants) >= 10
    assert [e.data["generated_tokens"] for e in tokens] == sorted({e.data["generated_tokens"] for e in tokens})
    assert sum(len(e.data["token_ids"]) for e in tokens) == tokens[-1].data["generated_tokens"] == 120
    assert "".join(e.data["text"] for e in tokens) == last.data["generated_text"].removeprefix(body["prompt"])
    assert last.data == plain  # greedy: the stream ends with exactly the JSON answer


# ---------------------------------------------------------------------------------------------
# Waiting for a place: keep-alive comments, through the proxy


def test_a_queued_stream_gets_keepalive_comments_through_haproxy(server: Server, haproxy: Haproxy) -> None:
    with ExitStack() as stack:
        holder, holder_events = stream(stack, server.url, LONG)
        until(holder_events, "token", timeout=10)  # the only place is taken
        sent = time.monotonic()
        queued, queued_events = stream(stack, haproxy.url, {"prompt": "Next", "max_new_tokens": 8})
        waiting = until(queued_events, "comment", timeout=KEEPALIVE_SECONDS + 5)
        assert [e.kind for e in waiting] == ["comment"] and waiting[0].data == "waiting"
        assert waiting[0].at - sent >= KEEPALIVE_SECONDS - 0.5
        assert queued.status_code == 200 and queued.headers["x-accel-buffering"] == "no"
        holder.close()  # the place frees up: the queued request starts
        left = time.monotonic()
        rest = read_all(queued_events, timeout=30)
    first_token = next(e for e in rest if e.kind == "token")
    print(f"\nqueued stream: first comment {waiting[0].at - sent:.2f} s after sending, first token "
          f"{first_token.at - left:.2f} s after the holder left")  # fmt: skip
    assert first_token.at - left < FREED_WITHIN
    assert rest[-1].kind == "done" and rest[-1].data["generated_tokens"] > 0


# ---------------------------------------------------------------------------------------------
# A client that leaves frees its place


def send_and_leave_later(url: str, body: dict[str, object]) -> socket.socket:
    """A streaming /generate sent on a bare socket, so the test decides when the client leaves
    (closing it) whether or not an answer has begun."""
    address = urlparse(url)
    content = json.dumps({**body, "stream": True}).encode()
    head = (f"POST /generate HTTP/1.1\r\nHost: {address.netloc}\r\nx-api-key: {KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(content)}\r\n\r\n")  # fmt: skip
    sock = socket.create_connection((address.hostname, address.port), timeout=10)
    sock.sendall(head.encode() + content)
    return sock


def test_a_client_leaving_mid_stream_frees_its_place(server: Server, route: Route) -> None:
    with ExitStack() as stack:
        response, stream_events = stream(stack, route.url, LONG)
        until(stream_events, "token", timeout=10)
        until(stream_events, "token", timeout=10)
        assert active(server) == 1
        response.close()
        freed = settles(lambda: active(server) == 0, FREED_WITHIN, "the place freed after the client left")
    print(f"\nplace freed {freed:.2f} s after the client left mid-stream")
    assert gauge(server, "llm_waiting_sequences") == 0


def test_a_client_leaving_while_queued_frees_its_place_and_is_never_run(server: Server, route: Route) -> None:
    prefills = gauge(server, "llm_engine_steps_total", kind="prefill")
    with ExitStack() as stack:
        holder, holder_events = stream(stack, server.url, LONG)
        until(holder_events, "token", timeout=10)
        queued = send_and_leave_later(route.url, LONG)
        wait_for(lambda: gauge(server, "llm_waiting_sequences") == 1, 5, "the second request queued")
        queued.close()
        freed = settles(lambda: gauge(server, "llm_waiting_sequences") == 0, route.notices_leaving, "queue freed")
        assert active(server) == 1  # the holder still runs
        holder.close()
        settles(lambda: active(server) == 0, FREED_WITHIN, "the running place freed")
    time.sleep(0.5)  # had the queued one survived somewhere, it would be prefilled by now
    print(f"\nqueued place freed {freed:.2f} s after its client left")
    assert active(server) == 0
    assert gauge(server, "llm_engine_steps_total", kind="prefill") == prefills + 1  # the holder's only
