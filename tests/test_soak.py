"""End-to-end: a short run of bench/soak.py (twice capacity, loopback, fixed time) passes, in
float32 and in bfloat16 whatever this CPU prefers, so both dtype paths run on every machine.

The full ten-minute soak and its figures are in bench/README.md; this keeps the script working
and catches leaks (memory still growing after warm-up) and stray statuses in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_short_soak_gets_only_200_and_503_and_flat_memory(gpt2_dir: Path, tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "bench/soak.py", "--model", str(gpt2_dir), "--batch", "4", "--queue", "4",
           "--duration", "24", "--warmup", "12", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "DTYPE": dtype}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert set(result["statuses"]) <= {"200", "503"}
    assert result["statuses"]["200"] > 0
    assert result["growth_percent"] < 5
