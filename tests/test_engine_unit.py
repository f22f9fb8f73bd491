"""Unit: the batching engine with a fake model (no weights, milliseconds).

The fake model keeps the tokens each KV pool block holds and predicts a sequence's next token
from the history its block table reads back, not from its input, so a mix-up of blocks in the
engine's bookkeeping changes the text.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
import model
from engine import Engine, GenerationFailed, LoadedModel, PromptTooLong, SamplingParams
from tests.conftest import ROOT

VOCAB = 128
EOS = 0


class FakeTokenizer:
    """One token per character: 'a' is 97. Decoding id 0 (EOS) gives nothing."""

    def __init__(self, broken_id: int | None = None):
        self.broken_id = broken_id

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **options: object) -> str:
        if self.broken_id in ids:
            raise ValueError(f"cannot decode {self.broken_id}")
        return "".join(chr(i) for i in ids if i != EOS)


class FakeStore:
    """FakeModel's prefix store: the tokens each block holds."""

    def __init__(self, blocks: int = 0):
        self.blocks, self.bytes = blocks, 0
        self.held: dict[int, list[int]] = {}


def last_plus_one(history: list[int]) -> int:
    return history[-1] + 1


class FakePool:
    def __init__(self, blocks: int):
        self.blocks = blocks
        self.held: dict[int, list[int | None]] = {}  # the token at each position of a block; None: zeroed


def split(work: model.Work) -> tuple[int, int]:
    """The pass's prompt tokens (in chunks; a one-token chunk only at a prompt's start) and its
    decode rows."""
    rows = [i for i, tokens in enumerate(work.tokens) if len(tokens) == 1 and work.starts[i] and not work.restore_of(i)]
    return sum(len(work.tokens[i]) for i in range(len(work.tokens)) if i not in rows), len(rows)


