"""Time the bare matrix products of one decode step, per weight format and batch size, on this CPU.

For a LLaMA-shaped model (default SmolLM2-135M; shapes read from its config.json) it builds every
layer's projection weights as distinct tensors (q, k, v, o, gate, up, down) plus the output head,
so each pass streams all weights from memory as a real step does, then times `F.linear` over all
of them at each batch size. Random weights: only shapes and formats matter for speed.

Formats:
  float32     F.linear, float32 weights and activations
  float32-packed  float32 weights in oneDNN's packed layout (what the engine's float path runs)
  int8-dynamic  fbgemm's dynamic int8 (`quantized.linear_dynamic`: activations quantized to 7 bits
              per call); fast, but bench/quality.py measures +231% perplexity: not used
  bfloat16    F.linear, bfloat16 weights and activations
  int8-bf16   int8 weight-only, per-output-channel scales, `aten._weight_int8pack_mm`, bfloat16 activations
  int8-f32    the same kernel with float32 activations (not by default: a slow path here)
  int4-g32, int4-g64  int4 weight-only in groups of 32 or 64 inputs (the engine's `model.pack_int4`),
              `aten._weight_int4pack_mm_for_cpu`, bfloat16 activations

Run: python bench/matmul_formats.py [--model models/smollm2-135m-instruct] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from run_bench import cpu_info, cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model

FORMATS = ("float32", "float32-packed", "bfloat16", "int8-bf16", "int8-f32", "int8-dynamic", "int4-g32", "int4-g64")
# int8-f32 measured 5-20x slower than int8-bf16 here, so it is not run unless asked
DEFAULT_FORMATS = ["float32", "float32-packed", "bfloat16", "int8-bf16", "int8-dynamic"]
Product = Callable[[torch.Tensor], torch.Tensor]


def shapes(model_dir: str) -> list[tuple[int, int]]:
    """(out_features, in_features) of every matrix product in one decode step, in order."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    layer = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]
    head: tuple[int, int] = (cfg["vocab_size"], hidden)
    return [*(layer * layers), head]


def product(out_f: int, in_f: int, fmt: str) -> tuple[Product, torch.dtype]:
    """One weight of the given shape in the given format, and the activation dtype it takes."""
    weight = torch.randn(out_f, in_f) * in_f**-0.5
    if fmt in ("float32", "bfloat16"):
        dtype = torch.float32 if fmt == "float32" else torch.bfloat16
        w = weight.to(dtype)
        return (lambda x: F.linear(x, w)), dtype
    if fmt == "float32-packed":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        return (lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")), torch.float32
    if fmt.startswith("int4-g"):
        group = int(fmt.removeprefix("int4-g"))
        packed, scales = model.pack_int4(weight, group, exact=None)  # type: ignore[misc]  # never None here
        return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales)), torch.bfloat16
    scale = weight.abs().amax(dim=1) / 127
    if fmt == "int8-dynamic":
        zero = torch.zeros(out_f, dtype=torch.long)
        qweight = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
        prepacked = torch.ops.quantized.linear_prepack(qweight, None)
        return (lambda x: torch.ops.quantized.linear_dynamic(x, prepacked, True)), torch.float32
    dtype = torch.bfloat16 if fmt == "int8-bf16" else torch.float32
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    s = scale.to(dtype)
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, s)), dtype


def one_pass(products: list[tuple[Product, int]], inputs: dict[int, torch.Tensor]) -> float:
    """Seconds of one pass over all products (each fed an input of its own width)."""
    start = time.perf_counter()
    for fn, width in products:
        fn(inputs[width])
    return time.perf_counter() - start


@torch.inference_mode()
def measure(model_dir: str, formats: list[str], batches: list[int], reps: int) -> dict[str, dict[int, float]]:
    """Median ms per pass for each format and batch. The formats take turns within each repetition,
    so a burst of load from others on this shared machine falls on all of them alike."""
    built = {fmt: [(product(o, i, fmt), i) for o, i in shapes(model_dir)] for fmt in formats}
    times: dict[str, dict[int, list[float]]] = {fmt: {b: [] for b in batches} for fmt in formats}
    for batch in batches:
        for rep in range(reps + 1):  # repetition 0 warms caches and kernels and is not counted
            for fmt in formats:
                dtype = built[fmt][0][0][1]
                inputs = {width: torch.randn(batch, width).to(dtype) for _, width in built[fmt]}
                seconds = one_pass([(fn, width) for (fn, _), width in built[fmt]], inputs)
                if rep:
                    times[fmt][batch].append(seconds)
    return {fmt: {b: round(1000 * statistics.median(t), 2) for b, t in per.items()} for fmt, per in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=DEFAULT_FORMATS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # others share this machine: how busy it was
    ms = measure(args.model, args.formats, args.batches, args.reps)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    cpu = cpu_info()
    n = len(shapes(args.model))
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"{cpu_name(cpu)}, torch {torch.__version__} ({isa}), {args.threads} threads; "
          f"{args.model}: {n} distinct weights; ms per pass (median of {args.reps}); load 1 min {load}")  # fmt: skip
    print("| batch | " + " | ".join(args.formats) + " | fastest |")
    print("|---|" + "---|" * (len(args.formats) + 1))
    for b in args.batches:
        best = min(args.formats, key=lambda f: ms[f][b])
        print(f"| {b} | " + " | ".join(str(ms[f][b]) for f in args.formats) + f" | {best} |")
    if args.json:
        record = {"cpu": cpu, "torch": torch.__version__, "threads": args.threads, "model": args.model,
                  "date": time.strftime("%Y-%m-%d"), "load_1min_start_end": load, "ms_per_pass": ms}  # fmt: skip
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
