#!/usr/bin/env python
"""Train a SentencePiece tokenizer with GLM's special tokens (megatron_glm.data.tokenizer_training).

Bad input lines are counted and reported with file:line, as tools/preprocess_data.py does;
--strict stops at the first one instead.
"""

from __future__ import annotations

import argparse

from megatron_glm.data.tokenizer_training import MODEL_TYPES, train_tokenizer
from megatron_glm.logs import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--input", required=True, nargs="+", help="JSONL (.jsonl/.json[.gz]) or plain-text files"
    )
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--vocab-size", required=True, type=int)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="unigram")
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=1_000_000,
        help="train on a seeded uniform sample of at most this many sentences",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-byte-fallback", action="store_true")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad line or cut-short .gz input instead of reporting it",
    )
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    args = parser.parse_args(argv)
    try:
        s = train_tokenizer(
            args.input,
            args.model_prefix,
            args.vocab_size,
            model_type=args.model_type,
            input_sentence_size=args.input_sentence_size,
            threads=args.threads,
            json_key=args.json_key,
            seed=args.seed,
            byte_fallback=not args.no_byte_fallback,
            strict=args.strict,
            verbose=args.verbose,
        )
    except ValueError as e:  # TokenizerError, BadInputError, unusable arguments
        parser.exit(2, f"error: {e}\n")
    specials = " ".join(f"{tok}={i}" for tok, i in s["special_ids"].items())
    print(f"wrote {s['model']} and {s['vocab']} ({s['model_type']})")
    print(
        f"  vocab size {s['vocab_size']} (padded to {s['padded_vocab_size']} for tp=1), "
        f"unk={s['unk_id']}, pad=eos={s['special_ids']['<|endoftext|>']}"
    )
    print(f"  special ids: {specials}")
    print(
        f"  trained on {s['sentences_used']} of {s['sentences_total']} sentences "
        f"({s['lines_chunked']} long lines cut), {s['threads']} threads, seed {s['seed']}"
    )
    print("\n".join(f"  {line}" for line in s["bad_lines"].report()))
    print(
        f"  sample of {int(s['sample_sentences'])} sentences: "
        f"{s['chars_per_token']:.2f} chars/token, {s['tokens_per_word']:.2f} tokens/word, "
        f"byte fallback {100 * s['byte_fallback_fraction']:.2f}% of tokens, "
        f"unk {100 * s['unk_fraction']:.2f}%"
    )
    print(
        f"  {s['seconds']:.1f} s (reading {s['count_seconds']:.1f} s, "
        f"SentencePiece {s['train_seconds']:.1f} s)"
    )


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
