"""LLM-Generator: a small REST API that serves a causal language model.

A request's path, outermost first:
  RequestLog (below)        gives the request an id, writes one JSON log line when it ends
  APIKeyMiddleware (auth.py) /generate only: one valid x-api-key header, else 401
  route                     /health, /ready, /docs, /generate
  read_json                 content type, body size and time, JSON syntax
  parse_generate            every field, by hand
  capacity check            MAX_BATCH_SIZE running + MAX_QUEUE waiting, else 503 at once
  run_generation            a worker thread under the capacity limiter (anyio.to_thread.run_sync)
  engine.ENGINE             loads the model once, then batches every request (engine.py)

Every limit, where it is enforced, and what the client gets:
  setting                        enforced in                       status
  API_KEY                        auth.APIKeyMiddleware             401
  content-type                   read_json                         415
  MAX_BODY_BYTES                 read_json (declared and read)     413
  BODY_TIMEOUT                   read_json                         408
  field rules, MAX_NEW_TOKENS_LIMIT  parse_generate                422
  MAX_CONTEXT_TOKENS             engine.Engine._check_fits         422
  MAX_BATCH_SIZE + MAX_QUEUE     generate (capacity check)         503, Retry-After RETRY_BUSY
  QUEUE_TIMEOUT                  run_generation                    503, Retry-After RETRY_BUSY
  MODEL_RETRY_SECONDS            engine.LazyEngine.get             503, Retry-After: seconds left
  REQUEST_TIMEOUT                engine.Sequence                   200, finish_reason "timeout"
  DRAIN_TIMEOUT                  DrainingServer                    200, finish_reason "timeout"
  (shutting down)                generate, ready                   503, Retry-After RETRY_SHUTDOWN
Every error is JSON of one shape, {"detail": "..."}; the errors section lists them on one screen.

Reading order: settings, errors, validation, the OpenAPI document, the docs page (docs.html, what
a browser gets at /docs), running a generation, routes, request logs, connections, the app and its
shutdown. Run: API_KEY=... python server.py (README.md lists settings).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
import typing
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import h11
import uvicorn
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

import engine
from auth import APIKeyMiddleware

SERVICE = "LLM-Generator"
DRAIN_BACKSTOP_SECONDS = 10  # after DRAIN_TIMEOUT, time for the last step and responses to go out
DEFAULTS = engine.SamplingParams()  # the API's defaults for every optional /generate field
log = logging.getLogger("llm.server")
access_log = logging.getLogger("llm.access")


# ---------------------------------------------------------------------------------------------
# Settings: read once from the environment into frozen objects. Each default is written once, on
# its field; `env` names the variable that overrides it (engine.ModelConfig's fields too).


def setting(default: Any, env: str, minimum: int = 1) -> Any:
    return field(default=default, metadata={"env": env, "minimum": minimum})


@dataclass(frozen=True)
class Limits:
    """Input limits; validation and the OpenAPI document both read them from here."""

    max_new_tokens: int = setting(200, "MAX_NEW_TOKENS_LIMIT")
    max_body_bytes: int = setting(64 * 1024, "MAX_BODY_BYTES")
    max_temperature: float = 2.0
    min_temperature: float = 0.01  # above 0: smaller values only round differently from greedy
    max_top_k: int = 1000
    max_seed: int = 2**63 - 1
    max_stop_count: int = 4
    max_stop_length: int = 64

    @property
    def default_new_tokens(self) -> int:
        """The API's default, unless MAX_NEW_TOKENS_LIMIT is set below it."""
        return min(DEFAULTS.max_new_tokens, self.max_new_tokens)


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...]
    model: engine.ModelConfig = field(default_factory=engine.ModelConfig)
    limits: Limits = field(default_factory=Limits)
    host: str = setting("127.0.0.1", "HOST")
    port: int = setting(8000, "PORT")
    max_queue: int = setting(64, "MAX_QUEUE", minimum=0)  # requests that may wait for a place in the batch
    queue_timeout: int = setting(30, "QUEUE_TIMEOUT")  # seconds a request may wait for a place
    request_timeout: int = setting(120, "REQUEST_TIMEOUT")  # seconds from arrival to finish_reason "timeout"
    drain_timeout: int = setting(25, "DRAIN_TIMEOUT")  # seconds in-flight requests get after SIGTERM
    body_timeout: int = setting(30, "BODY_TIMEOUT")  # seconds a client may take to send its body
    head_timeout: int = setting(10, "HEAD_TIMEOUT")  # seconds a connection may take to send a request head
    max_connections: int = setting(1000, "MAX_CONNECTIONS")  # open connections; past that, 503 and close
    allowed_hosts: str = setting("", "ALLOWED_HOSTS")  # comma-separated Host names; empty: any
    load_on_start: bool = setting(False, "LOAD_ON_START")  # so /ready turns 200 without traffic
    log_prompts: bool = setting(False, "LOG_PROMPTS")  # put prompt text in the request log

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        keys = tuple(k.strip() for k in env.get("API_KEY", "").split(",") if k.strip())
        if not keys:
            raise SystemExit(
                "API_KEY is not set: set it to one key or a comma-separated list of keys "
                "(clients send one in the x-api-key header). The server does not run without one."
            )
        model, limits = from_env(engine.ModelConfig, env), from_env(Limits, env)
        settings: Settings = from_env(cls, env, api_keys=keys, model=model, limits=limits)
        return settings


