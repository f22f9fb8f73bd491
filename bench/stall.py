"""Does a long prompt stall the batch? 31 requests generate; a 900-token prompt arrives; the gaps
between the engine's decode steps (each gives every running request one token) are compared
with their median while it joins. Timestamps come from the engine's own step observer.

Run: python bench/stall.py --model models/smollm2-135m-instruct [--chunk 100000 to see no chunking]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from roofline import cpu_description

import engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--running", type=int, default=31)
    parser.add_argument("--long", type=int, default=900, help="tokens in the late prompt")
    parser.add_argument("--chunk", type=int, default=engine.PREFILL_CHUNK)
    parser.add_argument("--show-steps", action="store_true", help="print each step (kind, ms after the join, rows)")
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.PREFILL_CHUNK = args.chunk
    engine.use_threads(0)
    steps: list[tuple[str, float, int]] = []
    config = engine.ModelConfig(name=args.model, dtype=args.dtype, max_batch=args.running + 1)
    eng = engine.create_engine(config, observe=lambda kind, seconds, size: steps.append((kind, time.monotonic(), size)))
    short = engine.SamplingParams(max_new_tokens=200, ignore_eos=True)
    threads = [threading.Thread(target=eng.generate, args=(f"Story {i}: once", short)) for i in range(args.running)]
    for t in threads:
        t.start()
    while sum(kind != "prefill" and size == args.running for kind, _, size in steps) < 15:
        time.sleep(0.05)
    joined = time.monotonic()
    prompt = " ".join(["word"] * (args.long - 1))  # one token per word in these tokenizers, roughly
    late = threading.Thread(target=eng.generate, args=(prompt, engine.SamplingParams(max_new_tokens=8)))
    late.start()
    late.join()
    for t in threads:
        t.join()
    eng.close()
    report(args, steps, joined)


def report(args: argparse.Namespace, steps: list[tuple[str, float, int]], joined: float) -> None:
    # the passes that give the running requests a token: decode steps, or mixed with a prompt's chunk
    decodes = [t for kind, t, size in steps if kind != "prefill" and size >= args.running]
    gaps = [b - a for a, b in itertools.pairwise(decodes)]
    before = [g for g, t in zip(gaps, decodes[1:], strict=False) if t < joined]
    around = [g for g, t in zip(gaps, decodes[1:], strict=False) if joined <= t]
    median = statistics.median(before)
    worst = max(around[:60])  # the steps while the long prompt joins and just after
    result = {"model": args.model, "cpu": cpu_description(), "chunk": args.chunk, "long_prompt": args.long,
              "median_gap_ms": round(median * 1000, 1), "max_gap_ms": round(worst * 1000, 1),
              "ratio": round(worst / median, 2)}  # fmt: skip
    print(json.dumps(result))
    if args.show_steps:  # where the longest gaps come from: which step ended when
        print([(kind, round((t - joined) * 1000), size) for kind, t, size in steps if t >= joined - 0.5][:60])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
