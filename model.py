"""The network: loading a checkpoint, its weight formats, the forward pass and the KV cache.

`load_model` reads a tokenizer and a checkpoint (a hub id or a local directory) with
`transformers`, picks the activation dtype and weight formats that are fastest on this machine,
and copies the weights into a `Model`: a lean forward pass of its own for the GPT-2, Llama,
Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3 families (`BUILDERS`). The engine (engine.py)
decides what runs when; this file only runs what it is given.

Reading order: devices, dtypes and weight formats; loading; the model's parts (`Linear`,
`Embedding`, the layer weights, the architecture, the KV cache); the forward pass; building a
`Model` from a checkpoint, one builder per family.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import itertools
import logging
import math
import os
import shutil
import socket
import time
import types
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

log = logging.getLogger("llm.model")

KV_BLOCK = 64  # positions a block of the KV pool holds: sequences take blocks as they grow
PREFIX_BLOCK = 16  # tokens a block of the prefix store holds: prompts share cached keys and values in whole blocks
PREFILL_BUCKET = 16  # prompts run padded to a multiple of this: few distinct shapes, so kernel caches stay small
INT8_ALWAYS = 1 << 62  # `resolve_int8`'s answer when int8 weights win at every batch size: float ones are dropped
INT4_GROUP = 32  # inputs sharing one int4 scale and offset, as in llama.cpp's Q4_1 blocks
# A weight runs on int4 only if int4 holds each of its rows this well (relative error). The offline
# SmolLM2's Q4_1 rows: at most 1.1% (their scales rounded to bfloat16); float rows: 7% or more.
INT4_EXACT = 0.02
# The weight formats are timed at load over sample weights of this many bytes in bfloat16, so that
# they stream from memory as a step's do: a Zen 5 EPYC's 32 MiB L3 held eight samples (7 MiB in
# int8), int4's edge over int8 at one row shrank to 6% there (16.9 against 18.0 us a weight) and
# the choice flipped between runs, where over 32 or more it is 35-50% (bench/README.md).
SAMPLE_BYTES = 64 << 20
HUB, HUB_PROBE_SECONDS = "https://huggingface.co", 5  # where hub ids come from; how long to try reaching it


class LoadError(RuntimeError):
    """The model cannot be loaded or run here; the message says why and what to set."""


class LoadSettings(Protocol):
    """What loading reads of the engine's settings (engine.ModelConfig has each)."""

    @property
    def name(self) -> str: ...  # a hub id or a local directory
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def quantize(self) -> str: ...
    @property
    def max_batch(self) -> int: ...
    @property
    def max_context(self) -> int: ...
    @property
    def cache_dir(self) -> str | None: ...

    @property
    def prefix_cache_tokens(self) -> int: ...
    @property
    def kv_cache_mb(self) -> int: ...  # the KV pool's size; 0: room for max_batch sequences of the whole context
    @property
    def compile(self) -> bool: ...  # torch.compile a lone sequence's decode pass at load


