"""The model engine: one lazily loaded model, one thread that runs every request in one batch.

The request path through this file: the server's worker thread (`anyio.to_thread.run_sync` under
the capacity limiter) calls `ENGINE.get()` (loads the model once) and then `Engine.generate`, which
tokenizes the prompt, hands a `Sequence` to the `Scheduler` and blocks until it is done. The engine
thread runs `Engine.step` in a loop: the scheduler admits waiting sequences into free cache rows
(a prefill each), the `Model` advances every running sequence by one token in one batched forward
pass, each `Sequence` decides whether it is finished, and the scheduler releases the finished rows.

Reading order: requests and errors; configuration and loading; the model (a lean forward pass over
the checkpoint's weights, GPT-2 and Llama families, with its own KV cache); sampling; text work
(detokenizing, stop strings); the sequence; the scheduler; the engine loop; the one module-level
engine (`ENGINE`).

Three words kept apart: the *model* is the network (`Model`), a *step* is one batched forward pass
(`Model.step`), and *detokenizing* turns token ids back into text (`detokenize`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import logging
import math
import os
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Sequence as ListLike
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("llm.engine")

FINISH_REASONS = ("length", "stop", "eos", "timeout", "cancelled")
CACHE_CHUNK = 64  # KV cache length grows (and shrinks back) in steps of this many tokens
ROW_CHUNK = 8  # and its rows in steps of this many sequences
PREFILL_BUCKET = 16  # prompts run padded to a multiple of this: few distinct shapes, so kernel caches stay small
PREFILL_CHUNK = 64  # prompt tokens prefilled per engine step: a long prompt joins over several steps
INT8_ALWAYS = 1 << 62  # `resolve_int8`'s answer when int8 weights win at every batch size: float ones are dropped
DETOKENIZE_CONTEXT = 4  # prompt tokens detokenized ahead of the continuation (see `detokenize`)
HUB, HUB_PROBE_SECONDS = "https://huggingface.co", 5  # where hub ids come from; how long to try reaching it


# ---------------------------------------------------------------------------------------------
# Requests, results and errors


@dataclass(frozen=True)
class SamplingParams:
    """One request's options. These defaults are the API's defaults: the server's validation and
    OpenAPI document read them from here."""

    max_new_tokens: int = 50
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None  # None: a random seed
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Result:
    text: str  # the continuation only; the server prepends the prompt
    tokens: int
    finish_reason: str
    # Accounting, not content: two results with the same text, tokens and reason are equal.
    prompt_tokens: int = field(default=0, compare=False)
    admitted_at: float = field(default=0.0, compare=False)  # time.monotonic() when its prefill began
    first_token_at: float = field(default=0.0, compare=False)  # ... when its first token was sampled
    finished_at: float = field(default=0.0, compare=False)  # ... when it finished


@dataclass(frozen=True)
class Delta:
    """What a streaming request gets after a step: new token ids, and the new text that is safe
    to show (see `TextStream`)."""

    token_ids: list[int]
    text: str
    tokens: int  # generated so far


class EngineUnavailable(RuntimeError):
    """The model could not be loaded; the message says what failed and what to set."""

    def __init__(self, message: str, retry_after: int):
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
    """The engine's settings; each default is written here once (the server reads it from here)."""

    name: str = field(default="distilgpt2", metadata={"env": "MODEL_NAME"})  # a hub id or a local directory
    device: str = field(default="auto", metadata={"env": "DEVICE"})  # auto | cpu | cuda | cuda:N
    dtype: str = field(default="auto", metadata={"env": "DTYPE", "choices": ("auto", "float32", "bfloat16", "float16")})
    max_batch: int = field(default=32, metadata={"env": "MAX_BATCH_SIZE"})  # the capacity limiter's size
    retry_seconds: int = field(default=30, metadata={"env": "MODEL_RETRY_SECONDS"})  # after a failed load
    max_context: int = field(default=1024, metadata={"env": "MAX_CONTEXT_TOKENS"})  # bounds each KV row
    cache_dir: str | None = field(default=None, metadata={"env": "TRANSFORMERS_CACHE"})  # None: HF_HOME
    threads: int = field(default=0, metadata={"env": "THREADS", "minimum": 0})  # 0: the CPUs we may use
    quantize: str = field(default="auto", metadata={"env": "QUANTIZE", "choices": ("auto", "none", "int8")})


def use_threads(setting: int) -> int:
    """Size torch's thread pool: THREADS when set, else the CPUs this process may use. torch's
    own default counts the host's cores, ignoring a container's CPU quota: 64 threads on 2 CPUs'
    worth of quota spend most of their time throttled."""
    threads = setting or cpu_budget()
    torch.set_num_threads(threads)
    return threads


def cpu_budget(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs in this process's affinity, capped by a cgroup v2 quota ("200000 100000" is 2 CPUs)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cpus


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX). Without it, oneDNN
    emulates bfloat16 and a batch product runs ~4x slower than float32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _first_is_faster(first: Callable[[], object], second: Callable[[], object], rounds: int, repeats: int) -> bool:
    """Whether `first` runs faster than `second`: the best of `rounds` timings each, taken in
    turns so a busy machine cannot tip it, each of `repeats` runs after a warm-up call (first
    calls pick kernels)."""

    def seconds(run: Callable[[], object]) -> float:
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        return time.perf_counter() - start

    timings = [(seconds(first), seconds(second)) for _ in range(rounds)]
    return min(a for a, _ in timings) < min(b for _, b in timings)


