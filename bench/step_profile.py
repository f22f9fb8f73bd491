"""Where a long-context step goes: one decode step of `--batch` sequences of `--cached` tokens
each (their blocks interleaved, as sequences growing together get them), one of a single
sequence, a PREFILL_CHUNK-token prefill chunk at position `--chunk-at` and at 0 (and passes of
`--chunk-sizes` tokens), then the torch profiler's top operations over three decode steps and
three chunks. Engine in-process, the real loader.

Run: python bench/step_profile.py [--model models/smollm2-135m-instruct] [--batch 32] [--cached 800]
     [--chunk-sizes 32 64 128 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from roofline import cpu_description, median_ms
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine
import model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cached", type=int, default=800)
    parser.add_argument("--chunk-at", type=int, default=640)
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[], help="also time passes of these sizes")
    args = parser.parse_args()
    engine.use_threads(0)
    # the server's MAX_BATCH_SIZE unless the batch is larger: `auto` picks the dtype for it
    config = engine.ModelConfig(name=args.model, max_batch=max(args.batch, 32), prefix_cache_tokens=0)
    loaded = model.load_model(config, engine.PREFILL_CHUNK)
    network, batch, blocks = loaded.model, args.batch, model.blocks_for(args.cached + 1)
    tables = [[b * batch + seq for b in range(blocks)] for seq in range(batch)]
    # one prompt's blocks after the batch's, room for its longest pass at --chunk-at
    longest = max([engine.PREFILL_CHUNK, *args.chunk_sizes])
    prompt = list(range(batch * blocks, batch * blocks + model.blocks_for(args.chunk_at + longest)))
    print(f"{args.model}, activations {loaded.dtype}, weights {loaded.weights}; {cpu_description()}")
    with torch.inference_mode():  # the pool is made in inference mode (`Model.trace`)
        network.pool.zero(tuple(range(batch * blocks)) + tuple(prompt))
        decode = model.Work(tables, [[1]] * batch, [args.cached] * batch)
        alone = model.Work([list(range(blocks))], [[1]], [args.cached])
        chunk = model.Work([prompt], [[5] * engine.PREFILL_CHUNK], [args.chunk_at])
        first = model.Work([prompt], [[5] * engine.PREFILL_CHUNK], [0])
        print(f"decode, batch {batch} at {args.cached}: {median_ms(lambda: network.run(decode), 10):.1f} ms")
        print(f"decode, one sequence at {args.cached}: {median_ms(lambda: network.run(alone), 10):.1f} ms")
        print(f"prefill chunk at {args.chunk_at}: {median_ms(lambda: network.run(chunk), 10):.1f} ms")
        print(f"prefill chunk at 0: {median_ms(lambda: network.run(first), 10):.1f} ms")
        for at in (0, args.chunk_at):
            for size in args.chunk_sizes:
                ms = median_ms(lambda: network.run(model.Work([prompt], [[5] * size], [at])), 6)  # noqa: B023
                print(f"prefill pass of {size} at {at}: {ms:.1f} ms, {size / ms * 1000:.0f} tok/s")
        for name, work in (("decode steps", decode), ("prefill chunks", chunk)):
            with profile() as run:
                for _ in range(3):
                    network.run(work)
            print(f"\n{name} (3):\n" + run.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
