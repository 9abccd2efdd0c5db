"""Loss statistics (``training.loss_stats``) and the loss as a step-runner parameter
(``training.losses``): sums of real GLM micro-batches against float64 references, one layout for
packing, clear errors for mismatched objectives, and a non-pretraining loss through the engine's
module."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from megatron_glm.config import load_config
from megatron_glm.model import LossOutput, build_model, glm_loss
from megatron_glm.objectives import OBJECTIVES
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.training.engine import GLMPretrainModule
from megatron_glm.training.loss_stats import LossAccumulator, LossStats
from megatron_glm.training.losses import PretrainLoss

VOCAB, SEQ = 128, 16


def _model() -> nn.Module:
    cfg = load_config(
        None,
        [
            "model.num_layers=1",
            "model.hidden_size=32",
            "model.num_attention_heads=2",
            f"model.vocab_size={VOCAB}",
            "model.max_position_embeddings=32",
            f"data.seq_length={SEQ}",
            "model.hidden_dropout=0.0",
            "model.attention_dropout=0.0",
        ],
    )
    return build_model(cfg.model, device="cpu", seed=3)


def _batch(seed: int, objectives: list[int]) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(objectives)
    sep = torch.full((b,), SEQ // 2)
    positions = torch.zeros(b, 2, SEQ, dtype=torch.long)
    positions[:, 0] = torch.arange(SEQ).clamp(max=SEQ // 2 - 1)
    positions[:, 1, SEQ // 2 :] = torch.arange(1, SEQ // 2 + 1)
    mask = torch.zeros(b, SEQ)
    mask[:, SEQ // 2 :] = torch.rand(b, SEQ // 2, generator=g).round() * 0.5 + 0.5  # weights
    return {
        "tokens": torch.randint(0, VOCAB, (b, SEQ), generator=g),
        "targets": torch.randint(0, VOCAB, (b, SEQ), generator=g),
        "loss_mask": mask,
        "position_ids": positions,
        "sep": sep,
        "valid_len": torch.full((b,), SEQ),
        "objective": torch.tensor(objectives),
    }


def test_accumulator_sums_micro_batches_in_float64_per_objective() -> None:
    module = GLMPretrainModule(_model())
    batches = [_batch(1, [0, 2]), _batch(2, [2, 2, 0])]  # no sentence row
    acc = LossAccumulator(OBJECTIVES, "cpu")
    outs = []
    with torch.no_grad():
        for mb in batches:
            outs.append(module(mb))
            acc.add(outs[-1])
    stats = acc.result()
    assert stats == acc.all_reduce()  # no process group: the local sums
    assert stats.objectives == OBJECTIVES
    assert stats.loss_sum == sum(float(o.sum_loss.double()) for o in outs)
    assert stats.num_tokens == sum(float(mb["loss_mask"].double().sum()) for mb in batches)
    # reference: each row's CE sum, from the model itself, grouped by objective
    ref_sum, ref_count = [0.0] * 3, [0.0] * 3
    for mb in batches:
        for r in range(mb["tokens"].shape[0]):
            row = {k: v[r : r + 1] for k, v in mb.items()}
            with torch.no_grad():
                out = module(row)
            k = int(mb["objective"][r])
            ref_sum[k] += float(out.sum_loss)
            ref_count[k] += float(out.num_tokens)
    assert stats.objective_count == pytest.approx(ref_count, abs=0)
    assert stats.objective_sum == pytest.approx(ref_sum, rel=1e-5)
    per = stats.objective_losses()
    assert per["sentence"] is None
    assert per["span"] == pytest.approx(ref_sum[0] / ref_count[0], rel=1e-5)
    assert stats.loss == stats.loss_sum / stats.num_tokens


def test_pack_layout_and_reduce_contributions() -> None:
    packed = torch.tensor([6.0, 3.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    stats = LossStats.unpack(packed, OBJECTIVES)
    assert stats == LossStats(6.0, 3.0, (1.0, 2.0, 3.0), (1.0, 1.0, 1.0), OBJECTIVES)
    with pytest.raises(ValueError, match="7 values for 3 objectives"):
        LossStats.unpack(packed[:7], OBJECTIVES)
    acc = LossAccumulator(OBJECTIVES, "cpu")
    acc.packed += packed
    assert acc.reduce_from(contributes=True) == stats
    assert acc.reduce_from(contributes=False) == LossStats.zeros(OBJECTIVES)
    assert (stats + stats).loss_sum == 12.0 and (stats + stats).objective_sum == (2.0, 4.0, 6.0)
    with pytest.raises(ValueError, match=r"\('cloze',\)"):
        _ = stats + LossStats.zeros(("cloze",))


def test_accumulator_refuses_sums_of_other_objectives() -> None:
    acc = LossAccumulator(("cloze",), "cpu")
    out = LossOutput(torch.tensor(1.0), torch.tensor(2.0), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(3,\), expected \(1,\).*cloze"):
        acc.add(out)


@dataclass(frozen=True)
class _ClozeLoss:
    """A finetuning-like loss: one objective, its own label keys (no ``objective`` column)."""

    objectives: tuple[str, ...] = ("cloze",)
    label_keys: tuple[str, ...] = ("answer", "answer_mask")

    def __call__(
        self,
        head: nn.Module | Tensor,
        hidden: Tensor,
        labels: Mapping[str, Tensor],
        *,
        dims: ParallelDims | None = None,
        kernels: str | None = None,
    ) -> LossOutput:
        b = hidden.shape[0]
        rows = torch.zeros(b, dtype=torch.long)
        mask = labels["answer_mask"]
        return glm_loss(head, hidden, labels["answer"], mask, rows, 1, dims=dims, kernels=kernels)


def test_engine_module_runs_the_loss_it_is_given() -> None:
    glm = _model()
    mb = _batch(4, [1, 0])
    cloze = {**mb, "answer": mb["targets"], "answer_mask": mb["loss_mask"]}
    del cloze["targets"], cloze["loss_mask"], cloze["objective"]
    with torch.no_grad():
        pre = GLMPretrainModule(glm)(mb)
        out = GLMPretrainModule(glm, _ClozeLoss())(cloze)
    acc = LossAccumulator(_ClozeLoss().objectives, "cpu")
    acc.add(out)
    stats = acc.result()
    assert stats.objective_losses() == {
        "cloze": pytest.approx(float(pre.sum_loss / pre.num_tokens))
    }
    assert float(out.sum_loss) == float(pre.sum_loss)
    assert PretrainLoss().objectives == OBJECTIVES
