"""What stop strings cost: 32 concurrent generations of 200 new tokens after distinct prompts of
~600-700 tokens, with four stop strings that never match, against the same without stop strings.
Runs the engine in-process (the real loader, no HTTP), the two settings taking turns each round.

Run: python bench/stops.py [--model models/smollm2-135m-instruct] [--rounds 2] [--json bench/results/stops.json]
Copied into another checkout's bench/, it measures that checkout's engine the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from roofline import cpu_description

import engine

NEVER = ("<<never-1>>", "<<never-2>>", "@@@@", "\n\n\n\n\n\n")  # four stops the model does not write


def prompts(count: int) -> list[str]:
    """Distinct prompts of ~600-700 tokens (SmolLM2's tokenizer): numbered lines of varied text."""
    words = ["harbour", "lantern", "signal", "tide", "keeper", "rope", "island", "storm", "letter", "bottle"]
    out = []
    for n in range(count):
        lines = [f"{n}.{i}: the {words[(n + i) % 10]} and the {words[(n * 7 + i) % 10]} at {i}." for i in range(42)]
        out.append("\n".join(lines) + "\nContinue the log:")
    return out


def run(eng: engine.Engine, texts: list[str], stops: tuple[str, ...], tokens: int) -> float:
    """All prompts at once, one thread each; tokens/s over the whole batch."""
    params = engine.SamplingParams(max_new_tokens=tokens, ignore_eos=True, stop=stops)
    made = [0] * len(texts)

    def one(i: int) -> None:
        made[i] = eng.generate(texts[i], params).tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(made) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.use_threads(0)
    eng = engine.create_engine(engine.ModelConfig(name=args.model, max_batch=args.clients))
    texts = prompts(args.clients)
    lengths = [len(eng.loaded.tokenizer.encode(t)) for t in texts]
    run(eng, texts[:2], (), 8)  # warm-up: first kernels
    figures: dict[str, list[float]] = {"none": [], "four": []}
    for _ in range(args.rounds):
        figures["none"].append(run(eng, texts, (), args.tokens))
        figures["four"].append(run(eng, texts, NEVER, args.tokens))
    eng.close()
    best = {name: max(values) for name, values in figures.items()}
    ratio = best["four"] / best["none"]
    print(f"{args.model}; prompts {min(lengths)}-{max(lengths)} tokens; {args.clients} clients; {cpu_description()}")
    print(f"tok/s without stops {figures['none']}, with four stops {figures['four']}; best-of ratio {ratio:.3f}")
    if args.json:
        record = {"model": args.model, "cpu": cpu_description(), "prompt_tokens": [min(lengths), max(lengths)],
                  "clients": args.clients, "tokens": args.tokens, "tok_s": figures,
                  "ratio": round(ratio, 3)}  # fmt: skip
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
