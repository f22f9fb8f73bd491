"""Build a random-weight GPT-2 with distilgpt2's shape, plus a tokenizer, in a local directory.

The model hub is not reachable everywhere (CI, offline machines), so tests and the benchmark
use this: 6 layers, 768 wide, 12 heads, 1024 positions, vocabulary 50257, as distilgpt2. The
tokenizer is a byte-level BPE trained in about two seconds on the Python standard library's own
source, padded with plain tokens to 50257 entries so every id the model can emit decodes.

Usage: python tools/make_test_model.py OUT_DIR [--layers N]
"""

from __future__ import annotations

import argparse
import glob
import sysconfig
from collections.abc import Iterator
from pathlib import Path

VOCAB = 50257
EOS = "<|endoftext|>"


def _corpus() -> Iterator[str]:
    for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py")):
        yield Path(path).read_text(encoding="utf-8", errors="ignore")


def build_tokenizer(out_dir: Path) -> int:
    """Train the BPE, save it as a transformers tokenizer, return the end-of-text id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS)
    tokenizer.add_tokens([f"<pad{i}>" for i in range(VOCAB - len(tokenizer))])
    tokenizer.save_pretrained(out_dir)
    eos = bpe.token_to_id(EOS)
    assert eos is not None
    return eos


def build(out_dir: Path, layers: int = 6, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if (out_dir / "config.json").exists():
        return out_dir
    eos = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=layers,
        n_embd=768,
        n_head=12,
        n_positions=1024,
        vocab_size=VOCAB,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    print(f"random GPT-2 in {build(args.out_dir, args.layers)}")


if __name__ == "__main__":
    main()
