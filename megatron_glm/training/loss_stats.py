"""Loss statistics of a step or an evaluation: summed on the device, reduced in one collective.

:class:`LossStats` is what travels from a step runner to the loop and the logs (host floats).
:class:`LossAccumulator` builds it: it adds micro-batches' :class:`~.losses.LossSums` into one
float64 device vector without a host sync, all-reduces that vector in a single collective, and
reads it back once. The vector's layout is defined here only::

    [loss sum, token count, sum per objective x K, token count per objective x K]

float64 because the sums run over a global batch of possibly millions of tokens and are divided
once at the end (``loss = sum / count``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_glm.training.distributed import all_reduce
from megatron_glm.training.losses import LossSums


@dataclass(frozen=True)
class LossStats:
    """Global sums of a step (or an evaluation), on the host."""

    loss_sum: float
    num_tokens: float
    objective_sum: tuple[float, ...]
    objective_count: tuple[float, ...]
    objectives: tuple[str, ...]
    """Names of the per-objective entries, in order."""

    @classmethod
    def zeros(cls, objectives: tuple[str, ...]) -> LossStats:
        k = len(objectives)
        return cls(0.0, 0.0, (0.0,) * k, (0.0,) * k, objectives)

    @classmethod
    def unpack(cls, packed: Tensor, objectives: tuple[str, ...]) -> LossStats:
        """From the accumulator's layout (one device-to-host copy)."""
        k = len(objectives)
        v = packed.tolist()
        if len(v) != 2 + 2 * k:
            raise ValueError(f"LossStats.unpack: {len(v)} values for {k} objectives")
        return cls(v[0], v[1], tuple(v[2 : 2 + k]), tuple(v[2 + k :]), objectives)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_tokens

    def objective_losses(self) -> dict[str, float | None]:
        """Mean loss per objective (None where the objective had no loss token). Objectives
        named ``_...`` are not losses but counts a loss reduces alongside (finetuning's correct
        predictions per class, :meth:`objective_sums`) and are left out."""
        return {
            name: (s / c if c > 0 else None)
            for name, s, c in zip(
                self.objectives, self.objective_sum, self.objective_count, strict=True
            )
            if not name.startswith("_")
        }

    def objective_sums(self) -> dict[str, float]:
        """Every objective's global sum, by name (``_`` counts included)."""
        return dict(zip(self.objectives, self.objective_sum, strict=True))

    def __add__(self, other: LossStats) -> LossStats:
        if other.objectives != self.objectives:
            raise ValueError(f"adding loss stats of {other.objectives} to {self.objectives}")
        return LossStats(
            self.loss_sum + other.loss_sum,
            self.num_tokens + other.num_tokens,
            tuple(a + b for a, b in zip(self.objective_sum, other.objective_sum, strict=True)),
            tuple(a + b for a, b in zip(self.objective_count, other.objective_count, strict=True)),
            self.objectives,
        )

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss_sum)


class LossAccumulator:
    """Device-side sums of micro-batches in :class:`LossStats`' packed layout."""

    def __init__(self, objectives: tuple[str, ...], device: torch.device | str) -> None:
        self.objectives = objectives
        k = len(objectives)
        self.packed = torch.zeros(2 + 2 * k, dtype=torch.float64, device=device)

    def add(self, out: LossSums) -> None:
        """Add one micro-batch's sums (detached; no host sync)."""
        k = len(self.objectives)
        if out.per_objective_sum.shape != (k,) or out.per_objective_count.shape != (k,):
            shapes = (tuple(out.per_objective_sum.shape), tuple(out.per_objective_count.shape))
            raise ValueError(
                f"loss statistics: per-objective sums and counts of shapes {shapes[0]} and "
                f"{shapes[1]}, expected ({k},) for the objectives {self.objectives}"
            )
        self.packed[0] += out.sum_loss.detach().to(torch.float64)
        self.packed[1] += out.num_tokens.detach().to(torch.float64)
        self.packed[2 : 2 + k] += out.per_objective_sum.to(torch.float64)
        self.packed[2 + k :] += out.per_objective_count.to(torch.float64)

    def all_reduce(self, group: ProcessGroup | None = None) -> LossStats:
        """Collective (``group``, default the world): the global sums, one all-reduce."""
        all_reduce(self.packed, group=group)
        return self.result()

    def reduce_from(self, contributes: bool) -> LossStats:
        """Collective (world): the sums of the ranks that ``contribute``, on every rank.

        For sums that exist on several ranks (the pipeline's last stage, replicated over TP):
        exactly one copy of each contributes, the others add zeros.
        """
        total = self.packed.clone() if contributes else torch.zeros_like(self.packed)
        all_reduce(total)
        return LossStats.unpack(total, self.objectives)

    def result(self) -> LossStats:
        """This rank's sums so far, on the host (one device sync)."""
        return LossStats.unpack(self.packed, self.objectives)
