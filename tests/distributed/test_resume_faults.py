"""Faults during training (issue 11): kill -9 resume, non-finite weights and gradients, RNG files.

Every layout the config accepts is killed with SIGKILL mid-run (every rank at once, often while
a checkpoint is being written: the runs save after every step) and restarted; the restarted run
must resume from the last *published* checkpoint and reproduce the uninterrupted run bitwise:
every loss, and every tensor of the final checkpoint (weights, optimizer state, RNG states).

Launches are chained to pay the start-up cost (~5 s on 2 cores) as few times as possible: one
launch runs every uninterrupted reference; then each launch resumes the previous layout's killed
run and ends with the next layout's run, killed.

The workers are ``test_training.py``'s (synthetic batch source, launcher variables set per rank).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_training import _launch, _losses, run_workers

from megatron_glm.compat.deepspeed import load_deepspeed_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("faults")]

STEPS = 6
BASE = [
    f"train.train_iters={STEPS}",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "checkpoint.save_interval=1",  # a save after every step: kills often land inside one
]
LAYOUTS: dict[str, list[str]] = {
    "bf16_zero1": ["train.zero_stage=1", "train.precision=bf16"],
    "zero0": ["train.zero_stage=0"],
    "zero1": ["train.zero_stage=1"],
    "zero2": ["train.zero_stage=2"],
    "zero3": ["train.zero_stage=3"],
    "pp2_uniform": ["parallel.pp=2", "train.zero_stage=1", "parallel.partition_method=uniform"],
    "pp2_parameters": ["parallel.pp=2", "train.zero_stage=1"],
}
"""Two-process layouts (dropout 0.1 everywhere: the RNG streams must resume exactly too)."""
LAYOUTS_4 = {"tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "train.zero_stage=1"]}
KILL_AFTER = 3
"""Rank 0 has logged this step when every rank is SIGKILLed."""


def _cfg(layout: list[str], save: Path, **extra: str) -> list[str]:
    return [*BASE, *layout, f"checkpoint.save={save}", *(f"{k}={v}" for k, v in extra.items())]


def _launch_and_kill(
    nprocs: int, runs: list[list[str]], tmp: Path, *, killed: int, slow: int
) -> list[dict[str, Any]]:
    """Launch ``runs``; once run ``killed`` has logged step :data:`KILL_AFTER`, SIGKILL every
    rank. Run ``slow`` reads each batch with a delay so the kill lands mid-run."""
    out = tmp / f"result_{time.monotonic_ns()}.json"
    spec = {"runs": runs, "out": str(out), "faults": {str(slow): {"delay": 0.1}}}
    procs = _launch(nprocs, spec, tmp)
    assert procs[0].stdout is not None
    log, current = [], -1
    deadline = time.monotonic() + 60.0 + 25.0 * len(runs)
    for line in procs[0].stdout:
        log.append(line)
        if line.startswith("=== run "):
            current = int(line.split()[2])
        if current == killed and line.startswith(f"step {KILL_AFTER}/"):
            break
        assert time.monotonic() < deadline, "".join(log)[-4000:]
    else:
        pytest.fail("launch ended before the kill:\n" + "".join(log)[-4000:])
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    return json.loads(out.read_text()) if out.is_file() else []


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a loaded checkpoint file except the config snapshot (it names the dir)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key != "config":
                yield from _tensors(value, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}[{i}]")
    elif hasattr(obj, "__dict__") and not isinstance(obj, torch.Tensor):
        yield from _tensors(vars(obj), f"{path}.{type(obj).__name__}")  # DeepSpeed's LossScaler
    else:
        yield path, obj


def assert_same_checkpoint(a: Path, b: Path) -> int:
    """Both tag directories hold the same files with bitwise-equal contents (returns the number
    of tensors compared). Every file is read with the restricted loader: DeepSpeed's allow-list
    must cover what this DeepSpeed version writes."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()), (a, b)
    compared = 0
    for name in names:
        if name.endswith(".json"):
            assert (a / name).read_text() == (b / name).read_text(), name
            continue
        left = dict(_tensors(load_deepspeed_file(str(a / name))))
        right = dict(_tensors(load_deepspeed_file(str(b / name))))
        assert left.keys() == right.keys(), name
        for key, value in left.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, right[key]), (name, key)
                compared += 1
            else:
                assert value == right[key] or value != value, (name, key, value, right[key])
    return compared


