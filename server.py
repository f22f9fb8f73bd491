"""LLM-Generator: a small REST API that serves a causal language model.

Read top to bottom: settings, errors, request validation, routes, request logs, the OpenAPI
document, the docs page (docs.html, for browsers at /docs), the app.
Requests flow one way: auth middleware (auth.py) -> route -> validation -> engine (engine.py)
-> JSON response. Every error is JSON of one shape: {"detail": "..."}.

Run: API_KEY=... python server.py   (see README.md for every setting)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import engine
from auth import APIKeyMiddleware

SERVICE = "LLM-Generator"
DRAIN_BACKSTOP_SECONDS = 10  # after DRAIN_TIMEOUT, time for the last step and responses to go out
log = logging.getLogger("llm.server")
access_log = logging.getLogger("llm.access")


# ---------------------------------------------------------------------------------------------
# Settings: read once from the environment into one frozen object


@dataclass(frozen=True)
class Limits:
    """Input limits; validation and the OpenAPI document both read them from here."""

    max_new_tokens: int = 200
    default_new_tokens: int = 50
    temperature: float = 2.0
    min_temperature: float = 0.01  # above 0: smaller values only round differently from greedy
    top_k: int = 1000
    seed: int = 2**63 - 1
    stop_count: int = 4
    stop_length: int = 64
    body_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...]
    model: engine.ModelConfig = field(default_factory=engine.ModelConfig)
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 64  # requests that may wait for a place in the batch; past that, 503 at once
    queue_timeout: int = 30  # seconds a request may wait for a place before a 503
    request_timeout: int = 120  # seconds after which a generation ends with finish_reason "timeout"
    drain_timeout: int = 25  # seconds in-flight requests get to finish after SIGTERM
    body_timeout: int = 30  # seconds a client may take to send its body (slow senders hold a connection)
    load_on_start: bool = False  # load the model at start so /ready turns 200 without traffic
    log_prompts: bool = False  # put prompt text in the request log

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        keys = tuple(k.strip() for k in env.get("API_KEY", "").split(",") if k.strip())
        if not keys:
            raise SystemExit(
                "API_KEY is not set: set it to one key or a comma-separated list of keys "
                "(clients send one in the x-api-key header). The server does not run without one."
            )
        model = engine.ModelConfig(
            name=env.get("MODEL_NAME", "distilgpt2"),
            device=env.get("DEVICE", "auto"),
            dtype=env.get("DTYPE", "auto"),
            max_batch=_env_int(env, "MAX_BATCH_SIZE", 32),
            retry_seconds=_env_int(env, "MODEL_RETRY_SECONDS", 30),
            max_context=_env_int(env, "MAX_CONTEXT_TOKENS", 1024),
            cache_dir=env.get("TRANSFORMERS_CACHE") or None,
        )
        limits = Limits(
            max_new_tokens=_env_int(env, "MAX_NEW_TOKENS_LIMIT", 200),
            body_bytes=_env_int(env, "MAX_BODY_BYTES", 64 * 1024),
        )
        return cls(
            keys,
            model,
            limits,
            host=env.get("HOST", "127.0.0.1"),
            port=_env_int(env, "PORT", 8000),
            max_queue=_env_int(env, "MAX_QUEUE", 64, minimum=0),
            queue_timeout=_env_int(env, "QUEUE_TIMEOUT", 30),
            request_timeout=_env_int(env, "REQUEST_TIMEOUT", 120),
            drain_timeout=_env_int(env, "DRAIN_TIMEOUT", 25),
            body_timeout=_env_int(env, "BODY_TIMEOUT", 30),
            load_on_start=_env_flag(env, "LOAD_ON_START"),
            log_prompts=_env_flag(env, "LOG_PROMPTS"),
        )


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise SystemExit(f"{name} must be an integer of at least {minimum}, got {raw!r}")
    return int(raw)


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw not in ("", "0", "1", "true", "false", "yes", "no"):
        raise SystemExit(f"{name} must be 1/0, true/false or yes/no, got {raw!r}")
    return raw in ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------
# Errors: one exception type, one JSON shape


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, dict(headers or {})


def error_response(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.detail, exc.headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


# ---------------------------------------------------------------------------------------------
# Reading and validating a /generate request, by hand


async def read_json(request: Request, limit: int, timeout: float) -> object:
    """Parse the body as JSON; refuse a wrong type (415), an oversized body while reading (413),
    and a body that takes longer than `timeout` seconds to arrive (408)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"content-type must be application/json, got {media_type or 'none'!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"body is over the limit of {limit} bytes")
    except ClientDisconnect:
        raise ApiError(400, "client disconnected while sending the body") from None
    except TimeoutError:
        raise ApiError(408, f"body not received within BODY_TIMEOUT={timeout:g} s") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 is a ValueError too
        raise ApiError(400, f"body is not valid JSON: {exc}") from None


