"""LLM-Generator: a small REST API that serves a causal language model.

A request's path, outermost first:
  RequestLog (below)        gives the request an id, writes one JSON log line when it ends
  APIKeyMiddleware (auth.py) /generate only: one valid x-api-key header, else 401
  route                     /health, /ready, /docs, /generate
  read_json                 content type, body size and time, JSON syntax
  parse_generate            every field, by hand, from one table of fields (`generate_fields`)
  Generation.serve          the one lifecycle: admit (MAX_BATCH_SIZE running + MAX_QUEUE waiting,
                            else 503 at once), a worker thread under the capacity limiter
                            (anyio.to_thread.run_sync) raced against the queue timeout and the
                            client leaving, account, give the place back
  a rendering               the JSON answer (the events read to the end) or server-sent events
  app.state.engine          engine.ENGINE: loads the model once, then batches every request

Every limit, where it is enforced, and what the client gets:
  setting                        enforced in                       status
  API_KEY                        auth.APIKeyMiddleware             401
  content-type                   read_json                         415
  MAX_BODY_BYTES                 read_json (declared and read)     413
  BODY_TIMEOUT                   read_json                         408
  field rules, MAX_NEW_TOKENS_LIMIT  parse_generate                422
  MAX_CONTEXT_TOKENS             engine.Engine._check_fits         422
  MAX_BATCH_SIZE + MAX_QUEUE     refuse_early, Generation._admit   503, Retry-After RETRY_BUSY
  QUEUE_TIMEOUT                  Generation._watch_queue           503, Retry-After RETRY_BUSY
  MODEL_RETRY_SECONDS            engine.LazyEngine.get             503, Retry-After: LazyEngine.retry_in
  REQUEST_TIMEOUT                engine.Scheduler.postprocess      200, finish_reason "timeout"
  DRAIN_TIMEOUT                  DrainingServer -> engine.drain    200, finish_reason "timeout"
  (shutting down)                generate, ready                   503, Retry-After RETRY_SHUTDOWN
Every error is JSON of one shape, {"detail": "..."}; the errors section lists them on one screen.

Reading order: settings, errors, validation, the OpenAPI document, the docs page (docs.html, what
a browser gets at /docs), metrics, running a generation (its lifecycle and the JSON rendering),
streaming (the SSE rendering), the OpenAI-compatible API (its fields and renderings), routes,
request logs, connections, the app and its shutdown. Run: API_KEY=... python server.py (README.md
lists settings).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import contextlib
import dataclasses
import hashlib
import itertools
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, cast

import anyio
import anyio.from_thread
import anyio.to_thread
import h11
import uvicorn
from anyio.streams.memory import MemoryObjectReceiveStream
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
STARTED = int(time.time())  # /v1/models' `created`: when this process started
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
    served_model_name: str = setting("", "SERVED_MODEL_NAME")  # the OpenAI routes' model id; empty: MODEL_NAME

    @property
    def served_model(self) -> str:
        return self.served_model_name or self.model.name

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
    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None, param: str | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, dict(headers or {})
        self.param = param  # the request field at fault, if one is (OpenAI's error names it)


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


def error_body(detail: str) -> dict[str, str]:
    """The one error shape. A detail may quote the client's input; a lone surrogate there cannot
    be encoded as UTF-8, so it is shown escaped (\\ud800) instead of failing the answer."""
    return {"detail": detail.encode("utf-8", "backslashreplace").decode("utf-8")}


OPENAI = "/v1/"  # the OpenAI-compatible routes' prefix: their errors take OpenAI's shape
OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 503: "service_unavailable"}


def error_response(
    status: int, detail: str, headers: Mapping[str, str] | None = None, path: str = "", param: str | None = None
) -> JSONResponse:
    """An error's answer: {"detail": ...}; on the OpenAI routes OpenAI's own {"error": {message,
    type, param, code}}, so their clients raise their typed exceptions (a bad field there is a
    400, as OpenAI answers it, where /generate says 422)."""
    if not path.startswith(OPENAI):
        return JSONResponse(error_body(detail), status_code=status, headers=headers)
    status = 400 if status == 422 else status
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    error = {"message": error_body(detail)["detail"], "type": kind, "param": param, "code": OPENAI_CODES.get(status)}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def refusal(path: str, status: int, detail: str, headers: Mapping[str, str]) -> Response:
    """auth.py's 401, in the shape of the route it guards."""
    return error_response(status, detail, headers, path)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.detail, exc.headers, request.url.path, exc.param)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # Starlette's own 404 and 405
    return error_response(exc.status_code, str(exc.detail), exc.headers, request.url.path)


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


