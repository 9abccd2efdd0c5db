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

import functools
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
from megatron_glm.training.checkpoint import reshard_checkpoint, reshard_info

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
    """Runs in each launched process; rank 0 writes the results JSON after every run.

    Optional spec keys: ``poison`` (per run: rows with an inf loss weight), ``delay`` (seconds
    per batch), ``faults`` (run index -> :func:`_inject` options), ``remove`` (run index ->
    files rank 0 deletes after that run), ``reshard``, ``skip_preflight`` (exercise the
    in-group checks that pre-launch checks would otherwise pre-empt).
    """
    import cpuinfo

    from megatron_glm.config import load_config
    from megatron_glm.logs import setup_logging
    from megatron_glm.serialization import CheckpointFileError
    from megatron_glm.training.checkpoint import NonFiniteError
    from megatron_glm.training.distributed import (
        destroy_distributed,
        init_distributed,
        read_dist_env,
    )
    from megatron_glm.training.preflight import validate_for_launch
    from megatron_glm.training.session import train_in_group

    # DeepSpeed's CPU Adam (ZeRO-Offload runs) asks py-cpuinfo at every construction, 1.3 s each
    cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)
    env = read_dist_env()
    setup_logging(env.rank)  # an entry point, like pretrain.main: rank 0's lines on stdout
    configs = [load_config(None, TINY + o) for o in spec["runs"]]
    reshards = spec.get("reshard", {})  # run index -> [[src, dst, tp, pp], ...] after that run
    preflight = not spec.get("skip_preflight", False)
    for index, cfg in enumerate(configs):
        if preflight and not any(int(k) < index for k in {**reshards, **spec.get("remove", {})}):
            validate_for_launch(cfg, env.world_size, check_data=False)
    device = init_distributed(env)
    results: list[dict[str, Any]] = []
    code = 0
    try:
        for index, cfg in enumerate(configs):
            print(f"=== run {index}", flush=True)
            if preflight and any(int(k) < index for k in reshards):
                validate_for_launch(cfg, env.world_size, check_data=False)
            poison = spec.get("poison", [None] * len(configs))[index]
            faults = spec.get("faults", {}).get(str(index), {})
            delay = faults.get("delay", spec.get("delay", 0.0))

            def make(
                rank: int, dp: int, cfg: Any = cfg, poison: Any = poison, delay: float = delay
            ) -> tuple[SyntheticSource, int]:
                src = SyntheticSource(
                    cfg.train.micro_batch_size, rank, dp, poison=poison, delay=delay
                )
                return src, VOCAB

            restore = _inject(faults, env.rank, cfg, env.world_size)
            try:
                res = train_in_group(cfg, env, device, make)
                results.append(
                    {
                        "losses": {str(k): v for k, v in res.step_losses.items()},
                        "grad_norms": {str(k): v for k, v in res.step_grad_norms.items()},
                        "exit_reason": res.exit_reason,
                        "iteration": res.iteration,
                        "valid": res.valid_history,
                        "tied_diff": res.tied_weights_max_diff,
                    }
                )
            except (NonFiniteError, CheckpointFileError) as exc:
                results.append({"error": str(exc), "type": type(exc).__name__})
                code = 3
            finally:
                restore()
            _reshard(reshards.get(str(index), []), cfg, env.rank)
            _remove(spec.get("remove", {}).get(str(index), []), env.rank)
            if env.rank == 0:
                Path(spec["out"]).write_text(json.dumps(results))
    finally:
        destroy_distributed()
    return code


