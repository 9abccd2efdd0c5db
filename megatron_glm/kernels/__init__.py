"""Fused ops behind dispatchers: one file per op (torch reference + Triton kernel + dispatch).

The model reaches attention only through :func:`glm_attention`; the ``model.kernels`` config
choice (auto|triton|torch) is resolved per call from the tensors' device by the op's own
dispatcher, and :func:`check_kernel_choice` lets a model fail at construction (not at the first
forward) when a choice cannot be honoured. Today only the torch implementations exist:
``triton`` is a clear error, ``auto`` means torch.
"""

from __future__ import annotations

import torch

from megatron_glm.kernels.attention import (
    TRITON_ATTENTION_AVAILABLE,
    KernelBackend,
    attention_backend,
    glm_attention,
    glm_attention_mask,
)

__all__ = [
    "TRITON_ATTENTION_AVAILABLE",
    "KernelBackend",
    "attention_backend",
    "check_kernel_choice",
    "glm_attention",
    "glm_attention_mask",
]


def check_kernel_choice(choice: str) -> None:
    """Raise ValueError now if ``model.kernels = choice`` cannot work on a CUDA device.

    The device is not known while a model is built on ``meta``, so this checks against CUDA (the
    only device a Triton kernel runs on); the per-call dispatch still checks the real device.
    """
    attention_backend(choice, torch.device("cuda"))
