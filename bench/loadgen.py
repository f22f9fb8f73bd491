"""Closed-loop load generator: N clients, each sending its next request when the last returns.

Targets any server by URL: this service or the baseline (`--api generate`), or llama.cpp's
`llama-server` (`--api llamacpp`). Loopback only. Reports tokens/s (all clients together),
request latency p50/p99, and the server's peak memory when given its pid. With `--stream` (this
service only) each request streams, and the time to its first token event is reported too.

With `--prompt-tokens LO HI` every request sends a prompt of its own, LO to HI tokens long by
`--tokenizer`'s count (differing from its first word on, so no two share a prefix).

Run: python bench/loadgen.py --url http://127.0.0.1:8000 --clients 1 8 32 [--stream] [--pid PID] [--json out.json]
     [--prompt-tokens 600 700 --tokenizer models/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Level:
    clients: int
    requests: int
    failed: int
    tokens: int
    seconds: float
    tokens_per_s: float
    p50_s: float
    p99_s: float
    peak_rss_mb: float | None
    ttft_p50_s: float | None = None  # --stream: from sending the request to its first token event
    ttft_p99_s: float | None = None


def request_for(api: str, max_new_tokens: int, prompt: str = PROMPT) -> tuple[str, dict[str, Any]]:
    if api == "llamacpp":
        return "/completion", {"prompt": prompt, "n_predict": max_new_tokens, "ignore_eos": True}
    return "/generate", {"prompt": prompt, "max_new_tokens": max_new_tokens, "ignore_eos": True}


def distinct_prompts(count: int, low: int, high: int, tokenizer_path: str) -> list[str]:
    """`count` prompts of low..high tokens each (by this tokenizer), no two alike from the first word."""
    from prefix import WORDS  # the benchmarks' one word list
    from transformers import AutoTokenizer

    tokenizer, rng, prompts = AutoTokenizer.from_pretrained(tokenizer_path), random.Random(0), []
    for salt in range(count):
        words = [f"{WORDS[(salt + i * 7) % len(WORDS)]}{(salt * 31 + i) % 97}" for i in range(2 * high)]
        target, fewest, most = rng.randint(low, high), 1, len(words)
        while fewest < most:  # the most words whose text stays within the target
            middle = (fewest + most + 1) // 2
            fewest, most = (
                (middle, most) if len(tokenizer.encode(" ".join(words[:middle]))) <= target else (fewest, middle - 1)
            )
        prompts.append(" ".join(words[:fewest]))
    return prompts


def tokens_of(api: str, body: dict[str, Any]) -> int:
    return int(body["tokens_predicted"] if api == "llamacpp" else body["generated_tokens"])


def p50_p99(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values) or [float("nan")]
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return round(statistics.median(ordered), 2), round(p99, 2)


async def post_streaming(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[int, int, float | None]:
    """One streaming request: (status, tokens, seconds to its first token event or None). A stream
    that ends with an `error` event counts as a failure (500)."""
    start, first, event = time.perf_counter(), None, ""
    async with http.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, 0, None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
                if event == "token" and first is None:
                    first = time.perf_counter() - start
            elif line.startswith("data:") and event in ("done", "error"):
                data = json.loads(line.removeprefix("data:"))
                return (200, int(data["generated_tokens"]), first) if event == "done" else (500, 0, first)
    return 500, 0, first  # the stream stopped without its last event


async def one_request(args: argparse.Namespace, http: httpx.AsyncClient) -> tuple[int, int, float | None]:
    """(status, tokens, seconds to the first token when streaming)."""
    path, body = request_for(args.api, args.max_new_tokens, next(args.prompts))
    if args.stream:
        return await post_streaming(http, path, body)
    response = await http.post(path, json=body)
    ok = response.status_code == 200
    return response.status_code, tokens_of(args.api, response.json()) if ok else 0, None


class MemoryWatch:
    """Samples the RSS of a process and its children every 100 ms; keeps the peak."""

    def __init__(self, pid: int | None):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = psutil.Process(self.pid)
        while not self._stop.wait(0.1):
            procs = [proc, *proc.children(recursive=True)]
            self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))

    def __enter__(self) -> MemoryWatch:
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


async def one_level(args: argparse.Namespace, clients: int) -> Level:
    latencies: list[float] = []
    first_tokens: list[float] = []
    tokens, failed = 0, 0
    deadline = time.perf_counter() + args.duration

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failed
        for _ in range(args.max_requests_per_client):
            start = time.perf_counter()
            status, count, first = await one_request(args, http)
            if status != 200:
                failed += 1
            else:
                latencies.append(time.perf_counter() - start)
                tokens += count
                if first is not None:
                    first_tokens.append(first)
            if time.perf_counter() > deadline:
                return

    headers = {"x-api-key": args.key}
    limits = httpx.Limits(max_connections=clients)
    with MemoryWatch(args.pid) as memory:
        async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=3600, limits=limits) as http:
            start = time.perf_counter()
            await asyncio.gather(*(client(http) for _ in range(clients)))
            seconds = time.perf_counter() - start
    peak = round(memory.peak / 2**20, 1) if args.pid else None
    ttft = p50_p99(first_tokens) if args.stream else (None, None)
    return Level(clients, len(latencies), failed, tokens, round(seconds, 2), round(tokens / seconds, 1),
                 *p50_p99(latencies), peak, *ttft)  # fmt: skip


async def run(args: argparse.Namespace) -> list[Level]:
    path, body = request_for(args.api, 4)
    async with httpx.AsyncClient(base_url=args.url, headers={"x-api-key": args.key}, timeout=600) as http:
        (await http.post(path, json=body)).raise_for_status()  # warm-up: loads the model
    levels = []
    for clients in args.clients:
        level = await one_level(args, clients)
        print(" | ".join(f"{k}={v}" for k, v in asdict(level).items()), flush=True)
        levels.append(level)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api", choices=["generate", "llamacpp"], default="generate")
    parser.add_argument("--key", default="gpp-llm-service-secret")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--duration", type=float, default=30, help="clients start no new request after this")
    parser.add_argument("--max-requests-per-client", type=int, default=1000)
    parser.add_argument("--pid", type=int, help="server process to watch for peak memory")
    parser.add_argument("--stream", action="store_true", help="stream each answer; report time to first token")
    parser.add_argument("--json", help="write the levels here")
    parser.add_argument(
        "--prompt-tokens", type=int, nargs=2, metavar=("LO", "HI"), help="a distinct prompt each request"
    )
    parser.add_argument("--tokenizer", default="models/smollm2-135m-instruct", help="counts --prompt-tokens")
    args = parser.parse_args()
    if args.prompt_tokens:
        low, high = args.prompt_tokens
        args.prompts = itertools.cycle(distinct_prompts(400, low, high, args.tokenizer))  # more than a run sends
    else:
        args.prompts = itertools.repeat(PROMPT)
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("load is only ever sent to loopback")
    if args.stream and args.api != "generate":
        parser.error("--stream speaks this service's server-sent events only")
    levels = asyncio.run(run(args))
    if args.json:
        with open(args.json, "w") as out:
            summary = {"url": args.url, "api": args.api, "stream": args.stream, "prompt_tokens": args.prompt_tokens,
                       "levels": [asdict(lv) for lv in levels]}  # fmt: skip
            json.dump(summary, out, indent=1)


if __name__ == "__main__":
    main()
