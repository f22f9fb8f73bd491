"""The model engine: one lazily loaded model, one thread that runs every request in one batch.

Requests arrive from the server's worker threads (`anyio.to_thread.run_sync` with a capacity
limiter) and call `generate`, which blocks until their text is ready. Inside, one engine thread
owns the model: each step it admits waiting sequences (a prefill each), then advances every
active sequence by one token in a single batched forward pass. A sequence joins at the next
step and leaves the step it finishes, so more clients share each pass over the weights.

The forward pass is our own lean decoder over the model's weights (GPT-2 and Llama families),
with a preallocated KV cache kept compact: active sequences always occupy rows 0..B-1.
"""

from __future__ import annotations

import collections
import gc
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("llm.engine")

FINISH_REASONS = ("length", "stop", "eos", "timeout", "cancelled")
CACHE_CHUNK = 256  # KV cache length grows (and shrinks back) in steps of this many tokens
ROW_CHUNK = 8  # and its rows in steps of this many sequences
DECODE_CONTEXT = 4  # prompt tokens decoded ahead of the continuation (see Engine._decode)


# ---------------------------------------------------------------------------------------------
# Requests, results and errors


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 50
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Result:
    text: str  # the continuation only; the server prepends the prompt
    tokens: int
    finish_reason: str


class EngineUnavailable(RuntimeError):
    """The model could not be loaded; the message says what failed and what to set."""

    def __init__(self, message: str, retry_after: int = 30):
        super().__init__(message)
        self.retry_after = retry_after  # seconds until the next load attempt


class PromptTooLong(ValueError):
    """The prompt and max_new_tokens do not fit in the model's context."""


class GenerationFailed(RuntimeError):
    """The engine failed while running this request."""


class EngineStopped(GenerationFailed):
    """The engine is shutting down, or its thread stopped; another request may load it again."""


# ---------------------------------------------------------------------------------------------
# Model configuration and loading


@dataclass(frozen=True)
class ModelConfig:
    name: str = "distilgpt2"  # a hub id or a local directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_batch: int = 32  # most sequences in flight; the server's capacity limiter has this size
    retry_seconds: float = 30.0  # after a failed load, answer 503 at once for this long
    max_context: int = 1024  # prompt + new tokens per sequence; bounds the KV cache per row
    cache_dir: str | None = None  # TRANSFORMERS_CACHE; None leaves it to HF_HOME


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _matmul_seconds(dtype: torch.dtype, rows: int, width: int) -> float:
    a = torch.randn(rows, width, dtype=dtype)
    b = torch.randn(width, 4 * width, dtype=dtype)
    a @ b  # warm-up: first calls pick kernels
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return time.perf_counter() - start


def resolve_dtype(setting: str, device: torch.device, rows: int, width: int) -> torch.dtype:
    """`auto`: bfloat16 where it is measured faster for a full batch, else float32."""
    if setting != "auto":
        return getattr(torch, setting)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast = _matmul_seconds(torch.bfloat16, rows, width) < _matmul_seconds(torch.float32, rows, width)
    return torch.bfloat16 if fast else torch.float32


def _route_library_logs(hf_logging: Any) -> None:
    """transformers and huggingface_hub print to stderr with handlers of their own, and draw
    progress bars; send their records through our (JSON) handlers instead, one line each."""
    hf_logging.disable_progress_bar()
    for name in ("transformers", "huggingface_hub"):
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True


@dataclass
class LoadedModel:
    tokenizer: Any  # a transformers tokenizer: encode(text) -> ids, decode(ids) -> text
    decoder: Decoder
    eos_ids: frozenset[int]
    max_context: int
    dtype: torch.dtype


