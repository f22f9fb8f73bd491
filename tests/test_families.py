"""Integration: every model family the engine runs, each as a tiny random-weight checkpoint built
from its own transformers config class (the real family's head to KV-head ratio, rope settings
and quirks), saved with the offline SmolLM2's tokenizer and loaded the way the service loads a
model (engine.create_engine on the directory). Greedy tokens must equal transformers' own
generate() exactly with QUANTIZE=none in float32: prompts prefilled whole and in chunks, alone
and in a staggered batch; bfloat16 and int8 logits must stay close."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from starlette.testclient import TestClient

import engine
import model
import server
from engine import Engine, SamplingParams
from tests.conftest import KEY
from tests.test_engine_model import PROMPTS, open_engine, run_staggered

pytestmark = pytest.mark.integration

WINDOW = 24  # sliding windows this short, so prompts and their continuations reach past them
SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "max_position_embeddings": 512}
# Llama 3.x: its own scaling, with the original context cut so the scaled wavelengths fall inside
# a 16-wide head (at 8192, all of a small head's frequencies would be left as they are).
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0 + i / 8 for i in range(8)],
    "long_factor": [2.0 + i for i in range(8)],
}
GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
}

# name: (config class, its settings beyond SIZE, the model type the service reports)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    # Llama 3.2 1B: 32 query heads to 8 key heads
    "llama3": (
        "LlamaConfig",
        {"num_attention_heads": 8, "num_key_value_heads": 2, "rope_parameters": LLAMA3, "tie_word_embeddings": True},
        "llama",
    ),
    # dynamic (NTK) scaling: the plain rope up to max_position_embeddings, as transformers computes it
    "llama-dynamic": (
        "LlamaConfig",
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 96,
            "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
        },
        "llama",
    ),
    # Qwen2.5 0.5B: 14 to 2 heads, biases on q/k/v, tied head, no sliding window (as released)
    "qwen2": (
        "Qwen2Config",
        {
            "hidden_size": 112,
            "num_attention_heads": 7,
            "num_key_value_heads": 1,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
        "qwen2",
    ),
    # Qwen2 with its sliding window on past max_window_layers: layers 1 and 2 slide, layer 0 does not
    "qwen2-window": (
        "Qwen2Config",
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
        },
        "qwen2",
    ),
    # Qwen3 0.6B: 16 to 8 heads, head_dim 128 apart from hidden / heads, q/k norms, untied head;
    # the YaRN scaling its model card gives for long contexts (a static one, with attention_factor)
    "qwen3": (
        "Qwen3Config",
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "rope_theta": 1e6,
            },
        },
        "qwen3",
    ),
    # Mistral 7B v0.1: 32 to 8 heads, a sliding window shorter than the served context
    "mistral": (
        "MistralConfig",
        {"num_attention_heads": 4, "num_key_value_heads": 1, "sliding_window": WINDOW},
        "mistral",
    ),
    # Phi-3.5 mini: 32 heads, no grouping, fused qkv and gate_up, longrope, a sliding window
    "phi3": (
        "Phi3Config",
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "sliding_window": WINDOW,
            "original_max_position_embeddings": 128,
            "rope_parameters": LONGROPE,
        },
        "phi3",
    ),
    # Gemma 2 2B: 8 to 4 heads, query_pre_attn_scalar apart from head_dim; caps low enough to bite
    # at this size (the released 50 and 30 barely touch a random model's small scores)
    "gemma2": (
        "Gemma2Config",
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 2.0,
        },
        "gemma2",
    ),
    # Gemma 3 1B: 4 to 1 heads, q/k norms, sliding layers with their own rope, a linear-scaled global one
    "gemma3": (
        "Gemma3TextConfig",
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": WINDOW,
            "rope_parameters": GEMMA3_ROPE,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        },
        "gemma3_text",
    ),
}
# Each family's chat template, in its shape (the released tokenizers' turn markers; SmolLM2's
# tokenizer spells the markers it lacks as text, which is all a prompt needs).
LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
PHI3_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHAT_TEMPLATES = {"llama3": LLAMA3_CHAT, "llama-dynamic": LLAMA3_CHAT, "qwen2": CHATML, "qwen2-window": CHATML,
                  "qwen3": CHATML, "mistral": MISTRAL_CHAT, "phi3": PHI3_CHAT, "gemma2": GEMMA_CHAT,
                  "gemma3": GEMMA_CHAT}  # fmt: skip
CONVERSATION = [{"role": "user", "content": "A colour?"}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another?"}]  # fmt: skip
# The served context where it is not max_position_embeddings: longrope's short factors hold up to
# original_max_position_embeddings; dynamic scaling is the plain rope up to max_position_embeddings.
CONTEXT = {"phi3": 128, "llama-dynamic": 96}
# Each within a window, past one, and a prompt longer than a prefill chunk at once.
FAMILY_PROMPTS = [*PROMPTS[:3], "The history of the city is long. " * 5]
NEW_TOKENS = 16
CHUNK = 8  # engine.PREFILL_CHUNK when prompts are prefilled in chunks


def random_model(class_name: str, settings: dict[str, Any], tokenizer: Any, seed: int = 0) -> Any:
    """A transformers model of this config class at SIZE, with random weights."""
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": None}
    config = getattr(transformers, class_name)(vocab_size=len(tokenizer), **{**SIZE, **ids, **settings})
    torch.manual_seed(seed)
    network = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in network.parameters():
            # Norm weights and biases start at 1 or 0: moved, so a norm offset or a lost bias shows.
            param.add_(torch.randn_like(param) * (0.3 if param.ndim == 1 else 0.05))
    return network


def build(name: str, out: Path, tokenizer_dir: Path) -> Path:
    """Save family `name` as a random-weight checkpoint with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    class_name, settings, _ = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    # Its turn markers as special tokens, as the family's own tokenizer has them (one id each).
    markers = sorted(set(re.findall(r"<\|?[a-z_]+\|?>", CHAT_TEMPLATES[name])) - set(tokenizer.get_vocab()))
    tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    random_model(class_name, settings, tokenizer, seed=sum(map(ord, name))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass(frozen=True)
class Family:
    name: str  # a key of FAMILIES
    path: Path  # its saved checkpoint


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Family:
    return Family(request.param, build(request.param, tmp_path_factory.mktemp(request.param), smollm2_dir))


@pytest.fixture(scope="module")
def eng(family: Family) -> Iterator[Engine]:
    e = open_engine(family.path)
    yield e
    e.close()


@functools.cache
def reference(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@functools.cache
def reference_tokens(path: Path, prompt: str | tuple[int, ...], n: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy tokens after a prompt given as text or as token ids."""
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(path).encode(prompt) if isinstance(prompt, str) else prompt])
    out = reference(path).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return list(out[0, ids.shape[1] :].tolist())


def token_ids(eng: Engine, prompt: str, n: int = NEW_TOKENS) -> list[int]:
    """The engine's greedy tokens, as ids (texts could agree where ids do not)."""
    *deltas, _ = eng.stream(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
    return [i for d in deltas for i in d.token_ids]  # type: ignore[union-attr]


def logits(eng: Engine, ids: list[int], token: int) -> torch.Tensor:
    """The logits after the prompt `ids` (a prefill) and after `token` (a decode step) [2, V]:
    the same token for every engine compared, so a near tie cannot send them different ways."""
    table = list(range(len(ids) // model.KV_BLOCK + 1))  # room for the prompt and one more token
    with torch.inference_mode():
        first = eng.model.run(model.Work([table], [ids], [0], tuple(table)))[0]
        second = eng.model.run(model.Work([table], [[token]], [len(ids)]))[0]
    eng.model.clear()
    return torch.stack([first, second]).float()


def test_each_family_loads_as_its_own_type(eng: Engine, family: Family) -> None:
    assert eng.loaded.family == FAMILIES[family.name][2]


def test_greedy_tokens_equal_transformers(eng: Engine, family: Family) -> None:
    """Prompts prefilled in one piece; the last one and every continuation reach past WINDOW."""
    for prompt in FAMILY_PROMPTS:
        assert token_ids(eng, prompt) == reference_tokens(family.path, prompt), prompt


def test_greedy_tokens_equal_transformers_with_chunked_prefill(
    eng: Engine, family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts prefilled CHUNK tokens a step: later chunks attend to the cached ones through the
    prefill mask, windowed where the layer slides."""
    monkeypatch.setattr(engine, "PREFILL_CHUNK", CHUNK)
    for prompt in FAMILY_PROMPTS:
        assert token_ids(eng, prompt) == reference_tokens(family.path, prompt), prompt


def test_greedy_tokens_equal_transformers_in_a_staggered_batch(
    eng: Engine, family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight requests joining at different steps, long prompts in chunks while others decode: each
    row's text is that of transformers' tokens for its prompt alone."""
    monkeypatch.setattr(engine, "PREFILL_CHUNK", CHUNK)
    prompts = [*FAMILY_PROMPTS, *PROMPTS[3:7]]
    jobs = [(p, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)) for p in prompts]
    results = run_staggered(eng, jobs, gap=0.02)
    tokenizer = eng.loaded.tokenizer
    for prompt, result in zip(prompts, results, strict=True):
        assert result.text == tokenizer.decode(reference_tokens(family.path, prompt), skip_special_tokens=True), prompt


def test_greedy_tokens_equal_transformers_after_a_prefix_cache_hit(family: Family) -> None:
    """The long prompt's first blocks come from the prefix cache for the prompts that extend it
    (windows crossed inside the cached part and after it)."""
    shared = FAMILY_PROMPTS[-1]
    other = open_engine(family.path, prefix_cache_tokens=512)
    try:
        assert token_ids(other, shared) == reference_tokens(family.path, shared)
        for tail in (" Then", " And after that, the river"):
            assert token_ids(other, shared + tail) == reference_tokens(family.path, shared + tail), tail
        hit = other.generate(shared + " Then", SamplingParams(max_new_tokens=1)).cached_tokens
        assert hit >= model.PREFIX_BLOCK and hit % model.PREFIX_BLOCK == 0
    finally:
        other.close()


def filler(tokenizer: Any, tokens: int) -> str:
    """A prompt of exactly this many tokens."""
    text = "word" + " word" * (tokens - 1)
    assert len(tokenizer.encode(text)) == tokens
    return text


def test_greedy_tokens_equal_transformers_to_the_end_of_the_context(eng: Engine, family: Family) -> None:
    """Up to the context's last position (windows crossed many times over; Phi-3's longrope on its
    short factors, dynamic rope unscaled, as transformers has them there), and not one token more."""
    context = CONTEXT.get(family.name, SIZE["max_position_embeddings"])
    assert eng.loaded.max_context == context
    prompt = filler(eng.loaded.tokenizer, context - NEW_TOKENS)
    assert token_ids(eng, prompt) == reference_tokens(family.path, prompt)
    with pytest.raises(engine.PromptTooLong, match=f"context of {context}"):
        eng.generate(prompt, SamplingParams(max_new_tokens=NEW_TOKENS + 1))


def test_float32_logits_equal_transformers(eng: Engine, family: Family) -> None:
    """Logits themselves, not only their argmax: a softcap or a scale left out moves them while
    the greedy token may stay. After the prompt (a prefill) and one token more (a decode)."""
    for prompt in FAMILY_PROMPTS:
        ids = eng.loaded.tokenizer.encode(prompt)
        token = reference_tokens(family.path, prompt)[0]
        with torch.inference_mode():
            expected = reference(family.path)(torch.tensor([[*ids, token]])).logits[0, -2:]
        torch.testing.assert_close(logits(eng, ids, token), expected, atol=2e-4, rtol=1e-4)


def test_float32_logits_equal_transformers_for_prompts_and_a_decode_row_in_one_pass(
    eng: Engine, family: Family
) -> None:
    """Two prompts prefilled in one pass (one of them half), then one pass of the first's next
    token as a decode row, the other's second half (its start in the pool already) and every
    other prompt whole, the chunks' row padded: each sequence's logits are its own, so no token
    sees another sequence's keys or the padding (windows and capped scores included)."""
    prompts = [eng.loaded.tokenizer.encode(prompt) for prompt in FAMILY_PROMPTS]
    prompts[1], prompts[-1] = prompts[-1], prompts[1]  # the long one, split, second
    token = reference_tokens(family.path, FAMILY_PROMPTS[0], 1)[0]
    sizes = [model.blocks_for(len(ids) + 1) for ids in prompts]
    tables = [list(range(sum(sizes[:row]), sum(sizes[: row + 1]))) for row in range(len(prompts))]
    split = len(prompts[1]) // 2
    chunks = [[token], prompts[1][split:], *prompts[2:]]
    assert sum(map(len, chunks[1:])) % model.PREFILL_BUCKET  # so the chunks' row is padded
    with torch.inference_mode():
        eng.model.run(model.Work(tables[:2], [prompts[0], prompts[1][:split]], [0, 0], (*tables[0], *tables[1])))
        fresh = tuple(block for table in tables[2:] for block in table)
        rows = eng.model.run(model.Work(tables, chunks, [len(prompts[0]), split] + [0] * len(prompts[2:]), fresh))
        wholes = [prompts[0] + [token], *prompts[1:]]
        expected = [reference(family.path)(torch.tensor([ids])).logits[0, -1] for ids in wholes]
    eng.model.clear()
    torch.testing.assert_close(rows.float(), torch.stack(expected), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("dtype", "quantize"), [("bfloat16", "none"), ("float32", "int8")])
def test_bfloat16_and_int8_logits_stay_close(eng: Engine, family: Family, dtype: str, quantize: str) -> None:
    """Against float32's, after the prompt and one token more. Measured on these models: cosine
    0.9993 or more; the bar leaves room for other CPUs' rounding (a misplaced weight gives ~0)."""
    if quantize == "int8" and not model.int8_kernel():
        pytest.skip("this torch has no int8 weight kernel")
    other = open_engine(family.path, dtype=dtype, quantize=quantize)
    try:
        for prompt in FAMILY_PROMPTS:
            ids = eng.loaded.tokenizer.encode(prompt)
            token = reference_tokens(family.path, prompt)[0]
            similarity = F.cosine_similarity(logits(eng, ids, token), logits(other, ids, token), dim=-1)
            assert (similarity > 0.995).all(), (prompt, similarity)
    finally:
        other.close()


def test_the_chat_route_renders_the_familys_own_template(family: Family) -> None:
    """/v1/chat/completions through the app: the prompt is the checkpoint's template applied to
    the conversation (its token count in `usage`), and the answer is transformers' continuation
    of exactly those ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family.path)
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # transformers 5: a BatchEncoding
    config = engine.ModelConfig(str(family.path), dtype="float32", quantize="none")
    settings = server.Settings(api_keys=(KEY,), model=config)
    body = {"model": "any", "messages": CONVERSATION, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with TestClient(server.create_app(settings, lazy=engine.LazyEngine()), headers={"x-api-key": KEY}) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["usage"]["prompt_tokens"] == len(ids)
    expected = tokenizer.decode(reference_tokens(family.path, tuple(ids), 8), skip_special_tokens=True)
    assert answer["choices"][0]["message"]["content"] == expected


def test_an_unsupported_model_type_gets_the_503_naming_the_supported_ones(tmp_path: Path, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    random_model("GPTNeoXConfig", {"num_attention_heads": 4}, tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lazy = engine.LazyEngine()
    lazy.configure(engine.ModelConfig(name=str(tmp_path), dtype="float32", quantize="none"))
    supported = "gemma2, gemma3_text, gpt2, llama, mistral, phi3, qwen2, qwen3"
    with pytest.raises(engine.EngineUnavailable, match=f"'gpt_neox' is not supported; supported types: {supported}$"):
        lazy.get()


@pytest.mark.parametrize(
    ("class_name", "settings", "reason"),
    [
        # Phi-4 mini's shape: the rotary covers three quarters of each head
        (
            "Phi3Config",
            {
                "num_attention_heads": 4,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75},
            },
            "rotary embedding over part of each head",
        ),
        (
            "Gemma3TextConfig",
            {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "use_bidirectional_attention": True},
            "bidirectional attention",
        ),
        ("LlamaConfig", {"num_attention_heads": 4, "hidden_act": "gelu"}, "MLP activation 'gelu'"),
    ],
)
def test_a_variant_the_forward_pass_lacks_is_refused_with_the_reason(
    class_name: str, settings: dict[str, Any], reason: str, smollm2_dir: Path
) -> None:
    from transformers import AutoTokenizer

    network = random_model(class_name, settings, AutoTokenizer.from_pretrained(smollm2_dir))
    with pytest.raises(model.LoadError, match=reason):
        model.build_model(network, model.Convert(torch.float32, torch.device("cpu"), 0, 8))
