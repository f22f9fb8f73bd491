"""One decode step of this checkout's Model and of another checkout's, in turns, in one process:
where a machine's speed drifts between runs (the AMX Xeons here: bare products at one row took
6.2 ms in one run and 9.8 in the next), only steps timed side by side compare. Each model is loaded
as the server loads it, in a thread that ends; its step is timed against its own bare products in
every round, and the table gives the medians over the rounds.

Run: python bench/ab_step.py --other /tmp/before [--compile] [--dtype float32] [--batches 1 8] [--cached 160]
     [--last 900]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch
from roofline import bare_products, cpu_description, full_step, median_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine
import model


def model_module(checkout: Path, name: str = "other_model") -> ModuleType:
    """The other checkout's model.py, as a module of its own name."""
    spec = importlib.util.spec_from_file_location(name, checkout / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def load_apart(module: ModuleType, config: engine.ModelConfig) -> model.Model:
    """Loaded (and compiled) in a thread that ends, as the server does: a second OpenMP team
    living beside the one that runs the steps slows both."""
    loaded: list[model.LoadedModel] = []
    thread = threading.Thread(target=lambda: loaded.append(module.load_model(config, engine.PREFILL_CHUNK)))
    thread.start()
    thread.join()
    return loaded[0].model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--cached", type=int, default=160)
    parser.add_argument("--last", type=int, help="the batch's last sequence holds this many (a long one among short)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="COMPILE=1 for both")
    parser.add_argument("--dtype", default="auto", help="DTYPE for both (float32: the AVX2 EPYCs' choice)")
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.use_threads(0)
    config = engine.ModelConfig(name=args.model, max_batch=max(*args.batches, engine.ModelConfig.max_batch),
                                compile=args.compile, dtype=args.dtype)  # fmt: skip
    models = {"other": load_apart(model_module(args.other), config), "this": load_apart(model, config)}
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            steps: dict[str, list[float]] = {name: [] for name in models}
            ratios: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(args.rounds):
                for name, network in models.items():
                    step = median_ms(full_step(network, batch, args.cached, args.last), args.repeats)
                    steps[name].append(step)
                    ratios[name].append(step / median_ms(bare_products(network, batch), args.repeats))
            row = {"batch": batch, **{f"{n}_step_ms": round(statistics.median(s), 2) for n, s in steps.items()},
                   **{f"{n}_ratio": round(statistics.median(r), 3) for n, r in ratios.items()}}  # fmt: skip
            rows.append(row)
    cpu = cpu_description()
    last = f" (the last {args.last})" if args.last is not None else ""
    how = f"compile={args.compile}, dtype={args.dtype}, other {args.other}"
    print(f"{args.model}, {args.cached} cached{last}, {how}; {cpu}")
    print()
    print("| batch | other: step (ms) | this: step (ms) | other: step / products | this: step / products |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['other_step_ms']} | {r['this_step_ms']} | {r['other_ratio']} | {r['this_ratio']} |")
    if args.json:
        settings = vars(args) | {"other": str(args.other)}
        Path(args.json).write_text(json.dumps({"cpu": cpu, "settings": settings, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
