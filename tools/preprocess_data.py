#!/usr/bin/env python
"""Tokenize a JSONL corpus into Megatron-compatible indexed datasets (.bin/.idx).

Writes ``{output_prefix}_{key}_{document|sentence}.bin/.idx`` per ``--json-keys`` key. Flags
follow Megatron-LM's tools/preprocess_data.py; see megatron_glm.data.preprocess for details.
"""

from __future__ import annotations

import argparse

from megatron_glm.data.preprocess import preprocess_data
from megatron_glm.logs import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--input", required=True, nargs="+", help="JSONL file(s), .jsonl.gz, or glob(s)"
    )
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model file or Hugging Face tokenizer folder",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="encoder processes, besides the one that parses (default 1)",
    )
    parser.add_argument(
        "--append-eod", action="store_true", help="end every document with the eos token"
    )
    parser.add_argument("--split-sentences", action="store_true", help="one sequence per sentence")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad line or cut-short .gz input instead of reporting it",
    )
    parser.add_argument(
        "--log-interval", type=int, default=1000, help="documents between progress updates"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = preprocess_data(
            args.input,
            args.output_prefix,
            args.tokenizer_model,
            json_keys=args.json_keys,
            workers=args.workers,
            append_eod=args.append_eod,
            split_sentences=args.split_sentences,
            strict=args.strict,
            log_interval=args.log_interval,
            progress=not args.no_progress,
        )
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(summary.format())


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
