"""What sharing a forward pass saves: short prompts prefilled in one pass against one pass each,
and a decode step's rows carried in a prompt chunk's pass against the two passes apart. The
engine's own `Model.run` on the real loader's weights, in-process (the engine's thread setup).

Run: python bench/passes.py [--model models/smollm2-135m-instruct] [--cached 160]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from roofline import cpu_description, median_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine
import model


def packed(network: model.Model, prompts: int, tokens: int) -> tuple[float, float]:
    """ms for `prompts` prompts of `tokens` each in one pass, and one pass each."""
    tables = [[block] for block in range(prompts)]
    together = model.Work(tables, [[5] * tokens] * prompts, [0] * prompts)
    apart = [model.Work([table], [[5] * tokens], [0]) for table in tables]
    return median_ms(lambda: network.run(together), 8), median_ms(lambda: [network.run(w) for w in apart], 4)


def mixed(network: model.Model, rows: int, cached: int, chunk: int, at: int) -> tuple[float, float, float]:
    """ms for a decode step of `rows` sequences of `cached` tokens, a `chunk`-token prompt chunk
    at position `at`, and both in one pass."""
    per = model.blocks_for(cached + 1)
    tables = [[b * rows + s for b in range(per)] for s in range(rows)]
    prompt = list(range(rows * per, rows * per + model.blocks_for(at + chunk)))
    decode = model.Work(tables, [[1]] * rows, [cached] * rows)
    alone = model.Work([prompt], [[5] * chunk], [at])
    both = model.Work([prompt, *tables], [[5] * chunk] + [[1]] * rows, [at] + [cached] * rows)
    decode_ms = median_ms(lambda: network.run(decode), 8)
    chunk_ms = median_ms(lambda: network.run(alone), 8)
    return decode_ms, chunk_ms, median_ms(lambda: network.run(both), 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--cached", type=int, default=160, help="tokens each decode row holds")
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.use_threads(0)
    config = engine.ModelConfig(name=args.model, max_batch=32, prefix_cache_tokens=0)
    loaded = model.load_model(config, engine.PREFILL_CHUNK)
    network = loaded.model
    with torch.inference_mode():  # the pool is made in inference mode (`Model.trace`)
        network.pool.zero(tuple(range(min(network.pool.blocks, 32 * model.blocks_for(args.cached + 1) + 16))))
    print(f"{args.model}, activations {loaded.dtype}, weights {loaded.weights}; {cpu_description()}")
    packs: list[dict[str, float]] = []
    mixes: list[dict[str, float]] = []
    with torch.inference_mode():
        for prompts, tokens in ((4, 16), (8, 12), (16, 16), (16, 6)):
            together, apart = packed(network, prompts, tokens)
            packs.append({"prompts": prompts, "tokens": tokens, "one_pass_ms": together, "apart_ms": apart})
            print(f"{prompts} prompts of {tokens}: one pass {together:.1f} ms, a pass each {apart:.1f} ms")
        for rows in (8, 32):
            for chunk, at in ((16, 0), (256, 0), (256, 512)):
                decode, alone, both = mixed(network, rows, args.cached, chunk, at)
                mixes.append({"rows": rows, "cached": args.cached, "chunk": chunk, "at": at,
                              "decode_ms": decode, "chunk_ms": alone, "one_pass_ms": both})  # fmt: skip
                print(f"{rows} rows at {args.cached} and a {chunk}-token chunk at {at}: apart {decode:.1f} + "
                      f"{alone:.1f} = {decode + alone:.1f} ms, in one pass {both:.1f} ms")  # fmt: skip
    network.clear()
    if args.json:
        result = {"model": args.model, "cpu": cpu_description(), "packed": packs, "mixed": mixes}
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
