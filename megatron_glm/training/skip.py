"""The optimizer step the loop can cancel, shared by torch's AdamW and DeepSpeed's CPU Adam."""

from __future__ import annotations

from typing import Any

import torch


class SkippableStep(torch.optim.Optimizer):
    """Mixin: an optimizer whose next ``step()`` can be turned into a no-op.

    DeepSpeed (and its ZeRO wrappers) call ``step()`` of the inner optimizer at the accumulation
    boundary; when the loop has seen a non-finite loss it sets :attr:`skip_next_step`, so
    parameters and moments stay untouched and the NaN gradients are simply zeroed by the engine
    afterwards. List it before the optimizer class: ``class X(SkippableStep, torch.optim.AdamW)``.
    """

    skip_next_step: bool = False
    last_step_skipped: bool = False
    integer_step: bool = False
    """True when the optimizer keeps its per-parameter ``step`` count as a Python int."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of the optimizer, or nothing if :attr:`skip_next_step` is set (then
        cleared)."""
        self.last_step_skipped = self.skip_next_step
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        return super().step(closure)
