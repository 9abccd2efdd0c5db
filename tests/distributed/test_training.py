"""Multi-process training on CPU (gloo): ZeRO equivalence, exact resume, SIGTERM, non-finite loss.

Each test launches this file as a worker script, once per rank, with the launcher variables a
``deepspeed``/``torchrun`` launch would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so the env-driven start-up of ``megatron_glm.training.distributed`` is what runs.
The workers train a tiny GLM on a *synthetic* batch source: rows that satisfy the batch contract,
each a pure function of its global sample index, sharded like the real sampler (global
micro-batch of ``micro * dp`` consecutive rows, rank r takes the r-th slice). That keeps these
tests independent of the data pipeline while exercising exactly the loop the CLI runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_glm.config import load_config
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.parallel.reshard import reshard_checkpoint

VOCAB, SEQ = 256, 32
TINY = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    f"model.vocab_size={VOCAB}",
    "model.max_position_embeddings=64",
    f"data.seq_length={SEQ}",
    "optimizer.lr=0.003",
    "optimizer.warmup_iters=2",
    "logging.log_interval=1",
    "logging.progress_bar=false",
]

# ----------------------------------------------------------------------------- synthetic data


def synthetic_row(index: int, nan: bool = False) -> dict[str, torch.Tensor]:
    """One row of the batch contract, a pure function of ``index`` (loss on [sep, valid_len))."""
    g = torch.Generator().manual_seed(1_000_003 * 7 + index)
    sep = int(torch.randint(SEQ // 4, SEQ // 2, (1,), generator=g))
    valid = int(torch.randint(sep + 2, SEQ + 1, (1,), generator=g))
    positions = torch.zeros(2, SEQ, dtype=torch.long)
    positions[0] = torch.arange(SEQ).clamp(max=sep - 1)
    positions[1, sep:] = torch.arange(1, SEQ - sep + 1)
    tokens = torch.randint(0, VOCAB, (SEQ,), generator=g)
    mask = torch.zeros(SEQ)
    mask[sep:valid] = math.inf if nan else 1.0
    return {
        "tokens": tokens,
        "targets": (tokens * 7 + 3) % VOCAB,  # learnable: a fixed map of the input token
        "loss_mask": mask,
        "position_ids": positions,
        "sep": torch.tensor(sep),
        "valid_len": torch.tensor(valid),
        "objective": torch.tensor(index % 3),
    }


class SyntheticSource:
    """Batch source over :func:`synthetic_row`; rows in ``poison`` (lo, hi) get an inf weight."""

    def __init__(
        self, micro: int, dp_rank: int, dp_size: int, *, poison: list[int] | None, delay: float
    ):
        self.micro, self.rank, self.dp = micro, dp_rank, dp_size
        self.poison, self.delay = poison, delay

    def _batch(self, first: int) -> dict[str, torch.Tensor]:
        rows = [
            synthetic_row(i, nan=self.poison is not None and self.poison[0] <= i < self.poison[1])
            for i in range(first, first + self.micro)
        ]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def train_batches(self, consumed: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self.delay:
                time.sleep(self.delay)
            yield self._batch(consumed + self.rank * self.micro)
            consumed += self.micro * self.dp

    def valid_batches(self) -> list[dict[str, torch.Tensor]]:
        base = 10**6
        steps = 4 // self.dp  # 4 global micro-batches, whatever the DP size
        return [
            self._batch(base + k * self.micro * self.dp + self.rank * self.micro)
            for k in range(steps)
        ]


# ----------------------------------------------------------------------------- worker


def _worker(spec: dict[str, Any]) -> int:
    """Runs in each launched process; rank 0 writes the results JSON."""
    from megatron_glm.config import load_config
    from megatron_glm.training.distributed import (
        destroy_distributed,
        init_distributed,
        read_dist_env,
    )
    from megatron_glm.training.loop import NonFiniteLossError
    from megatron_glm.training.preflight import validate_for_launch
    from megatron_glm.training.session import train_in_group

    env = read_dist_env()
    configs = [load_config(None, TINY + o) for o in spec["runs"]]
    for cfg in configs:
        validate_for_launch(cfg, env.world_size, check_data=False)
    device = init_distributed(env)
    results: list[dict[str, Any]] = []
    code = 0
    try:
        for index, cfg in enumerate(configs):
            poison = spec.get("poison", [None] * len(configs))[index]

            def make(
                rank: int, dp: int, cfg: Any = cfg, poison: Any = poison
            ) -> tuple[SyntheticSource, int]:
                src = SyntheticSource(
                    cfg.train.micro_batch_size,
                    rank,
                    dp,
                    poison=poison,
                    delay=spec.get("delay", 0.0),
                )
                return src, VOCAB

            try:
                res = train_in_group(cfg, env, device, make)
                results.append(
                    {
                        "losses": {str(k): v for k, v in res.step_losses.items()},
                        "grad_norms": {str(k): v for k, v in res.step_grad_norms.items()},
                        "exit_reason": res.exit_reason,
                        "iteration": res.iteration,
                        "valid": res.valid_history,
                    }
                )
            except NonFiniteLossError as exc:
                results.append({"error": str(exc)})
                code = 3
    finally:
        destroy_distributed()
    if env.rank == 0:
        Path(spec["out"]).write_text(json.dumps(results))
    return code


# ----------------------------------------------------------------------------- launching


def _launch(nprocs: int, spec: dict[str, Any], tmp: Path) -> list[subprocess.Popen[str]]:
    from megatron_glm.training.distributed import free_port

    spec_file = tmp / f"spec_{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(spec_file)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _wait(procs: list[subprocess.Popen[str]], timeout: float = 240.0) -> tuple[list[int], str]:
    outputs, codes = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
        codes.append(p.returncode)
    return codes, outputs[0]


def run_workers(
    nprocs: int, runs: list[list[str]], tmp: Path, **spec: Any
) -> tuple[list[dict[str, Any]], str, list[int]]:
    out = tmp / f"result_{time.monotonic_ns()}.json"
    codes, log = _wait(_launch(nprocs, {"runs": runs, "out": str(out), **spec}, tmp))
    assert out.is_file(), f"no results (exit codes {codes}); rank 0 output:\n{log[-4000:]}"
    return json.loads(out.read_text()), log, codes


def _losses(result: dict[str, Any]) -> dict[int, float]:
    return {int(k): v for k, v in result["losses"].items()}


pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("training")]

# ----------------------------------------------------------------------------- tests


def test_zero_stages_and_world_sizes_give_one_loss_curve(tmp_path: Path) -> None:
    """ZeRO 0-3 on 2 ranks (grad accumulation 2) and 1 rank (accumulation 4): same fp32 curve."""
    common = [
        "train.train_iters=10",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.eval_interval=10",
        "model.hidden_dropout=0.0",
        "model.attention_dropout=0.0",
    ]
    runs = [[*common, f"train.zero_stage={z}"] for z in range(4)]
    two, log, codes = run_workers(2, runs, tmp_path)
    assert codes == [0, 0], log[-4000:]
    one, log1, codes1 = run_workers(1, [runs[0]], tmp_path)
    assert codes1 == [0], log1[-4000:]
    reference = _losses(one[0])
    assert sorted(reference) == list(range(1, 11))
    assert reference[10] < reference[1] - 0.05  # it learns (lr 3e-3 on fixed synthetic rows)
    for stage, result in enumerate(two):
        curve = _losses(result)
        assert sorted(curve) == list(range(1, 11)), stage
        for step, loss in reference.items():
            assert abs(curve[step] - loss) <= 1e-5, (stage, step, curve[step], loss)
    # validation numbers are all-reduced over DP the same way
    assert two[0]["valid"][-1][1] == pytest.approx(one[0]["valid"][-1][1], abs=1e-5)


RESUME = [
    "train.train_iters=20",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.zero_stage=1",
    "train.eval_interval=5",
    "checkpoint.save_interval=1000",
]


def _entries(directory: Path) -> list[str]:
    """Checkpoint directory listing without DeepSpeed's copied zero_to_*.py recovery scripts."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("zero_to_"))


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, float], Path, dict]:
    """One 2-rank launch (ZeRO-1, dropout 0.1, accumulation 2) running, in turn, 20 straight
    steps and then the same run with a planned stop (``exit_interval``) after step 10.

    Returns the straight losses, the stopped run's checkpoint directory and its result.
    """
    tmp = tmp_path_factory.mktemp("resume")
    runs = [
        [*RESUME, f"checkpoint.save={tmp / 'straight'}"],
        [*RESUME, f"checkpoint.save={tmp / 'stopped'}", "train.exit_interval=10"],
    ]
    res, log, codes = run_workers(2, runs, tmp)
    assert codes == [0, 0], log[-4000:]
    assert res[0]["exit_reason"] == "completed"
    return _losses(res[0]), tmp / "stopped", res[1]


