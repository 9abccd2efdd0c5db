"""Finetuning losses: :class:`BatchLoss` implementations the step runners train unchanged.

Both return sums (``training.losses.LossSums``), normalised once over the global batch by the
runners: ``num_tokens`` is the batch's ``loss_mask`` sum, which the runners also count up front
(examples for cloze, target tokens for seq2seq).

Cloze (:class:`ClozeLoss`): each example's candidates get a score, and the loss is the cross
entropy of the scores as logits against the gold label.

- single-token verbalizers: the score of candidate ``c`` is the head's logit of its token at the
  [MASK] position (as THUDM's GLM finetuning does); the softmax over the candidates equals the
  one over their log-probabilities, since both differ by the row's log-partition;
- multi-token: the score is the sum (or mean, ``score="mean"``) of the log-probabilities of its
  tokens generated in part B (GLM paper, section 2.3), one row per (example, candidate).

The second objective, ``accuracy``, sums correct predictions (argmax of the scores) over
examples: validation then reports accuracy through the same global reduction as the loss, at any
(tp, pp, dp) layout. Under tensor parallelism the head's logits at the few scored positions are
gathered over the TP group (the loss is replicated over TP, as pretraining's is).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_glm.model import LossOutput
from megatron_glm.model.loss import resolve_head
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
)
from megatron_glm.training.loss_stats import LossStats
from megatron_glm.training.losses import PretrainLoss


def full_logits(selected: Tensor, weight: Tensor, dims: ParallelDims | None) -> Tensor:
    """``[n, vocab]`` float32 logits of the tied head at ``selected`` ``[n, h]`` hidden states
    (the TP shards' columns gathered; gradients flow back to every shard)."""
    if dims is None or dims.tp == 1:
        return (selected @ weight.t()).float()
    local = copy_to_tensor_parallel_region(selected, dims.tp_group) @ weight.t()
    return gather_from_tensor_parallel_region(local, dims.tp_group).float()


def classification_sums(scores: Tensor, label: Tensor, weight: Tensor) -> LossOutput:
    """Cross entropy of ``scores`` ``[b, C]`` against ``label``; the counts behind accuracy and
    macro F1 (correct, and per class: true positives, predicted, gold) as ``_`` objectives."""
    c = scores.shape[1]
    ce = F.cross_entropy(scores, label, reduction="none") * weight
    pred = scores.argmax(dim=1)
    correct = ((pred == label).float() * weight).sum()
    classes = torch.arange(c, device=scores.device).unsqueeze(1)  # [C, 1]
    is_pred, is_gold = (pred == classes).float() * weight, (label == classes).float() * weight
    per_class = torch.stack([(is_pred * is_gold).sum(1), is_pred.sum(1), is_gold.sum(1)], dim=1)
    n = weight.sum()
    sums = torch.cat([ce.sum().detach().reshape(1), correct.reshape(1), per_class.reshape(-1)])
    return LossOutput(
        sum_loss=ce.sum(),
        num_tokens=n,
        per_objective_sum=sums.detach(),
        per_objective_count=n.detach().expand(sums.shape[0]).clone(),
    )


@dataclass(frozen=True)
class ClozeLoss:
    """Cloze classification over verbalizer candidates (module docstring)."""

    candidates: tuple[tuple[int, ...], ...]
    """Token ids of each label's verbalizer, in label order."""
    score: str = "sum"
    """Multi-token: ``sum`` or ``mean`` of the candidate's token log-probabilities."""

    @property
    def objectives(self) -> tuple[str, ...]:
        """The loss, then counts reduced with it (hidden from the loss log): correct
        predictions, and per class true positives, predictions and gold labels."""
        per_class = [
            f"_{k}{c}" for c in range(len(self.candidates)) for k in ("tp", "pred", "gold")
        ]
        return ("cloze", "_correct", *per_class)

    def metrics(self, stats: LossStats) -> dict[str, float]:
        """``accuracy`` and ``macro_f1`` (unweighted mean of per-class ``2 tp / (pred + gold)``,
        0 for a class with no true positive, as ``finetune.metrics.macro_f1``) of the examples
        behind ``stats``."""
        sums, n = stats.objective_sums(), stats.num_tokens
        f1 = []
        for c in range(len(self.candidates)):
            tp, pred, gold = (sums[f"_{k}{c}"] for k in ("tp", "pred", "gold"))
            f1.append(2 * tp / (pred + gold) if tp > 0 else 0.0)
        return {"accuracy": sums["_correct"] / n, "macro_f1": sum(f1) / len(f1)}

    @classmethod
    def build(cls, candidates: Sequence[Sequence[int]], score: str = "sum") -> ClozeLoss:
        return cls(tuple(tuple(ids) for ids in candidates), score)

    @property
    def single_token(self) -> bool:
        return all(len(ids) == 1 for ids in self.candidates)

    @property
    def label_keys(self) -> tuple[str, ...]:
        if self.single_token:
            return ("mask_pos", "label", "loss_mask")
        return ("targets", "cand_mask", "label", "loss_mask")

    def scores(
        self,
        head: nn.Module | Tensor,
        hidden: Tensor,
        labels: Mapping[str, Tensor],
        *,
        dims: ParallelDims | None = None,
    ) -> Tensor:
        """``[b, C]`` candidate scores (float32, differentiable)."""
        weight, dims, _ = resolve_head(head, dims, "auto")
        if self.single_token:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            logits = full_logits(hidden[rows, labels["mask_pos"]], weight, dims)  # [b, V]
            ids = torch.tensor([c[0] for c in self.candidates], device=hidden.device)
            return logits.index_select(1, ids)
        return self._multi_token_scores(weight, hidden, labels, dims)

    def _multi_token_scores(
        self,
        weight: Tensor,
        hidden: Tensor,
        labels: Mapping[str, Tensor],
        dims: ParallelDims | None,
    ) -> Tensor:
        r, s, h = hidden.shape
        mask = labels["cand_mask"].reshape(-1)
        at = torch.nonzero(mask > 0).squeeze(1)  # [n] scored positions
        logp = torch.log_softmax(full_logits(hidden.reshape(r * s, h)[at], weight, dims), dim=-1)
        token_lp = logp.gather(1, labels["targets"].reshape(-1)[at].unsqueeze(1)).squeeze(1)
        per_row = torch.zeros(r, dtype=torch.float32, device=hidden.device)
        per_row = per_row.index_add(0, torch.div(at, s, rounding_mode="floor"), token_lp)
        if self.score == "mean":
            per_row = per_row / labels["cand_mask"].sum(dim=1).clamp(min=1)
        return per_row.view(-1, len(self.candidates))

    def __call__(
        self,
        head: nn.Module | Tensor,
        hidden: Tensor,
        labels: Mapping[str, Tensor],
        *,
        dims: ParallelDims | None = None,
        kernels: str | None = None,
    ) -> LossOutput:
        scores = self.scores(head, hidden, labels, dims=dims)
        return classification_sums(scores, labels["label"], labels["loss_mask"].float())


@dataclass(frozen=True)
class Seq2SeqLoss:
    """Token cross entropy over part B (``target [eop]``), optionally label-smoothed."""

    label_smoothing: float = 0.0
    objectives: tuple[str, ...] = ("seq2seq",)
    label_keys: tuple[str, ...] = ("targets", "loss_mask", "objective")

    def __call__(
        self,
        head: nn.Module | Tensor,
        hidden: Tensor,
        labels: Mapping[str, Tensor],
        *,
        dims: ParallelDims | None = None,
        kernels: str | None = None,
    ) -> LossOutput:
        if self.label_smoothing == 0.0:  # pretraining's loss, one objective
            return PretrainLoss(self.objectives)(head, hidden, labels, dims=dims, kernels=kernels)
        targets, loss_mask, _ = (labels[k] for k in self.label_keys)
        weight, dims, _ = resolve_head(head, dims, kernels)
        b, s, h = hidden.shape
        mask = loss_mask.reshape(-1).float()
        at = torch.nonzero(mask > 0).squeeze(1)
        logp = torch.log_softmax(full_logits(hidden.reshape(b * s, h)[at], weight, dims), dim=-1)
        nll = -logp.gather(1, targets.reshape(-1)[at].unsqueeze(1)).squeeze(1)
        eps = self.label_smoothing
        loss = ((1.0 - eps) * nll - eps * logp.mean(dim=-1)) * mask[at]
        total = loss.sum()
        return LossOutput(
            sum_loss=total,
            num_tokens=mask.sum(),
            per_objective_sum=total.detach().reshape(1),
            per_objective_count=mask.sum().reshape(1),
        )
