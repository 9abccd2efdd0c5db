#!/usr/bin/env python
"""Pick a parallel layout for N GPUs: the fastest estimated layouts that fit, and how to launch.

    python tools/plan_layout.py --config configs/pretrain_glm_410m.yaml --gpus 8 --gpu-memory 80GiB
    python tools/plan_layout.py --config configs/pretrain_glm_10b.yaml --gpus 64 \
        --gpu-memory 80GiB --nodes 8 --top 3 train.global_batch_size=512

Searches tp (inside a node), pp, dp, ZeRO stage, micro-batch, activation checkpointing and
sequence parallelism; keeps the layouts the config accepts whose per-rank memory estimate fits
the GPU less a margin, ranks them by an estimated step time and prints the best with the
DeepSpeed launcher command for each and the assumptions the estimate rests on (formulas:
``megatron_glm.planning.layout``). Overrides after the config change the run being planned and
are repeated in every command line. On several nodes the command reads a DeepSpeed hostfile named
``hostfile`` (a ``host slots=N`` line per node; ``launch/deepspeed_hostfile.sh``). Exit status 1
when nothing fits.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from megatron_glm.config import RunConfig, apply_overrides, from_dict, load_yaml
from megatron_glm.data.tokenizer import load_tokenizer
from megatron_glm.model import num_parameters
from megatron_glm.planning.layout import (
    Assumptions,
    Cluster,
    GiB,
    Plan,
    Search,
    padded_vocab_size,
    parse_size,
    plan_layouts,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the run, e.g. a=b")
    parser.add_argument("--gpus", required=True, type=int, help="GPUs in all")
    parser.add_argument("--gpu-memory", required=True, type=_size, help="per GPU, e.g. 80GiB")
    parser.add_argument("--nodes", type=int, help="nodes (default: 8 GPUs per node)")
    parser.add_argument("--top", type=int, default=5, help="plans to print (default 5)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="the tokenizer's size when model.vocab_size=0 (default: read data.tokenizer_model)",
    )
    d = Assumptions()
    assumption = parser.add_argument_group("assumptions of the step-time estimate")
    assumption.add_argument(
        "--peak-tflops", type=float, default=d.peak_flops / 1e12, help="per GPU (%(default)s)"
    )
    assumption.add_argument("--mfu", type=float, default=d.mfu, help="(%(default)s)")
    assumption.add_argument(
        "--intra-node-gbps",
        type=float,
        default=d.intra_node_bandwidth / 1e9,
        help="GB/s per GPU inside a node (%(default)s)",
    )
    assumption.add_argument(
        "--inter-node-gbps",
        type=float,
        default=d.inter_node_bandwidth / 1e9,
        help="GB/s per GPU across nodes (%(default)s)",
    )
    assumption.add_argument(
        "--margin", type=float, default=d.memory_margin, help="GPU memory kept free (%(default)s)"
    )
    return parser


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def tokenizer_vocab(cfg: RunConfig, given: int | None) -> int | None:
    """The tokenizer's (unpadded) size when the model takes it from the tokenizer, else None."""
    if given is not None or cfg.model.vocab_size > 0 or not cfg.data.tokenizer_model:
        return given
    if not Path(cfg.data.tokenizer_model).exists():
        return None  # padded_vocab_size then asks for --vocab-size
    multiple = cfg.model.make_vocab_size_divisible_by
    return load_tokenizer(
        cfg.data.tokenizer_model, make_vocab_size_divisible_by=multiple
    ).vocab_size


def launch_command(config: str, overrides: list[str], plan: Plan, cluster: Cluster) -> str:
    """The DeepSpeed launcher line of a plan (one node: --num_gpus; several: a hostfile)."""
    hosts = ["--num_gpus", str(cluster.gpus_per_node)]
    if cluster.nodes > 1:
        hosts = ["--hostfile", "hostfile", "--num_nodes", str(cluster.nodes), *hosts]
    argv = ["deepspeed", *hosts, "--module", "megatron_glm.pretrain", "--config", config]
    return shlex.join([*argv, *overrides, *plan.layout.overrides()])


def _plan_line(rank: int, plan: Plan) -> str:
    t = plan.time
    return (
        f"#{rank} {plan.layout.describe()}: step {t.total:.4g} s (compute {t.compute:.4g}, "
        f"bubble {t.bubble:.4g}, tp {t.tp_comm:.4g}, pp {t.pp_comm:.4g}, dp {t.dp_comm:.4g}), "
        f"memory {plan.memory.total / GiB:.1f} GiB per rank"
    )


def _summary(search: Search, budget: float) -> str:
    line = (
        f"searched {search.candidates} layouts: {search.rejected_by_config} refused by the "
        f"config, {search.too_large} over the {budget / GiB:.1f} GiB budget"
    )
    if search.smallest_too_large is not None:
        line += f" (smallest {search.smallest_too_large / GiB:.1f} GiB)"
    return f"{line}, {len(search.plans)} fit"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    nodes = args.nodes or (args.gpus // 8 if args.gpus % 8 == 0 else 1)
    cluster = Cluster(gpus=args.gpus, gpu_memory=args.gpu_memory, nodes=nodes)
    assumptions = Assumptions(
        peak_flops=args.peak_tflops * 1e12,
        mfu=args.mfu,
        intra_node_bandwidth=args.intra_node_gbps * 1e9,
        inter_node_bandwidth=args.inter_node_gbps * 1e9,
        memory_margin=args.margin,
    )
    raw = apply_overrides(load_yaml(args.config), args.overrides)
    base = from_dict(RunConfig, raw)
    vocab = tokenizer_vocab(base, args.vocab_size)
    search = plan_layouts(raw, cluster, assumptions, tokenizer_vocab=vocab)
    params = num_parameters(base.model, padded_vocab_size(base, 1, vocab))
    nodes = f"{cluster.nodes} node{'s' if cluster.nodes > 1 else ''} x {cluster.gpus_per_node}"
    print(
        f"{base.model.name} ({params:,} parameters, {args.config}): {cluster.gpus} GPUs ({nodes})"
        f" of {cluster.gpu_memory / GiB:.1f} GiB; global batch {base.train.global_batch_size} x "
        f"{base.data.seq_length} tokens, {base.train.precision}"
    )
    print("assumptions: " + "; ".join(assumptions.lines()))
    print(_summary(search, cluster.gpu_memory * (1 - assumptions.memory_margin)))
    for rank, plan in enumerate(search.plans[: args.top], start=1):
        print(_plan_line(rank, plan))
        print("   " + launch_command(args.config, args.overrides, plan, cluster))
    if not search.plans:
        print("no layout fits: add GPUs, or shorten data.seq_length / the global batch")
        return 1
    print("memory of #1:")
    print("\n".join("   " + line for line in search.plans[0].memory.lines()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:  # ConfigError included: the field and the rule, no traceback
        sys.exit(f"plan_layout: {exc}")
