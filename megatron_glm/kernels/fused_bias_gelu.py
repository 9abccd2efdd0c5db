"""Bias add + GeLU (tanh-approximated or exact erf) in one pass, forward and backward.

``bias_gelu(x, bias) = gelu_tanh(x + bias)`` (``form="erf"``: ``gelu_erf(x + bias)``) where
the MLP's first linear is applied without its bias (``ColumnParallelLinear(skip_bias_add=True)``
returns the bias unapplied, as in Megatron-core's MLP). Unfused, torch reads and writes the
``[tokens, 4h]`` activation twice (bias add, GeLU) and saves both for backward; here it is one
read and one write, and backward recomputes ``x + bias`` from the saved ``x`` (the bias gradient
is a column sum of ``dx``, left to torch). Without a bias (None) the kernel is compiled without
the bias load and no bias gradient is computed.

GeLU uses ``0.5 * (1 + tanh(z)) = sigmoid(2z)``, so ``gelu_tanh(u) = u * sigmoid(2z)`` with
``z = sqrt(2/pi) * (u + 0.044715 u^3)``; the derivative is
``s + 2 u s (1 - s) z'(u)`` with ``s = sigmoid(2z)``. The erf form (``model.gelu: erf``, what
THUDM's published GLMs compute) is ``u * Phi(u)``, ``Phi(u) = 0.5 * (1 + erf(u / sqrt 2))``, with
derivative ``Phi(u) + u * exp(-u^2 / 2) / sqrt(2 pi)``; the form is a compile-time switch
(``ERF``), so the tanh kernel is the same code as before it existed. Arithmetic is fp32 whatever
the input dtype, as in torch's CUDA kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_glm.kernels.dispatch import resolve_backend, triton_kernel

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton-less installs run the torch path only
    tl = None

BLOCK: int = 1024
"""Elements per program."""

SQRT_2_OVER_PI: float = 0.7978845608028654
GELU_FORMS: tuple[str, ...] = ("tanh", "erf")
"""``form`` values of :func:`bias_gelu` (``ModelConfig.gelu``)."""


@triton_kernel
def _bias_gelu_fwd_kernel(
    X, BIAS, Y, n_elements, n_cols, HAS_BIAS: tl.constexpr, ERF: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    u = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(BIAS + offs % n_cols, mask=ok, other=0.0).to(tl.float32)
    if ERF:
        y = u * 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    else:
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        y = u * tl.sigmoid(2.0 * z)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton_kernel
def _bias_gelu_bwd_kernel(
    X, BIAS, DY, DX, n_elements, n_cols, HAS_BIAS: tl.constexpr, ERF: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    u = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(BIAS + offs % n_cols, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    if ERF:
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        grad = cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)
    else:
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        s = tl.sigmoid(2.0 * z)
        dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * u * u)
        grad = s + 2.0 * u * s * (1.0 - s) * dz
    tl.store(DX + offs, (dy * grad).to(DX.dtype.element_ty), mask=ok)


class _BiasGeLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, erf: bool) -> Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        n, n_cols = x.numel(), x.shape[-1]
        _bias_gelu_fwd_kernel[(triton_grid(n),)](
            x, x if bias is None else bias, y, n, n_cols, HAS_BIAS=bias is not None, ERF=erf,
            BLOCK=BLOCK,
        )  # fmt: skip
        ctx.save_for_backward(x, bias)
        ctx.erf = erf
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor | None, None]:
        x, bias = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n, n_cols = x.numel(), x.shape[-1]
        _bias_gelu_bwd_kernel[(triton_grid(n),)](
            x, x if bias is None else bias, dy, dx, n, n_cols, HAS_BIAS=bias is not None,
            ERF=ctx.erf, BLOCK=BLOCK,
        )  # fmt: skip
        if bias is None or not ctx.needs_input_grad[1]:
            return dx, None, None
        dbias = dx.reshape(-1, n_cols).sum(0, dtype=torch.float32).to(bias.dtype)
        return dx, dbias, None


def triton_grid(n: int) -> int:
    """Programs for ``n`` elements at :data:`BLOCK` per program."""
    return max(1, -(-n // BLOCK))


def bias_gelu_reference(x: Tensor, bias: Tensor | None, form: str = "tanh") -> Tensor:
    """The torch reference: ``F.gelu(x + bias, approximate="tanh")`` (``form="erf"``:
    ``approximate="none"``)."""
    approximate = "none" if form == "erf" else "tanh"
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def bias_gelu(
    x: Tensor, bias: Tensor | None, *, kernels: str = "auto", form: str = "tanh"
) -> Tensor:
    """``gelu_tanh(x + bias)`` or, ``form="erf"``, ``gelu_erf(x + bias)``; ``x`` is
    ``[..., n]``, ``bias`` ``[n]`` or None (no bias)."""
    if form not in GELU_FORMS:
        raise ValueError(f"bias_gelu: form must be one of {GELU_FORMS}, got {form!r}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(
            f"bias_gelu: bias must be [{x.shape[-1]}] (the last dim of x {tuple(x.shape)}), "
            f"got {tuple(bias.shape)}"
        )
    if resolve_backend(kernels, x.device, "bias_gelu") == "torch":
        return bias_gelu_reference(x, bias, form)
    out: Tensor = _BiasGeLU.apply(x, bias, form == "erf")
    return out