@dataclass(frozen=True)
class Field:
    """One request field, declared once: its JSON type, default, bounds and meaning. The validator's
    checks and error messages (`check`) and the OpenAPI schema (`schema`) both come from here, and
    the OpenAI routes map their own names onto the same fields. Every optional field takes null,
    meaning its default; an integral number (7.0) is an integer, as in JSON Schema."""

    name: str
    kind: str  # "text" | "integer" | "number" | "boolean" | "stop"
    meaning: str
    default: Any = None
    low: float = 0  # integer and number bounds, inclusive
    high: float = 0
    above_low: bool = False  # a number that must be greater than `low` (top_p)
    zero_or_from: float = 0  # a number that is 0 or at least this (temperature: 0 means greedy)
    most: int = 0  # stop: at most this many strings, of 1 to `high` characters each

    def check(self, value: Any) -> Any:
        """The clean value, or a 422 that names the field, the rule and what was sent."""
        if value is None and self.kind != "text":
            return self.default
        return getattr(self, f"_{self.kind}")(value)

    def rule(self) -> str:
        if self.kind == "integer":
            return f"{self.name} must be an integer from {self.low:.0f} to {self.high:.0f}"
        if self.kind == "number":
            return f"{self.name} must be a number from {float(self.low)} to {float(self.high)}"
        if self.kind == "stop":
            each = f"each 1 to {self.high:.0f} characters"
            return f"{self.name} must be a string or a list of at most {self.most} strings, {each}"
        if self.kind == "boolean":
            return f"{self.name} must be true or false"
        return f"{self.name} is required and must be a non-empty string"

    def _refuse(self, got: str, rule: str = "") -> NoReturn:
        raise ApiError(422, f"{rule or self.rule()}, got {got}", param=self.name)

    def _text(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            self._refuse(_json_type(value))
        return _unicode(value, self.name)

    def _integer(self, value: Any) -> int:
        number = int(value) if isinstance(value, float) and value.is_integer() else value
        if isinstance(number, bool) or not isinstance(number, int) or not self.low <= number <= self.high:
            self._refuse(_shown(value))
        return number

    def _number(self, value: Any) -> float:
        # Compared before any conversion: an integer too large for a float is simply out of range.
        # NaN compares false, so it fails the range check too.
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            self._refuse(_shown(value))
        if self.above_low and value == self.low:
            self._refuse(_shown(value), f"{self.name} must be a number above {self.low:g} and at most {self.high:g}")
        if 0 < value < self.zero_or_from:
            self._refuse(_shown(value), f"{self.name} must be 0 (greedy) or from {self.zero_or_from} to {self.high}")
        return float(value)

    def _boolean(self, value: Any) -> bool:
        if not isinstance(value, bool):
            self._refuse(_shown(value))
        return value

    def _stop(self, value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            self._refuse(_json_type(value))
        if len(items) > self.most:
            self._refuse(f"{len(items)} strings")
        for item in items:
            if not isinstance(item, str) or not 1 <= len(item) <= self.high:
                self._refuse(_shown(item))
        return tuple(_unicode(item, self.name) for item in items)

    def schema(self) -> dict[str, Any]:
        """This field's JSON Schema (OpenAPI 3.1)."""
        bounds: dict[str, Any] = {"minimum": self.low, "maximum": self.high}
        if self.above_low:
            bounds = {"exclusiveMinimum": self.low, "maximum": self.high}
        string = {"type": "string", "minLength": 1, "maxLength": self.high}
        kinds: dict[str, dict[str, Any]] = {
            "text": {"type": "string", "minLength": 1},
            "integer": {"type": ["integer", "null"], **bounds},
            "number": {"type": ["number", "null"], **bounds},
            "boolean": {"type": ["boolean", "null"]},
            "stop": {"anyOf": [string, {"type": "array", "maxItems": self.most, "items": string}, {"type": "null"}]},
        }
        schema = kinds[self.kind]
        if self.zero_or_from:
            schema = {"anyOf": [{"const": 0}, {"type": "number", "minimum": self.zero_or_from, "maximum": self.high},
                                {"type": "null"}]}  # fmt: skip
        if self.default is not None and self.default != ():
            schema["default"] = self.default
        return {**schema, "description": self.meaning}


def generate_fields(limits: Limits) -> tuple[Field, ...]:
    """The /generate fields: the one table the validator, the OpenAPI document and the docs page read."""
    d = DEFAULTS
    return (
        Field("prompt", "text", "Text to continue."),
        Field("max_new_tokens", "integer", "Tokens to generate at most.", limits.default_new_tokens, 1,
              limits.max_new_tokens),
        Field("temperature", "number", "0 means greedy decoding.", d.temperature, 0, limits.max_temperature,
              zero_or_from=limits.min_temperature),
        Field("top_p", "number", "Sample from the smallest set of tokens whose probability reaches top_p.", d.top_p,
              0, 1, above_low=True),
        Field("top_k", "integer", "0 means no top-k filter.", d.top_k, 0, limits.max_top_k),
        Field("seed", "integer", "Same seed and request, same text. Random when absent.", d.seed, 0, limits.max_seed),
        Field("stop", "stop", "Generation ends at the first stop string, which is cut from the output.", d.stop,
              high=limits.max_stop_length, most=limits.max_stop_count),
        Field("ignore_eos", "boolean", "Generate exactly max_new_tokens, ignoring end of sequence.", d.ignore_eos),
        Field("stream", "boolean", "Answer as text/event-stream: `token` events, then `done` (or `error`).", False),
    )  # fmt: skip


FIELDS = tuple(f.name for f in generate_fields(Limits()))


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
    fields = generate_fields(limits)
    if "prompt" not in body:
        raise ApiError(422, f"{fields[0].rule()}, got missing")
    values = {f.name: f.check(body.get(f.name)) for f in fields}
    prompt, stream = values.pop("prompt"), values.pop("stream")
    return GenerateRequest(prompt, engine.SamplingParams(**values), stream)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _unicode(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, f"{name} contains invalid Unicode (a lone surrogate)") from None
    return value


def _shown(value: object) -> str:
    """A client's value as quoted in an error: JSON, short, and cut to a few levels and items
    first, so that any value that parsed can be shown (a list nested 1,000 deep would take
    json.dumps past Python's recursion limit)."""
    text = json.dumps(_clipped(value, SHOWN_DEPTH))
    return text if len(text) <= 80 else text[:77] + "..."


SHOWN_DEPTH = 3  # levels of nesting quoted in an error; deeper ones show as "..."


def _clipped(value: object, depth: int) -> object:
    if isinstance(value, str):
        return value[:80]
    if isinstance(value, list | dict) and depth == 0:
        return "..."
    if isinstance(value, list):
        return [_clipped(item, depth - 1) for item in value[:5]]
    if isinstance(value, dict):
        return {key[:40]: _clipped(item, depth - 1) for key, item in list(value.items())[:5]}
    return value


# ---------------------------------------------------------------------------------------------
# The OpenAPI document, written by hand from the same limits, defaults and errors as above


def openapi(settings: Settings) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": SERVICE, "version": "1.0.0", "description": "Text generation with a causal language model."},
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },  # /v1/ only
            "schemas": {
                "GenerateRequest": _request_schema(settings.limits),
                **_SCHEMAS,
                **openai_schemas(settings.limits),
            },
        },
        "paths": {
            "/health": {"get": _operation("Liveness: 200 while the process runs, with model status", "Health", {})},
            "/ready": {"get": _operation("Readiness: 200 once the model is loaded", "object", READY_ERRORS)},
            "/docs": {"get": _docs_operation()},
            "/openapi.json": {"get": _operation("This OpenAPI document, whatever the Accept header", "object", {})},
            "/metrics": {"get": _metrics_operation()},
            "/generate": {"post": _generate_operation(settings)},
            **openai_paths(settings),
        },
    }


