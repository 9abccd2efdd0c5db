"""GLM attention: the prefix ("part A") + causal ("part B") mask, behind one function.

GLM's blank-infilling batch row is ``[part A | part B | padding]``. Part A (the corrupted text)
is attended bidirectionally, part B (the spans being generated) causally, and padding never.
The whole mask is therefore described by two int64 numbers per row, ``sep`` (length of part A)
and ``valid_len`` (length before padding)::

    query i may attend key j  <=>  j < valid_len and (j < sep or j <= i)

:func:`glm_attention` is the single entry point the model uses. It has two implementations,
chosen per call by :func:`attention_backend` from ``model.kernels`` and the device:

- the reference, torch's ``scaled_dot_product_attention`` (SDPA) with a boolean mask built by
  :func:`glm_attention_mask` (rebuilt inside every layer: ``b * s * s`` bools, negligible next to
  the attention itself, so pipeline stages exchange only the two ``[b]`` tensors);
- the fused Triton kernel (:mod:`megatron_glm.kernels.flash_attention`), which takes
  ``(sep, valid_len)`` directly, never builds the mask and skips fully masked blocks.

The fused kernel has no attention dropout and no explicit-mask mode: such calls (dropout > 0 in
training, an explicit ``attention_mask``, an unsupported head dim) run the reference even under
``kernels: triton``, with a one-time warning naming the reason, so nothing changes silently.

Fully masked query rows (only possible when ``valid_len == 0`` for the default mask, or with an
arbitrary explicit mask) are defined to output zeros. SDPA's behaviour on such rows differs by
backend (NaN on some, zeros on others), so we never hand it one: such rows are unmasked before the
call and their outputs multiplied by 0 afterwards, which also keeps their gradients finite (zero).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_glm.kernels.dispatch import KernelBackend, log_once, resolve_backend, triton_installed

TRITON_ATTENTION_AVAILABLE: bool = triton_installed()
"""Whether the fused Triton GLM attention kernel can be used here (Triton is installed)."""


def attention_backend(choice: str, device: torch.device) -> KernelBackend:
    """Resolve a ``model.kernels`` choice (auto|triton|torch) to the attention implementation.

    See :func:`megatron_glm.kernels.dispatch.resolve_backend`: ``auto`` is Triton on CUDA and torch
    elsewhere; ``triton`` where it cannot run (CPU without ``TRITON_INTERPRET=1``, or no Triton) is
    a user error rather than a silent fallback.
    """
    return resolve_backend(choice, device, "attention")


def _fused_unsupported_reason(
    q: Tensor, dropout_p: float, attention_mask: Tensor | None
) -> str | None:
    """Why the fused kernel cannot compute this call (None when it can)."""
    from megatron_glm.kernels.flash_attention import SUPPORTED_HEAD_DIMS

    if dropout_p > 0.0:
        return (
            f"attention dropout {dropout_p} > 0 is not fused (set model.attention_dropout: 0 to "
            "use the Triton kernel in training)"
        )
    if attention_mask is not None:
        return "an explicit attention_mask was given (only the (sep, valid_len) mask is fused)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {SUPPORTED_HEAD_DIMS}"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} is not fp32, fp16 or bf16"
    return None


def _check_lengths(sep: Tensor, valid_len: Tensor) -> None:
    """Shape/dtype checks only (no value checks: those would force a device sync)."""
    for name, t in (("sep", sep), ("valid_len", valid_len)):
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(
                f"glm attention: '{name}' must be an integer tensor of shape [batch], "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    if sep.shape != valid_len.shape:
        raise ValueError(
            f"glm attention: 'sep' {tuple(sep.shape)} and 'valid_len' {tuple(valid_len.shape)} "
            "must have the same shape [batch]"
        )


def glm_attention_mask(sep: Tensor, valid_len: Tensor, seq_len: int) -> Tensor:
    """Boolean mask ``[b, 1, s, s]`` (True = may attend) of the GLM rule from ``(sep, valid_len)``.

    ``sep`` and ``valid_len`` are int64 ``[b]``. Query i sees key j iff
    ``j < valid_len and (j < sep or j <= i)``. The singleton dim broadcasts over heads.
    """
    _check_lengths(sep, valid_len)
    pos = torch.arange(seq_len, device=sep.device)
    key = pos.view(1, 1, seq_len)  # [1, 1, s]   j
    query = pos.view(1, seq_len, 1)  # [1, s, 1]   i
    sep_ = sep.view(-1, 1, 1)  # [b, 1, 1]
    valid_ = valid_len.view(-1, 1, 1)  # [b, 1, 1]
    mask = (key < valid_) & ((key < sep_) | (key <= query))  # [b, s, s]
    return mask.unsqueeze(1)  # [b, 1, s, s]


def _explicit_mask(attention_mask: Tensor, b: int, s: int) -> Tensor:
    """Validate a caller-supplied full mask and bring it to ``[b, 1 or heads, s, s]``."""
    if attention_mask.dtype != torch.bool:
        raise ValueError(
            f"glm attention: 'attention_mask' must be bool (True = may attend), "
            f"got {attention_mask.dtype}"
        )
    if attention_mask.dim() == 3:
        attention_mask = attention_mask.unsqueeze(1)  # [b, s, s] -> [b, 1, s, s]
    if (
        attention_mask.dim() != 4
        or attention_mask.shape[0] != b
        or attention_mask.shape[2:]
        != (
            s,
            s,
        )
    ):
        raise ValueError(
            f"glm attention: 'attention_mask' must be [b, s, s] or [b, 1|heads, s, s] with "
            f"b={b}, s={s}, got {tuple(attention_mask.shape)}"
        )
    return attention_mask


def glm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sep: Tensor | None,
    valid_len: Tensor | None,
    *,
    dropout_p: float,
    training: bool,
    attention_mask: Tensor | None = None,
    kernels: str = "auto",
) -> Tensor:
    """Scaled dot-product attention under the GLM mask; returns ``[b, heads, s, d]``.

    Args:
        q, k, v: ``[b, heads, s, d]``.
        sep, valid_len: int64 ``[b]``; the mask rule of the module docstring. May be None only
            when ``attention_mask`` is given.
        dropout_p: dropout on the attention probabilities, applied only when ``training``.
        training: the calling module's ``self.training``.
        attention_mask: optional bool ``[b, s, s]`` / ``[b, 1|heads, s, s]`` (True = may attend),
            the slow fallback for finetuning formats whose mask is not a (sep, valid_len) pair.
            When given it replaces the (sep, valid_len) rule.
        kernels: ``model.kernels`` (auto|triton|torch), see :func:`attention_backend`.

    A query row with no visible key outputs zeros (see module docstring).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"glm attention: q, k, v must all be [b, heads, s, d], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, _, s, _ = q.shape
    if attention_mask is not None:
        mask_arg: Tensor | None = _explicit_mask(attention_mask, b, s)  # [b, 1|heads, s, s]
    else:
        if sep is None or valid_len is None:
            raise ValueError("glm attention: pass (sep, valid_len) or an explicit attention_mask")
        _check_lengths(sep, valid_len)
        if sep.shape[0] != b:
            raise ValueError(
                f"glm attention: 'sep' has shape {tuple(sep.shape)}, expected [batch={b}]"
            )
        mask_arg = None
    p = dropout_p if training else 0.0
    if attention_backend(kernels, q.device) == "triton":
        reason = _fused_unsupported_reason(q, p, mask_arg)
        if reason is None:
            from megatron_glm.kernels.flash_attention import flash_glm_attention

            assert sep is not None and valid_len is not None
            return flash_glm_attention(q, k, v, sep, valid_len)
        log_once(logging.WARNING, f"kernels: attention falls back to torch SDPA: {reason}")
    if mask_arg is None:
        assert sep is not None and valid_len is not None
        mask_arg = glm_attention_mask(sep, valid_len, s)  # [b, 1, s, s]
    return _sdpa_with_mask(q, k, v, mask_arg, p)


