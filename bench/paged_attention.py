"""Decode attention over a paged KV cache, pure PyTorch (issue 18): one layer, one new token a
row, SmolLM2's shape (9 query heads, 3 key heads, 64 wide). Today's padded rows against a pool of
fixed-size blocks read (a) by gathering each sequence's blocks into rows, (b) in place,
flash-decoding style (one product per block, then a softmax segmented by owner, combined by
scatter or through a [B, max blocks] table of the partials), (c) by a loop over sequences whose
blocks are contiguous (a best case: a real pool fragments). Per-step tensors (masks, owners,
tables) are made outside the timed call, as the engine makes them once for all layers.

Run: python bench/paged_attention.py [--threads 2] [--dtypes float32 bfloat16] [--blocks 16 64]
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable

import torch
from roofline import cpu_description, median_ms

HEADS, KV_HEADS, DIM, LAYERS = 9, 3, 64, 30
GROUP, SCALE = HEADS // KV_HEADS, DIM**-0.5
Attend = Callable[[], torch.Tensor]  # returns [B, Hkv, G, D]
VARIANTS = [("gather", ""), ("in place", " scatter"), ("in place", " table")]  # per block size


def padded(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> Attend:
    """model.py's decode path: rows [B, Hkv, capacity, D] read as views up to the longest row,
    an additive mask over the padding, two batched products."""
    batch, length = len(keys), max(k.shape[1] for k in keys)
    cache_k = torch.zeros(batch, KV_HEADS, length + 64, DIM, dtype=q.dtype)
    cache_v = torch.zeros_like(cache_k)
    for row, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache_k[row, :, : k.shape[1]], cache_v[row, :, : v.shape[1]] = k, v
    lengths = torch.tensor([k.shape[1] for k in keys])
    hidden = torch.arange(length)[None] >= lengths[:, None]
    mask = torch.zeros(batch, length, dtype=q.dtype).masked_fill_(hidden, -math.inf)
    mask = mask[:, None, None].expand(batch, KV_HEADS, GROUP, length).reshape(-1, GROUP, length)

    def run() -> torch.Tensor:
        k = cache_k[:, :, :length].reshape(-1, length, DIM)
        v = cache_v[:, :, :length].reshape(-1, length, DIM)
        scores = torch.baddbmm(mask, q.reshape(-1, GROUP, DIM), k.transpose(1, 2), alpha=SCALE)
        return torch.bmm(torch.softmax(scores, dim=-1), v).view(batch, KV_HEADS, GROUP, DIM)

    return run


class Pool:
    """Each sequence's blocks scattered over pool[:used] in a random order (as decode grows them
    interleaved); block-major [P, Hkv, bs, D], so the used region is a batch of blocks as a view."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], size: int) -> None:
        counts = [math.ceil(k.shape[1] / size) for k in keys]
        self.size, self.used = size, sum(counts)
        self.table = list(torch.randperm(self.used).split(counts))  # per sequence: its block ids
        self.k = torch.zeros(self.used + 16, KV_HEADS, size, DIM, dtype=keys[0].dtype)
        self.v = torch.zeros_like(self.k)
        self.owner = torch.empty(self.used, dtype=torch.long)
        self.fill = torch.empty(self.used, dtype=torch.long)
        for seq, (k, v, ids) in enumerate(zip(keys, values, self.table, strict=True)):
            for j, block in enumerate(ids.tolist()):
                part = slice(j * size, (j + 1) * size)
                n = k[:, part].shape[1]
                self.k[block, :, :n], self.v[block, :, :n] = k[:, part], v[:, part]
                self.owner[block], self.fill[block] = seq, n