FIELDS = ("prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def parse_generate(body: object, limits: Limits) -> tuple[str, engine.SamplingParams]:
    """Return the prompt and sampling parameters, or raise a 422 naming the field and the rule."""
    if not isinstance(body, dict):
        raise ApiError(422, f"body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    params = engine.SamplingParams(
        max_new_tokens=_integer(body, "max_new_tokens", limits.default_new_tokens, 1, limits.max_new_tokens),
        temperature=_temperature(body, limits),
        top_p=_top_p(body),
        top_k=_integer(body, "top_k", 0, 0, limits.top_k),
        seed=_integer(body, "seed", None, 0, limits.seed),
        stop=_stop(body, limits),
        ignore_eos=_boolean(body, "ignore_eos", False),
    )
    return _prompt(body), params


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _text(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, f"{name} contains invalid Unicode (a lone surrogate)") from None
    return value


def _prompt(body: dict[str, Any]) -> str:
    value = body.get("prompt")
    if not isinstance(value, str) or not value:
        got = "missing" if "prompt" not in body else _json_type(value)
        raise ApiError(422, f"prompt is required and must be a non-empty string, got {got}")
    return _text(value, "prompt")


def _integer(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(422, f"{name} must be an integer from {low} to {high}, got {json.dumps(value)}")
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ApiError(422, f"{name} must be a number from {low} to {high}, got {json.dumps(value)}")
    return float(value)


def _temperature(body: dict[str, Any], limits: Limits) -> float:
    value = _number(body, "temperature", 0.0, 0.0, limits.temperature)
    if 0 < value < limits.min_temperature:
        raise ApiError(422, f"temperature must be 0 (greedy) or from {limits.min_temperature} to "
                            f"{limits.temperature}, got {value}")  # fmt: skip
    return value


def _top_p(body: dict[str, Any]) -> float:
    value = _number(body, "top_p", 1.0, 0.0, 1.0)
    if value == 0.0:
        raise ApiError(422, "top_p must be a number above 0 and at most 1, got 0")
    return value


def _boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(422, f"{name} must be true or false, got {json.dumps(value)}")
    return value


def _stop(body: dict[str, Any], limits: Limits) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    rule = (
        f"stop must be a string or a list of at most {limits.stop_count} strings, "
        f"each 1 to {limits.stop_length} characters"
    )
    if not isinstance(items, list):
        raise ApiError(422, f"{rule}; got {_json_type(value)}")
    if len(items) > limits.stop_count:
        raise ApiError(422, f"{rule}; got {len(items)} strings")
    for item in items:
        if not isinstance(item, str) or not 1 <= len(item) <= limits.stop_length:
            raise ApiError(422, f"{rule}; got {json.dumps(item)[:80]}")
    return tuple(_text(item, "stop") for item in items)


# ---------------------------------------------------------------------------------------------
# Routes


@dataclass
class Runtime:
    """What the routes share while the process runs (all touched on the event loop only)."""

    limiter: anyio.CapacityLimiter
    in_flight: int = 0  # /generate requests running or waiting for a place in the batch
    draining: bool = False  # SIGTERM received: finish what runs, take nothing new


async def health(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    running = engine.loaded_engine()
    return JSONResponse(
        {
            "status": "ok",
            "service": SERVICE,
            "model": settings.model.name,
            "model_loaded": running is not None,
            "active_sequences": running.active if running else 0,
        }
    )


async def ready(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    running = engine.loaded_engine()
    if runtime.draining:
        raise ApiError(503, "shutting down")
    if running is None or not running.running:
        raise ApiError(503, "model not loaded yet (it loads on the first /generate, or at start with LOAD_ON_START=1)")
    return JSONResponse({"status": "ready"})


async def generate(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    runtime: Runtime = request.app.state.runtime
    if runtime.draining:
        raise ApiError(503, "shutting down; retry on another instance", {"Retry-After": "5", "Connection": "close"})
    body = await read_json(request, settings.limits.body_bytes, settings.body_timeout)
    prompt, params = parse_generate(body, settings.limits)
    capacity = settings.model.max_batch + settings.max_queue
    if runtime.in_flight >= capacity:
        raise ApiError(503, f"at capacity: {capacity} requests running or waiting; retry shortly", {"Retry-After": "1"})
    runtime.in_flight += 1
    try:
        result = await run_generation(request, prompt, params)
    finally:
        runtime.in_flight -= 1
    request.state.tokens, request.state.finish_reason = result.tokens, result.finish_reason
    if settings.log_prompts:
        request.state.prompt = prompt
    return JSONResponse(
        {
            "generated_text": prompt + result.text,
            "generated_tokens": result.tokens,
            "finish_reason": result.finish_reason,
        }
    )


async def docs(request: Request) -> Response:
    """The OpenAPI document, or for a browser (its Accept prefers text/html) docs.html, a page that
    renders the same document and has a form to try /generate."""
    if prefers_html(request.headers.get("accept", "")):
        page: DocsPage = request.app.state.docs_page
        return Response(page.html, media_type="text/html", headers=page.headers)
    return JSONResponse(openapi(request.app.state.settings), headers={"Vary": "Accept"})


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(openapi(request.app.state.settings))


async def run_generation(request: Request, prompt: str, params: engine.SamplingParams) -> engine.Result:
    """Run one generation in a worker thread under the capacity limiter, and watch three things
    meanwhile: the client leaving, the wait for a place running past QUEUE_TIMEOUT, and the task
    being cancelled (uvicorn's shutdown backstop). Each frees the sequence's place at the next step."""
    settings: Settings = request.app.state.settings
    cancel, started = threading.Event(), threading.Event()
    deadline = time.monotonic() + settings.request_timeout
    outcome: list[engine.Result | Exception] = []

    def blocking() -> engine.Result:
        started.set()  # we hold a place now: the queue timeout no longer applies
        return engine.get_engine(settings.model).generate(prompt, params, cancel, deadline)

    async def work() -> None:
        try:
            outcome.append(await anyio.to_thread.run_sync(blocking, limiter=request.app.state.runtime.limiter))
        except Exception as exc:
            outcome.append(exc)
        group.cancel_scope.cancel()

    async def queue_timeout() -> None:
        await anyio.sleep(settings.queue_timeout)
        if not started.is_set():
            detail = f"no place in the batch within QUEUE_TIMEOUT={settings.queue_timeout} s; retry shortly"
            outcome.append(ApiError(503, detail, {"Retry-After": "1"}))
            group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(work)
        group.start_soon(queue_timeout)
        try:
            await _disconnected(request)
        finally:
            cancel.set()  # the engine drops the sequence at its next step (no-op once it is done)
            group.cancel_scope.cancel()
    if not outcome:
        return engine.Result("", 0, "cancelled")
    if isinstance(outcome[0], Exception):
        raise _as_api_error(outcome[0])
    return outcome[0]


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _as_api_error(exc: Exception) -> Exception:
    if isinstance(exc, engine.EngineUnavailable):
        return ApiError(503, f"model unavailable: {exc}", {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, engine.PromptTooLong):
        return ApiError(422, str(exc))
    if isinstance(exc, engine.EngineStopped):
        return ApiError(503, f"{exc}; retry shortly", {"Retry-After": "5"})
    return exc  # anything else is a bug or an engine failure: RequestLog logs it and answers 500


# ---------------------------------------------------------------------------------------------
# Request logs: one JSON line per request


class RequestLog:
    """Pure ASGI middleware: gives each request an id (X-Request-ID, or a new one), returns it,
    and logs method, path, status, tokens and latency. Never headers, so never the API key."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope["headers"])
        state = scope.setdefault("state", {})
        start, status, started = time.perf_counter(), 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if not started:
                await error_response(500, "internal server error")(scope, receive, send_with_id)
        finally:
            fields = {"request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status}
            fields["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
            fields.update({k: state[k] for k in ("tokens", "finish_reason", "prompt") if k in state})
            access_log.info("request", extra={"fields": fields})


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is short and printable, else a new one."""
    for name, value in headers:
        if name == b"x-request-id" and 0 < len(value) <= 128 and value.isascii() and value.decode().isprintable():
            return value.decode()
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        entry["message"] = record.getMessage()
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# ---------------------------------------------------------------------------------------------
# The OpenAPI document, written by hand from the same limits the validation uses


def openapi(settings: Settings) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": SERVICE, "version": "1.0.0", "description": "Text generation with a causal language model."},
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": {"GenerateRequest": _request_schema(settings.limits), **_SCHEMAS},
        },
        "paths": {
            "/health": {"get": _operation("Liveness: 200 while the process runs, with model status", "Health", {})},
            "/ready": {"get": _operation("Readiness: 200 once the model is loaded", "object", READY_ERRORS)},
            "/docs": {"get": _docs_operation()},
            "/openapi.json": {"get": _operation("This OpenAPI document, whatever the Accept header", "object", {})},
            "/generate": {"post": _generate_operation(settings)},
        },
    }


def _request_schema(limits: Limits) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "description": "Text to continue."},
            "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens,
                               "default": limits.default_new_tokens},
            "temperature": {"type": "number", "minimum": 0, "maximum": limits.temperature, "default": 0,
                            "description": f"0 means greedy decoding; otherwise at least {limits.min_temperature}."},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
            "top_k": {"type": "integer", "minimum": 0, "maximum": limits.top_k, "default": 0,
                      "description": "0 means no top-k filter."},
            "seed": {"type": "integer", "minimum": 0, "maximum": limits.seed,
                     "description": "Same seed and request, same text."},
            "stop": {"oneOf": [
                {"type": "string", "minLength": 1, "maxLength": limits.stop_length},
                {"type": "array", "maxItems": limits.stop_count,
                 "items": {"type": "string", "minLength": 1, "maxLength": limits.stop_length}},
            ], "description": "Generation ends at the first stop string, which is cut from the output."},
            "ignore_eos": {"type": "boolean", "default": False,
                           "description": "Generate exactly max_new_tokens, ignoring end of sequence."},
        },
        "x-max-body-bytes": limits.body_bytes,
    }  # fmt: skip


