"""What the prefix cache buys. (1) Time to first token of the second of two prompts that share a
512-token prefix, against the first's (a fresh prefix each round, so the first always misses).
(2) 32 concurrent chat requests whose conversations share a ~300-token system prompt (each its
own question), tokens/s with the prefix cache on and off, the two taking turns (ABBA).
Runs the engine in-process (the real loader, no HTTP), as bench/stops.py does.

Run: python bench/prefix.py [--model models/smollm2-135m-instruct] [--rounds 2] [--json bench/results/prefix.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from roofline import cpu_description

import engine

WORDS = ["harbour", "lantern", "signal", "tide", "keeper", "rope", "island", "storm", "letter", "bottle"]


def text_of(tokens: int, salt: int, tokenizer: Any) -> str:
    """Varied text of at most this many tokens (by this tokenizer); `salt` makes it differ from the
    first word on."""
    words = [f"{WORDS[(salt + i * 7) % 10]}{(salt * 31 + i) % 97}" for i in range(tokens)]
    text = " ".join(words)
    while len(tokenizer.encode(text)) > tokens:
        text = text.rsplit(" ", 1)[0]
    return text


def first_token_seconds(eng: engine.Engine, prompt: str) -> tuple[float, int]:
    result = eng.generate(prompt, engine.SamplingParams(max_new_tokens=1))
    return result.first_token_at - result.admitted_at, result.cached_tokens


def shared_prefix(eng: engine.Engine, rounds: int) -> dict[str, object]:
    firsts, seconds = [], []
    for n in range(rounds):
        prefix = text_of(512, 1000 + n, eng.loaded.tokenizer)
        first, _ = first_token_seconds(eng, prefix + " And the first question is this.")
        second, cached = first_token_seconds(eng, prefix + " Then a second, other question.")
        assert cached >= 496, f"the second prompt should start with the cached prefix, got {cached} tokens"
        firsts.append(first)
        seconds.append(second)
    ratio = statistics.median(seconds) / statistics.median(firsts)
    return {"first_ms": [round(1000 * s, 1) for s in firsts], "second_ms": [round(1000 * s, 1) for s in seconds],
            "ratio_of_medians": round(ratio, 3)}  # fmt: skip


def chat_run(eng: engine.Engine, clients: int, tokens: int, salt: int) -> float:
    """tokens/s of `clients` chats at once, each a shared system prompt and its own question."""
    system = {"role": "system", "content": text_of(300, salt, eng.loaded.tokenizer)}
    prompts = [eng.chat_prompt([system, {"role": "user", "content": f"Question {i}: what of {WORDS[i % 10]}?"}])
               for i in range(clients)]  # fmt: skip
    params = engine.SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    made = [0] * clients

    def one(i: int) -> None:
        *_, result = eng.stream(prompts[i], params)
        assert isinstance(result, engine.Result)
        made[i] = result.tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
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
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per chat")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.use_threads(0)
    engines = {setting: engine.create_engine(engine.ModelConfig(name=args.model, max_batch=args.clients,
                                                                prefix_cache_tokens=tokens))
               for setting, tokens in (("on", 4096), ("off", 0))}  # fmt: skip
    first_token_seconds(engines["on"], text_of(64, 7, engines["on"].loaded.tokenizer))  # warm-up: first kernels
    ttft = shared_prefix(engines["on"], 1 + 2 * args.rounds)
    chat: dict[str, list[float]] = {"on": [], "off": []}
    chat_run(engines["off"], args.clients, 2, salt=0)  # warm-up: the cache grown to these prompts once
    for n in range(args.rounds):  # ABBA, a fresh system prompt each round
        for setting in ("on", "off") if n % 2 == 0 else ("off", "on"):
            chat[setting].append(round(chat_run(engines[setting], args.clients, args.tokens, salt=100 + n), 1))
    for eng in engines.values():
        eng.close()
    gain = max(chat["on"]) / max(chat["off"])
    print(f"{args.model}; {cpu_description()}")
    print(f"time to first token after a shared 512-token prefix: first {ttft['first_ms']} ms, second "
          f"{ttft['second_ms']} ms, ratio of medians {ttft['ratio_of_medians']}")  # fmt: skip
    print(f"{args.clients} chats sharing a ~300-token system prompt, {args.tokens} new tokens each: tok/s with the "
          f"prefix cache {chat['on']}, without {chat['off']}; best-of ratio {gain:.2f}")  # fmt: skip
    if args.json:
        record = {"model": args.model, "cpu": cpu_description(), "shared_prefix_ttft": ttft,
                  "chat_clients": args.clients, "chat_new_tokens": args.tokens, "chat_tok_s": chat,
                  "chat_gain": round(gain, 3)}  # fmt: skip
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
