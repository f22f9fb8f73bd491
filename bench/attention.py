"""One decode step's attention for one layer (one new token a row, 160 cached): torch's
`scaled_dot_product_attention` against the engine's two batched products (query heads that share
a key head grouped, additive mask), SmolLM2's shape (9 query heads, 3 key heads, 64 wide).

Run: python bench/attention.py [--threads 2]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from roofline import median_ms

HEADS, KV_HEADS, DIM, CACHED = 9, 3, 64, 160


def compare(batch: int) -> tuple[float, float]:
    group, length = HEADS // KV_HEADS, CACHED + 1
    keys, values = torch.randn(batch, KV_HEADS, 256, DIM), torch.randn(batch, KV_HEADS, 256, DIM)
    k, v = keys[:, :, :length], values[:, :, :length]  # the cache is longer than the positions in use
    q = torch.randn(batch, KV_HEADS, group, DIM)
    visible = torch.arange(length)[None] <= torch.randint(100, length, (batch, 1))
    mask = torch.zeros(batch, length).masked_fill_(~visible, -math.inf)
    sdpa_mask = mask[:, None, None]
    grouped_mask = sdpa_mask.expand(batch, KV_HEADS, group, length).reshape(-1, group, length)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)

    def products() -> torch.Tensor:
        flat_k, flat_v = k.reshape(-1, length, DIM), v.reshape(-1, length, DIM)
        scores = torch.baddbmm(grouped_mask, q.reshape(-1, group, DIM), flat_k.transpose(1, 2), alpha=DIM**-0.5)
        return torch.bmm(torch.softmax(scores, dim=-1), flat_v).view(batch, KV_HEADS, group, DIM)

    assert torch.allclose(sdpa(), products(), atol=1e-5)
    return 1000 * median_ms(sdpa, 50), 1000 * median_ms(products, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| batch | SDPA (us) | two batched products (us) |\n|---|---|---|")
    for batch in args.batches:
        sdpa, products = compare(batch)
        print(f"| {batch} | {sdpa:.0f} | {products:.0f} |")


if __name__ == "__main__":
    main()
