"""Unit: the x-api-key middleware, around a fake app."""

from __future__ import annotations

import logging

import pytest
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from auth import APIKeyMiddleware


async def fake_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await PlainTextResponse("reached")(scope, receive, send)


@pytest.fixture
def client() -> TestClient:
    return TestClient(APIKeyMiddleware(fake_app, keys=["old-key", "new-key"]))


def test_missing_key_is_401(client: TestClient) -> None:
    response = client.post("/generate")
    assert response.status_code == 401
    assert response.json() == {"detail": "missing x-api-key header"}


def test_wrong_key_is_401(client: TestClient) -> None:
    response = client.post("/generate", headers={"x-api-key": "guess"})
    assert response.status_code == 401
    assert response.json() == {"detail": "invalid API key"}


@pytest.mark.parametrize("key", ["old-key", "new-key"])
def test_every_configured_key_works_for_rotation(client: TestClient, key: str) -> None:
    response = client.post("/generate", headers={"x-api-key": key})
    assert response.status_code == 200
    assert response.text == "reached"


@pytest.mark.parametrize("key", ["old-ke", "old-key ", "OLD-KEY", "", "old-keyold-key"])
def test_near_misses_are_rejected(client: TestClient, key: str) -> None:
    assert client.post("/generate", headers={"x-api-key": key}).status_code == 401


def test_doubled_header_is_rejected_even_if_one_is_valid(client: TestClient) -> None:
    response = client.post("/generate", headers=[("x-api-key", "old-key"), ("x-api-key", "old-key")])
    assert response.status_code == 401
    assert response.json() == {"detail": "send exactly one x-api-key header"}


def test_header_name_is_case_insensitive(client: TestClient) -> None:
    assert client.post("/generate", headers={"X-API-Key": "new-key"}).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/docs", "/ready", "/anything"])
def test_other_paths_are_open(client: TestClient, path: str) -> None:
    assert client.get(path).text == "reached"


def test_non_http_scopes_pass_through() -> None:
    seen = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    import anyio

    anyio.run(APIKeyMiddleware(app, keys=["k"]), {"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]


def test_needs_at_least_one_key() -> None:
    with pytest.raises(ValueError, match="at least one API key"):
        APIKeyMiddleware(fake_app, keys=[])


def test_key_is_never_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client.post("/generate", headers={"x-api-key": "secret-attempt-123"})
    client.post("/generate", headers={"x-api-key": "new-key"})
    assert "secret-attempt-123" not in caplog.text
    assert "new-key" not in caplog.text


def test_a_root_path_does_not_bypass_auth() -> None:
    """Behind a proxy prefix (uvicorn --root-path), the routed path is what must be protected."""
    client = TestClient(APIKeyMiddleware(fake_app, keys=["k"]), root_path="/api")
    assert client.post("/api/generate").status_code == 401
    assert client.post("/api/generate", headers={"x-api-key": "k"}).status_code == 200
