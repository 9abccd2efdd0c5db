"""Pre-LayerNorm transformer block of GLM, and the final LayerNorm stage.

Each class is one stage-able layer: ``forward`` takes and returns a tuple of tensors (DeepSpeed
pipeline convention), ``(hidden, sep, valid_len[, attention_mask])``. The mask arguments are passed
through untouched so a PipelineModule can cut anywhere between layers.

QKV layout. The fused ``query_key_value`` output of width 3h is viewed as ``[heads, 3, d]``
(per-head interleaved, Megatron-LM's layout), not ``[3, heads, d]``: a column-parallel split of
the output dimension into contiguous blocks then hands each tensor-parallel rank whole heads with
their q, k and v, so the checkpoint layout does not depend on the TP size. The number of heads is
derived from the linear's output width, so the same code runs on a TP shard.

Tensor parallelism (``dims.tp > 1``): QKV and ``dense_h_to_4h`` are column-parallel, ``dense``
and ``dense_4h_to_h`` row-parallel (:mod:`megatron_glm.parallel.layers`), so each rank runs
``heads / tp`` whole heads and ``ffn / tp`` MLP columns. Attention dropout acts on this rank's
heads and is drawn from the TP-rank-private stream; the residual dropout acts on the replicated
stream (default generator, the same mask on every TP rank) -- or, under sequence parallelism, on
this rank's ``[b, s/tp, h]`` slice (private stream). Under sequence parallelism the block's input
and output are ``[b, s/tp, h]``; the LayerNorms run on the slice.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_glm.config import ModelConfig
from megatron_glm.kernels import (
    DropoutAdd,
    LayerNorm,
    bias_gelu,
    check_kernel_choice,
    glm_attention,
    glm_decode_attention,
)
from megatron_glm.model.kv_cache import KVCache
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_glm.parallel.mappings import gather_from_sequence_parallel_region
from megatron_glm.parallel.random import ModelParallelRNG, checkpoint


class SelfAttention(nn.Module):
    """Fused QKV projection, GLM-masked attention, output projection ``dense``.

    Returns ``(output, bias)``: ``dense`` skips its bias add (Megatron's ``skip_bias_add``), the
    block adds it in the fused bias-dropout-residual pass.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dims: ParallelDims | None = None,
        rng: ModelParallelRNG | None = None,
    ) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.head_dim = h // cfg.num_attention_heads
        if dims is not None:
            dims.check_divisible("model.num_attention_heads", cfg.num_attention_heads)
        self.query_key_value = ColumnParallelLinear(h, 3 * h, dims=dims)
        self.dense = RowParallelLinear(h, h, dims=dims, input_is_parallel=True, skip_bias_add=True)
        self.tensor_parallel = dims is not None and dims.tp > 1
        self.rng = rng or ModelParallelRNG(enabled=False)
        self.attention_dropout = cfg.attention_dropout
        check_kernel_choice(cfg.kernels)
        self.kernels = cfg.kernels

    def forward(
        self, hidden: Tensor, sep: Tensor, valid_len: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        qkv = self.query_key_value(hidden)  # [b, s, 3h/tp] (SP: gathered from [b, s/tp, h])
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, -1, 3, self.head_dim)  # [b, s, heads/tp, 3, d]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # 3 x [b, heads/tp, s, d]
        draws = self.training and self.attention_dropout > 0
        with self.rng.region(self.tensor_parallel and draws, qkv.device):
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
            )  # [b, heads/tp, s, d]
        context = context.transpose(1, 2).reshape(b, s, -1)  # [b, s, h/tp]
        out, bias = self.dense(context)  # [b, s, h] (SP: [b, s/tp, h]), [h] unapplied
        return out, bias

    def forward_cached(
        self,
        hidden: Tensor,
        cache: KVCache,
        layer: int,
        prefill_sep: Tensor | None,
        decode_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Inference: attend the new tokens ``hidden`` ``[b, n, h]`` through ``cache``.

        Their keys/values are written to the cache slots ``cache.length ..``. With
        ``prefill_sep`` (int64 ``[b]``) the new tokens are a right-padded part A, attended
        bidirectionally by the training kernel (:func:`glm_attention` with ``valid_len = sep``,
        the fused kernel on CUDA); otherwise they are part-B tokens attending everything cached
        before them under ``decode_mask`` (``KVCache.decode_mask``, built once per step by the
        model) through :func:`glm_decode_attention`, always the torch path: see its docstring.
        """
        qkv = self.query_key_value(hidden)  # [b, n, 3h/tp]
        b, n, _ = qkv.shape
        qkv = qkv.view(b, n, -1, 3, self.head_dim)  # [b, n, heads/tp, 3, d]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # 3 x [b, heads/tp, n, d]
        start = cache.length
        keys, values = cache.write(layer, start, k, v)  # [b, heads/tp, start + n, d]
        if prefill_sep is not None:
            context = glm_attention(
                q,
                k,
                v,
                prefill_sep,
                prefill_sep,
                dropout_p=0.0,
                training=False,
                kernels=self.kernels,
            )  # [b, heads/tp, n, d]
        else:
            assert decode_mask is not None  # [b, 1, n, start + n]
            context = glm_decode_attention(q, keys, values, decode_mask)  # [b, heads/tp, n, d]
        context = context.transpose(1, 2).reshape(b, n, -1)  # [b, n, h/tp]
        return self.dense(context)  # [b, n, h], [h] unapplied


class MLP(nn.Module):
    """``h -> ffn_hidden_size -> h`` with GeLU: tanh-approximated (as GLM / Megatron train) or,
    ``model.gelu: erf``, the exact form (THUDM's published models, imported by from-hf).

    As Megatron-core's MLP, both linears skip their bias add: ``dense_h_to_4h``'s bias is added
    inside the fused bias-GeLU, and ``(output, dense_4h_to_h bias)`` is returned for the block's
    fused bias-dropout-residual pass.
    """

    def __init__(self, cfg: ModelConfig, *, dims: ParallelDims | None = None) -> None:
        super().__init__()
        assert cfg.ffn_hidden_size is not None  # ModelConfig.__post_init__ fills it
        if dims is not None:
            dims.check_divisible("model.ffn_hidden_size", cfg.ffn_hidden_size)
        self.dense_h_to_4h = ColumnParallelLinear(
            cfg.hidden_size, cfg.ffn_hidden_size, dims=dims, skip_bias_add=True
        )
        self.dense_4h_to_h = RowParallelLinear(
            cfg.ffn_hidden_size,
            cfg.hidden_size,
            dims=dims,
            input_is_parallel=True,
            skip_bias_add=True,
        )
        self.kernels = cfg.kernels
        self.gelu = cfg.gelu

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
        inner, inner_bias = self.dense_h_to_4h(hidden)  # [b, s, ffn/tp], [ffn/tp]
        inner = bias_gelu(inner, inner_bias, kernels=self.kernels, form=self.gelu)  # [b, s, ffn/tp]
        out, bias = self.dense_4h_to_h(inner)  # [b, s, h] (SP: [b, s/tp, h]), [h] unapplied
        return out, bias


class GLMBlock(nn.Module):
    """Pre-LN block: ``x + drop(attn(LN(x)))``, then ``x + drop(mlp(LN(x)))``.

    The output projections' biases arrive unapplied and are added by the fused
    ``residual + drop(x + bias)`` (:class:`~megatron_glm.kernels.DropoutAdd`).

    With ``activation_checkpointing`` the block's internals are recomputed in backward
    (``torch.utils.checkpoint``, non-reentrant). Checkpointing lives inside the block rather than
    in a driver loop so it also applies when the layers are wrapped in a PipelineModule. The
    checkpoint saves and restores the CPU and CUDA RNG states and the TP-private dropout stream
    (:func:`megatron_glm.parallel.random.checkpoint`), so recomputed dropout masks equal the
    original ones and gradients are identical with and without it.
    """

    OUTPUT_PROJECTIONS: tuple[str, ...] = ("attention.dense", "mlp.dense_4h_to_h")
    """Submodules initialised with std / sqrt(2 * num_layers) (GPT-2 / Megatron scaling)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dims: ParallelDims | None = None,
        rng: ModelParallelRNG | None = None,
    ) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.rng = rng or ModelParallelRNG(enabled=False)
        self.sequence_parallel = dims is not None and dims.sequence_parallel
        eps, kernels = cfg.layernorm_epsilon, cfg.kernels
        self.input_layernorm = LayerNorm(h, eps=eps, dims=dims, kernels=kernels)
        self.attention = SelfAttention(cfg, dims=dims, rng=self.rng)
        self.post_attention_layernorm = LayerNorm(h, eps=eps, dims=dims, kernels=kernels)
        self.mlp = MLP(cfg, dims=dims)
        self.dropout = DropoutAdd(cfg.hidden_dropout, kernels=kernels)  # residual + drop(x + b)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        hidden, *mask_args = inputs  # [b, s, h], then sep, valid_len[, attention_mask]
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            hidden = checkpoint(self._block, hidden, *mask_args, rng=self.rng)
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
        split = self.sequence_parallel and self.training and self.dropout.p > 0
        attn, attn_bias = self.attention(
            self.input_layernorm(hidden), sep, valid_len, attention_mask
        )
        with self.rng.region(split, hidden.device):
            hidden = self.dropout(attn, hidden, attn_bias)  # hidden + drop(attn + b): [b, s, h]
        mlp, mlp_bias = self.mlp(self.post_attention_layernorm(hidden))
        with self.rng.region(split, hidden.device):
            return self.dropout(mlp, hidden, mlp_bias)  # hidden + drop(mlp + b) (SP: s/tp)

    def forward_cached(
        self,
        hidden: Tensor,
        cache: KVCache,
        layer: int,
        prefill_sep: Tensor | None,
        decode_mask: Tensor | None,
    ) -> Tensor:
        """Inference twin of :meth:`_block` over a KV cache (no dropout, no checkpointing)."""
        attn, attn_bias = self.attention.forward_cached(
            self.input_layernorm(hidden), cache, layer, prefill_sep, decode_mask
        )
        hidden = self.dropout(attn, hidden, attn_bias)  # eval: hidden + attn + b
        mlp, mlp_bias = self.mlp(self.post_attention_layernorm(hidden))
        return self.dropout(mlp, hidden, mlp_bias)  # [b, n, h]


class FinalLayerNorm(nn.Module):
    """Last stage before the tied head: ``(hidden, *mask_args) -> LN(hidden)``, ``[b, s, h]``.

    Under sequence parallelism the LayerNorm runs on this rank's slice and the result is then
    all-gathered, so the model's output is the full, replicated ``[b, s, h]`` on every TP rank
    whatever the layout. Its gradient is then complete on every rank (the vocab-parallel head
    all-reduces the gradient of its input, see ``glm_loss``), so the gather's backward keeps this
    rank's slice without communication.
    """

    def __init__(self, cfg: ModelConfig, *, dims: ParallelDims | None = None) -> None:
        super().__init__()
        self.dims = dims
        self.final_layernorm = LayerNorm(
            cfg.hidden_size, eps=cfg.layernorm_epsilon, dims=dims, kernels=cfg.kernels
        )

    def forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        hidden = self.final_layernorm(inputs[0])  # [b, s, h] (SP: s/tp)
        if self.dims is not None and self.dims.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(
                hidden, self.dims.tp_group, grad_is_partial=False
            )  # [b, s, h]
        return hidden
