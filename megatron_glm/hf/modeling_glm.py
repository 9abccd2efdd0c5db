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

With ``past_key_values`` (a transformers ``Cache``; ``use_cache=True`` makes a ``DynamicCache``)
the inputs are the new tokens only and a full mask has ``past + s`` columns.
``GLMForConditionalGeneration.generate`` fills a blank with that cache (its docstring and
:func:`build_inputs_for_generation` say how the prompt is laid out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_glm import GLMConfig


@dataclass
class GLMModelOutput(ModelOutput):
    """THUDM's output of ``GLMModel``: final hidden states and, with output_predict, logits."""

    last_hidden_states: Tensor | None = None
    logits: Tensor | None = None
    mems: list[Tensor] | None = None
    past_key_values: Cache | None = None


def build_attention_mask(
    attention_mask: Tensor | None, b: int, s: int, device: torch.device, past: int = 0
) -> Tensor:
    """Bool ``[b, 1, s, past + s]`` (True = may attend) from THUDM's ``sep`` form or a full mask.

    The ``s`` queries are the tokens at ``past .. past + s - 1`` (``past`` of them are in the KV
    cache already); the keys are all ``past + s`` tokens. ``None`` is ``sep = 0`` (left to
    right), as in THUDM's code.
    """
    k = past + s
    if attention_mask is None:
        attention_mask = torch.zeros(b, dtype=torch.long, device=device)
    if attention_mask.dim() == 2 and attention_mask.shape[1] == 1 and k != 1:
        attention_mask = attention_mask[:, 0]
    if attention_mask.dim() == 1:
        keys = torch.arange(k, device=device).view(1, 1, k)
        queries = torch.arange(past, k, device=device).view(1, s, 1)
        sep = attention_mask.to(device).long().view(b, 1, 1)
        return ((keys < sep) | (keys <= queries)).unsqueeze(1)
    if attention_mask.dim() == 3:
        attention_mask = attention_mask.unsqueeze(1)
    if attention_mask.dim() != 4 or tuple(attention_mask.shape[2:]) != (s, k):
        raise ValueError(
            "attention_mask must be sep [b] / [b, 1] or a full mask [b, s, past + s] / "
            f"[b, 1, s, past + s] with s={s}, past={past}, got {tuple(attention_mask.shape)}"
        )
    return attention_mask.to(device) != 0


class SelfAttention(nn.Module):
    """Fused QKV (THUDM's order: all Q rows, then all K, then all V), attention, ``dense``."""

    def __init__(self, config: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.query_key_value = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)
        self.attention_dropout = config.attention_dropout_prob
        self.output_dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, hidden: Tensor, mask: Tensor, cache: Cache | None = None) -> Tensor:
        """``mask`` is ``[b, 1, s, past + s]``; with a ``cache`` the new keys and values are
        appended to this layer's and attention runs over all ``past + s`` of them."""
        b, s, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [b, heads, s, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
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

    def __init__(self, config: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = MLP(config)

    def forward(self, hidden: Tensor, mask: Tensor, cache: Cache | None = None) -> Tensor:
        hidden = hidden + self.attention(self.input_layernorm(hidden), mask, cache)
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
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(h, eps=config.layernorm_epsilon)

    def forward(
        self, hidden: Tensor, position_ids: Tensor, mask: Tensor, cache: Cache | None = None
    ) -> Tensor:
        hidden = hidden + self.position_embeddings(position_ids[:, 0])
        if self.block_position_encoding:
            hidden = hidden + self.block_position_embeddings(position_ids[:, 1])
        hidden = self.embedding_dropout(hidden)
        for layer in self.layers:
            hidden = layer(hidden, mask, cache)
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


def default_position_ids(input_ids: Tensor, past: int = 0) -> Tensor:
    """``[b, 2, s]``: past..past+s-1 in row 0, zeros in row 1 (plain left-to-right text)."""
    b, s = input_ids.shape
    pos = torch.arange(past, past + s, device=input_ids.device).expand(b, s)
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
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: object,
    ) -> GLMModelOutput:
        """``input_ids`` are the tokens after the ``past_key_values`` (when given): their
        ``position_ids`` and mask rows (``[b, 1, s, past + s]`` for a full mask) only.
        ``logits_to_keep`` > 0 computes the logits of the last that many positions only
        (``generate`` needs the last one; the head is a quarter of a glm-base prompt's cost)."""
        b, s = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(input_ids, past)
        if tuple(position_ids.shape) != (b, 2, s):
            raise ValueError(
                f"position_ids must be [b, 2, s] = {(b, 2, s)}, got {tuple(position_ids.shape)}"
            )
        mask = build_attention_mask(attention_mask, b, s, input_ids.device, past)
        embeddings = self.word_embeddings(input_ids)
        hidden = self.transformer(embeddings, position_ids, mask, past_key_values)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = F.linear(kept, self.word_embeddings.weight) if self.output_predict else None
        return GLMModelOutput(
            last_hidden_states=hidden, logits=logits, mems=[], past_key_values=past_key_values
        )


class GLMForConditionalGeneration(GLMPreTrainedModel, GenerationMixin):
    """GLM with the tied head; ``labels`` (aligned with the inputs, -100 ignored) give a loss.

    ``generate`` fills a blank: the prompt is part A (the text with its mask token) and
    ``[sop]``, with ``position_ids [b, 2, L]`` and a padding ``attention_mask [b, L]`` (zeros
    on the left of shorter rows), as :func:`build_inputs_for_generation` makes them. Each new
    token takes the position of the token before it and the next block position (GLM's part
    B: position = the mask's index, block position 1, 2, ...); part A (block position 0) is
    seen by every token, part B causally. THUDM's inputs work too: ``position_ids`` built for
    the whole generation and their ``generation_attention_mask [b, 1, L + n, L + n]``.
    """

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
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        out = self.glm(
            input_ids, position_ids, attention_mask, past_key_values, use_cache, logits_to_keep
        )
        logits = out.logits
        if logits is None:
            hidden = out.last_hidden_states
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = F.linear(hidden, self.glm.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def prepare_inputs_for_generation(  # type: ignore[override]
        self,
        input_ids: Tensor,
        past_key_values: Cache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        generation_attention_mask: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: object,
    ) -> dict[str, object]:
        """The tokens not yet in the cache, their 2D positions and their rows of GLM's mask.

        ``input_ids`` is the whole sequence so far (prompt and generated tokens);
        ``attention_mask`` the padding mask over it (``generate`` appends a 1 per step).
        """
        total = input_ids.shape[1]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = extend_generation_positions(position_ids, total)
        rows = self.config.max_sequence_length + int(self.config.block_position_encoding)
        if int(position_ids[:, :, past:total].max()) >= rows:
            raise ValueError(
                f"generation reached position {int(position_ids[:, :, :total].max())} of "
                f"{total} tokens, past the model's position table ({rows} rows, "
                f"max_sequence_length {self.config.max_sequence_length}): shorten the prompt "
                "or max_new_tokens"
            )
        if generation_attention_mask is not None:  # THUDM's: built for the whole generation
            full = generation_attention_mask
            full = full.unsqueeze(1) if full.dim() == 3 else full
            mask = full[:, :, past:total, :total] != 0
        else:
            mask = generation_mask(attention_mask, position_ids[:, 1, :total], past)
        return {
            "input_ids": input_ids[:, past:],
            "position_ids": position_ids[:, :, past:total],
            "attention_mask": mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
            "logits_to_keep": logits_to_keep,
        }

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor, dict[str, Any]]:
        """transformers' expansion (beams, ``num_return_sequences``), with GLM's
        ``position_ids [b, 2, L]`` repeated on the batch dim: transformers takes a 3D
        ``position_ids`` for multimodal ``[3, b, L]`` and would repeat dim 1."""
        position_ids = model_kwargs.pop("position_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(  # type: ignore[misc]
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if position_ids is not None:
            model_kwargs["position_ids"] = position_ids.repeat_interleave(expand_size, dim=0)
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        """transformers' update (the cache, a 1 appended to the padding mask) without its
        ``position_ids + 1``, wrong for GLM's part B: :meth:`prepare_inputs_for_generation`
        extends the prompt's 2D positions itself."""
        position_ids = model_kwargs.pop("position_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder, num_new_tokens
        )
        model_kwargs["position_ids"] = position_ids
        return model_kwargs


def extend_generation_positions(position_ids: Tensor | None, total: int) -> Tensor:
    """GLM's 2D positions of ``total`` tokens from those of the prompt (or more).

    A generated token keeps the position of the token before it (the mask's index) and takes
    the next block position; positions given for more tokens (THUDM's) are used as given.
    """
    if position_ids is None or position_ids.dim() != 3 or position_ids.shape[1] != 2:
        shape = None if position_ids is None else tuple(position_ids.shape)
        raise ValueError(
            "GLM's generate needs position_ids [batch, 2, prompt length] (the position and the "
            "block position of each prompt token, the prompt ending with [sop]), got "
            f"{shape}; build them with build_inputs_for_generation (modeling_glm.py) or the "
            "tokenizer's build_inputs_for_generation"
        )
    have = position_ids.shape[2]
    if have >= total:
        return position_ids
    steps = torch.arange(1, total - have + 1, device=position_ids.device)
    last = position_ids[:, :, -1:]
    new = torch.stack([last[:, 0].expand(-1, steps.numel()), last[:, 1] + steps], dim=1)
    return torch.cat([position_ids, new.to(position_ids.dtype)], dim=2)


def generation_mask(padding: Tensor | None, block_position_ids: Tensor, past: int) -> Tensor:
    """GLM's mask rows ``[b, 1, total - past, total]`` of the tokens after ``past``.

    Query ``i`` sees key ``j`` iff ``j`` is not padding and ``j`` is in part A (block position
    0, bidirectional) or ``j <= i`` (part B, causal): the ``sep`` mask of the trainer, with the
    left padding of a batch's shorter rows masked out.
    """
    b, total = block_position_ids.shape
    keys = torch.arange(total, device=block_position_ids.device)
    queries = keys[past:].view(1, -1, 1)
    visible = (block_position_ids == 0).unsqueeze(1) | (keys.view(1, 1, -1) <= queries)
    if padding is not None:
        if tuple(padding.shape) != (b, total):
            raise ValueError(
                f"attention_mask for generate must be the padding mask [b, total] = {(b, total)} "
                f"(1 = token, 0 = left padding), got {tuple(padding.shape)}"
            )
        visible = visible & (padding != 0).unsqueeze(1)
    return visible.unsqueeze(1)


def build_inputs_for_generation(
    prompts: list[list[int]],
    *,
    mask_token_ids: list[int],
    sop_token_id: int,
    pad_token_id: int,
) -> dict[str, Tensor]:
    """``generate`` inputs from the token ids of texts with one blank each (left-padded batch).

    Each row is part A (its ids; the first of ``mask_token_ids`` in it is the blank) followed
    by ``[sop]``; returns ``input_ids [b, L]``, ``position_ids [b, 2, L]`` (part A 0..n-1 and
    block 0; [sop] at the mask's index, block 1) and ``attention_mask [b, L]`` (0 on the left
    padding). Positions count from each row's first token, so a row decodes the same alone as
    in a batch. THUDM's tokenizer has the same method for the same purpose.
    """
    rows = [
        _generation_row(ids, i, set(mask_token_ids), sop_token_id) for i, ids in enumerate(prompts)
    ]
    width = max(len(tokens) for tokens, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), 2, width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (tokens, positions, blocks) in enumerate(rows):
        n = len(tokens)
        input_ids[i, width - n :] = torch.tensor(tokens)
        position_ids[i, 0, width - n :] = torch.tensor(positions)
        position_ids[i, 1, width - n :] = torch.tensor(blocks)
        attention_mask[i, width - n :] = 1
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}


def _generation_row(
    ids: list[int], row: int, mask_ids: set[int], sop_id: int
) -> tuple[list[int], list[int], list[int]]:
    """(tokens, positions, block positions) of one prompt: part A, then [sop]."""
    found = [i for i, t in enumerate(ids) if t in mask_ids]
    if not found:
        raise ValueError(
            f"prompt {row} holds no mask token (ids {sorted(mask_ids)}): nothing to fill"
        )
    n = len(ids)
    return [*ids, sop_id], [*range(n), found[0]], [0] * n + [1]


__all__ = [
    "GLMForConditionalGeneration",
    "GLMModel",
    "GLMPreTrainedModel",
    "build_attention_mask",
    "build_inputs_for_generation",
]
