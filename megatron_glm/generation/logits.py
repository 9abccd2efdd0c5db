"""Logits processing shared by greedy, sampling and beam search (HF's order, GLM's part B).

:func:`process_logits` applies the constraints (banned ids, repetition penalty, no-repeat
n-grams, min new tokens); :func:`warp_logits` the sampling warpers (temperature, top-k, top-p);
:func:`choose_tokens` draws or takes the argmax. Banned tokens get ``-inf`` so they can never be
chosen or sampled.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from megatron_glm.generation.config import GenerationConfig


def _ban(row: Tensor, ids: Collection[int]) -> None:
    if ids:
        row[list(ids)] = float("-inf")


def repetition_penalty_(row: Tensor, history: Sequence[int], penalty: float) -> None:
    """CTRL's penalty in place: a seen token's logit is divided by ``penalty`` if positive,
    multiplied if negative (so > 1 always makes it less likely)."""
    if penalty == 1.0 or not history:
        return
    seen = torch.tensor(sorted(set(history)), device=row.device)
    values = row[seen]
    row[seen] = torch.where(values > 0, values / penalty, values * penalty)


def banned_ngram_tokens(history: Sequence[int], n: int) -> set[int]:
    """Tokens that would repeat an ``n``-gram already in ``history`` (empty for ``n == 0``)."""
    if n <= 0 or len(history) < n:
        return set()
    prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    return {
        history[i + n - 1]
        for i in range(len(history) - n + 1)
        if tuple(history[i : i + n - 1]) == prefix
    }


def process_logits(
    logits: Tensor,
    histories: Sequence[Sequence[int]],
    stop_ids: Sequence[Collection[int]],
    config: GenerationConfig,
    banned: Collection[int] = (),
) -> Tensor:
    """Constraints on float ``[b, V]`` logits (a processed copy); row i generated ``histories[i]``.

    ``stop_ids[i]`` are row i's stop tokens, banned while fewer than ``min_new_tokens`` tokens
    were generated; ``banned`` ids are never generated (e.g. mask tokens inside a fill).
    """
    out = logits.clone()
    if banned:
        out[:, list(banned)] = float("-inf")
    for i, history in enumerate(histories):
        row = out[i]
        repetition_penalty_(row, history, config.repetition_penalty)
        _ban(row, banned_ngram_tokens(history, config.no_repeat_ngram_size))
        if len(history) < config.min_new_tokens:
            _ban(row, stop_ids[i])
    return out


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits per row (ties at the k-th value kept), others ``-inf``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [b, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the nucleus: the most likely tokens whose probabilities first sum to >= ``p``.

    A token is kept when the probability mass strictly before it (in descending order) is below
    ``p``, so the most likely token always survives and nothing beyond the nucleus does.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def warp_logits(logits: Tensor, config: GenerationConfig) -> Tensor:
    """Temperature, then top-k, then top-p (the sampling distribution's logits)."""
    logits = logits / config.temperature
    return top_p_filter(top_k_filter(logits, config.top_k), config.top_p)


def choose_tokens(
    logits: Tensor, config: GenerationConfig, generators: Sequence[torch.Generator] | None
) -> list[int]:
    """Greedy argmax per row, or one draw per row from its own generator when sampling."""
    if not config.do_sample:
        return [int(t) for t in logits.argmax(dim=-1).tolist()]
    assert generators is not None and len(generators) == logits.shape[0]
    probs = torch.softmax(warp_logits(logits, config), dim=-1)  # [b, V]
    return [
        int(torch.multinomial(probs[i], 1, generator=g).item()) for i, g in enumerate(generators)
    ]
