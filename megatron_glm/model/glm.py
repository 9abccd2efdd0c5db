"""The GLM model as a flat list of stage-able layers, meta-device construction and init.

``GLMModel.layers = [EmbeddingLayer, GLMBlock x N, FinalLayerNorm]``; each layer maps a tuple of
tensors to a tuple (the last one to the hidden states), which is exactly what DeepSpeed's
PipelineModule needs, so the same layer classes run unpipelined (here) or as pipeline stages.
The output head is the word-embedding matrix (tied, no bias); :meth:`GLMModel.logits` applies it
and :func:`megatron_glm.model.loss.glm_loss` applies it to loss positions only.

Initialisation is deterministic *per parameter*: each parameter draws from its own CPU
``torch.Generator`` seeded from ``(seed, layer index, parameter name)``. Hence
- the weights do not depend on the device (CPU generators are used everywhere, then copied), and
- they do not depend on which layers a process materialises, so a pipeline stage that builds only
  layers 10..19 gets exactly the weights the unpipelined model has there, and
- they do not depend on the tensor-parallel size: a split parameter draws the *full* tensor from
  its generator and keeps this rank's slice, so a tp = N model equals the tp = 1 model.

Tensor parallelism (``dims``, a :class:`~megatron_glm.parallel.dims.ParallelDims`): the layers
are Megatron-style parallel layers (:mod:`megatron_glm.parallel.layers`), the word embedding and
the tied head are split by vocabulary, the position tables replicated. ``forward`` returns the
full ``[b, s, h]`` on every TP rank; ``head_weight`` is this rank's ``[vocab/tp, h]`` shard and
``glm_loss`` uses vocab-parallel cross entropy on it. The model owns its TP dropout stream
(``self.rng``, seeded by :meth:`GLMModel.init_weights`).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_glm.config import ConfigError, ModelConfig
from megatron_glm.model.embedding import EmbeddingLayer
from megatron_glm.model.kv_cache import KVCache
from megatron_glm.model.transformer import FinalLayerNorm, GLMBlock
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.layers import (
    full_shape,
    mark_tensor_parallel_parameters,
    partition_dims,
    shard_of,
)
from megatron_glm.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
)
from megatron_glm.parallel.random import ModelParallelRNG


def resolve_vocab_size(cfg: ModelConfig, vocab_size: int | None) -> int:
    """The vocabulary size to build: ``vocab_size`` (from the tokenizer) or ``cfg.vocab_size``.

    ``cfg.vocab_size == 0`` means "from the tokenizer". When both are set they must agree, since a
    silent choice between two different vocabularies would produce a model the tokenizer can
    overflow (or a checkpoint that does not load).
    """
    if vocab_size is not None and vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    if cfg.vocab_size == 0:
        if vocab_size is None:
            raise ConfigError(
                "model.vocab_size",
                "0 (= from the tokenizer) but no vocab_size was passed to build the model",
            )
        return vocab_size
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.vocab_size} but the tokenizer's padded vocab is {vocab_size}; set "
            f"model.vocab_size to 0 (take it from the tokenizer) or to {vocab_size}",
        )
    return cfg.vocab_size


class GLMModel(nn.Module):
    """GLM: embeddings (word + 2D positions), N pre-LN blocks, final LayerNorm, tied head.

    The constructor does not initialise the weights meaningfully: build under
    ``torch.device("meta")`` and call :meth:`init_weights` (that is what :func:`build_model` does).
    """

    def __init__(
        self, cfg: ModelConfig, vocab_size: int, *, dims: ParallelDims | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.dims = dims
        if dims is not None and vocab_size % dims.tp:
            raise ValueError(
                f"padded vocabulary size {vocab_size} must be divisible by parallel.tp "
                f"({dims.tp}): set config field 'model.vocab_size' to a multiple of it, or to 0 "
                "to take the tokenizer's (padded to make_vocab_size_divisible_by x tp)"
            )
        tp = 1 if dims is None else dims.tp
        self.rng = ModelParallelRNG(
            enabled=tp > 1,
            tp_rank=0 if dims is None else dims.tp_rank,
            pp_rank=0 if dims is None else dims.pp_rank,
        )
        self.layers = nn.ModuleList(
            [
                EmbeddingLayer(cfg, vocab_size, dims=dims, rng=self.rng),
                *(GLMBlock(cfg, dims=dims, rng=self.rng) for _ in range(cfg.num_layers)),
                FinalLayerNorm(cfg, dims=dims),
            ]
        )

    @property
    def tp(self) -> int:
        """Tensor-parallel size of this model (1 without ``dims``)."""
        return 1 if self.dims is None else self.dims.tp

    @property
    def embedding(self) -> EmbeddingLayer:
        """The first layer; its ``word_embeddings.weight`` is also the output head."""
        layer = self.layers[0]
        assert isinstance(layer, EmbeddingLayer)
        return layer

    @property
    def head_weight(self) -> Tensor:
        """The tied output-head matrix ``[vocab/tp, h]`` (the same Parameter as the embedding).

        Under TP, TP rank r holds rows ``[r * vocab/tp, (r+1) * vocab/tp)`` of the full head.
        """
        return self.embedding.word_embeddings.weight

    def forward(
        self,
        tokens: Tensor,
        position_ids: Tensor,
        sep: Tensor,
        valid_len: Tensor,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Hidden states after the final LayerNorm, ``[b, s, h]``.

        ``tokens`` int64 ``[b, s]``, ``position_ids`` int64 ``[b, 2, s]``, ``sep`` and
        ``valid_len`` int64 ``[b]`` (docs/design.md, "Batch contract"); ``attention_mask`` an
        optional explicit bool mask that replaces the (sep, valid_len) rule (slow finetuning
        fallback).
        """
        self._check_inputs(tokens, position_ids, sep, valid_len)
        state: tuple[Tensor, ...] = (tokens, position_ids, sep, valid_len)
        if attention_mask is not None:
            state = (*state, attention_mask)
        for layer in self.layers:
            state = layer(state)
        assert isinstance(state, Tensor)
        return state

    # ------------------------------------------------------------------ inference (KV cache)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` rows of ``capacity`` tokens (part A + B).

        The model must be in eval mode (the cached path has no dropout) and not sequence
        parallel (a decode step has one token per row, which cannot be split over the TP ranks;
        SP only changes activations, so the same weights load into a model built without it).
        """
        if self.training:
            raise ValueError("the KV-cache path is inference only: call model.eval() first")
        if self.dims is not None and self.dims.sequence_parallel:
            raise ValueError(
                "cached decoding does not run under parallel.sequence_parallel: build the "
                "inference model with sequence_parallel off (the weights are the same)"
            )
        blocks = self._blocks()
        attention = blocks[0].attention
        head_dim = attention.head_dim
        heads = attention.query_key_value.weight.shape[0] // (3 * head_dim)  # this rank's
        weight = self.head_weight
        return KVCache.allocate(
            num_layers=len(blocks),
            batch=batch,
            heads=heads,
            head_dim=head_dim,
            capacity=capacity,
            dtype=weight.dtype,
            device=weight.device,
        )

    def prefill(self, tokens: Tensor, position_ids: Tensor, sep: Tensor, cache: KVCache) -> Tensor:
        """Encode part A once into an empty ``cache``; hidden states ``[b, A, h]``.

        ``tokens`` ``[b, A]`` is part A right-padded to the longest row, ``sep`` int64 ``[b]``
        each row's length; row r attends bidirectionally over its first ``sep[r]`` tokens,
        exactly as part A does in :meth:`forward`.
        """
        if cache.length != 0:
            raise ValueError(f"prefill needs an empty cache, this one holds {cache.length} slots")
        self._check_inputs(tokens, position_ids, sep, sep)
        slots = torch.arange(tokens.shape[1], device=tokens.device)
        return self._forward_cached(tokens, position_ids, cache, slots < sep.view(-1, 1), sep)

    def decode_step(self, tokens: Tensor, position_ids: Tensor, cache: KVCache) -> Tensor:
        """Run part-B tokens ``[b, n]`` (usually n = 1) against ``cache``; hidden ``[b, n, h]``.

        Each new token attends to all of its row's part A and to the part-B tokens before it
        (itself included); ``position_ids`` ``[b, 2, n]`` are (mask position, block position).
        """
        b, n = tokens.shape
        if tuple(position_ids.shape) != (b, 2, n) or cache.batch_size != b:
            raise ValueError(
                f"decode_step: tokens {tuple(tokens.shape)}, position_ids "
                f"{tuple(position_ids.shape)} and a cache of {cache.batch_size} rows disagree"
            )
        return self._forward_cached(tokens, position_ids, cache, None, None)

    def _forward_cached(
        self,
        tokens: Tensor,
        position_ids: Tensor,
        cache: KVCache,
        valid: Tensor | None,
        prefill_sep: Tensor | None,
    ) -> Tensor:
        start, end = cache.reserve(tokens.shape[1], valid)
        # part-B queries: one mask for every layer (it depends on the slots, not the layer)
        mask = cache.decode_mask(start, end) if prefill_sep is None else None
        hidden = self.embedding((tokens, position_ids))[0]  # [b, n, h]
        for index, block in enumerate(self._blocks()):
            hidden = block.forward_cached(hidden, cache, index, prefill_sep, mask)
        cache.commit(end)
        final = self.layers[-1]
        assert isinstance(final, FinalLayerNorm)
        return final.final_layernorm(hidden)  # [b, n, h]

    def _blocks(self) -> list[GLMBlock]:
        blocks = [layer for layer in self.layers if isinstance(layer, GLMBlock)]
        return blocks

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied output head: ``[..., h] -> [..., vocab]`` (for generation and evaluation).

        Under TP every rank computes its vocabulary columns and they are all-gathered, so the
        result is the full logits on every rank (training uses ``glm_loss``, which never
        gathers them).
        """
        if self.tp == 1:
            return F.linear(hidden, self.head_weight)
        assert self.dims is not None
        group = self.dims.tp_group
        local = F.linear(copy_to_tensor_parallel_region(hidden, group), self.head_weight)
        return gather_from_tensor_parallel_region(local, group)  # [..., vocab]

    def _check_inputs(
        self, tokens: Tensor, position_ids: Tensor, sep: Tensor, valid_len: Tensor
    ) -> None:
        """Shape checks only: value checks would synchronise the device every step."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [b, s], got {tuple(tokens.shape)}")
        b, s = tokens.shape
        if tuple(position_ids.shape) != (b, 2, s):
            raise ValueError(
                f"position_ids must be [b, 2, s] = {(b, 2, s)}, got {tuple(position_ids.shape)}"
            )
        for name, t in (("sep", sep), ("valid_len", valid_len)):
            if tuple(t.shape) != (b,):
                raise ValueError(f"{name} must be [b] = ({b},), got {tuple(t.shape)}")
        if s > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {s} exceeds config field 'model.max_position_embeddings' "
                f"({self.cfg.max_position_embeddings})"
            )
        if self.dims is not None and self.dims.sequence_parallel and s % self.dims.tp:
            raise ValueError(
                f"sequence length {s} must be divisible by parallel.tp ({self.dims.tp}) with "
                "parallel.sequence_parallel (config field 'data.seq_length')"
            )

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """(Re)initialise every parameter deterministically from ``seed`` (module docstring).

        Weights ~ N(0, init_method_std); the output projections of each block (attention
        ``dense`` and MLP ``dense_4h_to_h``) ~ N(0, init_method_std / sqrt(2 * num_layers));
        biases 0; LayerNorm weight 1, bias 0. Embedding and both position tables use the plain
        std (the tied head is the embedding, so it is initialised once).
        """
        std = self.cfg.init_method_std
        out_std = std / math.sqrt(2.0 * self.cfg.num_layers)
        for index, layer in enumerate(self.layers):
            init_layer(layer, layer_index=index, seed=seed, std=std, output_std=out_std)
        self.rng.manual_seed(seed)


def _parameter_seed(seed: int, layer_index: int, name: str) -> int:
    """A 63-bit seed unique to (seed, layer, parameter), stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}/{layer_index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_layer(
    layer: nn.Module, *, layer_index: int, seed: int, std: float, output_std: float
) -> None:
    """Initialise one stage-able layer (see :meth:`GLMModel.init_weights` for the rules).

    A tensor-parallel shard is the slice of the full tensor drawn exactly as at tp = 1. This also
    (re)marks the split parameters for DeepSpeed, since materialising a meta-device model
    replaces its Parameter objects.
    """
    mark_tensor_parallel_parameters(layer)
    output_projections = getattr(layer, "OUTPUT_PROJECTIONS", ())
    for module_name, module in layer.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm):
                param.fill_(1.0 if param_name == "weight" else 0.0)
            elif param_name == "bias":
                param.zero_()
            else:
                sigma = output_std if module_name in output_projections else std
                gen = torch.Generator(device="cpu").manual_seed(
                    _parameter_seed(seed, layer_index, full_name)
                )
                shape = full_shape(module, param_name, param.shape)
                values = torch.empty(shape, dtype=torch.float32).normal_(0.0, sigma, generator=gen)
                param.copy_(shard_of(module, param_name, values))


def build_model(
    cfg: ModelConfig,
    *,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int,
    dims: ParallelDims | None = None,
) -> GLMModel:
    """Build a GLM on the meta device (no memory, no init work), materialise it, initialise it.

    ``vocab_size`` is the tokenizer's padded vocabulary (needed when ``cfg.vocab_size == 0``).
    The result is float32 in train mode on ``device``; precision casts belong to the engine.
    ``dims`` (built with process groups) gives this rank's tensor-parallel shard; None is tp = 1.
    """
    vocab = resolve_vocab_size(cfg, vocab_size)
    with torch.device("meta"):
        model = GLMModel(cfg, vocab, dims=dims)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def tensor_parallel_layout(cfg: ModelConfig) -> dict[str, int | None]:
    """``state_dict`` name -> split dimension under TP (None: replicated), for resharding.

    Read off a meta-device model, so it is exactly what the layers do. It depends on neither the
    TP size nor the vocabulary size (a placeholder vocabulary is used when the config has none).
    """
    with torch.device("meta"):
        model = GLMModel(cfg, cfg.vocab_size or 1)
    return partition_dims(model)
