"""Unit, property-based: arbitrary JSON for every /generate field never gives anything but a
clean 4xx or valid sampling parameters, and every accepted parameter set can be sampled."""

from __future__ import annotations

import json
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from server import FIELDS, ApiError, Limits, error_response, parse_generate

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


@st.composite
def bodies(draw: st.DrawFn) -> object:
    """Mostly objects with some of the real fields (any values) and perhaps odd extra names."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    body: dict[str, Any] = {name: draw(JSON_VALUES) for name in draw(st.sets(st.sampled_from(FIELDS)))}
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