def _inject(faults: dict[str, Any], rank: int, cfg: Any, world: int) -> Any:
    """Fault injection for one run; returns the function that undoes it.

    ``nan_weight_at`` (step) + ``nan_weight_rank``: that rank writes a NaN into its first
    parameter just before the checkpoint of that step is saved. ``nan_grad_steps``: the
    gradients of those steps are NaN while their loss stays finite (a hook on the loss).
    ``bf16_master``: every optimizer step rounds the parameters it updates to bf16 (under bf16
    ZeRO: the fp32 master weights), the bf16 path without fp32 master weights.
    """
    import megatron_glm.training.checkpoint as ck
    import megatron_glm.training.engine as eng_mod
    from megatron_glm.training.engine import GLMPretrainModule

    save, forward = ck.save, GLMPretrainModule.forward
    at, on_rank = faults.get("nan_weight_at"), faults.get("nan_weight_rank", 0)
    if at is not None:

        def nan_save(engine: Any, save_dir: Any, state: Any) -> str:
            if state.iteration == at and rank == on_rank:
                with torch.no_grad():
                    param = next(engine.module.parameters())
                    getattr(param, "ds_tensor", param).view(-1)[0] = float("nan")
            return save(engine, save_dir, state)

        ck.save = nan_save
    bad_steps = set(faults.get("nan_grad_steps", []))
    if bad_steps:
        calls = [0]
        dp = world // (cfg.parallel.tp * cfg.parallel.pp)
        per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)

        def nan_forward(self: Any, batch: dict[str, torch.Tensor]) -> Any:
            out = forward(self, batch)
            if self.training:
                step = calls[0] // per_step + 1
                calls[0] += 1
                if step in bad_steps:
                    out.sum_loss.register_hook(lambda g: g * float("nan"))
            return out

        GLMPretrainModule.forward = nan_forward  # type: ignore[method-assign]

    build = eng_mod.build_optimizer
    if faults.get("bf16_master"):  # a wrong bf16 path: master weights kept in bf16

        def rounding_optimizer(*args: Any, **kwargs: Any) -> Any:
            optimizer = build(*args, **kwargs)
            step = optimizer.step  # torch wraps the class's step: patch the instance's

            def rounding_step(closure: Any = None) -> Any:
                out = step(closure)
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        for param in group["params"]:
                            param.copy_(param.bfloat16())
                return out

            optimizer.step = rounding_step
            return optimizer

        eng_mod.build_optimizer = rounding_optimizer

    def restore() -> None:
        ck.save = save
        GLMPretrainModule.forward = forward  # type: ignore[method-assign]
        eng_mod.build_optimizer = build

    return restore


def _remove(paths: list[str], rank: int) -> None:
    """Rank 0 deletes files between two runs of one launch; everyone waits."""
    import torch.distributed as dist

    if not paths:
        return
    if rank == 0:
        for path in paths:
            Path(path).unlink()
    dist.barrier()


def _reshard(jobs: list[list[Any]], cfg: Any, rank: int) -> None:
    """Rank 0 rewrites checkpoints for other (tp, pp) layouts; everyone waits."""
    import torch.distributed as dist

    from megatron_glm.model import tensor_parallel_layout
    from megatron_glm.training.checkpoint import reshard_checkpoint

    if not jobs:
        return
    if rank == 0:
        for src, dst, tp, pp in jobs:
            reshard_checkpoint(src, dst, tp, tensor_parallel_layout(cfg.model), pp=pp)
    dist.barrier()


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


def _wait(
    procs: list[subprocess.Popen[str]], timeout: float = 240.0, *, every_rank: bool = False
) -> tuple[list[int], str]:
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
    return codes, "".join(outputs) if every_rank else outputs[0]


def run_workers(
    nprocs: int,
    runs: list[list[str]],
    tmp: Path,
    *,
    timeout: float | None = None,
    every_rank: bool = False,
    **spec: Any,
) -> tuple[list[dict[str, Any]], str, list[int]]:
    """Train ``runs`` in turn in one launch of ``nprocs`` ranks; kill all past ``timeout`` s.

    Returns (results, rank 0's output or, with ``every_rank``, every rank's, exit codes).
    """
    out = tmp / f"result_{time.monotonic_ns()}.json"
    procs = _launch(nprocs, {"runs": runs, "out": str(out), **spec}, tmp)
    codes, log = _wait(procs, timeout=timeout or 60.0 + 40.0 * len(runs), every_rank=every_rank)
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


# ----------------------------------------------------------------------------- model parallelism