def from_env(cls: type[Any], env: Mapping[str, str], **given: Any) -> Any:
    """Build a settings dataclass: each field with an `env` name takes that variable when set."""
    types = typing.get_type_hints(cls)
    values = dict(given)
    for f in dataclasses.fields(cls):
        raw = env.get(f.metadata.get("env", ""), "")
        if raw != "":
            meta = f.metadata
            values[f.name] = _parse(meta["env"], raw, types[f.name], meta.get("minimum", 1), meta.get("choices"))
    return cls(**values)


def _parse(name: str, raw: str, kind: Any, minimum: int, choices: tuple[str, ...] | None = None) -> Any:
    if choices and raw not in choices:
        raise SystemExit(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    if kind is int:
        if not raw.isdigit() or int(raw) < minimum:
            raise SystemExit(f"{name} must be an integer of at least {minimum}, got {raw!r}")
        return int(raw)
    if kind is bool:
        flag = raw.strip().lower()
        if flag not in ("0", "1", "true", "false", "yes", "no"):
            raise SystemExit(f"{name} must be 1/0, true/false or yes/no, got {raw!r}")
        return flag in ("1", "true", "yes")
    return raw  # str, or str | None


# ---------------------------------------------------------------------------------------------
# Errors: one exception, one JSON shape, one table of statuses, one mapping of engine errors

RETRY_BUSY = 1  # seconds: at capacity, or no place within QUEUE_TIMEOUT; places free up every step
RETRY_SHUTDOWN = 5  # seconds: draining, or the engine stopped; another instance or a fresh engine answers
CLOSE = {"Connection": "close"}  # on answers sent before the body was read whole

GENERATE_ERRORS = {
    400: "Body is not valid JSON.",
    401: "Missing, doubled or invalid x-api-key header.",
    408: "The body did not arrive within BODY_TIMEOUT seconds.",
    413: "Body larger than MAX_BODY_BYTES.",
    415: "Content-Type is not application/json.",
    422: "A field is missing, unknown, of the wrong type or out of range; or the prompt does not fit.",
    503: (
        "The model could not be loaded, the server is at capacity (MAX_BATCH_SIZE running plus MAX_QUEUE "
        "waiting), no place freed up within QUEUE_TIMEOUT, or the server is shutting down. "
        "Retry-After says when to try again."
    ),
}
READY_ERRORS = {503: "The model is not loaded yet, or the server is shutting down."}


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, dict(headers or {})


def unavailable(detail: str, retry_after: int, close: bool = False) -> ApiError:
    """A 503 that says when to try again (and, while draining, closes the connection)."""
    headers = {"Retry-After": str(retry_after)} | (CLOSE if close else {})
    return ApiError(503, detail, headers)


def from_engine_error(exc: Exception) -> Exception:
    """The engine's exceptions as statuses; anything else is a bug, left for RequestLog's 500."""
    if isinstance(exc, engine.EngineUnavailable):
        return unavailable(f"model unavailable: {exc}", exc.retry_after)
    if isinstance(exc, engine.PromptTooLong):
        return ApiError(422, str(exc))
    if isinstance(exc, engine.EngineStopped):
        return unavailable(f"{exc}; retry shortly", RETRY_SHUTDOWN)
    return exc


def error_response(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    # A detail may quote the client's input; a lone surrogate there cannot be encoded as UTF-8,
    # so it is shown escaped (\ud800) instead of failing the answer.
    safe = detail.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"detail": safe}, status_code=status, headers=headers)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.detail, exc.headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # Starlette's own 404 and 405
    return error_response(exc.status_code, str(exc.detail), exc.headers)


# ---------------------------------------------------------------------------------------------
# Reading and validating a /generate request, by hand


