#!/usr/bin/env python
"""Rewrite a checkpoint, weights and optimizer state, for another tensor/pipeline-parallel layout.

    python tools/reshard_checkpoint.py --load checkpoints/run --tp 4 --save checkpoints/run_tp4
    python tools/reshard_checkpoint.py --load checkpoints/run --tp 2 --pp 4 --save ckpt/tp2_pp4

Reads ``--load/<tag>`` (tag from ``latest`` unless ``--tag``) in any layout: unpipelined
(``mp_rank_XX_model_states.pt`` per TP rank) or DeepSpeed pipeline files
(``layer_II-model_TT-model_states.pt``); writes ``--save/<tag>`` for ``--tp`` x ``--pp`` and
``--save/latest``. The model architecture comes from the config snapshot stored in the
checkpoint, or from ``--config`` (a run YAML).

The optimizer state (fp32 master weights, Adam's moments and step, from ZeRO-0/1/2) is carried
over in ``--save/<tag>/optimizer_state.pt``, so the resumed run continues with its Adam moments at
any (tp, pp, data-parallel size, ZeRO stage); ``--no-optimizer`` writes weights only (Adam
restarts). See ``megatron_glm.training.checkpoint.optimizer_state`` for how and why. A ZeRO-3
checkpoint's weights are gathered from its data-parallel partitions; its optimizer state is not
read (``--no-optimizer``).

With ``model.vocab_size = 0`` the padded vocabulary depends on tp (the tokenizer's size rounded
up to ``make_vocab_size_divisible_by * tp``): the embedding is re-padded for the target tp, padding
rows cut or added as copies of the last one, as Megatron-LM's converter does (the tokenizer comes
from the config snapshot's ``data.tokenizer_model``, or ``--tokenizer``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_glm.config import ModelConfig, from_dict, load_config
from megatron_glm.data.tokenizer import load_tokenizer
from megatron_glm.logs import setup_logging
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.training.checkpoint import reshard_checkpoint, resolve_tag, saved_config


def _model_config(load: str, tag: str, config: str | None) -> ModelConfig:
    if config is not None:
        return load_config(config).model
    saved = saved_config(Path(load) / tag)
    if saved is None or "model" not in saved:
        raise ValueError(
            f"{load}/{tag}: the checkpoint holds no config snapshot; pass --config RUN.yaml"
        )
    return from_dict(ModelConfig, saved["model"], prefix="model.")


def _vocab_rows(
    load: str, tag: str, model: ModelConfig, tp: int, tokenizer: str | None
) -> int | None:
    """The target's padded vocabulary rows, or None when the config fixes them.

    With ``model.vocab_size = 0`` the rows are the tokenizer's size padded to
    ``make_vocab_size_divisible_by * tp``: they change with tp, so the tokenizer is needed (the
    snapshot's ``data.tokenizer_model``, or ``--tokenizer``). A config that names no tokenizer
    (a model built with an explicit vocabulary through the library) keeps the source's rows.
    """
    if model.vocab_size > 0:
        return None
    saved = saved_config(Path(load) / tag) or {}
    path = tokenizer or saved.get("data", {}).get("tokenizer_model")
    if not path:
        return None
    if not Path(path).exists():
        raise ValueError(
            f"{load}/{tag}: model.vocab_size is 0 (the tokenizer's, padded for tp), so the "
            f"padded vocabulary at tp {tp} needs the tokenizer; {path!r} is not a file: pass "
            "--tokenizer PATH"
        )
    multiple = model.make_vocab_size_divisible_by
    return load_tokenizer(path, make_vocab_size_divisible_by=multiple, tp=tp).padded_vocab_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (holds 'latest')")
    parser.add_argument("--tp", required=True, type=int, help="target tensor-parallel size")
    parser.add_argument("--pp", default=1, type=int, help="target pipeline-parallel size")
    parser.add_argument("--save", required=True, help="output checkpoint directory")
    parser.add_argument("--tag", default=None, help="tag to convert (default: from 'latest')")
    parser.add_argument("--config", default=None, help="run YAML, if the checkpoint has no config")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece model, when the one the checkpoint's config names is not at hand "
        "(needed with model.vocab_size=0: the padded vocabulary depends on tp)",
    )
    parser.add_argument(
        "--no-optimizer",
        action="store_true",
        help="write weights only: Adam's moments restart when the checkpoint is resumed",
    )
    args = parser.parse_args(argv)
    try:
        tag = resolve_tag(args.load, args.tag)
        model = _model_config(args.load, tag, args.config)
        layout = tensor_parallel_layout(model)
        rows = _vocab_rows(args.load, tag, model, args.tp, args.tokenizer)
        result = reshard_checkpoint(
            args.load,
            args.save,
            args.tp,
            layout,
            pp=args.pp,
            tag=tag,
            optimizer=not args.no_optimizer,
            vocab_rows=rows,
        )
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if max(result.source_pp, result.target_pp) == 1:
        change = f"tp {result.source_tp} -> {result.target_tp}"
    else:
        change = (
            f"(tp {result.source_tp}, pp {result.source_pp}) -> "
            f"(tp {result.target_tp}, pp {result.target_pp})"
        )
    print(f"resharded {args.load}/{result.tag}: {change}")
    if result.vocab_rows is not None:
        old, new = result.vocab_rows
        print(
            f"  padded vocabulary {old} -> {new} rows for tp {result.target_tp} (padding rows "
            f"{'cut' if new < old else 'added as copies of the last'}; real tokens unchanged)"
        )
    for path in result.files:
        print(f"  wrote {path}")
    if result.dropped:
        restarts = "" if result.optimizer_kept else " (optimizer restarts)"
        print(f"  not carried over{restarts}: {', '.join(result.dropped)}")


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
