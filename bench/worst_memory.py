"""Peak memory of the server under the worst case its settings allow: MAX_BATCH_SIZE (32)
concurrent requests, each a distinct prompt that fills the context with its max_new_tokens (200):
every cache row full, plus a queue of more waiting. The server runs as `make run` starts it
(lazily, default settings); its peak resident memory (VmHWM) is read from /proc when the load
ends, against compose's 3 GB limit and the worst case the engine's load check computed.

Run: python bench/worst_memory.py [--models models/smollm2-135m-instruct models/random-distilgpt2]
         [--json bench/results/worst-memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

import httpx
from prefix import text_of
from run_bench import KEY, free_port, start

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from roofline import cpu_description

COMPOSE_LIMIT_MIB = 3072


def peak_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


async def load(url: str, prompts: list[str], new_tokens: int) -> Counter[int]:
    headers = {"x-api-key": KEY}
    async with httpx.AsyncClient(timeout=1200, limits=httpx.Limits(max_connections=len(prompts))) as client:

        async def one(text: str) -> int:
            body = {"prompt": text, "max_new_tokens": new_tokens, "ignore_eos": True}
            return (await client.post(url + "/generate", json=body, headers=headers)).status_code

        return Counter(await asyncio.gather(*(one(text) for text in prompts)))


def measure(model: str, clients: int, queued: int, context: int, new_tokens: int) -> dict[str, object]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [text_of(context - new_tokens, n, tokenizer) for n in range(clients + queued)]  # distinct prompts
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    port = free_port()
    log = Path("/tmp") / f"worst-memory-{port}.log"
    # Nobody times out: every row stays full to its last token, and the queue waits its turn.
    proc = start("ours", model, port, log, extra={"REQUEST_TIMEOUT": "3600", "QUEUE_TIMEOUT": "3600"})
    url = f"http://127.0.0.1:{port}"
    try:
        statuses = asyncio.run(load(url, prompts, new_tokens))
        peak = peak_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    check = next((line for line in log.read_text().splitlines() if "loaded in" in line), "")
    return {"model": Path(model).name, "prompt_tokens": [min(lengths), max(lengths)], "new_tokens": new_tokens,
            "requests": clients + queued, "statuses": dict(statuses), "peak_mib": round(peak),
            "compose_limit_mib": COMPOSE_LIMIT_MIB, "under_limit": peak < COMPOSE_LIMIT_MIB,
            "load_log": check[-300:]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["models/smollm2-135m-instruct", "models/random-distilgpt2"])
    parser.add_argument("--clients", type=int, default=32, help="MAX_BATCH_SIZE (the default)")
    parser.add_argument("--queued", type=int, default=8, help="requests waiting beyond the batch")
    parser.add_argument("--context", type=int, default=1024, help="MAX_CONTEXT_TOKENS (the default)")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    runs = [measure(m, args.clients, args.queued, args.context, args.new_tokens) for m in args.models]
    record = {"cpu": cpu_description(), "runs": runs}
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
