"""Learning-rate schedule: GLM's ``AnnealingLR`` (linear warmup, then cosine/linear decay).

Semantics (GLM ``learning_rates.AnnealingLR``, also Megatron-LM's ``OptimizerParamScheduler``):
the update of optimizer step ``k`` (0-based, i.e. the number of updates already applied) uses::

    warmup  (W > 0 and k <= W):  lr * k / W
    decay   (k > W):             r = min(1, (k - W) / (T - W))
        cosine:    lr * (m + (1 - m) * (1 + cos(pi * r)) / 2)
        linear:    lr * (1 - (1 - m) * r)
        constant:  lr

with ``T = train_iters`` and ``m = min_lr_ratio``; after ``T`` the LR stays at ``m * lr``. As in
GLM and Megatron the first update (k = 0) has LR 0 when there is warmup: the warmup ramp
starts from zero. GLM's cosine is written ``lr/d * ((cos+1)(d-1)/2 + 1)`` with ``d = 1/m``, which
is the same function; GLM's linear decay is not clamped at ``T`` (it would go negative), ours
is.

The scheduler is a plain object with the torch LR-scheduler surface DeepSpeed uses (``step()``,
``get_lr()``, ``get_last_lr()``, ``state_dict()``, ``load_state_dict()``). The training loop
steps it after every applied optimizer step (not after skipped ones) and stores its state in the
checkpoint's client state. Its whole state is the step count, so a resumed run recomputes the
identical LR.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_glm.config import DecayStyle, OptimizerConfig


def warmup_steps(train_iters: int, warmup_ratio: float, warmup_iters: int | None) -> int:
    """Warmup length: ``warmup_iters`` if given, else ``round(warmup_ratio * train_iters)``."""
    if warmup_iters is not None:
        return warmup_iters
    return round(warmup_ratio * train_iters)


def annealing_lr(
    step: int,
    *,
    peak_lr: float,
    warmup: int,
    total: int,
    decay_style: DecayStyle,
    min_lr_ratio: float,
) -> float:
    """LR of the update at 0-based step ``step`` (module docstring formula)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup > 0 and step <= warmup:
        return peak_lr * step / warmup
    if decay_style == "constant":
        return peak_lr
    span = max(1, total - warmup)
    ratio = min(1.0, (step - warmup) / span)
    if decay_style == "cosine":
        return peak_lr * (
            min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * ratio))
        )
    assert decay_style == "linear", (
        f"unknown decay_style {decay_style!r} (OptimizerConfig checks it)"
    )
    return peak_lr * (1.0 - (1.0 - min_lr_ratio) * ratio)


class AnnealingLR:
    """Sets ``lr`` of every param group of ``optimizer`` from :func:`annealing_lr`.

    Construction applies the LR of step 0, so the first update already uses the schedule.
    ``step()`` advances by one applied update. Param groups may carry an ``lr_mult`` (default 1).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        peak_lr: float,
        warmup: int,
        total: int,
        decay_style: DecayStyle,
        min_lr_ratio: float,
    ) -> None:
        if warmup < 0 or total <= 0:
            raise ValueError(f"AnnealingLR: need warmup >= 0 and total > 0, got {warmup}, {total}")
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.warmup = warmup
        self.total = total
        self.decay_style: DecayStyle = decay_style
        self.min_lr_ratio = min_lr_ratio
        self.num_steps = 0
        self._last_lr: list[float] = []
        self._apply()

    def get_lr(self) -> list[float]:
        """LR of each param group for the next update."""
        base = annealing_lr(
            self.num_steps,
            peak_lr=self.peak_lr,
            warmup=self.warmup,
            total=self.total,
            decay_style=self.decay_style,
            min_lr_ratio=self.min_lr_ratio,
        )
        return [base * float(g.get("lr_mult", 1.0)) for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """LRs last written into the optimizer (torch scheduler API)."""
        return list(self._last_lr)

    def step(self, increment: int = 1, **_: Any) -> None:
        """Advance ``increment`` applied updates and write the new LR into the optimizer.

        Extra keyword arguments (DeepSpeed may pass ``lr_kwargs``) are accepted and ignored.
        """
        self.num_steps += increment
        self._apply()

    def _apply(self) -> None:
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """Step count plus the schedule's shape (checked on load, so a changed recipe is seen)."""
        return {
            "num_steps": self.num_steps,
            "peak_lr": self.peak_lr,
            "warmup": self.warmup,
            "total": self.total,
            "decay_style": self.decay_style,
            "min_lr_ratio": self.min_lr_ratio,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count. The schedule shape comes from the *current* config.

        Changing ``lr``/``train_iters`` between a save and a resume is legitimate (e.g. to extend
        a run), so the shape is not overwritten from the checkpoint; only the position is.
        """
        self.num_steps = int(state["num_steps"])
        self._apply()


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, train_iters: int
) -> AnnealingLR:
    """The run's schedule from its optimizer section and length."""
    return AnnealingLR(
        optimizer,
        peak_lr=cfg.lr,
        warmup=warmup_steps(train_iters, cfg.warmup_ratio, cfg.warmup_iters),
        total=train_iters,
        decay_style=cfg.decay_style,
        min_lr_ratio=cfg.min_lr_ratio,
    )