def load_model(config: ModelConfig) -> LoadedModel:
    """Load tokenizer and weights (from the hub or a directory) and build our decoder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _route_library_logs(hf_logging)
    device = resolve_device(config.device)
    tokenizer = AutoTokenizer.from_pretrained(config.name, cache_dir=config.cache_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(config.name, cache_dir=config.cache_dir, dtype=torch.float32)
    hf_config = hf_model.config
    dtype = resolve_dtype(config.dtype, device, config.max_batch, hf_config.hidden_size)
    decoder = build_decoder(hf_model, dtype, device, config.max_batch)
    eos = hf_model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    del hf_model  # our decoder holds copies of the weights; free transformers' module tree now
    gc.collect()
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    return LoadedModel(tokenizer, decoder, eos_ids, min(decoder.max_context, config.max_context), dtype)


# ---------------------------------------------------------------------------------------------
# The decoder: a lean forward pass over the model's weights, with its own KV cache


@dataclass
class LayerWeights:
    norm1: torch.Tensor
    norm1_b: torch.Tensor | None
    qkv: torch.Tensor  # [(Hq + 2 Hkv) D, C]: query, key and value projections fused
    qkv_b: torch.Tensor | None
    out: torch.Tensor
    out_b: torch.Tensor | None
    norm2: torch.Tensor
    norm2_b: torch.Tensor | None
    up: torch.Tensor  # GPT-2: the MLP's first layer; Llama: gate and up projections fused
    up_b: torch.Tensor | None
    down: torch.Tensor
    down_b: torch.Tensor | None


@dataclass
class Architecture:
    """What differs between the families we run: norms, positions, MLP."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    max_context: int
    rms_norm: bool  # Llama: RMSNorm; GPT-2: LayerNorm with bias
    gated_mlp: bool  # Llama: down(silu(gate) * up); GPT-2: proj(gelu_tanh(fc))
    inv_freq: torch.Tensor | None  # Llama's rotary frequencies; GPT-2 learns positions
    rope_scale: float = 1.0


class KVCache:
    """Keys and values per layer, [rows, Hkv, length, D]. Both rows and length grow in chunks as
    the batch and its sequences need them, and shrink back when the batch empties: memory
    follows the load instead of being sized for the worst case up front."""

    def __init__(self, layers: int, max_rows: int, arch: Architecture, dtype: torch.dtype, device: torch.device):
        self.layers, self.max_rows, self.heads, self.dim = layers, max_rows, arch.kv_heads, arch.head_dim
        self.dtype, self.device = dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.reset()

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def _zeros(self, rows: int, length: int) -> torch.Tensor:
        # Zeros, not empty: masked positions get weight 0, and 0 * NaN garbage would still be NaN.
        return torch.zeros(rows, self.heads, length, self.dim, dtype=self.dtype, device=self.device)

    def reset(self) -> None:
        """Back to the smallest size, so memory stays flat once the batch empties."""
        self.k, self.v = [], []  # drop the old tensors before making the new ones
        self.k = [self._zeros(ROW_CHUNK, CACHE_CHUNK) for _ in range(self.layers)]
        self.v = [self._zeros(ROW_CHUNK, CACHE_CHUNK) for _ in range(self.layers)]

    def reserve(self, rows: int, length: int, keep: int) -> None:
        """Make room for `rows` rows of `length` positions, keeping the first `keep` rows."""
        if rows <= self.rows and length <= self.capacity:
            return
        rows = min(self.max_rows, max(self.rows, math.ceil(rows / ROW_CHUNK) * ROW_CHUNK))
        length = max(self.capacity, math.ceil(length / CACHE_CHUNK) * CACHE_CHUNK)
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):  # one layer at a time, so the old and new never all coexist
                new = self._zeros(rows, length)
                new[:keep, :, : old.shape[2]] = old[:keep]
                cache[i] = new

    def move(self, src: int, dst: int) -> None:
        for cache in (self.k, self.v):
            for layer in cache:
                layer[dst] = layer[src]


@dataclass
class Step:
    """One forward pass: a prefill of one sequence, or a decode of rows 0..B-1."""

    positions: torch.Tensor  # [B, T]
    prefill_row: int | None = None
    mask: torch.Tensor | None = None  # decode only: [B, 1, 1, L], True where a row may attend
    cos: torch.Tensor | None = None  # rotary tables for these positions: [B, 1, T, D]
    sin: torch.Tensor | None = None


