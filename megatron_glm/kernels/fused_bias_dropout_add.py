"""``residual + dropout(x + bias)`` in one pass, with the dropout mask regenerated in backward.

This is the residual branch of every pre-LN block; the bias is the row-parallel output
projection's, which ``RowParallelLinear(skip_bias_add=True)`` returns unapplied (Megatron-core's
pattern). Unfused it costs a bias add, a dropout (which writes a mask and the scaled output) and an
add: three passes over ``[tokens, h]`` plus a stored mask. The Triton kernel reads ``x``,
``bias``, ``residual`` once and writes the sum once; the keep mask is not stored but regenerated
in backward from a seed and the element index with Triton's counter-based Philox generator
(``tl.rand``), so backward reads only ``dy`` (the bias gradient is a column sum of ``dx``).

Randomness. The seed is one int64 drawn with ``torch.randint`` from the device's default generator
into a device tensor (no host sync), so ``torch.manual_seed`` / the CUDA RNG state govern it, and
activation checkpointing (which restores those RNG states before recomputing) regenerates exactly
the same mask. The mask is *not* the one ``torch.nn.functional.dropout`` would draw for the same
state (a different generator): ``kernels: triton`` and ``kernels: torch`` agree in distribution,
and exactly when dropout is off (eval, or ``p == 0``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_glm.kernels.dispatch import resolve_backend, triton_kernel

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton-less installs run the torch path only
    tl = None

BLOCK: int = 1024
"""Elements per program."""


@triton_kernel
def _bda_fwd_kernel(
    X, BIAS, RESIDUAL, OUT, SEED, n_elements, n_cols, p, scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(BIAS + offs % n_cols, mask=ok, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = tl.rand(tl.load(SEED), offs) >= p
        x = tl.where(keep, x * scale, 0.0)
    out = tl.load(RESIDUAL + offs, mask=ok, other=0.0).to(tl.float32) + x
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=ok)


@triton_kernel
def _bda_bwd_kernel(DY, DX, SEED, n_elements, p, scale, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    keep = tl.rand(tl.load(SEED), offs) >= p
    tl.store(DX + offs, tl.where(keep, dy * scale, 0.0).to(DX.dtype.element_ty), mask=ok)


def _grid(n: int) -> tuple[int]:
    return (max(1, -(-n // BLOCK)),)


class _BiasDropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        bias: Tensor | None,
        residual: Tensor,
        p: float,
    ) -> Tensor:
        x = x.contiguous()
        residual = residual.contiguous()
        out = torch.empty_like(residual)
        n = x.numel()
        dropout = p > 0.0
        # Drawn only when dropping, so eval consumes no randomness (as nn.Dropout). A seed
        # < 2**31 keeps tl.rand's seed in int32 range on every backend.
        seed = (
            torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
            if dropout
            else torch.zeros(1, device=x.device, dtype=torch.int64)
        )
        _bda_fwd_kernel[_grid(n)](
            x, bias if bias is not None else x, residual, out, seed, n, x.shape[-1], p,
            1.0 / (1.0 - p), HAS_BIAS=bias is not None, DROPOUT=dropout, BLOCK=BLOCK,
        )  # fmt: skip
        ctx.save_for_backward(seed)
        ctx.p = p
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        (seed,) = ctx.saved_tensors
        p: float = ctx.p
        dtype: torch.dtype = ctx.x_dtype
        dy = dy.contiguous()
        if p > 0.0:
            dx = torch.empty(dy.shape, dtype=dtype, device=dy.device)
            _bda_bwd_kernel[_grid(dy.numel())](
                dy, dx, seed, dy.numel(), p, 1.0 / (1.0 - p), BLOCK=BLOCK
            )
        else:
            dx = dy.to(dtype)
        dbias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            dbias = dx.reshape(-1, dx.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dbias, dy, None


def bias_dropout_add_reference(
    x: Tensor, bias: Tensor | None, residual: Tensor, p: float, training: bool
) -> Tensor:
    """The torch reference: ``residual + F.dropout(x + bias, p, training)``."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=p, training=training)


def bias_dropout_add(
    x: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    p: float,
    training: bool,
    *,
    kernels: str = "auto",
) -> Tensor:
    """``residual + dropout(x + bias)``; dropout only when ``training`` (as ``nn.Dropout``).

    ``x`` and ``residual`` are ``[..., n]`` of the same shape, ``bias`` is ``[n]`` or None.
    """
    if x.shape != residual.shape:
        raise ValueError(
            f"bias_dropout_add: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ"
        )
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_dropout_add: bias must be [{x.shape[-1]}], got {tuple(bias.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"bias_dropout_add: dropout probability must be in [0, 1), got {p}")
    if resolve_backend(kernels, x.device, "bias_dropout_add") == "torch":
        return bias_dropout_add_reference(x, bias, residual, p, training)
    out: Tensor = _BiasDropoutAdd.apply(x, bias, residual, p if training else 0.0)
    return out


class DropoutAdd(nn.Dropout):
    """``nn.Dropout`` whose forward also adds the bias and the residual: ``residual + drop(x + b)``.

    A drop-in for the residual branch's ``hidden + self.dropout(x)`` that stays an ``nn.Dropout``
    (same ``p``, ``train()``/``eval()`` behaviour, and forward hooks on dropout modules keep
    firing), routed through :func:`bias_dropout_add` with the model's ``kernels`` choice.
    """

    def __init__(self, p: float = 0.5, *, kernels: str = "auto") -> None:
        super().__init__(p)
        self.kernels = kernels

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        residual: Tensor,
        bias: Tensor | None = None,
    ) -> Tensor:
        return bias_dropout_add(x, bias, residual, self.p, self.training, kernels=self.kernels)