# ---------------------------------------------------------------------------------------------
# Devices, dtypes and weight formats, chosen per machine at load


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX). Without it, oneDNN
    emulates bfloat16 and a batch product runs ~4x slower than float32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _first_is_faster(first: Callable[[], object], second: Callable[[], object], rounds: int, repeats: int) -> bool:
    """Whether `first` runs faster than `second`: the best of `rounds` timings each, of `repeats`
    runs, taken in turns after a warm-up call each (first calls pick kernels). Many short
    timings, so that a busy machine cannot tip it: another process on one of two cores preempts
    some of them, and the best are those it did not (with three timings of three passes over
    the sample weights, a busy core put int8's edge anywhere from 0 to 8 rows, and a second
    server loading beside one left it without int4; with fifteen of one pass, 3 to 5 rows, as
    on a quiet machine's 4; bench/README.md)."""

    def seconds(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        return time.perf_counter() - start

    first(), second()
    timings = [(seconds(first), seconds(second)) for _ in range(rounds)]
    return min(a for a, _ in timings) < min(b for _, b in timings)


def resolve_dtype(setting: str, device: torch.device, rows: int, width: int) -> torch.dtype:
    """`auto`: on CUDA bfloat16; on a CPU with native bfloat16, bfloat16 where a batch-sized
    product measures faster (`_first_is_faster`, interleaved); else float32."""
    if setting != "auto":
        return getattr(torch, setting)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not native_bfloat16():
        return torch.float32
    a, b = torch.randn(rows, width), torch.randn(width, 4 * width)
    a16, b16 = a.bfloat16(), b.bfloat16()
    faster = _first_is_faster(lambda: a16 @ b16, lambda: a @ b, rounds=15, repeats=3)
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
    `int8`: always; `none`: never; `auto` (a CPU with the kernel): time products over
    `SAMPLE_BYTES` of MLP-sized weights (so they stream from memory as a step's do) with float weights and with
    int8 at each batch size (`_first_is_faster`), and use int8 up to the largest size where it
    wins at every size below. Small batches read weights, and int8 reads a quarter of float32's bytes;
    large ones compute, where float weights win."""
    if setting == "none" or (setting == "auto" and (device.type != "cpu" or not int8_kernel())):
        return 0
    if setting == "int8":
        if device.type != "cpu" or not int8_kernel():
            raise LoadError("QUANTIZE=int8 needs a CPU and torch's int8 kernel; use none")
        return INT8_ALWAYS
    sizes = sorted(set(batches))
    floats, int8s = [], []
    for _ in range(_samples(4 * width * width)):
        weight = torch.randn(4 * width, width) * width**-0.5
        floats.append(Linear(width, pack_float(weight.to(dtype), sizes[-1]), None))
        int8s.append(Linear(width, None, None, pack_int8(weight), INT8_ALWAYS))
    rows = _wins_up_to(int8s, floats, sizes, dtype)
    return INT8_ALWAYS if rows == sizes[-1] else rows


def _samples(elements: int) -> int:
    """How many sample weights of this many elements make `SAMPLE_BYTES` in bfloat16: 8 to 64."""
    return min(64, max(8, SAMPLE_BYTES // (2 * elements)))


def _wins_up_to(fast: list[Linear], other: list[Linear], sizes: list[int], dtype: torch.dtype) -> int:
    """The most rows up to which a pass over the `fast` linears beats one over the `other` ones at
    every size tried (`_first_is_faster`); 0 if it loses at the first of `sizes` (ascending).
    Where it wins at one size and loses at the next, the sizes between are halved until the edge
    is found: the rows past the last win ran the slower format before (AMX Xeon, SmolLM2: int4
    up to 4 rows, not 1; a step of 2 rows 20.7 against 29.1 ms, bench/README.md)."""
    width = fast[0].in_features

    def wins(batch: int) -> bool:
        x = torch.randn(batch, width, dtype=dtype)
        return _first_is_faster(lambda: [f(x) for f in fast], lambda: [f(x) for f in other], rounds=15, repeats=1)

    won = 0
    for batch in sizes:
        if not wins(batch):
            lost = batch
            break
        won = batch
    else:
        return won
    while won and lost - won > 1:  # the edge lies in won..lost-1
        middle = (won + lost) // 2
        won, lost = (middle, lost) if wins(middle) else (won, middle)
    return won


def int4_kernel() -> bool:
    """Whether this torch has its CPU kernel for int4 weights in groups (bfloat16 activations)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def pack_int4(
    weight: torch.Tensor, group: int = INT4_GROUP, exact: float | None = INT4_EXACT
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int4 weight-only, asymmetric in groups of `group` inputs, w = (q - 8) * scale + offset with
    q in 0..15 spanning each group's minimum to its maximum, in the CPU kernel's packed layout with
    its [in / group, out, 2] bfloat16 scales and offsets; None unless that holds every row of the
    weight within `exact` (relative error, with the scales as the kernel reads them), or where the
    kernel cannot take the shape. A checkpoint of Q4_1 blocks of 32 (the offline SmolLM2) gives back
    its own codes and loses only the rounding of its scales (bench/quality.py: +0.2% perplexity,
    where int4 over SmolLM2's float head costs +5%); a float checkpoint's weights stay as they
    were. `exact=None` packs whatever the error (bench/quality.py measures it)."""
    out_features, in_features = weight.shape
    if in_features % group or out_features % 16:  # the kernel packs rows in 16s
        return None
    groups = weight.detach().float().reshape(out_features, in_features // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low) / scale).clamp(0, 15)
    scale16, offset16 = scale.bfloat16(), (low + 8 * scale).bfloat16()
    if exact is not None:
        error = ((q - 8) * scale16.float() + offset16.float() - groups).flatten(1).norm(dim=1)
        if bool((error > exact * groups.flatten(1).norm(dim=1)).any()):
            return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(weight.shape), 1)
    return packed, torch.stack([scale16[..., 0], offset16[..., 0]], -1).transpose(0, 1).contiguous()


def resolve_int4(setting: str, device: torch.device, dtype: torch.dtype, sizes: Iterable[int], int8_rows: int,
                 sample: torch.Tensor | None) -> int:  # fmt: skip
    """Up to how many rows a product runs on int4 weights, for the weights int4 holds exactly
    (`pack_int4`); 0: never. Only `auto`, on a CPU with the kernel, for a checkpoint whose `sample`
    weight (its largest projection) int4 holds: time 4-bit weights of its shape against the
    formats those rows would run otherwise (int8 up to `int8_rows`, else float), as `resolve_int8`
    does. Reading a quarter of bfloat16's bytes wins where a product reads weights, at a few rows
    (bench/README.md: 6.2 against int8's 12.1 ms at one row, AMX)."""
    if setting != "auto" or device.type != "cpu" or not int4_kernel() or sample is None or not pack_int4(sample):
        return 0
    convert, int4s, others = Convert(dtype, device, int8_rows, max(sizes)), [], []
    for _ in range(_samples(sample.numel())):
        # Each group spans its codes 0..15, as a Q4_1 block spans its minimum to its maximum.
        codes = torch.randint(0, 16, (sample.shape[0], sample.shape[1] // INT4_GROUP, INT4_GROUP), dtype=torch.uint8)
        codes[..., :2] = torch.tensor([0, 15], dtype=torch.uint8)
        weight = ((codes.float() - 8) * torch.rand(*codes.shape[:2], 1) / 100).reshape(sample.shape)
        int4s.append(Linear(sample.shape[1], None, None, int4=pack_int4(weight), int4_rows=INT8_ALWAYS))
        others.append(convert.linear(weight, None))
    return _wins_up_to(int4s, others, sorted(set(sizes)), dtype)


def largest_projection(hf_model: Any) -> torch.Tensor | None:
    """The checkpoint's largest projection but its output head, as [out, in] (GPT-2's Conv1D
    stores [in, out]): the weight `resolve_int4` asks int4 to hold."""
    from transformers.pytorch_utils import Conv1D

    head = hf_model.get_output_embeddings()
    weights = [m.weight.detach().t() if isinstance(m, Conv1D) else m.weight.detach()
               for m in hf_model.modules() if isinstance(m, torch.nn.Linear | Conv1D) and m is not head]  # fmt: skip
    return max(weights, key=lambda w: w.numel()) if weights else None


# ---------------------------------------------------------------------------------------------
# Loading


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
    family: str = ""  # the checkpoint's model type (`BUILDERS` lists those we run): gpt2, llama, qwen2...
    int4_rows: int = 0  # `resolve_int4`'s choice, for the weights int4 holds exactly
    lone_pass: str = ""  # how a lone sequence's decode pass runs (`trace_decode`, `compile_decode`), for the load log

    @property
    def weights(self) -> str:
        """The weight formats in words, for the load log line."""
        linears = self.model.linears
        int4 = sum(lin.int4 is not None for lin in linears)
        four = f"int4 up to {self.int4_rows} rows for {int4} of {len(linears)} weights, " if int4 else ""
        if self.int8_rows == INT8_ALWAYS:
            return f"{four}int8"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{four}int8 up to {self.int8_rows} rows, else {dtype}" if self.int8_rows else f"{four}{dtype}"


def _offline(config: LoadSettings) -> bool:
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
        raise LoadError(
            f"model {config.name!r} is not a local directory nor cached, and the hub ({host}) is unreachable: "
            f"{exc}. In Docker: make models/smollm2-135m-instruct/config.json on the host, then docker compose "
            "-f docker-compose.yml -f docker-compose.offline.yml up. Elsewhere: set MODEL_NAME to a local model "
            "directory (tools/fetch_model.py makes one), or give this host access to the hub."
        ) from None
    return False


def _return_freed_memory() -> None:
    """glibc keeps freed heap pages for reuse; hand back what loading left (transformers' copy of
    the weights, the load-time timings): 50-90 MB of resident memory with SmolLM2."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def blocks_for(positions: int) -> int:
    """KV pool blocks that hold this many positions."""
    return math.ceil(positions / KV_BLOCK)


def kv_blocks(config: LoadSettings, model: Model, context: int) -> int:
    """The KV pool's blocks: KV_CACHE_MB's worth, else every sequence of a full batch at the whole
    context (so that setting alone never makes a request wait for blocks)."""
    if config.kv_cache_mb:
        return max(1, config.kv_cache_mb * 2**20 // KVPool.bytes_a_block(len(model.layers), model.arch, model.dtype))
    return config.max_batch * blocks_for(context)


def load_model(config: LoadSettings, prefill_chunk: int) -> LoadedModel:
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
    sizes = (1, 8, config.max_batch, prefill_chunk)
    int8_rows = resolve_int8(config.quantize, device, dtype, width, sizes)
    int4_rows = resolve_int4(config.quantize, device, dtype, sizes, int8_rows, largest_projection(hf_model))
    model = build_model(hf_model, Convert(dtype, device, int8_rows, config.max_batch, int4_rows))
    context = min(model.max_context, config.max_context)
    model.pool = KVPool(len(model.layers), kv_blocks(config, model, context), model.arch, dtype, device)
    model.store = PrefixStore(len(model.layers), config.prefix_cache_tokens // PREFIX_BLOCK, model.arch, dtype, device)
    if config.compile:
        lone_pass = compile_decode(model, device, config.max_batch)
    else:
        lone_pass = trace_decode(model, config.max_batch)
    eos, family = hf_model.generation_config.eos_token_id, hf_model.config.model_type
    if eos is None:
        eos = tokenizer.eos_token_id
    del hf_model  # our Model holds copies of the weights; free transformers' module tree now
    gc.collect()
    _return_freed_memory()
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    return LoadedModel(tokenizer, model, eos_ids, context, dtype, int8_rows, family, int4_rows, lone_pass)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU code is built with: $CXX, else g++; None if absent."""
    return shutil.which(os.environ.get("CXX") or "g++")


def compile_decode(model: Model, device: torch.device, max_batch: int) -> str:
    """COMPILE=1: `Model.compile`, timed, and the batched passes traced as without it
    (`trace_batches`); what they did, in words."""
    if device.type == "cpu" and not cpp_compiler():
        raise LoadError("COMPILE=1 needs a C++ compiler for torch.compile's CPU code (g++, or $CXX); "
                        "install one, or unset COMPILE")  # fmt: skip
    start = time.monotonic()
    why_not = model.compile()
    took = time.monotonic() - start
    if why_not:
        lone = f"decode not compiled: {why_not}"
    else:
        lone = f"a lone sequence's decode pass compiled in {took:.0f} s{model.keep_faster_lone_pass()}"
    return f"{lone}; {_trace_batches(model, max_batch)}"


def trace_decode(model: Model, max_batch: int) -> str:
    """Without COMPILE: `Model.trace` and `Model.trace_batches`; what they did, in words."""
    why_not = model.trace()
    lone = f"decode not traced: {why_not}" if why_not else "a lone sequence's decode pass traced"
    return f"{lone}; {_trace_batches(model, max_batch)}"


def _trace_batches(model: Model, max_batch: int) -> str:
    """`Model.trace_batches`, for COMPILE=1 and without it; what it did, in words."""
    why_not = model.trace_batches(max_batch)
    if not model.batch_passes:
        return f"batched decode not traced: {why_not}"
    traced = set(model.batch_passes)
    bands = [(a, b) for a, b in model.batch_bands if a in traced]
    spans = [f"{a}+" if b >= max_batch else str(a) if a == b else f"{a}-{b}" for a, b in bands]
    return f"batched decode passes of {' and '.join(spans)} rows traced" + (f" ({why_not})" if why_not else "")


# ---------------------------------------------------------------------------------------------
# The model: a lean forward pass over the checkpoint's weights, with its own KV cache


@dataclass
class Linear:
    """One projection, x W^T + b, in the weight formats `resolve_int8` and `resolve_int4` chose at
    load: float (`pack_float`'s layout, in the model's dtype), int8 weight-only (`pack_int8`),
    int4 in groups (`pack_int4`, for weights it holds exactly), each for inputs of at most its
    rows: int4 up to `int4_rows`, else int8 up to `int8_rows`, else float."""

    in_features: int
    weight: torch.Tensor | None  # float; None when int8 wins at every batch size
    bias: torch.Tensor | None
    int8: tuple[torch.Tensor, torch.Tensor] | None = None  # int8 weight [out, in], bfloat16 scales [out]
    int8_rows: int = 0
    int4: tuple[torch.Tensor, torch.Tensor] | None = None  # the kernel's packed weight, its scales and offsets
    int4_rows: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor
        form = self.format_at(x.numel() // self.in_features)
        if form == "int4":
            assert self.int4 is not None
            packed, scales = self.int4
            return self._weight_only(x, torch.ops.aten._weight_int4pack_mm_for_cpu, packed, INT4_GROUP, scales)
        if form == "int8":
            assert self.int8 is not None
            return self._weight_only(x, torch.ops.aten._weight_int8pack_mm, *self.int8)
        assert self.weight is not None
        if self.weight.is_mkldnn:
            if torch._C._get_tracing_state() is not None:  # a trace records the product as a call
                return _packed_product()(x, self.weight, self.bias)
            out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return out
        return F.linear(x, self.weight, self.bias)

    def settled_from(self) -> tuple[int, ...]:
        """The rows up to which a product may run another format than at more rows."""
        return ((self.int4_rows,) if self.int4 is not None else ()) + (
            (self.int8_rows,) if self.int8 is not None and self.weight is not None else ()
        )

    def format_at(self, rows: int) -> str:
        """The weights a product of this many rows runs on: "int4", "int8" or "float"."""
        if self.int4 is not None and rows <= self.int4_rows:
            return "int4"
        if self.int8 is not None and (self.weight is None or rows <= self.int8_rows):
            return "int8"
        return "float"

    def _weight_only(self, x: torch.Tensor, kernel: Callable[..., torch.Tensor], *weights: Any) -> torch.Tensor:
        """An int8 or int4 kernel's product: it takes [rows, in] contiguous bfloat16 activations and
        its weights; the answer goes back to x's dtype and shape, plus the bias. A cast or copy
        that would change nothing is not called: each is an operation a traced pass replays."""
        rows = x.reshape(-1, self.in_features)
        rows = rows if rows.dtype == torch.bfloat16 else rows.to(torch.bfloat16)
        out = kernel(rows if rows.is_contiguous() else rows.contiguous(), *weights)
        out = out if out.dtype == x.dtype else out.to(x.dtype)
        # back to x's leading shape, reading its middle sizes only: a traced pass replays each size read
        out = out if x.dim() == 2 else out.unflatten(0, (-1, *x.shape[1:-1]))
        return out if self.bias is None else out + self.bias


@functools.cache
def _packed_product() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """oneDNN's packed product as a TorchScript function, made once, which a trace records as a
    call (`Model.trace`, `Model.trace_batches`): the tracer cannot record the op's `Scalar?[]`
    argument itself, a scripted call can. (The op's binary form, which has no such argument,
    adds a tensor to the product: 1 ms a step at 8 rows, 2 at 32, AMX Xeon.)"""

    def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        none: list[int | float | complex | None] = []  # the schema's `Scalar?[]`
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", none, "")
        return out

    return torch.jit.script(product)


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
    qk_norm: torch.Tensor | None = None  # Qwen3, Gemma 3: RMSNorm weights for each query and key head [Hq + Hkv, D]
    post_attn_norm: torch.Tensor | None = None  # Gemma: the attention's output is normed before the residual add
    post_mlp_norm: torch.Tensor | None = None  # and so is the MLP's


@dataclass
class Architecture:
    """What differs between the families we run: norms, positions, MLP, attention's reach."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    max_context: int
    rms_norm: bool  # Llama: RMSNorm; GPT-2: LayerNorm with bias
    gated_mlp: bool  # Llama: down(act(gate) * up); GPT-2: proj(act(fc))
    inv_freq: torch.Tensor | None  # Llama's rotary frequencies; GPT-2 learns positions
    rope_scale: float = 1.0
    activation: Callable[[torch.Tensor], torch.Tensor] = F.silu  # the MLP's; GPT-2 and Gemma: GELU (tanh)
    attn_scale: float | None = None  # query-key products times this; None: head_dim ** -0.5
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden size)
    attn_softcap: float | None = None  # Gemma 2: attention scores become cap * tanh(score / cap) before the mask
    logit_softcap: float | None = None  # Gemma 2: and so do the output logits
    window: int | None = None  # sliding-window layers attend to this many latest positions (their own included)
    windowed: frozenset[int] = frozenset()  # which layers those are: Mistral and Phi-3 all, Gemma alternate ones
    local_inv_freq: torch.Tensor | None = None  # Gemma 3: the windowed layers' own rotary frequencies
    local_rope_scale: float = 1.0

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5 if self.attn_scale is None else self.attn_scale

    @property
    def gqa(self) -> bool:
        """Whether query heads share key heads (torch's fused attention then takes enable_gqa)."""
        return self.heads != self.kv_heads


class KVPool:
    """Keys and values of the running sequences in fixed-size blocks of KV_BLOCK positions, one
    pool for all, block-major: per layer values [blocks, Hkv, KV_BLOCK, D] and keys [blocks, Hkv,
    D, KV_BLOCK], each block's keys turned so that a row of a key layer holds one dimension of
    KV_BLOCK keys: decode attention scores a block as a sum of those rows weighted by the query
    (`Model._attend_decode`). The scheduler hands blocks out (a sequence's block
    table lists its own, in order) and takes them back; nothing moves when a sequence grows or
    ends, and memory follows the tokens held. Made empty: a block's pages become resident when
    first written, and `clear` hands them all back once nothing runs. Each layer's keys and values
    are an allocation of their own: the compiler (COMPILE=1) copies a written input whole when it
    is a view of a larger one (a compiled step of 97 ms, 8 with an allocation a layer, bench/README.md)."""

    def __init__(self, layers: int, blocks: int, arch: Architecture, dtype: torch.dtype, device: torch.device):
        self.layers, self.blocks, self.heads, self.dim = layers, blocks, arch.kv_heads, arch.head_dim
        self.arch, self.dtype, self.device = arch, dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.touched = True
        self.clear()

    @staticmethod
    def bytes_a_block(layers: int, arch: Architecture, dtype: torch.dtype) -> int:
        """Keys and values of KV_BLOCK positions in every layer."""
        return 2 * layers * arch.kv_heads * KV_BLOCK * arch.head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def block_bytes(self) -> int:
        return self.bytes_a_block(self.layers, self.arch, self.dtype)

    @property
    def bytes(self) -> int:
        return self.blocks * self.block_bytes

    def clear(self) -> None:
        """A fresh, untouched pool: the pages written so far go back to the system."""
        if not self.touched:
            return
        self.k, self.v = [], []  # drop the old pool before making the new one
        # A freed layer of at most 32 MiB raises glibc's threshold for mapping memory apart, and
        # later pools then come from its heap, which it keeps: trimmed, the pages go back.
        _return_freed_memory()
        keys, values = (self.blocks, self.heads, self.dim, KV_BLOCK), (self.blocks, self.heads, KV_BLOCK, self.dim)
        self.k = [torch.empty(keys, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.v = [torch.empty(values, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.touched = False

    def zero(self, blocks: tuple[int, ...]) -> None:
        """Zero blocks just handed out: masked positions get weight 0, and 0 * NaN would be NaN."""
        index = torch.tensor(blocks, device=self.device)
        for layer in self.k + self.v:
            layer.index_fill_(0, index, 0)
        self.touched = True

    def slots(self, tables: list[list[int]], positions: list[int]) -> torch.Tensor:
        """Where each (sequence's table, position) pair goes in a value layer seen as [P Hkv
        KV_BLOCK, D]: one row index per pair and head, in that order."""
        blocks = torch.tensor([t[p // KV_BLOCK] for t, p in zip(tables, positions, strict=True)], device=self.device)
        offsets = torch.tensor([p % KV_BLOCK for p in positions], device=self.device)
        heads = torch.arange(self.heads, device=self.device)
        return ((blocks[:, None] * self.heads + heads) * KV_BLOCK + offsets[:, None]).flatten()

    def key_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """The same places (`slots`) in a key layer seen flat: D elements each, KV_BLOCK apart."""
        start = slots // KV_BLOCK * (self.dim * KV_BLOCK) + slots % KV_BLOCK
        return (start[:, None] + torch.arange(self.dim, device=self.device) * KV_BLOCK).flatten()

    def gather(self, layer: torch.Tensor, table: list[int], length: int, keys: bool) -> torch.Tensor:
        """A sequence's first `length` positions of a key or value layer as [1, Hkv, length, D] (a
        copy), for a prompt's later chunk. Blocks in a row (as the lowest free ones are
        handed out) are read as a slice: an index_select would be a second copy."""
        used = table[: blocks_for(length)]
        if used == list(range(used[0], used[0] + len(used))):
            blocks = layer[used[0] : used[0] + len(used)]
        else:
            blocks = layer.index_select(0, torch.tensor(used, device=self.device))
        if keys:
            blocks = blocks.transpose(2, 3)  # each block's positions back as rows
        return blocks.transpose(0, 1).reshape(1, self.heads, -1, self.dim)[:, :, :length]


class PrefixStore:
    """Keys and values of whole prompt blocks (PREFIX_BLOCK tokens each), kept apart from the pool
    once their prompt is prefilled, so that a later prompt starting with the same tokens copies
    them into its blocks instead of computing them again (the engine's `PrefixCache` says which
    block holds what). Per layer [blocks, Hkv, PREFIX_BLOCK, D], made empty: a block's memory is
    touched, and so resident, only once a prompt's block is written there. Copying a 512-token
    prefix in costs a few milliseconds where its prefill costs a second; kept apart, the store's
    blocks are never held by a running sequence, so any of them may be evicted."""

    def __init__(self, layers: int, blocks: int, arch: Architecture, dtype: torch.dtype, device: torch.device):
        self.blocks, self.heads, self.dim = blocks, arch.kv_heads, arch.head_dim
        keys, values = (blocks, self.heads, self.dim, PREFIX_BLOCK), (blocks, self.heads, PREFIX_BLOCK, self.dim)
        self.k = [torch.empty(keys, dtype=dtype, device=device) for _ in range(layers if blocks else 0)]
        self.v = [torch.empty(values, dtype=dtype, device=device) for _ in range(layers if blocks else 0)]
        self.bytes = 2 * layers * math.prod(keys) * torch.empty(0, dtype=dtype).element_size()

    def _in_pool(self, pool: KVPool, table: list[int], blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt block i lies in pool block table[i // per] at sub-block i % per: both as indices."""
        per = KV_BLOCK // PREFIX_BLOCK
        where = torch.tensor([(table[i // per], i % per) for i in blocks], device=pool.device)
        return where[:, 0], where[:, 1]

    def _split(self, pool: KVPool) -> list[torch.Tensor]:
        """The pool's layers with each block's positions split into PREFIX_BLOCK runs (views):
        keys [P, Hkv, D, runs, PREFIX_BLOCK], values [P, Hkv, runs, PREFIX_BLOCK, D], so that
        `[blocks, :, runs]` of either is [N, Hkv, ...] laid out as the store's blocks. The keys
        are moved to put the runs at the same place (a view, `movedim`)."""
        runs = KV_BLOCK // PREFIX_BLOCK
        keys = [layer.view(-1, self.heads, self.dim, runs, PREFIX_BLOCK).movedim(3, 2) for layer in pool.k]
        return keys + [layer.view(-1, self.heads, runs, PREFIX_BLOCK, self.dim) for layer in pool.v]

    def restore(self, pool: KVPool, table: list[int], slots: tuple[int, ...]) -> None:
        """Copy these store blocks into the sequence's first positions, in order."""
        index = torch.tensor(slots, device=pool.device)
        blocks, subs = self._in_pool(pool, table, list(range(len(slots))))
        for layer, stored in zip(self._split(pool), self.k + self.v, strict=True):
            layer[blocks, :, subs] = stored.index_select(0, index)

    def save(self, pool: KVPool, table: list[int], pairs: tuple[tuple[int, int], ...]) -> None:
        """Copy the sequence's prompt blocks into the store: (prompt block, store block) pairs."""
        slots = torch.tensor([slot for _, slot in pairs], device=pool.device)
        blocks, subs = self._in_pool(pool, table, [block for block, _ in pairs])
        for layer, stored in zip(self._split(pool), self.k + self.v, strict=True):
            stored.index_copy_(0, slots, layer[blocks, :, subs])


@dataclass(frozen=True)
class Work:
    """One forward pass, as the engine asks for it: these tokens, at these positions, of these
    sequences (by their block tables). A decode step gives each sequence one token; a prefill
    gives each of its sequences a prompt chunk, all run as one row (`Prefill`); a pass may hold
    both (`Mixed`), the products then reading the weights once for all of them."""

    tables: list[list[int]]  # each sequence's pool blocks, in order, covering its new tokens too
    tokens: list[list[int]]  # each sequence's new tokens
    starts: list[int]  # each sequence's first new position: the tokens the pool holds for it already
    fresh: tuple[int, ...] = ()  # pool blocks just handed out, zeroed before the pass
    # Each sequence's (or empty: no one's) prefix-store blocks copied into its first positions first,
    # and (prompt block, store block) pairs copied into the store after the pass.
    restore: tuple[tuple[int, ...], ...] = ()
    save: tuple[tuple[tuple[int, int], ...], ...] = ()

    def restore_of(self, row: int) -> tuple[int, ...]:
        return self.restore[row] if self.restore else ()


@dataclass(frozen=True)
class Prefill:
    """A prefill's inputs, made before the pass: the sequences' chunks one after another in one
    row of T tokens, padded at its end. Its keys are each sequence's earlier positions (gathered
    from the pool, `pasts`) and then the row's own; a token sees its own sequence's, up to itself."""

    positions: torch.Tensor  # [1, T]
    owners: torch.Tensor  # [T]: each token's sequence (its place in the work); the padding is one of its own
    pasts: list[tuple[list[int], int]]  # (table, positions in the pool) of each sequence that has any
    key_owners: torch.Tensor  # [K]: each key's sequence: the pasts' positions, then the row's tokens
    key_positions: torch.Tensor  # [K]
    slots: torch.Tensor  # [real Hkv]: where the real tokens' values go (not the bucket's padding)
    key_slots: torch.Tensor  # [real Hkv D]: and their keys (`KVPool.key_slots`)
    mask: torch.Tensor | None  # [1, 1, T, K] bool; None: one sequence's first chunk, plain causal attention
    cos: torch.Tensor | None = None  # rotary tables for these positions: [1, T, 1, D]
    sin: torch.Tensor | None = None


@dataclass(frozen=True)
class Bags:
    """Where a decode step's attention reads each sequence's own blocks, in place, as bags of
    rows that `F.embedding_bag` sums with weights (`Model._attend_decode`). Scores: one bag for
    each (sequence, query head, block), the D rows of the block's turned keys (`KVPool`) weighted
    by that query's D numbers; a sequence's blocks past its own count, up to the longest's, are
    empty bags (zero, masked). Answers: one bag for each (sequence, query head), the value rows
    of the positions of its blocks weighted by their softmax. Indices are made once a step."""

    key_rows: torch.Tensor  # rows of a key layer seen as [P Hkv D, KV_BLOCK], bag after bag
    key_bags: torch.Tensor  # [B Hq n]: where each score bag starts among key_rows
    queries: torch.Tensor  # [bags that are not empty]: the (sequence, query head) whose query weights it
    value_rows: torch.Tensor  # rows of a value layer seen as [P Hkv KV_BLOCK, D], bag after bag
    value_bags: torch.Tensor  # [B Hq]: where each answer bag starts among value_rows
    weights: torch.Tensor  # [value rows]: where each value row's weight lies among the scores [B Hq n KV_BLOCK]
    mask: torch.Tensor  # [B, 1, n KV_BLOCK] additive, float32: each sequence's positions up to its new one

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """In field order: a trace takes tensors and tuples of them."""
        return self.key_rows, self.key_bags, self.queries, self.value_rows, self.value_bags, self.weights, self.mask


@dataclass(frozen=True)
class Decode:
    """A decode step's inputs, made before the pass: one new token for each of B sequences,
    attending over their own blocks in place (`Bags`)."""

    positions: torch.Tensor  # [B, 1]
    slots: torch.Tensor  # [B Hkv]: where each new value goes in a flat pool layer
    key_slots: torch.Tensor  # [B Hkv D]: and each new key (`KVPool.key_slots`)
    bags: Bags
    cos: torch.Tensor | None = None  # [B, 1, 1, D]
    sin: torch.Tensor | None = None


@dataclass(frozen=True)
class Mixed:
    """A pass of prompt chunks and decode rows: the chunks' row (T tokens) with the B decode rows'
    tokens after it, as [1, T + B]; each part attends as it would alone."""

    prefill: Prefill
    decode: Decode
    positions: torch.Tensor  # [1, T + B]
    cos: torch.Tensor | None = None  # [1, T + B, 1, D]
    sin: torch.Tensor | None = None

    @staticmethod
    def of(prefill: Prefill, decode: Decode) -> Mixed:
        def row(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
            return None if first is None or second is None else torch.cat([first, second.transpose(0, 1)], 1)

        positions = row(prefill.positions, decode.positions)
        assert positions is not None
        return Mixed(prefill, decode, positions, row(prefill.cos, decode.cos), row(prefill.sin, decode.sin))


@dataclass(frozen=True)
class LoneDecode:
    """One sequence's decode step for the traced or compiled pass (`Model.trace`, `Model.compile`),
    in tensors only: the compiler takes a list or a number as a constant, and would compile again
    for each new one; a trace would replay it. The pool's layers come in as inputs too: a trace
    holds the tensors it read as constants, and the pool is made again after each idle spell."""

    positions: torch.Tensor  # [1, 1]
    slots: torch.Tensor  # [Hkv]: where the new value goes in a flat pool layer
    key_slots: torch.Tensor  # [Hkv D]: and the new key
    bags: Bags
    cos: torch.Tensor | None = None  # [1, 1, 1, D]
    sin: torch.Tensor | None = None
    keys: tuple[torch.Tensor, ...] = ()  # the pool's layers (`KVPool.k`)
    values: tuple[torch.Tensor, ...] = ()


class Model:
    """The network: weights, the KV pool, and one entry point, `run`."""

    def __init__(
        self,
        arch: Architecture,
        layers: list[LayerWeights],
        embed: Embedding,
        pos_embed: torch.Tensor | None,
        final_norm: tuple[torch.Tensor, torch.Tensor | None],
        lm_head: Linear,
    ):
        self.arch, self.layers, self.embed, self.pos_embed = arch, layers, embed, pos_embed
        self.final_norm, self.lm_head = final_norm, lm_head
        # The hidden width as a number: a size read from a tensor while tracing is recorded, and
        # replayed every step as operations of its own (hence the architecture's head counts in
        # `_layer`, not x.shape's).
        self.width = final_norm[0].shape[0]
        self.max_context = arch.max_context
        self.dtype, self.device = embed.dtype, embed.table.device
        self.pool = KVPool(len(layers), 0, arch, self.dtype, self.device)  # load_model sizes both
        self.store = PrefixStore(len(layers), 0, arch, self.dtype, self.device)
        # In the model's dtype, as transformers' Gemma multiplies (sqrt(3072) = 55.43 is 55.5 in bfloat16).
        self.embed_scale = torch.tensor(arch.embed_scale, dtype=self.dtype, device=self.device)
        self.lone_pass: Callable[[torch.Tensor, LoneDecode], torch.Tensor] | None = None  # `trace`, `compile`
        # `trace_batches`, by the fewest rows of their band (`_format_bands`); the bands, traced
        # or not, as (fewest, most) rows
        self.batch_passes: dict[int, Callable[[torch.Tensor, Decode], torch.Tensor]] = {}
        self.batch_bands: tuple[tuple[int, int], ...] = ()

    def run(self, work: Work) -> torch.Tensor:
        """Run the work's tokens into their sequences' blocks; return each one's next-token logits
        [B, V]. A prefill may first restore cached prompt blocks, and save blocks after."""
        if work.fresh:
            self.pool.zero(work.fresh)
        logits = self._run_lone(work) if self.lone_pass is not None else None
        if logits is None and self.batch_passes:
            logits = self._run_batch(work)
        if logits is None:
            logits = self._run(work)
        for table, pairs in zip(work.tables, work.save, strict=False):  # no saves: an empty tuple
            if pairs:
                self.store.save(self.pool, table, pairs)
        return logits

    def _run(self, work: Work) -> torch.Tensor:
        inputs: Prefill | Decode | Mixed
        chunks = [i for i, tokens in enumerate(work.tokens) if len(tokens) > 1 or work.restore_of(i)]
        if not chunks:
            ids, inputs, last = *self._prepare_decode(work), None
        elif len(chunks) == len(work.tokens):
            ids, inputs = self._prepare_prefill(work)
            last = torch.tensor(list(itertools.accumulate(len(t) for t in work.tokens)), device=self.device) - 1
        else:
            ids, inputs, last = self._prepare_mixed(work, chunks)
        for table, slots in zip(work.tables, work.restore, strict=False):  # no restores: an empty tuple
            if slots:
                self.store.restore(self.pool, table, slots)
        return self._forward(ids, inputs, self._windowed(inputs), last)

    def _run_lone(self, work: Work) -> torch.Tensor | None:
        """One token of a lone sequence (a decode step, or a prompt's last one-token chunk) through
        the traced or compiled pass; None for any other work. Should the pass ever fail, the model
        runs the plain step from then on: rewriting the new token's keys is harmless."""
        if len(work.tables) != 1 or len(work.tokens[0]) != 1 or any(work.restore):
            return None
        try:
            ids, lone = self._prepare_lone(work)
            assert self.lone_pass is not None
            return self.lone_pass(ids, lone)
        except Exception:
            log.exception("the lone sequence's decode pass failed; running the plain step from now on")
            self.lone_pass = None
            return None

    def _run_batch(self, work: Work) -> torch.Tensor | None:
        """A decode step whose rows fall in a band (`_format_bands`) that `trace_batches` traced,
        through that pass; the plain pass for another decode step; None for any other work. Should
        a pass ever fail, none runs from then on."""
        if any(len(t) != 1 for t in work.tokens) or any(work.restore):
            return None
        try:
            ids, decode = self._prepare_decode(work)
            # (band 0: rows past every band, which the engine never runs; the plain pass then)
            band = next((least for least, most in self.batch_bands if least <= len(work.tables) <= most), 0)
            traced = self.batch_passes.get(band)
            if traced is None:
                return self._forward(ids, decode, self._windowed(decode), None)
            return traced(ids, decode)
        except Exception:
            log.exception("a traced batch pass failed; running the plain step from now on")
            self.batch_passes = {}
            return None

    @property
    def linears(self) -> list[Linear]:
        """Every projection, the output head first."""
        return [self.lm_head, *(lin for w in self.layers for lin in (w.qkv, w.out, w.up, w.down))]

    def clear(self) -> None:
        """Nothing runs: give the pool's memory back."""
        self.pool.clear()

    def trace(self) -> str | None:
        """The default: a lone sequence's decode pass recorded once with torch.jit.trace, and
        replayed by TorchScript's executor with no Python between its ~40 operations a layer (AMX
        Xeon, SmolLM2 on int4: a step 12.9 against 16.5 ms, the same logits bit for bit,
        bench/README.md). torch.jit.trace is deprecated, and torch.compile (COMPILE=1) needs a C++
        compiler and ~50 s; a trace takes a fraction of a second. Packed float weights (QUANTIZE=none,
        or where int8 does not win at one row) come in as inputs, as in `trace_batches`. Where the
        pass cannot be traced (`_traced_unsupported`), where tracing fails (a torch without it), or
        where the traced pass's logits differ at all from the plain step's at one, two or three
        blocks: why not."""
        why_not = self._traced_unsupported()
        if why_not:
            return why_not
        rotary, weights = self.arch.inv_freq is not None, self._packed_weights(1)

        def replay(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, key_slots: torch.Tensor,
                   bags: tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor, keys: tuple[torch.Tensor, ...],
                   values: tuple[torch.Tensor, ...], weights: tuple[torch.Tensor, ...]) -> torch.Tensor:  # fmt: skip
            tables = (cos, sin) if rotary else (None, None)
            lone = LoneDecode(positions, slots, key_slots, Bags(*bags), tables[0], tables[1], keys, values)
            return self._forward(ids, lone, lone, None)

        def inputs(ids: torch.Tensor, lone: LoneDecode) -> tuple[Any, ...]:  # a trace takes tensors and tuples of them
            cos, sin = (lone.cos, lone.sin) if rotary else (ids.new_empty(0), ids.new_empty(0))  # GPT-2: no rotary
            return (ids, lone.positions, lone.slots, lone.key_slots, lone.bags.tensors(), cos, sin, lone.keys,
                    lone.values, weights)  # fmt: skip

        try:
            with self._lone_warm_ups() as warm_ups:
                lone_pass = self._trace_checked(replay, inputs, warm_ups)
        except Exception as exc:
            return f"tracing failed ({type(exc).__name__}: {str(exc)[:200]})"
        if lone_pass is None:
            return "the traced pass's logits differ from the plain step's"
        self.lone_pass = lone_pass
        return None

    def trace_batches(self, max_batch: int) -> str | None:
        """Batched decode steps' passes, traced as `trace` traces a lone one: one for each band of
        batch sizes whose products all run one weight format (`_format_bands`: a trace keeps the
        formats it saw). Sizes stay the replay's inputs (rows, blocks): each trace is checked bit
        for bit against the plain pass at three shapes. The packed float weights come in as inputs
        (a trace cannot hold them as constants; `_packed_product`). Where a band cannot be traced,
        why not; its steps run the plain pass (AMX Xeon, 160 cached: 25.0-25.4 against 30.3-31.1
        ms at 8 rows, 46.1-47.4 against 52.3-54.7 at 32, bench/README.md)."""
        why_not = self._traced_unsupported()
        if why_not:
            return why_not
        bands = _format_bands(self.linears, max_batch)
        passes: dict[int, Callable[[torch.Tensor, Decode], torch.Tensor]] = {}
        reasons = []
        for least, most in bands:
            traced = self._trace_band(least, most)
            if isinstance(traced, str):
                reasons.append(f"{least}-{most} rows: {traced}")
            elif traced is not None:
                passes[least] = traced
        self.batch_passes, self.batch_bands = passes, tuple(bands)
        return "; ".join(reasons) or None

    def _trace_band(self, least: int, most: int) -> Callable[[torch.Tensor, Decode], torch.Tensor] | str | None:
        """`trace_batches`' pass for steps of `least` to `most` rows (None for a band of one row: a
        lone sequence's pass serves it); or why not."""
        shapes = _batch_shapes(least, most)
        if not shapes:
            return None
        if max(map(sum, shapes)) > self.pool.blocks:
            return "a pool too small for the warm-up steps"
        rotary = self.arch.inv_freq is not None
        weights = self._packed_weights(least)

        def inputs(ids: torch.Tensor, d: Decode) -> tuple[Any, ...]:  # tensors and tuples of them only
            cos, sin = (d.cos, d.sin) if rotary else (ids.new_empty(0), ids.new_empty(0))
            return (ids, d.positions, d.slots, d.key_slots, d.bags.tensors(), cos, sin, tuple(self.pool.k),
                    tuple(self.pool.v), weights)  # fmt: skip

        def replay(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, key_slots: torch.Tensor,
                   bags: tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor, *pool_and_weights: Any
                   ) -> torch.Tensor:  # fmt: skip
            tables = (cos, sin) if rotary else (None, None)
            decode = Decode(positions, slots, key_slots, Bags(*bags), *tables)
            return self._forward(ids, decode, decode, None)

        try:
            with self._fresh_pool():
                warm_ups = [self._prepare_decode(self._warm_up_work(rows)) for rows in shapes]
                batch_pass = self._trace_checked(replay, inputs, warm_ups)
        except Exception as exc:
            return f"tracing failed ({type(exc).__name__}: {str(exc)[:200]})"
        return batch_pass or "the traced pass's logits differ from the plain step's"

    def _trace_checked(
        self, replay: Callable[..., torch.Tensor], inputs: Callable[..., tuple[Any, ...]], warm_ups: list[Any]
    ) -> Callable[..., torch.Tensor] | None:
        """`replay` traced at the first warm-up's inputs (`inputs` makes them from a step's), then
        run at every warm-up against the plain pass's logits: the traced pass, or None where any
        differs at all."""
        with warnings.catch_warnings():
            # its deprecation; and the products' weight formats, which it takes as picked for the
            # rows it saw (`Linear.format_at`): each pass runs at rows of one format
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(replay, inputs(*warm_ups[0]), check_trace=False)
            for ids, step in warm_ups:  # the executor's first calls also profile the graph
                if not torch.equal(traced(*inputs(ids, step)), self._forward(ids, step, step, None)):
                    return None
        return functools.partial(_replayed, traced, inputs)

    @contextlib.contextmanager
    def _fresh_pool(self) -> Iterator[None]:
        """In inference mode, a pool made as the engine makes it (the compiled pass checks how its
        tensors were made), handed back after: for the warm-ups of `trace`, `trace_batches` and
        `compile`."""
        with torch.inference_mode():
            self.pool = KVPool(self.pool.layers, self.pool.blocks, self.arch, self.dtype, self.device)
            try:
                yield
            finally:
                self.clear()

    def _warm_up_work(self, blocks: list[int]) -> Work:
        """A decode step of sequences holding these many blocks each, in blocks 0 on, zeroed."""
        starts = itertools.accumulate(blocks, initial=0)
        tables = [list(range(start, start + n)) for start, n in zip(starts, blocks, strict=False)]
        self.pool.zero(tuple(range(sum(blocks))))
        positions = [min(n * KV_BLOCK, self.max_context) - 2 - row % 3 for row, n in enumerate(blocks)]
        return Work(tables, [[row % 7] for row in range(len(blocks))], positions)

    def compile(self) -> str | None:
        """COMPILE=1: compile a lone sequence's decode pass with torch.compile, which fuses the
        small operations around the products into loops of its own (AMX Xeon, SmolLM2 on int4: a
        batch-1 step 7.75 against 11.0 ms, bench/README.md). Where the pass cannot be compiled
        (`_lone_unsupported`), or should compiling fail, why not. Compiled here, at load, for one,
        two and three blocks (the compiler treats a size of 1 apart, and makes a size dynamic once
        it changes), so nothing compiles while requests run."""
        why_not = self._lone_unsupported()
        if why_not:
            return why_not
        import torch._inductor.config

        torch._inductor.config.compile_threads = 1  # in this process: no pool of compiler processes left holding memory
        # Dynamo keeps compiled graphs by code object: this model's pass gets a code object of its
        # own, so that no other model's graphs (their checks on the model dropped) can serve it.
        forward = types.MethodType(types.FunctionType(Model._forward.__code__.replace(), globals()), self)
        # (sizes that change between calls become dynamic)
        compiled = torch.compile(forward, options={"guard_filter_fn": _guards_on_inputs})
        try:
            with self._lone_warm_ups() as warm_ups:
                for ids, lone in warm_ups:
                    compiled(ids, lone, lone, None)
        except Exception as exc:  # the compiler's own failure: the model runs as it would without COMPILE
            return f"compiling failed ({type(exc).__name__}: {str(exc)[:200]})"
        self.lone_pass = lambda ids, lone: compiled(ids, lone, lone, None)
        return None

    def keep_faster_lone_pass(self) -> str:
        """After `compile`: the lone pass traced too (`trace`), timed against the compiled one at
        the warm-ups' longest, in turns (`_first_is_faster`), and the faster kept. The compiled
        pass's loops win where the products are cheap (AMX Xeon: a step 7.75 against 11.0 ms) and
        lose where its generated code costs more than the operations it fuses (Zen 5 EPYC: 7.05
        against 5.87 ms, bench/README.md). Nothing if the compiled pass is kept; else, in words,
        that it was not."""
        compiled = self.lone_pass
        if compiled is None or self.trace() is not None:  # no traced pass to weigh it against
            self.lone_pass = compiled
            return ""
        traced = self.lone_pass
        assert traced is not None
        with self._lone_warm_ups() as warm_ups:
            ids, lone = warm_ups[-1]
            compiled_wins = _first_is_faster(lambda: compiled(ids, lone), lambda: traced(ids, lone), 5, 10)
        self.lone_pass = compiled if compiled_wins else traced
        return "" if compiled_wins else ", but the traced pass ran faster here and runs instead"

    def _traced_unsupported(self) -> str | None:
        """Why no decode pass is traced or compiled; None if it can be: only on a CPU (the only
        device it was measured on), where no layer slides a window (such layers take inputs of
        their own, `_windowed`) or caps its scores (Gemma 2: never measured traced)."""
        if self.device.type != "cpu":
            return "not on a CPU (the only device it was measured on)"
        if self.arch.windowed or self.arch.attn_softcap is not None:
            return "a sliding window or capped attention scores"
        return None

    def _packed_weights(self, rows: int) -> tuple[torch.Tensor, ...]:
        """oneDNN's packed float weights that products of this many rows read: a traced pass takes
        them as inputs (it cannot hold them as constants) and records their products through
        `_packed_product`. Only those: each input is passed at every replay."""
        return tuple(
            lin.weight
            for lin in self.linears
            if lin.weight is not None and lin.weight.is_mkldnn and lin.format_at(rows) == "float"
        )

    def _lone_unsupported(self) -> str | None:
        """Why a lone sequence's decode pass cannot be compiled (`_traced_unsupported`), or where a
        product at one row runs float weights, which `compile` cannot take; None if it can."""
        why_not = self._traced_unsupported()
        if why_not:
            return why_not
        if any(lin.format_at(1) == "float" for lin in self.linears):
            return "float weights at one row (QUANTIZE=none, or where int8 does not win)"
        return None

    @contextlib.contextmanager
    def _lone_warm_ups(self) -> Iterator[list[tuple[torch.Tensor, LoneDecode]]]:
        """A lone sequence's decode inputs at one, two and three blocks (as many as the pool and
        the context hold), in a fresh pool (`_fresh_pool`)."""
        with self._fresh_pool():
            yield [self._prepare_lone(self._warm_up_work([n])) for n in range(1, min(3, self.pool.blocks) + 1)]

    def _prepare_mixed(self, work: Work, chunks: list[int]) -> tuple[torch.Tensor, Mixed, torch.Tensor]:
        """The chunks' row (`_prepare_prefill`), then the other sequences' one token each as decode
        rows; and where each sequence's logits come from in that row, in the work's order."""
        rows = [i for i in range(len(work.tokens)) if i not in chunks]

        def part(which: list[int]) -> Work:
            pick = [work.tables[i] for i in which], [work.tokens[i] for i in which], [work.starts[i] for i in which]
            return Work(*pick, restore=tuple(work.restore_of(i) for i in which))

        prefill_ids, prefill = self._prepare_prefill(part(chunks), after=len(rows))
        decode_ids, decode = self._prepare_decode(part(rows))
        ends = list(itertools.accumulate(len(work.tokens[i]) for i in chunks))
        where = dict(zip(chunks, [end - 1 for end in ends], strict=True))
        where |= {i: prefill_ids.shape[1] + n for n, i in enumerate(rows)}
        last = torch.tensor([where[i] for i in range(len(work.tokens))], device=self.device)
        return torch.cat([prefill_ids, decode_ids.view(1, -1)], 1), Mixed.of(prefill, decode), last

    def _prepare_prefill(self, work: Work, after: int = 0) -> tuple[torch.Tensor, Prefill]:
        """The chunks run as one row, padded so that it and the `after` decode rows that follow it
        in a mixed pass make a multiple of PREFILL_BUCKET: each new input shape costs the matrix
        libraries a kernel (and its memory) of its own. Several short prompts in one pass read the
        weights once, where each alone cost a pass of ~16 tokens. The padding (positions 0.., a
        sequence of its own) is seen by no real token, and only the real tokens' keys are written
        to the pool."""
        d, count = self.device, len(work.tables)
        lengths = [len(tokens) for tokens in work.tokens]
        pad = -(sum(lengths) + after) % PREFILL_BUCKET
        ids = torch.tensor([[t for tokens in work.tokens for t in tokens] + [0] * pad], device=d)  # [1, T]
        row = torch.cat([torch.arange(s, s + n, device=d) for s, n in zip(work.starts, lengths, strict=True)]
                        + [torch.arange(pad, device=d)])  # fmt: skip
        owners = torch.repeat_interleave(torch.arange(count + 1, device=d), torch.tensor([*lengths, pad], device=d))
        earlier = [seq for seq, start in enumerate(work.starts) if start]  # the sequences with positions in the pool
        pasts = [(work.tables[seq], work.starts[seq]) for seq in earlier]
        tables = [table for table, n in zip(work.tables, lengths, strict=True) for _ in range(n)]
        slots = self.pool.slots(tables, row[: len(tables)].tolist())
        cos, sin = self._rotary(row[None], self.arch.inv_freq, self.arch.rope_scale)
        key_owners, key_positions = self._prefill_keys(earlier, work.starts, owners, row)
        key_slots = self.pool.key_slots(slots)
        prefill = Prefill(row[None], owners, pasts, key_owners, key_positions, slots, key_slots, None, cos, sin)
        # One sequence from its start needs no mask; Gemma 2's capped attention always takes one
        # (no SDPA kernel caps).
        if count > 1 or pasts or self.arch.attn_softcap:
            prefill = replace(prefill, mask=self._prefill_mask(prefill, None))
        return ids, prefill

    def _prefill_keys(
        self, earlier: list[int], starts: list[int], owners: torch.Tensor, row: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each key's sequence and position: the earlier positions of the `earlier` sequences, in
        their order (as `_attend_prefill` gathers them from `Prefill.pasts`), then the row's tokens."""
        sequence = [torch.full((starts[seq],), seq, device=self.device) for seq in earlier]
        position = [torch.arange(starts[seq], device=self.device) for seq in earlier]
        return torch.cat([*sequence, owners]), torch.cat([*position, row])

    def _prefill_mask(self, p: Prefill, window: int | None) -> torch.Tensor:
        """Which keys each token of the row sees: its own sequence's, up to its position, [1, 1, T, K] bool."""
        same = p.key_owners == p.owners[:, None]
        return (same & _visible(p.key_positions[None], p.positions[0, :, None], window))[None, None]

    def _prepare_lone(self, work: Work) -> tuple[torch.Tensor, LoneDecode]:
        ids, d = self._prepare_decode(work)
        return ids, LoneDecode(d.positions, d.slots, d.key_slots, d.bags, d.cos, d.sin, tuple(self.pool.k),
                               tuple(self.pool.v))  # fmt: skip

    def _prepare_decode(self, work: Work) -> tuple[torch.Tensor, Decode]:
        ids = torch.tensor(work.tokens, device=self.device)  # [B, 1]
        pos = torch.tensor(work.starts, device=self.device)[:, None]  # [B, 1]
        slots = self.pool.slots(work.tables, work.starts)
        cos, sin = self._rotary(pos, self.arch.inv_freq, self.arch.rope_scale)
        bags = self._bags(work.tables, [blocks_for(start + 1) for start in work.starts], pos)
        return ids, Decode(pos, slots, self.pool.key_slots(slots), bags, cos, sin)

    def _bags(self, tables: list[list[int]], counts: list[int], pos: torch.Tensor) -> Bags:
        """`Bags` for sequences holding `counts` blocks of these tables, new tokens at `pos`
        [B, 1]. Made with a few tensor operations, not Python loops over the indices (~55,000 of
        each at 32 sequences of three blocks)."""
        d, a, longest = self.device, self.arch, max(counts)
        table = torch.tensor([t[:n] + [0] * (longest - n) for t, n in zip(tables, counts, strict=True)], device=d)
        held = torch.arange(longest, device=d) < torch.tensor(counts, device=d)[:, None]  # [B, n]
        held = held[:, None].expand(-1, a.heads, -1)  # [B, Hq, n]: each (sequence, query head, block)
        # each block's first row of its key head, in a key layer seen as [P Hkv D, KV_BLOCK] (and
        # in a value layer seen as [P Hkv KV_BLOCK, D])
        first = table[:, None] * a.kv_heads + torch.arange(a.heads, device=d)[:, None] // (a.heads // a.kv_heads)
        first = first[held]  # [bags]
        key_rows = (first[:, None] * a.head_dim + torch.arange(a.head_dim, device=d)).flatten()
        key_bags = _starts(held.flatten() * a.head_dim)
        queries = torch.arange(held.shape[0] * a.heads, device=d)[:, None].expand(-1, longest)[held.flatten(0, 1)]
        value_rows = (first[:, None] * KV_BLOCK + torch.arange(KV_BLOCK, device=d)).flatten()
        value_bags = _starts(held.sum(-1).flatten() * KV_BLOCK)
        spots = torch.arange(held.numel(), device=d)[held.flatten()]  # each held block's place among the bags
        weights = (spots[:, None] * KV_BLOCK + torch.arange(KV_BLOCK, device=d)).flatten()
        return Bags(key_rows, key_bags, queries, value_rows, value_bags, weights, self._bag_mask(pos, longest, None))

    def _bag_mask(self, pos: torch.Tensor, blocks: int, window: int | None) -> torch.Tensor:
        """Additive, float32: [B, 1, blocks KV_BLOCK], each row's positions up to `pos`."""
        visible = _visible(torch.arange(blocks * KV_BLOCK, device=self.device)[None], pos, window)
        return torch.zeros(visible.shape, device=self.device).masked_fill_(~visible, -math.inf)[:, None]

    def _windowed(self, inputs: Prefill | Decode | Mixed) -> Prefill | Decode | Mixed:
        """The sliding-window layers' inputs: their own rotary tables (Gemma 3), and a mask that
        also hides what lies `window` or more positions behind each query, once a query is that far
        in. `inputs` itself where neither differs, so short sequences keep the plain causal path."""
        a, changes = self.arch, dict[str, Any]()
        if not a.windowed:
            return inputs
        if isinstance(inputs, Mixed):
            prefill, decode = self._windowed(inputs.prefill), self._windowed(inputs.decode)
            assert isinstance(prefill, Prefill) and isinstance(decode, Decode)
            return Mixed.of(prefill, decode)
        if a.local_inv_freq is not None:
            changes["cos"], changes["sin"] = self._rotary(inputs.positions, a.local_inv_freq, a.local_rope_scale)
        length = int(inputs.positions.max()) + 1  # the positions this pass sees: 0..length-1
        if a.window is not None and length > a.window:
            if isinstance(inputs, Prefill):
                changes["mask"] = self._prefill_mask(inputs, a.window)
            else:
                blocks = inputs.bags.mask.shape[-1] // KV_BLOCK
                changes["bags"] = replace(inputs.bags, mask=self._bag_mask(inputs.positions, blocks, a.window))
        return replace(inputs, **changes) if changes else inputs

    def _forward(
        self,
        ids: torch.Tensor,
        inputs: Prefill | Decode | Mixed | LoneDecode,
        windowed: Prefill | Decode | Mixed | LoneDecode,
        last: torch.Tensor | None,
    ) -> torch.Tensor:
        """The next-token logits [B, V] of each decode row (`last` None) or of the row's tokens at `last`."""
        x = self.embed(ids)  # [B, T, C]
        if self.arch.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_embed is not None:
            x = x + F.embedding(inputs.positions, self.pos_embed)
        for index, layer in enumerate(self.layers):
            x = self._layer(index, layer, x, windowed if index in self.arch.windowed else inputs)
        x = self._norm(x.select(1, -1) if last is None else x[0, last], *self.final_norm)  # only they need logits
        logits = self.lm_head(x)  # [B, V]
        cap = self.arch.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _layer(
        self, index: int, w: LayerWeights, x: torch.Tensor, inputs: Prefill | Decode | Mixed | LoneDecode
    ) -> torch.Tensor:
        a = self.arch
        qkv = w.qkv(self._norm(x, w.norm1, w.norm1_b)).unflatten(-1, (a.heads + 2 * a.kv_heads, a.head_dim))
        qk, v = qkv.split([a.heads + a.kv_heads, a.kv_heads], 2)
        if w.qk_norm is not None:  # each head's queries and keys, before the rotary
            qk = F.rms_norm(qk, (a.head_dim,), None, a.eps) * w.qk_norm
        if inputs.cos is not None and inputs.sin is not None:
            qk = _rotate(qk, inputs.cos, inputs.sin)  # queries and keys in one pass
        q, k = qk.transpose(1, 2).split([a.heads, a.kv_heads], 1)  # [B, Hq, T, D], [B, Hkv, T, D]
        v = v.transpose(1, 2)
        if isinstance(inputs, Prefill):
            attn = self._attend_prefill(index, q, k, v, inputs)
        elif isinstance(inputs, Mixed):
            attn = self._attend_mixed(index, q, k, v, inputs)
        else:
            attn = self._attend_decode(index, q, k, v, inputs)
        x = x + self._post_norm(w.out(attn.transpose(1, 2).flatten(2)), w.post_attn_norm)
        h = w.up(self._norm(x, w.norm2, w.norm2_b))
        if a.gated_mlp:
            gate, up = h.chunk(2, dim=-1)
            h = a.activation(gate) * up
        else:
            h = a.activation(h)
        return x + self._post_norm(w.down(h), w.post_mlp_norm)

    def _attend_prefill(
        self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Prefill
    ) -> torch.Tensor:
        keys, values = self.pool.k[index], self.pool.v[index]
        gqa, real, dim = self.arch.gqa, len(p.slots) // k.shape[1], k.shape[-1]
        keys.view(-1).index_put_((p.key_slots,), k[0, :, :real].transpose(0, 1).flatten())
        values.view(-1, dim).index_copy_(0, p.slots, v[0, :, :real].transpose(0, 1).reshape(-1, dim))
        scale, cap = self.arch.scale, self.arch.attn_softcap
        if p.mask is None:  # a prompt's first chunk, seeing only itself: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if p.pasts:  # the earlier positions, gathered from the sequences' blocks (a prefill's one copy)
            k = torch.cat([*(self.pool.gather(keys, table, start, True) for table, start in p.pasts), k], dim=2)
            v = torch.cat([*(self.pool.gather(values, table, start, False) for table, start in p.pasts), v], dim=2)
        if cap is not None:
            return _softcapped_attention(q, k, v, p.mask, scale, cap)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=p.mask, scale=scale, enable_gqa=gqa)

    def _attend_mixed(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: Mixed) -> torch.Tensor:
        """The chunks' part of the row as a prefill, the decode rows' part as a decode step."""
        t = m.prefill.positions.shape[1]
        chunks = self._attend_prefill(index, q[:, :, :t], k[:, :, :t], v[:, :, :t], m.prefill)  # [1, Hq, T, D]
        q, k, v = (x[:, :, t:].transpose(0, 2) for x in (q, k, v))  # [B, H, 1, D]
        return torch.cat([chunks, self._attend_decode(index, q, k, v, m.decode).transpose(0, 2)], 2)

    def _attend_decode(
        self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Decode | LoneDecode
    ) -> torch.Tensor:
        """One new token a sequence, written to its block, then attending over its own blocks where
        they lie in the pool: no copy of them, no padding to the longest (`Bags`). The scores of a
        block are its turned keys' D rows weighted by the query and summed, one bag of
        `F.embedding_bag` each; their softmax in float32 over each sequence's positions; the
        answer, the values' rows weighted by it, one bag a query head. Each sum runs in the
        kernel's float32 and leaves it in the pool's dtype. torch's fused attention needed the
        blocks copied into rows first, and without AMX runs two small products per sequence and
        key head (Zen 5 EPYC, SmolLM2, a layer at 160 cached: 65 against 146 us at 8 rows, 181
        against 548 at 32, bench/bag_attention.py). A lone sequence's pass gets the pool's layers as
        inputs (`LoneDecode`); the new key and value are written with index_put_, which the
        compiler writes in place."""
        if isinstance(d, LoneDecode):
            keys, values = d.keys[index], d.values[index]
        else:
            keys, values = self.pool.k[index], self.pool.v[index]
        a, b = self.arch, d.bags
        keys.view(-1).index_put_((d.key_slots,), k.flatten())
        values.view(-1, a.head_dim).index_put_((d.slots,), v.reshape(-1, a.head_dim))
        queries = q.reshape(-1, a.head_dim).index_select(0, b.queries).flatten()
        scores = F.embedding_bag(b.key_rows, keys.view(-1, KV_BLOCK), b.key_bags, mode="sum",
                                 per_sample_weights=queries)  # fmt: skip
        scores = scores.view(-1, a.heads, b.mask.shape[-1]).float()  # [B, Hq, n KV_BLOCK]
        cap = a.attn_softcap
        scores = scores * a.scale if cap is None else torch.tanh(scores * (a.scale / cap)) * cap
        weights = torch.softmax(scores + b.mask, -1).to(values.dtype).flatten().index_select(0, b.weights)
        out = F.embedding_bag(b.value_rows, values.view(-1, a.head_dim), b.value_bags, mode="sum",
                              per_sample_weights=weights)  # fmt: skip
        return out.view(-1, a.heads, 1, a.head_dim)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        width = self.width
        if self.arch.rms_norm:
            # RMS norm through torch's one-kernel layer norm: over [x, -x] the mean is 0 and the
            # variance mean(x^2), so the first half is x / sqrt(mean(x^2) + eps). F.rms_norm runs
            # about eight small kernels on a CPU (a step of one row 11.8 against 13.0 ms, AMX Xeon).
            normed = F.layer_norm(torch.cat([x, -x], -1), (2 * width,), None, None, self.arch.eps)
            return normed[..., :width] * weight
        return F.layer_norm(x, (width,), weight, bias, self.arch.eps)

    def _post_norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return x if weight is None else self._norm(x, weight, None)

    def _rotary(
        self, positions: torch.Tensor, inv_freq: torch.Tensor | None, scale: float
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos and sin tables for these positions [B, T, 1, D], one for every head, the first half
        of sin negated as `_rotate` takes it (one negation a step, not one a layer); GPT-2 has none."""
        if inv_freq is None:
            return None, None
        freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
        cos, sin = freqs.cos() * scale, freqs.sin() * scale
        cos, sin = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)  # [B, T, D]
        return cos[:, :, None].to(self.dtype), sin[:, :, None].to(self.dtype)


def _starts(sizes: torch.Tensor) -> torch.Tensor:
    """Where each of these runs starts when laid end to end."""
    return torch.cumsum(sizes, 0) - sizes


def _visible(keys: torch.Tensor, queries: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which key positions each query position sees (broadcast): those up to its own, and with a
    sliding window only those less than `window` behind it."""
    visible = keys <= queries
    if window is not None:
        visible &= keys > queries - window
    return visible


def _format_bands(linears: Iterable[Linear], max_batch: int) -> list[tuple[int, int]]:
    """Batch sizes 1 to `max_batch` in runs whose products each run one weight format throughout,
    as (fewest, most) rows: each product's formats change only past its `settled_from` rows
    (SmolLM2 on a Zen 5 EPYC: int4 up to 8 rows, bfloat16 past them: 1-8 and 9-32)."""
    edges = {rows for lin in linears for rows in lin.settled_from() if rows < max_batch}
    starts = sorted({1} | {rows + 1 for rows in edges})
    return list(zip(starts, [start - 1 for start in starts[1:]] + [max_batch], strict=True))


def _batch_shapes(least: int, most: int) -> list[list[int]]:
    """`trace_batches`' warm-ups for steps of `least` to `most` rows, as the blocks each row
    holds: the band's fewest rows of one block, more of two, and sequences of different lengths
    (none if the band is of one row). Few blocks: the pool is sized for the server's settings."""
    few = max(least, 2)
    if few > most:
        return []
    top = min(most, few + 3)
    return [[1] * least, [2] * top, [3] * (few // 2) + [1] * (few - few // 2)]


def _replayed(traced: Callable[..., torch.Tensor], inputs: Callable[..., tuple[Any, ...]], *args: Any) -> torch.Tensor:
    """A traced pass called with the inputs it was traced with, made from the step's."""
    return traced(*inputs(*args))


def _guards_on_inputs(guards: Sequence[Any]) -> list[bool]:
    """Which of Dynamo's checks the compiled pass keeps at each call: those on the step's inputs
    (their sizes pick among the compiled graphs), not the ~1,850 on the model and module globals
    (every weight, setting and function of it: 0.4-0.5 ms of a 9.5 ms step, AMX Xeon). After the
    load none of these changes but the pool's tensors, made again with the same sizes and dtype
    when handed back; and each model compiles a copy of the pass of its own (`Model.compile`)."""
    return [not (g.name == "self" or g.name.startswith(("self.", "self[", "G["))) for g in guards]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x's two halves turned by the angles: [a, b] * cos + [b, a] * sin, sin's first half negated
    (`_rotary`), as transformers' [a, b] * cos + [-b, a] * sin, bit for bit. The halves are taken
    by chunk, not by slices at x.shape[-1] // 2: a size read while tracing is an operation the
    traced pass replays."""
    first, second = x.chunk(2, -1)
    return x * cos + torch.cat([second, first], dim=-1) * sin


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cap: float
) -> torch.Tensor:
    """Gemma 2's prefill attention, in transformers' order: scores capped by tanh, then masked
    (no SDPA kernel caps). q [1, Hq, T, D]; k, v [1, Hkv, L, D]; mask [1, 1, T, L] bool."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh(q @ k.transpose(2, 3) * scale / cap) * cap
    weights = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1, dtype=torch.float32).to(q.dtype)
    return weights @ v


@dataclass(frozen=True)
class Convert:
    """Copies checkpoint tensors into the model's dtype and device, and projections into `Linear`s
    of the chosen weight formats. Always copies: a tensor left as a view of the checkpoint keeps
    its whole memory map resident."""

    dtype: torch.dtype
    device: torch.device
    int8_rows: int
    max_batch: int  # the model's rows; oneDNN packs float weights for products of this size
    int4_rows: int = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device=self.device, dtype=self.dtype, copy=True).contiguous()

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        int4 = pack_int4(weight) if self.int4_rows else None
        int8_rows = 0 if int4 is not None and self.int4_rows >= self.int8_rows else self.int8_rows  # int4 serves them
        int8 = pack_int8(weight) if int8_rows else None
        bias = None if bias is None else self(bias)
        floats = None if int8_rows == INT8_ALWAYS else pack_float(self(weight), self.max_batch)
        return Linear(weight.shape[1], floats, bias, int8, int8_rows, int4, self.int4_rows)


def build_model(hf_model: Any, convert: Convert) -> Model:
    kind = hf_model.config.model_type
    if kind not in BUILDERS:
        raise LoadError(f"model type {kind!r} is not supported; supported types: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[kind](hf_model, convert)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


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
        raise LoadError(f"GPT-2 activation {cfg.activation_function!r} is not supported (gelu_new only)")
    head_dim = cfg.n_embd // cfg.n_head
    arch = Architecture(cfg.n_head, cfg.n_head, head_dim, cfg.layer_norm_epsilon, cfg.n_positions,
                        rms_norm=False, gated_mlp=False, inv_freq=None, activation=_gelu_tanh)  # fmt: skip
    final = (cast(body.ln_f.weight), cast(body.ln_f.bias))
    embed, lm_head = _embedding_and_head(model, body.wte.weight, cast)
    return Model(arch, layers, embed, cast(body.wpe.weight), final, lm_head)


def _llama_model(model: Any, cast: Convert) -> Model:
    """Llama and the families of its shape, each quirk read from its checkpoint's modules: Qwen2's
    query/key/value biases, Qwen3's per-head query and key norms, Phi-3's fused projections,
    Mistral's and Phi-3's sliding window (Qwen2's too, where its config turns it on)."""
    cfg, body = model.config, model.model
    if cfg.hidden_act != "silu":
        raise LoadError(f"{cfg.model_type} with MLP activation {cfg.hidden_act!r} is not supported (silu only)")
    head_dim = body.layers[0].self_attn.head_dim
    inv_freq, rope_scale, context = _rope(cfg, body.rotary_emb, head_dim)
    window, windowed = _sliding_window(model)
    arch = Architecture(
        cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.rms_norm_eps, context,
        rms_norm=True, gated_mlp=True, inv_freq=inv_freq.to(cast.device), rope_scale=rope_scale,
        attn_scale=float(body.layers[0].self_attn.scaling), window=window, windowed=windowed,
    )  # fmt: skip
    layers = [_decoder_layer(b, arch, cast, cast) for b in body.layers]
    embed, lm_head = _embedding_and_head(model, body.embed_tokens.weight, cast)
    return Model(arch, layers, embed, None, (cast(body.norm.weight), None), lm_head)


def _gemma_model(model: Any, cast: Convert) -> Model:
    """Gemma 2 and Gemma 3 (text): Llama's shape with norms that scale by 1 + w, embeddings times
    sqrt(hidden), a GELU-gated MLP, and norms after attention and after the MLP as well; sliding-
    window layers alternate with global ones. Gemma 2 soft-caps attention scores and logits;
    Gemma 3 norms each head's queries and keys, and its sliding layers have a rotary of their own."""
    cfg, body = model.config, model.model
    if cfg.hidden_activation != "gelu_pytorch_tanh" or getattr(cfg, "use_bidirectional_attention", False):
        raise LoadError(f"{cfg.model_type} with bidirectional attention or a non-tanh GELU is not supported")
    head_dim, rotary = body.layers[0].self_attn.head_dim, body.rotary_emb
    local_freq, local_scale = None, 1.0
    if isinstance(rotary.rope_type, dict):  # Gemma 3: a rotary for each kind of layer it has
        ropes = {kind: _rope(cfg, rotary, head_dim, kind) for kind in rotary.rope_type}
        inv_freq, rope_scale, context = ropes["full_attention" if "full_attention" in ropes else "sliding_attention"]
        if "sliding_attention" in ropes:
            local_freq, local_scale, _ = ropes["sliding_attention"]
    else:
        inv_freq, rope_scale, context = _rope(cfg, rotary, head_dim)
    window, windowed = _sliding_window(model)
    arch = Architecture(
        cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.rms_norm_eps, context,
        rms_norm=True, gated_mlp=True, inv_freq=inv_freq.to(cast.device), rope_scale=rope_scale,
        activation=_gelu_tanh, attn_scale=float(body.layers[0].self_attn.scaling),
        embed_scale=float(body.embed_tokens.scalar_embed_scale),
        # Gemma 3's attention ignores attn_logit_softcapping (as transformers' does); Gemma 2 caps.
        attn_softcap=cfg.attn_logit_softcapping if cfg.model_type == "gemma2" else None,
        logit_softcap=cfg.final_logit_softcapping, window=window, windowed=windowed,
        local_inv_freq=None if local_freq is None else local_freq.to(cast.device), local_rope_scale=local_scale,
    )  # fmt: skip

    def norm(weight: torch.Tensor) -> torch.Tensor:
        return cast(weight.float() + 1)  # Gemma's RMSNorm scales by 1 + w: added once, here

    layers = [_decoder_layer(b, arch, cast, norm) for b in body.layers]
    embed, lm_head = _embedding_and_head(model, body.embed_tokens.weight, cast)
    return Model(arch, layers, embed, None, (norm(body.norm.weight), None), lm_head)


def _decoder_layer(
    b: Any, arch: Architecture, cast: Convert, norm: Callable[[torch.Tensor], torch.Tensor]
) -> LayerWeights:
    """One Llama-shaped layer's weights, with each family's extra parts where its checkpoint has
    them; `norm` copies a norm's weight."""
    attn, mlp = b.self_attn, b.mlp

    def fused(*linears: Any) -> Linear:
        has_bias = linears[0].bias is not None
        return cast.linear(
            torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears]) if has_bias else None
        )

    qkv = fused(attn.qkv_proj) if hasattr(attn, "qkv_proj") else fused(attn.q_proj, attn.k_proj, attn.v_proj)
    up = fused(mlp.gate_up_proj) if hasattr(mlp, "gate_up_proj") else fused(mlp.gate_proj, mlp.up_proj)
    qk_norm = None
    if hasattr(attn, "q_norm"):  # one weight per head: the queries' for Hq heads, then the keys' for Hkv
        q, k = attn.q_norm.weight, attn.k_norm.weight
        qk_norm = norm(torch.cat([q.expand(arch.heads, -1), k.expand(arch.kv_heads, -1)]))
    if hasattr(b, "pre_feedforward_layernorm"):  # Gemma: post_attention_layernorm norms the attention's output
        pre_mlp, post_attn = norm(b.pre_feedforward_layernorm.weight), norm(b.post_attention_layernorm.weight)
        post_mlp = norm(b.post_feedforward_layernorm.weight)
    else:  # Llama: post_attention_layernorm is the MLP's input norm
        pre_mlp, post_attn, post_mlp = norm(b.post_attention_layernorm.weight), None, None
    return LayerWeights(
        norm(b.input_layernorm.weight), None, qkv, cast.linear(attn.o_proj.weight, attn.o_proj.bias),
        pre_mlp, None, up, cast.linear(mlp.down_proj.weight, mlp.down_proj.bias), qk_norm, post_attn, post_mlp,
    )  # fmt: skip


def _rope(cfg: Any, rotary: Any, head_dim: int, kind: str | None = None) -> tuple[torch.Tensor, float, int]:
    """transformers' own rotary frequencies and scale (of one `kind` of layer, for Gemma 3), so
    static scalings (linear, llama3, yarn) are honoured, and the context they hold for. Two
    scalings change with a sequence's length, each beyond a context where they are fixed, and are
    served up to there: `dynamic` recomputes its frequencies past max_position_embeddings only,
    and `longrope` moves every position to its long factors once a sequence passes
    original_max_position_embeddings (its short factors hold until then)."""
    prefix, rope_type = ("", rotary.rope_type) if kind is None else (f"{kind}_", rotary.rope_type[kind])
    params = cfg.rope_parameters if kind is None else cfg.rope_parameters[kind]
    inv_freq = getattr(rotary, f"{prefix}original_inv_freq").detach().float()
    if 2 * inv_freq.numel() != head_dim:
        raise LoadError(
            f"{cfg.model_type} with a rotary embedding over part of each head (partial_rotary_factor "
            f"{params.get('partial_rotary_factor')}) is not supported"
        )
    context = cfg.max_position_embeddings
    if rope_type == "longrope":
        context = min(context, params["original_max_position_embeddings"])
    return inv_freq, float(getattr(rotary, f"{prefix}attention_scaling")), context


def _sliding_window(model: Any) -> tuple[int | None, frozenset[int]]:
    """The sliding window and the layers it applies to, read where transformers reads them: a
    layer's own attention (Qwen2, Qwen3, Gemma: by the config's `layer_types`), else the config
    (Mistral, Phi-3: every layer)."""
    window = getattr(model.config, "sliding_window", None)
    layers = model.model.layers
    windowed = frozenset(i for i, b in enumerate(layers) if getattr(b.self_attn, "sliding_window", window))
    return (window if windowed else None), windowed


BUILDERS: dict[str, Callable[[Any, Convert], Model]] = {
    "gpt2": _gpt2_model,
    "llama": _llama_model,
    "mistral": _llama_model,
    "qwen2": _llama_model,
    "qwen3": _llama_model,
    "phi3": _llama_model,
    "gemma2": _gemma_model,
    "gemma3_text": _gemma_model,
}


def _embedding_and_head(model: Any, embedding: torch.Tensor, cast: Convert) -> tuple[Embedding, Linear]:
    """The input embedding and the output projection, which small models tie (see `Embedding`)."""
    head = cast.linear(model.lm_head.weight, None)
    tied = model.lm_head.weight.data_ptr() == embedding.data_ptr()
    if tied and head.int8 is not None:
        table, scale = head.int8
        return Embedding(table, cast.dtype, scale.float()), head
    return Embedding(cast(embedding), cast.dtype), head