_SCHEMAS: dict[str, Any] = {
    "Health": {
        "type": "object",
        "required": ["status", "service"],
        "properties": {
            "status": {"const": "ok"}, "service": {"const": SERVICE},
            "model": {"type": "string"}, "model_loaded": {"type": "boolean"},
            "active_sequences": {"type": "integer", "description": "Sequences in the running batch."},
        },
    },
    "GenerateResponse": {
        "type": "object",
        "required": ["generated_text", "generated_tokens", "finish_reason"],
        "properties": {
            "generated_text": {"type": "string", "description": "The prompt followed by its continuation."},
            "generated_tokens": {"type": "integer", "description": "Tokens the model generated."},
            "finish_reason": {"enum": list(engine.FINISH_REASONS)},
        },
    },
    "Error": {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}},
}  # fmt: skip

GENERATE_ERRORS = {
    400: "Body is not valid JSON.",
    401: "Missing, doubled or invalid x-api-key header.",
    408: "The body did not arrive within BODY_TIMEOUT seconds.",
    413: "Body larger than the limit.",
    415: "Content-Type is not application/json.",
    422: "A field is missing, unknown, of the wrong type or out of range; or the prompt does not fit.",
    503: (
        "The model could not be loaded, the server is at capacity (MAX_BATCH_SIZE running plus MAX_QUEUE "
        "waiting), no place freed up within QUEUE_TIMEOUT, or the server is shutting down. "
        "Retry-After says when to try again."
    ),
}
READY_ERRORS = {503: "The model is not loaded yet, or the server is shutting down."}


