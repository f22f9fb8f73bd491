"""Unit: bench/llama_server.py keeps only a build that answers one token, falling back from AMX (then
AVX-512) when one dies, and says which build ran; bench/run_bench.py draws its figures.

No llama.cpp is built here: the "builds" are tiny Python scripts standing in for `llama-server`,
started by the real probe on loopback. One kills itself with SIGILL when its first product is asked
for, as ggml's AMX build did on a Xeon; one answers like llama-server's /completion."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import llama_server
import run_bench

AMX = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# A Xeon's flags: AVX2, AVX-512 and AMX all listed.
XEON = {"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c", "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw",
        "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}  # fmt: skip

# Serves --port on loopback like llama-server: /completion answers one token, unless DIE is set,
# when the request kills the process with SIGILL (the first product, as in ggml's AMX kernels).
SERVER = """
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
DIE = {die}
class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if DIE:
            os.kill(os.getpid(), signal.SIGILL)
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({{"content": " Hi", "tokens_predicted": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Handler).serve_forever()
"""
DIES_AT_START = "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n"


def fake_builder(tmp_path: Path, program: Callable[[dict[str, str]], str]) -> tuple[Callable, list[dict[str, str]]]:
    """A stand-in for compile_server: each call writes `program(options)` as an executable
    build-N/bin/llama-server and remembers the options it was asked for."""
    asked: list[dict[str, str]] = []

    def compile(options: dict[str, str]) -> Path:
        asked.append(options)
        assert len(asked) <= 1 + len(llama_server.FALLBACKS), "rebuilt more often than there are fallbacks"
        binary = tmp_path / f"build-{len(asked)}" / "bin" / "llama-server"
        binary.parent.mkdir(parents=True)
        binary.write_text(f"#!{sys.executable}\n{program(options)}")
        binary.chmod(0o755)
        return binary

    return compile, asked


def amx_dies_at_first_product(options: dict[str, str]) -> str:
    return SERVER.format(die=any(options[name] == "ON" for name in AMX))


def test_a_build_that_dies_by_sigill_at_its_first_product_is_rebuilt_without_amx(tmp_path: Path) -> None:
    compile, asked = fake_builder(tmp_path, amx_dies_at_first_product)
    binary = llama_server.first_that_runs(llama_server.cmake_options(XEON), compile, tmp_path / "model.gguf")
    assert len(asked) == 2
    assert [asked[0][name] for name in AMX] == ["ON"] * 3
    assert [asked[1][name] for name in AMX] == ["OFF"] * 3
    assert asked[1]["GGML_AVX512"] == "ON"  # only what the failure implicates is dropped
    assert binary == tmp_path / "build-2" / "bin" / "llama-server"
    record = llama_server.reference(binary)
    assert record["fallback"] is True
    assert record["build"] == "build-2"
    assert record["dropped"] == list(AMX)
    assert record["failed"] == ["build-1: died by SIGILL"]
    assert "GGML_AMX_TILE" not in record["isa_on"] and "GGML_AVX512" in record["isa_on"]


def test_a_build_that_answers_is_kept_and_recorded_as_no_fallback(tmp_path: Path) -> None:
    compile, asked = fake_builder(tmp_path, lambda options: SERVER.format(die=False))
    binary = llama_server.first_that_runs(llama_server.cmake_options(XEON), compile, tmp_path / "model.gguf")
    assert len(asked) == 1
    record = json.loads((tmp_path / "build-1" / "reference.json").read_text())
    assert binary == tmp_path / "build-1" / "bin" / "llama-server"
    assert (record["fallback"], record["dropped"], record["failed"]) == (False, [], [])
    assert record["options"] == asked[0]


def test_when_even_the_build_without_amx_and_avx512_dies_the_error_says_so(tmp_path: Path) -> None:
    compile, asked = fake_builder(tmp_path, lambda options: DIES_AT_START)
    with pytest.raises(RuntimeError, match="no llama-server build runs on this CPU") as error:
        llama_server.first_that_runs(llama_server.cmake_options(XEON), compile, tmp_path / "model.gguf")
    assert len(asked) == 3  # as asked, AMX off, then AVX-512 off too
    assert asked[2]["GGML_AVX512"] == "OFF" and asked[2]["GGML_AVX2"] == "ON"
    assert str(error.value).count("died by SIGILL") == 3
    assert not list(tmp_path.glob("build-*/reference.json"))


def test_on_an_avx2_cpu_a_dying_build_has_nothing_to_drop_and_is_not_rebuilt(tmp_path: Path) -> None:
    compile, asked = fake_builder(tmp_path, lambda options: DIES_AT_START)
    avx2 = llama_server.cmake_options({"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"})
    with pytest.raises(RuntimeError, match="build-1: died by SIGILL"):
        llama_server.first_that_runs(avx2, compile, tmp_path / "model.gguf")
    assert len(asked) == 1


def test_the_picture_has_one_line_per_server_at_its_best_round(tmp_path: Path) -> None:
    def run(server: str, round_: int, tps: list[float]) -> dict[str, object]:
        levels = [{"clients": c, "tokens_per_s": t} for c, t in zip([1, 8, 32], tps, strict=True)]
        return {"round": round_, "server": server, "model": "smollm2-135m-instruct", "levels": levels}

    runs = [run("llamacpp", 1, [70, 150, 170]), run("ours", 1, [20, 70, 140]), run("ours", 2, [23, 99, 130])]
    record = {"machine": {"cpu": "AMD EPYC (avx2)", "cores": 2, "date": "2026-12-02"}, "runs": runs,
              "reference": {"build": "build-1", "isa_on": ["GGML_AVX2"], "fallback": True,
                            "dropped": list(AMX)}}  # fmt: skip
    png = tmp_path / "result.png"
    figure = run_bench.plot(record, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = figure.axes[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"llama-server, smollm2-135m-instruct": ([1, 8, 32], [70, 150, 170]),
                     "ours, smollm2-135m-instruct": ([1, 8, 32], [23, 99, 140])}  # fmt: skip
    assert "build-1 (AVX2; fallback, GGML_AMX_TILE, GGML_AMX_INT8, GGML_AMX_BF16 off)" in ax.get_title()
