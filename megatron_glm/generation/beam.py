"""Beam search over part B, all rows' beams batched through one stepper.

A hypothesis' score is ``sum(log p) / length ** length_penalty``, where ``length`` counts the
generated tokens including the stop token (HF's convention) and the log-probabilities are those
of the processed logits (repetition penalty, no-repeat n-grams, min new tokens). A hypothesis
ends at a stop token or at ``max_new_tokens`` tokens.

A row stops searching when it holds ``num_beams`` finished hypotheses and no live beam can still
beat the worst of them. The bound is exact, not HF's heuristic: log-probs are <= 0, so a beam's
sum only falls; with ``length_penalty > 0`` its best possible score is its sum over
``max_new_tokens ** length_penalty``, otherwise its sum over ``(length + 1) ** length_penalty``.
Hence, with enough beams to keep every continuation, the result is the exact best sequence
(what the brute-force test checks).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from megatron_glm.generation.config import GenerationConfig
from megatron_glm.generation.logits import process_logits
from megatron_glm.generation.steppers import Stepper

if TYPE_CHECKING:
    from megatron_glm.generation.decoder import DecodeRow


@dataclass
class _RowBeams:
    """One row's live beams (token lists and log-prob sums) and its finished hypotheses."""

    beams: list[list[int]]
    sums: list[float]
    finished: list[tuple[float, list[int]]] = field(default_factory=list)  # (score, tokens)

    def finish(self, score: float, tokens: list[int], num_beams: int) -> None:
        self.finished.append((score, tokens))
        self.finished.sort(key=lambda f: -f[0])
        del self.finished[num_beams:]


def _score(total: float, length: int, length_penalty: float) -> float:
    return total / (length**length_penalty)


def _done(row: _RowBeams, length: int, config: GenerationConfig) -> bool:
    """Whether no live beam can beat the worst kept hypothesis (module docstring)."""
    if not row.beams:
        return True
    if len(row.finished) < config.num_beams:
        return False
    lp = config.length_penalty
    best_length = config.max_new_tokens if lp > 0 else length + 1
    best = max(_score(s, best_length, lp) for s in row.sums)
    return best <= row.finished[-1][0]


def _expand(
    row: _RowBeams,
    logprobs: torch.Tensor,
    stop_ids: Collection[int],
    step: int,
    config: GenerationConfig,
) -> list[tuple[int, int]]:
    """Advance one row by a token: new beams as (parent beam, token); finished ones recorded."""
    k, vocab = config.num_beams, logprobs.shape[-1]
    totals = torch.tensor(row.sums, dtype=logprobs.dtype).view(-1, 1) + logprobs  # [nb, V]
    values, flat = totals.view(-1).topk(min(2 * k, totals.numel()))
    length = step + 1
    chosen: list[tuple[int, int]] = []
    sums: list[float] = []
    for rank, (value, index) in enumerate(zip(values.tolist(), flat.tolist(), strict=True)):
        if value == float("-inf") or len(chosen) == k:
            break
        parent, token = divmod(index, vocab)
        if token in stop_ids:
            if rank < k:
                score = _score(value, length, config.length_penalty)
                row.finish(score, list(row.beams[parent]), k)
            continue
        chosen.append((parent, token))
        sums.append(value)
    if length == config.max_new_tokens:  # every live beam ends here
        for (parent, token), total in zip(chosen, sums, strict=True):
            tokens = [*row.beams[parent], token]
            row.finish(_score(total, length, config.length_penalty), tokens, k)
        chosen, sums = [], []
    row.beams = [[*row.beams[p], t] for p, t in chosen]
    row.sums = sums
    return chosen


def beam_search(
    stepper: Stepper,
    rows: Sequence[DecodeRow],
    config: GenerationConfig,
    *,
    sop_id: int,
    banned: Collection[int],
) -> None:
    """Fill each ``row.tokens`` with its best hypothesis (module docstring)."""
    states = [_RowBeams(beams=[[]], sums=[0.0]) for _ in rows]
    active = list(range(len(rows)))  # rows with live beams, in stepper order
    feed = [sop_id] * len(rows)
    for step in range(config.max_new_tokens):
        logits = stepper.step(feed, step + 1)  # [total live beams, V]
        histories = [b for i in active for b in states[i].beams]
        stops = [rows[i].stop_ids for i in active for _ in states[i].beams]
        logprobs = torch.log_softmax(
            process_logits(logits, histories, stops, config, banned), dim=-1
        ).cpu()
        keep_rows: list[int] = []
        select: list[int] = []
        feed = []
        offset = 0
        for i in active:
            state = states[i]
            nb = len(state.beams)
            chosen = _expand(state, logprobs[offset : offset + nb], rows[i].stop_ids, step, config)
            if not _done(state, step + 1, config):
                keep_rows.append(i)
                select.extend(offset + parent for parent, _ in chosen)
                feed.extend(token for _, token in chosen)
            offset += nb
        if not keep_rows:
            break
        stepper.select(select)  # beams follow their parents; finished rows leave
        active = keep_rows
    for row, state in zip(rows, states, strict=True):
        row.tokens = list(state.finished[0][1]) if state.finished else []
