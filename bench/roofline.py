"""The engine's own efficiency: one full decode step of our Model against the bare matrix products
of the same weights in the same format, at several batch sizes, in one run.

The ratio (step / bare products) is comparable across machines: 1.0 would mean everything but
the matrix products is free. Prints a Markdown table and the CPU it ran on; writes JSON.

Run: python bench/roofline.py --model models/smollm2-135m-instruct [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine
import model
from model import Work


def cpu_description() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    isa = "AMX" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?"
    return f"{model} ({isa}, {torch.get_num_threads()} threads)"


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: kernels are picked on first use
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def bare_products(network: model.Model, batch: int) -> Callable[[], object]:
    """Every projection of a step applied once to a batch of activations of the right width,
    through the engine's own `Linear`s: the same weight formats and kernels the step runs."""
    dtype = network.dtype
    linears = network.linears
    inputs = {lin.in_features: torch.randn(batch, lin.in_features, dtype=dtype) for lin in linears}

    def run() -> None:
        for lin in linears:
            lin(inputs[lin.in_features])

    return run


def full_step(network: model.Model, batch: int, cached: int) -> Callable[[], object]:
    """One decode step of `batch` sequences that each hold `cached` tokens (the pool's contents do
    not change the cost), their blocks interleaved in the pool as sequences growing together get them."""
    blocks = model.blocks_for(cached + 1)
    tables = [[b * batch + seq for b in range(blocks)] for seq in range(batch)]
    network.pool.zero(tuple(range(batch * blocks)))
    work = Work(tables, [[1]] * batch, [cached] * batch)
    return lambda: network.run(work)


def load_apart(config: engine.ModelConfig) -> model.LoadedModel:
    """The model loaded as the server loads it, in a thread that ends with the load (COMPILE=1's
    compiling in this thread left its products 1.5x slower: 7.9 against 5.4 ms at one row)."""
    loaded: list[model.LoadedModel] = []
    thread = threading.Thread(target=lambda: loaded.append(model.load_model(config, engine.PREFILL_CHUNK)))
    thread.start()
    thread.join()
    return loaded[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", default="auto", help="auto | none | int8, as the server's QUANTIZE")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--cached", type=int, default=160, help="tokens already in each row's cache")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: the CPUs we may use, as the server")
    parser.add_argument("--compile", action="store_true", help="COMPILE=1: a lone sequence's decode pass compiled")
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.use_threads(args.threads)
    config = engine.ModelConfig(name=args.model, dtype=args.dtype, max_batch=max(args.batches), quantize=args.quantize,
                                compile=args.compile)  # fmt: skip
    loaded = load_apart(config)
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            step = median_ms(full_step(loaded.model, batch, args.cached), args.repeats)
            bare = median_ms(bare_products(loaded.model, batch), args.repeats)
            rows.append({"batch": batch, "step_ms": round(step, 2), "products_ms": round(bare, 2),
                         "ratio": round(step / bare, 2)})  # fmt: skip
    cpu = cpu_description()
    weights = f"{loaded.weights}{f'; {loaded.compiled}' if loaded.compiled else ''}"
    print(f"{args.model}, activations {loaded.dtype}, weights {weights}, {args.cached} cached tokens; {cpu}\n")
    print("| batch | decode step (ms) | bare matrix products (ms) | ratio |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['step_ms']} | {row['products_ms']} | {row['ratio']} |")
    if args.json:
        out = {"model": args.model, "dtype": str(loaded.dtype), "weights": loaded.weights, "cpu": cpu,
               "cached": args.cached, "compiled": args.compile, "rows": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
