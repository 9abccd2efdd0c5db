"""GLM's loss: cross entropy on loss positions only, as sums (the caller normalises globally).

The logits ``[tokens, vocab]`` are the largest activation of a small GLM (vocab >> hidden), and in
a blank-infilling row most positions (part A, padding) carry no loss. So the hidden states at
``loss_mask > 0`` are gathered first (``index_select``) and the tied head is applied to those rows
only. This costs one device sync (``nonzero``: the row count is data dependent), which is cheap
next to the memory and FLOPs of full-sequence logits.

Tensor parallelism: the head is this rank's vocabulary slice of the tied embedding, so the
selected hidden rows enter the TP region (:func:`copy_to_tensor_parallel_region`: backward
all-reduces their gradient over TP), and
:func:`~megatron_glm.kernels.cross_entropy.fused_cross_entropy` turns them into the per-row loss
in row chunks of ``[chunk, vocab/tp]`` logits, all-reducing the row max and sum-exp over TP
(Triton on CUDA, torch elsewhere); full logits never exist. The unchunked autograd version,
:func:`~megatron_glm.parallel.cross_entropy.vocab_parallel_cross_entropy`, is the readable
reference it is tested against. The sums are identical
on every TP rank (reduce them over data parallelism only).

Sums, not means, are returned: the training loop all-reduces ``sum_loss`` and ``num_tokens``
across data parallelism and gradient accumulation and divides once, which is what
"loss = sum(CE * mask) / sum(mask) over the global batch" (docs/design.md, "Loss
normalisation") requires.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from megatron_glm.kernels import fused_cross_entropy
from megatron_glm.objectives import NUM_OBJECTIVES
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.mappings import copy_to_tensor_parallel_region


class LossOutput(NamedTuple):
    """Sums of one micro-batch; divide by the (globally reduced) token count yourself."""

    sum_loss: Tensor
    """Scalar float32 ``sum(CE * loss_mask)``, differentiable."""
    num_tokens: Tensor
    """Scalar float32 ``sum(loss_mask)`` (the mask is a weight)."""
    per_objective_sum: Tensor
    """float32 ``[num_objectives]`` of ``sum(CE * loss_mask)`` per row objective, detached."""
    per_objective_count: Tensor
    """float32 ``[num_objectives]`` of ``sum(loss_mask)`` per row objective."""


def _head_weight(model_or_head_weight: nn.Module | Tensor) -> Tensor:
    if isinstance(model_or_head_weight, Tensor):
        return model_or_head_weight
    weight = getattr(model_or_head_weight, "head_weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError("glm_loss: expected a GLMModel (with .head_weight) or a [vocab, h] tensor")
    return weight


def _cross_entropy(
    selected: Tensor,
    weight: Tensor,
    targets: Tensor,
    weights: Tensor,
    dims: ParallelDims | None,
    kernels: str,
    check_ids: bool,
) -> tuple[Tensor, Tensor]:
    """``(sum(weights * CE), CE detached [n])`` of the tied head ``weight`` ``[vocab/tp, h]``."""
    if dims is None or dims.tp == 1:
        out = fused_cross_entropy(
            selected, weight, targets, weights, kernels=kernels, check_ids=check_ids
        )
    else:
        out = fused_cross_entropy(
            copy_to_tensor_parallel_region(selected, dims.tp_group),
            weight,
            targets,
            weights,
            kernels=kernels,
            tp_group=dims.tp_group,
            vocab_start=dims.tp_rank * weight.shape[0],
            check_ids=check_ids,
        )
    return out.sum_loss, out.per_row


def glm_loss(
    model_or_head_weight: nn.Module | Tensor,
    hidden: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    objective: Tensor,
    num_objectives: int = NUM_OBJECTIVES,
    *,
    dims: ParallelDims | None = None,
    kernels: str | None = None,
    check_ids: bool = False,
) -> LossOutput:
    """Cross entropy of the tied head at loss positions.

    Args:
        model_or_head_weight: a ``GLMModel`` or its head matrix ``[vocab, h]`` (under TP this
            rank's ``[vocab/tp, h]`` rows, and ``dims`` must be given).
        hidden: final hidden states ``[b, s, h]`` (``GLMModel.forward``).
        targets: int64 ``[b, s]``, aligned with the tokens (no shift here).
        loss_mask: ``[b, s]``, a float weight; positions with weight 0 are never projected.
        objective: int64 ``[b]``, the row's objective (0 span, 1 sentence, 2 document).
        num_objectives: length of the per-objective outputs.
        dims: the parallel layout; taken from the model when a ``GLMModel`` is passed.
        kernels: ``model.kernels``; taken from the model's config when a ``GLMModel`` is passed,
            else ``auto``.
        check_ids: raise ValueError for an objective id outside ``[0, num_objectives)`` or a
            target outside the vocabulary. A debugging aid, off by default: the check reads the
            id range back to the host (a device sync per micro-batch); training batches are
            checked when they are built instead (token ids per window in the dataset, objective
            ids in ``megatron_glm.data.loader.collate``).
    """
    weight, dims, kernels = resolve_head(model_or_head_weight, dims, kernels)
    b, s, h = hidden.shape
    _check_shapes(b, s, targets, loss_mask, objective)
    mask = loss_mask.reshape(-1).float()  # [b*s]
    rows = torch.nonzero(mask > 0).squeeze(1)  # [n]
    selected = hidden.reshape(b * s, h).index_select(0, rows)  # [n, h]
    weights = mask.index_select(0, rows)  # [n]
    sum_loss, ce = _cross_entropy(
        selected,
        weight,
        targets.reshape(-1).index_select(0, rows),
        weights,
        dims,
        kernels,
        check_ids,
    )  # scalar, [n] detached
    row_objective = objective.view(b, 1).expand(b, s).reshape(-1).index_select(0, rows)  # [n]
    if check_ids:
        _check_objective_ids(row_objective, num_objectives)
    per_sum = torch.bincount(row_objective, weights=ce * weights, minlength=num_objectives)
    per_count = torch.bincount(row_objective, weights=weights, minlength=num_objectives)
    return LossOutput(
        sum_loss=sum_loss,
        num_tokens=mask.sum(),
        per_objective_sum=per_sum.float(),
        per_objective_count=per_count.float(),
    )


def resolve_head(
    model_or_head_weight: nn.Module | Tensor, dims: ParallelDims | None, kernels: str | None
) -> tuple[Tensor, ParallelDims | None, str]:
    """The head matrix, the layout and the kernel choice: from the model when one is given."""
    weight = _head_weight(model_or_head_weight)  # [vocab/tp, h]
    if dims is None and isinstance(model_or_head_weight, nn.Module):
        dims = getattr(model_or_head_weight, "dims", None)
    if kernels is None:
        cfg = getattr(model_or_head_weight, "cfg", None)
        kernels = getattr(cfg, "kernels", "auto")
    if getattr(weight, "tensor_model_parallel", False) and (dims is None or dims.tp == 1):
        raise ValueError(
            "glm_loss: the head weight is a tensor-parallel shard; pass the model or dims=..."
        )
    return weight, dims, str(kernels)


def _check_shapes(b: int, s: int, targets: Tensor, loss_mask: Tensor, objective: Tensor) -> None:
    """Shapes and dtypes only (metadata: no device sync)."""
    if targets.shape != (b, s) or loss_mask.shape != (b, s):
        raise ValueError(
            f"glm_loss: targets {tuple(targets.shape)} and loss_mask {tuple(loss_mask.shape)} "
            f"must both be [b, s] = {(b, s)}"
        )
    if objective.shape != (b,):
        raise ValueError(f"glm_loss: objective must be [b] = ({b},), got {tuple(objective.shape)}")
    if objective.dtype.is_floating_point or objective.dtype == torch.bool:
        raise ValueError(f"glm_loss: objective must be an integer tensor, got {objective.dtype}")


def _check_objective_ids(row_objective: Tensor, num_objectives: int) -> None:
    """Debugging aid (``check_ids``): reads the id range back to the host, a device sync."""
    if not row_objective.numel():
        return
    low, high = (int(x) for x in torch.aminmax(row_objective))
    if low < 0 or high >= num_objectives:
        raise ValueError(
            f"glm_loss: objective ids must be in [0, {num_objectives}), got {low}..{high}"
        )
