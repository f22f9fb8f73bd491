"""End-to-end: real OpenAI clients, unchanged, against the real server process. The official
`openai` SDK (sync and async) and LangChain's `ChatOpenAI`, with only base_url and api_key set."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import KEY, Server, run_server

pytestmark = pytest.mark.e2e
SERVED = "smollm2-test"
QUESTION = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MODEL_NAME": str(smollm2_dir), "SERVED_MODEL_NAME": SERVED, "LOAD_ON_START": "1"}
    with run_server(tmp_path_factory.mktemp("openai"), **env) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def assert_nothing_extra(obj: Any) -> None:
    """Every object the SDK parsed holds only fields the OpenAI API defines (nothing in model_extra)."""
    if isinstance(obj, BaseModel):
        assert not obj.model_extra, f"{type(obj).__name__} got fields OpenAI does not send: {obj.model_extra}"
        for name in type(obj).model_fields:
            assert_nothing_extra(getattr(obj, name))
    elif isinstance(obj, list):
        for item in obj:
            assert_nothing_extra(item)


def test_the_model_list_names_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED]
    assert models.data[0].object == "model" and models.data[0].owned_by and models.data[0].created > 0
    assert_nothing_extra(models)


def test_chat_answers_with_usage(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=24)  # type: ignore[arg-type]
    assert_nothing_extra(answer)
    choice = answer.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion" and answer.model == SERVED
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_shared_system_prompt_is_computed_once_and_counted_as_cached(server: Server, client: openai.OpenAI) -> None:
    """Turns that repeat a long system prompt: from the second on, its whole blocks come from the
    prefix cache, which `usage.prompt_tokens_details.cached_tokens` and /metrics report."""
    from tests.test_metrics import scrape

    system = {"role": "system", "content": "You answer questions about the harbour town of Port Ellen. " * 12}
    before = scrape(server.url)
    cached = []
    for question in ("Who keeps the lighthouse?", "When does the ferry leave?", "Is there a bakery?"):
        messages = [system, {"role": "user", "content": question}]
        answer = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
        cached.append(answer.usage.prompt_tokens_details.cached_tokens or 0)
    after = scrape(server.url)
    assert cached[0] == 0 and min(cached[1:]) >= 128  # the system prompt is ~130 tokens: 8+ blocks of 16
    assert after.value("llm_prompt_cached_tokens_total") - before.value("llm_prompt_cached_tokens_total") == sum(cached)
    assert after.value("llm_prefix_cache_hits_total") - before.value("llm_prefix_cache_hits_total") == 2
    assert 0 < after.value("llm_prefix_cache_blocks") <= after.value("llm_prefix_cache_capacity_blocks")


def test_a_stream_adds_up_to_the_whole_answer_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=24)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=24, stream=True,  # type: ignore[arg-type]
                                                 stream_options={"include_usage": True}))  # fmt: skip
    for chunk in chunks:
        assert_nothing_extra(chunk)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    *_, last, usage = chunks
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_the_async_client_chats_too(server: Server) -> None:
    async def chat() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        answers = await asyncio.gather(*[client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": f"Say the number {n}."}], max_tokens=8)
            for n in range(3)])  # fmt: skip
        await client.close()
        return [a.choices[0].message.content or "" for a in answers]

    assert all(asyncio.run(chat()))


def test_completions_with_stop_echo_and_logprobs(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=SERVED, prompt="The capital of France is", max_tokens=8)
    assert_nothing_extra(plain)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-") and "Paris" in plain.choices[0].text
    stopped = client.completions.create(model=SERVED, prompt="The capital of France is", max_tokens=8, stop=["."])
    assert stopped.choices[0].text == plain.choices[0].text.split(".")[0] and stopped.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model=SERVED, prompt="The capital of France is", max_tokens=4, echo=True,
                                       logprobs=2)  # fmt: skip
    assert_nothing_extra(echoed)
    assert echoed.choices[0].text.startswith("The capital of France is")
    logprobs = echoed.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(len(top) >= 2 for top in logprobs.top_logprobs)


def test_chat_logprobs_name_each_token_and_its_alternatives(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=6, logprobs=True,  # type: ignore[arg-type]
                                            top_logprobs=3)  # fmt: skip
    assert_nothing_extra(answer)
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and "".join(t.token for t in content) == answer.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_the_same_seed_samples_the_same_text(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=16, temperature=1.0,  # type: ignore[arg-type]
                                                seed=seed)  # fmt: skip
        return answer.choices[0].message.content or ""

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_each_error_is_the_sdks_typed_exception(server: Server, client: openai.OpenAI) -> None:
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=SERVED, messages=QUESTION, temperature=5)  # type: ignore[arg-type]
    assert bad.value.param == "temperature" and "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=SERVED, messages=QUESTION, n=2)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=SERVED, messages=QUESTION, tools=[{"type": "function", "function": {  # type: ignore[arg-type]
            "name": "f", "parameters": {}}}])  # fmt: skip
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.content\[0\]"):
        client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}, {  # type: ignore[arg-type]
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        client.get("/nowhere", cast_to=httpx.Response)


def test_extra_fields_are_ignored_and_any_model_name_is_answered_by_the_served_one(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, max_tokens=4, user="u-1",  # type: ignore[arg-type]
                                            extra_body={"repetition_penalty": 1.1, "min_p": 0.1})  # fmt: skip
    assert answer.model == SERVED


def test_langchain_chat_openai_invokes_and_streams(server: Server) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=server.url + "/v1", api_key=KEY, model=SERVED, max_tokens=16, temperature=0,  # type: ignore[arg-type]
                      max_retries=0)  # fmt: skip
    answer = chat.invoke([("system", "Answer in one short sentence."), ("user", "What is the capital of France?")])
    assert "Paris" in str(answer.content)
    pieces = [str(chunk.content) for chunk in chat.stream("What is the capital of France?")]
    assert len(pieces) > 2 and "".join(pieces).strip()


def test_a_model_without_a_chat_template_chats_through_the_plain_fallback(gpt2_dir: Path, tmp_path: Path) -> None:
    env = {"MODEL_NAME": str(gpt2_dir), "LOAD_ON_START": "1", "MAX_BATCH_SIZE": "1", "MAX_QUEUE": "0"}
    with run_server(tmp_path, **env) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        answer = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=5)  # type: ignore[arg-type]
        assert answer.usage is not None and answer.usage.completion_tokens == 5
        assert answer.model == str(gpt2_dir)  # SERVED_MODEL_NAME unset: MODEL_NAME
        # At capacity (one running, no queue), the next one is OpenAI's 503 with Retry-After.
        holder = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=200, stream=True,  # type: ignore[arg-type]
                                                extra_body={"ignore_eos": True})  # fmt: skip
        next(iter(holder))
        with pytest.raises(openai.InternalServerError) as busy:
            client.chat.completions.create(model="any", messages=QUESTION, max_tokens=5)  # type: ignore[arg-type]
        assert busy.value.status_code == 503 and busy.value.response.headers["retry-after"] == "1"
        assert "at capacity" in busy.value.message
        holder.close()
