"""Zero-shot evaluation of a trained GLM on held-out text: perplexity and last-word accuracy.

    python tools/evaluate.py --load CKPT_DIR --input held_out.jsonl [--task both]
    python tools/evaluate.py --hf HF_DIR --input held_out.jsonl --task lambada

``--load`` reads a checkpoint of ours at any layout, ``--hf`` a Hugging Face export
(:mod:`megatron_glm.inference`, as ``tools/generate.py``). Each input line is a JSON object whose
``"text"`` (``--key``) is one held-out text; a bad line is an error naming ``file:line``.

- ``perplexity``: every token of every text scored once, as part B after ``[gMASK]``, in
  windows of ``--max-length`` positions sliding by ``--stride``
  (:func:`megatron_glm.finetune.evaluate.lm_perplexity` says how);
- ``lambada``: the last word of each text generated greedily after ``context [gMASK]``,
  compared with the original word, punctuation stripped
  (:func:`megatron_glm.finetune.evaluate.last_word_accuracy`).

The result table goes to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_glm.finetune.evaluate import (
    LastWordResult,
    PerplexityResult,
    last_word_accuracy,
    lm_perplexity,
    read_held_out,
)
from megatron_glm.inference import LoadedModel, load_for_inference
from megatron_glm.logs import setup_logging

TASKS = ("perplexity", "lambada", "both")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="checkpoint directory of ours (holds 'latest')")
    source.add_argument("--hf", help="Hugging Face model folder (an export)")
    parser.add_argument("--tag", help="checkpoint tag (default: from 'latest')")
    parser.add_argument("--tokenizer", help="tokenizer, if not the one the model names")
    parser.add_argument("--input", required=True, help="JSONL file of held-out texts")
    parser.add_argument("--key", default="text", help="JSON key of the text (default: text)")
    parser.add_argument("--task", choices=TASKS, default="both", help="what to measure")
    parser.add_argument(
        "--max-length", type=int, help="positions per window (default: the model's maximum)"
    )
    parser.add_argument(
        "--stride", type=int, help="new tokens scored per later window (default: half a window)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows / texts per batch")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


def table(ppl: PerplexityResult | None, words: LastWordResult | None) -> list[str]:
    """The result lines: one metric per line, name then value."""
    rows: list[tuple[str, str]] = []
    texts = ppl.texts if ppl is not None else words.texts if words is not None else 0
    rows.append(("texts", str(texts)))
    if ppl is not None:
        rows += [
            ("tokens", str(ppl.tokens)),
            ("loss", f"{ppl.loss:.4f}"),
            ("perplexity", f"{ppl.perplexity:.2f}"),
        ]
    if words is not None:
        rows.append(
            (
                "last-word accuracy",
                f"{words.accuracy:.2%} ({words.correct}/{words.scored}, "
                f"{words.skipped} without a last word)",
            )
        )
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows]


def evaluate(
    loaded: LoadedModel, texts: list[str], args: argparse.Namespace
) -> tuple[PerplexityResult | None, LastWordResult | None]:
    ppl = words = None
    if args.task in ("perplexity", "both"):
        ppl = lm_perplexity(
            loaded.model,
            loaded.tokenizer,
            texts,
            max_length=args.max_length,
            stride=args.stride,
            batch_size=args.batch_size,
        )
    if args.task in ("lambada", "both"):
        words = last_word_accuracy(
            loaded.model,
            loaded.tokenizer,
            texts,
            max_length=args.max_length,
            batch_size=args.batch_size,
        )
    return ppl, words


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        texts = read_held_out(args.input, args.key)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loaded = load_for_inference(
            load=args.load, hf=args.hf, tag=args.tag, tokenizer=args.tokenizer, device=device
        )
        ppl, words = evaluate(loaded, texts, args)
    except ValueError as e:  # BadLineError, checkpoint and tokenizer errors included
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.input} on {loaded.where}")
    print("\n".join(table(ppl, words)))
    return 0


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    sys.exit(main())
