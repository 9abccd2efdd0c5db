"""LayerNorm over the last dimension, forward and backward, and the model's LayerNorm module.

:class:`LayerNorm` is the one LayerNorm of the model (the block's two and the final one): an
``nn.LayerNorm`` whose forward goes through the kernel dispatcher (``model.kernels``) and
all-reduces its gain and bias gradients over TP under sequence parallelism.

Why no residual fusion. GLM's block is pre-LN with the residual added after attention and after
the MLP: ``h1 = h + drop(attn(LN1(h)) + b)``, ``h2 = h1 + drop(mlp(LN2(h1)) + b)``. The sum that
feeds ``LN2`` is already produced in one pass by the fused bias-dropout-add
(:mod:`megatron_glm.kernels.fused_bias_dropout_add`), and a residual+LayerNorm kernel would have
to take the dropped-out branch as input, i.e. undo that fusion (the dropout would again be a pass
of its own). Fusing ``h2`` with the *next* block's ``LN1`` would cross the block boundary, where
pipeline stages are cut and activation checkpointing recomputes. So the former ``add_layer_norm``
(and the unused ``FusedLayerNorm`` module) were removed rather than wired in.

Forward: one program per row (``BLOCK_H`` = hidden rounded up to a power of two), fp32 mean and
variance (two-pass within the registers: no cancellation), per-row ``mean`` and ``rstd`` saved.
Backward: ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))`` with
``dxhat = dy * w``; the weight and bias gradients are reduced in two stages without atomics
(deterministic): each of ``G`` programs accumulates its rows' ``dy * xhat`` and ``dy`` in fp32,
then torch sums the ``[G, h]`` partials.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_glm.kernels.dispatch import (
    interpreting,
    next_power_of_2,
    resolve_backend,
    triton_kernel,
)
from megatron_glm.parallel.layers import sequence_parallel_param

if TYPE_CHECKING:
    from megatron_glm.parallel.dims import ParallelDims

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton-less installs run the torch path only
    tl = None


@triton_kernel
def _ln_fwd_kernel(X, Y, W, B, MEAN, RSTD, n_cols, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
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
    X, DY, DX, W, MEAN, RSTD, DW_PART, DB_PART, n_rows, n_cols, BLOCK_H: tl.constexpr
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


class _LayerNorm(torch.autograd.Function):
    """Input ``x`` ``[rows, h]``; output ``LN(x)`` ``[rows, h]``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        rows, h = x.shape
        y = torch.empty_like(x)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = next_power_of_2(h)
        _ln_fwd_kernel[(rows,)](
            x, y, weight, bias, mean, rstd, h, eps, BLOCK_H=block, num_warps=_num_warps(block)
        )
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        rows, h = x.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        programs = _backward_programs(rows, x.device)
        dw_part = torch.empty(programs, h, dtype=torch.float32, device=x.device)
        db_part = torch.empty_like(dw_part)
        block = next_power_of_2(h)
        _ln_bwd_kernel[(programs,)](
            x, dy, dx, weight, mean, rstd, dw_part, db_part, rows, h,
            BLOCK_H=block, num_warps=_num_warps(block),
        )  # fmt: skip
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(weight.dtype)
        return dx, dw, db, None


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, *, kernels: str = "auto"
) -> Tensor:
    """``F.layer_norm(x, (h,), weight, bias, eps)`` over the last dim of ``x`` ``[..., h]``."""
    h = x.shape[-1]
    if weight.shape != (h,) or bias.shape != (h,):
        raise ValueError(
            f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be "
            f"[{h}] (the last dim of x {tuple(x.shape)})"
        )
    if eps <= 0:
        raise ValueError(f"layer_norm: eps must be > 0, got {eps}")
    if resolve_backend(kernels, x.device, "layer_norm") == "torch":
        return F.layer_norm(x, (h,), weight, bias, eps)
    y: Tensor = _LayerNorm.apply(x.reshape(-1, h).contiguous(), weight, bias, eps)
    return y.view(x.shape)


class LayerNorm(nn.LayerNorm):
    """The model's one LayerNorm: ``nn.LayerNorm`` (same parameters, state-dict keys and init)
    computed by :func:`layer_norm` with the ``model.kernels`` choice, and sequence-parallel aware.

    A module rather than a functional call at the use site, so the parameters are read inside the
    module's own forward (what ZeRO-3's per-module parameter gathering expects).

    Under sequence parallelism (``dims.sequence_parallel``) each TP rank normalises a different
    ``[b, s/tp, h]`` slice, so each holds only part of the gradient of the (replicated) gain and
    bias; they are routed through
    :func:`~megatron_glm.parallel.layers.sequence_parallel_param` so backward all-reduces them
    over TP and every rank applies the same update. Without SP and with ``kernels='torch'`` it is
    exactly ``nn.LayerNorm``.
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-5,
        *,
        dims: ParallelDims | None = None,
        kernels: str = "auto",
    ) -> None:
        super().__init__(normalized_shape, eps=eps)
        self.dims = dims
        self.sequence_parallel = dims is not None and dims.sequence_parallel
        self.kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        weight = sequence_parallel_param(self.weight, self)  # [h]
        bias = sequence_parallel_param(self.bias, self)  # [h]
        return layer_norm(x, weight, bias, self.eps, kernels=self.kernels)
