"""The entry points' exit status after a run: ``--stopped-exit-status`` tells a run that saved and
stopped early from a finished one (``launch/slurm.sbatch`` requeues on it; tests/cluster runs it
on SLURM)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from megatron_glm.config import RunConfig, TrainConfig
from megatron_glm.pretrain import EXIT_NONFINITE, EXIT_REQUEUE, build_parser, run_and_report
from megatron_glm.training.checkpoint import NonFiniteError
from megatron_glm.training.distributed import DistEnv
from megatron_glm.training.loop import TrainResult

ENV = DistEnv(rank=0, world_size=1, local_rank=0, master_addr=None, master_port=None)
CFG = dataclasses.replace(RunConfig(), train=TrainConfig(train_iters=10))


def _ends_at(iteration: int, reason: str) -> Callable[[RunConfig, DistEnv], TrainResult]:
    def run(cfg: RunConfig, env: DistEnv) -> TrainResult:
        return TrainResult(iteration=iteration, consumed_samples=4 * iteration, exit_reason=reason)

    return run


@pytest.mark.parametrize(
    ("iteration", "reason", "stopped_status", "expected"),
    [
        (7, "SIGUSR1", EXIT_REQUEUE, EXIT_REQUEUE),
        (7, "exit_interval", EXIT_REQUEUE, EXIT_REQUEUE),
        (7, "SIGTERM", 0, 0),  # the default: a stop exits 0, as it always did
        (10, "completed", EXIT_REQUEUE, 0),
        (10, "SIGUSR1", EXIT_REQUEUE, 0),  # a signal at the last step: finished, no requeue
    ],
)
def test_stopped_status_only_for_a_run_stopped_before_train_iters(
    iteration: int, reason: str, stopped_status: int, expected: int
) -> None:
    run = _ends_at(iteration, reason)
    status = run_and_report(run, CFG, ENV, all_ranks=False, stopped_status=stopped_status)
    assert status == expected


def test_nonfinite_keeps_its_status_whatever_the_stopped_status() -> None:
    def run(cfg: RunConfig, env: DistEnv) -> TrainResult:
        raise NonFiniteError("stopping at step 3: 3 consecutive steps with a non-finite loss")

    assert run_and_report(run, CFG, ENV, all_ranks=False, stopped_status=75) == EXIT_NONFINITE


@pytest.mark.parametrize("value", ["3", "256", "-1"])
def test_stopped_status_that_means_an_error_is_refused(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--config", "x.yaml", "--stopped-exit-status", value])
    assert exc.value.code == 2
    assert (
        f"argument --stopped-exit-status: {value} is not 0 or a free exit status in 5..255 "
        "(1-4 mean errors)" in capsys.readouterr().err
    )