def _operation(summary: str, schema: str, errors: dict[int, str]) -> dict[str, Any]:
    ref = {"type": "object"} if schema == "object" else {"$ref": f"#/components/schemas/{schema}"}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    responses.update({str(code): {"description": text, "content": error} for code, text in errors.items()})
    return {"summary": summary, "responses": responses}


def _generate_operation(settings: Settings) -> dict[str, Any]:
    operation = _operation("Continue a prompt", "GenerateResponse", GENERATE_ERRORS)
    operation["description"] = (
        f"Up to MAX_BATCH_SIZE={settings.model.max_batch} requests generate together and "
        f"MAX_QUEUE={settings.max_queue} more may wait; past that, 503 at once. A request waits at most "
        f"QUEUE_TIMEOUT={settings.queue_timeout} s for a place (then 503), and generation ends with "
        f'finish_reason "timeout" and the text so far REQUEST_TIMEOUT={settings.request_timeout} s after '
        "the request arrived."
    )
    operation["x-timeouts"] = {"queue_seconds": settings.queue_timeout, "request_seconds": settings.request_timeout}
    operation["x-settings"] = {  # the values in force, for readers of the docs page
        "MAX_BATCH_SIZE": settings.model.max_batch, "MAX_QUEUE": settings.max_queue,
        "QUEUE_TIMEOUT": settings.queue_timeout, "REQUEST_TIMEOUT": settings.request_timeout,
        "BODY_TIMEOUT": settings.body_timeout, "MAX_BODY_BYTES": settings.limits.body_bytes,
        "MAX_NEW_TOKENS_LIMIT": settings.limits.max_new_tokens, "MAX_CONTEXT_TOKENS": settings.model.max_context,
    }  # fmt: skip
    operation["security"] = [{"apiKey": []}]
    operation["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
    }
    return operation


