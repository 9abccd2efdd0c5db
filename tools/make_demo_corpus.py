#!/usr/bin/env python
"""Write the demo corpus (stdlib docstrings, see megatron_glm.data.demo_corpus) as JSONL."""

from __future__ import annotations

import argparse

from megatron_glm.data.demo_corpus import DEFAULT_MIN_CHARS, write_demo_corpus
from megatron_glm.logs import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after N documents")
    parser.add_argument(
        "--min-chars", type=int, default=DEFAULT_MIN_CHARS, help="skip shorter documents"
    )
    args = parser.parse_args(argv)
    try:
        stats = write_demo_corpus(args.output, args.max_docs, min_chars=args.min_chars)
    except ValueError as e:
        parser.error(str(e))
    print(
        f"wrote {stats['path']}: {stats['documents']} documents, {stats['characters']} characters, "
        f"{stats['mb']:.2f} MB in {stats['seconds']:.1f} s"
    )
    print(
        f"  from {stats['files_scanned']} files of {stats['stdlib']} (Python {stats['python']}); "
        f"skipped: {stats['files_unparsable']} unparsable files, {stats['short_skipped']} "
        f"documents < {args.min_chars} chars, {stats['duplicate_skipped']} duplicates, "
        f"{stats['unencodable_skipped']} not UTF-8 encodable"
    )


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
