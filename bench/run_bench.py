"""Start a server, load it with bench/loadgen.py at several client counts, stop it; for each
(server, model) pair asked for. Prints a Markdown table and writes all figures as JSON.

Run: python bench/run_bench.py --servers ours baseline --models models/smollm2-135m-instruct \
         models/random-distilgpt2 --json bench/results/cpu.json
     python bench/run_bench.py --stream --duration 20 --json bench/results/ttft.json   (time to first token)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
COMMANDS = {"ours": [sys.executable, "server.py"], "baseline": [sys.executable, "bench/baseline_server.py"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    server: str, model: str, port: int, log: Path, extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "API_KEY": KEY, "MODEL_NAME": model, "PORT": str(port), "MAX_BATCH_SIZE": "32"}
    env.update(extra or {})
    with open(log, "wb") as out:
        proc = subprocess.Popen(COMMANDS[server], cwd=ROOT, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{server} did not start; see {log}")


def measure(server: str, model: str, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    port = free_port()
    proc = start(server, model, port, workdir / f"{server}-{Path(model).name}.log")
    out = workdir / "levels.json"
    try:
        cmd = [sys.executable, "bench/loadgen.py", "--url", f"http://127.0.0.1:{port}", "--key", KEY,
               "--pid", str(proc.pid), "--json", str(out), "--duration", str(args.duration),
               "--max-new-tokens", str(args.max_new_tokens), "--clients", *map(str, args.clients),
               *(["--stream"] if args.stream else [])]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    levels = json.loads(out.read_text())["levels"]
    return {"server": server, "model": Path(model).name, "levels": levels}


def cpu_name() -> str:
    """Model name and the vector extensions that decide bfloat16 speed (AVX-512, AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name or platform.machine()} ({', '.join(wanted) or 'no AVX2'})"


def table(runs: list[dict[str, object]], stream: bool) -> str:
    ttft = " TTFT p50 s | TTFT p99 s |" if stream else ""
    lines = [
        f"| server | model | clients | tok/s | p50 s | p99 s |{ttft} requests | peak MB |",
        "|---|---|---|---|---|---|" + "---|" * (4 if stream else 2),
    ]
    for run in runs:
        for lv in run["levels"]:  # type: ignore[attr-defined]
            first = f" {lv['ttft_p50_s']} | {lv['ttft_p99_s']} |" if stream else ""
            lines.append(f"| {run['server']} | {run['model']} | {lv['clients']} | {lv['tokens_per_s']} | "
                         f"{lv['p50_s']} | {lv['p99_s']} |{first} {lv['requests']} | "
                         f"{lv['peak_rss_mb']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="+", choices=sorted(COMMANDS), default=["ours"])
    parser.add_argument("--models", nargs="+", default=["models/smollm2-135m-instruct"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--stream", action="store_true", help="streaming requests; adds time to first token")
    parser.add_argument("--json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for server in args.servers:
                runs.append(measure(server, model, args, Path(tmp)))
    print(table(runs, args.stream))
    machine = {"cpu": cpu_name(), "cores": psutil.cpu_count(), "python": platform.python_version(),
               "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
