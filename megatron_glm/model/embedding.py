"""The first pipeline stage: word + position + block-position embeddings (GLM's 2D positions)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_glm.config import ModelConfig


class EmbeddingLayer(nn.Module):
    """``(tokens, position_ids, sep, valid_len, *extra) -> (hidden, sep, valid_len, *extra)``.

    GLM's 2D positional encoding: row 0 of ``position_ids`` is the position in the corrupted
    text (a span's tokens share the position of its mask token), row 1 the position inside the
    span (0 for part A). Each row has its own learned table and the three embeddings are summed,
    then embedding dropout (``hidden_dropout``) is applied.

    The mask description (``sep``, ``valid_len`` and an optional explicit bool mask) rides along
    in the tuple unchanged, so every stage of a pipeline has it without side channels. The output
    head is tied to ``word_embeddings.weight`` (see ``GLMModel.logits``).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        h, p = cfg.hidden_size, cfg.max_position_embeddings
        # ``_weight=torch.empty(...)`` skips nn.Embedding's own normal_ init: the model is
        # initialised by GLMModel.init_weights anyway, and the first normal_ on the meta device
        # costs seconds of one-off torch set-up in every process.
        self.word_embeddings = nn.Embedding(vocab_size, h, _weight=torch.empty(vocab_size, h))
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
        return (self.dropout(hidden), *mask_args)
