"""Megatron-style tensor-parallel layers that are exactly ``nn.Linear``/``nn.Embedding`` at tp = 1.

A transformer layer under TP is two pairs ``ColumnParallelLinear -> RowParallelLinear`` (QKV ->
attention output, h -> 4h -> h): the first splits its *output* features over the TP ranks (each
rank computes whole attention heads / a slice of the MLP), the second splits its *input* features
and sums the partial outputs. Between them nothing is communicated; around them:

================  =====================================  ======================================
                  tensor parallel (TP)                   TP + sequence parallel (SP)
================  =====================================  ======================================
column input      copy (backward all-reduce)             all-gather sequence (bwd reduce-scatter)
row output        all-reduce (backward identity)         reduce-scatter sequence (bwd all-gather)
LayerNorm,        on the replicated ``[b, s, h]``        on this rank's ``[b, s/tp, h]``;
dropout, residual                                        replicated gains/biases all-reduce
                                                         their gradients over TP
================  =====================================  ======================================

Parameters keep ``nn.Linear``/``nn.Embedding``'s names (``weight``, ``bias``) with local shapes,
so a tp = 1 state dict is a plain model's and a shard's keys equal the full model's. Each layer
declares how its parameters are split (:meth:`partition_dim`); :func:`shard_of` and
:func:`full_shape` let initialisation draw the *full* tensor with the tp = 1 generator and keep
this rank's slice (a tp = N model starts from exactly the tp = 1 weights), and
:func:`partition_dims` tells checkpoint resharding how to merge and split each tensor.

Split parameters carry ``tensor_model_parallel = True`` and ``partition_dim``, the attributes
DeepSpeed (gradient norm: replicated tensors counted once) and Megatron tools read.
:func:`mark_tensor_parallel_parameters` (re)sets them; it must run after materialising a model
built on the meta device, since ``to_empty`` replaces the Parameter objects.

Fused QKV. The GLM's ``query_key_value`` output is laid out ``[heads, 3, head_dim]`` (per head
q, k, v), so the contiguous column split gives rank i the block ``[q_i; k_i; v_i]`` of its
``heads / tp`` whole heads, and the full (tp = 1) checkpoint layout is the concatenation of the
shards, whatever tp is.

Bytes communicated per transformer layer: see
:func:`megatron_glm.model.flops.tensor_parallel_bytes_per_layer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_glm.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)

if TYPE_CHECKING:
    from megatron_glm.parallel.dims import ParallelDims


class _TensorParallel(nn.Module):
    """What every TP layer knows: the TP size/rank, the group (lazily) and the SP switch."""

    PARTITION_DIMS: ClassVar[dict[str, int]] = {}
    """Parameter name -> the dimension it is split along (absent: replicated)."""

    def _setup(self, dims: ParallelDims | None, sequence_parallel: bool | None) -> None:
        self.dims = dims
        self.tp = 1 if dims is None else dims.tp
        self.tp_rank = 0 if dims is None else dims.tp_rank
        sp = sequence_parallel
        if sp is None:
            sp = dims is not None and dims.sequence_parallel
        if sp and self.tp == 1:
            raise ValueError("sequence parallelism needs tp > 1")
        self.sequence_parallel = sp

    @property
    def group(self) -> torch.distributed.ProcessGroup:
        assert self.dims is not None and self.tp > 1, "no TP group at tp = 1"
        return self.dims.tp_group

    def partition_dim(self, name: str) -> int | None:
        """The dimension parameter ``name`` is split along, or None if replicated."""
        return self.PARTITION_DIMS.get(name)

    def _local(self, size: int, what: str) -> int:
        if size % self.tp:
            raise ValueError(f"{what} ({size}) must be divisible by parallel.tp ({self.tp})")
        return size // self.tp


class ColumnParallelLinear(_TensorParallel):
    """``y = x A^T + b`` with ``A`` ``[out, in]`` split by rows (output features) over TP.

    Input: replicated ``[b, s, in]`` (or ``[b, s/tp, in]`` with sequence parallelism, gathered
    here). Output: this rank's ``[b, s, out/tp]``, or the gathered ``[b, s, out]`` with
    ``gather_output``.

    ``skip_bias_add`` (Megatron-core's flag): the forward returns ``(x A^T, b)`` with this rank's
    bias ``[out/tp]`` unapplied (None without a bias), so that the next op adds it in its own
    pass (the MLP's fused bias-GeLU) instead of a separate read and write of the output.
    """

    PARTITION_DIMS: ClassVar[dict[str, int]] = {"weight": 0, "bias": 0}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dims: ParallelDims | None = None,
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        sequence_parallel: bool | None = None,
    ) -> None:
        super().__init__()
        self._setup(dims, sequence_parallel)
        if skip_bias_add and gather_output:
            raise ValueError(
                "ColumnParallelLinear: skip_bias_add returns this rank's bias slice; "
                "it cannot be combined with gather_output"
            )
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        local = self._local(out_features, "output features")
        self.weight = nn.Parameter(torch.empty(local, in_features))  # [out/tp, in]
        self.bias = nn.Parameter(torch.empty(local)) if bias else None  # [out/tp]
        mark_tensor_parallel_parameters(self)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor | None]:
        if self.tp > 1 and self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)  # [b, s, in]
        elif self.tp > 1:
            x = copy_to_tensor_parallel_region(x, self.group)
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias  # [b, s, out/tp], [out/tp]
        y = F.linear(x, self.weight, self.bias)  # [b, s, out/tp]
        if self.tp > 1 and self.gather_output:
            return gather_from_tensor_parallel_region(y, self.group)  # [b, s, out]
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp}"


class RowParallelLinear(_TensorParallel):
    """``y = x A^T + b`` with ``A`` ``[out, in]`` split by columns (input features) over TP.

    Input: this rank's ``[b, s, in/tp]`` (``input_is_parallel``) or a replicated ``[b, s, in]``
    that is split here. The partial products are all-reduced (or reduce-scattered along the
    sequence under SP); the bias is replicated and added once, after the reduction.

    ``skip_bias_add`` (Megatron-core's flag): the forward returns ``(x A^T, b)`` with the bias
    ``[out]`` unapplied (None without a bias), for the fused bias-dropout-residual add that
    follows every row-parallel layer of the block. Under SP the returned bias is already routed
    so that its gradient (partial on each sequence slice) is all-reduced over TP.
    """

    PARTITION_DIMS: ClassVar[dict[str, int]] = {"weight": 1}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dims: ParallelDims | None = None,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        sequence_parallel: bool | None = None,
    ) -> None:
        super().__init__()
        self._setup(dims, sequence_parallel)
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence parallelism needs input_is_parallel")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        local = self._local(in_features, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local))  # [out, in/tp]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # [out]
        mark_tensor_parallel_parameters(self)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor | None]:
        if self.tp == 1:
            if self.skip_bias_add:
                return F.linear(x, self.weight), self.bias
            return F.linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)  # [b, s, in/tp]
        partial = F.linear(x, self.weight)  # [b, s, out], a summand
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, self.group)  # [b, s/tp, out]
        else:
            y = reduce_from_tensor_parallel_region(partial, self.group)  # [b, s, out]
        bias = None if self.bias is None else sequence_parallel_param(self.bias, self)  # [out]
        if self.skip_bias_add:
            return y, bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp}"


class VocabParallelEmbedding(_TensorParallel):
    """Embedding table ``[vocab, h]`` split by rows (vocabulary ranges) over TP.

    Rank r owns ids ``[r * vocab/tp, (r+1) * vocab/tp)``: it looks up the tokens it owns, writes
    zeros for the others and the partial results are all-reduced. Output: replicated
    ``[b, s, h]``. The same shard is the tied output head (logits split by vocabulary, see
    :mod:`megatron_glm.parallel.cross_entropy`).

    Ids outside ``[0, vocab)`` are not checked here (a value check would synchronise the device
    every step): at tp > 1 they embed to zeros, at tp = 1 ``F.embedding`` raises. The tokenizer
    and the dataset validate ids.
    """

    PARTITION_DIMS: ClassVar[dict[str, int]] = {"weight": 0}

    def __init__(
        self, num_embeddings: int, embedding_dim: int, *, dims: ParallelDims | None = None
    ) -> None:
        super().__init__()
        self._setup(dims, sequence_parallel=False)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = self._local(num_embeddings, "padded vocabulary size")
        self.vocab_start = self.tp_rank * local
        self.vocab_end = self.vocab_start + local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))  # [vocab/tp, h]
        mark_tensor_parallel_parameters(self)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.tp == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)  # [b, s]
        local_ids = (tokens - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(partial, self.group)  # [b, s, h]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp}"


def sequence_parallel_param(param: Tensor, layer: nn.Module) -> Tensor:
    """``param`` as used on this rank's sequence slice: gradient all-reduced over TP under SP.

    For replicated parameters that act on ``[b, s/tp, h]`` slices under sequence parallelism
    (the row-parallel biases here, the LayerNorm gains and biases in
    :class:`megatron_glm.kernels.LayerNorm`): each rank's gradient is a partial sum.
    """
    dims: ParallelDims | None = getattr(layer, "dims", None)
    if not getattr(layer, "sequence_parallel", False) or dims is None:
        return param
    return copy_to_tensor_parallel_region(param, dims.tp_group)


# ----------------------------------------------------------------------------- layout helpers


def partition_dim_of(module: nn.Module, param_name: str) -> int | None:
    """The split dimension of ``module``'s own parameter ``param_name`` (None: replicated)."""
    if isinstance(module, _TensorParallel):
        return module.partition_dim(param_name)
    return None


def full_shape(module: nn.Module, param_name: str, local: torch.Size) -> torch.Size:
    """Shape of the whole (tp = 1) tensor whose shard is ``module.<param_name>``."""
    dim = partition_dim_of(module, param_name)
    if dim is None:
        return local
    tp = module.tp if isinstance(module, _TensorParallel) else 1
    shape = list(local)
    shape[dim] *= tp
    return torch.Size(shape)


def shard_of(module: nn.Module, param_name: str, full: Tensor) -> Tensor:
    """This rank's slice of the whole tensor ``full`` for ``module.<param_name>``."""
    dim = partition_dim_of(module, param_name)
    if dim is None or not isinstance(module, _TensorParallel):
        return full
    return full.chunk(module.tp, dim=dim)[module.tp_rank]


def partition_dims(model: nn.Module) -> dict[str, int | None]:
    """Every parameter (by ``state_dict`` name) -> its split dimension, None when replicated."""
    out: dict[str, int | None] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            out[full_name] = partition_dim_of(module, param_name)
    return out


def mark_tensor_parallel_parameters(model: nn.Module) -> None:
    """Set ``tensor_model_parallel``/``partition_dim`` on split parameters (tp > 1 only)."""
    for module in model.modules():
        if not isinstance(module, _TensorParallel):
            continue
        for name, param in module.named_parameters(recurse=False):
            dim = module.partition_dim(name)
            split = dim is not None and module.tp > 1
            param.tensor_model_parallel = split  # type: ignore[attr-defined]
            param.partition_dim = dim if split else -1  # type: ignore[attr-defined]


def grad_norm(parameters: Iterable[Tensor], dims: ParallelDims | None) -> Tensor:
    """L2 norm of the whole model's gradient from this rank's shards (same on every TP rank).

    Split tensors contribute their squares on every rank, replicated ones on TP rank 0 only (the
    rule DeepSpeed's clipping applies too); the sums are all-reduced over the model-parallel group.
    Use it for logging where DeepSpeed reports no norm (ZeRO-0 fp32).
    """
    squares = torch.zeros((), dtype=torch.float64)
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        split = getattr(param, "tensor_model_parallel", False)
        if split or dims is None or dims.tp_rank == 0:
            squares = squares.to(grad.device) + grad.detach().double().square().sum()
    if dims is not None and dims.tp * dims.pp > 1:
        torch.distributed.all_reduce(squares, group=dims.model_parallel_group)
    return squares.sqrt()
