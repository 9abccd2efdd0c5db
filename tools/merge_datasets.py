#!/usr/bin/env python
"""Concatenate indexed datasets (same token dtype) into one, documents in input order."""

from __future__ import annotations

import argparse

from megatron_glm.data.indexed import IndexedDataset, merge_datasets
from megatron_glm.logs import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", required=True, nargs="+", help="dataset prefixes (no .bin)")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        merge_datasets(args.input, args.output_prefix)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(IndexedDataset(args.output_prefix))


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