def _request_schema(limits: Limits) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {f.name: f.schema() for f in generate_fields(limits)},
        "x-max-body-bytes": limits.max_body_bytes,
    }


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
            "model_family": {"type": "string", "description": "Once loaded: its model type (gpt2, llama, qwen2...)."},
        },
    },
    "GenerateResponse": {
        "type": "object",
        "required": ["generated_text", "generated_tokens", "finish_reason"],
        "properties": {
            "generated_text": {"type": "string", "description": "The prompt followed by its continuation."},
            "generated_tokens": {"type": "integer", "description": "Tokens the model generated."},
            "finish_reason": {"enum": [reason.value for reason in engine.FinishReason]},
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

ROUTES = (
    "/health",
    "/ready",
    "/generate",
    "/docs",
    "/openapi.json",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
)  # labels: these, or "other"
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
    cached_tokens: int = 0  # of those, restored from the prefix cache
    prefix_hits: int = 0  # generations whose prompt started with cached blocks
    generated_tokens: int = 0
    steps: collections.defaultdict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    batch_sizes: Histogram = field(default_factory=lambda: Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256)))

    def observe_step(self, kind: str, seconds: float, size: int) -> None:
        self.steps[kind].observe(seconds)
        if kind != "prefill":  # "decode" or "mixed": the decode rows it advanced
            self.batch_sizes.observe(size)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"  # bounded label values, whatever clients send
        self.requests[route, status] += 1
        self.durations[route].observe(seconds)

    def observe_generation(self, timing: Timing) -> None:
        self.queue.observe(timing.queue)
        self.prompt_tokens += timing.result.prompt_tokens
        self.cached_tokens += timing.result.cached_tokens
        self.prefix_hits += timing.result.cached_tokens > 0
        self.generated_tokens += timing.result.tokens
        if timing.result.tokens:
            self.first_token.observe(timing.first_token)
        if timing.result.tokens > 1:
            self.per_token.observe(timing.per_token)


def render_metrics(metrics: Metrics, settings: Settings, runtime: Runtime, lazy: engine.LazyEngine) -> str:
    running = lazy.loaded
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
        ("llm_prompt_cached_tokens_total", "counter", "Prompt tokens restored from the prefix cache, not computed.",
         [f"llm_prompt_cached_tokens_total {metrics.cached_tokens}"]),
        ("llm_prefix_cache_hits_total", "counter", "Finished generations whose prompt began with cached blocks.",
         [f"llm_prefix_cache_hits_total {metrics.prefix_hits}"]),
        ("llm_prefix_cache_blocks", "gauge", f"Prompt blocks ({engine.PrefixCache.BLOCK} tokens) in the prefix cache.",
         [f"llm_prefix_cache_blocks {running.prefix.used if running else 0}"]),
        ("llm_prefix_cache_capacity_blocks", "gauge", "Blocks the prefix cache can hold (PREFIX_CACHE_TOKENS).",
         [f"llm_prefix_cache_capacity_blocks {running.prefix.capacity if running else 0}"]),
        ("llm_kv_cache_blocks", "gauge", f"KV pool blocks ({engine.Scheduler.BLOCK} tokens) held by running sequences.",
         [f"llm_kv_cache_blocks {running.scheduler.blocks_used if running else 0}"]),
        ("llm_kv_cache_capacity_blocks", "gauge", "Blocks in the KV pool (KV_CACHE_MB).",
         [f"llm_kv_cache_capacity_blocks {running.scheduler.blocks if running else 0}"]),
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
        ("llm_batch_size", "histogram", "Sequences advanced by each pass with decode rows (kind decode or mixed).",
         metrics.batch_sizes.lines("llm_batch_size")),
        ("llm_model_loaded", "gauge", "1 once the model is loaded.", [f"llm_model_loaded {int(running is not None)}"]),
        ("llm_model_load_duration_seconds", "gauge", "How long the last model load took.",
         [f"llm_model_load_duration_seconds {lazy.load_seconds}"]),
        ("process_resident_memory_bytes", "gauge", "Resident memory of this process.",
         [f"process_resident_memory_bytes {engine.resident_bytes()}"]),
    ]  # fmt: skip
    lines = []
    for name, kind, text, samples in families:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Running a generation: one lifecycle (admit, race, account, give the place back); an answer is a
# rendering of its events


@dataclass
class Runtime:
    """What the routes share while the process runs (all touched on the event loop only)."""

    limiter: anyio.CapacityLimiter
    in_flight: int = 0  # generations running or waiting for a place in the batch
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


Event = engine.Delta | engine.Result | Exception  # a piece, the final result, or why there is none
Events = MemoryObjectReceiveStream[Event]
T = typing.TypeVar("T")


def capacity(settings: Settings) -> int:
    return settings.model.max_batch + settings.max_queue


def at_capacity(settings: Settings, close: bool = False) -> ApiError:
    return unavailable(f"at capacity: {capacity(settings)} requests running or waiting; retry shortly", RETRY_BUSY,
                       close)  # fmt: skip


def refuse_early(request: Request) -> None:
    """Before the body is read: while draining, or already at capacity, answer 503 at once (and
    close, the body unread). A burst of hundreds past capacity then costs the event loop almost
    nothing each, so /health keeps answering; `Generation._admit` checks again after parsing."""
    runtime: Runtime = request.app.state.runtime
    if runtime.draining:
        raise unavailable("shutting down; retry on another instance", RETRY_SHUTDOWN, close=True)
    if runtime.in_flight >= capacity(request.app.state.settings):
        raise at_capacity(request.app.state.settings, close=True)