def test_exact_resume_is_bitwise(
    tmp_path: Path, first_runs: tuple[dict[int, float], Path, dict]
) -> None:
    """10 steps, planned stop (checkpoint), resume in fresh processes for 10 more: every loss
    equals the uninterrupted run's, bitwise."""
    straight, ckpt_dir, first = first_runs
    assert first["exit_reason"] == "exit_interval" and first["iteration"] == 10
    assert (ckpt_dir / "latest").read_text() == "global_step10"
    assert _entries(ckpt_dir) == ["global_step10", "latest"]
    assert _entries(ckpt_dir / "global_step10") == [
        "layout.json",
        "mp_rank_00_model_states.pt",
        "rng_rank00000.pt",
        "rng_rank00001.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    resume = [*RESUME, f"checkpoint.save={ckpt_dir}"]
    (second, again), log, codes = run_workers(2, [resume, resume], tmp_path)
    assert codes == [0, 0], log[-4000:]
    # a second resume finds the finished run: no steps, no new checkpoint, same history
    assert again["iteration"] == 20 and again["losses"] == {}
    assert again["valid"] == second["valid"]
    assert f"resumed from {ckpt_dir} at step 10 (80 samples consumed)" in log
    before, after = _losses(first), _losses(second)
    assert sorted(before) == list(range(1, 11)) and sorted(after) == list(range(11, 21))
    for step in range(1, 21):
        got = before[step] if step <= 10 else after[step]
        assert got == straight[step], (step, got, straight[step])  # bitwise
    # the validation history carries over the resume: steps 0, 5, 10 (saved) then 15, 20
    assert [i for i, _ in second["valid"]] == [0, 5, 10, 15, 20]
    assert (ckpt_dir / "latest").read_text() == "global_step20"
    assert _entries(ckpt_dir) == ["global_step10", "global_step20", "latest"]


def test_sigterm_saves_exits_zero_and_resumes(
    tmp_path: Path, first_runs: tuple[dict[int, float], Path, dict]
) -> None:
    """SIGTERM to one rank only: all ranks stop after the same step, save, exit 0; resume."""
    straight_run = first_runs[0]
    ckpt_dir = tmp_path / "ckpt"
    spec_runs = [[*RESUME, f"checkpoint.save={ckpt_dir}"]]
    out = tmp_path / "sigterm.json"
    procs = _launch(2, {"runs": spec_runs, "out": str(out), "delay": 0.15}, tmp_path)
    assert procs[0].stdout is not None
    seen: list[str] = []
    for line in procs[0].stdout:  # rank 0 logs every step
        seen.append(line)
        if line.startswith("step 3/20"):
            procs[1].send_signal(signal.SIGTERM)
            break
    codes, rest = _wait(procs)
    log = "".join(seen) + rest
    assert codes == [0, 0], log[-4000:]
    result = json.loads(out.read_text())[0]
    stopped = result["iteration"]
    assert result["exit_reason"] in ("SIGTERM", "signal on another rank")
    assert 3 <= stopped < 20, log[-4000:]
    assert f"stopping after step {stopped}" in log
    assert (ckpt_dir / "latest").read_text() == f"global_step{stopped}"
    resumed, log2, codes2 = run_workers(2, spec_runs, tmp_path)
    assert codes2 == [0, 0], log2[-4000:]
    after = _losses(resumed[0])
    assert sorted(after) == list(range(stopped + 1, 21))
    assert all(after[s] == straight_run[s] for s in after), "resume after SIGTERM is not exact"


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path: Path, zero_stage: int) -> None:
    """Step k reads rows 2(k-1), 2k-1. One poisoned step (4) is skipped and training goes on
    with finite losses (the update was not applied, so the weights stayed finite). Poison from
    step 4 on: the run stops at step 5 naming it, and the periodic checkpoint of step 4 is not
    written: step 2's stays the latest."""
    base = [
        "train.train_iters=6",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        "train.max_nonfinite_steps=2",
        f"train.zero_stage={zero_stage}",
        "checkpoint.save_interval=2",
    ]
    runs = [
        [*base, f"checkpoint.save={tmp_path / 'once'}"],
        [*base, f"checkpoint.save={tmp_path / 'stop'}"],
    ]
    (once, stop), log, codes = run_workers(1, runs, tmp_path, poison=[[6, 8], [6, 10**9]])
    assert codes == [3], log[-4000:]  # the second run's error
    losses = _losses(once)
    assert "step 4: non-finite loss nan, update skipped" in log
    assert not math.isfinite(losses[4])
    assert all(math.isfinite(losses[k]) for k in (1, 2, 3, 5, 6)), losses
    assert (tmp_path / "once" / "latest").read_text() == "global_step6"

    assert stop["error"].startswith("stopping at step 5: 2 consecutive steps with a non-finite")
    assert (tmp_path / "stop" / "latest").read_text() == "global_step2"
    assert _entries(tmp_path / "stop") == ["global_step2", "latest"]


