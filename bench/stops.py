"""What stop strings cost: 32 concurrent generations of 200 new tokens after distinct prompts of
~600-700 tokens, with four stop strings that never match, against the same without stop strings.
Runs the engine in-process (the real loader, no HTTP), the two settings taking turns each round.
Besides tokens/s it reports the engine thread's own time after each forward pass (picking tokens,
detokenizing, stop strings, who finished) per generated token: the cost stop strings add, measured
where it is paid, so a busy or slow machine's noise in tokens/s does not hide it.

It first times the text work alone (`TextStream.add` over 200 tokens of the model's own text, best
of 20), the part of the cost that stop strings can change, with no forward pass to hide in.

Run: python bench/stops.py [--model models/smollm2-135m-instruct] [--rounds 2] [--json bench/results/stops.json]
Copied into another checkout's bench/, it measures that checkout's engine the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prefix import WORDS
from roofline import cpu_description

import engine

NEVER = ("<<never-1>>", "<<never-2>>", "@@@@", "\n\n\n\n\n\n")  # four stops the model does not write


def prompts(count: int) -> list[str]:
    """Distinct prompts of ~600-700 tokens (SmolLM2's tokenizer): numbered lines of varied text."""
    out = []
    for n in range(count):
        lines = [f"{n}.{i}: the {WORDS[(n + i) % 10]} and the {WORDS[(n * 7 + i) % 10]} at {i}." for i in range(42)]
        out.append("\n".join(lines) + "\nContinue the log:")
    return out


POSTPROCESS = [0.0]  # seconds the engine thread spent in Engine._postprocess (every engine has one)


def timed(step: Callable[..., None]) -> Callable[..., None]:
    def wrapper(*args: object) -> None:
        start = time.perf_counter()
        step(*args)
        POSTPROCESS[0] += time.perf_counter() - start

    return wrapper


def text_work_us(tokenizer: object, stops: tuple[str, ...]) -> float:
    """Microseconds per token of `TextStream.add`, best of 20 passes over the same 200 tokens."""
    ids = tokenizer.encode("The harbour keeper walked the quay at dusk, counting boats. " * 20)[:200]  # type: ignore[attr-defined]
    best = math.inf
    for _ in range(20):
        text = engine.TextStream(tokenizer, ids[:4], stops)
        start = time.perf_counter()
        for token in ids:
            text.add(token)
        best = min(best, (time.perf_counter() - start) / len(ids))
    return best * 1e6


def run(eng: engine.Engine, texts: list[str], stops: tuple[str, ...], tokens: int) -> tuple[float, float]:
    """All prompts at once, one thread each; tokens/s over the whole batch, and the engine
    thread's microseconds after the forward passes per generated token."""
    params = engine.SamplingParams(max_new_tokens=tokens, ignore_eos=True, stop=stops)
    made, POSTPROCESS[0] = [0] * len(texts), 0.0

    def one(i: int) -> None:
        made[i] = eng.generate(texts[i], params).tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(made) / (time.perf_counter() - start), POSTPROCESS[0] * 1e6 / sum(made)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.use_threads(0)
    engine.Engine._postprocess = timed(engine.Engine._postprocess)  # type: ignore[method-assign]
    # No prefix cache: each round sends the same prompts again, and the later setting would find them cached.
    eng = engine.create_engine(engine.ModelConfig(name=args.model, max_batch=args.clients, prefix_cache_tokens=0))
    text_us = {
        name: round(text_work_us(eng.loaded.tokenizer, stops), 1) for name, stops in (("none", ()), ("four", NEVER))
    }
    print(f"text work alone, us/token: {text_us}")
    texts = prompts(args.clients)
    lengths = [len(eng.loaded.tokenizer.encode(t)) for t in texts]
    run(eng, texts, (), 2)  # warm-up: first kernels, and the cache grown to these prompts once
    figures: dict[str, list[tuple[float, float]]] = {"none": [], "four": []}
    for n in range(args.rounds):  # ABBA: neither setting always runs first
        for name in ("none", "four") if n % 2 == 0 else ("four", "none"):
            figures[name].append(run(eng, texts, NEVER if name == "four" else (), args.tokens))
    eng.close()
    best = {name: max(tps for tps, _ in values) for name, values in figures.items()}
    after_us = {name: min(us for _, us in values) for name, values in figures.items()}
    ratio = best["four"] / best["none"]
    print(f"{args.model}; prompts {min(lengths)}-{max(lengths)} tokens; {args.clients} clients; {cpu_description()}")
    print(f"(tok/s, engine-thread us after the pass per token): without stops {figures['none']}, with four stops "
          f"{figures['four']}; tok/s best-of ratio {ratio:.3f}; after-pass us/token {after_us}")  # fmt: skip
    if args.json:
        record = {"model": args.model, "cpu": cpu_description(), "prompt_tokens": [min(lengths), max(lengths)],
                  "clients": args.clients, "tokens": args.tokens, "tok_s_and_after_pass_us_per_token": figures,
                  "ratio": round(ratio, 3), "after_pass_us_per_token": after_us,
                  "text_work_us_per_token": text_us}  # fmt: skip
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
