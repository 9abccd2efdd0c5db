"""GLM pretraining entry point (the only module that reads the command line).

    python -m megatron_glm.pretrain --config RUN.yaml [key.sub=value ...]
    deepspeed --num_gpus N --module megatron_glm.pretrain --config RUN.yaml ...
    torchrun --nproc_per_node N -m megatron_glm.pretrain --config RUN.yaml ...
    glm-pretrain --config RUN.yaml ...            (console script)
    glm-pretrain --help       (every config field: type, default, docstring; config_docs)

Configuration and launch errors (unknown key, heads not dividing hidden, global batch not a
multiple of micro batch x data-parallel size, missing data or tokenizer file) are reported with
the field name and exit status 2 *before* any process group starts, printed once per node
(:func:`report_launch_error`). A run stopped by SIGTERM, SIGINT, SIGUSR1, the loss of its
``deepspeed`` launcher (``training.signals``), ``train.exit_duration_mins`` or
``train.exit_interval`` saves a checkpoint and exits 0, or ``--stopped-exit-status N`` when it
stopped before ``train.train_iters`` (``launch/slurm.sbatch`` passes 75 and requeues the job on
it). A rank that made no progress for
``train.distributed_timeout_minutes`` (plus a margin) is ended by its watchdog with status 4
(``training.watchdog``).

Output: what the command itself says (a pre-launch error, the ``--dry-run`` description, the
final non-finite error) is printed here; everything the library says during the run goes through
:mod:`logging`, set up once in :func:`main` by :func:`megatron_glm.logs.setup_logging` (rank 0's
INFO lines on stdout, warnings of every rank on stderr; ``GLM_LOG_ALL_RANKS=1`` shows every
rank's INFO lines).

From Python, :func:`run_pretraining` does what this command does after parsing its arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from megatron_glm.config import RunConfig, load_config
from megatron_glm.config_docs import fields_help
from megatron_glm.logs import all_ranks_requested, setup_logging
from megatron_glm.training.rank_discovery import find_task, launcher_local_rank

if TYPE_CHECKING:
    from megatron_glm.training.distributed import DistEnv
    from megatron_glm.training.loop import TrainResult

# Nothing above imports torch: what imports it (everything under ``training``) is imported in
# the functions, inside :func:`exit_quietly_on_ctrl_c`, so a Ctrl-C during those seconds of
# start-up is one line, not a traceback per rank.

EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3
EXIT_REQUEUE = 75
"""What ``launch/slurm.sbatch`` passes as ``--stopped-exit-status`` (sysexits' EX_TEMPFAIL:
"try again later"); any status the run does not use for an error would do."""
_ERROR_STATUSES = range(1, 5)
"""1 (an exception), 2 (launch error), 3 (non-finite), 4 (watchdog: ``EXIT_NO_PROGRESS``)."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a program ended by Ctrl-C."""
WORLD_SIZE_WITHOUT_DRY_RUN = (
    "--world-size is for --dry-run only; a launch takes its world size from the launcher"
)
QUIET_RANK_GRACE_S = 10.0
"""How long a rank other than local rank 0 waits before printing a pre-launch error itself
(:func:`report_launch_error`)."""


class _ParserWithFields(argparse.ArgumentParser):
    """``--help`` ends with every config field, its type, default and docstring.

    Generated from the config dataclasses (:func:`megatron_glm.config_docs.fields_help`), so the
    help cannot drift from the code; built only when help is printed (it reads source).
    """

    def format_help(self) -> str:
        return f"{super().format_help()}\n{fields_help(RunConfig)}"


def build_parser() -> argparse.ArgumentParser:
    parser = _ParserWithFields(
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
        help="print the plan (config, layout, parameters, data, checkpoint, DeepSpeed config) "
        "and exit; needs no process group, data or tokenizer",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="with --dry-run: plan for N processes (default: the launcher's WORLD_SIZE, else 1)",
    )
    parser.add_argument(
        "--stopped-exit-status",
        type=_stopped_status,
        default=0,
        metavar="N",
        help="exit status of a run that saved and stopped before train.train_iters (a signal, "
        "its launcher gone, train.exit_duration_mins, train.exit_interval), so that a batch "
        "script can tell it from a finished run and requeue the job (default 0, like a "
        "finished run; launch/slurm.sbatch passes 75)",
    )
    # The deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def _stopped_status(text: str) -> int:
    """``--stopped-exit-status``: 0, or a status no error uses (a batch script that requeues
    on it must never requeue a failed run)."""
    status = int(text)
    if not 0 <= status <= 255 or status in _ERROR_STATUSES:
        raise argparse.ArgumentTypeError(
            f"{status} is not 0 or a free exit status in 5..255 (1-4 mean errors)"
        )
    return status


