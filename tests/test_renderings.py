"""Unit: one generation, many renderings. A fake engine yields fixed events; the JSON answer and
the server-sent events are both renderings of them through the one `Generation` lifecycle, so
they must agree, and the accounting (metrics, place given back) must not depend on the rendering."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

import engine
from server import Settings, create_app

KEY = "k"
EVENTS: list[engine.Delta | engine.Result] = [
    engine.Delta([11], " once", 1),
    engine.Delta([12, 13], " upon", 3),  # two tokens, one piece: the first one's text was held back
    engine.Delta([14], " a time", 4),
    engine.Result(" once upon a time", 4, engine.FinishReason.LENGTH, prompt_tokens=2),
]


class FakeEngine:
    """Yields EVENTS for any prompt; or raises `error` before the first one."""

    running, active = True, 0

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.prefix = engine.PrefixCache(0)  # /metrics reads it, and the pool's blocks
        self.scheduler = engine.Scheduler(max_batch=1, blocks=0)
        self.cancels: list[threading.Event] = []

    def stream(self, prompt: str, params: engine.SamplingParams, cancel: threading.Event,
               deadline: float, pieces: bool,
               relay: Callable[[engine.Delta], None] | None) -> Iterator[engine.Delta | engine.Result]:  # fmt: skip
        self.cancels.append(cancel)
        if self.error is not None:
            raise self.error
        for event in EVENTS:
            if relay is not None and isinstance(event, engine.Delta):
                relay(event)  # as the engine thread does
            else:
                yield event

    def drain(self, deadline: float) -> None: ...

    def close(self) -> None: ...


def client_for(fake: FakeEngine) -> TestClient:
    lazy = engine.LazyEngine(lambda config, observe: fake)  # type: ignore[arg-type, return-value]
    return TestClient(create_app(Settings(api_keys=(KEY,)), lazy=lazy), headers={"x-api-key": KEY})


def sse_events(text: str) -> list[tuple[str, Any]]:
    blocks = [block for block in text.split("\n\n") if block.strip()]
    out = []
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_the_json_answer_equals_the_streams_done_event_and_the_pieces_add_up() -> None:
    with client_for(FakeEngine()) as client:
        plain = client.post("/generate", json={"prompt": "Say"})
        streamed = client.post("/generate", json={"prompt": "Say", "stream": True})
    assert plain.status_code == streamed.status_code == 200
    *tokens, (last, done) = sse_events(streamed.text)
    assert last == "done"
    assert plain.json() == done == {"generated_text": "Say once upon a time", "generated_tokens": 4,
                                    "finish_reason": "length"}  # fmt: skip
    assert [data["token_ids"] for _, data in tokens] == [[11], [12, 13], [14]]
    assert "Say" + "".join(data["text"] for _, data in tokens) == done["generated_text"]
    assert plain.headers["x-generated-tokens"] == "4" and plain.headers["x-prompt-tokens"] == "2"


def test_both_renderings_are_accounted_once_and_give_their_place_back() -> None:
    fake = FakeEngine()
    with client_for(fake) as client:
        client.post("/generate", json={"prompt": "a"})
        client.post("/generate", json={"prompt": "a", "stream": True})
        metrics = client.get("/metrics").text
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
    assert "llm_generated_tokens_total 8" in metrics
    assert "llm_prompt_tokens_total 4" in metrics
    assert runtime.in_flight == 0
    assert all(cancel.is_set() for cancel in fake.cancels)  # the one cancel site ran for each


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_error_before_any_event_is_the_same_status_for_both(stream: bool) -> None:
    with client_for(FakeEngine(engine.EngineUnavailable("no weights here", retry_after=9))) as client:
        response = client.post("/generate", json={"prompt": "a", "stream": stream})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "9"
    assert response.json() == {"detail": "model unavailable: no weights here"}