def _sdpa_with_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    """The reference: SDPA with a boolean mask; fully masked rows give zeros (module docstring)."""
    has_key = mask.any(dim=-1, keepdim=True)  # [b, 1|heads, s, 1]
    safe_mask = mask | ~has_key  # a fully masked row attends everything, then is zeroed below
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=safe_mask, dropout_p=dropout_p
    )  # [b, heads, s, d]
    return out * has_key.to(out.dtype)


def glm_decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few new queries against a KV cache (inference decode); ``[b, heads, n, d]``.

    Args:
        q: ``[b, heads, n, d]``, the ``n`` newest tokens (``n`` is 1 in greedy/beam decoding).
        k, v: ``[b, heads, L, d]``, the cached keys/values *including* the new tokens' own.
        mask: bool ``[b, 1, n, L]``, True = may attend (built by
            :class:`megatron_glm.model.kv_cache.KVCache`: every real part-A key, and the part-B
            keys up to the query's own).

    This always runs the torch reference (SDPA with an explicit mask), never the fused Triton
    kernel, on every device and whatever ``model.kernels`` says. The fused kernel is written for
    the training shape: square ``s x s`` tiles of 64+ queries whose mask is the ``(sep,
    valid_len)`` rule of one packed row. A decode step has one query per row against a prefix of
    a few hundred keys with per-row holes (right-padding of part A between a row's ``sep`` and
    the shared part-B slots), which that rule cannot express, and with ``n = 1`` a tiled kernel
    would waste all but one row of each query tile. The step is memory-bound (read the cache
    once), which SDPA's math / memory-efficient paths already are, so a decode variant of the
    kernel would buy little. Part A's one-off prefill, which *is* a training-shaped call, goes
    through :func:`glm_attention` and so gets the fused kernel on CUDA.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"glm decode attention: q [b, heads, n, d] and k, v [b, heads, L, d] expected, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, _, n, _ = q.shape
    if mask.dtype != torch.bool or tuple(mask.shape) != (b, 1, n, k.shape[2]):
        raise ValueError(
            f"glm decode attention: mask must be bool [b, 1, n, L] = {(b, 1, n, k.shape[2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return _sdpa_with_mask(q, k, v, mask, 0.0)
