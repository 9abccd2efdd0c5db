"""LayerNorm, optionally fused with the residual add before it, forward and backward.

``add_layer_norm(x, residual, w, b) = (s, LN(s))`` with ``s = x + residual``: the pre-LN block
needs both the new residual stream ``s`` and its normalisation, and computing them in one pass
reads ``x`` and ``residual`` once instead of writing ``s`` and reading it back. ``layer_norm`` is
the same kernel without the add.

Forward: one program per row (``BLOCK_H`` = hidden rounded up to a power of two), fp32 mean and
variance (two-pass within the registers: no cancellation), per-row ``mean`` and ``rstd`` saved.
Backward: ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))`` with
``dxhat = dy * w``; the weight and bias gradients are reduced in two stages without atomics
(deterministic): each of ``G`` programs accumulates its rows' ``dy * xhat`` and ``dy`` in fp32,
then torch sums the ``[G, h]`` partials.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_glm.kernels.dispatch import (
    interpreting,
    next_power_of_2,
    resolve_backend,
    triton_kernel,
)

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton-less installs run the torch path only
    tl = None


@triton_kernel
def _ln_fwd_kernel(
    X, RES, SUM, Y, W, B, MEAN, RSTD, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(RES + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        x = x.to(SUM.dtype.element_ty)  # normalise the sum as stored (rounded), as torch does
        tl.store(SUM + row * n_cols + cols, x, mask=ok)
        x = x.to(tl.float32)
    mean = tl.sum(x, 0) / n_cols
    xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton_kernel
def _ln_bwd_kernel(
    X, DY, DSUM, DX, W, MEAN, RSTD, DW_PART, DB_PART, n_rows, n_cols,
    HAS_DSUM: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < n_cols
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], tl.float32)
    db = tl.zeros([BLOCK_H], tl.float32)
    for row in range(pid, n_rows, programs):
        offs = tl.cast(row, tl.int64) * n_cols + cols
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(ok, (x - mean) * rstd, 0.0)
        dxhat = dy * w
        c1 = tl.sum(dxhat * xhat, 0) / n_cols
        c2 = tl.sum(dxhat, 0) / n_cols
        dx = (dxhat - (xhat * c1 + c2)) * rstd
        if HAS_DSUM:
            dx += tl.load(DSUM + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=ok)
    tl.store(DB_PART + pid * n_cols + cols, db, mask=ok)


def _num_warps(block_h: int) -> int:
    return min(16, max(1, block_h // 256))


def _backward_programs(n_rows: int, device: torch.device) -> int:
    """Programs of the backward: a few per SM on CUDA, a handful under the interpreter."""
    if device.type == "cuda" and not interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 4 * sms))
    return max(1, min(n_rows, 4))


class _AddLayerNorm(torch.autograd.Function):
    """Inputs ``x`` and optional ``residual`` ``[rows, h]``; outputs ``(x + residual, y)``, or
    ``y`` alone without a residual."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        residual: Tensor | None,
        weight: Tensor,
        bias: Tensor,
        eps: float,
    ) -> tuple[Tensor, Tensor] | Tensor:
        rows, h = x.shape
        y = torch.empty_like(x)
        total = torch.empty_like(x) if residual is not None else x
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = next_power_of_2(h)
        _ln_fwd_kernel[(rows,)](
            x, residual if residual is not None else x, total, y, weight, bias, mean, rstd, h, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_H=block, num_warps=_num_warps(block),
        )  # fmt: skip
        ctx.save_for_backward(total, weight, mean, rstd)
        ctx.has_residual = residual is not None
        return (total, y) if residual is not None else y

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        total, weight, mean, rstd = ctx.saved_tensors
        has_residual: bool = ctx.has_residual
        d_total, dy = grads if has_residual else (None, grads[0])
        assert dy is not None
        rows, h = total.shape
        dy = dy.contiguous()
        use_dsum = has_residual and d_total is not None
        dsum = d_total.contiguous() if use_dsum and d_total is not None else dy
        dx = torch.empty_like(total)
        programs = _backward_programs(rows, total.device)
        dw_part = torch.empty(programs, h, dtype=torch.float32, device=total.device)
        db_part = torch.empty_like(dw_part)
        block = next_power_of_2(h)
        _ln_bwd_kernel[(programs,)](
            total, dy, dsum, dx, weight, mean, rstd, dw_part, db_part, rows, h,
            HAS_DSUM=use_dsum, BLOCK_H=block, num_warps=_num_warps(block),
        )  # fmt: skip
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(weight.dtype)
        return dx, (dx if has_residual else None), dw, db, None


def _check(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, eps: float) -> None:
    h = x.shape[-1]
    if weight.shape != (h,) or bias.shape != (h,):
        raise ValueError(
            f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be "
            f"[{h}] (the last dim of x {tuple(x.shape)})"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"layer_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ"
        )
    if eps <= 0:
        raise ValueError(f"layer_norm: eps must be > 0, got {eps}")


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    *,
    kernels: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(s, LN(s))`` for ``s = x + residual``; ``x``, ``residual`` ``[..., h]``."""
    _check(x, weight, bias, residual, eps)
    if resolve_backend(kernels, x.device, "layer_norm") == "torch":
        total = x + residual
        return total, F.layer_norm(total, (x.shape[-1],), weight, bias, eps)
    shape = x.shape
    h = shape[-1]
    total, y = _AddLayerNorm.apply(
        x.reshape(-1, h).contiguous(), residual.reshape(-1, h).contiguous(), weight, bias, eps
    )
    return total.view(shape), y.view(shape)


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, *, kernels: str = "auto"
) -> Tensor:
    """``F.layer_norm(x, (h,), weight, bias, eps)`` over the last dim of ``x`` ``[..., h]``."""
    _check(x, weight, bias, None, eps)
    if resolve_backend(kernels, x.device, "layer_norm") == "torch":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    shape = x.shape
    y: Tensor = _AddLayerNorm.apply(x.reshape(-1, shape[-1]).contiguous(), None, weight, bias, eps)
    return y.view(shape)


class FusedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, state-dict keys and init) routed through the dispatcher.

    A module rather than a functional call at the use site, so the parameters are read inside the
    module's own forward (what ZeRO-3's per-module parameter gathering expects).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, *, kernels: str = "auto") -> None:
        super().__init__(normalized_shape, eps=eps)
        self.kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, kernels=self.kernels)
