"""Triton flash attention for GLM's prefix mask, forward and backward.

The mask is given by two numbers per batch row (see :mod:`megatron_glm.kernels.attention`)::

    query i may attend key j  <=>  j < valid_len and (j < sep or j <= i)

so it is never materialised. For a tile of queries ``[m0, m0 + BLOCK_M)`` two key bounds follow:

- ``hi = min(valid_len, max(sep, m0 + BLOCK_M))``: no query of the tile sees a key ``>= hi``, so key
  blocks past it are skipped (padding, and the causal upper triangle of part B);
- ``full = min(valid_len, max(sep, m0 + 1))``: every query of the tile sees every key ``< full``,
  so the key blocks below ``full`` are computed without any mask arithmetic.

Only the few key blocks in ``[full, hi)`` (the diagonal of part B, the block holding ``valid_len``)
pay for the mask. The backward pass uses the transposed bounds for its key-tile-major loop.

Numerics: the usual online softmax (FlashAttention-2) in base 2, fp32 accumulators and statistics
whatever the input dtype; the saved per-row log-sum-exp (base 2, pre-scaled) is what the backward
recomputes probabilities from. The ``q @ k^T`` and ``p @ v`` products run in the input dtype on
tensor cores for bf16/fp16; for fp32 inputs they use TF32 exactly when torch would
(``torch.backends.cuda.matmul.allow_tf32``), so ``kernels: triton`` does not change the precision
the user asked torch for. A row with no visible key (only ``valid_len == 0``) outputs zeros and gets
zero gradients, as the torch path does.

Kernels assume a unit stride on the head dimension (inputs are made so if needed) and take every
other stride as an argument, so the model's q/k/v, which are strided views of the fused QKV
projection, are read in place. The output is written in ``[b, s, heads, d]`` memory order and
returned as a ``[b, heads, s, d]`` view, so the model's ``transpose(1, 2).reshape`` that follows
is free.

Kernel bodies do not call helper functions (see :mod:`megatron_glm.kernels.dispatch`), hence the
repetition between the "full" and "masked" loops.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton.language as tl
from torch import Tensor

from megatron_glm.kernels.dispatch import interpreting, triton_kernel

SUPPORTED_HEAD_DIMS: tuple[int, ...] = (16, 32, 64, 128)
"""Head dims the kernels are built for (powers of two: a Triton block dimension must be one)."""

LOG2E: float = 1.4426950408889634


@dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes (powers of two, >= 16 for tensor cores) and warps of the three kernels."""

    fwd_m: int
    fwd_n: int
    dkdv_m: int
    dkdv_n: int
    dq_m: int
    dq_n: int
    fwd_warps: int = 4
    dkdv_warps: int = 4
    dq_warps: int = 4
    num_stages: int = 2


