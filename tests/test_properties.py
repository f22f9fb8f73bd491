"""Unit, property-based: arbitrary JSON for every /generate field never gives anything but a
clean 4xx or valid sampling parameters, and every accepted parameter set can be sampled."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from server import FIELDS, ApiError, Limits, error_response, openai_fields, parse_generate, parse_openai

LIMITS = Limits()

# Every Unicode code point, surrogates and control characters included: JSON can carry them all.
ANY_CHAR = st.characters(codec=None, categories=None)
TEXT = st.text(ANY_CHAR, max_size=20)
NUMBERS = st.one_of(
    st.integers(),  # unbounded: 10**400 too
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-300, max_value=1e-300),  # subnormals
    st.sampled_from([0, 1, 0.0, 1.0, 2.0, 199.0, 5e-324, 0.005, 2**63 - 1, 2**63, -0.0]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


def nested(depth: int, kind: str, leaf: object) -> object:
    """`leaf` inside `depth` lists or objects: hundreds deep parses; ~1,000 is about where
    json.loads itself gives up (a 400), and quoting such a value once overflowed the stack (a 500)."""
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


DEEP = st.builds(nested, st.integers(100, 1100), st.sampled_from(["list", "dict"]), SCALARS)
VALUES = st.one_of(JSON_VALUES, JSON_VALUES, JSON_VALUES, DEEP)  # deep nesting in a quarter of the fields


@st.composite
def bodies(draw: st.DrawFn, names: tuple[str, ...] = FIELDS) -> object:
    """Mostly objects with some of the real fields (any values, deep nesting too) and perhaps odd
    extra names; sometimes any JSON at all, deep nesting at the top included."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(JSON_VALUES, DEEP))
    body: dict[str, Any] = {name: draw(VALUES) for name in draw(st.sets(st.sampled_from(names)))}
    if draw(st.booleans()):
        body["prompt"] = draw(st.text(ANY_CHAR, min_size=1, max_size=40))
    if draw(st.integers(0, 4)) == 0:
        body[draw(TEXT)] = draw(JSON_VALUES)
    return body


def check_error(exc: ApiError) -> None:
    assert 400 <= exc.status < 500
    response = error_response(exc.status, exc.detail, exc.headers)
    assert json.loads(response.body)["detail"]  # encodable, whatever the input quoted


def check_params(prompt: str, params: engine.SamplingParams) -> None:
    prompt.encode("utf-8")  # a prompt that passed can always be encoded
    assert 1 <= params.max_new_tokens <= LIMITS.max_new_tokens
    assert params.temperature == 0 or LIMITS.min_temperature <= params.temperature <= LIMITS.max_temperature
    assert 0 < params.top_p <= 1
    assert 0 <= params.top_k <= LIMITS.max_top_k
    assert params.seed is None or 0 <= params.seed <= LIMITS.max_seed
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in (params.max_new_tokens, params.top_k))
    assert len(params.stop) <= LIMITS.max_stop_count


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_any_body_is_a_clean_4xx_or_valid_parameters(body: object) -> None:
    try:
        request = parse_generate(body, LIMITS)
    except ApiError as exc:
        check_error(exc)
    else:
        check_params(request.prompt, request.params)
        assert isinstance(request.stream, bool)


OPENAI_NAMES = tuple(
    sorted(
        {
            *openai_fields(LIMITS, chat=True),
            *openai_fields(LIMITS, chat=False),
            "messages",
            "model",
            "n",
            "best_of",
            "stream_options",
            "tools",
            "response_format",
            "user",
        }
    )
)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]),
                           "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                               {"type": st.sampled_from(["text", "image_url"]), "text": VALUES})), VALUES)}),
    max_size=3,
)  # fmt: skip


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies(OPENAI_NAMES), st.booleans(), MESSAGES)
def test_any_openai_body_is_a_clean_4xx_or_valid_parameters(body: object, chat: bool, messages: list) -> None:
    if isinstance(body, dict) and chat and "messages" not in body:
        body["messages"] = messages
    try:
        request = parse_openai(body, LIMITS, chat)
    except ApiError as exc:
        check_error(exc)
        assert exc.param is None or isinstance(exc.param, str)
    else:
        prompt = request.prompt if isinstance(request.prompt, str) else json.dumps(request.prompt)
        check_params(prompt, request.params)
        assert -2 <= request.params.presence_penalty <= 2 and -2 <= request.params.frequency_penalty <= 2
        assert request.params.logprobs is None or 0 <= request.params.logprobs <= 5


def test_a_value_nested_a_thousand_deep_is_quoted_in_a_422_not_a_500() -> None:
    """In the server the stack is already deep when the message is built (middleware, routes), so
    json.dumps of a ~968-deep list overflowed it; a low recursion limit stands in for that here."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        for field in ("seed", "stop", "max_new_tokens", "temperature", "ignore_eos"):
            with pytest.raises(ApiError) as caught:
                parse_generate({"prompt": "a", field: nested(968, "list", 1)}, LIMITS)
            assert caught.value.status == 422 and field in caught.value.detail and "..." in caught.value.detail
    finally:
        sys.setrecursionlimit(limit)


@st.composite
def accepted_params(draw: st.DrawFn) -> engine.SamplingParams:
    temperature = draw(st.one_of(st.just(0.0), st.floats(LIMITS.min_temperature, LIMITS.max_temperature)))
    top_p = draw(st.one_of(st.floats(5e-324, 1.0), st.sampled_from([5e-324, 1e-45, 1.0])))
    top_k = draw(st.integers(0, LIMITS.max_top_k))
    body = {"prompt": "p", "temperature": temperature, "top_p": top_p, "top_k": top_k}
    return parse_generate(body, LIMITS).params


@settings(max_examples=500, deadline=None)
@given(accepted_params(), st.integers(0, 2**32), st.sampled_from(["normal", "flat", "peaked", "tiny"]))
def test_every_accepted_sampling_setting_samples(params: engine.SamplingParams, seed: int, shape: str) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = {
        "normal": torch.randn(300, generator=generator) * 5,
        "flat": torch.zeros(300),
        "peaked": torch.full((300,), -1e4).index_fill(0, torch.tensor([7]), 1e4),
        "tiny": torch.randn(300, generator=generator) * 1e-30,
    }[shape]
    if params.temperature == 0:
        return  # greedy: the engine takes the argmax without sampling
    token = engine.sample(logits, params, generator)
    assert 0 <= token < 300
