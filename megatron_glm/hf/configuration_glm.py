"""Hugging Face configuration of GLM, in THUDM's field names (remote code of an export).

This file is copied verbatim into every exported folder and loaded there with
``trust_remote_code=True``, so it imports only ``transformers``. The field names are those of
THUDM's published GLM configs (glm-large, glm-10b), so a THUDM-layout folder and ours read the
same; the fields THUDM has no name for are ours:

- ``gelu_approximate``: ``"tanh"`` for models trained here (our MLP uses tanh-GeLU), ``"none"``
  for THUDM's (their HF code uses the erf form). The modeling file honours it, so an export
  gives the logits of the trained model, not those of a near neighbour.
- ``max_sequence_length``: as THUDM's, the position tables have ``max_sequence_length + 1``
  rows with ``block_position_encoding`` (a checkpoint of ours with ``max_position_embeddings``
  rows exports ``max_sequence_length = max_position_embeddings - 1``).
- ``layernorm_epsilon``, ``intermediate_size`` (THUDM fixes 4h; ours is configurable).
- ``vocab_size`` is the *padded* vocabulary (the rows of the embedding and tied head, as in
  THUDM's configs); ``real_vocab_size`` the tokenizer's size. Ids in between are padding rows:
  never produced by the tokenizer, their logits are whatever training left them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class GLMConfig(PretrainedConfig):
    """GLM (Du et al., 2022): pre-LN transformer, 2D positions, tied head."""

    model_type = "glm"
    attribute_map = {  # noqa: RUF012 (transformers reads it as a class attribute)
        "num_hidden_layers": "num_layers",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        num_layers: int = 24,
        vocab_size: int = 30592,
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        embedding_dropout_prob: float = 0.1,
        attention_dropout_prob: float = 0.1,
        output_dropout_prob: float = 0.1,
        max_sequence_length: int = 512,
        checkpoint_activations: bool = False,
        checkpoint_num_layers: int = 1,
        parallel_output: bool = True,
        relative_encoding: bool = False,
        block_position_encoding: bool = True,
        output_predict: bool = True,
        spell_length: int | None = None,
        spell_func: str = "lstm",
        attention_scale: float = 1.0,
        initializer_range: float = 0.02,
        pool_token: str = "cls",
        layernorm_epsilon: float = 1e-5,
        gelu_approximate: str = "none",
        intermediate_size: int | None = None,
        real_vocab_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {gelu_approximate!r}")
        self.num_layers = num_layers
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.embedding_dropout_prob = embedding_dropout_prob
        self.attention_dropout_prob = attention_dropout_prob
        self.output_dropout_prob = output_dropout_prob
        self.max_sequence_length = max_sequence_length
        self.checkpoint_activations = checkpoint_activations
        self.checkpoint_num_layers = checkpoint_num_layers
        self.parallel_output = parallel_output
        self.relative_encoding = relative_encoding
        self.block_position_encoding = block_position_encoding
        self.output_predict = output_predict
        self.spell_length = spell_length
        self.spell_func = spell_func
        self.attention_scale = attention_scale
        self.initializer_range = initializer_range
        self.pool_token = pool_token
        self.layernorm_epsilon = layernorm_epsilon
        self.gelu_approximate = gelu_approximate
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.real_vocab_size = real_vocab_size or vocab_size
        kwargs.setdefault("is_encoder_decoder", False)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