async def read_json(request: Request, limit: int, timeout: float) -> object:
    """Parse the body as JSON; refuse a wrong type (415), an oversized body while reading (413),
    and a body that takes longer than `timeout` seconds to arrive (408). Those answers close the
    connection: the rest of an unread body must not be taken for the next request, and a client
    that trickles bytes must not keep the connection."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"content-type must be application/json, got {_shown(media_type or 'none')}", CLOSE)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body is {declared} bytes; the limit is {limit}", CLOSE)
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"body is over the limit of {limit} bytes", CLOSE)
    except ClientDisconnect:
        raise ApiError(400, "client disconnected while sending the body", CLOSE) from None
    except TimeoutError:
        raise ApiError(408, f"body not received within BODY_TIMEOUT={timeout:g} s", CLOSE) from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 is a ValueError too
        raise ApiError(400, f"body is not valid JSON: {exc}") from None


FIELDS = ("prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stream")


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    params: engine.SamplingParams
    stream: bool = False  # answer as server-sent events, piece by piece


def parse_generate(body: object, limits: Limits) -> GenerateRequest:
    """Return the request's values, or raise a 422 naming the field and the rule."""
    if not isinstance(body, dict):
        raise ApiError(422, f"body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        named = ", ".join(name[:40] for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ApiError(422, f"unknown field(s): {named}; allowed: {', '.join(FIELDS)}")
    params = engine.SamplingParams(
        max_new_tokens=_integer(body, "max_new_tokens", 1, limits.max_new_tokens, limits.default_new_tokens),
        temperature=_temperature(body, limits),
        top_p=_top_p(body),
        top_k=_integer(body, "top_k", 0, limits.max_top_k),
        seed=_integer(body, "seed", 0, limits.max_seed),
        stop=_stop(body, limits),
        ignore_eos=_boolean(body, "ignore_eos", DEFAULTS.ignore_eos),
    )
    return GenerateRequest(_prompt(body), params, _boolean(body, "stream", False))


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


def _shown(value: object) -> str:
    """A client's value as quoted in an error: JSON, and short."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(body: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> Any:
    """null means the default; 7.0 is the integer 7, as in JSON Schema (the document's dialect)."""
    value = body.get(name)
    if value is None:
        return getattr(DEFAULTS, name) if default is None else default
    number = int(value) if isinstance(value, float) and value.is_integer() else value
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise ApiError(422, f"{name} must be an integer from {low} to {high}, got {_shown(value)}")
    return number


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return float(getattr(DEFAULTS, name))
    # Compared before any conversion: an integer too large for a float is simply out of range.
    # NaN compares false, so it fails the range check too.
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(422, f"{name} must be a number from {low} to {high}, got {_shown(value)}")
    return float(value)


def _temperature(body: dict[str, Any], limits: Limits) -> float:
    value = _number(body, "temperature", 0.0, limits.max_temperature)
    if 0 < value < limits.min_temperature:
        raise ApiError(422, f"temperature must be 0 (greedy) or from {limits.min_temperature} to "
                            f"{limits.max_temperature}, got {value}")  # fmt: skip
    return value


def _top_p(body: dict[str, Any]) -> float:
    value = _number(body, "top_p", 0.0, 1.0)
    if value == 0.0:
        raise ApiError(422, "top_p must be a number above 0 and at most 1, got 0")
    return value


def _boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(422, f"{name} must be true or false, got {_shown(value)}")
    return value


def _stop(body: dict[str, Any], limits: Limits) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return DEFAULTS.stop
    items = [value] if isinstance(value, str) else value
    rule = (
        f"stop must be a string or a list of at most {limits.max_stop_count} strings, "
        f"each 1 to {limits.max_stop_length} characters"
    )
    if not isinstance(items, list):
        raise ApiError(422, f"{rule}; got {_json_type(value)}")
    if len(items) > limits.max_stop_count:
        raise ApiError(422, f"{rule}; got {len(items)} strings")
    for item in items:
        if not isinstance(item, str) or not 1 <= len(item) <= limits.max_stop_length:
            raise ApiError(422, f"{rule}; got {_shown(item)}")
    return tuple(_text(item, "stop") for item in items)


# ---------------------------------------------------------------------------------------------
# The OpenAPI document, written by hand from the same limits, defaults and errors as above


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
            "/metrics": {"get": _metrics_operation()},
            "/generate": {"post": _generate_operation(settings)},
        },
    }


