"""The batched decode's two products (`Model._scores`, `Model._segmented`) each way round: a block's
few queries as the rows (scores [G, KV_BLOCK] = q k^T, then weights v) or its keys and values as
the rows (k q^T, then v^T weights^T: the same numbers, transposed). SmolLM2's shape (3 key heads,
3 queries each, 64 wide), `--blocks` blocks a layer, every layer's keys and values distinct
tensors, so each pass streams them from memory as a decode step does (1,152 blocks: 32 sequences
of 750 tokens, 566 MB). Milliseconds for all layers, per dtype.

Run: python bench/block_products.py [--blocks 1152] [--dtypes bfloat16 float32]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from roofline import cpu_description, median_ms

KV_HEADS, GROUP, DIM, BLOCK, LAYERS = 3, 3, 64, 64, 30


def forms(dtype: torch.dtype, blocks: int) -> list[Callable[[], object]]:
    """The four products over every layer, in the table's order."""
    keys = [torch.randn(blocks, BLOCK, DIM, dtype=dtype) for _ in range(LAYERS)]
    values = [torch.randn(blocks, BLOCK, DIM, dtype=dtype) for _ in range(LAYERS)]
    queries = [torch.randn(blocks, GROUP, DIM, dtype=dtype) for _ in range(LAYERS)]
    weights = [torch.randn(blocks, GROUP, BLOCK, dtype=dtype) for _ in range(LAYERS)]
    turned = [w.transpose(1, 2).contiguous() for w in weights]  # [N, BLOCK, G], as `_segmented` lays them
    return [
        lambda: [torch.bmm(q, k.transpose(1, 2)) for q, k in zip(queries, keys, strict=True)],
        lambda: [torch.bmm(k, q.transpose(1, 2)) for q, k in zip(queries, keys, strict=True)],
        lambda: [torch.bmm(w, v) for w, v in zip(weights, values, strict=True)],
        lambda: [torch.bmm(t.transpose(1, 2), v) for t, v in zip(turned, values, strict=True)],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1152, help="blocks a layer, all key heads counted")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.blocks} blocks a layer, {LAYERS} layers; {cpu_description()}\n")
    print("| dtype | scores q k^T | scores k q^T | values w v | values (v^T w^T)^T |")
    print("|---|---|---|---|---|")
    for name in args.dtypes:
        times = [median_ms(form, 10) for form in forms(getattr(torch, name), args.blocks)]
        print(f"| {name} | " + " | ".join(f"{ms:.1f}" for ms in times) + " |")


if __name__ == "__main__":
    main()
