"""Convert checkpoints between megatron_glm and the Hugging Face format (THUDM's GLM layout).

    python tools/convert_checkpoint.py to-hf --load CKPT_DIR [--tag global_stepN] --save HF_DIR \
        [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]

``to-hf`` reads any (tp, pp) checkpoint of ZeRO stage 0-3 (ZeRO-3's partitions are gathered) and
writes a folder that ``transformers`` loads with ``trust_remote_code=True``
(:mod:`megatron_glm.hf.export`). Prints the folder and what it holds.

    python tools/convert_checkpoint.py from-hf --load HF_DIR --save CKPT_DIR --tp N --pp M \
        [--config RUN.yaml]

``from-hf`` turns a GLM folder in THUDM's layout into a checkpoint of ours at (tp, pp) that
``pretrain`` resumes from at iteration 0 with a fresh optimizer (:mod:`megatron_glm.hf.import_hf`).
The folder's tokenizer (``tokenizer.json``, an export's SentencePiece ``tokenizer.model``, or
THUDM's ``vocab.txt`` / ``vocab.json`` + ``merges.txt`` converted to a ``tokenizer.json``) is
copied to ``CKPT_DIR/tokenizer`` and printed: set ``data.tokenizer_model`` to it. The folder's GeLU
form is printed too: set ``model.gelu`` to it in the run config.
"""

from __future__ import annotations

import argparse

from megatron_glm.hf.export import DTYPES, export_to_hf, parse_size
from megatron_glm.hf.import_hf import import_from_hf
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
    from_hf = sub.add_parser("from-hf", help="Hugging Face folder (THUDM layout) -> checkpoint")
    from_hf.add_argument("--load", required=True, help="Hugging Face model folder")
    from_hf.add_argument("--save", required=True, help="checkpoint directory to write")
    from_hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    from_hf.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    from_hf.add_argument(
        "--config", default=None, help="run config whose snapshot the checkpoint carries"
    )
    return parser


def _from_hf(args: argparse.Namespace) -> None:
    result = import_from_hf(args.load, args.save, tp=args.tp, pp=args.pp, run_config=args.config)
    rows, written = result.vocab_rows
    padded = f" (padded from {rows})" if rows != written else ""
    tokenizer = (
        f"tokenizer {result.tokenizer} (set data.tokenizer_model to it)"
        if result.tokenizer is not None
        else "no tokenizer in the folder (data.tokenizer_model must name the model's vocabulary)"
    )
    print(
        f"{result.tag_dir}: {result.num_parameters:,} parameters at tp {args.tp} x pp {args.pp}; "
        f"vocabulary {written} rows{padded}; iteration 0, optimizer restarts\n{tokenizer}\n"
        f"GeLU {result.model.gelu} (the folder's form: set model.gelu: {result.model.gelu})"
        + "".join(f"\nwarning: {w}" for w in result.warnings)
    )


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "from-hf":
        try:
            _from_hf(args)
        except ValueError as e:  # ConfigError and CheckpointFileError included
            parser.exit(2, f"error: {e}\n")
        return
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