def gathered(q: torch.Tensor, pool: Pool) -> Attend:
    """index_select of each sequence's blocks into rows, then today's two products. The pool is
    head-major here ([Hkv, P, bs, D]) so the gather is the only copy; rows stay [Hkv, B, L, D]."""
    batch, blocks = q.shape[0], max(len(ids) for ids in pool.table)
    table = torch.stack([torch.cat([ids, ids.new_zeros(blocks - len(ids))]) for ids in pool.table]).flatten()
    per_head = pool.k.shape[0]  # index_select along dim 0 (its fast path): head h's block i is h P + i
    table = (torch.arange(KV_HEADS)[:, None] * per_head + table).flatten()
    pool_k, pool_v = (p.transpose(0, 1).reshape(-1, pool.size, DIM) for p in (pool.k, pool.v))
    length = blocks * pool.size
    lengths = torch.stack([pool.fill[ids].sum() for ids in pool.table])
    hidden = torch.arange(length)[None] >= lengths[:, None]
    mask = torch.zeros(batch, length, dtype=q.dtype).masked_fill_(hidden, -math.inf)
    mask = mask[None, :, None].expand(KV_HEADS, batch, GROUP, length).reshape(-1, GROUP, length)

    # Reused buffers, as an engine would keep one a step: fresh ones cost page faults each call
    # (1.5-10x slower, erratic, in a first run), not the copy this measures.
    buffer_k, buffer_v = pool_k.new_empty(len(table), pool.size, DIM), pool_v.new_empty(len(table), pool.size, DIM)

    def run() -> torch.Tensor:
        k = torch.index_select(pool_k, 0, table, out=buffer_k).view(-1, length, DIM)  # [Hkv B, L, D]
        v = torch.index_select(pool_v, 0, table, out=buffer_v).view(-1, length, DIM)
        grouped = q.transpose(0, 1).reshape(-1, GROUP, DIM)
        scores = torch.baddbmm(mask, grouped, k.transpose(1, 2), alpha=SCALE)
        out = torch.bmm(torch.softmax(scores, dim=-1), v)
        return out.view(KV_HEADS, batch, GROUP, DIM).transpose(0, 1)

    return run


def in_place(q: torch.Tensor, pool: Pool, combine: str) -> Attend:
    """Flash-decoding over pool[:used] as [N Hkv, bs, D] (a view): each block's scores, max, sum
    and unnormalized output, then one softmax per sequence across its blocks."""
    batch, used, size = q.shape[0], pool.used, pool.size
    hidden = torch.arange(size)[None] >= pool.fill[:, None]  # only a sequence's last block
    mask = torch.zeros(used, size, dtype=q.dtype).masked_fill_(hidden, -math.inf)
    mask = mask[:, None].expand(used, KV_HEADS, size).reshape(-1, 1, size)
    merge = _scatter(pool.owner, batch) if combine == "scatter" else _table(pool.table)

    def run() -> torch.Tensor:
        k, v = pool.k[:used].view(-1, size, DIM), pool.v[:used].view(-1, size, DIM)
        grouped = q.index_select(0, pool.owner).view(-1, GROUP, DIM)  # each block's queries
        scores = torch.baddbmm(mask, grouped, k.transpose(1, 2), alpha=SCALE)  # [N Hkv, G, bs]
        top = scores.amax(-1, keepdim=True)
        weights = scores.sub_(top).exp_()
        partial = torch.bmm(weights, v).view(used, KV_HEADS, GROUP, DIM)
        return merge(top.view(used, KV_HEADS, GROUP), weights.sum(-1).view(used, KV_HEADS, GROUP), partial)

    return run