def default_blocks(head_dim: int, dtype: torch.dtype) -> AttentionBlocks:
    """Tile sizes by head dim and dtype.

    GPU: of a few candidates, the largest tiles that compile for sm_90 without register spills
    (bf16 d128 dK/dV: 8 bytes), per ``tools/bench/bench_kernels_compile.py`` (no GPU needed).
    Not yet tuned by timing: ``tools/bench/bench_attention.py --sweep`` does that on a GPU.
    Under the interpreter the tiles are 16, so small test shapes still span several tiles
    (and the interpreter's cost is per tile, not per element).
    """
    if interpreting():
        return AttentionBlocks(16, 16, 16, 16, 16, 16)
    if dtype == torch.float32:  # no tensor cores with ieee precision: small tiles
        if head_dim <= 64:
            return AttentionBlocks(64, 32, 16, 32, 32, 32, fwd_warps=8, dkdv_warps=8)
        return AttentionBlocks(32, 16, 16, 16, 16, 16, fwd_warps=8)
    if head_dim <= 64:
        return AttentionBlocks(128, 64, 64, 128, 128, 32, 8, 8, 8, num_stages=3)
    return AttentionBlocks(128, 32, 32, 64, 64, 32, 8, 4, 4, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: TF32 for fp32 only where torch itself would use it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit inputs


# ----------------------------------------------------------------------------- forward kernel


@triton_kernel
def _fwd_kernel(
    Q, K, V, O, LSE, SEP, VALID,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    num_heads, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program = one query tile of one (batch, head); writes O tile and LSE (base 2)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # int64 offsets: b * stride_b may exceed 2**31
    h = (pid_bh % num_heads).to(tl.int64)
    valid = tl.minimum(tl.maximum(tl.load(VALID + b).to(tl.int32), 0), seq_len)
    sep = tl.minimum(tl.maximum(tl.load(SEP + b).to(tl.int32), 0), valid)

    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)  # [BM] query positions
    cols0 = tl.arange(0, BLOCK_N)  # [BN]
    dims = tl.arange(0, HEAD_DIM)  # [D]
    row_ok = rows < seq_len
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [BM, D]
    k_base = K + b * stride_kb + h * stride_kh + dims[None, :]
    v_base = V + b * stride_vb + h * stride_vh + dims[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (scaled, base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    hi = tl.minimum(valid, tl.maximum(sep, m0 + BLOCK_M))  # keys >= hi: invisible to the tile
    full = tl.minimum(valid, tl.maximum(sep, m0 + 1))  # keys < full: visible to all of it
    full_end = (full // BLOCK_N) * BLOCK_N

    for start_n in range(0, full_end, BLOCK_N):  # fully visible key blocks: no mask
        cols = start_n + cols0
        k = tl.load(k_base + cols[:, None] * stride_ks)  # [BN, D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs)  # [BN, D]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    for start_n in range(full_end, hi, BLOCK_N):  # partially visible key blocks
        cols = start_n + cols0
        col_ok = cols < valid
        k = tl.load(k_base + cols[:, None] * stride_ks, mask=col_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = col_ok[None, :] & ((cols[None, :] < sep) | (cols[None, :] <= rows[:, None]))
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs, mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), 0.0)
    tl.store(
        O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * seq_len + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward kernels


@triton_kernel
def _bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    num_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``delta[i] = sum_d O[i, d] * dO[i, d]`` in fp32 (the softmax-backward row term)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # int64 offsets: b * stride_b may exceed 2**31
    h = (pid_bh % num_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    o = tl.load(
        O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_len + rows, tl.sum(o * do, 1), mask=row_ok)


@triton_kernel
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, SEP, VALID,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    num_heads, seq_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program = one key tile; loops over the query tiles that see it. DK/DV contiguous.

    Queries that see some key of ``[n0, n0 + BLOCK_N)``: all of them if ``n0 < sep`` (part A is
    visible to everyone), else ``i >= n0``. Query tiles that see every key of it: all if the tile
    lies within part A, else tiles starting at ``i >= n0 + BLOCK_N - 1``; none if the key tile
    reaches ``valid_len``.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # int64 offsets: b * stride_b may exceed 2**31
    h = (pid_bh % num_heads).to(tl.int64)
    valid = tl.minimum(tl.maximum(tl.load(VALID + b).to(tl.int32), 0), seq_len)
    sep = tl.minimum(tl.maximum(tl.load(SEP + b).to(tl.int32), 0), valid)

    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)  # [BN] key positions
    rows0 = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < valid
    k = tl.load(
        K + b * stride_kb + h * stride_kh + cols[:, None] * stride_ks + dims[None, :],
        mask=col_ok[:, None],
        other=0.0,
    )  # [BN, D]
    v = tl.load(
        V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vs + dims[None, :],
        mask=col_ok[:, None],
        other=0.0,
    )  # [BN, D]
    q_base = Q + b * stride_qb + h * stride_qh + dims[None, :]
    do_base = DO + b * stride_dob + h * stride_doh + dims[None, :]
    stat_base = pid_bh.to(tl.int64) * seq_len
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    num_m_end = tl.cdiv(seq_len, BLOCK_M) * BLOCK_M
    lo = tl.where(n0 < sep, 0, n0)
    lo = tl.where(n0 < valid, (lo // BLOCK_M) * BLOCK_M, num_m_end)  # no query sees padding keys
    full_from = tl.where(n0 + BLOCK_N <= sep, 0, n0 + BLOCK_N - 1)
    full_from = tl.cdiv(full_from, BLOCK_M) * BLOCK_M
    full_from = tl.where(n0 + BLOCK_N <= valid, full_from, num_m_end)
    full_from = tl.maximum(full_from, lo)

    for start_m in range(lo, full_from, BLOCK_M):  # query tiles needing the mask
        rows = start_m + rows0
        row_ok = rows < seq_len
        q = tl.load(q_base + rows[:, None] * stride_qs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BN, BM]
        visible = col_ok[:, None] & ((cols[:, None] < sep) | (cols[:, None] <= rows[None, :]))
        p_t = tl.where(visible, tl.math.exp2(qk_t - lse[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    for start_m in range(full_from, seq_len, BLOCK_M):  # fully visible query tiles
        rows = start_m + rows0
        row_ok = rows < seq_len  # bounds only: rows >= seq_len load zeros and add nothing
        q = tl.load(q_base + rows[:, None] * stride_qs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(qk_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    out_offs = stat_base * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    store_ok = (cols < seq_len)[:, None]
    tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=store_ok)


@triton_kernel
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, SEP, VALID,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    num_heads, seq_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program = one query tile; same key bounds as the forward. DQ contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # int64 offsets: b * stride_b may exceed 2**31
    h = (pid_bh % num_heads).to(tl.int64)
    valid = tl.minimum(tl.maximum(tl.load(VALID + b).to(tl.int32), 0), seq_len)
    sep = tl.minimum(tl.maximum(tl.load(SEP + b).to(tl.int32), 0), valid)

    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    stat_base = pid_bh.to(tl.int64) * seq_len
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh + dims[None, :]
    v_base = V + b * stride_vb + h * stride_vh + dims[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    hi = tl.minimum(valid, tl.maximum(sep, m0 + BLOCK_M))
    full = tl.minimum(valid, tl.maximum(sep, m0 + 1))
    full_end = (full // BLOCK_N) * BLOCK_N

    for start_n in range(0, full_end, BLOCK_N):
        cols = start_n + cols0
        k = tl.load(k_base + cols[:, None] * stride_ks)
        v = tl.load(v_base + cols[:, None] * stride_vs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    for start_n in range(full_end, hi, BLOCK_N):
        cols = start_n + cols0
        col_ok = cols < valid
        k = tl.load(k_base + cols[:, None] * stride_ks, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs, mask=col_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = col_ok[None, :] & ((cols[None, :] < sep) | (cols[None, :] <= rows[:, None]))
        p = tl.where(visible, tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(
        DQ + stat_base * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


# ----------------------------------------------------------------------------- host side


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: Tensor) -> tuple[int, int, int]:
    """Batch, head and sequence strides of a ``[b, heads, s, d]`` tensor with unit d-stride."""
    return t.stride(0), t.stride(1), t.stride(2)


def check_flash_inputs(q: Tensor, k: Tensor, v: Tensor, sep: Tensor, valid_len: Tensor) -> None:
    """Raise ValueError for inputs the kernel does not take (shapes were checked by the caller)."""
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"glm flash attention: head dim {d} is not one of {SUPPORTED_HEAD_DIMS}; "
            "use model.kernels='torch'"
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"glm flash attention: dtype {q.dtype} is not fp32, fp16 or bf16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"glm flash attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, t in (("k", k), ("v", v), ("sep", sep), ("valid_len", valid_len)):
        if t.device != q.device:
            raise ValueError(f"glm flash attention: '{name}' is on {t.device}, q on {q.device}")


class _GLMFlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the base-2 LSE; recomputes P in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        sep: Tensor,
        valid_len: Tensor,
        blocks: AttentionBlocks | None,
    ) -> Tensor:
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        b, heads, s, d = q.shape
        blk = blocks or default_blocks(d, q.dtype)
        sm_scale = 1.0 / math.sqrt(d)
        out = torch.empty(b, s, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(b * heads, s, dtype=torch.float32, device=q.device)  # [b*heads, s]
        precision = _dot_precision(q.dtype)
        grid = (math.ceil(s / blk.fwd_m), b * heads)
        _fwd_kernel[grid](
            q, k, v, out, lse, sep, valid_len,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
            heads, s, sm_scale * LOG2E,
            HEAD_DIM=d, BLOCK_M=blk.fwd_m, BLOCK_N=blk.fwd_n, DOT_PRECISION=precision,
            num_warps=blk.fwd_warps, num_stages=blk.num_stages,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, sep, valid_len)
        ctx.blocks = blk
        ctx.sm_scale = sm_scale
        return out  # [b, heads, s, d] view of [b, s, heads, d] memory

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, sep, valid_len = ctx.saved_tensors
        blk: AttentionBlocks = ctx.blocks
        sm_scale: float = ctx.sm_scale
        dout = _unit_last_stride(dout)
        b, heads, s, d = q.shape
        delta = torch.empty_like(lse)  # [b*heads, s]
        delta_m = min(blk.dq_m, 4096 // d)  # rows per program: 32 fp32 values per thread at most
        _bwd_delta_kernel[(math.ceil(s / delta_m), b * heads)](
            out, dout, delta, *_strides3(out), *_strides3(dout), heads, s,
            HEAD_DIM=d, BLOCK_M=delta_m,
        )  # fmt: skip
        dq = torch.empty(b, heads, s, d, dtype=q.dtype, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(dq)
        precision = _dot_precision(q.dtype)
        common = (heads, s, sm_scale * LOG2E, sm_scale)
        strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout))
        _bwd_dkdv_kernel[(math.ceil(s / blk.dkdv_n), b * heads)](
            q, k, v, dout, dk, dv, lse, delta, sep, valid_len, *strides, *common,
            HEAD_DIM=d, BLOCK_M=blk.dkdv_m, BLOCK_N=blk.dkdv_n, DOT_PRECISION=precision,
            num_warps=blk.dkdv_warps, num_stages=blk.num_stages,
        )  # fmt: skip
        _bwd_dq_kernel[(math.ceil(s / blk.dq_m), b * heads)](
            q, k, v, dout, dq, lse, delta, sep, valid_len, *strides, *common,
            HEAD_DIM=d, BLOCK_M=blk.dq_m, BLOCK_N=blk.dq_n, DOT_PRECISION=precision,
            num_warps=blk.dq_warps, num_stages=blk.num_stages,
        )  # fmt: skip
        return dq, dk, dv, None, None, None


def flash_glm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sep: Tensor,
    valid_len: Tensor,
    *,
    blocks: AttentionBlocks | None = None,
) -> Tensor:
    """GLM-masked attention with the Triton kernels; returns ``[b, heads, s, d]``.

    ``q, k, v``: ``[b, heads, s, d]`` (any strides; a non-unit d-stride costs a copy), fp32, fp16
    or bf16, head dim in :data:`SUPPORTED_HEAD_DIMS`. ``sep``, ``valid_len``: integer ``[b]`` on
    the same device; out-of-range values are clamped (``valid_len`` to ``[0, s]``, ``sep`` to
    ``[0, valid_len]``), which is what the mask rule gives for them anyway. ``blocks`` overrides
    the tile sizes (tests and tuning). No dropout: the caller falls back to torch for that.
    """
    check_flash_inputs(q, k, v, sep, valid_len)
    out: Tensor = _GLMFlashAttention.apply(q, k, v, sep, valid_len, blocks)
    return out