class Generation:
    """One request's generation, from admission to the place given back, written once for every
    answer. `serve(render)` admits it (503 at capacity), runs it in a worker thread under the
    capacity limiter, races that against the queue timeout and the client leaving, hands its
    events to `render` (pieces, then the result or an error: always exactly one of those two
    last), counts it in /metrics and the request log, and gives the place back. A rendering only
    reads events and writes an answer: no race, no accounting, no cancel of its own."""

    def __init__(self, request: Request, prompt: str | list[dict[str, str]], params: engine.SamplingParams,
                 pieces: bool) -> None:  # fmt: skip
        self.request, self.prompt, self.params = request, prompt, params
        self.pieces = pieces  # the rendering streams; else the engine sends the text once, at the end
        self.settings: Settings = request.app.state.settings
        self.runtime: Runtime = request.app.state.runtime
        self.arrived = time.monotonic()
        self.cancel = threading.Event()  # set: the engine drops the sequence at its next step
        self.result: engine.Result | None = None  # kept even when nobody reads it (a client that left)
        self._sender, self._events = anyio.create_memory_object_stream[Event](math.inf)
        self._loop: asyncio.AbstractEventLoop | None = None  # the request's event loop, for `_relay`
        self._queued = anyio.CancelScope()  # the wait for a place in the batch
        self._lock, self._started, self._gave_up = threading.Lock(), False, False

    async def serve(self, render: Callable[[Events], Awaitable[T]]) -> T:
        self._admit()
        self._loop = asyncio.get_running_loop()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._run)
                group.start_soon(self._watch_queue)
                group.start_soon(self._watch_client)
                try:
                    outcome: T | BaseException = await render(self._events)
                except Exception as exc:  # raised after the group, not wrapped in an ExceptionGroup
                    outcome = exc
                finally:
                    self.cancel.set()  # the one cancel: a no-op once the sequence is done
                    group.cancel_scope.cancel()  # the watchers; the worker thread finishes its step
        finally:
            self.runtime.in_flight -= 1
            self._account()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _admit(self) -> None:
        if self.runtime.in_flight >= capacity(self.settings):
            raise at_capacity(self.settings)
        self.runtime.in_flight += 1

    def _account(self) -> None:
        if self.result is not None:  # counted even if the client left
            timing = Timing(self.result, self.arrived)
            self.request.app.state.metrics.observe_generation(timing)
            self.request.scope["state"].update(timing.log_fields())

    async def _run(self) -> None:
        with self._queued:
            try:
                await anyio.to_thread.run_sync(self._blocking, limiter=self.runtime.limiter)
            except Exception as exc:
                self._sender.send_nowait(from_engine_error(exc))
        self._sender.close()

    def _blocking(self) -> None:
        """In the worker thread, holding a place: feed the engine's events to the renderer."""
        with self._lock:
            if self._gave_up:
                return  # the wait ended (queue timeout, or the client left) as the place came
            self._started = True
        deadline = self.arrived + self.settings.request_timeout
        running: engine.Engine = self.request.app.state.engine.get()
        prompt = self.prompt if isinstance(self.prompt, str) else running.chat_prompt(self.prompt)
        relay = self._relay if self.pieces else None
        for event in running.stream(prompt, self.params, self.cancel, deadline, self.pieces, relay):
            if isinstance(event, engine.Result):
                self.result = event  # kept and counted even if nobody reads it any more
            anyio.from_thread.run_sync(self._deliver, event)

    def _relay(self, delta: engine.Delta) -> None:
        """On the engine thread: hand a streamed piece to the event loop without waiting. Each
        piece through the worker thread woke it and then the loop, on the cores the steps run on
        (32 streams 483-498 against 433-473 tok/s, AMX Xeon, bench/README.md). The result still goes
        through the worker, after every piece: the loop runs callbacks in the order they came."""
        assert self._loop is not None  # set by `serve` before the worker starts
        try:
            self._loop.call_soon_threadsafe(self._deliver, delta)
        except RuntimeError:  # the loop has closed (the server is stopping)
            self.cancel.set()

    def _deliver(self, event: Event) -> None:
        """In the event loop: an event to the rendering; if nobody reads any more, the cancel."""
        try:
            self._sender.send_nowait(event)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.cancel.set()

    def _give_up_waiting(self, last: Event) -> None:
        """End a generation that has no place yet with `last`; once it holds one (or has ended
        so already), do nothing."""
        with self._lock:
            if self._started or self._gave_up:
                return
            self._gave_up = True
        self._queued.cancel()
        self._sender.send_nowait(last)

    async def _watch_queue(self) -> None:
        await anyio.sleep(self.settings.queue_timeout)
        detail = f"no place in the batch within QUEUE_TIMEOUT={self.settings.queue_timeout} s; retry shortly"
        self._give_up_waiting(unavailable(detail, RETRY_BUSY))

    async def _watch_client(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass  # the body has been read already
        self.cancel.set()
        self._give_up_waiting(engine.Result("", 0, engine.FinishReason.CANCELLED))


def answer(prompt: str, result: engine.Result) -> dict[str, Any]:
    """The JSON answer, and the last event of a stream."""
    return {"generated_text": prompt + result.text, "generated_tokens": result.tokens,
            "finish_reason": result.finish_reason}  # fmt: skip


async def all_events(events: Events) -> tuple[list[engine.Delta], engine.Result]:
    """The JSON renderings' reading: the events to their end (the pieces, and the result)."""
    deltas: list[engine.Delta] = []
    async for event in events:
        if isinstance(event, Exception):
            raise event
        if isinstance(event, engine.Result):
            return deltas, event
        deltas.append(event)
    raise RuntimeError("a generation ended without a result")  # a bug: RequestLog answers 500


# ---------------------------------------------------------------------------------------------
# Streaming: server-sent events, one per new piece of text, then "done" (or "error")

KEEPALIVE_SECONDS = 5  # an SSE comment this often while nothing else is sent, so proxies keep the stream
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                  (b"x-accel-buffering", b"no")]  # fmt: skip


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@dataclass
class EventStream:
    """The ASGI answer of a streaming /generate: a rendering of the generation's events. Until
    the first piece (or the first keep-alive) nothing is sent, so an early failure is still a
    plain JSON status; after that, a failure or the drain ends the stream with an `error` event,
    never by just stopping."""

    job: Generation
    begun: bool = False  # the 200 and its headers went out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def render(events: Events) -> None:
            while True:
                with anyio.move_on_after(KEEPALIVE_SECONDS) as idle:
                    event = await events.receive()
                if idle.cancelled_caught:
                    await self.write(send, b": waiting\n\n")
                elif isinstance(event, engine.Delta):
                    piece = {"token_ids": event.token_ids, "text": event.text, "generated_tokens": event.tokens}
                    await self.write(send, sse("token", piece))
                else:
                    return await self.finish(send, event)

        await self.job.serve(render)

    async def write(self, send: Send, body: bytes, more: bool = True) -> None:
        if not self.begun:
            self.begun = True
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        await send({"type": "http.response.body", "body": body, "more_body": more})

    async def finish(self, send: Send, last: engine.Result | Exception) -> None:
        """The last event: `done` with the whole answer, or `error`; or, before anything was sent,
        the JSON answer's status."""
        if isinstance(last, Exception):
            if not self.begun:
                raise last
            if not isinstance(last, ApiError):
                log.error("generation failed mid-stream", exc_info=last)
            detail = last.detail if isinstance(last, ApiError) else "internal server error"
            return await self.write(send, sse("error", error_body(detail)), more=False)
        if (drained := self.drained(last)) is not None:
            return await self.write(send, sse("error", error_body(drained.detail)), more=False)
        assert isinstance(self.job.prompt, str)
        await self.write(send, sse("done", answer(self.job.prompt, last)), more=False)

    def drained(self, result: engine.Result) -> ApiError | None:
        """A stream the drain cut short ends as a failure, so a client never takes it for whole."""
        if self.job.runtime.draining and result.finish_reason == engine.FinishReason.TIMEOUT:
            return unavailable("the server is shutting down: generation stopped early; retry elsewhere", RETRY_SHUTDOWN)
        return None


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions. Their fields map
# onto the same table as /generate's (renamed), the same lifecycle runs them, and their answers
# are two more renderings of its events, in the shapes the OpenAI API gives them.

