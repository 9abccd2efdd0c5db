"""Every (pp, zero_stage, partition_method) layout on the shipped glm-tiny: trains or is refused.

The model is ``configs/model/glm-tiny.yaml`` as shipped (2 layers, hidden 64, 2 heads, 512
positions) with the synthetic batch source of ``test_training`` (vocabulary 256). On that shape
the default ``partition_method=parameters`` gives pipeline stage 0 the embedding alone (its
512 x 64 x 2 position tables outweigh a block), so stage 0 has one optimizer param group (no
bias or LayerNorm gain) where stage 1 has two; ``uniform`` leaves stage 1 the final LayerNorm
and the head, no block. Before ZeRO's gradient norm was reduced once per step
(``compat.deepspeed.reduce_zero_grad_norm_once``) pp 2 + ZeRO-1 + ``parameters`` deadlocked
at step 1.

Launches go through ``test_training``'s worker script (same directory, imported as a module the
way pytest's default import mode puts it on ``sys.path``), all accepted layouts in turn in one
launch of 2 processes: start-up is most of the cost on 2 cores.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_training import TINY, run_workers

from megatron_glm.config import load_config
from megatron_glm.training.preflight import validate_for_launch

REPO = Path(__file__).resolve().parents[2]
GLM_TINY = yaml.safe_load((REPO / "configs" / "model" / "glm-tiny.yaml").read_text())
SHAPE = [f"model.{k}={v}" for k, v in GLM_TINY.items() if k not in ("name", "vocab_size")]
"""glm-tiny's fields as overrides (they come after ``TINY``'s in the worker, so they win)."""
COMMON = [
    *SHAPE,
    "train.train_iters=3",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "optimizer.warmup_iters=0",  # every step updates (TINY warms up for 2)
    "model.hidden_dropout=0.0",
    "model.attention_dropout=0.0",
]
PP = (1, 2, 4)
ZERO = (0, 1, 2, 3)
PARTITIONS = ("parameters", "uniform", "type:GLMBlock")
WORLD = 2
PIPELINE_STAGES = {  # stage boundaries over [embedding, block, block, final norm, head]
    "parameters": "[0, 1) [1, 5)",
    "uniform": "[0, 3) [3, 5)",
    "type:GLMBlock": "[0, 2) [2, 5)",
}


def _overrides(pp: int, zero: int, partition: str) -> list[str]:
    layout = [f"parallel.pp={pp}", f"train.zero_stage={zero}"]
    return [*COMMON, *layout, f"parallel.partition_method={partition}"]


def _refusal(pp: int, zero: int, partition: str) -> str | None:
    """The up-front error of a layout (config load, then the pre-launch checks), or None."""
    try:
        cfg = load_config(None, TINY + _overrides(pp, zero, partition))
        validate_for_launch(cfg, WORLD, check_data=False)
    except ValueError as exc:
        return str(exc)
    return None


def test_layouts_the_config_refuses_are_refused_up_front() -> None:
    """pp 4 > glm-tiny's 2 layers (config), pp 2 with ZeRO-2/3 (pre-launch): refused with the
    field named; everything else passes both checks."""
    refused = {}
    for pp, zero, partition in itertools.product(PP, ZERO, PARTITIONS):
        message = _refusal(pp, zero, partition)
        if message is not None:
            refused[pp, zero, partition] = message
    for (pp, zero, _), message in refused.items():
        if pp == 4:
            assert (
                message == "config field 'model.num_layers': must be divisible by parallel.pp (4)"
            )
        else:
            assert (pp, zero >= 2) == (2, True)
            assert message.startswith(
                f"config field 'train.zero_stage': ZeRO-{zero} cannot be combined with "
                "parallel.pp=2: DeepSpeed's pipeline engine accumulates"
            ), message
    assert sorted(refused) == sorted(
        [(4, z, p) for z in ZERO for p in PARTITIONS]
        + [(2, z, p) for z in (2, 3) for p in PARTITIONS]
    )


def _accepted() -> list[tuple[int, int, str]]:
    return [c for c in itertools.product(PP, ZERO, PARTITIONS) if _refusal(*c) is None]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.xdist_group("pipeline_layouts")
def test_every_accepted_layout_trains_glm_tiny(tmp_path: Path) -> None:
    """All 18 accepted layouts (pp 1: ZeRO 0-3; pp 2: ZeRO 0-1; x 3 partition methods) train 3
    steps in one 2-rank launch within a bounded time: finite losses and gradient norms equal to
    pp 1 ZeRO-0's on the same global batches (dropout off, fp32) within 1e-5 relative, and the
    pipelines ran the stage splits named above (the embedding-only stage included)."""
    combos = _accepted()
    assert len(combos) == 18
    reference_index = combos.index((1, 0, "parameters"))
    start = time.monotonic()
    results, log, codes = run_workers(
        WORLD, [_overrides(*c) for c in combos], tmp_path, timeout=240.0
    )
    elapsed = time.monotonic() - start
    assert codes == [0] * WORLD, log[-4000:]
    print(f"{len(combos)} layouts trained in one launch: {elapsed:.1f} s")

    reference: dict[str, Any] = results[reference_index]
    for combo, result in zip(combos, results, strict=True):
        assert result["exit_reason"] == "completed" and result["iteration"] == 3, combo
        losses, norms = result["losses"], result["grad_norms"]
        assert sorted(losses) == ["1", "2", "3"], (combo, losses)
        assert all(math.isfinite(v) for v in losses.values()), (combo, losses)
        for step, loss in reference["losses"].items():
            assert losses[step] == pytest.approx(loss, rel=1e-5), (combo, step)
            assert norms[step] == pytest.approx(reference["grad_norms"][step], rel=1e-5), combo
        if combo[0] > 1:
            assert result["tied_diff"] == 0.0, combo  # embedding and head copies stay equal
    ref_losses = reference["losses"]
    assert ref_losses["3"] != ref_losses["2"] != ref_losses["1"]  # every step updated

    stages = [
        line.split("layers per stage ")[1]
        for line in log.splitlines()
        if line.startswith("pipeline: 2 stages")
    ]
    assert stages == [PIPELINE_STAGES[p] for pp, _, p in combos if pp == 2], stages