@pytest.fixture(scope="module")
def kill_chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Straight, killed and resumed runs of every layout (see the module docstring).

    bf16 comes first in every launch that runs it: on CPU its matmuls are bitwise reproducible
    from a fresh process, not after other runs in the same process (oneDNN picks kernels by the
    state of the allocator), so the straight, killed and resumed bf16 runs each start a process.
    """
    tmp = tmp_path_factory.mktemp("kill9")
    out: dict[str, Any] = {"dir": tmp}
    for nprocs, layouts in ((2, LAYOUTS), (4, LAYOUTS_4)):
        names = list(layouts)
        straight = [_cfg(layouts[n], tmp / f"{n}_straight") for n in names]
        done, log, codes = run_workers(nprocs, straight, tmp)
        assert codes == [0] * nprocs, log[-4000:]
        out.update({f"{n}/straight": r for n, r in zip(names, done, strict=True)})
        previous: str | None = None
        for name in [*names, None]:
            runs = [] if previous is None else [_cfg(layouts[previous], tmp / previous)]
            if name is None:
                done, log, codes = run_workers(nprocs, runs, tmp)
                assert codes == [0] * nprocs, log[-4000:]
            else:
                runs.append(_cfg(layouts[name], tmp / name))
                killed = len(runs) - 1
                done = _launch_and_kill(nprocs, runs, tmp, killed=killed, slow=killed)
                out[f"{name}/latest_after_kill"] = (tmp / name / "latest").read_text()
            if previous is not None:
                assert done, f"{previous}: the resumed run did not finish"
                out[f"{previous}/resumed"] = done[0]
            previous = name
    return out


@pytest.mark.parametrize("layout", [*LAYOUTS, *LAYOUTS_4])
def test_kill9_resume_is_bitwise(kill_chain: dict[str, Any], layout: str) -> None:
    """SIGKILL after step 3 of 6 (saving every step), restart: the run resumes from the last
    published checkpoint and its losses and final checkpoint equal the uninterrupted run's."""
    tmp = kill_chain["dir"]
    straight = _losses(kill_chain[f"{layout}/straight"])
    resumed = _losses(kill_chain[f"{layout}/resumed"])
    assert sorted(straight) == list(range(1, STEPS + 1))
    saved = int(kill_chain[f"{layout}/latest_after_kill"].removeprefix("global_step"))
    assert KILL_AFTER - 1 <= saved < STEPS, saved
    assert sorted(resumed) == list(range(saved + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == straight[step], (layout, step, loss, straight[step])  # bitwise
    tag = f"global_step{STEPS}"
    compared = assert_same_checkpoint(tmp / f"{layout}_straight" / tag, tmp / layout / tag)
    assert compared > 10
    print(
        f"{layout}: SIGKILL after step {KILL_AFTER}, resumed from step {saved}: "
        f"{len(resumed)} losses and {compared} checkpoint tensors bitwise equal"
    )


# ----------------------------------------------------------------------------- other faults


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-rank launch: NaN weights before a save, NaN gradients with a finite loss (ZeRO-0:
    our skip; ZeRO-1: DeepSpeed's), and a resume whose rank 1 lost its RNG file, refused and
    then allowed. Pre-launch checks are off so the in-group checks are what runs."""
    tmp = tmp_path_factory.mktemp("faults")
    base = ["train.train_iters=6", "train.micro_batch_size=2", "train.global_batch_size=4"]
    base += ["checkpoint.save_interval=2", "train.max_nonfinite_steps=2"]
    rng_dir = tmp / "rng"
    runs = {
        "nan_weight": [*base, "train.zero_stage=1", f"checkpoint.save={tmp / 'nan_weight'}"],
        "grad_once_zero0": [*base, "train.zero_stage=0", f"checkpoint.save={tmp / 'g0'}"],
        "grad_once_zero1": [*base, "train.zero_stage=1", f"checkpoint.save={tmp / 'g1'}"],
        "grad_stop_zero1": [*base, "train.zero_stage=1", f"checkpoint.save={tmp / 'gs'}"],
        "rng_save": [*base, "train.exit_interval=2", f"checkpoint.save={rng_dir}"],
        "rng_refused": [*base, f"checkpoint.save={rng_dir}"],
        "rng_allowed": [*base, f"checkpoint.save={rng_dir}", "checkpoint.allow_missing_rng=true"],
    }
    names = list(runs)
    faults = {
        str(names.index("nan_weight")): {"nan_weight_at": 4, "nan_weight_rank": 1},
        str(names.index("grad_once_zero0")): {"nan_grad_steps": [3]},
        str(names.index("grad_once_zero1")): {"nan_grad_steps": [3]},
        str(names.index("grad_stop_zero1")): {"nan_grad_steps": [3, 4, 5, 6]},
    }
    remove = {str(names.index("rng_save")): [str(rng_dir / "global_step2" / "rng_rank00001.pt")]}
    results, log, codes = run_workers(
        2,
        list(runs.values()),
        tmp,
        faults=faults,
        remove=remove,
        skip_preflight=True,
        every_rank=True,
    )
    assert len(results) == len(runs), log[-4000:]
    assert codes == [3, 3], log[-4000:]  # the refused runs' exit status
    return {**dict(zip(names, results, strict=True)), "dir": tmp, "log": log}


def test_nan_weights_are_never_published(fault_runs: dict[str, Any]) -> None:
    """A NaN written into rank 1's weights just before the step-4 save: every rank refuses,
    nothing of step 4 is written, ``latest`` still names step 2, the run stops naming rank 1."""
    run, ckpt = fault_runs["nan_weight"], fault_runs["dir"] / "nan_weight"
    assert run["type"] == "NonFiniteWeightsError"
    assert run["error"] == (
        f"not saving {ckpt}/global_step4: the parameters on rank(s) [1] hold non-finite values "
        f"(the model diverged); nothing was written, {ckpt}/latest still names global_step2"
    )
    assert (ckpt / "latest").read_text() == "global_step2"
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("zero_to")) == [
        "global_step2",
        "latest",
    ]


def test_skipped_updates_are_counted_in_fp32(fault_runs: dict[str, Any]) -> None:
    """NaN gradients with a finite loss at step 3: the update is skipped (ZeRO-0 by our
    optimizer, ZeRO-1 by DeepSpeed), logged as what happened, and training goes on with finite
    losses; NaN gradients from step 3 on stop the run at step 4 (max_nonfinite_steps=2) without
    the step-4 checkpoint."""
    log = fault_runs["log"]
    assert "step 3: non-finite gradients (loss " in log
    assert "fp16 overflow" not in log
    for name in ("grad_once_zero0", "grad_once_zero1"):
        losses = _losses(fault_runs[name])
        assert sorted(losses) == list(range(1, 7)) and all(map(math.isfinite, losses.values()))
        assert fault_runs[name]["grad_norms"]["3"] is None  # no update, no norm reported
    # ZeRO-0 and ZeRO-1 skip the same step: the same curve afterwards
    assert _losses(fault_runs["grad_once_zero0"]) == pytest.approx(
        _losses(fault_runs["grad_once_zero1"]), rel=1e-5
    )
    stop = fault_runs["grad_stop_zero1"]
    assert stop["error"].startswith("stopping at step 4: 2 consecutive steps with a non-finite")
    assert (fault_runs["dir"] / "gs" / "latest").read_text() == "global_step2"


def test_missing_rng_file_of_rank1_is_refused_then_allowed(fault_runs: dict[str, Any]) -> None:
    """rank 1's RNG file deleted: both ranks refuse to resume, naming it; with
    ``checkpoint.allow_missing_rng`` rank 1 warns and the run continues from step 2."""
    tag_dir = fault_runs["dir"] / "rng" / "global_step2"
    refused = fault_runs["rng_refused"]
    assert refused["type"] == "CheckpointFileError"
    assert refused["error"].startswith(f"{tag_dir}: rank(s) [1] have no RNG file (rng_rank00001")
    allowed = fault_runs["rng_allowed"]
    assert sorted(_losses(allowed)) == [3, 4, 5, 6]
    warning = f"warning: rank 1: {tag_dir}/rng_rank00001.pt missing (checkpoint.allow_missing_rng)"
    assert warning in fault_runs["log"]
    assert "warning: rank 0:" not in fault_runs["log"]


def test_subprocess_left_nothing_running(kill_chain: dict[str, Any]) -> None:
    """No worker of the killed launches is left (they were SIGKILLed and reaped)."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert str(kill_chain["dir"]) not in ps.stdout