def resolve_dtype(setting: str, device: torch.device, rows: int, width: int) -> torch.dtype:
    """`auto`: on CUDA bfloat16; on a CPU with native bfloat16, bfloat16 where a batch-sized
    product measures faster (best of five, interleaved, so a busy machine cannot tip it); else
    float32."""
    if setting != "auto":
        return getattr(torch, setting)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not native_bfloat16():
        return torch.float32
    a, b = torch.randn(rows, width), torch.randn(width, 4 * width)
    a16, b16 = a.bfloat16(), b.bfloat16()
    faster = _first_is_faster(lambda: a16 @ b16, lambda: a @ b, rounds=5, repeats=10)
    return torch.bfloat16 if faster else torch.float32


def int8_kernel() -> bool:
    """Whether this torch has its CPU kernel for int8 weights with bfloat16 activations."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def pack_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight-only: [out, in] int8 with one symmetric scale per output channel (max |w| / 127),
    the scales in bfloat16 as the kernel takes them. bench/quality.py measures the cost in
    perplexity (+0.6% on SmolLM2; the issue's rule is at most 1%)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.bfloat16)


def pack_float(weight: torch.Tensor, max_batch: int) -> torch.Tensor:
    """On a CPU, oneDNN's own blocked layout of a float weight, made once: its products skip the
    per-call reordering F.linear pays (1.5-2x faster at batch 4-64 in bench/README.md)."""
    native = weight.dtype is torch.float32 or (weight.dtype is torch.bfloat16 and native_bfloat16())
    if weight.device.type != "cpu" or not native or not torch.backends.mkldnn.is_available():
        return weight  # oneDNN refuses to pack bfloat16 for a CPU that only emulates it
    return torch.ops.mkldnn._reorder_linear_weight(weight, max_batch)  # type: ignore[no-any-return]


def resolve_int8(setting: str, device: torch.device, dtype: torch.dtype, width: int, batches: Iterable[int]) -> int:
    """Up to how many rows (tokens in one forward pass) a product runs on int8 weights; 0: never.
    `int8`: always; `none`: never; `auto` (a CPU with the kernel): time products over several
    MLP-sized weights (so they stream from memory as a step's do) with float weights and with
    int8 at each batch size, best of three, and use int8 up to the largest size where it wins at
    every size below. Small batches read weights, and int8 reads a quarter of float32's bytes;
    large ones compute, where float weights win."""
    if setting == "none" or (setting == "auto" and (device.type != "cpu" or not int8_kernel())):
        return 0
    if setting == "int8":
        if device.type != "cpu" or not int8_kernel():
            raise EngineUnavailable("QUANTIZE=int8 needs a CPU and torch's int8 kernel; use none", retry_after=0)
        return INT8_ALWAYS
    sizes = sorted(set(batches))
    weights = [torch.randn(4 * width, width) * width**-0.5 for _ in range(8)]
    floats = [Linear(width, pack_float(w.to(dtype), sizes[-1]), None) for w in weights]
    int8s = [Linear(width, None, None, pack_int8(w), INT8_ALWAYS) for w in weights]
    rows = 0
    for batch in sizes:
        x = torch.randn(batch, width, dtype=dtype)
        int8_pass, float_pass = (lambda x=x: [f(x) for f in int8s]), (lambda x=x: [f(x) for f in floats])
        if not _first_is_faster(int8_pass, float_pass, rounds=3, repeats=3):
            break
        rows = batch
    return INT8_ALWAYS if rows == sizes[-1] else rows


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
    model: Model
    eos_ids: frozenset[int]
    max_context: int
    dtype: torch.dtype
    int8_rows: int = 0  # `resolve_int8`'s choice

    @property
    def weights(self) -> str:
        """The weight format in words, for the load log line."""
        if self.int8_rows == INT8_ALWAYS:
            return "int8"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"int8 up to {self.int8_rows} rows, else {dtype}" if self.int8_rows else dtype


def _offline(config: ModelConfig) -> bool:
    """Whether to load without asking the hub: a local directory, or a hub id already in the cache.
    A hub id that must be downloaded while the hub cannot be reached fails here at once: the hub
    client's own retries would hold the first request ~50 s before it fails anyway."""
    from transformers import AutoConfig

    if Path(config.name).is_dir():
        return True
    try:
        AutoConfig.from_pretrained(config.name, cache_dir=config.cache_dir, local_files_only=True)
        return True  # cached (the weights come with it when the download once finished)
    except OSError:
        pass
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", HUB)).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        raise EngineUnavailable(
            f"model {config.name!r} is not a local directory nor cached, and the hub ({host}) is unreachable: "
            f"{exc}. In Docker: make models/smollm2-135m-instruct/config.json on the host, then docker compose "
            "-f docker-compose.yml -f docker-compose.offline.yml up. Elsewhere: set MODEL_NAME to a local model "
            "directory (tools/fetch_model.py makes one), or give this host access to the hub.",
            retry_after=0,
        ) from None
    return False


