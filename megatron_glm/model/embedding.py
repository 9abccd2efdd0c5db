"""The first pipeline stage: word + position + block-position embeddings (GLM's 2D positions)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_glm.config import ModelConfig
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.layers import VocabParallelEmbedding
from megatron_glm.parallel.mappings import scatter_to_sequence_parallel_region
from megatron_glm.parallel.random import ModelParallelRNG


class EmbeddingLayer(nn.Module):
    """``(tokens, position_ids, sep, valid_len, *extra) -> (hidden, sep, valid_len, *extra)``.

    GLM's 2D positional encoding: row 0 of ``position_ids`` is the position in the corrupted
    text (a span's tokens share the position of its mask token), row 1 the position inside the
    span (0 for part A). Each row has its own learned table and the three embeddings are summed,
    then embedding dropout (``hidden_dropout``) is applied.

    The mask description (``sep``, ``valid_len`` and an optional explicit bool mask) rides along
    in the tuple unchanged, so every stage of a pipeline has it without side channels. The output
    head is tied to ``word_embeddings.weight`` (see ``GLMModel.logits``).

    Tensor parallelism: the word table is split by vocabulary (its lookup ends in an all-reduce),
    the two position tables are replicated. Under sequence parallelism the summed ``[b, s, h]`` is
    then split along the sequence (backward all-gathers, so the replicated position tables get
    their full gradient on every rank) and dropout acts on this rank's ``[b, s/tp, h]`` slice,
    drawn from the TP-rank-private stream (different tokens, independent masks).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        *,
        dims: ParallelDims | None = None,
        rng: ModelParallelRNG | None = None,
    ) -> None:
        super().__init__()
        h, p = cfg.hidden_size, cfg.max_position_embeddings
        self.dims = dims
        self.sequence_parallel = dims is not None and dims.sequence_parallel
        self.rng = rng or ModelParallelRNG(enabled=False)
        self.word_embeddings = VocabParallelEmbedding(vocab_size, h, dims=dims)
        # ``_weight=torch.empty(...)`` skips nn.Embedding's own normal_ init: the model is
        # initialised by GLMModel.init_weights anyway, and the first normal_ on the meta device
        # costs seconds of one-off torch set-up in every process.
        self.position_embeddings = nn.Embedding(p, h, _weight=torch.empty(p, h))
        self.block_position_embeddings = nn.Embedding(p, h, _weight=torch.empty(p, h))
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        tokens, position_ids, *mask_args = inputs  # [b, s], [b, 2, s]
        hidden = (
            self.word_embeddings(tokens)
            + self.position_embeddings(position_ids[:, 0])
            + self.block_position_embeddings(position_ids[:, 1])
        )  # [b, s, h]
        if self.sequence_parallel:
            assert self.dims is not None
            hidden = scatter_to_sequence_parallel_region(hidden, self.dims.tp_group)  # [b, s/tp, h]
        split = self.sequence_parallel and self.training and self.dropout.p > 0
        with self.rng.region(split, hidden.device):
            hidden = self.dropout(hidden)
        return (hidden, *mask_args)
