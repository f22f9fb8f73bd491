"""Soak: twice the server's capacity of closed-loop clients for a fixed time, on loopback.

Starts `python server.py` itself (so it can watch its memory) with the model loaded at start,
waits until it is ready, then runs 2 x (MAX_BATCH_SIZE + MAX_QUEUE) clients with mixed request
sizes: first for --warmup seconds, which visit every batch size and prompt length the run uses
(each new shape costs the matrix libraries a cached kernel), then for --duration seconds measured.
Passes when every request is answered with 200 or 503, none hangs, and the memory of the measured
run's second half exceeds that of its first half by less than 5%: warm-up flattens out, a leak
keeps growing in both halves.

Run: python bench/soak.py --duration 600 --json bench/results/soak.json   (CI runs a short one)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import KEY, free_port, start


def client(url: str, seed: int, until: float, statuses: Counter[int], lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=60) as http:
        while time.monotonic() < until:
            body = {"prompt": "soak " * rng.randint(1, 50), "max_new_tokens": rng.randint(4, 64)}
            try:
                status = http.post("/generate", json=body).status_code
            except httpx.HTTPError:
                status = -1  # a transport error or a hang past the timeout
            with lock:
                statuses[status] += 1
            if status == 503:
                time.sleep(rng.uniform(0.05, 0.3))  # back off a little, as a client honouring Retry-After


def watch_memory(pid: int, samples: list[tuple[float, float]], until: float) -> None:
    proc, start = psutil.Process(pid), time.monotonic()
    while time.monotonic() < until:
        samples.append((time.monotonic() - start, proc.memory_info().rss / 2**20))
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/random-distilgpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--warmup", type=float, default=60)
    parser.add_argument("--json")
    args = parser.parse_args()
    port, clients = free_port(), 2 * (args.batch + args.queue)
    env = {"MAX_BATCH_SIZE": str(args.batch), "MAX_QUEUE": str(args.queue), "LOAD_ON_START": "1"}
    proc = start("ours", args.model, port, Path("/tmp") / f"soak-{port}.log", env)
    url = f"http://127.0.0.1:{port}"
    statuses: Counter[int] = Counter()
    samples: list[tuple[float, float]] = []
    try:
        wait_until_ready(url)
        load(url, clients, time.monotonic() + args.warmup, Counter(), None)
        load(url, clients, time.monotonic() + args.duration, statuses, (proc.pid, samples))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    report(args, clients, statuses, samples)


def wait_until_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/ready", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not get ready")
        time.sleep(0.5)


Samples = list[tuple[float, float]]  # (seconds since the measured run began, RSS in MiB)


def load(url: str, clients: int, until: float, statuses: Counter[int], watch: tuple[int, Samples] | None) -> None:
    lock = threading.Lock()
    threads = [threading.Thread(target=client, args=(url, i, until, statuses, lock)) for i in range(clients)]
    if watch is not None:
        threads.append(threading.Thread(target=watch_memory, args=(*watch, until)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def report(args: argparse.Namespace, clients: int, statuses: Counter[int], samples: list[tuple[float, float]]) -> None:
    half = args.duration / 2
    first, second = [mb for t, mb in samples if t < half], [mb for t, mb in samples if t >= half]
    growth = (max(second) - max(first)) / max(first) * 100
    ok = set(statuses) <= {200, 503} and statuses[200] > 0 and growth < 5
    result = {"clients": clients, "duration_s": args.duration, "warmup_s": args.warmup,
              "statuses": dict(statuses), "rss_first_half_max_mb": round(max(first), 1),
              "rss_second_half_max_mb": round(max(second), 1), "growth_percent": round(growth, 2),
              "passed": ok}  # fmt: skip
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "rss_samples": samples}, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