def _return_freed_memory() -> None:
    """glibc keeps freed heap pages for reuse; hand back what loading left (transformers' copy of
    the weights, the load-time timings): 50-90 MB of resident memory with SmolLM2."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_model(config: ModelConfig) -> LoadedModel:
    """Load tokenizer and weights (from the hub or a directory) and build our `Model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _route_library_logs(hf_logging)
    device = resolve_device(config.device)
    where = {"cache_dir": config.cache_dir, "local_files_only": _offline(config)}
    tokenizer = AutoTokenizer.from_pretrained(config.name, **where)
    hf_model = AutoModelForCausalLM.from_pretrained(config.name, dtype=torch.float32, **where)
    width = hf_model.config.hidden_size
    dtype = resolve_dtype(config.dtype, device, config.max_batch, width)
    int8_rows = resolve_int8(config.quantize, device, dtype, width, (1, 8, config.max_batch, PREFILL_CHUNK))
    model = build_model(hf_model, Convert(dtype, device, int8_rows, config.max_batch))
    eos = hf_model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    del hf_model  # our Model holds copies of the weights; free transformers' module tree now
    gc.collect()
    _return_freed_memory()
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    return LoadedModel(tokenizer, model, eos_ids, min(model.max_context, config.max_context), dtype, int8_rows)


# ---------------------------------------------------------------------------------------------
# The model: a lean forward pass over the checkpoint's weights, with its own KV cache


@dataclass
class Linear:
    """One projection, x W^T + b, in the weight formats `resolve_int8` chose at load: float
    (`pack_float`'s layout, in the model's dtype), int8 weight-only (`pack_int8`), or both, with
    int8 for inputs of at most `int8_rows` rows."""

    in_features: int
    weight: torch.Tensor | None  # float; None when int8 wins at every batch size
    bias: torch.Tensor | None
    int8: tuple[torch.Tensor, torch.Tensor] | None = None  # int8 weight [out, in], bfloat16 scales [out]
    int8_rows: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor
        if self.int8 is not None and (self.weight is None or x.numel() <= self.int8_rows * self.in_features):
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # the kernel's activation dtype
            out = torch.ops.aten._weight_int8pack_mm(flat, *self.int8).to(x.dtype).view(*x.shape[:-1], -1)
            return out if self.bias is None else out + self.bias
        assert self.weight is not None
        if self.weight.is_mkldnn:
            out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return out
        return F.linear(x, self.weight, self.bias)


@dataclass
class Embedding:
    """Token ids to vectors: a float table; or, when the output head is the same (tied) matrix
    and keeps an int8 copy anyway, that copy's rows times their scales. The float table (113 MB
    for SmolLM2) then is not kept beside the head's packed float copy, which runs 2x faster than
    F.linear over the table at batch 32 (bench/README.md)."""

    table: torch.Tensor  # [V, C], float in the model's dtype, or int8
    dtype: torch.dtype  # the model's
    scale: torch.Tensor | None = None  # [V] float32, with an int8 table

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.table)
        if self.scale is None:
            return rows
        return (rows.float() * self.scale[ids][..., None]).to(self.dtype)


@dataclass
class LayerWeights:
    norm1: torch.Tensor
    norm1_b: torch.Tensor | None
    qkv: Linear  # query, key and value projections fused: [(Hq + 2 Hkv) D, C]
    out: Linear
    norm2: torch.Tensor
    norm2_b: torch.Tensor | None
    up: Linear  # GPT-2: the MLP's first layer; Llama: gate and up projections fused
    down: Linear


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
                new, kept = self._zeros(rows, length), min(keep, old.shape[0])
                new[:kept, :, : old.shape[2]] = old[:kept]
                cache[i] = new

    def move(self, src: int, dst: int) -> None:
        for cache in (self.k, self.v):
            for layer in cache:
                layer[dst] = layer[src]


@dataclass(frozen=True)
class Batch:
    """What one forward pass needs besides token ids, computed before it starts: a prefill of
    one sequence into one cache row, or a step of rows 0..B-1."""

    positions: torch.Tensor  # [B, T]
    prefill_row: int | None = None
    prefill_start: int = 0  # a later chunk of a prompt: the positions already in the row's cache
    mask: torch.Tensor | None = None  # where positions may attend: later chunks [1, 1, T, L] bool; step see `step`
    slots: torch.Tensor | None = None  # step only: [B Hkv], where each row's new key goes in a flat cache layer
    cos: torch.Tensor | None = None  # rotary tables for these positions: [B, T, 1, D]
    sin: torch.Tensor | None = None


class Model:
    """The network: weights, KV cache, and the two forward passes the engine runs."""

    def __init__(
        self,
        arch: Architecture,
        layers: list[LayerWeights],
        embed: Embedding,
        pos_embed: torch.Tensor | None,
        final_norm: tuple[torch.Tensor, torch.Tensor | None],
        lm_head: Linear,
        max_batch: int,
    ):
        self.arch, self.layers, self.embed, self.pos_embed = arch, layers, embed, pos_embed
        self.final_norm, self.lm_head = final_norm, lm_head
        self.max_context = arch.max_context
        self.dtype, self.device = embed.dtype, embed.table.device
        self.cache = KVCache(len(layers), max_batch, arch, self.dtype, self.device)

    def prefill(self, row: int, tokens: list[int], start: int = 0) -> torch.Tensor:
        """Run prompt tokens into cache row `row` at positions start.. (a whole prompt, or one
        chunk of it after `start` tokens already cached); return the next-token logits [V].

        The tokens are padded to a multiple of PREFILL_BUCKET: each new input shape costs the
        matrix libraries a kernel (and its memory) of its own. Causal attention keeps the padding
        out of the real positions, and later chunks and steps overwrite its cache entries before
        any position attends to them."""
        length = len(tokens)
        padded = min(math.ceil(length / PREFILL_BUCKET) * PREFILL_BUCKET, max(self.max_context - start, length))
        ids = torch.tensor([tokens + [tokens[-1]] * (padded - length)], device=self.device)  # [1, T]
        positions = torch.arange(start, start + padded, device=self.device)[None]  # [1, T]
        self.cache.reserve(row + 1, start + padded, keep=row + 1)
        mask = None
        if start:  # attend to the cached chunks and causally within this one: [1, 1, T, start + T]
            mask = (torch.arange(start + padded, device=self.device)[None, :] <= positions[0, :, None])[None, None]
        batch = self._batch(positions, prefill_row=row, prefill_start=start, mask=mask)
        return self._forward(ids, batch, last=length - 1)[0]

    def step(self, tokens: list[int], positions: list[int], rows: int = 0) -> torch.Tensor:
        """Advance rows 0..B-1 by one token each; return logits [B, V]. `rows` rows in all are in
        use (one past B when a prompt is being prefilled in chunks), and kept if the cache grows."""
        ids = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(positions, device=self.device)[:, None]  # [B, 1]
        length, rows = max(positions) + 1, max(rows, len(tokens))
        self.cache.reserve(rows, length, keep=rows)
        visible = torch.arange(length, device=self.device)[None, :] <= pos  # [B, L]
        # Additive, in the model's dtype, laid out as `_attend` groups the heads, made once a step.
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, -math.inf)
        size, heads, per_group = len(tokens), self.arch.kv_heads, self.arch.heads // self.arch.kv_heads
        grouped = mask[:, None, None, :].expand(size, heads, per_group, length).reshape(size * heads, per_group, length)
        # Row r's key for head h goes to cache[r, h, p]: in a layer seen as [R Hkv L, D], index
        # (r Hkv + h) L + p. One index_copy_ per layer; indexing rows and positions together is slower.
        rows_heads = (
            torch.arange(size, device=self.device)[:, None] * heads + torch.arange(heads, device=self.device)[None, :]
        )
        slots = (rows_heads * self.cache.capacity + pos).flatten()  # [B Hkv]
        return self._forward(ids, self._batch(pos, mask=grouped, slots=slots))

    def reserve(self, rows: int, length: int) -> None:
        """Room in the cache for `rows` rows of `length` positions, keeping those rows."""
        self.cache.reserve(rows, length, keep=rows)

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def reset(self) -> None:
        self.cache.reset()

    def _batch(self, positions: torch.Tensor, **kinds: Any) -> Batch:
        if self.arch.inv_freq is None:
            return Batch(positions, **kinds)
        cos, sin = self._rotary(positions)
        return Batch(positions, cos=cos, sin=sin, **kinds)

    def _forward(self, ids: torch.Tensor, batch: Batch, last: int = -1) -> torch.Tensor:
        x = self.embed(ids)  # [B, T, C]
        if self.pos_embed is not None:
            x = x + F.embedding(batch.positions, self.pos_embed)
        for index, layer in enumerate(self.layers):
            x = self._layer(index, layer, x, batch)
        x = self._norm(x[:, last], *self.final_norm)  # only the last real position needs logits
        return self.lm_head(x)  # [B, V]

    def _layer(self, index: int, w: LayerWeights, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        size, length, _ = x.shape
        a = self.arch
        qkv = w.qkv(self._norm(x, w.norm1, w.norm1_b)).view(size, length, a.heads + 2 * a.kv_heads, a.head_dim)
        qk, v = qkv.split([a.heads + a.kv_heads, a.kv_heads], 2)
        if batch.cos is not None and batch.sin is not None:
            qk = _rotate(qk, batch.cos, batch.sin)  # queries and keys in one pass
        q, k = qk.transpose(1, 2).split([a.heads, a.kv_heads], 1)  # [B, Hq, T, D], [B, Hkv, T, D]
        attn = self._attend(index, q, k, v.transpose(1, 2), batch).transpose(1, 2).reshape(size, length, -1)
        x = x + w.out(attn)
        h = w.up(self._norm(x, w.norm2, w.norm2_b))
        if a.gated_mlp:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return x + w.down(h)

    def _attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        keys, values = self.cache.k[index], self.cache.v[index]
        if batch.prefill_row is not None:
            gqa = self.arch.heads != self.arch.kv_heads
            row, start, end = batch.prefill_row, batch.prefill_start, batch.prefill_start + k.shape[2]
            keys[row, :, start:end], values[row, :, start:end] = k[0], v[0]
            if not start:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            past_k, past_v = keys[row : row + 1, :, :end], values[row : row + 1, :, :end]
            return F.scaled_dot_product_attention(q, past_k, past_v, attn_mask=batch.mask, enable_gqa=gqa)
        assert batch.mask is not None and batch.slots is not None
        size, heads, _, dim = q.shape
        groups, per_group, length = batch.mask.shape
        keys.view(-1, dim).index_copy_(0, batch.slots, k[:, :, 0].reshape(-1, dim))
        values.view(-1, dim).index_copy_(0, batch.slots, v[:, :, 0].reshape(-1, dim))
        # One new token per row: the query heads that share a key head stand where a prompt's
        # positions would ([B Hkv, Hq/Hkv, D]), so each key head is read once and GQA copies
        # nothing. Two batched products (the mask added by the first) beat SDPA's flash kernel,
        # made for long queries, by ~2x at batch 32 (bench/README.md).
        grouped = q.reshape(groups, per_group, dim)
        past_k = keys[:size, :, :length].reshape(groups, length, dim)  # views: rows and heads merge
        past_v = values[:size, :, :length].reshape(groups, length, dim)
        scores = torch.baddbmm(batch.mask, grouped, past_k.transpose(1, 2), alpha=dim**-0.5)
        return torch.bmm(torch.softmax(scores, dim=-1), past_v).view(size, heads, 1, dim)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.arch.rms_norm:
            return F.rms_norm(x, (x.shape[-1],), weight, self.arch.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.arch.eps)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.arch.inv_freq is not None
        freqs = positions[..., None].float() * self.arch.inv_freq  # [B, T, D/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, :, None]  # [B, T, 1, D]: one table for every head
        scale, dtype = self.arch.rope_scale, self.dtype
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class Convert:
    """Copies checkpoint tensors into the model's dtype and device, and projections into `Linear`s
    of the chosen weight formats. Always copies: a tensor left as a view of the checkpoint keeps
    its whole memory map resident."""

    dtype: torch.dtype
    device: torch.device
    int8_rows: int
    max_batch: int  # the model's rows; oneDNN packs float weights for products of this size

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device=self.device, dtype=self.dtype, copy=True).contiguous()

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        int8 = pack_int8(weight) if self.int8_rows else None
        bias = None if bias is None else self(bias)
        if self.int8_rows == INT8_ALWAYS:
            return Linear(weight.shape[1], None, bias, int8, self.int8_rows)
        return Linear(weight.shape[1], pack_float(self(weight), self.max_batch), bias, int8, self.int8_rows)


def build_model(hf_model: Any, convert: Convert) -> Model:
    builders = {"gpt2": _gpt2_model, "llama": _llama_model}
    kind = hf_model.config.model_type
    if kind not in builders:
        raise EngineUnavailable(
            f"model type {kind!r} is not supported; supported types: {', '.join(sorted(builders))}", retry_after=0
        )
    return builders[kind](hf_model, convert)


def _gpt2_model(model: Any, cast: Convert) -> Model:
    cfg, body = model.config, model.transformer
    # GPT-2's Conv1D stores weights as [in, out]; F.linear wants [out, in].
    layers = [
        LayerWeights(
            cast(b.ln_1.weight), cast(b.ln_1.bias),
            cast.linear(b.attn.c_attn.weight.t(), b.attn.c_attn.bias),
            cast.linear(b.attn.c_proj.weight.t(), b.attn.c_proj.bias),
            cast(b.ln_2.weight), cast(b.ln_2.bias),
            cast.linear(b.mlp.c_fc.weight.t(), b.mlp.c_fc.bias),
            cast.linear(b.mlp.c_proj.weight.t(), b.mlp.c_proj.bias),
        )
        for b in body.h
    ]  # fmt: skip
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise EngineUnavailable(
            f"GPT-2 activation {cfg.activation_function!r} is not supported (gelu_new only)", retry_after=0
        )
    head_dim = cfg.n_embd // cfg.n_head
    arch = Architecture(cfg.n_head, cfg.n_head, head_dim, cfg.layer_norm_epsilon, cfg.n_positions,
                        rms_norm=False, gated_mlp=False, inv_freq=None)  # fmt: skip
    final = (cast(body.ln_f.weight), cast(body.ln_f.bias))
    embed, lm_head = _embedding_and_head(model, body.wte.weight, cast)
    return Model(arch, layers, embed, cast(body.wpe.weight), final, lm_head, cast.max_batch)


def _llama_model(model: Any, cast: Convert) -> Model:
    cfg, body = model.config, model.model

    def fused(*linears: Any) -> Linear:
        has_bias = linears[0].bias is not None
        return cast.linear(
            torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears]) if has_bias else None
        )

    layers = []
    for b in body.layers:
        attn, mlp = b.self_attn, b.mlp
        layers.append(LayerWeights(
            cast(b.input_layernorm.weight), None, fused(attn.q_proj, attn.k_proj, attn.v_proj),
            cast.linear(attn.o_proj.weight, attn.o_proj.bias),
            cast(b.post_attention_layernorm.weight), None, fused(mlp.gate_proj, mlp.up_proj),
            cast.linear(mlp.down_proj.weight, mlp.down_proj.bias),
        ))  # fmt: skip
    rotary = body.rotary_emb  # transformers' own frequencies, so static rope scalings are honoured
    if cfg.hidden_act != "silu" or getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
        raise EngineUnavailable(
            "Llama variants with a non-silu MLP or position-dependent rope are not supported", retry_after=0
        )
    embed, lm_head = _embedding_and_head(model, body.embed_tokens.weight, cast)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    arch = Architecture(
        cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.rms_norm_eps,
        cfg.max_position_embeddings, rms_norm=True, gated_mlp=True,
        inv_freq=rotary.inv_freq.detach().float().to(cast.device),
        rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
    )  # fmt: skip
    return Model(arch, layers, embed, None, (cast(body.norm.weight), None), lm_head, cast.max_batch)


def _embedding_and_head(model: Any, embedding: torch.Tensor, cast: Convert) -> tuple[Embedding, Linear]:
    """The input embedding and the output projection, which small models tie (see `Embedding`)."""
    head = cast.linear(model.lm_head.weight, None)
    tied = model.lm_head.weight.data_ptr() == embedding.data_ptr()
    if tied and head.int8 is not None:
        table, scale = head.int8
        return Embedding(table, cast.dtype, scale.float()), head
    return Embedding(cast(embedding), cast.dtype), head


# ---------------------------------------------------------------------------------------------
# Sampling


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from float32 logits [V] with this request's own generator. The most likely
    token always stays a candidate, so no accepted top_p, top_k or temperature leaves none."""
    raw, logits = logits, (logits - logits.max()) / params.temperature  # <= 0 everywhere: no overflow to inf
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the token that crosses top_p
        drop[0] = False  # a top_p below float32's smallest number would otherwise drop every token
        logits = logits.masked_fill(drop.scatter(0, order, drop), -math.inf)
    probs = logits.softmax(-1)
    if not bool(torch.isfinite(probs).all()):  # NaN logits from the model itself: fall back to greedy
        return int(raw.nan_to_num(-math.inf).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------------------------------
# Text work: token ids back to text, stop strings


def detokenize(tokenizer: Any, prompt_ids: list[int], ids: list[int]) -> str:
    """The continuation's text. Detokenized after a few prompt tokens and cut after them, since
    some tokenizers (SentencePiece) drop a leading space when a fragment is detokenized alone.
    No clean-up of spaces before punctuation: with it, a text could stop being the start of the
    same text one token longer, and streamed pieces would not add up to the whole."""

    def text(part: list[int]) -> str:
        return str(tokenizer.decode(part, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    context = prompt_ids[-DETOKENIZE_CONTEXT:]
    head, full = text(context), text(context + ids)
    if full.startswith(head):
        return full[len(head) :]
    return text(ids)  # the context ended inside a character


class TextStream:
    """Turns a growing list of token ids into text pieces that never need taking back: a
    character still split across tokens (shown as U+FFFD) is held back until it is whole, and so
    is any ending that could still grow into a stop string; a complete stop string and what follows
    are never sent. `finish` sends the rest of the final text, so the pieces add up to it exactly."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: tuple[str, ...]):
        self.tokenizer, self.prompt_ids, self.stops = tokenizer, prompt_ids, stops
        self.sent = ""

    def update(self, ids: list[int]) -> str:
        text = detokenize(self.tokenizer, self.prompt_ids, ids)
        cut = cut_at_stop(text, self.stops)
        safe = cut if cut is not None else text[: len(text) - self._held_back(text)]
        return self._send(safe)

    def finish(self, final_text: str) -> str:
        return self._send(final_text)

    def _held_back(self, text: str) -> int:
        """How many characters at the end may not be sent yet."""
        whole = text.rstrip("\ufffd")  # what the next token may still complete into a stop string
        could_stop = max((n for stop in self.stops for n in range(1, len(stop)) if whole.endswith(stop[:n])), default=0)
        return len(text) - len(whole) + could_stop

    def _send(self, safe: str) -> str:
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""  # nothing new (or the tokenizer rewrote the past: wait for the final text)
        delta, self.sent = safe[len(self.sent) :], safe
        return delta


def cut_at_stop(text: str, stops: Iterable[str]) -> str | None:
    """The text before the earliest stop string, or None when none occurs."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else None


# ---------------------------------------------------------------------------------------------
# A sequence: one request's tokens and state; it knows when it is finished


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    cancel: threading.Event = field(default_factory=threading.Event)  # set: end at the next step
    deadline: float = math.inf  # time.monotonic() past which the sequence ends with "timeout"
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache (a long prompt joins in chunks)
    text: str | None = None  # set when a stop string cut the continuation
    finish_reason: str | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    updated: threading.Event = field(default_factory=threading.Event)  # set at each new token (streaming)
    admitted_at: float = 0.0  # time.monotonic() stamps, for the timing headers and metrics
    first_token_at: float = 0.0
    finished_at: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    @property
    def cached(self) -> int:
        """Tokens whose keys and values are in the cache: all but the newest sampled one."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def append(self, token: int, eos_ids: frozenset[int], tokenizer: Any, expired: bool) -> bool:
        """Take the next token; return True when the sequence is finished (and record why)."""
        self.generated.append(token)
        if len(self.generated) == 1:
            self.first_token_at = time.monotonic()
        self.finish_reason = self._finish_reason(token, eos_ids, tokenizer, expired)
        self.updated.set()
        return self.finish_reason is not None

    def _finish_reason(self, token: int, eos_ids: frozenset[int], tokenizer: Any, expired: bool) -> str | None:
        params = self.params
        if token in eos_ids and not params.ignore_eos:
            return "eos"
        if params.stop:
            self.text = cut_at_stop(detokenize(tokenizer, self.prompt_ids, self.generated), params.stop)
            if self.text is not None:
                return "stop"
        if len(self.generated) >= params.max_new_tokens:
            return "length"
        if expired or time.monotonic() > self.deadline:
            return "timeout"
        if self.cancel.is_set():
            return "cancelled"
        return None

    def result(self, tokenizer: Any) -> Result:
        assert self.finish_reason is not None
        if self.text is None:
            ids = self.generated[:-1] if self.finish_reason == "eos" else self.generated
            self.text = detokenize(tokenizer, self.prompt_ids, ids)
        return Result(self.text, len(self.generated), self.finish_reason, len(self.prompt_ids),
                      self.admitted_at, self.first_token_at, self.finished_at)  # fmt: skip

    def end(self) -> None:
        """Hand the sequence back to its request thread (finish_reason or error is set)."""
        self.finished_at = time.monotonic()
        self.done.set()
        self.updated.set()

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.end()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.end()


# ---------------------------------------------------------------------------------------------
# The scheduler: the waiting queue and the cache rows


class Scheduler:
    """Owns which sequence waits and which runs in which cache row. Running sequences always
    occupy rows 0..B-1 (`running[i]` is in row i), so a step is one slice of the cache. At most
    one of them is still being prefilled, in chunks; it is always the last, so the decoding ones
    stay rows 0..B-2. Request threads add sequences; the engine thread does everything else."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._live: set[Sequence] = set()  # every sequence some request thread still waits for
        self._wake = threading.Condition()
        self.stopping = False

    def add(self, seq: Sequence) -> None:
        with self._wake:
            if self.stopping:
                raise EngineStopped("the engine is shutting down")
            self.waiting.append(seq)
            self._live.add(seq)
            self._wake.notify()

    def forget(self, seq: Sequence) -> None:
        with self._wake:
            self._live.discard(seq)

    def stop(self) -> None:
        with self._wake:
            self.stopping = True
            self._wake.notify()

    def wait_for_work(self) -> bool:
        """Block until something waits or runs; False once the engine is stopping."""
        with self._wake:
            while not (self.waiting or self.running or self.stopping):
                self._wake.wait()
            return not self.stopping

    def prefilling(self) -> Sequence | None:
        return self.running[-1] if self.running and self.running[-1].prefilling else None

    def decoding(self) -> list[Sequence]:
        return self.running[:-1] if self.prefilling() else self.running[:]

    def next_to_join(self) -> Sequence | None:
        """The next waiting sequence, placed in the next free row, if a row is free and no other
        prompt is still being prefilled."""
        with self._wake:
            if not self.waiting or len(self.running) >= self.max_batch or self.prefilling():
                return None
            self.running.append(self.waiting.popleft())
            return self.running[-1]

    def release(self, finished: ListLike[Sequence]) -> list[tuple[int, int]]:
        """Remove finished sequences, moving the last decoding row into each hole (and the one
        being prefilled after it) to stay compact; return the (from, to) row moves the KV cache
        must copy, in order."""
        moves = []
        for seq in finished:
            pending = self.prefilling()
            if seq is not pending:
                row, last = self.running.index(seq), len(self.running) - (2 if pending else 1)
                if row != last:
                    self.running[row] = self.running[last]
                    moves.append((last, row))
                if pending:
                    self.running[last] = pending
                    moves.append((last + 1, last))
            self.running.pop()
        return moves

    def unfinished(self) -> list[Sequence]:
        """Waiting, running, and any held mid-step when a step broke."""
        with self._wake:
            return [seq for seq in self._live if not seq.done.is_set()]

    def clear(self) -> None:
        with self._wake:
            self.running, self.waiting = [], collections.deque()


# ---------------------------------------------------------------------------------------------
# The engine: the API for request threads, and the loop of the engine thread


StepObserver = Callable[[str, float, int], None]  # (kind "prefill" or "decode", seconds, sequences)


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch: int, observe: StepObserver | None = None):
        self.loaded, self.model = loaded, loaded.model
        self.scheduler = Scheduler(max_batch)
        self.observe = observe or (lambda kind, seconds, size: None)
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
        seq = self._submit(prompt, params, cancel, deadline)
        try:
            seq.done.wait()
        finally:
            self.scheduler.forget(seq)
        return self._result(seq)

    def stream(
        self,
        prompt: str,
        params: SamplingParams,
        cancel: threading.Event | None = None,
        deadline: float = math.inf,
    ) -> Iterator[Delta | Result]:
        """Like `generate`, but yield a `Delta` whenever new tokens arrive, then the `Result`. The
        deltas' texts add up to the result's text."""
        seq = self._submit(prompt, params, cancel, deadline)
        text, seen = TextStream(self.loaded.tokenizer, seq.prompt_ids, params.stop), 0
        try:
            while not seq.done.is_set():
                seq.updated.wait()
                seq.updated.clear()
                ids = seq.generated[:]  # a snapshot: the engine thread appends meanwhile
                piece = text.update(ids) if len(ids) > seen and not seq.done.is_set() else ""
                if piece:  # token ids whose text is held back go out with the next piece
                    yield Delta(ids[seen:], piece, len(ids))
                    seen = len(ids)
        finally:
            self.scheduler.forget(seq)
        result = self._result(seq)
        if result.tokens > seen or text.sent != result.text:
            yield Delta(seq.generated[seen:], text.finish(result.text), result.tokens)
        yield result

    def _submit(self, prompt: str, params: SamplingParams, cancel: threading.Event | None, deadline: float) -> Sequence:
        ids = self.loaded.tokenizer.encode(prompt)
        self._check_fits(len(ids), params.max_new_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(ids, params, torch.Generator().manual_seed(seed), cancel or threading.Event(), deadline)
        self.scheduler.add(seq)
        return seq

    def _result(self, seq: Sequence) -> Result:
        if seq.error is not None:
            raise seq.error
        return seq.result(self.loaded.tokenizer)

    def expire(self) -> None:
        """End every sequence at its next step with finish_reason "timeout" (drain time is up)."""
        self._expired = True

    def close(self) -> None:
        self.scheduler.stop()
        self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        return len(self.scheduler.running)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.scheduler.stopping

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        context = self.loaded.max_context
        if prompt_tokens == 0:
            raise PromptTooLong("prompt encodes to no tokens")
        if prompt_tokens + max_new_tokens > context:
            raise PromptTooLong(
                f"prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} at most "
                f"{context - max_new_tokens} prompt tokens fit in the model's context of {context}"
            )

    # -- the engine thread

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self.step():
                    pass
            self._fail(self.scheduler.unfinished(), EngineStopped("the engine shut down"))
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            log.exception("the engine thread stopped")
            self.scheduler.stop()
            self._fail(self.scheduler.unfinished(), EngineStopped(f"the engine stopped: {exc}"))
            self.scheduler.clear()

    def step(self) -> bool:
        """One round: prefill up to PREFILL_CHUNK prompt tokens (finishing a long prompt's chunks
        first, then joining waiting sequences), then advance the decoding sequences by one token.
        A long prompt thus never stalls the batch for more than one chunk. Returns False once the
        engine is stopping."""
        if not self.scheduler.wait_for_work():
            return False
        budget = PREFILL_CHUNK
        while budget > 0 and (seq := self.scheduler.prefilling() or self.scheduler.next_to_join()):
            budget -= self._prefill(seq, budget)
            if seq.prefilling:
                break  # the rest of this prompt in the next steps
        if batch := self.scheduler.decoding():
            self._decode(batch)
        return True

    def _prefill(self, seq: Sequence, budget: int) -> int:
        """Prefill the next chunk of a placed sequence's prompt; return the tokens it took."""
        if seq.cancel.is_set() or self._expired:  # the client left, or the drain ended, before it could start
            self._release([seq])
            seq.finish("cancelled" if seq.cancel.is_set() else "timeout")
            return 0
        start, seq.admitted_at = time.monotonic(), seq.admitted_at or time.monotonic()
        chunk, rows = seq.prompt_ids[seq.prefilled : seq.prefilled + budget], len(self.scheduler.running)
        try:
            if not seq.prefilled:  # room for the whole prompt at once: the cache grows (a copy) once, not every chunk
                self.model.reserve(rows, len(seq.prompt_ids))
            logits = self.model.prefill(rows - 1, chunk, seq.prefilled)
        except Exception as exc:  # one bad sequence must not take the batch down
            log.exception("prefill failed")
            self._release([seq])
            seq.fail(GenerationFailed(f"generation failed: {exc}"))
            return len(chunk)
        seq.prefilled += len(chunk)
        self.observe("prefill", time.monotonic() - start, 1)
        if not seq.prefilling:
            self._postprocess([seq], logits[None])  # the prompt is in: its first token
        return len(chunk)

    def _decode(self, batch: list[Sequence]) -> None:
        start = time.monotonic()
        try:
            tokens, positions = [s.generated[-1] for s in batch], [s.cached for s in batch]
            logits = self.model.step(tokens, positions, rows=len(self.scheduler.running))
        except Exception as exc:
            log.exception("a step failed; failing the whole batch")
            self._fail(self.scheduler.running, GenerationFailed(f"generation failed: {exc}"))
            self.scheduler.clear()
            self.model.reset()
            return
        self.observe("decode", time.monotonic() - start, len(batch))
        self._postprocess(batch, logits)

    def _postprocess(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        """Pick each sequence's next token, collect the finished ones, and free their rows."""
        greedy = logits.argmax(-1).tolist()
        sampling = any(seq.params.temperature for seq in batch)
        row_logits = logits.float().cpu() if sampling else logits  # a copy only when someone samples
        finished, failed = [], []
        for row, seq in enumerate(batch):
            try:
                if seq.params.temperature == 0:
                    token = greedy[row]
                else:
                    token = sample(row_logits[row], seq.params, seq.generator)
                if seq.append(token, self.loaded.eos_ids, self.loaded.tokenizer, self._expired):
                    finished.append(seq)
            except Exception as exc:
                log.exception("postprocessing a sequence failed")
                failed.append((seq, exc))
        self._release(finished + [seq for seq, _ in failed])
        for seq, error in failed:
            seq.fail(GenerationFailed(f"generation failed: {error}"))
        for seq in finished:
            seq.end()

    def _release(self, finished: list[Sequence]) -> None:
        for src, dst in self.scheduler.release(finished):
            self.model.move(src, dst)
        if finished and not self.scheduler.running:
            self.model.reset()

    @staticmethod
    def _fail(seqs: Iterable[Sequence], error: GenerationFailed) -> None:
        for seq in seqs:
            seq.fail(type(error)(str(error)))  # one exception each: they are raised in different threads


# ---------------------------------------------------------------------------------------------
# The one module-level engine, created on first use


def create_engine(config: ModelConfig, observe: StepObserver | None = None) -> Engine:
    start = time.perf_counter()
    try:
        loaded = load_model(config)
    except EngineUnavailable as exc:
        raise EngineUnavailable(str(exc), config.retry_seconds) from exc
    except Exception as exc:
        raise EngineUnavailable(
            f"could not load model {config.name!r}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
            "Set MODEL_NAME to a readable local model directory (tools/fetch_model.py makes one) "
            "or make the model hub reachable.",
            config.retry_seconds,
        ) from exc
    log.info(
        "model %s loaded in %.1f s (activations %s, weights %s)",
        config.name, time.perf_counter() - start, loaded.dtype, loaded.weights,
    )  # fmt: skip
    return Engine(loaded, config.max_batch, observe)


class LazyEngine:
    """The engine, created by the first `get()` (in a worker thread; concurrent callers wait for
    the same load). After a failed load, callers get the same error at once until
    `retry_seconds` have passed (a hub that is down can take ~50 s to fail each time)."""

    def __init__(self, factory: Callable[[ModelConfig, StepObserver | None], Engine] = create_engine):
        self._factory = factory
        self._lock = threading.Lock()
        self._config: ModelConfig | None = None
        self._observe: StepObserver | None = None
        self._engine: Engine | None = None
        self._error: EngineUnavailable | None = None
        self._failed_at = -math.inf
        self.loading = False
        self.load_seconds = 0.0  # how long the last successful load took

    def configure(self, config: ModelConfig, observe: StepObserver | None = None) -> None:
        """Set the model to load, once; a different second configuration is a bug, not a reload.
        `observe` is told the kind, duration and size of every engine step (metrics)."""
        with self._lock:
            if self._config is not None and self._config != config:
                raise RuntimeError(f"the engine is already configured with {self._config}; close() it first")
            self._config, self._observe = config, observe

    @property
    def loaded(self) -> Engine | None:
        return self._engine

    def failure(self) -> tuple[str, int] | None:
        """While no engine runs after a failed load: why it failed, and seconds until the next try."""
        error, config = self._error, self._config
        if error is None or config is None or self._engine is not None:
            return None
        return str(error), max(0, math.ceil(self._failed_at + config.retry_seconds - time.monotonic()))

    def get(self) -> Engine:
        with self._lock:
            if self._engine is not None and self._engine.running:
                return self._engine
            self._engine = None  # never loaded, or its thread stopped: load (again)
            if self._config is None:
                raise RuntimeError("the engine is not configured; call configure() first")
            wait = self._failed_at + self._config.retry_seconds - time.monotonic()
            if self._error is not None and wait > 0:
                raise EngineUnavailable(str(self._error), retry_after=math.ceil(wait))
            return self._load(self._config)

    def _load(self, config: ModelConfig) -> Engine:
        start, self.loading = time.monotonic(), True
        try:
            self._engine = self._factory(config, self._observe)
        except Exception as exc:
            log.exception("loading the model failed")
            message = str(exc) if isinstance(exc, EngineUnavailable) else f"{type(exc).__name__}: {exc}"
            self._error, self._failed_at = EngineUnavailable(message, config.retry_seconds), time.monotonic()
            raise EngineUnavailable(message, retry_after=config.retry_seconds) from exc
        finally:
            self.loading = False
        self._error, self.load_seconds = None, time.monotonic() - start
        return self._engine

    def close(self) -> None:
        """Stop the engine and forget the configuration (server shutdown; tests)."""
        with self._lock:
            engine, self._engine, self._config, self._error = self._engine, None, None, None
        if engine is not None:
            engine.close()


ENGINE = LazyEngine()  # the module's single engine: the server configures it at start
