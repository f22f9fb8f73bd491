"""Teacher-forced quality of lower-precision weight formats against float32.

Feeds real English text (default: the GPL-3 text that every Debian machine has in
/usr/share/common-licenses/, written by people, not by a model) through the model in
non-overlapping windows, and compares each format's next-token logits with float32's at every
position: top-1 agreement (same argmax as float32) and perplexity on the text.

Formats:
  float32    the reference
  bfloat16   the whole model cast to bfloat16 (what DTYPE=bfloat16 runs)
  int8       int8 weight-only: every nn.Linear weight and the lm_head quantized per output
             channel with symmetric scales (max |w| / 127), computed as int8 * scale in float32:
             the error of the weight format alone; a tied input embedding takes the same int8
             rows (as the engine's does)
  int8-bf16  the same int8 weights through torch's CPU kernel `aten._weight_int8pack_mm`, which
             takes bfloat16 activations (the rest of the model stays float32): what a fast int8 path runs
  int8-dynamic  the same int8 weights through fbgemm's dynamic-quantization kernel
             (`quantized.linear_dynamic`): activations quantized to 7-bit per call, integer dot
             products, float32 out: 3-4x faster than float32 here, but see its perplexity
  int4       what the engine runs for one row where int4 is faster: int4 weight-only (asymmetric,
             one scale and offset per group of 32 inputs, `model.pack_int4`, torch's CPU kernel
             `aten._weight_int4pack_mm_for_cpu`, bfloat16 activations) for the weights it holds
             exactly (a checkpoint made of 4-bit blocks), int8-bf16 for the others
  int4-g32-all, int4-g64-all  every nn.Linear and the lm_head on int4, groups of 32 or 64, whatever
             the error (a tied input embedding stays float: a lookup, not a product)
  w8a8-rows  what oneDNN's int8 x int8 product would run at 5+ rows: every nn.Linear but the
             lm_head on the int8 weights, its activations rounded to 8 bits with one symmetric
             scale per row (token), in float32 (the error of the formats, not of a kernel); the
             head stays float32, as the engine's runs bfloat16 past a few rows

The issue's rule: int8 weight-only must stay within 1% of float32 perplexity to be a default.

Run: python bench/quality.py [--model models/smollm2-135m-instruct] [--json bench/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
FORMATS = (
    "float32",
    "bfloat16",
    "int8",
    "int8-bf16",
    "int8-dynamic",
    "int4",
    "int4-g32-all",
    "int4-g64-all",
    "w8a8-rows",
)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: weight ~= q * scale[:, None]."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one float scale per output channel."""

    q: torch.Tensor
    scale: torch.Tensor
    dequant: torch.Tensor

    def __init__(self, linear: nn.Linear, kernel: bool):
        super().__init__()
        q, scale = quantize(linear.weight.detach().float())
        self.kernel = kernel
        self.register_buffer("q", q)
        # The kernel wants its scales in the activations' dtype; the float32 path dequantizes once
        # (int8 * scale is exact in float32, so this equals dequantizing on the fly).
        self.register_buffer("scale", scale.to(torch.bfloat16) if kernel else scale)
        self.register_buffer("dequant", torch.empty(0) if kernel else q.float() * scale[:, None])
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel:
            return F.linear(x, self.dequant, self.bias)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale).to(x.dtype)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


class DynamicInt8Linear(nn.Module):
    """A Linear run by fbgemm's dynamic int8 kernel: the same int8 weights, and the activations
    quantized to 7 bits with one scale per call. Measured and rejected: see bench/README.md."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize(linear.weight.detach().float())
        zero = torch.zeros(len(scale), dtype=torch.long)
        qweight = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(), zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)  # type: ignore[no-any-return]


class RowInt8Linear(nn.Module):
    """`w8a8-rows`: int8 weights per output channel, and each row of activations rounded to int8
    with its own symmetric scale (max |x| / 127) before the product, dequantized in float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize(linear.weight.detach().float())
        self.weight, self.bias = q.float() * scale[:, None], linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        return F.linear(torch.round(x / scale).clamp(-127, 127) * scale, self.weight, self.bias)


class Int4Linear(nn.Module):
    """A Linear whose weight is int4 in groups (the engine's `model.pack_int4`), run by the CPU
    kernel in bfloat16."""

    def __init__(self, packed: tuple[torch.Tensor, torch.Tensor], group: int, bias: torch.Tensor | None):
        super().__init__()
        self.group, (self.packed, self.scales), self.bias = group, packed, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales)
        out = out.to(x.dtype)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


def quantized(linear: nn.Linear, kind: str) -> nn.Module:
    """`int4`: as the engine runs one row on the offline SmolLM2 (int4 where it holds a weight
    exactly, int8 elsewhere); `int4-gN-all`: every weight on int4 in groups of N."""
    if kind == "w8a8-rows":
        return RowInt8Linear(linear)
    if kind.startswith("int4"):
        group = int(kind.split("-")[1].removeprefix("g")) if kind != "int4" else model.INT4_GROUP
        packed = model.pack_int4(linear.weight, group, None if kind.endswith("-all") else model.INT4_EXACT)
        if packed is not None:
            return Int4Linear(packed, group, linear.bias)
        return Int8Linear(linear, True)
    return DynamicInt8Linear(linear) if kind == "int8-dynamic" else Int8Linear(linear, kind == "int8-bf16")