def describe_run(cfg: RunConfig, world_size: int) -> str:
    """The plan of ``cfg`` on ``world_size`` processes (:mod:`megatron_glm.training.dry_run`)."""
    from megatron_glm.training.dry_run import describe_run as describe

    return describe(cfg, world_size)


def dry_run(args: argparse.Namespace, check: Callable[[RunConfig], None] | None = None) -> int:
    """``--dry-run``: print the plan for ``--world-size`` (else the launcher's, else 1).

    No process group starts and no launcher variable is needed. The config is checked for
    that world size; the data, tokenizer and checkpoint are reported on, not required
    (:mod:`megatron_glm.training.dry_run`). ``check``: the entry point's own config checks.
    """
    from megatron_glm.training.distributed import read_dist_env
    from megatron_glm.training.preflight import validate_for_launch

    try:
        cfg = load_config(args.config, args.overrides)
        world_size = args.world_size or read_dist_env().world_size
        validate_for_launch(cfg, world_size, check_data=False, check_resume=False)
        if check is not None:
            check(cfg)
        text = describe_run(cfg, world_size)
    except (ValueError, OSError) as exc:
        report_launch_error(exc)
        return EXIT_CONFIG_ERROR
    print(text)
    return 0


def _is_rank_zero(environ: Mapping[str, str]) -> bool:
    """RANK (else the scheduler's rank: plain srun/mpirun set no RANK) is 0, absent or
    unreadable: the one process that reports a Ctrl-C for the whole job."""
    if "RANK" in environ:
        return environ["RANK"].strip() in ("", "0")
    try:
        task = find_task(environ)
    except ValueError:
        return True
    return task is None or task.rank == 0


def _is_local_rank_zero(environ: Mapping[str, str]) -> bool:
    """LOCAL_RANK (else RANK, as :func:`read_dist_env` does; without WORLD_SIZE the scheduler's
    local rank, see :func:`launcher_local_rank`) is 0, absent or unreadable."""
    if "WORLD_SIZE" not in environ:
        return launcher_local_rank(environ) in (0, None)
    value = environ.get("LOCAL_RANK", environ.get("RANK", "0")).strip()
    return not value.isdigit() or int(value) == 0


def report_launch_error(exc: Exception, environ: Mapping[str, str] | None = None) -> None:
    """Print a pre-launch error once per node instead of once per rank.

    Every rank of a launch checks the same config and files and fails the same way. Local rank
    0 prints at once. The other ranks first wait up to :data:`QUIET_RANK_GRACE_S`: the
    launchers we support (deepspeed, torchrun, ``srun --kill-on-bad-exit``, mpirun) end the
    remaining ranks as soon as one exits non-zero, so they normally never print. One still
    alive after the grace prints as well, so an error that only some ranks meet (a variable set
    wrong on one rank, local rank 0 having passed) is never hidden; ranks started by hand
    without a launcher therefore print it late, once each.

    Once per node rather than once per job (global rank 0): a node can fail alone (a file
    missing from its local disk, its own environment), and its local rank 0 is the only
    process there that can say so; multi-node launchers show each node's output (pdsh prefixes
    it with the host), so the message appears once for every node it concerns.
    """
    env = os.environ if environ is None else environ
    if not _is_local_rank_zero(env):
        time.sleep(QUIET_RANK_GRACE_S)
    print(f"error: {exc}", file=sys.stderr, flush=True)


