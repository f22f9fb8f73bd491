"""One layer's decode attention, the engine's own (`Model._attend_decode`: the blocks read in place
by `F.embedding_bag`) against the two ways it replaced, which first copy each sequence's blocks
into rows (one index_select a layer, as the engine did): torch's fused attention over the rows,
and two batched products around a float32 softmax. The real model's pool (SmolLM2 by default,
loaded as the server loads it), its blocks interleaved as sequences growing together get them;
each way timed in turns at each (rows, cached) pair, the engine's way with its new key's write.

Run: python bench/bag_attention.py [--rows 1 8 32] [--cached 160 704] [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from roofline import cpu_description, load_apart, median_ms, step_work

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine
import model


def ways(network: model.Model, work: model.Work) -> dict[str, Callable[[], object]]:
    """Layer 0's decode attention for this step, each way, as calls to time."""
    a, pool, rows = network.arch, network.pool, len(work.tables)
    _, decode = network._prepare_decode(work)
    q = torch.randn(rows, a.heads, 1, a.head_dim, dtype=network.dtype)
    k, v = (torch.randn(rows, a.kv_heads, 1, a.head_dim, dtype=network.dtype) for _ in range(2))
    # the layer's keys as the replaced ways kept them, [P Hkv, KV_BLOCK, D], made once outside the timing
    keys = pool.k[0].transpose(2, 3).reshape(-1, model.KV_BLOCK, a.head_dim)
    values = pool.v[0].view(-1, model.KV_BLOCK, a.head_dim)
    longest = max(len(table) for table in work.tables)  # a shorter row repeats its first block, masked
    index = torch.tensor([block * a.kv_heads + head for table in work.tables for head in range(a.kv_heads)
                          for block in table + table[:1] * (longest - len(table))])  # fmt: skip
    mask = network._bag_mask(torch.tensor(work.starts)[:, None], longest, None)  # [B, 1, L] float32
    group = a.heads // a.kv_heads
    grouped = q.view(rows, a.kv_heads, group, a.head_dim)

    def copied() -> tuple[torch.Tensor, torch.Tensor]:
        shape = (rows, a.kv_heads, -1, a.head_dim)
        return keys.index_select(0, index).view(shape), values.index_select(0, index).view(shape)

    def fused() -> object:
        rows_k, rows_v = copied()
        return F.scaled_dot_product_attention(grouped, rows_k, rows_v, mask[:, None].to(q.dtype), scale=a.scale)

    def products() -> object:
        rows_k, rows_v = copied()
        length = rows_k.shape[2]
        scores = torch.bmm(grouped.reshape(-1, group, a.head_dim), rows_k.view(-1, length, a.head_dim).transpose(1, 2))
        weights = torch.softmax(scores.view(rows, a.heads, length).float() * a.scale + mask, -1)
        return torch.bmm(weights.to(q.dtype).view(-1, group, length), rows_v.view(-1, length, a.head_dim))

    return {"in place (bags)": lambda: network._attend_decode(0, q, k, v, decode),
            "fused over copied rows": fused, "products over copied rows": products}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--cached", type=int, nargs="+", default=[160, 704])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.use_threads(0)
    config = engine.ModelConfig(name=args.model, dtype=args.dtype, max_batch=max(*args.rows, 32), prefix_cache_tokens=0)
    network = load_apart(config).model
    results = []
    with torch.inference_mode():
        for cached in args.cached:
            for rows in args.rows:
                timed = ways(network, step_work(network, rows, cached))
                times: dict[str, list[float]] = {name: [] for name in timed}
                for _ in range(args.rounds):
                    for name, run in timed.items():
                        times[name].append(median_ms(run, args.repeats) * 1000)
                results.append({"rows": rows, "cached": cached,
                                **{name: round(statistics.median(t), 1) for name, t in times.items()}})  # fmt: skip
    names = list(results[0])[2:]
    print(f"{args.model}, {args.dtype}, one layer's decode attention (us); {cpu_description()}\n")
    print("| rows | cached | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for r in results:
        print(f"| {r['rows']} | {r['cached']} | " + " | ".join(str(r[n]) for n in names) + " |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpu": cpu_description(), "settings": vars(args), "rows": results}, indent=1)
        )


if __name__ == "__main__":
    main()
