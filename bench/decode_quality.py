"""Teacher-forced quality of batched decode attention in bfloat16, against the float32 engine.

Runs windows of real text (quality.py's) through the engine's own Model as decode steps of one
batch: each row a window, its first tokens a prompt, then one token a step, the text's own. Once
in float32 and once in bfloat16 (decode attention's sums, `Model._attend_decode`, leave their
kernel in bfloat16: the scores too). bfloat16's next-token log-probabilities are compared with
float32's at every decoded position: top-1 agreement and perplexity on the text. Weights stay
float (QUANTIZE=none): only the precision of the activations, the keys and values and the
attention differs. The plain passes run (no traces).

Run: python bench/decode_quality.py [--rows 16] [--steps 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from quality import DEFAULT_TEXT, compare
from roofline import cpu_description, load_apart

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine
import model


def decoded(network: model.Model, windows: torch.Tensor, prompt: int) -> torch.Tensor:
    """float32 log-probabilities [rows, steps, vocab] of each window's tokens after its prompt,
    each predicted by a decode step of the whole batch."""
    network.clear()
    network.batch_passes, network.lone_pass = {}, None
    rows, length = windows.shape
    per_row = model.blocks_for(length)
    tables = [list(range(row * per_row, (row + 1) * per_row)) for row in range(rows)]
    out = []
    with torch.inference_mode():
        for table, window in zip(tables, windows, strict=True):
            network.run(model.Work([table], [window[:prompt].tolist()], [0], fresh=tuple(table)))
        for position in range(prompt, length - 1):
            work = model.Work(tables, [[int(token)] for token in windows[:, position]], [position] * rows)
            out.append(torch.log_softmax(network.run(work).float(), -1))
    return torch.stack(out, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    engine.use_threads(0)
    from transformers import AutoTokenizer

    ids = torch.tensor(AutoTokenizer.from_pretrained(args.model)(args.text.read_text()).input_ids)
    length = args.prompt + args.steps + 1
    windows = ids[: args.rows * length].view(args.rows, length)
    scored = list(windows[:, args.prompt :])  # as quality.py's windows: tokens 1.. are scored

    def load(dtype: str) -> model.Model:
        config = engine.ModelConfig(name=args.model, dtype=dtype, quantize="none", max_batch=args.rows)
        return load_apart(config).model

    reference = list(decoded(load("float32"), windows, args.prompt))
    results = {"float32": compare(reference, reference, scored)}
    results["bfloat16"] = compare(reference, list(decoded(load("bfloat16"), windows, args.prompt)), scored)
    base = results["float32"]["perplexity"]
    print(f"{args.model}, {args.rows} rows x {args.steps} decode steps after {args.prompt}-token prompts; "
          f"{cpu_description()}\n")  # fmt: skip
    print("| dtype | top-1 agreement with float32 | perplexity | vs float32 |\n|---|---|---|---|")
    for way, r in results.items():
        print(f"| {way} | {r['top1_agreement']:.2%} | {r['perplexity']:.3f} | {r['perplexity'] / base - 1:+.2%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "cpu": cpu_description(), "rows": args.rows,
                                               "steps": args.steps, "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
