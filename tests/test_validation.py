"""Unit: every bad /generate input gets its 4xx and a message naming the problem (no model loaded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import engine
from server import FIELDS, ApiError, Limits, Settings, create_app, parse_generate
from tests.conftest import KEY, ROOT

LIMITS = Limits()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(api_keys=(KEY,), model=engine.ModelConfig(name="/nonexistent/model"))
    with TestClient(create_app(settings), headers={"x-api-key": KEY}) as client:
        yield client


BAD_BODIES = [
    # (body, status, words the message must contain)
    ([], 422, ["body must be a JSON object", "an array"]),
    ("text", 422, ["body must be a JSON object", "a string"]),
    ({}, 422, ["prompt is required", "missing"]),
    ({"prompt": ""}, 422, ["non-empty string"]),
    ({"prompt": 5}, 422, ["non-empty string", "a number"]),
    ({"prompt": ["a"]}, 422, ["non-empty string", "an array"]),
    ({"prompt": "hi", "max_new_tokens": 0}, 422, ["max_new_tokens must be an integer from 1 to 200, got 0"]),
    ({"prompt": "hi", "max_new_tokens": 201}, 422, ["from 1 to 200, got 201"]),
    ({"prompt": "hi", "max_new_tokens": -1}, 422, ["got -1"]),
    ({"prompt": "hi", "max_new_tokens": 2.5}, 422, ["got 2.5"]),
    ({"prompt": "hi", "max_new_tokens": 2.000001}, 422, ["got 2.000001"]),
    ({"prompt": "hi", "max_new_tokens": 1e300}, 422, ["from 1 to 200, got 1e+300"]),
    ({"prompt": "hi", "temperature": 10**400}, 422, ["temperature must be a number", "got 1000000"]),
    ({"prompt": "hi", "top_p": -(10**400)}, 422, ["top_p must be a number", "got -1000000"]),
    ({"prompt": "hi", "top_k": 10**400}, 422, ["top_k must be an integer", "got 1000000"]),
    ({"prompt": "hi", "max_new_tokens": True}, 422, ["got true"]),
    ({"prompt": "hi", "max_new_tokens": "abc"}, 422, ['got "abc"']),
    ({"prompt": "hi", "max_new_tokens": 10**30}, 422, ["max_new_tokens"]),
    ({"prompt": "hi", "temperature": -0.1}, 422, ["temperature must be a number from 0.0 to 2.0"]),
    ({"prompt": "hi", "temperature": 2.5}, 422, ["temperature", "got 2.5"]),
    ({"prompt": "hi", "temperature": "hot"}, 422, ["temperature"]),
    ({"prompt": "hi", "top_p": 0}, 422, ["top_p must be a number above 0"]),
    ({"prompt": "hi", "top_p": 1.5}, 422, ["top_p", "got 1.5"]),
    ({"prompt": "hi", "top_k": -1}, 422, ["top_k must be an integer from 0 to 1000"]),
    ({"prompt": "hi", "seed": -5}, 422, ["seed must be an integer"]),
    ({"prompt": "hi", "seed": 1.5}, 422, ["seed"]),
    ({"prompt": "hi", "stop": 5}, 422, ["stop must be a string or a list"]),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, ["at most 4", "got 5 strings"]),
    ({"prompt": "hi", "stop": [""]}, 422, ["each 1 to 64 characters"]),
    ({"prompt": "hi", "stop": ["x" * 65]}, 422, ["each 1 to 64 characters"]),
    ({"prompt": "hi", "stop": [1]}, 422, ["stop must be"]),
    ({"prompt": "hi", "ignore_eos": "yes"}, 422, ["ignore_eos must be true or false"]),
    ({"prompt": "hi", "promt": "x"}, 422, ["unknown field(s): promt", "allowed: prompt"]),
    ({"prompt": "hi", "b": 1, "a": 2}, 422, ["unknown field(s): a, b"]),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD_BODIES, ids=[json.dumps(b)[:40] for b, _, _ in BAD_BODIES])
def test_bad_body_is_rejected_with_a_message(client: TestClient, body: object, status: int, words: list[str]) -> None:
    response = client.post("/generate", json=body)
    assert response.status_code == status
    detail = response.json()["detail"]
    for word in words:
        assert word in detail


@pytest.mark.parametrize(
    ("raw", "status", "word"),
    [
        (b"null", 422, "body must be a JSON object, got null"),
        (b'{"prompt": "unterminated', 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b"\xff\xfe{}", 400, "not valid JSON"),
        (b'{"prompt": "a", "max_new_tokens": NaN}', 422, "max_new_tokens"),
        (b'{"prompt": "a", "temperature": Infinity}', 422, "temperature"),
        (b"[" * 100_000, 413, "limit"),
        (b"[" * 50_000 + b"]" * 10, 400, "not valid JSON"),
        (b'{"prompt": "\\ud800"}', 422, "invalid Unicode"),
        (b'{"prompt": "a", "stop": ["\\udfff"]}', 422, "invalid Unicode"),
        (b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
    ],
)
def test_malformed_raw_bodies(client: TestClient, raw: bytes, status: int, word: str) -> None:
    response = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert word in response.json()["detail"]


def test_wrong_content_type_is_415(client: TestClient) -> None:
    response = client.post("/generate", content=b'{"prompt": "a"}', headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]


def test_content_type_with_charset_is_accepted(client: TestClient) -> None:
    headers = {"content-type": "application/json; charset=utf-8"}
    response = client.post("/generate", content=b'{"prompt": ""}', headers=headers)
    assert response.status_code == 422  # got past the content type to validation


def test_declared_oversized_body_is_refused_at_once(client: TestClient) -> None:
    body = json.dumps({"prompt": "x" * (LIMITS.max_body_bytes + 1)})
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert str(LIMITS.max_body_bytes) in response.json()["detail"]


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    assert client.get("/nope").json() == {"detail": "Not Found"}
    assert client.get("/generate").status_code == 405
    assert client.get("/generate").json() == {"detail": "Method Not Allowed"}


def test_defaults_and_full_request() -> None:
    request = parse_generate({"prompt": "hi"}, LIMITS)
    prompt, params = request.prompt, request.params
    assert prompt == "hi"
    assert request.stream is False
    assert params == engine.SamplingParams(max_new_tokens=50)
    body = {
        "prompt": "p",
        "max_new_tokens": 200,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "stop": ["\n", "END"],
        "ignore_eos": True,
        "stream": True,
    }
    assert set(body) == set(FIELDS)
    params = parse_generate(body, LIMITS).params
    assert params == engine.SamplingParams(200, 0.7, 0.9, 40, 7, ("\n", "END"), True)


def test_integral_floats_are_integers_as_in_json_schema() -> None:
    params = parse_generate({"prompt": "p", "max_new_tokens": 199.0, "top_k": 214.0, "seed": 7.0}, LIMITS).params
    assert (params.max_new_tokens, params.top_k, params.seed) == (199, 214, 7)
    assert all(type(v) is int for v in (params.max_new_tokens, params.top_k, params.seed))


@pytest.mark.parametrize("raw", [b'{"prompt": "a", "\\ud800": 1}', b'{"prompt": "a", "\xed\xa0\x80": 1}'])
def test_unknown_field_named_with_a_lone_surrogate_is_a_422(client: TestClient, raw: bytes) -> None:
    response = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422)  # raw surrogate bytes are not UTF-8: 400; the escape: 422
    assert response.json()["detail"]


def test_a_lone_surrogate_in_a_field_name_is_shown_escaped(client: TestClient) -> None:
    response = client.post("/generate", content=b'{"prompt": "a", "x\\ud800": 1}',
                           headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 422
    assert "unknown field(s): x\\ud800" in response.json()["detail"]


def test_null_means_default_and_a_single_stop_string_is_a_list() -> None:
    body = {"prompt": "p", "max_new_tokens": None, "stop": "END", "temperature": 1, "stream": None}
    params = parse_generate(body, LIMITS).params
    assert params.max_new_tokens == 50
    assert params.stop == ("END",)
    assert params.temperature == 1.0


def test_max_new_tokens_limit_is_a_setting() -> None:
    limits = Limits(max_new_tokens=500)
    assert parse_generate({"prompt": "p", "max_new_tokens": 500}, limits).params.max_new_tokens == 500
    with pytest.raises(ApiError, match="from 1 to 500, got 501"):
        parse_generate({"prompt": "p", "max_new_tokens": 501}, limits)


def test_settings_refuse_to_start_without_api_key() -> None:
    with pytest.raises(SystemExit, match="API_KEY is not set"):
        Settings.from_env({})
    with pytest.raises(SystemExit, match="API_KEY is not set"):
        Settings.from_env({"API_KEY": " , "})


def test_settings_from_env() -> None:
    env = {"API_KEY": "a, b", "MODEL_NAME": "/m", "MAX_BATCH_SIZE": "4", "MAX_NEW_TOKENS_LIMIT": "300", "PORT": "9"}
    settings = Settings.from_env(env)
    assert settings.api_keys == ("a", "b")
    assert settings.model.name == "/m"
    assert settings.model.max_batch == 4
    assert settings.limits.max_new_tokens == 300
    assert settings.port == 9
    with pytest.raises(SystemExit, match="MAX_BATCH_SIZE must be an integer of at least 1"):
        Settings.from_env({"API_KEY": "a", "MAX_BATCH_SIZE": "0"})


def test_settings_with_a_fixed_set_of_values_refuse_others() -> None:
    assert Settings.from_env({"API_KEY": "a", "QUANTIZE": "int8", "DTYPE": "bfloat16"}).model.quantize == "int8"
    with pytest.raises(SystemExit, match="QUANTIZE must be one of auto, none, int8, got 'int4'"):
        Settings.from_env({"API_KEY": "a", "QUANTIZE": "int4"})
    with pytest.raises(SystemExit, match="DTYPE must be one of auto, float32, bfloat16, float16"):
        Settings.from_env({"API_KEY": "a", "DTYPE": "fp8"})


@pytest.mark.parametrize("value", [1e-40, 5e-324, 0.005])
def test_tiny_temperature_is_422_not_a_sampling_overflow(client: TestClient, value: float) -> None:
    response = client.post("/generate", json={"prompt": "hi", "temperature": value})
    assert response.status_code == 422
    assert "temperature must be 0 (greedy) or from 0.01" in response.json()["detail"]


def test_engine_errors_map_to_statuses() -> None:
    from server import from_engine_error

    stopped = from_engine_error(engine.EngineStopped("the engine stopped"))
    assert isinstance(stopped, ApiError)
    assert (stopped.status, stopped.headers["Retry-After"]) == (503, "5")
    unavailable = from_engine_error(engine.EngineUnavailable("no weights", retry_after=7))
    assert isinstance(unavailable, ApiError)
    assert (unavailable.status, unavailable.headers["Retry-After"]) == (503, "7")
    bug = RuntimeError("bug")
    assert from_engine_error(bug) is bug  # left to RequestLog's 500


def test_unexpected_error_is_one_json_500_with_request_id(caplog: pytest.LogCaptureFixture) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from server import Metrics, RequestLog

    async def broken(request: object) -> None:
        raise RuntimeError("boom")

    middleware = [Middleware(RequestLog, metrics=Metrics())]  # as create_app has it
    app = Starlette(routes=[Route("/x", broken)], middleware=middleware)
    with TestClient(app) as client:
        response = client.get("/x", headers={"x-request-id": "r-1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert response.headers["x-request-id"] == "r-1"
    assert caplog.text.count("unhandled error") == 1


def test_max_context_tokens_setting() -> None:
    assert Settings.from_env({"API_KEY": "k"}).model.max_context == 1024
    assert Settings.from_env({"API_KEY": "k", "MAX_CONTEXT_TOKENS": "4096"}).model.max_context == 4096


def test_allowed_hosts_refuses_a_foreign_host_header() -> None:
    model = engine.ModelConfig(name="/nonexistent/model")  # the module's client holds the one engine: same config
    settings = Settings(api_keys=(KEY,), model=model, allowed_hosts="localhost, api.example")
    with TestClient(create_app(settings), base_url="http://localhost") as local:
        assert local.get("/health").status_code == 200
        assert local.get("/health", headers={"host": "api.example"}).status_code == 200
        assert local.get("/docs", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    with TestClient(create_app(Settings(api_keys=(KEY,), model=model)), base_url="http://anything.example") as anyhost:
        assert anyhost.get("/health").status_code == 200  # off by default


@pytest.mark.parametrize(("cpu_max", "expected"), [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1)])
def test_threads_follow_the_cgroup_quota(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text(cpu_max + "\n")
    cpus = len(os.sched_getaffinity(0))
    assert engine.cpu_budget(quota) == min(cpus, expected or cpus)
    assert engine.cpu_budget(tmp_path / "missing") == cpus
    assert Settings.from_env({"API_KEY": "k", "THREADS": "3"}).model.threads == 3


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by make test")
def test_compose_refuses_to_start_without_an_api_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "API_KEY"}
    done = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config", "--quiet"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "set API_KEY" in done.stderr
    published = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config"], cwd=ROOT,
                               env={**env, "API_KEY": "x"}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "127.0.0.1" in published.stdout  # the port is not published on every interface
