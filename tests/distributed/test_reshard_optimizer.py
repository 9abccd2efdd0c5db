"""Resharding keeps the optimizer state: (tp 2, pp 2, dp 2, ZeRO-1) -> (tp 1, pp 1, dp 2) -> back.

The model is ``configs/model/glm-tiny.yaml``'s shape with the synthetic rows of
``test_training`` (dropout off, fp32). 8 processes train it at (tp 2, pp 2, dp 2) with ZeRO-1:
``K + 10`` steps, saving every ``K``. Step ``K``'s checkpoint is resharded
to (tp 1, pp 1) and resumed on 2 processes (dp 2) for 5 steps, saved, resharded back to
(tp 2, pp 2) and resumed on 8 processes for the last 5. Every resumed step's loss equals the
straight run's within 1e-5: the Adam moments, step count and fp32 master weights came along.
A control resumed from the same checkpoint resharded without its optimizer state (Adam restarts)
is off by far more from step ``K + 2`` on, so the comparison can fail.

Launches go through ``test_training``'s worker script; resharding runs here, between launches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_training import TINY, _losses, run_workers

from megatron_glm.config import load_config
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.training.checkpoint import STORE, reshard_checkpoint, reshard_info

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("training")]

REPO = Path(__file__).resolve().parents[2]
GLM_TINY = yaml.safe_load((REPO / "configs" / "model" / "glm-tiny.yaml").read_text())
SHAPE = [f"model.{k}={v}" for k, v in GLM_TINY.items() if k not in ("name", "vocab_size")]
K = 3
STEPS = K + 10
RUN = [
    *SHAPE,
    "model.hidden_dropout=0.0",
    "model.attention_dropout=0.0",
    f"train.train_iters={STEPS}",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.zero_stage=1",
    "train.eval_interval=1000",
    "optimizer.warmup_iters=1",
]
TP2_PP2 = [*RUN, "parallel.tp=2", "parallel.pp=2"]


def test_reshard_to_tp1_and_back_continues_with_the_optimizer_state(tmp_path: Path) -> None:
    layout = tensor_parallel_layout(load_config(None, TINY + SHAPE).model)
    runs = [[*TP2_PP2, f"checkpoint.save={tmp_path / 'a'}", f"checkpoint.save_interval={K}"]]
    (straight,), log, codes = run_workers(8, runs, tmp_path)
    assert codes == [0] * 8, log[-4000:]
    assert "parallel layout: world 8 = tp 2 x pp 2 x dp 2" in log
    reference = _losses(straight)
    assert sorted(reference) == list(range(1, STEPS + 1))

    tag = f"global_step{K}"
    to_tp1 = reshard_checkpoint(tmp_path / "a", tmp_path / "b", 1, layout, pp=1, tag=tag)
    reshard_checkpoint(tmp_path / "a", tmp_path / "b0", 1, layout, pp=1, tag=tag, optimizer=False)
    assert to_tp1.optimizer_kept and (tmp_path / "b" / f"global_step{K}" / STORE).is_file()
    assert reshard_info(tmp_path / "b" / f"global_step{K}") == {
        "from_tp": 2,
        "to_tp": 1,
        "optimizer_state": "kept",
        "from_pp": 2,
        "to_pp": 1,
    }
    middle = [
        [*RUN, f"checkpoint.load={tmp_path / 'b'}", f"checkpoint.save={tmp_path / 'c'}"],
        [*RUN, f"checkpoint.load={tmp_path / 'b0'}"],
    ]
    for run in middle:
        run.append(f"train.exit_interval={K + 5}")
    (tp1, control), log2, codes2 = run_workers(2, middle, tmp_path)
    assert codes2 == [0, 0], log2[-4000:]
    assert "parallel layout: world 2 = tp 1 x pp 1 x dp 2" in log2
    assert "was resharded: optimizer state from optimizer_state.pt" in log2

    back = reshard_checkpoint(tmp_path / "c", tmp_path / "d", 2, layout, pp=2)
    assert back.optimizer_kept and (back.source_tp, back.target_pp) == (1, 2)
    last = [[*TP2_PP2, f"checkpoint.load={tmp_path / 'd'}"]]
    (tp2,), log3, codes3 = run_workers(8, last, tmp_path)
    assert codes3 == [0] * 8, log3[-4000:]

    resumed = {**_losses(tp1), **_losses(tp2)}
    assert sorted(resumed) == list(range(K + 1, STEPS + 1))
    diffs = {s: abs(resumed[s] - reference[s]) for s in resumed}
    restarted = _losses(control)
    control_diff = max(abs(restarted[s] - reference[s]) for s in restarted)
    print("step  unchanged (tp2 pp2 dp2)  resharded        |diff|")
    for s in sorted(resumed):
        layout_name = "tp1 pp1 dp2" if s <= K + 5 else "tp2 pp2 dp2"
        print(f"{s:4d}  {reference[s]:.8f}  {resumed[s]:.8f} ({layout_name})  {diffs[s]:.2e}")
    print(f"max |diff| {max(diffs.values()):.2e}; Adam restarted instead: {control_diff:.2e}")
    assert max(diffs.values()) <= 1e-5, diffs
    assert control_diff > 1e-3, restarted
