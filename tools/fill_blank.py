"""Greedy fill of one blank with a trained GLM checkpoint.

Usage:
    python tools/fill_blank.py --config configs/demo.yaml [--load DIR] [--text "A [MASK] b."]

Without ``--text`` it takes a held-out sentence: the first sentence of at least 8 tokens in the
run's *test* split (documents the model never trained on), masks a span of 1-3 tokens in its
middle, and prints the sentence, the masked text, the original span and the model's fill.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from megatron_glm.config import RunConfig, load_config, parse_split
from megatron_glm.data.dataset_builder import split_documents
from megatron_glm.data.indexed import IndexedDataset
from megatron_glm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_glm.generation.blank_fill import fill_blank
from megatron_glm.logs import setup_logging
from megatron_glm.model import build_model
from megatron_glm.training.checkpoint import load_model_state


def held_out_sentence(cfg: RunConfig, tok: Tokenizer, min_tokens: int = 8) -> np.ndarray:
    """Token ids of the first test-split sentence with at least ``min_tokens`` tokens.

    A sentence of a split dataset keeps the whitespace before it (so documents decode back
    exactly); the demo fills the sentence alone, re-encoded without that layout.
    """
    indexed = IndexedDataset(cfg.data.data_path[0])
    start, end = split_documents(indexed.num_documents, parse_split(cfg.data.split))[2]
    for d in range(start, end):
        first = int(indexed.doc_idx[d])
        for i in range(first, int(indexed.doc_idx[d + 1])):
            ids = np.asarray(indexed[i], dtype=np.int64)
            text = tok.decode(ids[ids != tok.eos_id].tolist()).strip()
            ids = np.asarray(tok.encode(text), dtype=np.int64)
            if len(ids) >= min_tokens:
                return ids
    raise ValueError(f"{cfg.data.data_path[0]}: test split has no sentence of {min_tokens}+ tokens")


def mask_middle(tok: Tokenizer, ids: np.ndarray) -> tuple[str, str]:
    """(text with one [MASK] over a middle span of 1-3 tokens, the span's original text)."""
    length = min(3, max(1, len(ids) // 6))
    start = len(ids) // 2 - length // 2
    masked = [*ids[:start].tolist(), tok.mask_id, *ids[start + length :].tolist()]
    return tok.decode(masked), tok.decode(ids[start : start + length].tolist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", required=True, help="the run config the checkpoint came from")
    parser.add_argument("--load", help="checkpoint directory (default: checkpoint.save)")
    parser.add_argument("--text", help="text with exactly one [MASK]; default: held-out sentence")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        tok = load_tokenizer(
            cfg.data.tokenizer_model,
            make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
        )
        load_dir = args.load or cfg.checkpoint.save
        if load_dir is None:
            raise ValueError("no checkpoint: pass --load or set checkpoint.save")
        model = build_model(cfg.model, vocab_size=tok.padded_vocab_size, seed=cfg.train.seed)
        model.load_state_dict(load_model_state(load_dir))
        model.eval()
        text, original = args.text, None
        if text is None:
            ids = held_out_sentence(cfg, tok)
            print(f"held-out sentence: {tok.decode(ids.tolist())!r}")
            text, original = mask_middle(tok, ids)
        fill = fill_blank(model, tok, text, max_new_tokens=args.max_new_tokens)
    except ValueError as exc:
        print(f"fill_blank: error: {exc}", file=sys.stderr)
        return 2
    print(f"input:  {text!r}")
    if original is not None:
        print(f"blank:  {original!r}")
    print(f"fill:   {fill!r}")
    return 0


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    sys.exit(main())