ROLES = ("system", "developer", "user", "assistant")  # "developer" is newer OpenAI's name for system
OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop"}
UNSUPPORTED = {  # fields this service cannot honour: a 400 that names them, never a silent ignore
    "n": (lambda v: v is not None and (isinstance(v, bool) or v != 1), "n must be 1: this server answers one choice "
          "per request"),
    "best_of": (lambda v: v is not None and (isinstance(v, bool) or v != 1), "best_of must be 1: this server answers "
                "one choice per request"),
    "suffix": (lambda v: v not in (None, ""), "suffix (insertion) is not supported"),
    "logit_bias": (lambda v: v not in (None, {}), "logit_bias is not supported"),
    "tools": (lambda v: v not in (None, []), "tools (function calling) are not supported"),
    "tool_choice": (lambda v: v not in (None, "none"), "tool_choice is not supported"),
    "functions": (lambda v: v not in (None, []), "functions (function calling) are not supported"),
    "function_call": (lambda v: v not in (None, "none"), "function_call is not supported"),
    "response_format": (lambda v: v not in (None, {"type": "text"}), 'response_format other than {"type": "text"} '
                        "is not supported"),
}  # fmt: skip


@dataclass(frozen=True)
class OpenAIRequest:
    prompt: str | list[dict[str, str]]  # completions: text; chat: the messages
    params: engine.SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    echo: bool = False  # completions: the prompt before the text


def openai_fields(limits: Limits, chat: bool) -> dict[str, Field]:
    """The OpenAI names of the fields, each /generate's rule under its OpenAI name (or, for what
    /generate lacks, a field declared here once)."""
    generate = {f.name: f for f in generate_fields(limits)}
    renamed = {
        "max_tokens": "max_new_tokens",
        "temperature": "temperature",
        "top_p": "top_p",
        "seed": "seed",
        "stop": "stop",
        "stream": "stream",
        "top_k": "top_k",
        "ignore_eos": "ignore_eos",
    }  # the last two as vLLM
    fields = {name: dataclasses.replace(generate[ours], name=name) for name, ours in renamed.items()}
    fields["stream"] = dataclasses.replace(fields["stream"], meaning="Answer as text/event-stream: `data: {chunk}` "
                                           "lines, then `data: [DONE]`.")  # fmt: skip
    fields["presence_penalty"] = Field("presence_penalty", "number", "Subtracted from the logit of every token "
                                       "generated so far.", 0.0, -2.0, 2.0)  # fmt: skip
    fields["frequency_penalty"] = Field("frequency_penalty", "number", "Subtracted from a generated token's logit "
                                        "once per time it was generated.", 0.0, -2.0, 2.0)  # fmt: skip
    if chat:
        fields["max_completion_tokens"] = dataclasses.replace(fields["max_tokens"], name="max_completion_tokens")
        fields["logprobs"] = Field("logprobs", "boolean", "Return each token's log-probability.", False)
        fields["top_logprobs"] = Field("top_logprobs", "integer", "Alternatives per token (with logprobs: true; "
                                       "ignored without).", 0, 0, 5)  # fmt: skip
    else:
        fields["echo"] = Field("echo", "boolean", "Answer with the prompt before the text.", False)
        fields["logprobs"] = Field("logprobs", "integer", "Log-probabilities: of each token and this many "
                                   "alternatives.", None, 0, 5)  # fmt: skip
    return fields


def parse_openai(body: object, limits: Limits, chat: bool) -> OpenAIRequest:
    """A completions or chat request's values, or a 422 (answered 400) naming the field. Unknown
    top-level fields are ignored: OpenAI clients send extras (extra_body, newer options)."""
    if not isinstance(body, dict):
        raise ApiError(422, f"body must be a JSON object, got {_json_type(body)}")
    for name, (refused, why) in UNSUPPORTED.items():
        if refused(body.get(name)):
            raise ApiError(422, why, param=name)
    if not isinstance(body.get("model", ""), str):
        raise ApiError(422, f"model must be a string, got {_json_type(body['model'])}", param="model")
    fields = openai_fields(limits, chat)
    v = {name: f.check(body.get(name)) for name, f in fields.items()}
    options = body.get("stream_options")
    if options is not None and not (
        isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)
    ):
        raise ApiError(422, "stream_options must be an object with include_usage true or false", param="stream_options")
    max_tokens = (
        v["max_completion_tokens"] if chat and body.get("max_completion_tokens") is not None else v["max_tokens"]
    )
    logprobs = (v["top_logprobs"] if v["logprobs"] else None) if chat else v["logprobs"]
    params = engine.SamplingParams(max_tokens, v["temperature"], v["top_p"], v["top_k"], v["seed"], v["stop"],
                                   v["ignore_eos"], v["presence_penalty"], v["frequency_penalty"],
                                   logprobs)  # fmt: skip
    prompt = _messages(body.get("messages")) if chat else _completion_prompt(body.get("prompt"))
    usage = bool((options or {}).get("include_usage", False))
    return OpenAIRequest(prompt, params, v["stream"], usage, False if chat else v["echo"])


