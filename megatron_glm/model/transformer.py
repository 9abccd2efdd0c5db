"""Pre-LayerNorm transformer block of GLM, and the final LayerNorm stage.

Each class is one stage-able layer: ``forward`` takes and returns a tuple of tensors (DeepSpeed
pipeline convention), ``(hidden, sep, valid_len[, attention_mask])``. The mask arguments are passed
through untouched so a PipelineModule can cut anywhere between layers.

QKV layout. The fused ``query_key_value`` output of width 3h is viewed as ``[heads, 3, d]``
(per-head interleaved, Megatron-LM's layout), not ``[3, heads, d]``: a column-parallel split of
the output dimension into contiguous blocks then hands each tensor-parallel rank whole heads with
their q, k and v, so the checkpoint layout does not depend on the TP size. The number of heads is
derived from the linear's output width, so the same code runs on a TP shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megatron_glm.config import ModelConfig
from megatron_glm.kernels import check_kernel_choice, glm_attention


class SelfAttention(nn.Module):
    """Fused QKV projection, GLM-masked attention, output projection ``dense``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.head_dim = h // cfg.num_attention_heads
        self.query_key_value = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)
        self.attention_dropout = cfg.attention_dropout
        check_kernel_choice(cfg.kernels)
        self.kernels = cfg.kernels

    def forward(
        self, hidden: Tensor, sep: Tensor, valid_len: Tensor, attention_mask: Tensor | None
    ) -> Tensor:
        b, s, _ = hidden.shape  # [b, s, h]
        qkv = self.query_key_value(hidden)  # [b, s, 3h]
        qkv = qkv.view(b, s, -1, 3, self.head_dim)  # [b, s, heads, 3, d]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # 3 x [b, heads, s, d]
        context = glm_attention(
            q,
            k,
            v,
            sep,
            valid_len,
            dropout_p=self.attention_dropout,
            training=self.training,
            attention_mask=attention_mask,
            kernels=self.kernels,
        )  # [b, heads, s, d]
        context = context.transpose(1, 2).reshape(b, s, -1)  # [b, s, h]
        return self.dense(context)


class MLP(nn.Module):
    """``h -> ffn_hidden_size -> h`` with tanh-approximated GeLU (as in GLM / Megatron)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.ffn_hidden_size is not None  # ModelConfig.__post_init__ fills it
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        inner = F.gelu(self.dense_h_to_4h(hidden), approximate="tanh")  # [b, s, ffn]
        return self.dense_4h_to_h(inner)  # [b, s, h]


class GLMBlock(nn.Module):
    """Pre-LN block: ``x + drop(attn(LN(x)))``, then ``x + drop(mlp(LN(x)))``.

    With ``activation_checkpointing`` the block's internals are recomputed in backward
    (``torch.utils.checkpoint``, non-reentrant). Checkpointing lives inside the block rather than
    in a driver loop so it also applies when the layers are wrapped in a PipelineModule. The
    checkpoint saves and restores the CPU and CUDA RNG states, so recomputed dropout masks equal
    the original ones and gradients are identical with and without it.
    """

    OUTPUT_PROJECTIONS: tuple[str, ...] = ("attention.dense", "mlp.dense_4h_to_h")
    """Submodules initialised with std / sqrt(2 * num_layers) (GPT-2 / Megatron scaling)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = nn.LayerNorm(h, eps=cfg.layernorm_epsilon)
        self.attention = SelfAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        hidden, *mask_args = inputs  # [b, s, h], then sep, valid_len[, attention_mask]
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            hidden = checkpoint(self._block, hidden, *mask_args, use_reentrant=False)
        else:
            hidden = self._block(hidden, *mask_args)
        return (hidden, *mask_args)

    def _block(
        self,
        hidden: Tensor,
        sep: Tensor,
        valid_len: Tensor,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        attn = self.attention(self.input_layernorm(hidden), sep, valid_len, attention_mask)
        hidden = hidden + self.dropout(attn)  # [b, s, h]
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + self.dropout(mlp)  # [b, s, h]


class FinalLayerNorm(nn.Module):
    """Last stage before the tied head: ``(hidden, *mask_args) -> LN(hidden)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)

    def forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        return self.final_layernorm(inputs[0])  # [b, s, h]
