"""The batch contract as the trainer sees it: micro-batch dicts and where they come from.

A micro-batch is a dict of tensors (``data.blank_infilling`` documents the keys). The model reads
:data:`MODEL_INPUTS`; the loss reads the keys its :class:`~megatron_glm.training.losses.BatchLoss`
names, so a new kind of training (finetuning) adds label keys without touching the model or the
step runners.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import Tensor

Batch = dict[str, Tensor]

MODEL_INPUTS: tuple[str, ...] = ("tokens", "position_ids", "sep", "valid_len")
"""The GLM's forward arguments, in order (under pipeline parallelism: the first stage's inputs)."""


class BatchSource(Protocol):
    """This rank's micro-batches (batch contract dicts, on CPU)."""

    def train_batches(self, consumed_samples: int) -> Iterator[Batch]:
        """The training stream from a global position (rows consumed by all DP ranks)."""
        ...

    def valid_batches(self) -> Iterable[Batch] | None:
        """The same validation micro-batches at every call (this rank's share of ``eval_iters``
        global batches), or None."""
        ...


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of ``batch`` on ``device`` (asynchronous copies where the source is pinned)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