def _completion_prompt(value: object) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # a list of one prompt, as SDKs may send
    if not isinstance(value, str) or not value:
        raise ApiError(
            422, f"prompt must be a non-empty string (or a list of one), got {_shown(value)}", param="prompt"
        )
    return _unicode(value, "prompt")


def _messages(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(422, f"messages must be a non-empty array of {{role, content}}, got {_shown(value)}",
                       param="messages")  # fmt: skip
    return [_message(i, message) for i, message in enumerate(value)]


def _message(i: int, message: object) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ApiError(422, f"{where} must be an object with role and content, got {_shown(message)}", param=where)
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ApiError(422, f"{where}.role must be one of {', '.join(ROLES)}, got {_shown(role)}", param=where)
    if isinstance(content, list):
        content = "\n".join(_text_part(f"{where}.content[{j}]", part) for j, part in enumerate(content))
    if not isinstance(content, str):
        raise ApiError(422, f"{where}.content must be a string or a list of text parts, got {_shown(content)}",
                       param=where)  # fmt: skip
    return {"role": "system" if role == "developer" else role, "content": _unicode(content, f"{where}.content")}


def _text_part(where: str, part: object) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise ApiError(422, f'{where} must be {{"type": "text", "text": "..."}}, got {_shown(part)}', param=where)
    return str(part["text"])


@dataclass
class OpenAIAnswer:
    """Renders one generation in OpenAI's shapes: the whole completion or chat object, or its
    stream of chunks. One instance per request (the id and `created` are shared by its chunks)."""

    request: OpenAIRequest
    model: str
    chat: bool
    prompt_text: str = ""  # completions with echo: the prompt, as sent
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.prompt_text = self.request.prompt if isinstance(self.request.prompt, str) else ""

    def whole(self, deltas: list[engine.Delta], result: engine.Result) -> dict[str, Any]:
        text = (self.prompt_text if self.request.echo else "") + result.text
        logprobs = self._logprobs([lp for d in deltas for lp in d.logprobs])
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": logprobs,
            "finish_reason": OPENAI_FINISH[result.finish_reason],
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        return {**self._head(""), "choices": [choice], "usage": usage(result)}

    def chunk(self, delta: engine.Delta, first: bool) -> dict[str, Any]:
        text = (self.prompt_text if first and self.request.echo else "") + delta.text
        logprobs = self._logprobs(list(delta.logprobs))
        if self.chat:
            content = {"role": "assistant", "content": text} if first else {"content": text}
            return {**self._head(".chunk"), "choices": [{"index": 0, "delta": content, "logprobs": logprobs,
                                                          "finish_reason": None}]}  # fmt: skip
        return {**self._head(""), "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None}]}

    def last(self, result: engine.Result) -> list[dict[str, Any]]:
        """The chunk with the finish reason, and with include_usage one more with the usage."""
        reason = OPENAI_FINISH[result.finish_reason]
        end = {"index": 0, "delta": {}, "logprobs": None} if self.chat else {"index": 0, "text": "", "logprobs": None}
        chunks = [{**self._head(".chunk" if self.chat else ""), "choices": [{**end, "finish_reason": reason}]}]
        if self.request.include_usage:
            chunks.append({**self._head(".chunk" if self.chat else ""), "choices": [], "usage": usage(result)})
        return chunks

    def _head(self, kind: str) -> dict[str, Any]:
        name = ("chat.completion" + kind) if self.chat else "text_completion"
        return {"id": self.id, "object": name, "created": self.created, "model": self.model}

    def _logprobs(self, tokens: list[engine.TokenLogprob]) -> dict[str, Any] | None:
        if self.request.params.logprobs is None:
            return None
        if self.chat:
            content = [{**_token(t.token, t.logprob), "top_logprobs": [_token(*alt) for alt in t.top]} for t in tokens]
            return {"content": content, "refusal": None}
        start = len(self.prompt_text) if self.request.echo else 0
        offsets = list(itertools.accumulate((len(t.token) for t in tokens), initial=start))[:-1]
        top = [dict(t.top) | {t.token: t.logprob} for t in tokens]
        return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": top, "text_offset": offsets}  # fmt: skip


def _token(token: str, logprob: float) -> dict[str, Any]:
    """A chat logprobs entry: the token's text, its log-probability, and its UTF-8 bytes."""
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}


def usage(result: engine.Result) -> dict[str, Any]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.tokens,
            "total_tokens": result.prompt_tokens + result.tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}  # fmt: skip


