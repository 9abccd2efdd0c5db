"""Fused ops behind dispatchers: one file per op (torch reference + Triton kernel + dispatch).

The model reaches every fused op only through the functions exported here, each taking the
``model.kernels`` choice (auto|triton|torch), resolved per call from the tensors' device by
:func:`megatron_glm.kernels.dispatch.resolve_backend` (auto = Triton on CUDA, torch elsewhere;
triton on CPU only under ``TRITON_INTERPRET=1``; the choice is logged once).
:func:`check_kernel_choice` lets a model fail at construction (not at the first forward) when a
choice cannot be honoured.

Each op module imports ``triton.language`` when Triton is installed (guarded: a Triton-less
install, e.g. macOS, imports fine and runs the torch path); the flash-attention module is only
imported on first use of the Triton path.
"""

from __future__ import annotations

from megatron_glm.kernels.attention import (
    TRITON_ATTENTION_AVAILABLE,
    attention_backend,
    glm_attention,
    glm_attention_mask,
    glm_decode_attention,
)
from megatron_glm.kernels.cross_entropy import fused_cross_entropy
from megatron_glm.kernels.dispatch import (
    KernelBackend,
    KernelChoice,
    check_kernel_choice,
    resolve_backend,
)
from megatron_glm.kernels.fused_bias_dropout_add import DropoutAdd, bias_dropout_add
from megatron_glm.kernels.fused_bias_gelu import bias_gelu
from megatron_glm.kernels.layernorm import LayerNorm, layer_norm

__all__ = [
    "TRITON_ATTENTION_AVAILABLE",
    "DropoutAdd",
    "KernelBackend",
    "KernelChoice",
    "LayerNorm",
    "attention_backend",
    "bias_dropout_add",
    "bias_gelu",
    "check_kernel_choice",
    "fused_cross_entropy",
    "glm_attention",
    "glm_attention_mask",
    "glm_decode_attention",
    "layer_norm",
    "resolve_backend",
]
