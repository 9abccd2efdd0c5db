"""Analytic parameter and FLOP counts of a GLM config (no model is built).

``num_parameters`` counts every trainable tensor once (the tied head is the word embedding, so it
adds nothing). ``matmul_parameters`` (N_matmul) counts the weights that take part in a matrix
multiplication per token: per block QKV ``3h^2``, attention output ``h^2``, MLP ``2 h f``, plus
the tied head ``V h`` (used as a matmul once, in the output projection; the embedding *lookup* is a
gather and costs no FLOPs). Biases, LayerNorms and the position tables are excluded: they are
elementwise or lookups. Then (DESIGN.md)::

    flops_per_token = 6 * N_matmul + 12 * L * h * S

6 = 2 FLOPs per multiply-add x (1 forward + 2 backward). The attention term is QK^T and AV:
2 matmuls x 2 FLOPs x S x h per token per layer forward, x3 for backward, over the full S x S
score matrix (no credit is taken for masked blocks). These are *model* FLOPs: recomputation by
activation checkpointing is not counted, as is conventional for MFU.
"""

from __future__ import annotations

from megatron_glm.config import ModelConfig
from megatron_glm.model.glm import resolve_vocab_size


def _ffn(cfg: ModelConfig) -> int:
    assert cfg.ffn_hidden_size is not None  # filled by ModelConfig.__post_init__
    return cfg.ffn_hidden_size


def num_parameters(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """Total trainable parameters of ``build_model(cfg, vocab_size=...)``."""
    v = resolve_vocab_size(cfg, vocab_size)
    h, f, L = cfg.hidden_size, _ffn(cfg), cfg.num_layers
    embeddings = v * h + 2 * cfg.max_position_embeddings * h  # word + position + block position
    attention = (3 * h * h + 3 * h) + (h * h + h)  # QKV + dense, with biases
    mlp = (h * f + f) + (f * h + h)
    layernorms = 2 * (2 * h)
    return embeddings + L * (attention + mlp + layernorms) + 2 * h  # + final LayerNorm


def matmul_parameters(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """N_matmul: QKV, attention dense and MLP weights of every block, plus the tied head once."""
    v = resolve_vocab_size(cfg, vocab_size)
    h, f, L = cfg.hidden_size, _ffn(cfg), cfg.num_layers
    return L * (4 * h * h + 2 * h * f) + v * h


def flops_per_token(cfg: ModelConfig, vocab_size: int | None, seq_length: int) -> int:
    """Training FLOPs per token (forward + backward): ``6 * N_matmul + 12 * L * h * S``."""
    if seq_length <= 0:
        raise ValueError(f"seq_length must be > 0, got {seq_length}")
    n_matmul = matmul_parameters(cfg, vocab_size)
    return 6 * n_matmul + 12 * cfg.num_layers * cfg.hidden_size * seq_length