@dataclass
class OpenAIStream:
    """The ASGI answer of a streaming OpenAI request: `data: {chunk}` lines, then `data: [DONE]`
    (a failure after the stream began: `data: {"error": ...}` instead, which the SDKs raise)."""

    job: Generation
    answer: OpenAIAnswer
    stream: EventStream = field(init=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stream, first = EventStream(self.job), True

        async def render(events: Events) -> None:
            nonlocal first
            while True:
                with anyio.move_on_after(KEEPALIVE_SECONDS) as idle:
                    event = await events.receive()
                if idle.cancelled_caught:
                    await self.stream.write(send, b": waiting\n\n")
                elif isinstance(event, engine.Delta):
                    await self.stream.write(send, data(self.answer.chunk(event, first)))
                    first = False
                else:
                    return await self.finish(send, event, first)

        await self.job.serve(render)

    async def finish(self, send: Send, last: engine.Result | Exception, first: bool) -> None:
        if isinstance(last, Exception) and not self.stream.begun:
            raise last
        failure = last if isinstance(last, Exception) else self.stream.drained(last)
        if failure is not None or isinstance(last, Exception):
            if not isinstance(failure, ApiError):
                log.error("generation failed mid-stream", exc_info=failure)
            message = failure.detail if isinstance(failure, ApiError) else "internal server error"
            error = {"message": message, "type": "server_error", "param": None, "code": None}
            return await self.stream.write(send, data({"error": error}), more=False)
        if first and self.answer.chat:  # nothing was generated: the role still opens a chat stream
            await self.stream.write(send, data(self.answer.chunk(engine.Delta([], "", 0), first=True)))
        body = b"".join(data(chunk) for chunk in self.answer.last(last)) + b"data: [DONE]\n\n"
        await self.stream.write(send, body, more=False)


def data(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


async def openai_generation(request: Request, chat: bool) -> Response | OpenAIStream:
    settings: Settings = request.app.state.settings
    refuse_early(request)
    body = await read_json(request, settings.limits.max_body_bytes, settings.body_timeout)
    parsed = parse_openai(body, settings.limits, chat)
    answer = OpenAIAnswer(parsed, settings.served_model, chat)
    job = Generation(request, parsed.prompt, parsed.params, parsed.stream)
    if parsed.stream:
        return OpenAIStream(job, answer)
    deltas, result = await job.serve(all_events)
    return JSONResponse(answer.whole(deltas, result), headers=Timing(result, job.arrived).headers())


async def completions(request: Request) -> Response | OpenAIStream:
    return await openai_generation(request, chat=False)


async def chat_completions(request: Request) -> Response | OpenAIStream:
    return await openai_generation(request, chat=True)


async def models(request: Request) -> JSONResponse:
    """The one served model. Requests may name any model: this one answers (as llama-server does),
    and says so in each answer's `model`."""
    settings: Settings = request.app.state.settings
    served = {"id": settings.served_model, "object": "model", "created": STARTED, "owned_by": SERVICE}
    return JSONResponse({"object": "list", "data": [served]})


OPENAI_STATUSES = {
    400: "A field is missing, of the wrong type, out of range or not supported (named in `param`); the body "
         "is not JSON; or the prompt does not fit.",
    401: "Missing, doubled or invalid key (x-api-key, or Authorization: Bearer).",
    408: "The body did not arrive within BODY_TIMEOUT seconds.",
    413: "Body larger than MAX_BODY_BYTES.",
    415: "Content-Type is not application/json.",
    503: "Model unavailable, at capacity, no place within QUEUE_TIMEOUT, or shutting down; see Retry-After.",
}  # fmt: skip


def openai_paths(settings: Settings) -> dict[str, Any]:
    def operation(summary: str, response: str, body: str | None, statuses: dict[int, str]) -> dict[str, Any]:
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}
        ok: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}}}
        if body is not None:  # "stream": true answers with chunks
            event = {"type": "object", "required": ["data"], "properties": {
                "event": {"const": "message"}, "data": {"type": "string", "description": OPENAI_STREAM}}}  # fmt: skip
            ok["text/event-stream"] = {"schema": event}  # before OpenAPI 3.2, `schema` is one event
        responses = {"200": {"description": "OK", "content": ok}}
        responses |= {str(code): {"description": text, "content": error} for code, text in statuses.items()}
        op = {"summary": summary, "security": [{"apiKey": []}, {"bearer": []}], "responses": responses}
        if body is not None:
            schema = {"$ref": f"#/components/schemas/{body}"}
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        return op

    return {
        "/v1/models": {"get": operation("The served model (OpenAI's model list)", "ModelList", None,
                                        {401: OPENAI_STATUSES[401]})},
        "/v1/completions": {"post": operation("Continue a prompt (OpenAI's completions)", "Completion",
                                              "CompletionRequest", OPENAI_STATUSES)},
        "/v1/chat/completions": {"post": operation("Answer a conversation (OpenAI's chat completions)",
                                                   "ChatCompletion", "ChatCompletionRequest", OPENAI_STATUSES)},
    }  # fmt: skip


OPENAI_STREAM = (
    'With "stream": true: `data: {chunk}` lines (text_completion or chat.completion.chunk objects; the first chat '
    "chunk carries delta.role), a last chunk with finish_reason, with stream_options.include_usage one more with "
    '"usage" and "choices": [], then `data: [DONE]`. A failure after the stream began: `data: {"error": ...}`.'
)


def openai_schemas(limits: Limits) -> dict[str, Any]:
    def request(chat: bool) -> dict[str, Any]:
        props = {name: f.schema() for name, f in openai_fields(limits, chat).items()}
        text = {"type": "string", "minLength": 1}
        if chat:
            part = {"type": "object", "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}  # fmt: skip
            content = {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}
            message = {"type": "object", "required": ["role", "content"],
                       "properties": {"role": {"enum": list(ROLES)}, "content": content}}  # fmt: skip
            props["messages"] = {"type": "array", "minItems": 1, "items": message, "description": "The conversation, "
                                 "rendered by the model's own chat template; the answer continues it."}  # fmt: skip
        else:
            props["prompt"] = {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}],
                               "description": "Text to continue (a list of one text is accepted)."}  # fmt: skip
        props["model"] = {"type": "string", "description": "Any name: the one served model answers."}
        props["n"] = {"enum": [1, None], "description": "Choices: one (others get a 400)."}
        props["stream_options"] = {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}}
        description = "Unknown fields are ignored (OpenAI clients send extras); unsupported ones get a 400."
        return {"type": "object", "required": ["messages" if chat else "prompt"], "properties": props,
                "description": description}  # fmt: skip

    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    cached = {"type": "object", "properties": {"cached_tokens": {"type": "integer",
              "description": "Prompt tokens whose keys and values came from the prefix cache."}}}  # fmt: skip
    usage = {"type": "object", "required": list(counts),
             "properties": {**{k: {"type": "integer"} for k in counts}, "prompt_tokens_details": cached}}  # fmt: skip
    finish = {"enum": sorted(set(OPENAI_FINISH.values()))}

    def answer(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
            "id": {"type": "string"}, "object": {"const": kind}, "created": {"type": "integer"},
            "model": {"type": "string"}, "usage": usage,
            "choices": {"type": "array",
                        "items": {"type": "object", "properties": {**choice, "finish_reason": finish}}}}}  # fmt: skip

    message = {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}
    error = {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}  # fmt: skip
    model = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
        "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
        "owned_by": {"type": "string"}}}  # fmt: skip
    return {
        "CompletionRequest": request(chat=False),
        "ChatCompletionRequest": request(chat=True),
        "Completion": answer("text_completion", {"text": {"type": "string"}}),
        "ChatCompletion": answer("chat.completion", {"message": message}),
        "ModelList": {"type": "object", "required": ["object", "data"],
                      "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": model}}},
        "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": error}},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Routes


