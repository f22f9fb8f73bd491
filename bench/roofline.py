"""The engine's own efficiency: one full decode step of our Model against the bare matrix products
of the same weights in the same format, at several batch sizes, in one run.

The ratio (step / bare products) is comparable across machines: 1.0 would mean everything but
the matrix products is free. Beside it, the floor that memory sets: a step reads its sequences'
keys and values as well as the weights, and reading them takes at least their bytes over the
bandwidth a plain sum streams from memory here, so no step can cost less than
1 + (KV bytes / bandwidth) / products' time. Where the products stream their weights at that
bandwidth this is (weight bytes + KV bytes) / weight bytes; where they are bound by arithmetic
(bfloat16 at 32 rows without AMX) it is lower. Prints a Markdown table and the CPU it ran on;
writes JSON.

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


def weight_bytes(network: model.Model, rows: int) -> int:
    """The bytes of the weights a product of this many rows reads, in the format `Linear` picks."""

    def read(lin: model.Linear) -> tuple[torch.Tensor | None, ...]:
        weights = {"int4": lin.int4, "int8": lin.int8, "float": (lin.weight,)}[lin.format_at(rows)]
        assert weights is not None
        return (*weights, lin.bias)

    return sum(t.numel() * t.element_size() for lin in network.linears for t in read(lin) if t is not None)


def stream_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes a second a sum reads from memory here: a tensor far larger than any cache, once."""
    data = torch.ones(megabytes << 18)  # float32: 4 bytes an element
    seconds = median_ms(data.sum, repeats) / 1000
    return data.numel() * data.element_size() / seconds


def kv_bytes(network: model.Model, batch: int, cached: int) -> int:
    """The keys and values a decode step of `batch` sequences of `cached` tokens reads: whole blocks."""
    return batch * model.blocks_for(cached + 1) * network.pool.block_bytes


def step_work(network: model.Model, batch: int, cached: int, last: int | None = None) -> Work:
    """The work of one decode step of `batch` sequences that each hold `cached` tokens (the last
    one `last`, if given: a long prompt among short ones), their blocks interleaved in the pool as
    sequences growing together get them (the pool's contents do not change the cost)."""
    starts = [cached] * (batch - 1) + [cached if last is None else last]
    tables = [[b * batch + seq for b in range(model.blocks_for(start + 1))] for seq, start in enumerate(starts)]
    network.pool.zero(tuple(block for table in tables for block in table))
    return Work(tables, [[1]] * batch, starts)


def full_step(network: model.Model, batch: int, cached: int, last: int | None = None) -> Callable[[], object]:
    """One decode step of `step_work`'s sequences, as the engine runs it."""
    work = step_work(network, batch, cached, last)
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
    # The server's batch size at least: the dtype and formats are chosen for it (float32 at one row here)
    max_batch = max(*args.batches, engine.ModelConfig.max_batch)
    config = engine.ModelConfig(name=args.model, dtype=args.dtype, max_batch=max_batch, quantize=args.quantize,
                                compile=args.compile)  # fmt: skip
    loaded = load_apart(config)
    bandwidth, rows = stream_bandwidth(), []
    with torch.inference_mode():
        for batch in args.batches:
            step = median_ms(full_step(loaded.model, batch, args.cached), args.repeats)
            bare = median_ms(bare_products(loaded.model, batch), args.repeats)
            read, kv = weight_bytes(loaded.model, batch), kv_bytes(loaded.model, batch, args.cached)
            rows.append({"batch": batch, "step_ms": round(step, 2), "products_ms": round(bare, 2),
                         "ratio": round(step / bare, 2), "weight_mb": round(read / 1e6, 1),
                         "kv_mb": round(kv / 1e6, 1), "floor": round(1 + kv / bandwidth * 1000 / bare, 2),
                         "weights_gbs": round(read / bare / 1e6, 1)})  # fmt: skip
    cpu = cpu_description()
    weights = f"{loaded.weights}{f'; {loaded.lone_pass}' if loaded.lone_pass else ''}"
    print(
        f"{args.model}, activations {loaded.dtype}, weights {weights}, {args.cached} cached tokens; {cpu}; "
        f"a sum streams {bandwidth / 1e9:.1f} GB/s\n"
    )
    print("| batch | decode step (ms) | bare matrix products (ms) | ratio | weights read (MB) | products read "
          "(GB/s) | keys and values read (MB) | memory's floor for the ratio |\n" + "|---" * 8 + "|")  # fmt: skip
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms']} | {r['products_ms']} | {r['ratio']} | {r['weight_mb']} "
              f"| {r['weights_gbs']} | {r['kv_mb']} | {r['floor']} |")  # fmt: skip
    if args.json:
        out = {"model": args.model, "dtype": str(loaded.dtype), "weights": loaded.weights, "cpu": cpu,
               "cached": args.cached, "compiled": args.compile, "bandwidth_gbs": round(bandwidth / 1e9, 1),
               "rows": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
