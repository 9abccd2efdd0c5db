"""Finetuning entry point (reads the command line).

    python -m megatron_glm.finetune --config configs/finetune/TASK.yaml [key.sub=value ...]
    deepspeed --num_gpus N --module megatron_glm.finetune --config ...
    glm-finetune --config ...          (console script; --help lists every config field)

Errors in the config or the task files exit with status 2 before any process group starts,
naming the field or ``file:line``; otherwise as ``glm-pretrain``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_glm.config import load_config
from megatron_glm.logs import all_ranks_requested
from megatron_glm.pretrain import (
    EXIT_CONFIG_ERROR,
    build_parser,
    exit_quietly_on_ctrl_c,
    report_launch_error,
    run_and_report,
    without_launch,
)


def main(argv: list[str] | None = None) -> int:
    """Parse, check, finetune. Returns the process exit status."""
    parser = build_parser()
    parser.prog = "glm-finetune"
    parser.description = "Finetune a GLM on a cloze or seq2seq task (see README)."
    return exit_quietly_on_ctrl_c(_main, parser.parse_intermixed_args(argv))


def _main(args: argparse.Namespace) -> int:
    if (status := without_launch(args)) is not None:
        return status
    from megatron_glm.training.distributed import read_dist_env

    try:
        cfg = load_config(args.config, args.overrides)
        env = read_dist_env()
        from megatron_glm.finetune.run import check_finetune
        from megatron_glm.training.preflight import validate_for_launch

        validate_for_launch(cfg, env.world_size, check_data=False)
        check_finetune(cfg)
    except (ValueError, OSError) as exc:
        report_launch_error(exc)
        return EXIT_CONFIG_ERROR
    from megatron_glm.finetune.run import run_finetuning

    return run_and_report(
        run_finetuning,
        cfg,
        env,
        all_ranks=all_ranks_requested(),
        stopped_status=args.stopped_exit_status,
    )


if __name__ == "__main__":
    sys.exit(main())