def model_state(lazy: engine.LazyEngine) -> tuple[str, str]:
    """The model's state for /health and /ready: loaded, loading, failed (and why), or not loaded."""
    running, failure = lazy.loaded, lazy.failure()
    if running is not None and running.running:
        return "loaded", "the model is loaded"
    if lazy.loading:
        return "loading", "the model is loading"
    if failure is not None:
        reason, retry_in = failure
        return "failed", f"loading the model failed: {reason[:300]}; the next request after {retry_in} s tries again"
    return "not loaded", "model not loaded yet (it loads on the first /generate, or at start with LOAD_ON_START=1)"


async def health(request: Request) -> JSONResponse:
    """Liveness: 200 whenever the process answers. A model that cannot load shows in the body
    (point readiness probes at /ready), not as a failing liveness check that restarts the pod."""
    settings: Settings = request.app.state.settings
    running = request.app.state.engine.loaded
    state, detail = model_state(request.app.state.engine)
    body = {"status": "ok", "service": SERVICE, "model": settings.model.name, "model_loaded": state == "loaded",
            "model_state": state, "active_sequences": running.active if running else 0}  # fmt: skip
    if running:
        body["model_family"] = running.loaded.family
    if state == "failed":
        body["model_error"] = detail
    return JSONResponse(body)


async def ready(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    if runtime.draining:
        raise ApiError(503, "shutting down")
    state, detail = model_state(request.app.state.engine)
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
    refuse_early(request)
    body = await read_json(request, settings.limits.max_body_bytes, settings.body_timeout)
    parsed = parse_generate(body, settings.limits)
    if settings.log_prompts:
        request.state.prompt = parsed.prompt
    job = Generation(request, parsed.prompt, parsed.params, parsed.stream)
    if parsed.stream:
        return EventStream(job)
    _, result = await job.serve(all_events)
    return JSONResponse(answer(parsed.prompt, result), headers=Timing(result, job.arrived).headers())


async def metrics(request: Request) -> Response:
    state = request.app.state
    text = render_metrics(state.metrics, state.settings, state.runtime, state.engine)
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
                await error_response(500, "internal server error", path=scope["path"])(scope, receive, send_with_id)
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
    # Written as bytes on the transport: this answer goes out before any request (and so any ASGI
    # response object) exists.
    busy = json.dumps(error_body(f"too many open connections (MAX_CONNECTIONS={max_connections})")).encode()
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
            self.transport = cast(asyncio.Transport, WholeWrites(transport, self.loop))  # requests' cycles write here
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


class WholeWrites:
    """A connection's transport that sends what is written in one turn of the event loop as one
    write. uvicorn writes an answer's head, body and end apart, and the engine thread can take
    the interpreter between them; a replica killed there (kill -9, the OOM killer) has sent a
    head without its body, which a proxy cannot use and, having passed it on, cannot replay
    elsewhere either (deploy/haproxy.cfg's retries). In one write, a plain answer that fits the
    socket's buffer is sent whole or not at all. A stream's events are each their own turn, so
    nothing waits for a later one; past WRITE_THROUGH bytes a turn's writes go at once, so the
    transport's flow control still sees them."""

    WRITE_THROUGH = 64 * 1024

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.inner, self.loop, self.pending, self.size = transport, loop, list[bytes](), 0

    def write(self, data: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(data)
        self.size += len(data)
        if self.size >= self.WRITE_THROUGH:
            self.flush()

    def writelines(self, lines: Iterable[bytes]) -> None:
        self.write(b"".join(lines))

    def flush(self) -> None:
        data, self.pending, self.size = b"".join(self.pending), [], 0
        if data and not self.inner.is_closing():
            self.inner.write(data)

    def write_eof(self) -> None:
        self.flush()
        self.inner.write_eof()

    def close(self) -> None:
        self.flush()
        self.inner.close()

    def abort(self) -> None:
        self.pending, self.size = [], 0
        self.inner.abort()

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size() + self.size

    def __getattr__(self, name: str) -> Any:  # the rest (is_closing, resume_reading...) is the transport's own
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------
# The application


def create_app(settings: Settings | None = None, lazy: engine.LazyEngine = engine.ENGINE) -> Starlette:
    """The app. Routes reach the engine (the card's one module-level lazy engine, or a test's
    own) through `app.state.engine` only."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.runtime = Runtime(anyio.CapacityLimiter(settings.model.max_batch))
        lazy.configure(settings.model, observe=app.state.metrics.observe_step)
        if settings.load_on_start:  # a plain thread: start-up is not held up, /health answers at once
            threading.Thread(target=_preload, args=(lazy,), name="preload", daemon=True).start()
        yield
        await anyio.to_thread.run_sync(lazy.close)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    handlers = {ApiError: on_api_error, HTTPException: on_http_error}  # other errors: RequestLog
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.settings, app.state.engine = settings, lazy
    app.state.docs_page = DocsPage.load()
    app.state.metrics = Metrics()
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys, refuse=refusal, bearer_prefix=OPENAI)
    if settings.allowed_hosts:  # a browser tricked by DNS rebinding sends a foreign Host: refuse it
        hosts = [host.strip() for host in settings.allowed_hosts.split(",") if host.strip()]
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    app.add_middleware(RequestLog, metrics=app.state.metrics)  # outermost, so 401s are logged and counted
    return app


def _preload(lazy: engine.LazyEngine) -> None:
    # A failure is logged by the engine; /ready stays 503 and a later request tries again.
    with contextlib.suppress(engine.EngineUnavailable):
        lazy.get()


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
            self.app.state.engine.drain(time.monotonic() + self.drain_timeout)
        super().handle_exit(sig, frame)
        if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
            # uvicorn re-raises caught signals once it has shut down, so the process would die of
            # SIGTERM (status 143), or print a KeyboardInterrupt traceback on Ctrl+C; a drain that
            # completed is a clean exit, status 0.
            self._captured_signals.remove(sig)


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