def run_pretraining(cfg: RunConfig, env: DistEnv | None = None) -> TrainResult:
    """Pretrain ``cfg`` from Python, as ``glm-pretrain`` does after parsing its command line.

    ``env`` defaults to the launcher's variables (:func:`read_dist_env`; none set: a world of
    one). The launch checks run first, so a bad field or a missing file raises ValueError (or
    OSError) naming it before any process group starts; a diverged run raises
    :class:`NonFiniteError`. Console output goes through :mod:`logging`: call
    :func:`megatron_glm.setup_logging` first to see it (a library does not configure logging).
    """
    from megatron_glm.training.distributed import read_dist_env
    from megatron_glm.training.preflight import validate_for_launch

    env = read_dist_env() if env is None else env
    validate_for_launch(cfg, env.world_size)
    from megatron_glm.training import session  # imports deepspeed: keep it late

    return session.run_pretraining(cfg, env)


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, train. Returns the process exit status."""
    args = build_parser().parse_intermixed_args(argv)
    return exit_quietly_on_ctrl_c(_main, args)


def exit_quietly_on_ctrl_c(
    body: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """``body(args)``, with a KeyboardInterrupt turned into one line and status 130.

    Inside the training loop Ctrl-C is a stop request (save after the step,
    ``training.signals``); it raises only before the loop (imports, process group, model
    build, checkpoint load: nothing new to save), after it, or as a second Ctrl-C
    (:class:`~megatron_glm.training.signals.AbortRequested`). Ctrl-C reaches every rank of
    the terminal, so only rank 0 (``RANK`` unset or 0) says so: once per job, not a traceback
    per rank. The status is 130; where the interrupt landed in code that C++ ran through
    ``PyRun_String`` (pybind11's ``exec``: torch, DeepSpeed), CPython marks it unhandled and
    ends the process by SIGINT after finalising instead, which a shell also shows as 130.
    """
    try:
        return body(args)
    except KeyboardInterrupt as exc:
        # Only the stop handler raises AbortRequested: if its module was never imported, this
        # is not one (importing it here would import torch while the user waits).
        signals = sys.modules.get("megatron_glm.training.signals")
        aborted = signals is not None and isinstance(exc, signals.AbortRequested)
        if _is_rank_zero(os.environ):
            what = (
                "second Ctrl-C: aborted without saving the current step"
                if aborted
                else "interrupted (Ctrl-C) outside the training steps: nothing new to save"
            )
            print(f"{what}; a rerun resumes from the last saved checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED


def without_launch(args: argparse.Namespace) -> int | None:
    """The exit status of a command line that launches nothing (``--dry-run``'s plan, or
    ``--world-size`` without it, refused), or None: launch. Shared by both entry points."""
    if args.dry_run:
        return dry_run(args)
    if args.world_size is not None:
        report_launch_error(ValueError(WORLD_SIZE_WITHOUT_DRY_RUN))
        return EXIT_CONFIG_ERROR
    return None


def _main(args: argparse.Namespace) -> int:
    if (status := without_launch(args)) is not None:
        return status
    from megatron_glm.training.distributed import read_dist_env
    from megatron_glm.training.preflight import validate_for_launch

    try:
        cfg = load_config(args.config, args.overrides)
        env = read_dist_env()
        validate_for_launch(cfg, env.world_size)
        all_ranks = all_ranks_requested()
    except (ValueError, OSError) as exc:
        report_launch_error(exc)
        return EXIT_CONFIG_ERROR
    from megatron_glm.training.session import run_pretraining  # imports deepspeed: keep it late

    return run_and_report(
        run_pretraining, cfg, env, all_ranks=all_ranks, stopped_status=args.stopped_exit_status
    )


def run_and_report(
    run: Callable[[RunConfig, DistEnv], TrainResult],
    cfg: RunConfig,
    env: DistEnv,
    *,
    all_ranks: bool,
    stopped_status: int = 0,
) -> int:
    """Run a checked config (pretraining or finetuning) with the entry points' logging set-up;
    the exit status: 0, :data:`EXIT_NONFINITE` when the run stopped on non-finite steps,
    :data:`EXIT_CONFIG_ERROR` when ranks see different checkpoint directories, or
    ``stopped_status`` when it saved and stopped before ``train.train_iters``.

    Every rank returns the same status: the stop is agreed by all ranks
    (``training.signals``), so every rank ends at the same iteration.
    """
    from megatron_glm.training.checkpoint import CheckpointDirectoryError, NonFiniteError

    with setup_logging(env.rank, all_ranks=all_ranks):
        try:
            result = run(cfg, env)
        except NonFiniteError as exc:  # every rank agreed on it (all-reduced): rank 0 says it
            if env.rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_NONFINITE
        except CheckpointDirectoryError as exc:  # all-gathered: the same on every rank
            if env.rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    return stopped_status if result.iteration < cfg.train.train_iters else 0


if __name__ == "__main__":
    sys.exit(main())