TP = [
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "model.hidden_dropout=0.0",
    "model.attention_dropout=0.0",
]
PP = [*TP, "model.num_layers=4", "train.train_iters=12"]
"""Pipeline runs: 4 layers (pp = 4 gets one block per stage at most), a 12-step schedule."""


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every tensor- and pipeline-parallel run of this file, in two launches (start-up is most
    of the cost on 2 cores): one world of 4 processes running the layouts in turn, then one
    process training the references (same global batches) and resuming resharded checkpoints.

    Returns ``{name: result}`` plus ``"dir"``, ``"log4"`` and ``"log1"``.
    """
    tmp = tmp_path_factory.mktemp("model_parallel")
    tp_resume = [*TP[:2], "parallel.tp=2", "parallel.sequence_parallel=true"]
    tp_resume += ["train.train_iters=6", "train.zero_stage=1"]  # dropout 0.1
    pp_resume = [*TP[:2], "model.num_layers=4", "parallel.pp=2", "train.zero_stage=1"]
    pp_resume += ["train.train_iters=6", "train.eval_interval=3"]  # dropout 0.1, dp 2
    sp_stop = ["train.train_iters=20", "train.exit_interval=4", f"checkpoint.save={tmp / 'sp'}"]
    save_3d = ["train.exit_interval=10", f"checkpoint.save={tmp / 'tp2_pp2'}"]
    pp4_opts = ["train.exit_interval=10", "model.activation_checkpointing=true"]

    def step11(load: str) -> list[str]:
        return ["train.exit_interval=11", f"checkpoint.load={tmp / load}"]

    four = {
        # tp 2 x dp 2 (issue 5)
        "tp2_zero1": [*TP, "parallel.tp=2", "train.train_iters=20", "train.zero_stage=1"],
        "tp2_sp_zero0": [*TP, "parallel.tp=2", "parallel.sequence_parallel=true", *sp_stop],
        "tp_straight": [*tp_resume, f"checkpoint.save={tmp / 'tp_straight'}"],
        "tp_stop": [*tp_resume, f"checkpoint.save={tmp / 'tp_stop'}", "train.exit_interval=3"],
        "tp_resume": [*tp_resume, f"checkpoint.save={tmp / 'tp_stop'}"],
        # pipelines (issue 7): 10 steps each, the 3D one saves for the reshard chain
        "pp4_zero0": [*PP, "parallel.pp=4", "train.zero_stage=0", *pp4_opts],
        "tp2_pp2_zero1": [*PP, "parallel.tp=2", "parallel.pp=2", "train.zero_stage=1", *save_3d],
        "pp2_dp2_zero1": [*PP, "parallel.pp=2", "train.zero_stage=1", "train.exit_interval=10"],
        # (tp 2, pp 2) -> (1, 1) -> (1, 4) -> (2, 1), then step 11 in two of the new layouts
        "pp4_from_1x4": [*PP, "parallel.pp=4", *step11("r1x4")],
        "tp2_from_2x1": [*PP, "parallel.tp=2", "train.zero_stage=1", *step11("r2x1")],
        "pp_straight": [*pp_resume, f"checkpoint.save={tmp / 'pp_straight'}"],
        "pp_stop": [*pp_resume, f"checkpoint.save={tmp / 'pp_stop'}", "train.exit_interval=3"],
        "pp_resume": [*pp_resume, f"checkpoint.save={tmp / 'pp_stop'}"],
    }
    chain = [
        [str(tmp / "tp2_pp2"), str(tmp / "r1x1"), 1, 1],
        [str(tmp / "r1x1"), str(tmp / "r1x4"), 1, 4],
        [str(tmp / "r1x4"), str(tmp / "r2x1"), 2, 1],
    ]
    names = list(four)
    reshard = {str(names.index("tp2_pp2_zero1")): chain}
    results4, log4, codes = run_workers(4, list(four.values()), tmp, reshard=reshard)
    assert codes == [0] * 4, log4[-4000:]
    reshard_checkpoint(tmp / "sp", tmp / "sp_tp1", 1, tensor_parallel_layout(tiny_model()))
    ref2 = [*TP, "train.train_iters=20", "train.zero_stage=0"]
    ref4 = [*PP, "train.zero_stage=0", "train.eval_interval=12"]
    one = {
        "ref2": ref2,
        "from_sp_tp1": [*ref2, "train.exit_interval=5", f"checkpoint.load={tmp / 'sp_tp1'}"],
        "ref4": ref4,
        "from_1x1": [*PP, *step11("r1x1")],
    }
    results1, log1, codes1 = run_workers(1, list(one.values()), tmp)
    assert codes1 == [0], log1[-4000:]
    out: dict[str, Any] = dict(zip([*four, *one], [*results4, *results1], strict=True))
    return {**out, "dir": tmp, "log4": log4, "log1": log1}


def tiny_model() -> Any:
    return load_config(None, TINY).model


def _max_rel(curve: dict[int, float], reference: dict[int, float]) -> float:
    return max(abs(curve[s] - reference[s]) / abs(reference[s]) for s in curve)


def test_tensor_parallel_training_equals_one_process(model_parallel: dict[str, Any]) -> None:
    """dp 2 x tp 2 through the CLI's session and loop (issue 5): ZeRO-1 for 20 steps, and ZeRO-0
    with sequence parallelism (the loop's own TP-aware grad norm) for 4, equal one process
    training the same global batches, loss and gradient norm."""
    r = model_parallel
    assert "parallel layout: world 4 = tp 2 x pp 1 x dp 2 | rank 0 -> tp 0, pp 0, dp 0" in r["log4"]
    reference, ref_norms = _losses(r["ref2"]), r["ref2"]["grad_norms"]
    assert reference[20] < reference[1] - 0.05  # it learns
    for name, steps in (("tp2_zero1", 20), ("tp2_sp_zero0", 4)):
        curve = _losses(r[name])
        assert sorted(curve) == list(range(1, steps + 1))
        assert _max_rel(curve, reference) < 1e-4, (name, curve, reference)
        for step, norm in r[name]["grad_norms"].items():  # DeepSpeed's (ZeRO-1), ours (ZeRO-0)
            assert norm == pytest.approx(ref_norms[step], rel=1e-4), (name, step, norm)


def test_tensor_parallel_resume_is_bitwise_and_reshards_to_tp1(
    model_parallel: dict[str, Any],
) -> None:
    """tp 2 + SP, dropout 0.1: 3 steps + stop + resume 3 equals 6 straight, bitwise (the
    TP-private dropout stream is checkpointed per rank). The tp 2 checkpoint of step 4,
    resharded to tp 1, resumes on one process (ZeRO-0 optimizer state carried over) with
    step 5's loss."""
    r, tmp = model_parallel, model_parallel["dir"]
    straight, stopped, resumed = (_losses(r[k]) for k in ("tp_straight", "tp_stop", "tp_resume"))
    assert r["tp_stop"]["exit_reason"] == "exit_interval" and sorted(stopped) == [1, 2, 3]
    assert sorted(resumed) == [4, 5, 6]
    assert {**stopped, **resumed} == straight
    assert _entries(tmp / "tp_stop" / "global_step3") == [
        "layout.json",
        *(f"mp_rank_0{t}_model_states.pt" for t in range(2)),
        *(f"rng_rank0000{r}.pt" for r in range(4)),
        *(f"zero_pp_rank_{d}_mp_rank_0{t}_optim_states.pt" for d in range(2) for t in range(2)),
    ]
    resharded = f"{tmp / 'sp_tp1'}/global_step4 was resharded: optimizer state from optimizer_state"
    assert resharded in r["log1"]
    # Step 5's loss is computed before its update: it only sees the weights after step 4.
    assert list(_losses(r["from_sp_tp1"])) == [5]
    assert _losses(r["from_sp_tp1"])[5] == pytest.approx(_losses(r["ref2"])[5], rel=1e-5)


def test_pipeline_layouts_equal_one_process(model_parallel: dict[str, Any]) -> None:
    """pp 4 (ZeRO-0: our clipping and norm; activation checkpointing in every block),
    tp 2 x pp 2 and pp 2 x dp 2 (ZeRO-1) for 10 steps, dropout off, fp32: every step's loss and
    grad norm equal one process training the same global batches, and the tied copies stay
    equal."""
    r = model_parallel
    reference, ref_norms = _losses(r["ref4"]), r["ref4"]["grad_norms"]
    assert reference[10] < reference[1] - 0.01  # it learns (deterministic rows and seeds)
    for name in ("pp4_zero0", "tp2_pp2_zero1", "pp2_dp2_zero1"):
        curve = _losses(r[name])
        assert sorted(curve) == list(range(1, 11)), name
        assert _max_rel(curve, reference) < 1e-4, (name, curve, reference)
        for step, norm in r[name]["grad_norms"].items():
            assert norm == pytest.approx(ref_norms[step], rel=1e-4), (name, step, norm)
        assert r[name]["tied_diff"] == 0.0  # embedding (first stage) == head (last stage)
    log = r["log4"]
    assert "parallel layout: world 4 = tp 1 x pp 4 x dp 1 | rank 0 -> tp 0, pp 0, dp 0" in log
    assert "parallel layout: world 4 = tp 2 x pp 2 x dp 1 | rank 0 -> tp 0, pp 0, dp 0" in log
    assert "parallel layout: world 4 = tp 1 x pp 2 x dp 2 | rank 0 -> tp 0, pp 0, dp 0" in log
    # 4 micro-batches per step: bubble (pp - 1) / (m + pp - 1)
    assert "| tp 1 pp 4 dp 1, bubble 42.9%" in log and "| tp 2 pp 2 dp 1, bubble 20.0%" in log
    assert "tied embedding / output head copies: max |difference| 0" in log


def test_pipeline_resume_is_bitwise_with_validation_per_objective(
    model_parallel: dict[str, Any],
) -> None:
    """pp 2 x dp 2, ZeRO-1, dropout 0.1, validation every 3 steps through the pipeline: 3 steps +
    stop + resume 3 equals 6 straight bitwise, validations included; the step-0 validation (init
    weights, dropout off) equals one process's."""
    r, tmp = model_parallel, model_parallel["dir"]
    straight, stopped, resumed = (_losses(r[k]) for k in ("pp_straight", "pp_stop", "pp_resume"))
    assert sorted(stopped) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    assert {**stopped, **resumed} == straight
    assert r["pp_resume"]["valid"] == r["pp_straight"]["valid"]
    assert [i for i, _ in r["pp_straight"]["valid"]] == [0, 3, 6]
    assert r["pp_straight"]["valid"][0][1] == pytest.approx(r["ref4"]["valid"][0][1], rel=1e-6)
    assert _entries(tmp / "pp_stop" / "global_step3") == [
        *(f"layer_0{i}-model_00-model_states.pt" for i in range(6)),
        "layout.json",
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
        *(f"rng_rank0000{r}.pt" for r in range(4)),
        *(f"zero_pp_rank_{d}_mp_rank_0{m}_optim_states.pt" for d in range(2) for m in range(2)),
    ]
    log = r["log4"]
    assert "| tp 1 pp 2 dp 2, bubble 33.3%" in log  # 2 micro-batches per step
    line = next(x for x in log.splitlines() if x.startswith("validation at step 3 |"))
    assert all(f"{k} " in line and f"{k} n/a" not in line for k in ("span", "sentence", "document"))


def test_reshard_chain_keeps_the_model(model_parallel: dict[str, Any]) -> None:
    """(tp 2, pp 2) after 10 steps -> (1, 1) -> (1, 4) -> (2, 1): step 11 run from the (1, 1),
    (1, 4) and (2, 1) checkpoints (1 process, pp 4, tp 2 x dp 2) has the loss of one process
    that trained 11 steps straight; the files are the layouts asked for."""
    r, tmp = model_parallel, model_parallel["dir"]
    reference = _losses(r["ref4"])[11]
    for name in ("from_1x1", "pp4_from_1x4", "tp2_from_2x1"):
        assert list(_losses(r[name])) == [11], name
        assert _losses(r[name])[11] == pytest.approx(reference, rel=1e-5), name
    r14 = tmp / "r1x4" / "global_step10"
    assert _entries(r14) == [
        *(f"layer_0{i}-model_00-model_states.pt" for i in range(6)),
        *(f"mp_rank_0{m}_model_states.pt" for m in range(4)),
        "optimizer_state.pt",  # the optimizer state is carried along the chain (issue 12)
    ]
    assert reshard_info(r14) == {
        "from_tp": 1,
        "to_tp": 1,
        "optimizer_state": "kept",
        "from_pp": 1,
        "to_pp": 4,
    }
    assert _entries(tmp / "r2x1" / "global_step10") == [
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
        "optimizer_state.pt",
    ]


if __name__ == "__main__":
    sys.exit(_worker(json.loads(Path(sys.argv[1]).read_text())))
