"""GLM for Hugging Face ``transformers`` (remote code of an export; torch and transformers only).

Module and parameter names are THUDM's (``glm.word_embeddings``, ``glm.transformer.layers.N.
attention.query_key_value``, ...), so the weights of THUDM's published GLM folders and of our
exports load into the same classes. The fused QKV is THUDM's ``[Q of all heads; K; V]`` (our
trainer keeps it per head, ``[heads, 3, d]``; the exporter permutes the rows).

Inputs follow THUDM's code: ``input_ids [b, s]``, ``position_ids [b, 2, s]`` (row 0 the position
in the corrupted text, row 1 the position inside a span: GLM's 2D encoding) and
``attention_mask`` either the per-row length of part A (``sep``, shape ``[b]`` or ``[b, 1]``):
query i sees key j iff ``j < sep or j <= i``, or a full mask ``[b, s, s]`` / ``[b, 1, s, s]``
(nonzero or True = may attend). A query row that sees no key outputs zeros, as in our trainer.
The GeLU is erf or tanh as ``config.gelu_approximate`` says (ours trains with tanh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.utils import ModelOutput

from .configuration_glm import GLMConfig


@dataclass
class GLMModelOutput(ModelOutput):
    """THUDM's output of ``GLMModel``: final hidden states and, with output_predict, logits."""

    last_hidden_states: Tensor | None = None
    logits: Tensor | None = None
    mems: list[Tensor] | None = None


def build_attention_mask(
    attention_mask: Tensor | None, b: int, s: int, device: torch.device
) -> Tensor:
    """Bool ``[b, 1, s, s]`` (True = may attend) from THUDM's ``sep`` form or a full mask.

    ``None`` is ``sep = 0`` (left to right), as in THUDM's code.
    """
    if attention_mask is None:
        attention_mask = torch.zeros(b, dtype=torch.long, device=device)
    if attention_mask.dim() == 2 and attention_mask.shape[1] == 1 and s != 1:
        attention_mask = attention_mask[:, 0]
    if attention_mask.dim() == 1:
        pos = torch.arange(s, device=device)
        sep = attention_mask.to(device).long().view(b, 1, 1)
        mask = (pos.view(1, 1, s) < sep) | (pos.view(1, 1, s) <= pos.view(1, s, 1))
        return mask.unsqueeze(1)
    if attention_mask.dim() == 3:
        attention_mask = attention_mask.unsqueeze(1)
    if attention_mask.dim() != 4 or tuple(attention_mask.shape[2:]) != (s, s):
        raise ValueError(
            "attention_mask must be sep [b] / [b, 1] or a full mask [b, s, s] / [b, 1, s, s] with "
            f"s={s}, got {tuple(attention_mask.shape)}"
        )
    return attention_mask.to(device) != 0


class SelfAttention(nn.Module):
    """Fused QKV (THUDM's order: all Q rows, then all K, then all V), attention, ``dense``."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.query_key_value = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)
        self.attention_dropout = config.attention_dropout_prob
        self.output_dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        b, s, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [b, heads, s, d]
        has_key = mask.any(dim=-1, keepdim=True)  # [b, 1, s, 1]
        p = self.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, dropout_p=p)
        context = context * has_key.to(context.dtype)  # a row that sees nothing gives zeros
        return self.output_dropout(self.dense(context.transpose(1, 2).reshape(b, s, -1)))


class MLP(nn.Module):
    """``h -> intermediate -> h`` with GeLU in the form the config names."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = config.gelu_approximate
        self.dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, hidden: Tensor) -> Tensor:
        inner = F.gelu(self.dense_h_to_4h(hidden), approximate=self.approximate)
        return self.dropout(self.dense_4h_to_h(inner))


class GLMBlock(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = MLP(config)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        hidden = hidden + self.attention(self.input_layernorm(hidden), mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GLMStack(nn.Module):
    """Position tables (GLM's 2D encoding), the blocks and the final LayerNorm."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        # THUDM's GLMStack: max_sequence_length + 1 rows with block positions (a span of the
        # longest row has block positions up to max_sequence_length), else max_sequence_length
        self.block_position_encoding = config.block_position_encoding
        h = config.hidden_size
        p = config.max_sequence_length + int(config.block_position_encoding)
        self.position_embeddings = nn.Embedding(p, h)
        if config.block_position_encoding:
            self.block_position_embeddings = nn.Embedding(p, h)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(h, eps=config.layernorm_epsilon)

    def forward(self, hidden: Tensor, position_ids: Tensor, mask: Tensor) -> Tensor:
        hidden = hidden + self.position_embeddings(position_ids[:, 0])
        if self.block_position_encoding:
            hidden = hidden + self.block_position_embeddings(position_ids[:, 1])
        hidden = self.embedding_dropout(hidden)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.final_layernorm(hidden)


class GLMPreTrainedModel(PreTrainedModel):
    """Weight init and loading conventions shared by the GLM classes."""

    config_class = GLMConfig
    base_model_prefix = "glm"
    _no_split_modules = ["GLMBlock"]  # noqa: RUF012

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


def default_position_ids(input_ids: Tensor) -> Tensor:
    """``[b, 2, s]``: 0..s-1 in row 0, zeros in row 1 (plain left-to-right text)."""
    b, s = input_ids.shape
    pos = torch.arange(s, device=input_ids.device).expand(b, s)
    return torch.stack([pos, torch.zeros_like(pos)], dim=1)


class GLMModel(GLMPreTrainedModel):
    """THUDM's ``GLMModel``: word embeddings, the stack, and logits from the tied embedding."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__(config)
        self.output_predict = config.output_predict
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = GLMStack(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        assert isinstance(value, nn.Embedding)
        self.word_embeddings = value

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: object,
    ) -> GLMModelOutput:
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        if tuple(position_ids.shape) != (b, 2, s):
            raise ValueError(
                f"position_ids must be [b, 2, s] = {(b, 2, s)}, got {tuple(position_ids.shape)}"
            )
        mask = build_attention_mask(attention_mask, b, s, input_ids.device)
        hidden = self.transformer(self.word_embeddings(input_ids), position_ids, mask)
        logits = F.linear(hidden, self.word_embeddings.weight) if self.output_predict else None
        return GLMModelOutput(last_hidden_states=hidden, logits=logits, mems=[])


class GLMForConditionalGeneration(GLMPreTrainedModel):
    """GLM with the tied head; ``labels`` (aligned with the inputs, -100 ignored) give a loss."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__(config)
        self.glm = GLMModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.glm.word_embeddings

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: object,
    ) -> Seq2SeqLMOutput:
        out = self.glm(input_ids, position_ids, attention_mask)
        logits = out.logits
        if logits is None:
            logits = F.linear(out.last_hidden_states, self.glm.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100
            )
        return Seq2SeqLMOutput(loss=loss, logits=logits)


__all__ = ["GLMForConditionalGeneration", "GLMModel", "GLMPreTrainedModel", "build_attention_mask"]
