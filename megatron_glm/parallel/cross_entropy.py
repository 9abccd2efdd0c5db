"""Cross entropy over logits split by vocabulary across TP ranks, never gathering them.

With the output head tied to a :class:`~megatron_glm.parallel.layers.VocabParallelEmbedding`,
rank r computes the logits of its vocabulary range only: ``[n, vocab/tp]``. Gathering them to
``[n, vocab]`` would cost ``n * vocab`` floats of communication and memory per rank (the largest
activation of a GLM). Cross entropy needs only three numbers per row from the other ranks::

    m      = max_v logit_v                      all-reduce MAX   ([n])
    Z      = sum_v exp(logit_v - m)             all-reduce SUM   ([n], fused with the next)
    z_t    = logit_target - m                   all-reduce SUM   ([n]; only the owner of the
                                                                  target id contributes)
    loss   = log Z - z_t

and its gradient is local: ``softmax_v - [v == target]`` on this rank's columns, where
``softmax_v = exp(logit_v - m) / Z``. So the communication is ``3 n`` floats per rank, in two
collectives, whatever the vocabulary size.

Vocabulary padding. The embedding has ``padded_vocab_size`` rows (a multiple of 128 x tp) so
that shards are equal; rows past the tokenizer's vocabulary are never targets. By default they
take part in the softmax like any row (Megatron-LM's behaviour; the model learns to give them no
mass). ``valid_vocab_size`` excludes them exactly (logit -inf), which makes the loss independent of
the amount of padding; a rank whose whole shard is padding then contributes nothing.

Targets must lie in ``[0, valid_vocab_size or vocab)``; one out of range raises ValueError
(torch's cross entropy raises too, and here it would silently give a wrong loss).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        group: ProcessGroup | None,
        vocab_start: int,
        valid_vocab_size: int | None,
    ) -> Tensor:
        logits = logits.float()  # [n, v_local]
        n, v_local = logits.shape
        if valid_vocab_size is not None and vocab_start + v_local > valid_vocab_size:
            ids = torch.arange(vocab_start, vocab_start + v_local, device=logits.device)
            logits = logits.masked_fill(ids >= valid_vocab_size, float("-inf"))
        row_max = logits.max(dim=-1).values  # [n]
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)  # [n, v_local]

        local_target = target - vocab_start  # [n]
        owned = (local_target >= 0) & (local_target < v_local)
        safe = local_target.masked_fill(~owned, 0)
        rows = torch.arange(n, device=logits.device)
        exp = shifted.exp()  # [n, v_local]
        sums = torch.stack(
            [exp.sum(dim=-1), shifted[rows, safe].masked_fill(~owned, 0.0)]
        )  # [2, n]: (Z partial, z_target partial)
        if group is not None:
            dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums[0], sums[1]
        exp.div_(sum_exp.unsqueeze(-1))  # softmax over the full vocabulary, local columns
        ctx.save_for_backward(exp, safe, owned)
        return sum_exp.log() - target_logit  # [n]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        softmax, safe, owned = ctx.saved_tensors
        grad_logits = softmax.clone()  # [n, v_local]
        rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
        grad_logits[rows, safe] -= owned.to(grad_logits.dtype)
        grad_logits.mul_(grad.unsqueeze(-1))
        return grad_logits, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    group: ProcessGroup | None,
    *,
    vocab_start: int,
    vocab_size: int,
    valid_vocab_size: int | None = None,
) -> Tensor:
    """Per-row cross entropy ``[n]`` (float32) from this rank's logit columns.

    Args:
        logits: ``[n, vocab/tp]``, columns ``[vocab_start, vocab_start + vocab/tp)`` of the full
            logits (any float dtype; computed in float32).
        target: int64 ``[n]``, ids in the *full* vocabulary.
        group: the TP group; None for a single rank (then this is plain cross entropy).
        vocab_start: first id of this rank's columns.
        vocab_size: full (padded) vocabulary size, for the target range check.
        valid_vocab_size: ids at or past it are padding, excluded from the softmax.

    The result is the same on every TP rank; the gradient w.r.t. ``logits`` is this rank's
    columns of the full gradient.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"vocab_parallel_cross_entropy: logits must be [n, v] and target [n], got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    limit = vocab_size if valid_vocab_size is None else valid_vocab_size
    if not 0 < limit <= vocab_size:
        raise ValueError(
            f"vocab_parallel_cross_entropy: valid_vocab_size {valid_vocab_size} not in "
            f"(0, {vocab_size}]"
        )
    if target.numel():
        low, high = (int(x) for x in torch.aminmax(target))
        if low < 0 or high >= limit:
            raise ValueError(
                f"vocab_parallel_cross_entropy: target ids must be in [0, {limit}), "
                f"got {low}..{high}"
            )
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_start, valid_vocab_size)
