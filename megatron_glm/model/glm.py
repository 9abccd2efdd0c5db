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
  layers 10..19 gets exactly the weights the unpipelined model has there.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.embedding import EmbeddingLayer
from megatron_glm.model.transformer import FinalLayerNorm, GLMBlock


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
            raise ValueError(
                "config field 'model.vocab_size' is 0 (= from the tokenizer) but no vocab_size "
                "was passed to build the model"
            )
        return vocab_size
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        raise ValueError(
            f"config field 'model.vocab_size' is {cfg.vocab_size} but the tokenizer's padded vocab "
            f"is {vocab_size}; set model.vocab_size to 0 (take it from the tokenizer) or to "
            f"{vocab_size}"
        )
    return cfg.vocab_size


class GLMModel(nn.Module):
    """GLM: embeddings (word + 2D positions), N pre-LN blocks, final LayerNorm, tied head.

    The constructor does not initialise the weights meaningfully: build under
    ``torch.device("meta")`` and call :meth:`init_weights` (that is what :func:`build_model` does).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.layers = nn.ModuleList(
            [
                EmbeddingLayer(cfg, vocab_size),
                *(GLMBlock(cfg) for _ in range(cfg.num_layers)),
                FinalLayerNorm(cfg),
            ]
        )

    @property
    def embedding(self) -> EmbeddingLayer:
        """The first layer; its ``word_embeddings.weight`` is also the output head."""
        layer = self.layers[0]
        assert isinstance(layer, EmbeddingLayer)
        return layer

    @property
    def head_weight(self) -> Tensor:
        """The tied output-head matrix ``[vocab, h]`` (the same Parameter as the embedding)."""
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
        ``valid_len`` int64 ``[b]`` (DESIGN.md, "Batch contract"); ``attention_mask`` an optional
        explicit bool mask that replaces the (sep, valid_len) rule (slow finetuning fallback).
        """
        self._check_inputs(tokens, position_ids, sep, valid_len)
        state: tuple[Tensor, ...] = (tokens, position_ids, sep, valid_len)
        if attention_mask is not None:
            state = (*state, attention_mask)
        for layer in self.layers:
            state = layer(state)
        assert isinstance(state, Tensor)
        return state

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied output head: ``[..., h] -> [..., vocab]`` (for generation and evaluation)."""
        return F.linear(hidden, self.head_weight)

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


def _parameter_seed(seed: int, layer_index: int, name: str) -> int:
    """A 63-bit seed unique to (seed, layer, parameter), stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}/{layer_index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_layer(
    layer: nn.Module, *, layer_index: int, seed: int, std: float, output_std: float
) -> None:
    """Initialise one stage-able layer (see :meth:`GLMModel.init_weights` for the rules)."""
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
                values = torch.empty(param.shape, dtype=torch.float32).normal_(
                    0.0, sigma, generator=gen
                )
                param.copy_(values)


def build_model(
    cfg: ModelConfig,
    *,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int,
) -> GLMModel:
    """Build a GLM on the meta device (no memory, no init work), materialise it, initialise it.

    ``vocab_size`` is the tokenizer's padded vocabulary (needed when ``cfg.vocab_size == 0``).
    The result is float32 in train mode on ``device``; precision casts belong to the engine.
    """
    vocab = resolve_vocab_size(cfg, vocab_size)
    with torch.device("meta"):
        model = GLMModel(cfg, vocab)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