class FakeModel:
    """Next token = last token of the sequence's own history + 1 (mod VOCAB), or `next_of(history)`."""

    max_context = 64

    def __init__(
        self,
        step_delay: float = 0.0,
        store_blocks: int = 0,
        next_of: Callable[[list[int]], int] = last_plus_one,
        pool_blocks: int = 64,
    ):
        self.pool = FakePool(pool_blocks)
        self.store = FakeStore(store_blocks)
        self.next_of = next_of
        self.step_delay = step_delay
        self.batch_sizes: list[int] = []
        self.prefills: list[int] = []  # tokens in each prefill pass, all its sequences' chunks together
        self.fail_next_step = False

    def _logits(self, history: list[int]) -> torch.Tensor:
        logits = torch.zeros(VOCAB)
        logits[self.next_of(history) % VOCAB] = 1.0
        return logits

    def _write(self, table: list[int], start: int, tokens: list[int]) -> None:
        for position, token in enumerate(tokens, start):
            self.pool.held[table[position // model.KV_BLOCK]][position % model.KV_BLOCK] = token

    def _read(self, table: list[int], length: int) -> list[int]:
        history = [self.pool.held[table[p // model.KV_BLOCK]][p % model.KV_BLOCK] for p in range(length)]
        assert None not in history, "a sequence's earlier positions must hold its tokens"
        return history  # type: ignore[return-value]

    def run(self, work: model.Work) -> torch.Tensor:
        """Write each sequence's tokens into its blocks where its cached length says they go."""
        for block in work.fresh:
            self.pool.held[block] = [None] * model.KV_BLOCK
        prompt_tokens, rows = split(work)
        for table, slots in zip(work.tables, work.restore, strict=False):  # a sequence starts with the store's blocks
            self._write(table, 0, [token for slot in slots for token in self.store.held[slot]])
        if prompt_tokens:
            self.prefills.append(prompt_tokens)
        if rows:
            if self.fail_next_step:
                self.fail_next_step = False
                raise RuntimeError("device fell over")
            time.sleep(self.step_delay)
            self.batch_sizes.append(rows)
        blocks = [block for table in work.tables for block in table]
        assert len(set(blocks)) == len(blocks), "two sequences hold one block"
        histories = []
        for table, tokens, start in zip(work.tables, work.tokens, work.starts, strict=True):
            assert len(table) * model.KV_BLOCK >= start + len(tokens), "the table must cover the new tokens"
            self._write(table, start, tokens)
            histories.append(self._read(table, start + len(tokens)))
        for history, pairs in zip(histories, work.save, strict=False):
            for block, slot in pairs:
                self.store.held[slot] = history[block * model.PREFIX_BLOCK : (block + 1) * model.PREFIX_BLOCK]
        return torch.stack([self._logits(history) for history in histories])

    def clear(self) -> None:
        self.pool.held.clear()


def make_engine(max_batch: int = 4, step_delay: float = 0.0, tokenizer: FakeTokenizer | None = None) -> Engine:
    model = LoadedModel(tokenizer or FakeTokenizer(), FakeModel(step_delay), frozenset([EOS]), 64, torch.float32)
    return Engine(model, max_batch)  # type: ignore[arg-type]


@pytest.fixture
def eng() -> Engine:
    e = make_engine()
    yield e
    e.close()


def in_threads(calls: list[Callable[[], object]]) -> list[object]:
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return results


def test_length(eng: Engine) -> None:
    assert eng.generate("a", SamplingParams(max_new_tokens=3)) == engine.Result("bcd", 3, "length")


class TiedModel(FakeModel):
    """Two tokens share the highest logit: the next one and the one after it."""

    def _logits(self, history: list[int]) -> torch.Tensor:
        logits = super()._logits(history)
        logits[(self.next_of(history) + 1) % VOCAB] = 1.0
        return logits


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("penalty", [0.0, 0.5])
def test_greedy_takes_the_first_of_tied_highest_tokens(batch: int, penalty: float) -> None:
    """As transformers' greedy argmax does (the engine reads max's indices, the same first one),
    alone and in a batch, and on the float32 path a penalized request takes."""
    loaded = LoadedModel(FakeTokenizer(), TiedModel(), frozenset([EOS]), 64, torch.float32)
    eng = Engine(loaded, 4)  # type: ignore[arg-type]
    try:
        params = SamplingParams(max_new_tokens=3, presence_penalty=penalty)
        results = in_threads([lambda: eng.generate("a", params)] * batch)
        assert results == [engine.Result("bcd", 3, "length")] * batch
    finally:
        eng.close()


def test_eos_ends_and_is_not_in_the_text(eng: Engine) -> None:
    # chr(126) '~' -> 127 -> 0 (EOS)
    assert eng.generate("~", SamplingParams(max_new_tokens=10)) == engine.Result("\x7f", 2, "eos")


def test_ignore_eos_generates_exactly_max_new_tokens(eng: Engine) -> None:
    result = eng.generate("~", SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert (result.tokens, result.finish_reason) == (4, "length")


def test_stop_string_across_tokens_is_cut(eng: Engine) -> None:
    result = eng.generate("a", SamplingParams(max_new_tokens=20, stop=("ef", "zz")))
    assert result == engine.Result("bcd", 5, "stop")  # 'e' and 'f' came as two tokens


def test_earliest_stop_string_wins(eng: Engine) -> None:
    result = eng.generate("a", SamplingParams(max_new_tokens=20, stop=("g", "cd")))
    assert result.text == "b"


def test_prompt_too_long_says_how_many_tokens_fit(eng: Engine) -> None:
    with pytest.raises(PromptTooLong, match="prompt is 60 tokens; with max_new_tokens=10 at most 54"):
        eng.generate("a" * 60, SamplingParams(max_new_tokens=10))


def test_concurrent_requests_share_steps_and_keep_their_rows() -> None:
    eng = make_engine(max_batch=8, step_delay=0.005)
    prompts = ["a", "A", "0", "k", "K", "!"]
    calls = [lambda p=p, n=n: eng.generate(p, SamplingParams(max_new_tokens=n)) for n, p in enumerate(prompts, 3)]
    results = in_threads(calls)
    for n, (prompt, result) in enumerate(zip(prompts, results, strict=True), 3):
        expected = "".join(chr(ord(prompt) + i) for i in range(1, n + 1))
        assert result == engine.Result(expected, n, "length")
    assert max(eng.model.batch_sizes) > 1  # type: ignore[attr-defined]
    eng.close()


def test_rows_stay_compact_when_sequences_leave_mid_batch() -> None:
    """Short requests finish first; the long ones must keep their own history after rows move."""
    eng = make_engine(max_batch=8, step_delay=0.002)
    lengths = [2, 30, 5, 25, 1, 20, 3, 15]
    calls = [
        lambda i=i, n=n: eng.generate(chr(65 + i), SamplingParams(max_new_tokens=n)) for i, n in enumerate(lengths)
    ]
    for i, (n, result) in enumerate(zip(lengths, in_threads(calls), strict=True)):
        assert isinstance(result, engine.Result)
        assert result.text == "".join(chr(65 + i + k) for k in range(1, n + 1))
    eng.close()


def test_more_requests_than_rows_wait_and_all_finish() -> None:
    eng = make_engine(max_batch=2)
    results = in_threads([lambda: eng.generate("a", SamplingParams(max_new_tokens=5)) for _ in range(7)])
    assert all(r == engine.Result("bcdef", 5, "length") for r in results)
    assert max(eng.model.batch_sizes) <= 2  # type: ignore[attr-defined]
    eng.close()


def test_cancel_frees_the_row_within_a_step() -> None:
    eng = make_engine(step_delay=0.01)
    cancel = threading.Event()
    [result] = in_threads(
        [
            lambda: (
                threading.Timer(0.05, cancel.set).start(),
                eng.generate("a", SamplingParams(max_new_tokens=60), cancel),
            )[1]
        ]
    )
    assert isinstance(result, engine.Result)
    assert result.finish_reason == "cancelled"
    assert 1 <= result.tokens < 20
    assert eng.active == 0
    eng.close()


def test_a_sequence_that_fails_fails_alone() -> None:
    """The tokenizer cannot decode id 104 ('h'); only the request that produces it fails."""
    eng = make_engine(step_delay=0.002, tokenizer=FakeTokenizer(broken_id=ord("h")))
    calls = [
        lambda: eng.generate("f", SamplingParams(max_new_tokens=5, stop=("zz",))),  # g, h -> decode fails
        lambda: eng.generate("0", SamplingParams(max_new_tokens=8, stop=("zz",))),
        lambda: eng.generate("A", SamplingParams(max_new_tokens=8)),
    ]
    failed, ok1, ok2 = in_threads(calls)
    assert isinstance(failed, GenerationFailed)
    assert ok1 == engine.Result("12345678", 8, "length")
    assert ok2 == engine.Result("BCDEFGHI", 8, "length")
    eng.close()


def test_a_failed_step_fails_the_batch_and_the_engine_goes_on(eng: Engine) -> None:
    eng.model.fail_next_step = True  # type: ignore[attr-defined]
    with pytest.raises(GenerationFailed, match="device fell over"):
        eng.generate("a", SamplingParams(max_new_tokens=5))
    assert eng.generate("a", SamplingParams(max_new_tokens=2)).text == "bc"


def test_seeded_sampling_is_reproducible(eng: Engine) -> None:
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=42)
    # The fake's logits are 0/1, so sampling at temperature 1 really draws among all tokens.
    first, second = eng.generate("a", params), eng.generate("a", params)
    assert first == second
    other = eng.generate("a", SamplingParams(max_new_tokens=6, temperature=1.0, seed=43))
    assert other.text != first.text


def test_close_fails_waiting_requests_and_refuses_new_ones() -> None:
    eng = make_engine(max_batch=1, step_delay=0.01)
    results = in_threads(
        [
            lambda: (time.sleep(0.05), eng.close())[1],
            *[lambda: eng.generate("a", SamplingParams(max_new_tokens=60))] * 3,
        ]
    )
    assert any(isinstance(r, GenerationFailed) for r in results[1:])
    with pytest.raises(GenerationFailed, match="shutting down"):
        eng.generate("a", SamplingParams(max_new_tokens=1))


def test_sample_filters() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    gen = torch.Generator().manual_seed(0)
    draws = {engine.sample(logits, SamplingParams(temperature=5.0, top_k=2), gen) for _ in range(200)}
    assert draws == {3, 4}
    draws = {engine.sample(logits, SamplingParams(temperature=1.0, top_p=0.5), gen) for _ in range(200)}
    assert draws == {4}  # token 4 alone holds > 99% of the mass
    draws = {engine.sample(logits, SamplingParams(temperature=100.0), gen) for _ in range(500)}
    assert draws == {0, 1, 2, 3, 4}


class Counter:
    def __init__(self, fail_first: int = 0):
        self.calls, self.fail_first = 0, fail_first

    def __call__(self, config: engine.ModelConfig, observe: object = None) -> Engine:
        self.calls += 1
        time.sleep(0.1)  # a slow load, so concurrent callers really overlap
        if self.calls <= self.fail_first:
            raise engine.EngineUnavailable("no weights here", config.retry_seconds)
        return make_engine()


def lazy_engine(factory: Counter, retry_seconds: int = 30) -> engine.LazyEngine:
    lazy = engine.LazyEngine(factory)
    lazy.configure(engine.ModelConfig(name="fake", retry_seconds=retry_seconds))
    return lazy


def test_lazy_engine_loads_once_for_concurrent_first_calls() -> None:
    factory = Counter()
    lazy = lazy_engine(factory)
    engines = in_threads([lazy.get] * 8)
    assert factory.calls == 1
    assert all(e is engines[0] for e in engines)
    engines[0].close()  # type: ignore[attr-defined]


def test_lazy_engine_shares_a_failure_then_tries_again_later() -> None:
    factory = Counter(fail_first=1)
    lazy = lazy_engine(factory, retry_seconds=1)
    results = in_threads([lazy.get] * 5)
    assert factory.calls == 1  # those who waited got the same error, no stampede of retries
    assert all(isinstance(r, engine.EngineUnavailable) for r in results)
    with pytest.raises(engine.EngineUnavailable) as caught:
        lazy.get()  # still inside the retry window: answered at once
    assert caught.value.retry_after == 1
    assert factory.calls == 1
    time.sleep(1)
    assert lazy.get() is not None  # a later request tries again and succeeds
    assert factory.calls == 2
    lazy.get().close()


def test_an_unreachable_hub_names_the_docker_users_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker compose up` with no route to the hub: the image has no tools/, so the 503 must name
    the offline override file and the host command that builds what it mounts."""

    def no_route(address: tuple[str, int], timeout: float) -> None:
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(model.socket, "create_connection", no_route)
    with pytest.raises(model.LoadError) as caught:
        model._offline(engine.ModelConfig(cache_dir=str(tmp_path)))  # the image's distilgpt2, not cached
    message = str(caught.value)
    assert "Network is unreachable" in message and "MODEL_NAME" in message
    override = yaml.safe_load((ROOT / "docker-compose.offline.yml").read_text())["services"]["llm-generator"]
    mounted = override["volumes"][0].split(":")[0].removeprefix("./")  # models/smollm2-135m-instruct
    assert "-f docker-compose.yml -f docker-compose.offline.yml" in message
    assert f"make {mounted}/config.json" in message  # builds what the override mounts
    assert override["environment"]["MODEL_NAME"] == "/" + mounted


def _tiny_model(dtype: torch.dtype, blocks: int, softcap: float | None = None) -> model.Model:
    """A Model with no layers: enough to drive its attention over a real pool."""
    arch = model.Architecture(6, 2, 8, 1e-5, 4096, rms_norm=True, gated_mlp=True, inv_freq=None,
                              attn_softcap=softcap)  # fmt: skip
    embed = model.Embedding(torch.zeros(VOCAB, 48, dtype=dtype), dtype)
    head = model.Linear(48, torch.zeros(VOCAB, 48, dtype=dtype), None)
    network = model.Model(arch, [], embed, None, (torch.ones(48, dtype=dtype), None), head)
    network.pool = model.KVPool(1, blocks, arch, dtype, torch.device("cpu"))
    return network


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Plain attention of one new token over a sequence's positions: q [Hq, D]; keys [Hkv, L, D]."""
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0).float(), values.repeat_interleave(group, 0).float()
    scores = (q.float()[:, None] @ keys.transpose(1, 2))[:, 0] * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return (torch.softmax(scores, -1)[:, None] @ values)[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # both paths `auto` picks between CPUs
@pytest.mark.parametrize("softcap", [None, 50.0])
@pytest.mark.parametrize("tables", [[[0, 1, 2]], [[5, 1], [3], [0, 4, 7]], [[6, 2]], [[5, 1], [0, 4, 7]]])
def test_decode_attention_reads_each_sequences_own_blocks(
    dtype: torch.dtype, softcap: float | None, tables: list[list[int]]
) -> None:
    """One, two or three sequences of different lengths (the shorter ones' bags past their blocks
    empty), their blocks anywhere in the pool, one with a foreign block between its own; blocks
    no one in the batch holds hold NaN, and must not leak into anyone's answer; Gemma 2's capped
    scores too."""
    torch.manual_seed(0)
    network = _tiny_model(dtype, blocks=8, softcap=softcap)
    pool, kv = network.pool, network.arch.kv_heads
    for layer in pool.k + pool.v:
        layer.fill_(math.nan)
    pool.zero(tuple(block for table in tables for block in table))  # as the scheduler hands them out
    starts = [len(table) * model.KV_BLOCK - 1 - 17 * i for i, table in enumerate(tables)]  # last blocks part-full
    for keys, values in zip(pool.k, pool.v, strict=True):
        for table, start in zip(tables, starts, strict=True):
            slots = pool.slots([table] * start, list(range(start)))
            keys.view(-1).index_copy_(0, pool.key_slots(slots), torch.randn(len(slots) * 8).to(dtype))
            values.view(-1, 8).index_copy_(0, slots, torch.randn(len(slots), 8).to(dtype))
    work = model.Work(tables, [[1]] * len(tables), starts)
    _, decode = network._prepare_decode(work)
    q = torch.randn(len(tables), 6, 1, 8).to(dtype)
    k, v = torch.randn(len(tables), kv, 1, 8).to(dtype), torch.randn(len(tables), kv, 1, 8).to(dtype)
    out = network._attend_decode(0, q, k, v, decode)
    for seq, (table, start) in enumerate(zip(tables, starts, strict=True)):
        keys = pool.gather(pool.k[0], table, start + 1, keys=True)
        values = pool.gather(pool.v[0], table, start + 1, keys=False)
        assert keys[0, :, start].equal(k[seq, :, 0]) and values[0, :, start].equal(v[seq, :, 0])  # at their place
        expected = _reference(q[seq, :, 0], keys[0], values[0], softcap)
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out[seq, :, 0].float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("table", [[2, 3, 4], [4, 2, 3], [5]])
@pytest.mark.parametrize("keys", [True, False])
def test_gather_reads_a_sequences_blocks_in_order_in_a_row_or_not(table: list[int], keys: bool) -> None:
    """Blocks in a row are sliced, others indexed: both give the table's positions in order, the
    keys' turned blocks turned back."""
    pool = _tiny_model(torch.float32, blocks=8).pool
    layer = (pool.k if keys else pool.v)[0]
    layer.copy_(torch.randn(layer.shape))
    length = (len(table) - 1) * model.KV_BLOCK + 5
    rows = [layer[block].transpose(1, 2) if keys else layer[block] for block in table]  # each [Hkv, KV_BLOCK, D]
    expected = torch.cat(rows, dim=1)[None, :, :length]  # [1, Hkv, length, D]
    assert pool.gather(layer, table, length, keys).equal(expected)
    assert pool.gather(layer, [*table, 7], length, keys).equal(expected)  # blocks past the length: not read


@pytest.mark.parametrize("method", ["compile", "trace"])
def test_compile_and_trace_say_why_a_model_runs_the_plain_step(method: str) -> None:
    """Capped scores (and sliding windows) take paths the lone pass lacks: the plain step, with
    the reason for the log."""
    capped = _int8_head(_tiny_model(torch.float32, blocks=4, softcap=50.0))
    assert getattr(capped, method)() == "a sliding window or capped attention scores" and capped.lone_pass is None


def test_compile_leaves_float_weights_at_one_row() -> None:
    """Float weights at one row, plain or oneDNN's packed ones, cannot be compiled: the plain
    step, with the reason (the trace takes them: `test_a_lone_pass_on_float_weights_is_traced`)."""
    for weight in (torch.zeros(VOCAB, 48), model.pack_float(torch.zeros(VOCAB, 48), 4)):
        floats = _tiny_model(torch.float32, blocks=4)
        floats.lm_head = model.Linear(48, weight, None)
        assert (floats.compile() or "").startswith("float weights at one row") and floats.lone_pass is None


def test_a_lone_pass_on_float_weights_is_traced() -> None:
    """QUANTIZE=none: a lone sequence's pass on oneDNN's packed float weights is traced too (the
    weights come in as inputs) and gives the untraced lone pass's logits bit for bit, step after
    step. (The batched step's attention groups the queries otherwise: in float32 it may differ in
    the last bits, as batch sizes may.)"""
    torch.manual_seed(0)
    network = _packed_layer_model(blocks=4)
    assert network.trace() is None and network.lone_pass is not None
    with torch.inference_mode():
        network.run(model.Work([[0, 1]], [torch.randint(0, VOCAB, (70,)).tolist()], [0], fresh=(0, 1)))
        for start in range(70, 75):
            work = model.Work([[0, 1]], [[start % VOCAB]], [start])
            traced_logits = network.run(work)
            assert network.lone_pass is not None  # a pass that fails is dropped
            ids, lone = network._prepare_lone(work)
            assert torch.equal(traced_logits, network._forward(ids, lone, lone, None))


def test_the_traced_pass_writes_into_the_pool_of_the_day() -> None:
    """The pool's layers are the trace's inputs, not constants of it: after the pool is handed back
    and made again, a traced step writes its key into the new pool and reads it from there."""
    torch.manual_seed(0)
    network = _int8_head(_tiny_model(torch.float32, blocks=4))
    network.embed = model.Embedding(torch.randn(VOCAB, 48), torch.float32)

    def int8(rows: int, width: int) -> model.Linear:
        return model.Linear(width, None, None, model.pack_int8(torch.randn(rows, width)), model.INT8_ALWAYS)

    ones = torch.ones(48)  # one layer: 6 query heads and 2 key heads of 8, a gated MLP 64 wide
    layer = model.LayerWeights(ones, None, int8(80, 48), int8(48, 48), ones, None, int8(128, 48), int8(48, 64))
    network.layers = [layer]
    assert network.trace() is None and network.lone_pass is not None
    with torch.inference_mode():
        for position in (5, 70, 130):  # one block, then past the blocks it was traced with
            network.clear()
            table = [2, 0, 3]
            network.run(model.Work([table], [torch.randint(0, VOCAB, (position,)).tolist()], [0], fresh=(2, 0, 3)))
            work = model.Work([table], [[position % VOCAB]], [position])
            traced = network.run(work)
            block, offset = table[position // model.KV_BLOCK], position % model.KV_BLOCK
            assert bool(network.pool.k[0][block, :, offset].any())  # the new key, in the new pool
            plain, network.lone_pass = network.lone_pass, None
            assert torch.equal(traced, network.run(work))  # and the prompt's keys read from it
            network.lone_pass = plain


def test_a_trace_that_fails_or_differs_leaves_the_plain_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch without torch.jit.trace (it is deprecated), or a trace whose logits are not the
    plain step's bit for bit at any warm-up length: the reason, and no lone pass."""

    def missing(*arguments: object, **options: object) -> object:
        raise AttributeError("module 'torch.jit' has no attribute 'trace'")

    monkeypatch.setattr(torch.jit, "trace", missing)
    network = _int8_head(_tiny_model(torch.float32, blocks=4))
    assert network.trace() == "tracing failed (AttributeError: module 'torch.jit' has no attribute 'trace')"
    assert network.lone_pass is None
    monkeypatch.setattr(torch.jit, "trace", lambda replay, inputs, **options: lambda *i: replay(*i) + 1e-6)
    assert network.trace() == "the traced pass's logits differ from the plain step's" and network.lone_pass is None


def _packed_layer_model(blocks: int) -> model.Model:
    """A tiny float32 model of one layer on oneDNN's packed float weights (as bfloat16 and float32
    run past a few rows), its embedding random: each token's keys differ."""
    network = _tiny_model(torch.float32, blocks=blocks)
    network.embed = model.Embedding(torch.randn(VOCAB, 48), torch.float32)
    network.lm_head = model.Linear(48, model.pack_float(torch.randn(VOCAB, 48), 8), None)

    def packed(rows: int, width: int) -> model.Linear:
        return model.Linear(width, model.pack_float(torch.randn(rows, width) / 8, 8), None)

    ones = torch.ones(48)  # 6 query heads and 2 key heads of 8, a gated MLP 64 wide
    layer = model.LayerWeights(ones, None, packed(80, 48), packed(48, 48), ones, None, packed(128, 48), packed(48, 64))
    network.layers = [layer]
    return network


def test_traced_batches_run_on_the_pool_of_the_day_at_any_shape() -> None:
    """The batched decode pass runs steps of other sizes, lengths and blocks than it was traced
    at, in pools made after it: each gives the plain step's logits bit for bit and writes its
    keys into that pool."""
    torch.manual_seed(0)
    network = _packed_layer_model(blocks=40)
    assert network.trace_batches(max_batch=6) is None and sorted(network.batch_passes) == [1]
    assert network.batch_bands == ((1, 6),)  # no int8 or int4 weights: one format at every size
    ran = record_batch_passes(network)
    with torch.inference_mode():
        for lengths in ([3, 70, 75], [130, 5, 9, 140, 7, 66], [60, 61], [200, 190, 180, 170, 10]):
            network.clear()
            tables = [list(range(4 * row, 4 * row + 4)) for row in range(len(lengths))]
            for table, length in zip(tables, lengths, strict=True):
                network.run(model.Work([table], [torch.randint(0, VOCAB, (length,)).tolist()], [0], fresh=tuple(table)))
            work = model.Work(tables, [[row] for row in range(len(lengths))], lengths)
            traced_logits = network.run(work)
            block, offset = tables[-1][lengths[-1] // model.KV_BLOCK], lengths[-1] % model.KV_BLOCK
            assert bool(network.pool.k[0][block, :, :, offset].any())  # the new key, in this pool
            passes, network.batch_passes = network.batch_passes, {}
            assert torch.equal(traced_logits, network.run(work))
            network.batch_passes = passes
    assert ran == [1] * 4


def record_batch_passes(network: model.Model) -> list[int]:
    """Which of the model's batch passes run, as their keys (their bands' fewest rows), in order."""
    ran: list[int] = []
    for key, traced in list(network.batch_passes.items()):
        network.batch_passes[key] = lambda ids, d, traced=traced, key=key: ran.append(key) or traced(ids, d)
    return ran


def _fresh_decode_step(network: model.Model, rows: int) -> model.Work:
    """A decode step of `rows` sequences of two blocks each (70 and more tokens), in a fresh pool."""
    network.clear()
    tables = [[2 * row, 2 * row + 1] for row in range(rows)]
    network.pool.zero(tuple(block for table in tables for block in table))
    return model.Work(tables, [[row] for row in range(rows)], [70 + row for row in range(rows)])


def test_each_band_of_one_weight_format_has_its_own_traced_batch_passes() -> None:
    """int8 weights in the head up to 6 rows: steps of 1-6 rows and of 7 or more each run a pass
    traced at their own formats, and each gives the plain step's logits bit for bit; capped scores
    take paths the pass lacks: the reason, and no batch passes."""
    torch.manual_seed(0)
    network = _packed_layer_model(blocks=60)
    network.lm_head.int8, network.lm_head.int8_rows = model.pack_int8(torch.randn(VOCAB, 48)), 6
    assert network.trace_batches(max_batch=6) is None and network.batch_bands == ((1, 6),)
    assert network.trace_batches(max_batch=10) is None and network.batch_bands == ((1, 6), (7, 10))
    assert sorted(network.batch_passes) == [1, 7]
    ran = record_batch_passes(network)
    with torch.inference_mode():
        for rows in (4, 8):
            work = _fresh_decode_step(network, rows)
            traced_logits = network.run(work)
            passes, network.batch_passes = network.batch_passes, {}
            assert torch.equal(traced_logits, network.run(work))
            network.batch_passes = passes
    assert ran == [1, 7]
    capped = _tiny_model(torch.float32, blocks=40, softcap=50.0)
    assert capped.trace_batches(max_batch=6) == "a sliding window or capped attention scores"
    assert not capped.batch_passes


def _int8_head(network: model.Model) -> model.Model:
    network.lm_head = model.Linear(48, None, None, model.pack_int8(torch.randn(VOCAB, 48)), model.INT8_ALWAYS)
    return network


def test_compile_keeps_the_faster_of_the_compiled_and_traced_passes() -> None:
    """COMPILE=1's pass is timed against the traced one and kept only where it runs faster: here a
    stand-in for it that waits 20 ms a step loses to the trace and one that answers at once wins.
    Either way the pass kept answers the step."""
    network = _int8_head(_tiny_model(torch.float32, blocks=4))
    work = model.Work([[0]], [[3]], [5], fresh=(0,))
    with torch.inference_mode():
        expected = network.run(work)
    answer = expected.clone()

    def slow(ids: torch.Tensor, lone: model.LoneDecode) -> torch.Tensor:
        time.sleep(0.02)
        return answer

    lost = ", but the traced pass ran faster here and runs instead"
    for stand_in, kept in ((slow, False), (lambda ids, lone: answer, True)):
        network.lone_pass = stand_in
        said = network.keep_faster_lone_pass()
        assert (network.lone_pass is stand_in) == kept and said == ("" if kept else lost)
        with torch.inference_mode():
            assert torch.equal(network.run(work), expected)


@pytest.mark.skipif(model.cpp_compiler() is None, reason="needs a C++ compiler")
def test_compile_warms_up_within_a_small_pool() -> None:
    """The load's warm-up asks for at most the blocks the pool has (KV_CACHE_MB may allow one)."""
    network = _int8_head(_tiny_model(torch.float32, blocks=1))
    assert network.compile() is None and network.lone_pass is not None
    with torch.inference_mode():
        logits = network.run(model.Work([[0]], [[3]], [5], fresh=(0,)))
    assert logits.shape == (1, VOCAB)


@pytest.mark.skipif(model.cpp_compiler() is None, reason="needs a C++ compiler")
def test_each_model_compiles_a_pass_of_its_own() -> None:
    """The compiled pass checks only its inputs at each call, not the model (~1,850 checks, ~0.5
    ms a step): a second model that differs where its inputs do not (its final norm a layer
    norm, not RMSNorm) must get graphs of its own, not run the first one's."""
    torch.manual_seed(0)
    for rms_norm in (True, False):
        network = _int8_head(_tiny_model(torch.float32, blocks=4))
        network.arch = replace(network.arch, rms_norm=rms_norm)
        network.embed = model.Embedding(torch.randn(VOCAB, 48), torch.float32)
        assert network.compile() is None
        work = model.Work([[0]], [[3]], [5], fresh=(0,))
        with torch.inference_mode():
            compiled = network.run(work)
            network.lone_pass = None
            torch.testing.assert_close(compiled, network.run(work))


def test_guards_kept_are_the_inputs_ones() -> None:
    names = ["ids", "last", "inputs.blocks", "type(self.embed).__call__", "self", "self.pool.k[0]",
             "self.layers[3].up.int4[0]", "G['torch']"]  # fmt: skip
    guards = [type("Guard", (), {"name": name})() for name in names]
    assert model._guards_on_inputs(guards) == [True, True, True, True, False, False, False, False]


def test_compile_without_a_compiler_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model.shutil, "which", lambda name: None)
    with pytest.raises(model.LoadError, match=r"needs a C\+\+ compiler .*unset COMPILE"):
        model.compile_decode(_tiny_model(torch.float32, blocks=4), torch.device("cpu"), 4)


def test_a_prompts_last_one_token_chunk_is_saved_on_the_compiled_path_too() -> None:
    """A one-token chunk that ends a prompt runs the compiled pass (COMPILE=1), and its prompt
    blocks still go to the prefix store for the prompts after it."""
    network, calls = _int8_head(_tiny_model(torch.float32, blocks=4)), []
    network.store = model.PrefixStore(1, 2, network.arch, torch.float32, torch.device("cpu"))
    saved: list[tuple[tuple[int, int], ...]] = []
    network.store.save = lambda pool, table, pairs: saved.append(pairs)  # type: ignore[method-assign]
    network.lone_pass = lambda ids, lone: calls.append(lone) or network._forward(ids, lone, lone, None)
    with torch.inference_mode():
        network.run(model.Work([[0]], [[3]], [16], fresh=(0,), save=(((0, 1),),)))
    assert len(calls) == 1 and saved == [((0, 1),)]


def test_a_compiler_that_fails_leaves_the_model_uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """At load, the reason goes to the log; while serving, the step runs uncompiled from then on."""

    def broken(*inputs: object) -> torch.Tensor:
        raise RuntimeError("no kernel")

    monkeypatch.setattr(torch, "compile", lambda function, **options: broken)
    network = _int8_head(_tiny_model(torch.float32, blocks=4))
    assert network.compile() == "compiling failed (RuntimeError: no kernel)" and network.lone_pass is None
    network.lone_pass = broken
    with torch.inference_mode():  # as the engine runs, and as compile() makes the pool
        logits = network.run(model.Work([[0]], [[3]], [5], fresh=(0,)))
    assert logits.shape == (1, VOCAB) and network.lone_pass is None


def test_a_cleared_pool_hands_its_memory_back_every_time() -> None:
    """Freed layers of up to 32 MiB raise glibc's mapping threshold, so later pools come from the
    heap it keeps unless trimmed: resident memory must not grow from one idle spell to the next."""
    arch = _tiny_model(torch.float32, blocks=1).arch
    pool = model.KVPool(10, 3072, arch, torch.float32, torch.device("cpu"))  # 12 MiB a layer's keys
    after = []
    for _ in range(3):
        pool.zero(tuple(range(pool.blocks)))  # every page written, as a full pool's are
        pool.clear()
        after.append(engine.resident_bytes())
    assert after[2] - after[0] < 60 * 2**20, [a // 2**20 for a in after]


def test_the_kv_pool_is_made_empty_and_handed_back_once_idle() -> None:
    network = _tiny_model(torch.float32, blocks=4)
    first = network.pool.k[0]
    network.clear()
    assert network.pool.k[0] is first  # untouched: nothing to hand back
    network.pool.zero((2,))
    assert network.pool.k[0][2].abs().sum() == 0
    network.clear()
    assert network.pool.k[0] is not first  # a fresh pool: the written pages went back
    assert network.pool.bytes == 4 * network.pool.block_bytes == 4 * 2 * 2 * model.KV_BLOCK * 8 * 4


def _long(tokens: int, max_new_tokens: int) -> engine.Sequence:
    text = engine.TextStream(FakeTokenizer(), [1] * tokens, ())
    return engine.Sequence([1] * tokens, SamplingParams(max_new_tokens=max_new_tokens), torch.Generator(), text)


def test_a_sequence_waits_for_blocks_and_joins_when_one_ends() -> None:
    """Admission by free blocks: a sequence joins when the blocks no running one may still take
    cover its prompt and all its new tokens; otherwise it waits (first come, first served: a
    short one behind it waits too), and joins when a running one ends and gives its blocks back."""
    scheduler = engine.Scheduler(max_batch=8, blocks=5)
    first, second, short = _long(100, 100), _long(150, 20), _long(5, 5)  # 4, 3 and 1 blocks
    for seq in (first, second, short):
        scheduler.add(seq)
    assert scheduler.next_to_join() is first and scheduler.promised == 4
    assert scheduler.grow(first, 100) == [0, 1] and scheduler.blocks_used == 2  # taken as it grows
    first.prefilled = 100
    assert scheduler.next_to_join() is None  # 1 block unpromised: the 3 it needs are not there
    assert list(scheduler.waiting) == [second, short]  # and the short one does not overtake it
    assert scheduler.grow(first, 129) == [2] and scheduler.grow(first, 150) == []
    first.generated = list(range(99))
    scheduler.postprocess([first], [7])  # its 100th token: it ends, and its blocks come back
    assert scheduler.blocks_used == 0 and scheduler.promised == 0 and first.table == []
    assert scheduler.next_to_join() is second and scheduler.grow(second, 150) == [0, 1, 2]
    second.prefilled = 150
    assert scheduler.next_to_join() is short and scheduler.grow(short, 5) == [3]


def test_a_request_larger_than_the_whole_pool_is_refused_naming_the_setting() -> None:
    loaded = LoadedModel(FakeTokenizer(), FakeModel(pool_blocks=1), frozenset([EOS]), 1024, torch.float32)
    eng = Engine(loaded, max_batch=2)
    assert eng.generate("a" * 30, SamplingParams(max_new_tokens=30)).tokens == 30  # 60 positions: one block
    with pytest.raises(PromptTooLong, match=r"needs more than the KV cache holds \(64 tokens, KV_CACHE_MB\)"):
        eng.generate("a" * 40, SamplingParams(max_new_tokens=30))
    eng.close()


class SentencePieceLike(FakeTokenizer):
    """Drops the leading space of whatever it decodes, as SentencePiece's Metaspace decoder does."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **options: object) -> str:
        return super().decode(ids).lstrip(" ")


def test_continuation_keeps_its_leading_space() -> None:
    eng = make_engine(tokenizer=SentencePieceLike())
    result = eng.generate("\x1f", SamplingParams(max_new_tokens=3))  # 31 -> 32 ' ', 33 '!', 34 '"'
    assert result.text == ' !"'
    eng.close()


def test_a_dead_engine_thread_fails_requests_instead_of_hanging() -> None:
    eng = make_engine(step_delay=0.002)

    def bookkeeping_bug(seq: object) -> None:
        raise RuntimeError("a bug in the bookkeeping")

    eng.scheduler._free = bookkeeping_bug  # type: ignore[method-assign]
    calls = [lambda n=n: eng.generate("a", SamplingParams(max_new_tokens=n)) for n in (2, 20, 20)]
    results = in_threads(calls)  # when the short one finishes first, freeing its row fails
    assert all(isinstance(r, engine.Result | engine.EngineStopped) for r in results)  # nobody hangs
    assert any(isinstance(r, engine.EngineStopped) for r in results)
    assert not eng.running
    with pytest.raises(engine.EngineStopped):
        eng.generate("a", SamplingParams(max_new_tokens=1))


def test_lazy_engine_reloads_after_its_engine_stopped() -> None:
    factory = Counter()
    lazy = lazy_engine(factory)
    first = lazy.get()
    first.close()
    second = lazy.get()
    assert second is not first
    assert factory.calls == 2
    second.close()


def test_lazy_engine_loads_in_a_thread_that_ends_with_the_load() -> None:
    """The load's kernels give the thread that runs them an OpenMP team for as long as it lives,
    and the caller (a server's worker thread) lives on: so the load runs in a thread of its own."""
    loaders: list[threading.Thread] = []

    def factory(config: engine.ModelConfig, observe: object = None) -> Engine:
        loaders.append(threading.current_thread())
        return make_engine()

    lazy = engine.LazyEngine(factory)
    lazy.configure(engine.ModelConfig(name="fake"))
    eng = lazy.get()
    assert loaders[0] is not threading.current_thread()
    assert not loaders[0].is_alive()
    eng.close()


def test_create_engine_loads_in_a_thread_that_ends_with_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """So does `create_engine` itself, for callers that go on running kernels (benchmarks, tests):
    loaded in their own thread, the engine's steps ran ~1.5-2x slower."""
    loaders: list[threading.Thread] = []

    def load(config: engine.ModelConfig, observe: object) -> Engine:
        loaders.append(threading.current_thread())
        return make_engine()

    monkeypatch.setattr(engine, "_load_and_start", load)
    eng = engine.create_engine(engine.ModelConfig(name="fake"))
    assert loaders[0] is not threading.current_thread()
    assert not loaders[0].is_alive()
    eng.close()


def test_lazy_engine_is_configured_once() -> None:
    lazy = engine.LazyEngine(Counter())
    with pytest.raises(RuntimeError, match="not configured"):
        lazy.get()
    lazy.configure(engine.ModelConfig(name="a"))
    lazy.configure(engine.ModelConfig(name="a"))  # the same configuration again is harmless
    with pytest.raises(RuntimeError, match="already configured"):
        lazy.configure(engine.ModelConfig(name="b"))  # a second, different one is a bug, not a reload
    lazy.close()
    lazy.configure(engine.ModelConfig(name="b"))  # after close(), a new configuration is fine


class ByteTokenizer:
    """Byte-level, like GPT-2's BPE: one token per UTF-8 byte (id = byte + 1; 0 is EOS), so a
    multi-byte character is split across tokens and a prefix may end inside it (U+FFFD)."""

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **options: object) -> str:
        return bytes(i - 1 for i in ids if i != EOS).decode("utf-8", errors="replace")


def before_stop(text: str, stops: tuple[str, ...]) -> str:
    """What a generation's text must be, made a character at a time (as the byte tokens make it):
    it ends once a stop string is complete, before the earliest one found in it then. With "0L0"
    and the stops "L" and "0L0", "0": "0L0" would start earlier, but "L" ends the text first."""
    for end in range(1, len(text) + 1):
        if hits := [i for i in (text[:end].find(stop) for stop in stops) if i >= 0]:
            return text[: min(hits)]
    return text


def stream_pieces(text: str, stops: tuple[str, ...]) -> tuple[list[str], str]:
    """Feed `text` one byte-token at a time through a TextStream, as the engine would."""
    tokenizer = ByteTokenizer()
    stream = engine.TextStream(tokenizer, [], stops)
    pieces = [stream.add(token) for token in tokenizer.encode(text)]
    pieces.append(stream.finish())
    assert stream.sent == "".join(pieces)
    return pieces, before_stop(text, stops)


@given(st.text(st.characters(codec="utf-8"), max_size=30), st.lists(st.text(min_size=1, max_size=4), max_size=3))
@settings(max_examples=400, deadline=None)
def test_streamed_pieces_add_up_and_never_show_a_split_character_or_a_stop_string(text: str, stops: list[str]) -> None:
    pieces, final = stream_pieces(text, tuple(stops))
    assert "".join(pieces) == final
    sent = ""
    for piece in pieces[:-1]:
        sent += piece
        assert "\ufffd" not in piece or "\ufffd" in text  # a half character is never sent
        assert final.startswith(sent)  # nothing sent is ever taken back, or lies past a stop string


def test_a_stop_string_spanning_tokens_is_never_partly_sent() -> None:
    pieces, final = stream_pieces("say END now", ("END",))
    assert final == "say "
    assert "".join(pieces) == "say "
    assert not any("E" in piece for piece in pieces)


def test_an_emoji_split_across_tokens_arrives_whole() -> None:
    pieces, _ = stream_pieces("a😀b", ())
    assert [p for p in pieces if p] == ["a", "😀", "b"]


def test_engine_stream_pieces_add_up_to_the_result() -> None:
    eng = make_engine()
    items = list(eng.stream("a", SamplingParams(max_new_tokens=6, stop=("fg",))))
    *deltas, result = items
    assert isinstance(result, engine.Result)
    assert result == engine.Result("bcde", 6, "stop")
    assert "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.token_ids] == [ord(c) for c in "bcdefg"]
    assert [d.tokens for d in deltas] == sorted(d.tokens for d in deltas)
    eng.close()


def test_a_whole_answer_arrives_once_with_what_the_pieces_carry() -> None:
    """Without pieces (a reader of the whole answer) the engine sends one Delta at the end: the
    same text, token ids and log-probabilities as the pieces add up to, and the same result."""
    eng = make_engine()
    params = SamplingParams(max_new_tokens=6, stop=("fg",), logprobs=1)
    *pieces, streamed = eng.stream("a", params)
    *whole, result = eng.stream("a", params, pieces=False)
    assert len(pieces) > 1 and len(whole) == 1 and result == streamed
    assert whole[0] == engine.Delta([t for d in pieces for t in d.token_ids], "".join(d.text for d in pieces), 6,
                                    tuple(lp for d in pieces for lp in d.logprobs))  # fmt: skip
    assert whole[0].text == result.text == "bcde" and len(whole[0].logprobs) == 6
    eng.close()


def test_relayed_pieces_come_from_the_engine_thread_before_the_result() -> None:
    """With a relay the engine thread hands it each Delta (a streaming reader's event loop), and
    the request's own iterator yields only the result, after every piece was relayed."""
    eng = make_engine()
    relayed: list[tuple[engine.Delta, str]] = []
    params = SamplingParams(max_new_tokens=6, stop=("fg",))
    events = list(eng.stream("a", params, relay=lambda d: relayed.append((d, threading.current_thread().name))))
    assert events == [engine.Result("bcde", 6, "stop")]
    assert [d for d, _ in relayed] == list(eng.stream("a", params))[:-1]
    assert {thread for _, thread in relayed} == {"engine"}
    eng.close()


def test_a_long_prompt_joins_in_chunks_while_the_batch_keeps_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 8 tokens, one per step: the running sequences advance between them, and
    sequences that finish mid-prefill give their blocks back without mixing anyone's history up."""
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(engine, "PREFILL_UNTIMED", 8)
    eng = make_engine(max_batch=4, step_delay=0.003)
    fake: FakeModel = eng.model  # type: ignore[assignment]
    short = [lambda n=n: eng.generate(chr(65 + n), SamplingParams(max_new_tokens=3 + 4 * n)) for n in range(3)]
    long_prompt = "".join(chr(33 + i % 90) for i in range(45))

    def late_long() -> object:
        time.sleep(0.01)  # the short ones are decoding by now
        return eng.generate(long_prompt, SamplingParams(max_new_tokens=5))

    *shorts, long_result = in_threads([*short, late_long])
    for n, result in enumerate(shorts):
        assert result == engine.Result("".join(chr(65 + n + k) for k in range(1, 4 + 4 * n)), 3 + 4 * n, "length")
    expected = "".join(chr((ord(long_prompt[-1]) + k) % VOCAB) for k in range(1, 6))
    assert long_result == engine.Result(expected, 5, "length")
    assert max(fake.prefills) <= 8
    assert fake.prefills.count(8) >= 5  # 45 tokens: five full chunks and a rest
    eng.close()


class TimedModel(FakeModel):
    """A pass takes `token_delay` a prompt token, and `step_delay` more with decode rows."""

    max_context = 256

    def __init__(self, step_delay: float, token_delay: float):
        super().__init__(step_delay, pool_blocks=16)
        self.token_delay = token_delay
        self.passes: list[tuple[int, int]] = []  # each pass's prompt tokens and decode rows

    def run(self, work: model.Work) -> torch.Tensor:
        tokens, rows = split(work)
        time.sleep(self.token_delay * tokens)
        logits = super().run(work)
        self.passes.append((tokens, rows))
        return logits


def test_while_sequences_decode_a_chunk_costs_about_one_decode_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decoding sequence waits for the chunk before its next token: a chunk is sized from the
    last decode step's time over the last chunk's time a token (50 ms / 2 ms: 16 tokens), from the
    first chunk of the prompt that joins; a prompt no one waits for goes in whole PREFILL_CHUNKs
    (64 here, so that a 200-token prompt takes several)."""
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 64)
    fake = TimedModel(step_delay=0.05, token_delay=0.002)
    eng = Engine(LoadedModel(FakeTokenizer(), fake, frozenset([EOS]), 256, torch.float32), 4)  # type: ignore[arg-type]
    prompt = "".join(chr(33 + i % 90) for i in range(200))
    eng.generate(prompt, SamplingParams(max_new_tokens=1))
    assert fake.prefills == [64, 64, 64, 8]
    fake.prefills.clear()

    def late_long() -> object:
        time.sleep(0.1)  # the short one is decoding by now (40 steps of 50 ms)
        return eng.generate(prompt[::-1], SamplingParams(max_new_tokens=1))

    in_threads([lambda: eng.generate("A", SamplingParams(max_new_tokens=40)), late_long])
    assert fake.prefills == [1] + [16] * 12 + [8]
    eng.close()


def test_beside_a_batch_no_decode_step_has_timed_a_chunk_is_untimed() -> None:
    """A prompt arrives while another's prefill runs, so every step carries a chunk and no decode
    step is timed alone: the chunks are PREFILL_UNTIMED (64), not sized from a decode time of 0."""
    fake = TimedModel(step_delay=0.05, token_delay=0.002)
    eng = Engine(LoadedModel(FakeTokenizer(), fake, frozenset([EOS]), 1024, torch.float32), 4)  # type: ignore[arg-type]
    prompt = "".join(chr(33 + i % 90) for i in range(300))

    def late_long() -> object:
        time.sleep(0.03)  # during the first one's prefill (256 tokens, 512 ms)
        return eng.generate(prompt[::-1], SamplingParams(max_new_tokens=1))

    in_threads([lambda: eng.generate(prompt[:256], SamplingParams(max_new_tokens=10)), late_long])
    assert fake.passes[:5] == [(256, 0)] + [(64, 1)] * 4
    eng.close()


def test_while_prompts_queue_for_places_a_step_prefills_two_whole_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three prompts arrive at once beside a decoding sequence: while two or more queue for free
    places the batch is starved, not stalled, so a step prefills PREFILL_QUEUED tokens (512 here)
    in passes of PREFILL_CHUNK (two prompts, then the third's start: 200 + 56, 144 + 112), the
    first carrying the decode row; once none waits, chunks cost about a decode step again (25 ms /
    1 ms: 16 tokens), each in the pass of the three decoding rows."""
    monkeypatch.setattr(engine, "PREFILL_QUEUED", 512)
    fake = TimedModel(step_delay=0.025, token_delay=0.001)
    eng = Engine(LoadedModel(FakeTokenizer(), fake, frozenset([EOS]), 256, torch.float32), 4)  # type: ignore[arg-type]
    prompt = "".join(chr(33 + i % 90) for i in range(200))
    eng.generate(prompt, SamplingParams(max_new_tokens=1))  # times a chunk
    first = eng.stream("A", SamplingParams(max_new_tokens=60))
    time.sleep(0.1)  # "A" is decoding by now, in a 25 ms step: the three below join at the next one
    fake.passes = []
    streams = [eng.stream(prompt[k:] + prompt[:k], SamplingParams(max_new_tokens=20)) for k in (1, 2, 3)]
    for stream in [first, *streams]:
        list(stream)
    passes = fake.passes[fake.passes.index((256, 1)) :]
    assert passes[:8] == [(256, 1), (256, 0)] + [(16, 3)] * 5 + [(8, 3)]
    eng.close()


def _sequence(prompt: list[int]) -> engine.Sequence:
    text = engine.TextStream(FakeTokenizer(), prompt, ())
    return engine.Sequence(prompt, SamplingParams(max_new_tokens=1), torch.Generator(), text)


def test_a_sequence_keeps_its_blocks_and_the_lowest_free_block_goes_to_the_next() -> None:
    scheduler = engine.Scheduler(max_batch=4, blocks=8)
    seqs = [_sequence([1, 2]) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
        assert scheduler.next_to_join() is seq
        scheduler.grow(seq, 2)
        seq.prefilled = 2  # fully prefilled: decoding
    assert [seq.table for seq in seqs] == [[0], [1], [2]]
    pending = _sequence([1, 2, 3, 4])
    scheduler.add(pending)
    assert scheduler.next_to_join() is pending and scheduler.grow(pending, 4) == [3]
    scheduler.postprocess([seqs[1]], [7])  # max_new_tokens=1: it ends, and block 1 is free
    assert [seq.table for seq in scheduler.running] == [[0], [2], [3]]  # nobody moved
    assert scheduler.decoding() == [seqs[0], seqs[2]]
    later = _sequence([5])
    scheduler.add(later)
    assert scheduler.next_to_join() is later and scheduler.grow(later, 1) == [1]


# --- weight formats -----------------------------------------------------------------------------


def _linear_with_both_formats(int8_rows: int) -> tuple[model.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    packed = model.pack_float(weight.clone(), max_batch=8)
    return model.Linear(32, packed, bias, model.pack_int8(weight), int8_rows), weight, bias


def test_pack_int8_is_per_channel_symmetric_and_round_trips_within_half_a_step() -> None:
    weight = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]  # channels of very different sizes
    q, scale = model.pack_int8(weight)
    assert q.dtype is torch.int8 and q.is_contiguous() and scale.dtype is torch.bfloat16
    assert int(q.abs().max()) == 127
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((q.float() * step - weight).abs() <= step / 2 + 1e-7).all()


def test_pack_int8_accepts_a_transposed_weight() -> None:
    weight = torch.randn(32, 48).t()  # GPT-2 stores [in, out]; the builder hands over a transposed view
    q, _ = model.pack_int8(weight)
    assert q.is_contiguous() and q.shape == (48, 32)


def test_linear_uses_int8_up_to_its_rows_and_float_beyond() -> None:
    linear, weight, bias = _linear_with_both_formats(int8_rows=4)
    q, scale = linear.int8  # type: ignore[misc]
    for rows in (1, 4, 5, 16):
        x = torch.randn(rows, 1, 32)
        got = linear(x)
        int8 = torch.ops.aten._weight_int8pack_mm(x.view(rows, 32).bfloat16(), q, scale).float().view(rows, 1, 48)
        if rows <= 4:
            assert torch.equal(got, int8 + bias)
        else:
            assert torch.allclose(got, F.linear(x, weight, bias), atol=1e-4)
            assert not torch.allclose(got, int8 + bias, atol=1e-4)


def test_linear_without_float_weights_always_uses_int8() -> None:
    linear, weight, bias = _linear_with_both_formats(int8_rows=model.INT8_ALWAYS)
    linear.weight = None
    x = torch.randn(64, 32)
    exact = F.linear(x, weight, bias)
    assert (linear(x) - exact).norm() / exact.norm() < 0.02  # int8 weights and bfloat16 activations: ~1%


def test_packed_float_weights_compute_what_f_linear_does() -> None:
    weight, bias = torch.randn(48, 32), torch.randn(48)
    linear = model.Linear(32, model.pack_float(weight, max_batch=8), bias)
    for shape in ((1, 32), (3, 1, 32), (2, 16, 32)):
        x = torch.randn(*shape)
        assert torch.allclose(linear(x), F.linear(x, weight, bias), atol=1e-5)


def four_bit_weight(rows: int, width: int) -> torch.Tensor:
    """A weight made of 4-bit groups as a Q4_1 checkpoint's are: codes 0..15 spanning each group
    (its minimum and maximum among them) times the group's scale, plus its offset."""
    torch.manual_seed(0)
    groups = (rows, width // model.INT4_GROUP)
    codes = torch.randint(0, 16, (*groups, model.INT4_GROUP)).float()
    codes[..., :2] = torch.tensor([0.0, 15.0])
    scale, offset = torch.rand(*groups, 1) / 50, torch.randn(*groups, 1) / 10
    return (codes * scale + offset).reshape(rows, width)


def test_pack_int4_takes_only_weights_it_holds_exactly() -> None:
    weight = four_bit_weight(48, 64)
    packed = model.pack_int4(weight)
    assert packed is not None and packed[1].shape == (64 // model.INT4_GROUP, 48, 2)
    assert model.pack_int4(torch.randn(48, 64)) is None  # a float weight: int4 would lose ~9% of it
    assert model.pack_int4(torch.randn(48, 64), exact=None) is not None  # unless told to take it anyway
    assert model.pack_int4(weight[:, :48]) is None  # widths that are no whole groups
    assert model.pack_int4(weight[:40]) is None  # rows the kernel cannot pack (it takes them in 16s)
    assert model.pack_int4(weight.t().contiguous().t()) is not None  # a transposed view, as GPT-2's


def test_pack_int4_refuses_a_weight_with_one_row_it_does_not_hold() -> None:
    weight = four_bit_weight(160, 64)
    weight[5] = torch.randn(64) * weight.std()  # one float row among 4-bit ones: the whole is held within 0.6%
    assert model.pack_int4(weight) is None


def test_linear_uses_int4_up_to_its_rows_then_the_other_formats() -> None:
    """int4 for at most `int4_rows` rows, computing x W^T from the packed codes (bfloat16
    activations); beyond, the float weight. A float weight that differs shows which one ran."""
    weight, bias = four_bit_weight(48, 64), torch.randn(48)
    other = torch.randn(48, 64)
    linear = model.Linear(64, model.pack_float(other, max_batch=8), bias, int4=model.pack_int4(weight), int4_rows=2)
    for rows in (1, 2, 3, 8):
        x = torch.randn(rows, 1, 64)
        expected = F.linear(x, weight if rows <= 2 else other, bias)
        assert (linear(x) - expected).norm() / expected.norm() < 0.02  # bfloat16 activations and scales: ~0.5%


def test_int4_serves_the_rows_int8_would_so_the_int8_copy_is_not_kept() -> None:
    convert = model.Convert(torch.float32, torch.device("cpu"), int8_rows=1, max_batch=8, int4_rows=1)
    four = convert.linear(four_bit_weight(48, 64), None)
    assert four.int4 is not None and four.int8 is None and four.weight is not None
    floats = convert.linear(torch.randn(48, 64), None)  # int4 would not hold it: int8 as before
    assert floats.int4 is None and floats.int8 is not None and floats.int8_rows == 1


def test_int4_for_fewer_rows_than_int8_keeps_int8_for_the_rows_between() -> None:
    convert = model.Convert(torch.float32, torch.device("cpu"), int8_rows=8, max_batch=16, int4_rows=1)
    linear, weight = convert.linear(four_bit_weight(48, 64), None), four_bit_weight(48, 64)
    assert linear.int4 is not None and linear.int8 is not None and linear.weight is not None
    q, scale = linear.int8
    x = torch.randn(4, 64)
    assert torch.equal(linear(x), torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale).float())
    assert (linear(x[:1]) - F.linear(x[:1], weight)).norm() / F.linear(x[:1], weight).norm() < 0.02


def test_resolve_int4_settings_and_a_measured_answer() -> None:
    cpu, four = torch.device("cpu"), four_bit_weight(64, 64)
    for setting in ("none", "int8"):  # only auto may pick int4: it is chosen for speed, per weight
        assert model.resolve_int4(setting, cpu, torch.float32, (1, 8), 0, four) == 0
    assert model.resolve_int4("auto", torch.device("cuda"), torch.float32, (1, 8), 0, four) == 0
    assert model.resolve_int4("auto", cpu, torch.float32, (1, 8), 0, torch.randn(64, 64)) == 0  # a float checkpoint
    assert model.resolve_int4("auto", cpu, torch.float32, (1, 8), 0, None) == 0
    assert model.resolve_int4("auto", cpu, torch.bfloat16, (1, 8, 32), 1, four) in (0, 1, 8, 32)


def test_resolve_int8_settings() -> None:
    cpu = torch.device("cpu")
    assert model.resolve_int8("none", cpu, torch.float32, 64, (1, 8)) == 0
    assert model.resolve_int8("int8", cpu, torch.float32, 64, (1, 8)) == model.INT8_ALWAYS
    assert model.resolve_int8("auto", torch.device("cuda"), torch.float32, 64, (1, 8)) == 0
    with pytest.raises(model.LoadError, match="QUANTIZE=int8 needs a CPU"):
        model.resolve_int8("int8", torch.device("cuda"), torch.float32, 64, (1, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resolve_int8_auto_answers_a_measured_batch_size(dtype: torch.dtype) -> None:
    """Which sizes win is the machine's business; the answer is 0, below the largest size, or always."""
    rows = model.resolve_int8("auto", torch.device("cpu"), dtype, 64, (1, 8, 32))
    assert 0 <= rows < 32 or rows == model.INT8_ALWAYS


class _Cost:
    """A stand-in for a Linear whose pass costs `per_row` a row plus `fixed`, and says so."""

    in_features = 4

    def __init__(self, per_row: float, fixed: float = 0.0):
        self.per_row, self.fixed = per_row, fixed

    def __call__(self, x: torch.Tensor) -> float:
        return self.fixed + self.per_row * x.shape[0]


@pytest.mark.parametrize(
    ("sizes", "edge"), [((1, 8, 32), 4), ((1, 2, 3, 4, 5), 4), ((1, 4), 4), ((1, 2), 2), ((8, 32), 0)]
)
def test_wins_up_to_finds_the_edge_between_the_sizes_tried(
    sizes: tuple[int, ...], edge: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A format that costs 1 a row against one that costs 4.5 whatever the rows wins up to 4
    rows: found between the sizes tried as well as at one of them; 0 when it loses at the first.
    The timing is the stand-ins' own word, so no busy machine can tip it."""
    monkeypatch.setattr(model, "_first_is_faster", lambda first, second, rounds, repeats: sum(first()) < sum(second()))
    fast, other = cast(list[model.Linear], [_Cost(1.0)]), cast(list[model.Linear], [_Cost(0.0, 4.5)])
    assert model._wins_up_to(fast, other, list(sizes), torch.float32) == edge


class _HeldUp:
    """A stand-in product that takes `seconds`, every other call `held` longer: runs that a busy
    machine (another process on one of the cores) preempts."""

    in_features = 4

    def __init__(self, seconds: float, held: float = 0.0) -> None:
        self.seconds, self.held, self.calls = seconds, held, 0

    def __call__(self, x: torch.Tensor) -> None:
        self.calls += 1
        time.sleep(self.seconds + (self.held if self.calls % 2 == 0 else 0.0))


def test_a_busy_machine_does_not_tip_a_weight_format_choice() -> None:
    """A format three times as fast wins, though every other run of it is held up: the choice
    takes the best of many short timings. (Three timings of three runs each, as before, lose it
    here; on the AMX Xeon, a second server loading beside one left it without int4.)"""
    fast, other = cast(list[model.Linear], [_HeldUp(0.002, held=0.03)]), cast(list[model.Linear], [_HeldUp(0.006)])
    assert model._wins_up_to(fast, other, [1], torch.float32) == 1


def test_the_memory_budget_is_the_setting_or_the_cgroups_limit(tmp_path: Path) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text("3221225472\n")  # compose's 3 GB
    assert engine.memory_budget(0, limit) == 3 * 2**30
    assert engine.memory_budget(512, limit) == 512 * 2**20  # MEMORY_LIMIT_MB wins
    limit.write_text("max\n")
    assert engine.memory_budget(0, limit) == 0
    assert engine.memory_budget(0, tmp_path / "missing") == 0


def test_settings_whose_worst_case_cannot_fit_are_refused_with_the_figures() -> None:
    arch = model.Architecture(12, 12, 64, 1e-5, 1024, rms_norm=False, gated_mlp=False, inv_freq=None)
    pool = model.KVPool(layers=6, blocks=32 * 1024 // model.KV_BLOCK, arch=arch, dtype=torch.float32,
                        device=torch.device("cpu"))  # fmt: skip
    loaded = LoadedModel(FakeTokenizer(), FakeModel(), frozenset([EOS]), 1024, torch.float32)
    loaded.model.pool = pool  # type: ignore[assignment]
    assert pool.bytes == 2 * 6 * 32 * 12 * 1024 * 64 * 4  # distilgpt2's shape: 1.125 GiB of keys and values
    config = engine.ModelConfig(max_batch=32)
    engine.check_memory(loaded, config, limit=0)  # no limit known: nothing to check
    engine.check_memory(loaded, config, limit=64 * 2**30)
    with pytest.raises(model.LoadError, match=r"KV cache 1152 MiB for 32768 tokens .* over the memory limit"):
        engine.check_memory(loaded, config, limit=pool.bytes)


# ---------------------------------------------------------------------------------------------
# The prefix cache


def test_a_block_digest_depends_on_every_token_before_it() -> None:
    a, b, c = [1] * model.PREFIX_BLOCK, [2] * model.PREFIX_BLOCK, [3] * model.PREFIX_BLOCK
    first, second = engine.block_digests(a + b), engine.block_digests(c + b)
    assert len(first) == 2 and first[0] != second[0] and first[1] != second[1]
    assert engine.block_digests(a + b + [9] * (model.PREFIX_BLOCK - 1)) == first  # only whole blocks


def test_the_prefix_cache_evicts_the_least_recently_used_block() -> None:
    cache = engine.PrefixCache(blocks=2)
    d1, d2, d3 = (bytes([i]) * 16 for i in range(3))
    assert cache.claim([d1, d2]) == ((0, 1), (1, 0))
    assert cache.claim([d1, d2]) == ()  # held already
    assert cache.match([d1], usable=1) == (1,)  # d1 is now the most recently used
    assert cache.claim([d3]) == ((0, 0),)  # d2's block goes to d3
    assert cache.match([d2], usable=1) == () and cache.match([d3], usable=1) == (0,)
    assert cache.match([d3], usable=0) == () and cache.used == 2


def prefix_engine(next_of: Callable[[list[int]], int], store_blocks: int = 8) -> Engine:
    fake = FakeModel(store_blocks=store_blocks, next_of=next_of)
    return Engine(LoadedModel(FakeTokenizer(), fake, frozenset([EOS]), 64, torch.float32), 4)  # type: ignore[arg-type]


def weighted_sum(history: list[int]) -> int:
    """Depends on every token and its place: a block restored wrong, or in the wrong order, shows."""
    return sum(place * token for place, token in enumerate(history, 1))


def test_a_prompt_that_starts_with_cached_blocks_prefills_only_the_rest() -> None:
    """The next token depends on the whole history, so a wrong or misplaced block changes the
    text; the fake also checks every chunk goes where the row's cached tokens end."""
    block = model.PREFIX_BLOCK
    shared = "".join(chr(ord("a") + i % 26) for i in range(2 * block))
    first, second, exact = shared + "first!", shared + "second", shared[: 2 * block]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    plain = prefix_engine(weighted_sum, store_blocks=0)
    cached = prefix_engine(weighted_sum)
    try:
        assert cached.generate(first, params).cached_tokens == 0
        prefills = len(cached.model.prefills)
        result = cached.generate(second, params)
        assert result.cached_tokens == 2 * block and cached.model.prefills[prefills:] == [len("second")]
        assert result == plain.generate(second, params)
        # A prompt of whole cached blocks still computes its last token: its logits give the first new one.
        assert cached.generate(exact, params).cached_tokens == block
        assert cached.generate(exact, params) == plain.generate(exact, params)
    finally:
        plain.close()
        cached.close()


@pytest.mark.parametrize(("pass_keys", "passes"), [(engine.PASS_KEYS, [9]), (5, [2 + 3, 4])])
def test_prompts_that_arrive_together_share_one_prefill_pass(
    monkeypatch: pytest.MonkeyPatch, pass_keys: int, passes: list[int]
) -> None:
    """Three prompts queued during a decode step go in one pass at the next (2 + 3 + 4 tokens),
    each sequence still reading only its own blocks (the fake continues each one's own history);
    but once a pass's keys reach PASS_KEYS (5), the next prompt waits for the step's next pass."""
    monkeypatch.setattr(engine, "PASS_KEYS", pass_keys)
    eng = make_engine(max_batch=4, step_delay=0.3)
    fake: FakeModel = eng.model  # type: ignore[assignment]
    try:
        first = eng.stream("A", SamplingParams(max_new_tokens=3))
        time.sleep(0.1)  # "A" is in its first decode step
        streams = [eng.stream(prompt, SamplingParams(max_new_tokens=2)) for prompt in ("BC", "DEF", "GHIJ")]
        assert [list(stream)[-1].text for stream in [first, *streams]] == ["BCD", "DE", "GH", "KL"]  # type: ignore[union-attr]
        assert fake.prefills == [1, *passes]
    finally:
        eng.close()


def test_a_prompt_whose_leading_blocks_the_pass_computes_waits_for_the_next_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prompts arriving together: one sharing a single block with the first joins its pass (and
    computes the block too), as does one unlike them; one sharing PREFIX_WAIT tokens (two blocks
    here) waits for the step's next pass, where they are cached (a pass claims its blocks for the
    cache only once it has run)."""
    block = model.PREFIX_BLOCK
    monkeypatch.setattr(engine, "PREFIX_WAIT", 2 * block)
    shared = "".join(chr(ord("a") + i % 26) for i in range(2 * block))
    prompts = [shared + "first!", shared[:block] + "other!", "unlike", shared + "second"]
    fake = FakeModel(step_delay=0.3, store_blocks=8, next_of=weighted_sum)
    eng = Engine(LoadedModel(FakeTokenizer(), fake, frozenset([EOS]), 64, torch.float32), 4)  # type: ignore[arg-type]
    plain = prefix_engine(weighted_sum, store_blocks=0)
    params = SamplingParams(max_new_tokens=4)
    try:
        first = eng.stream("A", SamplingParams(max_new_tokens=3))
        time.sleep(0.1)  # "A" is in its first decode step
        streams = [eng.stream(prompt, params) for prompt in prompts]
        results = [list(stream)[-1] for stream in streams]
        list(first)
        assert fake.prefills == [1, (2 * block + 6) + (block + 6) + 6, 6]
        assert [r.cached_tokens for r in results] == [0, 0, 0, 2 * block]  # type: ignore[union-attr]
        assert results == [plain.generate(prompt, params) for prompt in prompts]
        # Two more sharing the blocks now cached: both restore them, in one pass.
        fake.prefills.clear()
        first = eng.stream("A", SamplingParams(max_new_tokens=3))
        time.sleep(0.1)
        streams = [eng.stream(prompt, params) for prompt in (shared + "third!", shared + "fourth")]
        results = [list(stream)[-1] for stream in streams]
        assert fake.prefills == [1, 6 + 6] and [r.cached_tokens for r in results] == [2 * block] * 2  # type: ignore[union-attr]
        list(first)
    finally:
        eng.close()
        plain.close()


def test_blocks_claimed_by_a_failed_prefill_are_given_back() -> None:
    def fails(history: list[int]) -> int:
        raise RuntimeError("device fell over")

    eng = prefix_engine(fails)
    try:
        with pytest.raises(engine.GenerationFailed):
            eng.generate("x" * 2 * model.PREFIX_BLOCK, SamplingParams(max_new_tokens=2))
        assert eng.prefix.used == 0 and sorted(eng.prefix.free) == list(range(8))
    finally:
        eng.close()