def _docs_operation() -> dict[str, Any]:
    operation = _operation("This document as JSON; a browser (Accept: text/html) gets a page of it", "object", {})
    operation["responses"]["200"]["content"]["text/html"] = {"schema": {"type": "string"}}
    return operation


# ---------------------------------------------------------------------------------------------
# The docs page: what a browser gets at /docs

DOCS_PAGE = Path(__file__).with_name("docs.html")


@dataclass(frozen=True)
class DocsPage:
    html: bytes
    headers: dict[str, str]

    @classmethod
    def load(cls, path: Path = DOCS_PAGE) -> DocsPage:
        """Read the page once. Its Content-Security-Policy allows exactly the page's own inline style
        and script (by SHA-256) and requests to this server: a changed or injected script does not
        run, and nothing is loaded from or sent to anywhere else."""
        text = path.read_text(encoding="utf-8")
        csp = (
            f"default-src 'none'; script-src {_hashes(text, 'script')}; style-src {_hashes(text, 'style')}; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        headers = {
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Vary": "Accept",
        }
        return cls(text.encode(), headers)


def _hashes(html: str, tag: str) -> str:
    """The CSP sources for the page's <style> or <script> blocks: those whose tag starts a line (a tag
    named in a comment or a string is not one)."""
    blocks = re.findall(rf"^<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL | re.MULTILINE)
    digests = [base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks]
    return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"


def prefers_html(accept: str) -> bool:
    """True when Accept names text/html and ranks it above JSON, as browsers do. `*/*` (curl, httpx),
    application/json, no header or a tie keep the JSON document, /docs's answer by design."""
    weights: dict[str, float] = {}
    for item in accept.lower().split(","):
        media, *params = (part.strip() for part in item.split(";"))
        q = next((param[2:] for param in params if param.startswith("q=")), "1")
        with contextlib.suppress(ValueError):
            weights.setdefault(media, float(q))
    json_weight = weights.get("application/json", weights.get("application/*", weights.get("*/*", 0.0)))
    return weights.get("text/html", 0.0) > json_weight


# ---------------------------------------------------------------------------------------------
# The application


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.runtime = Runtime(anyio.CapacityLimiter(settings.model.max_batch))
        if settings.load_on_start:  # a plain thread: start-up is not held up, /health answers at once
            threading.Thread(target=_preload, args=(settings.model,), name="preload", daemon=True).start()
        yield
        await anyio.to_thread.run_sync(engine.reset_engine)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    handlers = {ApiError: on_api_error, HTTPException: on_http_error}  # other errors: RequestLog
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.settings = settings
    app.state.docs_page = DocsPage.load()
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(RequestLog)  # outermost, so 401s are logged too
    return app


def _preload(config: engine.ModelConfig) -> None:
    # A failure is logged by the engine; /ready stays 503 and a later request tries again.
    with contextlib.suppress(engine.EngineUnavailable):
        engine.get_engine(config)


class DrainingServer(uvicorn.Server):
    """On SIGTERM uvicorn stops accepting connections and waits for open requests. We also flip
    the app to draining (/ready and new work get 503), and after DRAIN_TIMEOUT we end every
    generation at its next step with what it has (finish_reason "timeout"), so each client still
    gets a proper answer. uvicorn's own cancellation stays only as a backstop a little later."""

    def __init__(self, config: uvicorn.Config, app: Starlette, drain_timeout: float):
        super().__init__(config)
        self.app, self.drain_timeout = app, drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime: Runtime | None = getattr(self.app.state, "runtime", None)
        if runtime is not None and not runtime.draining:
            runtime.draining = True
            timer = threading.Timer(self.drain_timeout, _expire_generations)
            timer.daemon = True  # a drain that finishes early must not wait for it
            timer.start()
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises caught signals once it has shut down, so the process would die of
            # SIGTERM (status 143); a drain that completed is a clean exit, status 0.
            self._captured_signals.remove(sig)


def _expire_generations() -> None:
    running = engine.loaded_engine()
    if running is not None:
        log.warning("drain timeout reached: ending generations in flight with what they have")
        running.expire()


def main() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    settings = Settings.from_env()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our JSON logging
        access_log=False,  # RequestLog writes one line per request instead
        timeout_graceful_shutdown=settings.drain_timeout + DRAIN_BACKSTOP_SECONDS,
    )
    DrainingServer(config, app, settings.drain_timeout).run()


if __name__ == "__main__":
    main()
