"""The engine's weights as one plain ``GLMModel`` on every rank, for decoding at any layout.

Generation (``megatron_glm.generation``) runs a ``GLMModel``: every layer, token by token, with
a KV cache, TP ranks together. Training may hold the model otherwise: one pipeline stage's
layers per rank, ZeRO-3 partitions of every parameter over the data-parallel group, or layers
built for sequence parallelism (which splits activations, not weights). :func:`whole_model`
builds, collectively, a ``GLMModel`` holding this TP rank's shard of *all* layers, with sequence
parallelism off, that the TP group decodes with as :mod:`megatron_glm.inference`'s tp-N model
does:

- unpipelined, no ZeRO-3: the engine's own tensors (no copy; only the module object is new);
- ZeRO-3: each parameter gathered over the data-parallel group in turn and copied
  (``compat.deepspeed.full_weight``);
- pipelined: each layer's parameters broadcast over the pipeline group from the stage that
  owns the layer (the tied embedding from the first stage).

Memory. The copy exists only while a decode runs (the caller drops it) and is weights only:
this TP rank's shard of the whole model, ``4 P / tp`` bytes in fp32 (``P`` parameters), and
nothing at all unpipelined without ZeRO-3. Training keeps 16 bytes per local parameter
(weights, gradients, Adam's two moments) for ``P / (tp pp)`` parameters, so without ZeRO the
copy is no larger than what training already uses up to pp 4; ZeRO and deeper pipelines exist
to hold less than that, and for them the copy is the price of decoding. Peak use is the copy plus
one parameter in flight (gathered or broadcast one at a time). The alternatives that keep only
a stage or a partition resident -- re-gathering every layer at every generated token, or a
pipelined decode passing activations stage to stage per token -- pay a collective per layer per
token instead; decoding a validation split is short next to training, so the copy is the
simpler and faster choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_glm.compat.deepspeed import full_weight
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.training.checkpoint.deepspeed_files import glm_name, split_layer_name


@torch.no_grad()
def whole_model(
    module: nn.Module,
    dims: ParallelDims,
    cfg: ModelConfig,
    vocab_size: int,
    *,
    parts: Sequence[int] | None = None,
) -> GLMModel:
    """Collective (every rank of the world): this TP rank's shard of every layer of
    ``module`` (the engine's module; a ``PipelineModule`` when ``parts``, the stage
    boundaries, is given) as a ``GLMModel`` in eval mode, sequence parallelism off."""
    decode_dims = replace(dims, sequence_parallel=False)
    with torch.device("meta"):
        model = GLMModel(replace(cfg, activation_checkpointing=False), vocab_size, dims=decode_dims)
    pipeline = parts is not None
    local = {glm_name(n, pipeline=pipeline): p for n, p in module.named_parameters()}
    state: dict[str, Tensor] = {}
    for name, meta in model.named_parameters():  # the same order on every rank
        if parts is None:
            state[name] = full_weight(local[name])
        else:
            state[name] = _from_owner_stage(name, meta.shape, local, dims, parts)
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False)  # new Parameter objects: the engine's keep their flags
    model.rng.manual_seed(0)  # eval mode draws no dropout mask; fork only needs a seed
    return model.eval()


def _from_owner_stage(
    name: str,
    shape: torch.Size,
    local: Mapping[str, Tensor],
    dims: ParallelDims,
    parts: Sequence[int],
) -> Tensor:
    """Collective over the pipeline group: ``name`` broadcast from the stage running its layer
    (stage ``s`` runs layers ``[parts[s], parts[s + 1])``; the tied head's copy on the last
    stage is not used, the embedding on the first stage is the same tensor)."""
    layer, _ = split_layer_name(name)
    owner = next(s for s in range(dims.pp) if parts[s] <= layer < parts[s + 1])
    src = dims.global_rank(tp_rank=dims.tp_rank, dp_rank=dims.dp_rank, pp_rank=owner)
    if dims.pp_rank == owner:
        value = local[name].detach()
    else:
        like = next(iter(local.values()))
        value = torch.empty(shape, dtype=like.dtype, device=like.device)
    dist.broadcast(value, src, group=dims.pp_group)
    return value
