"""Collectives as autograd functions: each forward paired with its conjugate backward.

Tensor parallelism moves activations between three states on the ranks of a TP group:

* *replicated*: every rank holds the same full tensor (and, by the same token, receives the same
  full gradient);
* *partial*: every rank holds a summand of the true tensor (the output of a row-parallel matmul,
  the rows of a vocab-parallel embedding), or a summand of the true gradient;
* *split*: every rank holds one slice along some dimension: the last (hidden/vocab features: the
  *tensor-parallel region*) or the sequence (the *sequence-parallel region*).

Each function below is one transition, and its backward is the transition the gradient must make
in the opposite direction (the adjoint of the forward linear map)::

    function                                  forward                  backward
    copy_to_tensor_parallel_region            identity                 all-reduce
    reduce_from_tensor_parallel_region        all-reduce               identity
    scatter_to_tensor_parallel_region         split last dim           all-gather last dim
    gather_from_tensor_parallel_region        all-gather last dim      split last dim
    scatter_to_sequence_parallel_region       split sequence           all-gather sequence
    gather_from_sequence_parallel_region      all-gather sequence      reduce-scatter sequence
                                                                       (or split, if the output
                                                                       is used replicated)
    reduce_scatter_to_sequence_parallel_region reduce-scatter sequence all-gather sequence

The process group is always an argument: nothing here knows any global layout. With a group of
one rank every function returns its input unchanged. Activations are batch-first ``[b, s, h]``,
so the sequence dimension defaults to 1; gathering or scattering a middle dimension costs one
copy to make the collective's buffer contiguous (Megatron-LM avoids it with ``[s, b, h]``; the
GLM model keeps the batch-first layout of its public API).

Collectives never write into their input: an all-reduce works on a copy, so a tensor autograd
saved elsewhere is never modified in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

SEQUENCE_DIM = 1
"""Sequence dimension of ``[b, s, h]`` activations."""


def _size(group: ProcessGroup) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: Tensor, group: ProcessGroup) -> Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    """This rank's slice of ``x`` along ``dim`` (contiguous)."""
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(
            f"cannot split dimension {dim} of size {x.shape[dim]} over {world} ranks evenly"
        )
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def _all_gather(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``: ``[.., n, ..] -> [.., world * n, ..]``."""
    world = _size(group)
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, x.contiguous(), group=group)  # ranks stacked along dim 0
    if dim == 0:
        return out
    return torch.cat(out.chunk(world, dim=0), dim=dim)


def _reduce_scatter(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    """Sum over ranks, then keep this rank's slice along ``dim``."""
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(
            f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {world} ranks"
        )
    chunks = x.chunk(world, dim=dim)
    stacked = x.contiguous() if dim == 0 else torch.cat(chunks, dim=0)  # rank r's part r-th
    out = torch.empty(chunks[0].shape, dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, stacked, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    """All-gather forward; backward reduce-scatters (partial grads) or splits (replicated)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, group: ProcessGroup, dim: int, grad_is_partial: bool
    ) -> Tensor:
        ctx.group, ctx.dim, ctx.partial = group, dim, grad_is_partial
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.partial:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tensor_parallel_region(x: Tensor, group: ProcessGroup) -> Tensor:
    """Replicated input of a TP region: identity; the gradient partials are all-reduced.

    Also used on a replicated *parameter* that each rank applies to its own sequence slice
    (LayerNorm gains under sequence parallelism): its gradient is then the sum of the slices'.
    """
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tensor_parallel_region(x: Tensor, group: ProcessGroup) -> Tensor:
    """Partial sums -> replicated sum (all-reduce); the gradient is already replicated."""
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tensor_parallel_region(x: Tensor, group: ProcessGroup) -> Tensor:
    """Replicated ``[..., n]`` -> this rank's ``[..., n / tp]`` slice of the last dimension."""
    return x if _size(group) == 1 else _Scatter.apply(x, group, x.dim() - 1)


def gather_from_tensor_parallel_region(x: Tensor, group: ProcessGroup) -> Tensor:
    """Split last dimension ``[..., n / tp]`` -> replicated ``[..., n]``."""
    return x if _size(group) == 1 else _Gather.apply(x, group, x.dim() - 1, False)


def scatter_to_sequence_parallel_region(
    x: Tensor, group: ProcessGroup, dim: int = SEQUENCE_DIM
) -> Tensor:
    """Replicated ``[b, s, h]`` -> this rank's ``[b, s / tp, h]``; backward all-gathers."""
    return x if _size(group) == 1 else _Scatter.apply(x, group, dim)


def gather_from_sequence_parallel_region(
    x: Tensor,
    group: ProcessGroup,
    dim: int = SEQUENCE_DIM,
    *,
    grad_is_partial: bool = True,
) -> Tensor:
    """``[b, s / tp, h]`` slices -> the full ``[b, s, h]`` on every rank (all-gather).

    ``grad_is_partial=True`` (the input of a column-parallel matmul): each rank's gradient is
    a partial sum, so backward reduce-scatters. ``False`` (the output is then used as a
    replicated tensor, every rank computing the same function of it): backward keeps this
    rank's slice of the already complete gradient, with no communication.
    """
    return x if _size(group) == 1 else _Gather.apply(x, group, dim, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(
    x: Tensor, group: ProcessGroup, dim: int = SEQUENCE_DIM
) -> Tensor:
    """Partial ``[b, s, h]`` -> this rank's summed ``[b, s / tp, h]``; backward all-gathers."""
    return x if _size(group) == 1 else _ReduceScatter.apply(x, group, dim)
