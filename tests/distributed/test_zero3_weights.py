"""A ZeRO-3 checkpoint's weights are read back: gathered from the data-parallel partitions.

2 processes train glm-tiny's shape with 4 layers at dp 2 for 3 steps, saving at step 2, once with
ZeRO-3 and once with ZeRO-0 (same seed and synthetic rows of ``test_training``, dropout off,
fp32). ZeRO-3 keeps the weights only as flat fp32 partitions in the optimizer-state files;
:func:`read_full_state` gathers them. They equal DeepSpeed's own ``zero_to_fp32`` consolidation
exactly and the ZeRO-0 run's weights within 1e-6 (the same two updates), and
``tools/reshard_checkpoint.py --no-optimizer`` turns the checkpoint into a tp 1 ZeRO-0 one with
those weights, from which a 1-process ZeRO-0 run resumes with the ZeRO-0 run's step-3 loss
(computed with step 2's weights, so the restarted Adam does not enter). Its optimizer state is
refused, naming ``--no-optimizer``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hf_export_trained import SHAPE, assert_export_logits
from test_training import TINY, run_workers

from megatron_glm.config import load_config
from megatron_glm.hf.export import export_to_hf
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.serialization import CheckpointFileError
from megatron_glm.training.checkpoint import is_zero3, read_full_state, reshard_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("training")]

REPO = Path(__file__).resolve().parents[2]
RUN = [
    *SHAPE,
    "model.hidden_dropout=0.0",
    "model.attention_dropout=0.0",
    "train.train_iters=3",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.eval_interval=1000",
    "optimizer.warmup_iters=1",
    "checkpoint.save_interval=2",
]
TAG = "global_step2"


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


def test_zero3_checkpoint_weights_are_gathered_and_reshard_to_zero0(tmp_path: Path) -> None:
    z3, z0 = tmp_path / "z3", tmp_path / "z0"
    runs = [
        [*RUN, "train.zero_stage=3", f"checkpoint.save={z3}"],
        [*RUN, "train.zero_stage=0", f"checkpoint.save={z0}"],
    ]
    (_, straight), log, codes = run_workers(2, runs, tmp_path)
    assert codes == [0, 0], log[-4000:]
    assert is_zero3(z3 / TAG) and not is_zero3(z0 / TAG)
    assert (z3 / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()

    layout = tensor_parallel_layout(load_config(None, TINY + SHAPE).model)
    gathered = read_full_state(z3 / TAG, layout)
    assert all(t.dtype == torch.float32 for t in gathered.values())
    reference = _deepspeed_consolidation(z3)
    assert sorted(gathered) == sorted(reference) == sorted(layout)
    assert all(torch.equal(gathered[n], reference[n]) for n in gathered)
    zero0 = read_full_state(z0 / TAG, layout)
    diff = _max_diff({n: zero0[n] for n in gathered}, gathered)
    print(f"ZeRO-3 gathered vs ZeRO-0 weights after 2 steps: max abs diff {diff:.3g}")
    assert diff <= 1e-6
    export_to_hf(z3, tmp_path / "hf", tag=TAG)  # to-hf of a ZeRO-3 checkpoint: our logits
    assert_export_logits(z3 / TAG, tmp_path / "hf", "dp 2 ZeRO-3")

    with pytest.raises(CheckpointFileError, match=r"ZeRO-3 optimizer state .* --no-optimizer"):
        reshard_checkpoint(z3, tmp_path / "refused", 1, layout)
    out = tmp_path / "tp1"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tool = [sys.executable, str(REPO / "tools" / "reshard_checkpoint.py")]
    args = ["--load", str(z3), "--tag", TAG, "--tp", "1", "--save", str(out), "--no-optimizer"]
    done = subprocess.run([*tool, *args], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in (out / TAG).iterdir())
    assert files == ["mp_rank_00_model_states.pt"], files
    assert not is_zero3(out / TAG)
    resharded = read_full_state(out / TAG, layout)
    assert _max_diff(resharded, gathered) == 0.0

    # it resumes (1 process, ZeRO-0): step 3's loss is computed with step 2's weights
    resume = [[*RUN, "train.zero_stage=0", f"checkpoint.load={out}"]]
    (resumed,), log, codes = run_workers(1, resume, tmp_path)
    assert codes == [0], log[-4000:]
    assert list(resumed["losses"]) == ["3"], resumed["losses"]
    step3 = abs(resumed["losses"]["3"] - straight["losses"]["3"])
    print(f"step 3 loss resumed from the resharded ZeRO-3 checkpoint vs ZeRO-0: |diff| {step3:.3g}")
    assert step3 <= 1e-5


def _deepspeed_consolidation(save_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's ``zero_to_fp32`` of the checkpoint this test wrote (it unpickles freely:
    acceptable only on our own file, never on a user's)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=TAG))