def _request_schema(limits: Limits) -> dict[str, Any]:
    """Every optional field also takes null, meaning its default."""
    d, string = DEFAULTS, {"type": "string", "minLength": 1, "maxLength": limits.max_stop_length}
    return {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "description": "Text to continue."},
            "max_new_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": limits.max_new_tokens,
                               "default": limits.default_new_tokens},
            "temperature": {"anyOf": [
                {"const": 0}, {"type": "number", "minimum": limits.min_temperature, "maximum": limits.max_temperature},
                {"type": "null"},
            ], "default": d.temperature, "description": "0 means greedy decoding."},
            "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1, "default": d.top_p},
            "top_k": {"type": ["integer", "null"], "minimum": 0, "maximum": limits.max_top_k, "default": d.top_k,
                      "description": "0 means no top-k filter."},
            "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": limits.max_seed,
                     "description": "Same seed and request, same text. Random when absent."},
            "stop": {"anyOf": [string, {"type": "array", "maxItems": limits.max_stop_count, "items": string},
                               {"type": "null"}],
                     "description": "Generation ends at the first stop string, which is cut from the output."},
            "ignore_eos": {"type": ["boolean", "null"], "default": d.ignore_eos,
                           "description": "Generate exactly max_new_tokens, ignoring end of sequence."},
            "stream": {"type": ["boolean", "null"], "default": False,
                       "description": "Answer as text/event-stream: `token` events, then `done` (or `error`)."},
        },
        "x-max-body-bytes": limits.max_body_bytes,
    }  # fmt: skip


_SCHEMAS: dict[str, Any] = {
    "Health": {
        "type": "object",
        "required": ["status", "service"],
        "properties": {
            "status": {"const": "ok"}, "service": {"const": SERVICE},
            "model": {"type": "string"}, "model_loaded": {"type": "boolean"},
            "model_state": {"enum": ["not loaded", "loading", "loaded", "failed"]},
            "model_error": {"type": "string", "description": "Why the last load failed, and when the next try is."},
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


def _operation(summary: str, schema: str, errors: dict[int, str]) -> dict[str, Any]:
    ref = {"type": "object"} if schema == "object" else {"$ref": f"#/components/schemas/{schema}"}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    responses.update({str(code): {"description": text, "content": error} for code, text in errors.items()})
    return {"summary": summary, "responses": responses}


TIMING_HEADERS = {
    "x-queue-time": "Milliseconds from arrival until the request joined the batch.",
    "x-compute-time": "Milliseconds from joining the batch to the last token.",
    "x-total-time": "Milliseconds from arrival to the answer.",
    "x-generated-tokens": "Tokens generated.",
    "x-prompt-tokens": "Tokens in the prompt.",
}
SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["token", "done", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "token: {token_ids, text, generated_tokens}; done: GenerateResponse; error: Error"},
    },
}  # fmt: skip
STREAM_DESCRIPTION = (
    'With "stream": true, text/event-stream: an `event: token` with data {"token_ids", "text" (the new '
    'piece), "generated_tokens"} per piece of text, then `event: done` with the GenerateResponse, or '
    '`event: error` with {"detail"} if generation fails or the server drains after the stream began. '
    'Lines starting with ":" are keep-alives. A failure before the first event is a JSON status.'
)


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
        "BODY_TIMEOUT": settings.body_timeout, "MAX_BODY_BYTES": settings.limits.max_body_bytes,
        "MAX_NEW_TOKENS_LIMIT": settings.limits.max_new_tokens, "MAX_CONTEXT_TOKENS": settings.model.max_context,
    }  # fmt: skip
    ok = operation["responses"]["200"]
    ok["description"] = "OK. " + STREAM_DESCRIPTION
    ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}  # before OpenAPI 3.2, `schema` is one event
    ok["headers"] = {name: {"description": text, "schema": {"type": "string"}} for name, text in TIMING_HEADERS.items()}
    operation["security"] = [{"apiKey": []}]
    operation["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
    }
    return operation


def _metrics_operation() -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {"summary": "Prometheus metrics (text format 0.0.4); no key needed",
            "responses": {"200": {"description": "OK", "content": text}}}  # fmt: skip


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
# Metrics: counters and histograms, written out in Prometheus' text format (0.0.4) at /metrics

ROUTES = ("/health", "/ready", "/generate", "/docs", "/openapi.json", "/metrics")  # labels: these, or "other"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = SECONDS):
        self.buckets, self.counts, self.sum = buckets, [0] * (len(buckets) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        cumulative, out = 0, []
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{bound}"}} {cumulative}')
        braces = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{braces} {self.sum}", f"{name}_count{braces} {cumulative}"]


@dataclass
class Metrics:
    """Everything /metrics reports that is not read live. Updated on the event loop, except the
    step figures, which only the engine thread writes."""

    requests: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    durations: collections.defaultdict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    queue: Histogram = field(default_factory=Histogram)
    first_token: Histogram = field(default_factory=Histogram)
    per_token: Histogram = field(default_factory=Histogram)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: collections.defaultdict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    batch_sizes: Histogram = field(default_factory=lambda: Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256)))

    def observe_step(self, kind: str, seconds: float, size: int) -> None:
        self.steps[kind].observe(seconds)
        if kind == "decode":
            self.batch_sizes.observe(size)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"  # bounded label values, whatever clients send
        self.requests[route, status] += 1
        self.durations[route].observe(seconds)

    def observe_generation(self, timing: Timing) -> None:
        self.queue.observe(timing.queue)
        self.prompt_tokens += timing.result.prompt_tokens
        self.generated_tokens += timing.result.tokens
        if timing.result.tokens:
            self.first_token.observe(timing.first_token)
        if timing.result.tokens > 1:
            self.per_token.observe(timing.per_token)


