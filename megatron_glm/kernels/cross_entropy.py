"""Fused linear + cross entropy on loss positions, in row chunks, vocab-parallel aware.

``fused_cross_entropy(hidden, weight, targets, weights)`` returns ``sum_i weights[i] * CE_i`` for
``logits = hidden @ weight.T`` without ever holding the ``[rows, vocab]`` logits (let alone their
fp32 copy and fp32 softmax gradient, which eager ``F.linear(...).float()`` + ``F.cross_entropy``
keeps alive until backward). Rows are processed in chunks:

1. ``logits_c = hidden_c @ weight.T`` in the input dtype (cuBLAS), exactly the rounding of the eager
   path ``F.linear(hidden, weight).float()``;
2. per-row max, sum of exponentials (relative to the max) and target logit, in fp32; with a
   vocab-parallel head (``tp_group``: each rank holds a contiguous ``[vocab / tp, h]`` slice
   starting at ``vocab_start``) the max is all-reduced with MAX, then the rescaled sums and the
   target logit (held by exactly one rank) with SUM;
3. ``CE = log(sumexp) + max - target_logit``;
4. when gradients are needed, the chunk's logit gradient ``weights * (softmax - onehot)`` overwrites
   the logits in place, and ``dhidden_c = g_c @ weight``, ``dweight += g_c.T @ hidden_c``.

The gradients are thus computed in the forward pass (as Liger-Kernel does) and only scaled by the
incoming scalar gradient in backward: that saves recomputing the logits (a third of the head's
FLOPs) at the cost of holding ``dweight`` from forward to backward. Under ``torch.no_grad`` (or
when nothing requires grad) step 4 is skipped. ``dhidden`` is this rank's partial sum over its
vocab slice; the all-reduce over the TP group belongs to the autograd op that replicated
``hidden`` (Megatron's copy-to-tensor-parallel region), as for any vocab-parallel head.

Steps 2 and 4 are a Triton kernel each (one program per row, looping over the vocab in blocks:
the logits are read twice and written once) or the same arithmetic in torch (the reference and the
CPU path), chosen by ``model.kernels``. ``dweight`` is accumulated over chunks by ``addmm_`` in
the weight dtype: fp32 accumulation inside each chunk's GEMM and one rounding per chunk (as
Liger-Kernel does); with a single chunk it is exactly eager's single GEMM.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_glm.kernels.dispatch import next_power_of_2, resolve_backend, triton_kernel

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton-less installs (e.g. macOS) run the torch path only
    tl = None

CHUNK_BYTES: int = 128 * 2**20
"""Default bound on one chunk's logits (input dtype): 1334 rows at vocab 50304 in bf16. Small next
to eager's ``[rows, vocab]`` fp32 tensors, large enough that a micro-batch's loss positions take
few chunks (each adds one GEMM launch and, for 16-bit weights, one rounding of ``dweight``)."""


class CrossEntropyOutput(NamedTuple):
    """Result of :func:`fused_cross_entropy`."""

    sum_loss: Tensor
    """Scalar float32 ``sum(weights * CE)``, differentiable w.r.t. hidden and weight."""
    per_row: Tensor
    """float32 ``[rows]`` of unweighted CE, detached (for per-objective statistics)."""


# ----------------------------------------------------------------------------- Triton kernels


@triton_kernel
def _ce_stats_kernel(
    LOGITS, stride_row, TARGETS, MAX, SUMEXP, TARGET_LOGIT,
    vocab, vocab_start,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One program per row: online max / sum-exp over the row, and the local target logit."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running max
    s = tl.zeros([BLOCK_V], tl.float32)  # per-lane running sum of exp(x - m)
    for start in range(0, vocab, BLOCK_V):
        cols = start + cols0
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only padding
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    row_max = tl.max(m, 0)
    row_sum = tl.sum(s * tl.exp(m - row_max), 0)
    target = tl.load(TARGETS + row) - vocab_start
    in_slice = (target >= 0) & (target < vocab)
    t_logit = tl.load(base + tl.where(in_slice, target, 0)).to(tl.float32)
    tl.store(MAX + row, row_max)
    tl.store(SUMEXP + row, row_sum)
    tl.store(TARGET_LOGIT + row, tl.where(in_slice, t_logit, 0.0))


@triton_kernel
def _ce_grad_kernel(
    LOGITS, stride_row, TARGETS, LSE, SCALE,
    vocab, vocab_start,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One program per row: ``logits <- scale * (softmax(logits) - onehot(target))`` in place."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    cols0 = tl.arange(0, BLOCK_V)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    target = tl.load(TARGETS + row) - vocab_start
    for start in range(0, vocab, BLOCK_V):
        cols = start + cols0
        ok = cols < vocab
        x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(base + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=ok)


def _triton_stats(
    logits: Tensor, targets: Tensor, vocab_start: int
) -> tuple[Tensor, Tensor, Tensor]:
    rows, vocab = logits.shape
    out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)  # max, sumexp, target
    block = min(4096, next_power_of_2(vocab))
    _ce_stats_kernel[(rows,)](
        logits, logits.stride(0), targets, out[0], out[1], out[2], vocab, vocab_start,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    return out[0], out[1], out[2]


def _triton_grad_(
    logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, vocab_start: int
) -> None:
    rows, vocab = logits.shape
    block = min(4096, next_power_of_2(vocab))
    _ce_grad_kernel[(rows,)](
        logits, logits.stride(0), targets, lse, scale, vocab, vocab_start,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip


# ----------------------------------------------------------------------------- torch reference


def _torch_stats(
    logits: Tensor, targets: Tensor, vocab_start: int
) -> tuple[Tensor, Tensor, Tensor]:
    x = logits.float()  # [c, V]
    row_max = x.max(dim=1).values  # [c]
    sumexp = torch.exp(x - row_max[:, None]).sum(dim=1)  # [c]
    local = targets - vocab_start
    in_slice = (local >= 0) & (local < x.shape[1])
    t_logit = x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)
    return row_max, sumexp, torch.where(in_slice, t_logit, torch.zeros_like(t_logit))


def _torch_grad_(
    logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, vocab_start: int
) -> None:
    g = torch.exp(logits.float() - lse[:, None])  # [c, V] softmax
    local = targets - vocab_start
    in_slice = (local >= 0) & (local < g.shape[1])
    rows = torch.nonzero(in_slice).squeeze(1)
    g[rows, local[rows]] -= 1.0
    logits.copy_(g * scale[:, None])


# ----------------------------------------------------------------------------- the algorithm


def _global_lse_and_ce(
    row_max: Tensor, sumexp: Tensor, t_logit: Tensor, tp_group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor]:
    """Combine per-slice statistics across the TP group; returns (lse, CE), fp32 ``[c]``."""
    if tp_group is not None:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        sums = torch.stack([sumexp * torch.exp(row_max - global_max), t_logit])  # [2, c]
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
        row_max, sumexp, t_logit = global_max, sums[0], sums[1]
    lse = row_max + torch.log(sumexp)
    return lse, lse - t_logit


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one chunk's logits stay under :data:`CHUNK_BYTES`."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return max(16, CHUNK_BYTES // (vocab * itemsize))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and (if needed) both gradients; backward scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        weights: Tensor,
        use_triton: bool,
        tp_group: dist.ProcessGroup | None,
        vocab_start: int,
        chunk_rows: int,
    ) -> tuple[Tensor, Tensor]:
        needs = ctx.needs_input_grad
        want_grad = bool(needs[0] or needs[1])
        rows = hidden.shape[0]
        per_row = torch.empty(rows, dtype=torch.float32, device=hidden.device)  # [n]
        grad_hidden = torch.empty_like(hidden) if want_grad else None  # [n, h]
        grad_weight: Tensor | None = None  # [V, h], created by the first chunk
        stats, grad_ = (
            (_triton_stats, _triton_grad_) if use_triton else (_torch_stats, _torch_grad_)
        )
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            x = hidden[start:stop]  # [c, h]
            t = targets[start:stop]  # [c]
            logits = x @ weight.t()  # [c, V] in the input dtype
            lse, ce = _global_lse_and_ce(*stats(logits, t, vocab_start), tp_group)
            per_row[start:stop] = ce
            if grad_hidden is None:
                continue
            grad_(logits, t, lse, weights[start:stop].float(), vocab_start)  # logits <- dL/dlogits
            torch.mm(logits, weight, out=grad_hidden[start:stop])
            if grad_weight is None:
                grad_weight = logits.t() @ x  # the eager rounding when there is one chunk
            else:
                grad_weight.addmm_(logits.t(), x)  # fp32 accumulate in the GEMM, then round
        if grad_hidden is not None and grad_weight is None:  # no rows
            grad_weight = torch.zeros_like(weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(per_row)
        sum_loss = (per_row * weights.float()).sum()
        return sum_loss, per_row

    @staticmethod
    def backward(ctx: Any, grad_sum: Tensor, _grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # A 0-dim fp32 factor keeps the bf16/fp16 dtype; the product is formed in fp32.
        dh = grad_hidden * grad_sum if needs[0] else None
        dw = grad_weight * grad_sum if needs[1] else None
        return dh, dw, None, None, None, None, None, None


def _check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_cross_entropy: hidden must be [rows, h] and weight [vocab, h], got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],) or weights.shape != (hidden.shape[0],):
        raise ValueError(
            f"fused_cross_entropy: targets {tuple(targets.shape)} and weights "
            f"{tuple(weights.shape)} must both be [rows] = ({hidden.shape[0]},)"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"fused_cross_entropy: targets must be integer, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"fused_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes "
            "differ"
        )


def fused_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    kernels: str = "auto",
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    chunk_rows: int | None = None,
    check_ids: bool = False,
) -> CrossEntropyOutput:
    """Weighted cross entropy of ``hidden @ weight.T`` without materialising the logits.

    Args:
        hidden: ``[rows, h]``, the hidden states at loss positions only (gathered by the caller).
        weight: ``[vocab, h]`` output head (this rank's vocab slice under tensor parallelism).
        targets: integer ``[rows]``, global vocabulary ids in ``[0, vocab * tp)``.
        weights: ``[rows]`` loss weights (the loss mask values).
        kernels: ``model.kernels`` (auto|triton|torch).
        tp_group: the tensor-parallel group when ``weight`` is a vocab slice, else None.
        vocab_start: first global id of this rank's slice.
        chunk_rows: rows per chunk (default: :func:`default_chunk_rows`).
        check_ids: raise ValueError for a target outside ``[0, vocab * tp)``. Off by default:
            the check reads the id range back to the host, a device sync per call; the training
            data is range-checked when batches are built instead.
    """
    _check_inputs(hidden, weight, targets, weights)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    if check_ids and targets.numel():
        low, high = (int(x) for x in torch.aminmax(targets))
        if low < 0 or high >= weight.shape[0] * tp:
            raise ValueError(
                f"fused_cross_entropy: targets must be in [0, {weight.shape[0] * tp}), "
                f"got {low}..{high}"
            )
    chunk = chunk_rows or default_chunk_rows(weight.shape[0], weight.dtype)
    if chunk <= 0:
        raise ValueError(f"fused_cross_entropy: chunk_rows must be > 0, got {chunk_rows}")
    use_triton = resolve_backend(kernels, hidden.device, "cross_entropy") == "triton"
    sum_loss, per_row = _FusedLinearCrossEntropy.apply(
        hidden, weight, targets, weights, use_triton, tp_group, vocab_start, chunk
    )
    return CrossEntropyOutput(sum_loss=sum_loss, per_row=per_row)