TP = [
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "model.hidden_dropout=0.0",
    "model.attention_dropout=0.0",
]


def test_tensor_parallel_training_equals_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    """dp=2 x tp=2 on 4 processes through the CLI's session and loop (issue 5).

    One 4-process launch runs, in turn: (a) ZeRO-1, 20 steps, dropout off; (b) ZeRO-0 with
    sequence parallelism, stopped after 4 steps (the loop's own TP-aware grad norm), whose
    checkpoint is resharded to tp = 1 and resumed on one process; (c) ZeRO-1 + SP with
    dropout 0.1, 6 straight steps; (d) the same stopped after 3 and (e) resumed. (a) and (b) must
    equal one process training the same global batches, loss and gradient norm; (d)+(e) must
    equal (c) bitwise (the TP-private dropout stream is checkpointed per rank).
    """
    resume = ["train.train_iters=6", "train.zero_stage=1", "parallel.sequence_parallel=true"]
    resume += ["train.micro_batch_size=1", "train.global_batch_size=4"]
    sp_stop = [
        "train.train_iters=20",
        "train.exit_interval=4",
        f"checkpoint.save={tmp_path / 'sp'}",
    ]
    runs = [
        [*TP, "parallel.tp=2", "train.train_iters=20", "train.zero_stage=1"],
        [*TP, "parallel.tp=2", "parallel.sequence_parallel=true", *sp_stop],
        [*resume, "parallel.tp=2", f"checkpoint.save={tmp_path / 'straight'}"],
        [*resume, "parallel.tp=2", f"checkpoint.save={tmp_path / 'stop'}", "train.exit_interval=3"],
        [*resume, "parallel.tp=2", f"checkpoint.save={tmp_path / 'stop'}"],
    ]
    four, log, codes = run_workers(4, runs, tmp_path)
    assert codes == [0] * 4, log[-4000:]
    assert "parallel layout: world 4 = tp 2 x pp 1 x dp 2 | rank 0 -> tp 0, pp 0, dp 0" in log
    # (b)'s tp = 2 checkpoint resharded to tp = 1 resumes on one process (optimizer restarted).
    layout = tensor_parallel_layout(load_config(None, TINY).model)
    reshard_checkpoint(tmp_path / "sp", tmp_path / "sp_tp1", 1, layout)
    ref_run = [*TP, "train.train_iters=20", "train.zero_stage=0"]
    from_tp2 = [*ref_run, "train.exit_interval=5", f"checkpoint.load={tmp_path / 'sp_tp1'}"]
    (one, resharded), log1, codes1 = run_workers(1, [ref_run, from_tp2], tmp_path)
    assert codes1 == [0], log1[-4000:]
    reference, ref_norms = _losses(one), one["grad_norms"]
    assert f"{tmp_path / 'sp_tp1'}/global_step4 was resharded: optimizer state restarts" in log1
    # Step 5's loss is computed before its update: it only sees the weights after step 4.
    assert list(_losses(resharded)) == [5]
    assert _losses(resharded)[5] == pytest.approx(reference[5], rel=1e-5)
    assert reference[20] < reference[1] - 0.05  # it learns
    for run, steps in ((four[0], 20), (four[1], 4)):
        curve = _losses(run)
        assert sorted(curve) == list(range(1, steps + 1))
        worst = max(abs(curve[s] - reference[s]) / reference[s] for s in curve)
        assert worst < 1e-4, (worst, curve, reference)
        for step, norm in run["grad_norms"].items():  # DeepSpeed's (ZeRO-1) and ours (ZeRO-0)
            assert norm == pytest.approx(ref_norms[step], rel=1e-4), (step, norm)
    straight, stopped, resumed = (_losses(r) for r in four[2:])
    assert four[3]["exit_reason"] == "exit_interval" and sorted(stopped) == [1, 2, 3]
    assert sorted(resumed) == [4, 5, 6]
    assert {**stopped, **resumed} == straight  # bitwise, dropout on
    assert _entries(tmp_path / "stop" / "global_step3") == [
        "layout.json",
        *(f"mp_rank_0{t}_model_states.pt" for t in range(2)),
        *(f"rng_rank0000{r}.pt" for r in range(4)),
        *(f"zero_pp_rank_{d}_mp_rank_0{t}_optim_states.pt" for d in range(2) for t in range(2)),
    ]


if __name__ == "__main__":
    sys.exit(_worker(json.loads(Path(sys.argv[1]).read_text())))