def render_metrics(metrics: Metrics, settings: Settings, runtime: Runtime) -> str:
    running = engine.ENGINE.loaded
    active = running.active if running else 0
    families: list[tuple[str, str, str, list[str]]] = [
        ("llm_requests_total", "counter", "HTTP requests by route and status.",
         [f'llm_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(metrics.requests.items())]),
        ("llm_request_duration_seconds", "histogram", "Time from request to response end, by route.",
         [line for r, h in sorted(metrics.durations.items()) for line in h.lines("llm_request_duration_seconds",
                                                                                   f'route="{r}"')]),
        ("llm_queue_duration_seconds", "histogram", "Time a generation waited before joining the batch.",
         metrics.queue.lines("llm_queue_duration_seconds")),
        ("llm_time_to_first_token_seconds", "histogram", "Time from request to the first generated token.",
         metrics.first_token.lines("llm_time_to_first_token_seconds")),
        ("llm_time_per_output_token_seconds", "histogram", "Mean time between generated tokens, per request.",
         metrics.per_token.lines("llm_time_per_output_token_seconds")),
        ("llm_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
         [f"llm_prompt_tokens_total {metrics.prompt_tokens}"]),
        ("llm_generated_tokens_total", "counter", "Tokens generated.",
         [f"llm_generated_tokens_total {metrics.generated_tokens}"]),
        ("llm_running_sequences", "gauge", "Sequences in the running batch.", [f"llm_running_sequences {active}"]),
        ("llm_waiting_sequences", "gauge", "Requests waiting for a place in the batch.",
         [f"llm_waiting_sequences {max(0, runtime.in_flight - active)}"]),
        ("llm_max_batch_size", "gauge", "MAX_BATCH_SIZE.", [f"llm_max_batch_size {settings.model.max_batch}"]),
        ("llm_max_queue", "gauge", "MAX_QUEUE.", [f"llm_max_queue {settings.max_queue}"]),
        ("llm_engine_steps_total", "counter", "Engine forward passes by kind.",
         [f'llm_engine_steps_total{{kind="{k}"}} {sum(h.counts)}' for k, h in sorted(metrics.steps.items())]),
        ("llm_engine_step_duration_seconds", "histogram", "Duration of one forward pass, by kind.",
         [line for k, h in sorted(metrics.steps.items()) for line in h.lines("llm_engine_step_duration_seconds",
                                                                                f'kind="{k}"')]),
        ("llm_batch_size", "histogram", "Sequences advanced by each decode step.",
         metrics.batch_sizes.lines("llm_batch_size")),
        ("llm_model_loaded", "gauge", "1 once the model is loaded.", [f"llm_model_loaded {int(running is not None)}"]),
        ("llm_model_load_duration_seconds", "gauge", "How long the last model load took.",
         [f"llm_model_load_duration_seconds {engine.ENGINE.load_seconds}"]),
        ("process_resident_memory_bytes", "gauge", "Resident memory of this process.",
         [f"process_resident_memory_bytes {_resident_bytes()}"]),
    ]  # fmt: skip
    lines = []
    for name, kind, text, samples in families:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"


def _resident_bytes() -> int:
    with contextlib.suppress(OSError):  # Linux; elsewhere 0
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


# ---------------------------------------------------------------------------------------------
# Running a generation: a worker thread under the capacity limiter, raced against watchers


@dataclass
class Runtime:
    """What the routes share while the process runs (all touched on the event loop only)."""

    limiter: anyio.CapacityLimiter
    in_flight: int = 0  # /generate requests running or waiting for a place in the batch
    draining: bool = False  # SIGTERM received: finish what runs, take nothing new


@dataclass(frozen=True)
class Timing:
    """One generation's times in seconds, from the request's arrival (the timing headers)."""

    result: engine.Result
    arrived: float  # time.monotonic()

    @property
    def queue(self) -> float:
        return max(0.0, (self.result.admitted_at or self.result.finished_at) - self.arrived)

    @property
    def compute(self) -> float:
        return max(0.0, self.result.finished_at - self.result.admitted_at) if self.result.admitted_at else 0.0

    @property
    def first_token(self) -> float:
        return max(0.0, self.result.first_token_at - self.arrived)

    @property
    def per_token(self) -> float:
        return (self.result.finished_at - self.result.first_token_at) / max(1, self.result.tokens - 1)

    def log_fields(self) -> dict[str, Any]:
        ms = {"queue_ms": self.queue, "compute_ms": self.compute, "first_token_ms": self.first_token}
        counts = {"tokens": self.result.tokens, "prompt_tokens": self.result.prompt_tokens}
        return {**counts, "finish_reason": self.result.finish_reason} | {k: round(v * 1000, 1) for k, v in ms.items()}

    def headers(self) -> dict[str, str]:
        total = time.monotonic() - self.arrived
        return {"x-queue-time": f"{self.queue * 1000:.0f}", "x-compute-time": f"{self.compute * 1000:.0f}",
                "x-total-time": f"{total * 1000:.0f}", "x-generated-tokens": str(self.result.tokens),
                "x-prompt-tokens": str(self.result.prompt_tokens)}  # fmt: skip


@dataclass
class Generation:
    """One /generate request's run. `run` holds a place under the limiter while the engine works;
    `watch_queue` gives up if no place comes within QUEUE_TIMEOUT; `cancel` tells the engine to
    drop the sequence at its next step. A streaming run also hands each piece to `events`."""

    request: GenerateRequest
    settings: Settings
    events: MemoryObjectSendStream[engine.Delta | engine.Result] | None = None
    arrived: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)  # a place is held
    result: engine.Result | None = None
    error: Exception | None = None

    async def run(self, limiter: anyio.CapacityLimiter) -> None:
        try:
            await anyio.to_thread.run_sync(self._blocking, limiter=limiter)
        except Exception as exc:
            self.error = from_engine_error(exc)
        finally:
            if self.events is not None:
                self.events.close()  # the stream ends: what follows is result or error

    def _blocking(self) -> None:
        """In the worker thread. The result is kept here, not returned: a run cancelled because
        the client left still waits for its thread, and its tokens still count in /metrics."""
        self.started.set()  # we hold a place now: the queue timeout no longer applies
        deadline = self.arrived + self.settings.request_timeout
        prompt, params, running = self.request.prompt, self.request.params, engine.ENGINE.get()
        if self.events is None:
            self.result = running.generate(prompt, params, self.cancel, deadline)
            return
        for item in running.stream(prompt, params, self.cancel, deadline):
            if isinstance(item, engine.Result):
                self.result = item
            try:
                anyio.from_thread.run_sync(self.events.send_nowait, item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.cancel.set()  # nobody reads any more

    async def watch_queue(self) -> None:
        await anyio.sleep(self.settings.queue_timeout)
        if not self.started.is_set():
            detail = f"no place in the batch within QUEUE_TIMEOUT={self.settings.queue_timeout} s; retry shortly"
            self.error = unavailable(detail, RETRY_BUSY)
            if self.events is not None:
                self.events.close()
            return
        await anyio.sleep_forever()  # a place is held: `run` decides when this ends

    def outcome(self) -> engine.Result:
        if self.error is not None:
            raise self.error
        return self.result or engine.Result("", 0, "cancelled")  # the client left


async def run_generation(request: Request, job: Generation) -> engine.Result:
    async with anyio.create_task_group() as group:

        async def first_to_finish(watch: Callable[[], Awaitable[None]]) -> None:
            await watch()
            job.cancel.set()  # the engine drops the sequence at its next step (no-op once it is done)
            group.cancel_scope.cancel()

        group.start_soon(first_to_finish, lambda: job.run(request.app.state.runtime.limiter))
        group.start_soon(first_to_finish, job.watch_queue)
        group.start_soon(first_to_finish, lambda: _disconnected(request))
    return job.outcome()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def answer(job: Generation, result: engine.Result) -> dict[str, Any]:
    """The JSON answer, and the last event of a stream."""
    generated = job.request.prompt + result.text
    return {"generated_text": generated, "generated_tokens": result.tokens, "finish_reason": result.finish_reason}


# ---------------------------------------------------------------------------------------------
# Streaming: server-sent events, one per new piece of text, then "done" (or "error")

KEEPALIVE_SECONDS = 5  # an SSE comment this often while nothing else is sent, so proxies keep the stream
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                  (b"x-accel-buffering", b"no")]  # fmt: skip


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@dataclass
class EventStream:
    """The ASGI answer of a streaming /generate. Until the first piece (or the first keep-alive)
    nothing is sent, so an early failure is still a plain JSON status; after that, a failure or
    the drain ends the stream with an `error` event, never by just stopping."""

    job: Generation
    runtime: Runtime
    metrics: Metrics
    begun: bool = False  # the 200 and its headers went out
    gone: bool = False  # the client left

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        sender, events = anyio.create_memory_object_stream[engine.Delta | engine.Result](math.inf)
        self.job.events = sender
        try:
            async with anyio.create_task_group() as group:

                async def until_disconnected() -> None:
                    await _disconnected(request)
                    self.gone = True
                    self.job.cancel.set()  # before cancelling: the worker thread waits for the engine
                    group.cancel_scope.cancel()

                group.start_soon(self.job.run, self.runtime.limiter)
                group.start_soon(self.job.watch_queue)
                group.start_soon(until_disconnected)
                await self.forward(events, send)
                self.job.cancel.set()
                group.cancel_scope.cancel()
        finally:
            self.runtime.in_flight -= 1
            self.job.cancel.set()
        if self.job.error is None and self.job.result is not None:  # counted even if the client left
            timing = Timing(self.job.result, self.job.arrived)
            self.metrics.observe_generation(timing)
            scope["state"].update(timing.log_fields())
        if not self.gone:
            await self.finish(send)

    async def forward(self, events: MemoryObjectReceiveStream[engine.Delta | engine.Result], send: Send) -> None:
        while True:
            with anyio.move_on_after(KEEPALIVE_SECONDS) as idle:
                try:
                    item = await events.receive()
                except anyio.EndOfStream:
                    return
            if idle.cancelled_caught:
                await self.begin(send)
                await send({"type": "http.response.body", "body": b": waiting\n\n", "more_body": True})
            elif isinstance(item, engine.Delta):
                await self.begin(send)
                piece = {"token_ids": item.token_ids, "text": item.text, "generated_tokens": item.tokens}
                await send({"type": "http.response.body", "body": sse("token", piece), "more_body": True})

    async def begin(self, send: Send) -> None:
        if not self.begun:
            self.begun = True
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})

    async def finish(self, send: Send) -> None:
        """The last event: `done` with the whole answer, or `error`; or, before anything was sent,
        the JSON answer's status."""
        error = self.job.error
        if not self.begun:
            if error is not None:
                raise error
            await self.begin(send)
        if error is not None:
            detail = error.detail if isinstance(error, ApiError) else "internal server error"
            if not isinstance(error, ApiError):
                log.error("generation failed mid-stream", exc_info=error)
            last = sse("error", {"detail": detail})
        elif self.runtime.draining and self.job.outcome().finish_reason == "timeout":
            last = sse("error", {"detail": "the server is shutting down: generation stopped early; retry elsewhere"})
        else:
            last = sse("done", answer(self.job, self.job.outcome()))
        await send({"type": "http.response.body", "body": last, "more_body": False})