Merge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _scatter(owner: torch.Tensor, batch: int) -> Merge:
    """Partials combined in pool order: amax by scatter_reduce, sums by index_add."""
    spread = owner[:, None, None].expand(-1, KV_HEADS, GROUP)

    def merge(top: torch.Tensor, total: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        best = top.new_full((batch, KV_HEADS, GROUP), -math.inf).scatter_reduce_(0, spread, top, "amax")
        scale = (top - best.index_select(0, owner)).exp_()
        norm = top.new_zeros(best.shape).index_add_(0, owner, total * scale)
        out = partial.new_zeros(batch, KV_HEADS, GROUP, DIM).index_add_(0, owner, partial * scale[..., None])
        return out / norm[..., None]

    return merge


def _table(ids: list[torch.Tensor]) -> Merge:
    """Partials gathered into [B, max blocks] (small: G x D a block), padding weighted zero."""
    blocks = max(len(i) for i in ids)
    table = torch.stack([torch.cat([i, i.new_zeros(blocks - len(i))]) for i in ids])
    pad = torch.stack([torch.arange(blocks) >= len(i) for i in ids])[..., None, None]

    def merge(top: torch.Tensor, total: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        tops = top[table].masked_fill_(pad, -math.inf)  # [B, blocks, Hkv, G]
        scale = (tops - tops.amax(1, keepdim=True)).exp_()
        norm = (total[table] * scale).sum(1)
        return (partial[table] * scale[..., None]).sum(1) / norm[..., None]

    return merge


def per_sequence(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> Attend:
    """A Python loop, one sequence at a time, over its blocks when they are contiguous in a
    head-major pool [Hkv, tokens, D]: views, no mask, no padding, three calls a sequence."""
    starts = [0, *torch.tensor([k.shape[1] for k in keys]).cumsum(0).tolist()]
    flat_k, flat_v = torch.cat(keys, 1), torch.cat(values, 1)

    def run() -> torch.Tensor:
        scaled = q * SCALE
        outs = []
        for row, (start, end) in enumerate(itertools.pairwise(starts)):
            scores = torch.bmm(scaled[row], flat_k[:, start:end].transpose(1, 2))
            outs.append(torch.bmm(torch.softmax(scores, dim=-1), flat_v[:, start:end]))
        return torch.stack(outs)

    return run


def lengths_for(kind: str, batch: int) -> list[int]:
    if kind == "160":
        return torch.randint(150, 171, (batch,)).tolist()
    return (600 + torch.randperm(301)[:batch]).tolist()  # distinct, 600-900


def row(dtype: torch.dtype, kind: str, batch: int, sizes: list[int], repeats: int) -> list[str]:
    lengths = lengths_for(kind, batch)
    keys = [torch.randn(KV_HEADS, n, DIM).to(dtype) for n in lengths]
    values = [torch.randn(KV_HEADS, n, DIM).to(dtype) for n in lengths]
    q = torch.randn(batch, KV_HEADS, GROUP, DIM).to(dtype)
    variants = {"padded": padded(q, keys, values), "loop": per_sequence(q, keys, values)}
    for size in sizes:
        pool = Pool(keys, values, size)
        variants[f"gather {size}"] = gathered(q, pool)
        variants[f"in place {size} scatter"] = in_place(q, pool, "scatter")
        variants[f"in place {size} table"] = in_place(q, pool, "table")
    assert len(variants) == 2 + len(VARIANTS) * len(sizes)
    expected, tol = variants["padded"]().float(), 1e-4 if dtype == torch.float32 else 2e-2
    for name, attend in variants.items():
        assert torch.allclose(attend().float(), expected, atol=tol, rtol=tol), name
    return [f"{1000 * median_ms(attend, repeats):.0f}" for attend in variants.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = ["padded", "loop", *(f"{v} {s}{w}" for s in args.blocks for v, w in VARIANTS)]
    print(f"us per layer per step; x{LAYERS} layers for a step. {cpu_description()}\n")
    print(f"| dtype | cached | batch | {' | '.join(names)} |\n|{'---|' * (3 + len(names))}")
    with torch.inference_mode():
        for dtype in args.dtypes:
            for kind in ("160", "600-900"):
                for batch in args.batches:
                    cells = row(getattr(torch, dtype), kind, batch, args.blocks, args.repeats)
                    print(f"| {dtype} | {kind} | {batch} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
