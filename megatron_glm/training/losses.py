"""What a kind of training minimises: a batch's labels and the model's final hidden states ->
loss sums.

The step runners (``training.step``) never name a loss: they call a :class:`BatchLoss`. Under
data parallelism it runs inside the engine's module (``engine.GLMPretrainModule``, so ZeRO-3
gathers the tied head around it); under pipeline parallelism it is DeepSpeed's ``loss_fn`` on the
last stage, which receives the batch keys :attr:`BatchLoss.label_keys` from the data iterator.
Pretraining is :class:`PretrainLoss`; finetuning (cloze classification over verbalizer tokens,
seq2seq) adds its own ``BatchLoss`` with its label keys and objective names, and trains through
the same runners and loop.

Sums, not means, come back (:class:`LossSums`): the runners count the global batch's loss tokens
and normalise once (see ``training.step``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from megatron_glm.model import LossOutput, glm_loss
from megatron_glm.objectives import OBJECTIVES
from megatron_glm.parallel.dims import ParallelDims


class LossSums(Protocol):
    """One micro-batch's sums (``megatron_glm.model.LossOutput`` is one)."""

    @property
    def sum_loss(self) -> Tensor:
        """Scalar ``sum(loss * weight)``, differentiable."""
        ...

    @property
    def num_tokens(self) -> Tensor:
        """Scalar ``sum(weight)``."""
        ...

    @property
    def per_objective_sum(self) -> Tensor:
        """``[len(objectives)]`` loss sums per objective, detached."""
        ...

    @property
    def per_objective_count(self) -> Tensor:
        """``[len(objectives)]`` weight sums per objective."""
        ...


class BatchLoss(Protocol):
    """A loss over a micro-batch, given the final hidden states ``[b, s, h]`` and the head."""

    @property
    def objectives(self) -> tuple[str, ...]:
        """Names of the per-objective sums, in order (logged as ``loss_<name>``)."""
        ...

    @property
    def label_keys(self) -> tuple[str, ...]:
        """Batch keys the loss reads (the pipeline's last stage receives exactly these)."""
        ...

    def __call__(
        self,
        head: nn.Module | Tensor,
        hidden: Tensor,
        labels: Mapping[str, Tensor],
        *,
        dims: ParallelDims | None = None,
        kernels: str | None = None,
    ) -> LossSums:
        """``head``: the GLM (dims and kernels then come from it) or its tied head weight
        ``[vocab/tp, h]`` with ``dims`` and ``kernels`` given."""
        ...


@dataclass(frozen=True)
class PretrainLoss:
    """GLM pretraining: cross entropy of the tied head on ``loss_mask``, summed per objective."""

    objectives: tuple[str, ...] = OBJECTIVES
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
        targets, loss_mask, objective = (labels[k] for k in self.label_keys)
        num = len(self.objectives)
        return glm_loss(
            head, hidden, targets, loss_mask, objective, num, dims=dims, kernels=kernels
        )
