"""What a decode step costs beyond its matrix products, and what the two levers left would take
off it: the engine's traced step; the same step with its decode attention taken out (the layer's
queries stand for attention's answer and no keys are written: not a model, a measure of what
attention costs in place); and the step compiled by torch.compile (Inductor fuses everything
around the products; the packed float products stay calls of their own, since the compiler
cannot take oneDNN's packed weights). Each against its own bare products, in turns, in one
process; medians over the rounds. Needs a C++ compiler for the compiled step (else `--no-compile`).

Run: python bench/step_parts.py [--batches 1 8 32] [--cached 160] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from roofline import bare_products, cpu_description, full_step, load_apart, median_ms, step_work

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine
import model

PACKED: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # the compiled step's packed weights, by index


@torch.library.custom_op("bench::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, which: int, out_features: int) -> torch.Tensor:
    """oneDNN's packed product, opaque to the compiler: the weight is looked up, not passed."""
    weight, bias = PACKED[which]
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


@packed_linear.register_fake
def _(x: torch.Tensor, which: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class OpaqueLinear(model.Linear):
    """A `Linear` whose packed float products go through `packed_linear`."""

    which: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.format_at(x.numel() // self.in_features) == "float" and self.which >= 0:
            out: torch.Tensor = packed_linear(x, self.which, self.out_features)
            return out
        return super().__call__(x)


class WithoutAttention(model.Model):
    """The model with its decode attention taken out: each layer's queries (copied out of the
    layer's fused projection, ~1 us, as attention's answer is a tensor of its own) stand for it."""

    def _attend_decode(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Any) -> torch.Tensor:
        return q.contiguous()


def without_attention(network: model.Model, max_batch: int) -> model.Model:
    """The loaded model made `WithoutAttention`, its passes traced again as the load traces them."""
    network.__class__ = WithoutAttention
    network.lone_pass = None
    why_not = network.trace() or network.trace_batches(max_batch)
    assert why_not is None, why_not
    return network


def compiled_steps(network: model.Model, batches: list[int], cached: int) -> dict[int, Callable[[], object]]:
    """Per batch size, the model's plain decode step compiled for that shape, and how long each took."""
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1
    for lin in network.linears:
        lin.__class__ = OpaqueLinear
        assert isinstance(lin, OpaqueLinear)
        lin.which, lin.out_features = -1, 0
        if lin.weight is not None and lin.weight.is_mkldnn:
            lin.which = len(PACKED)
            PACKED.append((lin.weight, lin.bias))
            probe = torch.zeros(1, lin.in_features, dtype=network.dtype)
            lin.out_features = packed_linear(probe, lin.which, 0).shape[-1]
    steps: dict[int, Callable[[], object]] = {}
    for batch in batches:
        work = step_work(network, batch, cached)
        prepare = network._prepare_lone if batch == 1 else network._prepare_decode
        compiled = torch.compile(lambda ids, step: network._forward(ids, step, step, None), dynamic=False)
        start = time.monotonic()
        compiled(*prepare(work))
        print(f"compiled the {batch}-row step in {time.monotonic() - start:.0f} s", file=sys.stderr)
        steps[batch] = functools.partial(_run_compiled, compiled, prepare, work)
    return steps


def _run_compiled(compiled: Callable[..., object], prepare: Callable[[model.Work], tuple[Any, ...]],
                  work: model.Work) -> object:  # fmt: skip
    return compiled(*prepare(work))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--cached", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled step")
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.use_threads(0)
    max_batch = max(*args.batches, engine.ModelConfig.max_batch)
    config = engine.ModelConfig(name=args.model, max_batch=max_batch, prefix_cache_tokens=0)
    models = {"traced": load_apart(config).model}
    models["no attention"] = without_attention(load_apart(config).model, max_batch)
    with torch.inference_mode():
        steps: dict[str, dict[int, Callable[[], object]]] = {
            name: {batch: full_step(network, batch, args.cached) for batch in args.batches}
            for name, network in models.items()
        }
        if not args.no_compile:
            models["compiled"] = load_apart(config).model
            steps["compiled"] = compiled_steps(models["compiled"], args.batches, args.cached)
        rows = []
        for batch in args.batches:
            ratios: dict[str, list[float]] = {name: [] for name in models}
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(args.rounds):
                for name, network in models.items():
                    times[name].append(median_ms(steps[name][batch], args.repeats))
                    ratios[name].append(times[name][-1] / median_ms(bare_products(network, batch), args.repeats))
            medians = {name: {"step_ms": round(statistics.median(times[name]), 2),
                              "ratio": round(statistics.median(ratios[name]), 2)} for name in models}  # fmt: skip
            rows.append({"batch": batch, **medians})
    cpu = cpu_description()
    print(f"{args.model}, {args.cached} cached; {cpu}\n")
    print("| batch | " + " | ".join(f"{name}: step (ms) / products" for name in models) + " |")
    print("|---|" + "---|" * len(models))
    for r in rows:
        print(f"| {r['batch']} | " + " | ".join(f"{r[n]['step_ms']} / {r[n]['ratio']}x" for n in models) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "settings": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
