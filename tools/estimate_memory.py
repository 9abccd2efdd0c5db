#!/usr/bin/env python
"""Print the per-rank memory a run needs: parameters, gradients, optimizer, master weights,
activations, communication buffers and the total (``megatron_glm.planning.memory``).

    python tools/estimate_memory.py --config configs/pretrain_glm_410m.yaml --world-size 8
    python tools/estimate_memory.py --config configs/demo.yaml --vocab-size 512 \
        parallel.tp=2 train.zero_stage=1 --world-size 4

Overrides are the dotted ``key=value`` of ``glm-pretrain``. With ``model.vocab_size: 0`` the
vocabulary comes from ``--vocab-size``, else from the config's tokenizer (padded as training pads
it). ``--device cpu`` counts what the CPU kernels save (how the estimate is tested); the default
is the GPU kernels.
"""

from __future__ import annotations

import argparse

from megatron_glm.config import RunConfig, load_config
from megatron_glm.planning.memory import estimate_memory


def _vocab(cfg: RunConfig, given: int | None) -> int | None:
    """``--vocab-size``, else the tokenizer's padded size when the config takes it from there."""
    if given is not None or cfg.model.vocab_size:
        return given
    if not cfg.data.tokenizer_model:
        raise SystemExit(
            "model.vocab_size is 0 (from the tokenizer) and the config names no "
            "data.tokenizer_model: pass --vocab-size"
        )
    from megatron_glm.training.preflight import load_tokenizer

    return load_tokenizer(cfg).padded_vocab_size


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", required=True, help="run recipe YAML")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.zero_stage=2")
    ap.add_argument(
        "--world-size", type=int, default=None, help="ranks (default: tp x pp, one replica)"
    )
    ap.add_argument("--vocab-size", type=int, default=None, help="padded vocabulary size")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="kernels counted")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        world = args.world_size or cfg.parallel.tp * cfg.parallel.pp
        est = estimate_memory(
            cfg, world, vocab_size=_vocab(cfg, args.vocab_size), device=args.device
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    p, on = cfg.parallel, {True: "on", False: "off"}
    print(
        f"{cfg.model.name}: world {world} (tp {p.tp}, pp {p.pp}, dp {world // (p.tp * p.pp)}), "
        f"ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}, micro-batch "
        f"{cfg.train.micro_batch_size} x {cfg.data.seq_length}, activation checkpointing "
        f"{on[cfg.model.activation_checkpointing]}, sequence parallel "
        f"{on[p.sequence_parallel]}, offload {on[cfg.train.cpu_offload]}"
    )
    print("\n".join(est.lines()))


if __name__ == "__main__":
    main()