def quantize_linears(model: nn.Module, kind: str) -> nn.Module:
    """Swap every nn.Linear (the lm_head too, but for `w8a8-rows`; a tied head gets its own copy)
    for a quantized one."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    for parent in list(model.modules()):
        for attr, sub in list(parent.named_children()):
            if isinstance(sub, nn.Linear) and not (kind == "w8a8-rows" and sub is head):
                setattr(parent, attr, quantized(sub, kind))
    return model


def quantize_tied_embedding(model: nn.Module, bf16_scales: bool) -> None:
    """As the engine does when the output head is tied to the input embedding: the embedding's
    rows come from the head's int8 copy times its scales (bfloat16 scales with the kernel)."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    q, scale = quantize(embedding.weight.detach().float())
    if bf16_scales:
        scale = scale.to(torch.bfloat16).float()
    embedding.weight = nn.Parameter(q.float() * scale[:, None], requires_grad=False)


def load(model_dir: str, fmt: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if fmt == "bfloat16":
        model = model.to(torch.bfloat16)
    elif fmt != "float32":
        tied = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()  # type: ignore[operator]
        model = quantize_linears(model, fmt)
        if tied and fmt in ("int8", "int8-bf16"):
            quantize_tied_embedding(model, bf16_scales=fmt == "int8-bf16")
    return model


def windows(ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Non-overlapping windows; each is scored on its positions 1..n-1 (its first token has no context)."""
    return [ids[i : i + size] for i in range(0, len(ids) - 1, size) if len(ids[i : i + size]) > 1]


@torch.inference_mode()
def logits_of(model: nn.Module, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """float32 log-probabilities for each window (positions 0..n-2 predict tokens 1..n-1)."""
    forward: Callable[..., object] = model
    out = []
    for chunk in chunks:
        result = forward(input_ids=chunk[None])
        logits = result.logits[0, :-1].float()  # type: ignore[attr-defined]
        out.append(torch.log_softmax(logits, dim=-1))
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], chunks: list[torch.Tensor]) -> dict[str, float]:
    agree, nll, correct, n = 0, 0.0, 0, 0
    for r, g, chunk in zip(ref, got, chunks, strict=True):
        targets = chunk[1:]
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        correct += int((g.argmax(-1) == targets).sum())
        nll -= float(g.gather(1, targets[:, None]).sum())
        n += len(targets)
    return {"positions": n, "top1_agreement": agree / n, "next_token_accuracy": correct / n,
            "perplexity": math.exp(nll / n)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--min-tokens", type=int, default=5000)
    parser.add_argument("--max-tokens", type=int, help="score only the text's first N tokens (quick checks)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    ids = torch.tensor(AutoTokenizer.from_pretrained(args.model)(args.text.read_text()).input_ids)[: args.max_tokens]
    if len(ids) < args.min_tokens:
        parser.error(f"{args.text} has {len(ids)} tokens, fewer than --min-tokens {args.min_tokens}")
    chunks = windows(ids, args.window)
    start = time.perf_counter()
    ref = logits_of(load(args.model, "float32"), chunks)
    ref_seconds = round(time.perf_counter() - start, 1)
    results = {}
    for fmt in args.formats:
        start = time.perf_counter()
        got = ref if fmt == "float32" else logits_of(load(args.model, fmt), chunks)
        seconds = ref_seconds if fmt == "float32" else round(time.perf_counter() - start, 1)
        results[fmt] = {**compare(ref, got, chunks), "seconds": seconds}  # load + forward passes, wall clock
        del got
    base = compare(ref, ref, chunks)["perplexity"]
    print(f"{args.model}, {args.text} ({len(ids)} tokens, windows of {args.window})")
    print("| format | top-1 agreement with float32 | perplexity | vs float32 | next-token accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    for fmt, r in results.items():
        print(f"| {fmt} | {r['top1_agreement']:.2%} | {r['perplexity']:.3f} | {r['perplexity'] / base - 1:+.2%} | "
              f"{r['next_token_accuracy']:.2%} | {r['seconds']} |")  # fmt: skip
    for fmt in results:
        if fmt.startswith(("int", "w8a8")):
            rise = results[fmt]["perplexity"] / base - 1
            verdict = "may be the default" if rise <= 0.01 else "may NOT be the default"
            print(f"{fmt}: perplexity {rise:+.2%} vs float32 (rule: within 1%): {verdict}")
    if args.json:
        record = {"model": args.model, "text": str(args.text), "tokens": len(ids), "window": args.window,
                  "torch": torch.__version__, "results": results}  # fmt: skip
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
