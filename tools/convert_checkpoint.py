"""Convert checkpoints between megatron_glm and the Hugging Face format (THUDM's GLM layout).

    python tools/convert_checkpoint.py to-hf --load CKPT_DIR [--tag global_stepN] --save HF_DIR \
        [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]

``to-hf`` reads any (tp, pp) checkpoint of ZeRO stage 0-3 (ZeRO-3's partitions are gathered) and
writes a folder that ``transformers`` loads with ``trust_remote_code=True``
(:mod:`megatron_glm.hf.export`). Prints the folder and what it holds.
"""

from __future__ import annotations

import argparse

from megatron_glm.hf.export import DTYPES, export_to_hf, parse_size
from megatron_glm.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face folder")
    to_hf.add_argument("--load", required=True, help="checkpoint directory (holds 'latest')")
    to_hf.add_argument("--tag", default=None, help="tag to export (default: from 'latest')")
    to_hf.add_argument("--save", required=True, help="output folder (new or empty)")
    to_hf.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weight dtype")
    to_hf.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result = export_to_hf(
            args.load,
            args.save,
            tag=args.tag,
            dtype=args.dtype,
            max_shard_bytes=parse_size(args.max_shard_size),
        )
    except ValueError as e:  # CheckpointFileError included
        parser.exit(2, f"error: {e}\n")
    files = ", ".join(p.name for p in result.weight_files)
    print(
        f"{result.save_dir}: {result.num_parameters:,} parameters ({args.dtype}) in {files}; "
        f"vocabulary {result.vocab_rows} rows ({result.real_vocab_size or 'unknown'} real); "
        f"tokenizer {result.tokenizer}"
    )


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