class Decoder:
    def __init__(
        self,
        arch: Architecture,
        layers: list[LayerWeights],
        embed: torch.Tensor,
        pos_embed: torch.Tensor | None,
        final_norm: tuple[torch.Tensor, torch.Tensor | None],
        lm_head: torch.Tensor,
        max_batch: int,
    ):
        self.arch, self.layers, self.embed, self.pos_embed = arch, layers, embed, pos_embed
        self.final_norm, self.lm_head = final_norm, lm_head
        self.max_context = arch.max_context
        self.cache = KVCache(len(layers), max_batch, arch, embed.dtype, embed.device)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def prefill(self, row: int, tokens: list[int]) -> torch.Tensor:
        """Run a whole prompt into cache row `row`; return the next-token logits [V]."""
        ids = torch.tensor([tokens], device=self.device)  # [1, T]
        step = Step(positions=torch.arange(len(tokens), device=self.device)[None], prefill_row=row)
        self.cache.reserve(row + 1, len(tokens), keep=row)
        return self._forward(ids, step)[0]

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Advance rows 0..B-1 by one token each; return logits [B, V]."""
        ids = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(positions, device=self.device)[:, None]  # [B, 1]
        length = max(positions) + 1
        self.cache.reserve(len(tokens), length, keep=len(tokens))
        mask = torch.arange(length, device=self.device)[None, :] <= pos  # [B, L]
        return self._forward(ids, Step(positions=pos, mask=mask[:, None, None, :]))

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def reset(self) -> None:
        self.cache.reset()

    def _forward(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = F.embedding(ids, self.embed)  # [B, T, C]
        if self.pos_embed is not None:
            x = x + F.embedding(step.positions, self.pos_embed)
        if self.arch.inv_freq is not None:
            step.cos, step.sin = self._rotary(step.positions)
        for index, layer in enumerate(self.layers):
            x = self._layer(index, layer, x, step)
        x = self._norm(x[:, -1], *self.final_norm)  # only the last position needs logits
        return F.linear(x, self.lm_head)  # [B, V]

    def _layer(self, index: int, w: LayerWeights, x: torch.Tensor, step: Step) -> torch.Tensor:
        batch, length, _ = x.shape
        a = self.arch
        qkv = F.linear(self._norm(x, w.norm1, w.norm1_b), w.qkv, w.qkv_b)
        q, k, v = qkv.split([a.heads * a.head_dim, a.kv_heads * a.head_dim, a.kv_heads * a.head_dim], -1)
        q = q.view(batch, length, a.heads, a.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = k.view(batch, length, a.kv_heads, a.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(batch, length, a.kv_heads, a.head_dim).transpose(1, 2)
        if step.cos is not None and step.sin is not None:
            q, k = _rotate(q, step.cos, step.sin), _rotate(k, step.cos, step.sin)
        attn = self._attend(index, q, k, v, step).transpose(1, 2).reshape(batch, length, -1)
        x = x + F.linear(attn, w.out, w.out_b)
        h = F.linear(self._norm(x, w.norm2, w.norm2_b), w.up, w.up_b)
        if a.gated_mlp:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return x + F.linear(h, w.down, w.down_b)

    def _attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        keys, values = self.cache.k[index], self.cache.v[index]
        gqa = self.arch.heads != self.arch.kv_heads
        if step.prefill_row is not None:
            row, length = step.prefill_row, k.shape[2]
            keys[row, :, :length], values[row, :, :length] = k[0], v[0]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        assert step.mask is not None
        batch, length = q.shape[0], step.mask.shape[-1]
        rows, pos = torch.arange(batch, device=q.device), step.positions[:, 0]
        keys[rows, :, pos], values[rows, :, pos] = k[:, :, 0], v[:, :, 0]
        return F.scaled_dot_product_attention(
            q, keys[:batch, :, :length], values[:batch, :, :length], attn_mask=step.mask, enable_gqa=gqa
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.arch.rms_norm:
            return F.rms_norm(x, (x.shape[-1],), weight, self.arch.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.arch.eps)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.arch.inv_freq is not None
        freqs = positions[..., None].float() * self.arch.inv_freq  # [B, T, D/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D]
        scale, dtype = self.arch.rope_scale, self.embed.dtype
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def build_decoder(hf_model: Any, dtype: torch.dtype, device: torch.device, max_batch: int) -> Decoder:
    builders = {"gpt2": _gpt2_decoder, "llama": _llama_decoder}
    kind = hf_model.config.model_type
    if kind not in builders:
        raise EngineUnavailable(f"model type {kind!r} is not supported; supported types: {', '.join(sorted(builders))}")
    # Always copy: a tensor left as a view of the checkpoint keeps its whole memory map resident.
    return builders[kind](
        hf_model, lambda t: t.detach().to(device=device, dtype=dtype, copy=True).contiguous(), max_batch
    )


Cast = Callable[[torch.Tensor], torch.Tensor]


def _gpt2_decoder(model: Any, cast: Cast, max_batch: int) -> Decoder:
    cfg, body = model.config, model.transformer
    # GPT-2's Conv1D stores weights as [in, out]; F.linear wants [out, in].
    layers = [
        LayerWeights(
            cast(b.ln_1.weight), cast(b.ln_1.bias),
            cast(b.attn.c_attn.weight.t()), cast(b.attn.c_attn.bias),
            cast(b.attn.c_proj.weight.t()), cast(b.attn.c_proj.bias),
            cast(b.ln_2.weight), cast(b.ln_2.bias),
            cast(b.mlp.c_fc.weight.t()), cast(b.mlp.c_fc.bias),
            cast(b.mlp.c_proj.weight.t()), cast(b.mlp.c_proj.bias),
        )
        for b in body.h
    ]  # fmt: skip
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise EngineUnavailable(f"GPT-2 activation {cfg.activation_function!r} is not supported (gelu_new only)")
    head_dim = cfg.n_embd // cfg.n_head
    arch = Architecture(cfg.n_head, cfg.n_head, head_dim, cfg.layer_norm_epsilon, cfg.n_positions,
                        rms_norm=False, gated_mlp=False, inv_freq=None)  # fmt: skip
    embed = cast(body.wte.weight)
    final = (cast(body.ln_f.weight), cast(body.ln_f.bias))
    lm_head = _head(model, body.wte.weight, embed, cast)
    return Decoder(arch, layers, embed, cast(body.wpe.weight), final, lm_head, max_batch)


def _llama_decoder(model: Any, cast: Cast, max_batch: int) -> Decoder:
    cfg, body = model.config, model.model

    def fused(*linears: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = cast(torch.cat([m.weight for m in linears]))
        has_bias = linears[0].bias is not None
        return weight, cast(torch.cat([m.bias for m in linears])) if has_bias else None

    layers = []
    for b in body.layers:
        attn, mlp = b.self_attn, b.mlp
        qkv, qkv_b = fused(attn.q_proj, attn.k_proj, attn.v_proj)
        up, up_b = fused(mlp.gate_proj, mlp.up_proj)
        layers.append(LayerWeights(
            cast(b.input_layernorm.weight), None, qkv, qkv_b,
            cast(attn.o_proj.weight), _maybe(cast, attn.o_proj.bias),
            cast(b.post_attention_layernorm.weight), None, up, up_b,
            cast(mlp.down_proj.weight), _maybe(cast, mlp.down_proj.bias),
        ))  # fmt: skip
    rotary = body.rotary_emb  # transformers' own frequencies, so static rope scalings are honoured
    if cfg.hidden_act != "silu" or getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
        raise EngineUnavailable("Llama variants with a non-silu MLP or position-dependent rope are not supported")
    embed = cast(body.embed_tokens.weight)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    arch = Architecture(
        cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.rms_norm_eps,
        cfg.max_position_embeddings, rms_norm=True, gated_mlp=True,
        inv_freq=rotary.inv_freq.detach().float().to(embed.device),
        rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
    )  # fmt: skip
    lm_head = _head(model, body.embed_tokens.weight, embed, cast)
    return Decoder(arch, layers, embed, None, (cast(body.norm.weight), None), lm_head, max_batch)


def _head(model: Any, embedding: torch.Tensor, embed: torch.Tensor, cast: Cast) -> torch.Tensor:
    """The output projection; tied to the input embedding in small models, so share our copy."""
    tied = model.lm_head.weight.data_ptr() == embedding.data_ptr()
    return embed if tied else cast(model.lm_head.weight)


def _maybe(cast: Cast, tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else cast(tensor)


# ---------------------------------------------------------------------------------------------
# Sampling


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from float32 logits [V] with this request's own generator."""
    logits = (logits - logits.max()) / params.temperature  # <= 0 everywhere: no overflow to inf
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        ordered, order = logits.sort(descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), -math.inf)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


