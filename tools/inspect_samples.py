r"""Print blank-infilling training rows of a preprocessed corpus: what the model is trained on.

    python tools/inspect_samples.py --data-prefix data/demo/demo_text_sentence \
        --tokenizer-model data/demo/tok.model --seq-length 512 --num-samples 4 --objective span

Human output shows each row's fields, part A with its mask tokens and every part-B span with the
part-A position of its mask; ``--json`` prints one JSON object per line with the batch-contract
keys (lists of ints, ``position_ids`` as [2][S]) and ``objective`` as a name.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_glm.data.blank_infilling import OBJECTIVES, format_row, row_to_json
from megatron_glm.data.loader import inspection_dataset
from megatron_glm.data.tokenizer import load_tokenizer
from megatron_glm.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-prefix", required=True, help="indexed dataset prefix (no .bin/.idx)")
    ap.add_argument(
        "--tokenizer-model", required=True, help="SentencePiece .model or tokenizer folder"
    )
    ap.add_argument("--seq-length", type=int, default=512, help="row length S")
    ap.add_argument("--num-samples", type=int, default=4, help="rows to print")
    ap.add_argument("--objective", choices=[*OBJECTIVES, "mixed"], default="mixed")
    ap.add_argument("--seed", type=int, default=1234, help="packing and masking seed")
    ap.add_argument("--cache-dir", default=None, help="index cache dir (default: next to data)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer_model)
        ds = inspection_dataset(
            args.data_prefix,
            tok,
            seq_length=args.seq_length,
            num_samples=args.num_samples,
            objective=None if args.objective == "mixed" else args.objective,
            seed=args.seed,
            cache_dir=args.cache_dir,
        )
        for i in range(args.num_samples):
            row = ds[i]
            if args.json:
                print(json.dumps({"sample": i, **row_to_json(row)}))
            else:
                window = ds.windows[i]
                title = f"row {i} (epoch {window.epoch}, sample {window.index}): "
                print(format_row(row, tok.decode, title) + "\n")
    except ValueError as e:
        print(f"inspect_samples: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    sys.exit(main())