# ---------------------------------------------------------------------------------------------
# Routes


def model_state() -> tuple[str, str]:
    """The model's state for /health and /ready: loaded, loading, failed (and why), or not loaded."""
    running, failure = engine.ENGINE.loaded, engine.ENGINE.failure()
    if running is not None and running.running:
        return "loaded", "the model is loaded"
    if engine.ENGINE.loading:
        return "loading", "the model is loading"
    if failure is not None:
        reason, retry_in = failure
        return "failed", f"loading the model failed: {reason[:300]}; the next request after {retry_in} s tries again"
    return "not loaded", "model not loaded yet (it loads on the first /generate, or at start with LOAD_ON_START=1)"


async def health(request: Request) -> JSONResponse:
    """Liveness: 200 whenever the process answers. A model that cannot load shows in the body
    (point readiness probes at /ready), not as a failing liveness check that restarts the pod."""
    settings: Settings = request.app.state.settings
    running = engine.ENGINE.loaded
    state, detail = model_state()
    body = {"status": "ok", "service": SERVICE, "model": settings.model.name, "model_loaded": state == "loaded",
            "model_state": state, "active_sequences": running.active if running else 0}  # fmt: skip
    if state == "failed":
        body["model_error"] = detail
    return JSONResponse(body)


async def ready(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    if runtime.draining:
        raise ApiError(503, "shutting down")
    state, detail = model_state()
    if state != "loaded":
        raise ApiError(503, detail)
    return JSONResponse({"status": "ready"})


async def docs(request: Request) -> Response:
    """The OpenAPI document, or for a browser (its Accept prefers text/html) docs.html, a page that
    renders the same document and has a form to try /generate."""
    if prefers_html(request.headers.get("accept", "")):
        page: DocsPage = request.app.state.docs_page
        return Response(page.html, media_type="text/html", headers=page.headers)
    return JSONResponse(openapi(request.app.state.settings), headers={"Vary": "Accept"})


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(openapi(request.app.state.settings))


async def generate(request: Request) -> Response | EventStream:
    settings: Settings = request.app.state.settings
    runtime: Runtime = request.app.state.runtime
    if runtime.draining:
        raise unavailable("shutting down; retry on another instance", RETRY_SHUTDOWN, close=True)
    body = await read_json(request, settings.limits.max_body_bytes, settings.body_timeout)
    job = Generation(parse_generate(body, settings.limits), settings)
    capacity = settings.model.max_batch + settings.max_queue
    if runtime.in_flight >= capacity:
        raise unavailable(f"at capacity: {capacity} requests running or waiting; retry shortly", RETRY_BUSY)
    if settings.log_prompts:
        request.state.prompt = job.request.prompt
    runtime.in_flight += 1
    if job.request.stream:
        return EventStream(job, runtime, request.app.state.metrics)  # it gives the place back when done
    try:
        result = await run_generation(request, job)
    finally:
        runtime.in_flight -= 1
    timing = Timing(result, job.arrived)
    request.app.state.metrics.observe_generation(timing)
    request.scope["state"].update(timing.log_fields())
    return JSONResponse(answer(job, result), headers=timing.headers())


async def metrics(request: Request) -> Response:
    text = render_metrics(request.app.state.metrics, request.app.state.settings, request.app.state.runtime)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# ---------------------------------------------------------------------------------------------
# Request logs: one JSON line per request


LOGGED = ("tokens", "prompt_tokens", "finish_reason", "queue_ms", "compute_ms", "first_token_ms", "prompt")


class RequestLog:
    """Pure ASGI middleware: gives each request an id (X-Request-ID, or a new one), returns it,
    logs method, path, status, tokens and times, and counts the request for /metrics. Never
    headers, so never the API key; prompt text only with LOG_PROMPTS=1."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

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
            seconds = time.perf_counter() - start
            fields["latency_ms"] = round(seconds * 1000, 1)
            fields.update({k: state[k] for k in LOGGED if k in state})
            access_log.info("request", extra={"fields": fields})
            self.metrics.observe_request(scope["path"], status, seconds)


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
# Connections: uvicorn's HTTP/1.1 protocol with the two guards it lacks


def guarded_protocol(head_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn sets no timer on a request head that never completes (a connection that sends
    nothing, or one byte at a time, is held forever), and bounds connections only by file
    descriptors. This subclass closes a connection whose request head has not arrived within
    `head_timeout` seconds of it opening or of the previous answer, and answers a connection past
    `max_connections` with a JSON 503 at once, then closes it. Slow senders and idle sockets
    therefore cost a bounded number of descriptors, and /health keeps answering."""
    busy = json.dumps({"detail": f"too many open connections (MAX_CONNECTIONS={max_connections})"}).encode()
    refusal = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"retry-after: %d\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
    ) % (RETRY_BUSY, len(busy), busy)

    class GuardedH11Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(refusal)
                transport.close()
                return
            self.arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.arm_head_timer()  # the next request's head is due in time too

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def arm_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(head_timeout, self.head_timed_out)

        def head_timed_out(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # still no complete request head

    return GuardedH11Protocol


# ---------------------------------------------------------------------------------------------
# The application


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.runtime = Runtime(anyio.CapacityLimiter(settings.model.max_batch))
        engine.ENGINE.configure(settings.model, observe=app.state.metrics.observe_step)
        if settings.load_on_start:  # a plain thread: start-up is not held up, /health answers at once
            threading.Thread(target=_preload, name="preload", daemon=True).start()
        yield
        await anyio.to_thread.run_sync(engine.ENGINE.close)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {ApiError: on_api_error, HTTPException: on_http_error}  # other errors: RequestLog
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.settings = settings
    app.state.docs_page = DocsPage.load()
    app.state.metrics = Metrics()
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    if settings.allowed_hosts:  # a browser tricked by DNS rebinding sends a foreign Host: refuse it
        hosts = [host.strip() for host in settings.allowed_hosts.split(",") if host.strip()]
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    app.add_middleware(RequestLog, metrics=app.state.metrics)  # outermost, so 401s are logged and counted
    return app


def _preload() -> None:
    # A failure is logged by the engine; /ready stays 503 and a later request tries again.
    with contextlib.suppress(engine.EngineUnavailable):
        engine.ENGINE.get()


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
        if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
            # uvicorn re-raises caught signals once it has shut down, so the process would die of
            # SIGTERM (status 143), or print a KeyboardInterrupt traceback on Ctrl+C; a drain that
            # completed is a clean exit, status 0.
            self._captured_signals.remove(sig)


def _expire_generations() -> None:
    running = engine.ENGINE.loaded
    if running is not None:
        log.warning("drain timeout reached: ending generations in flight with what they have")
        running.expire()


def main() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    settings = Settings.from_env()
    threads = engine.use_threads(settings.model.threads)
    log.info("starting", extra={"fields": {"model": settings.model.name, "threads": threads}})
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.head_timeout, settings.max_connections),
        log_config=None,  # keep our JSON logging
        access_log=False,  # RequestLog writes one line per request instead
        timeout_graceful_shutdown=settings.drain_timeout + DRAIN_BACKSTOP_SECONDS,
    )
    DrainingServer(config, app, settings.drain_timeout).run()


if __name__ == "__main__":
    main()