# ---------------------------------------------------------------------------------------------
# The batching engine


@dataclass(eq=False)
class Sequence_:
    prompt_ids: list[int]
    params: SamplingParams
    cancel: threading.Event
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    text: str | None = None  # set when a stop string cut the continuation
    finish_reason: str | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    deadline: float = math.inf  # time.monotonic() past which the sequence ends with "timeout"

    @property
    def cached(self) -> int:
        """Tokens whose keys and values are in the cache: all but the newest sampled one."""
        return len(self.prompt_ids) + len(self.generated) - 1


class Engine:
    def __init__(self, model: LoadedModel, max_batch: int):
        self.model, self.max_batch = model, max_batch
        self._waiting: collections.deque[Sequence_] = collections.deque()
        self._active: list[Sequence_] = []  # index == cache row
        self._live: set[Sequence_] = set()  # every sequence some request thread still waits for
        self._wake = threading.Condition()
        self._stopping = False
        self._expired = False  # set by expire(): every sequence ends at its next step
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- called from request threads

    def generate(
        self,
        prompt: str,
        params: SamplingParams,
        cancel: threading.Event | None = None,
        deadline: float = math.inf,
    ) -> Result:
        """Block until this prompt's continuation is done; raise on bad input or failure.

        Setting `cancel` ends the sequence at the next step; so does passing `deadline`
        (a `time.monotonic()` value), with what it has so far."""
        ids = self.model.tokenizer.encode(prompt)
        self._check_fits(len(ids), params.max_new_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        seq = Sequence_(ids, params, cancel or threading.Event(), generator, deadline=deadline)
        with self._wake:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            self._waiting.append(seq)
            self._live.add(seq)
            self._wake.notify()
        try:
            seq.done.wait()
        finally:
            with self._wake:
                self._live.discard(seq)
        if seq.error is not None:
            raise seq.error
        return self._result(seq)

    def expire(self) -> None:
        """End every sequence at its next step with finish_reason "timeout" (drain time is up)."""
        self._expired = True

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        context = self.model.max_context
        if prompt_tokens == 0:
            raise PromptTooLong("prompt encodes to no tokens")
        if prompt_tokens + max_new_tokens > context:
            raise PromptTooLong(
                f"prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} at most "
                f"{context - max_new_tokens} prompt tokens fit in the model's context of {context}"
            )

    def _result(self, seq: Sequence_) -> Result:
        assert seq.finish_reason is not None
        text = seq.text if seq.text is not None else self._decode(seq)
        return Result(text, len(seq.generated), seq.finish_reason)

    def _decode(self, seq: Sequence_) -> str:
        """The continuation's text. Decoded after a few prompt tokens and cut after them, since
        some tokenizers (SentencePiece) drop a leading space when a fragment is decoded alone."""
        ids = seq.generated[:-1] if seq.finish_reason == "eos" else seq.generated
        context = seq.prompt_ids[-DECODE_CONTEXT:]
        decode = self.model.tokenizer.decode
        head, full = decode(context, skip_special_tokens=True), decode(context + ids, skip_special_tokens=True)
        if full.startswith(head):
            return str(full[len(head) :])
        return str(decode(ids, skip_special_tokens=True))  # the context ended inside a character

    # -- the engine thread

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._admit():
                    if self._active:
                        self._decode_step()
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            log.exception("the engine thread stopped")
            with self._wake:
                self._stopping = True
                self._fail(self._unfinished(), EngineStopped, f"the engine stopped: {exc}")
                self._active, self._waiting = [], collections.deque()

    def _admit(self) -> bool:
        """Wait for work, move waiting sequences into free rows and prefill them."""
        with self._wake:
            while not (self._waiting or self._active or self._stopping):
                self._wake.wait()
            if self._stopping:
                self._fail(self._unfinished(), EngineStopped, "the engine shut down")
                return False
            joining: list[Sequence_] = []
            while self._waiting and len(self._active) + len(joining) < self.max_batch:
                joining.append(self._waiting.popleft())
        for seq in joining:
            self._prefill(seq)
        return True

    def _prefill(self, seq: Sequence_) -> None:
        if seq.cancel.is_set():  # the client left while waiting to join
            seq.finish_reason = "cancelled"
            seq.done.set()
            return
        row = len(self._active)
        try:
            logits = self.model.decoder.prefill(row, seq.prompt_ids)
            self._active.append(seq)
            self._postprocess([seq], logits[None])
        except Exception as exc:  # one bad sequence must not take the batch down
            log.exception("prefill failed")
            self._fail([seq], GenerationFailed, f"generation failed: {exc}")
            if self._active and self._active[-1] is seq:
                self._active.pop()

    def _decode_step(self) -> None:
        active = self._active
        try:
            logits = self.model.decoder.decode([s.generated[-1] for s in active], [s.cached for s in active])
        except Exception as exc:
            log.exception("decode step failed; failing the whole batch")
            self._fail(active, GenerationFailed, f"generation failed: {exc}")
            self._active = []
            self.model.decoder.reset()
            return
        self._postprocess(active, logits)

    def _postprocess(self, batch: list[Sequence_], logits: torch.Tensor) -> None:
        """Pick each sequence's next token, decide who finished, and free their rows."""
        greedy = logits.argmax(-1).tolist()
        sampling = any(seq.params.temperature for seq in batch)
        rows_logits = logits.float().cpu() if sampling else logits  # a copy only when someone samples
        finished = []
        for row, seq in enumerate(batch):
            try:
                greedy_only = seq.params.temperature == 0
                token = greedy[row] if greedy_only else sample(rows_logits[row], seq.params, seq.generator)
                if self._advance(seq, token):
                    finished.append(seq)
            except Exception as exc:
                log.exception("postprocessing a sequence failed")
                self._fail([seq], GenerationFailed, f"generation failed: {exc}")
                finished.append(seq)
        self._release(finished)

    def _advance(self, seq: Sequence_, token: int) -> bool:
        """Append the token; return True when the sequence is finished (and say why)."""
        seq.generated.append(token)
        params = seq.params
        if token in self.model.eos_ids and not params.ignore_eos:
            seq.finish_reason = "eos"
        elif params.stop and self._cut_at_stop(seq):
            seq.finish_reason = "stop"
        elif len(seq.generated) >= params.max_new_tokens:
            seq.finish_reason = "length"
        elif self._expired or time.monotonic() > seq.deadline:
            seq.finish_reason = "timeout"
        elif seq.cancel.is_set():
            seq.finish_reason = "cancelled"
        return seq.finish_reason is not None

    def _cut_at_stop(self, seq: Sequence_) -> bool:
        text = self._decode(seq)
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = text[: min(hits)]
        return bool(hits)

    def _release(self, finished: Sequence[Sequence_]) -> None:
        """Remove finished sequences, moving the last row into each hole to stay compact."""
        for seq in finished:
            row = self._active.index(seq)
            last = len(self._active) - 1
            if row != last:
                self._active[row] = self._active[last]
                self.model.decoder.move(last, row)
            self._active.pop()
        if finished and not self._active:
            self.model.decoder.reset()
        for seq in finished:
            seq.done.set()

    def _unfinished(self) -> list[Sequence_]:
        """Under the lock: waiting, active, and any held mid-step when a step broke."""
        return [seq for seq in self._live if not seq.done.is_set()]

    def _fail(self, seqs: Sequence[Sequence_], kind: type[GenerationFailed], message: str) -> None:
        for seq in seqs:
            seq.error = kind(message)  # one exception each: they are raised in different threads
            seq.done.set()


# ---------------------------------------------------------------------------------------------
# The one module-level engine, created on first use


class LazyEngine:
    """Creates the engine once. After a failed load, callers get the same error at once until
    `retry_after` seconds have passed (a hub that is down can take ~50 s to fail each time)."""

    def __init__(self, factory: Callable[[], Engine], retry_after: float = 30.0):
        self._factory, self._retry_after = factory, retry_after
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._error: Exception | None = None
        self._failed_at = -math.inf

    @property
    def loaded(self) -> Engine | None:
        return self._engine

    def get(self) -> Engine:
        with self._lock:
            if self._engine is not None and self._engine.running:
                return self._engine
            self._engine = None  # never loaded, or its thread stopped: load (again)
            wait = self._failed_at + self._retry_after - time.monotonic()
            if self._error is not None and wait > 0:
                raise EngineUnavailable(str(self._error), retry_after=math.ceil(wait))
            try:
                self._engine = self._factory()
            except Exception as exc:
                log.exception("loading the model failed")
                self._error, self._failed_at = exc, time.monotonic()
                message = str(exc) if isinstance(exc, EngineUnavailable) else f"{type(exc).__name__}: {exc}"
                raise EngineUnavailable(message, retry_after=math.ceil(self._retry_after)) from exc
            return self._engine


def create_engine(config: ModelConfig) -> Engine:
    start = time.perf_counter()
    try:
        model = load_model(config)
    except EngineUnavailable:
        raise
    except Exception as exc:
        raise EngineUnavailable(
            f"could not load model {config.name!r}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
            "Set MODEL_NAME to a readable local model directory (tools/fetch_model.py makes one) "
            "or make the model hub reachable."
        ) from exc
    log.info("model %s loaded in %.1f s (%s)", config.name, time.perf_counter() - start, model.dtype)
    return Engine(model, config.max_batch)


_engine: LazyEngine | None = None
_engine_lock = threading.Lock()


def get_engine(config: ModelConfig) -> Engine:
    """The module's single engine, loaded by the first caller (in a worker thread)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = LazyEngine(lambda: create_engine(config), config.retry_seconds)
    return _engine.get()


def loaded_engine() -> Engine | None:
    return _engine.loaded if _engine is not None else None


def reset_engine() -> None:
    """Close and forget the engine (tests; server shutdown)."""
    global _engine
    with _engine_lock:
        engine, _engine = (_engine.loaded if _engine else None), None
    if engine is not None:
        engine.close()
