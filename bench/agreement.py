"""How often greedy tokens agree alone and inside a batch, per dtype.

In float32 they agree exactly (a test holds that). In bfloat16 a batch changes the rounding of
each matrix product, so near-ties can flip a token, and everything after it differs. This counts,
for each prompt, the characters of the continuation before the first difference.

Run: python bench/agreement.py --model models/smollm2-135m-instruct --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time", "import os\nimport sys\n",
    "1, 2, 3, 4,", "Dear Sir or Madam,", "The quick brown fox", "SELECT * FROM",
]  # fmt: skip


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    config = engine.ModelConfig(name=args.model, dtype=args.dtype, max_batch=len(PROMPTS), prefix_cache_tokens=0)
    eng = engine.create_engine(config)  # no prefix cache: each prompt is prefilled the same way alone and batched
    params = engine.SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    alone = [eng.generate(p, params).text for p in PROMPTS]
    batched = [""] * len(PROMPTS)

    def run(i: int) -> None:
        batched[i] = eng.generate(PROMPTS[i], params).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    eng.close()
    agree = [common_prefix(a, b) for a, b in zip(alone, batched, strict=True)]
    identical = sum(a == b for a, b in zip(alone, batched, strict=True))
    summary = {"model": Path(args.model).name, "dtype": args.dtype, "tokens": args.tokens,
               "identical": f"{identical}/{len(PROMPTS)}", "chars_before_first_difference": agree,
               "chars": [len(a) for a in alone]}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
