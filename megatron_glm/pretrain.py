"""GLM pretraining entry point (the only module that reads the command line).

    python -m megatron_glm.pretrain --config RUN.yaml [key.sub=value ...]
    deepspeed --num_gpus N --module megatron_glm.pretrain --config RUN.yaml ...
    torchrun --nproc_per_node N -m megatron_glm.pretrain --config RUN.yaml ...
    glm-pretrain --config RUN.yaml ...            (console script)

Configuration and launch errors (unknown key, heads not dividing hidden, global batch not a
multiple of micro batch x data-parallel size, missing data or tokenizer file) are reported with
the field name and exit status 2 *before* any process group starts. A run stopped by SIGTERM,
SIGINT, SIGUSR1, the loss of its ``deepspeed`` launcher (``training.signals``),
``train.exit_duration_mins`` or ``train.exit_interval`` saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from megatron_glm.config import RunConfig, load_config, to_dict
from megatron_glm.training.distributed import read_dist_env
from megatron_glm.training.loop import NonFiniteLossError
from megatron_glm.training.preflight import validate_for_launch

EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-pretrain",
        description="Pretrain a GLM with DeepSpeed (any world size; see README).",
    )
    parser.add_argument("--config", required=True, help="run recipe YAML, e.g. configs/demo.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.train_iters=100 train.zero_stage=2",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and files, print the resolved run and DeepSpeed config, exit",
    )
    # The deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def describe_run(cfg: RunConfig, world_size: int) -> str:
    """The resolved config, the derived layout and the DeepSpeed config, as YAML + JSON text."""
    from megatron_glm.model import flops_per_token, num_parameters
    from megatron_glm.training.engine import deepspeed_config
    from megatron_glm.training.preflight import data_parallel_size, load_tokenizer

    vocab = load_tokenizer(cfg).padded_vocab_size if cfg.data.tokenizer_model else None
    dp = data_parallel_size(cfg, world_size)
    lines = [
        yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(),
        f"# world size {world_size}, data parallel {dp}, tensor parallel {cfg.parallel.tp}, "
        f"pipeline parallel {cfg.parallel.pp}",
        f"# parameters {num_parameters(cfg.model, vocab):,}, FLOPs/token "
        f"{flops_per_token(cfg.model, vocab, cfg.data.seq_length):,}",
        "# DeepSpeed config:",
        json.dumps(deepspeed_config(cfg, dp), indent=2),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, train. Returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        env = read_dist_env()
        validate_for_launch(cfg, env.world_size)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.dry_run:
        print(describe_run(cfg, env.world_size))
        return 0
    from megatron_glm.training.session import run_pretraining  # imports deepspeed: keep it late

    try:
        run_pretraining(cfg, env)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    return 0


if __name__ == "__main__":
    sys.exit(main())
