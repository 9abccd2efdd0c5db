"""One decoding step for a batch of part-B rows: with a KV cache, or by re-running everything.

Both steppers present the same interface to the search loops (greedy/sampling and beam):
``step(tokens, block_position)`` feeds one part-B token per active row and returns that row's
next-token logits ``[b, vocab]``; ``select(rows)`` keeps, reorders or repeats rows (finished
rows leave, beams follow their parents). Every row of a stepper is at the same block position
(lock step); rows differ in their part A, ``sep`` and mask position.

- :class:`CachedStepper` encodes part A once (:meth:`GLMModel.prefill`) and then runs one token
  per step (:meth:`GLMModel.decode_step`): O(1) tokens of work per step.
- :class:`UncachedStepper` is the reference: it re-runs ``[part A | part B so far]`` through
  ``GLMModel.forward`` every step (right-padded, per-row ``sep``/``valid_len``), exactly the
  layout the model was trained with. Tests compare the two; the benchmark times both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from megatron_glm.model.glm import GLMModel


class Stepper(Protocol):
    def step(self, tokens: Sequence[int], block_position: int) -> Tensor: ...

    def select(self, rows: Sequence[int]) -> None: ...


def _right_pad(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out  # [b, width]


class CachedStepper:
    """Part A prefilled into a :class:`~megatron_glm.model.kv_cache.KVCache`, one token a step."""

    def __init__(
        self,
        model: GLMModel,
        part_a: Sequence[Sequence[int]],
        mask_positions: Sequence[int],
        vocab_size: int,
        max_steps: int,
    ) -> None:
        self.model, self.vocab_size = model, vocab_size
        device = model.head_weight.device
        tokens = _right_pad(part_a, device)  # [b, A]
        b, width = tokens.shape
        positions = torch.zeros(b, 2, width, dtype=torch.long, device=device)
        positions[:, 0] = torch.arange(width, device=device)
        sep = torch.tensor([len(r) for r in part_a], dtype=torch.long, device=device)
        self.cache = model.new_cache(b, width + max_steps)
        model.prefill(tokens, positions, sep, self.cache)
        self.mask_positions = torch.tensor(mask_positions, dtype=torch.long, device=device)

    def step(self, tokens: Sequence[int], block_position: int) -> Tensor:
        device = self.mask_positions.device
        b = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long, device=device).view(b, 1)
        blocks = torch.full((b,), block_position, dtype=torch.long, device=device)
        positions = torch.stack([self.mask_positions, blocks], dim=1).view(b, 2, 1)
        hidden = self.model.decode_step(ids, positions, self.cache)  # [b, 1, h]
        return self.model.logits(hidden[:, -1])[:, : self.vocab_size].float()  # [b, V]

    def select(self, rows: Sequence[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.mask_positions.device)
        self.cache.select(index)
        self.mask_positions = self.mask_positions.index_select(0, index)


class UncachedStepper:
    """The reference decoder: the whole ``[part A | part B]`` through ``forward`` every step."""

    def __init__(
        self,
        model: GLMModel,
        part_a: Sequence[Sequence[int]],
        mask_positions: Sequence[int],
        vocab_size: int,
    ) -> None:
        self.model, self.vocab_size = model, vocab_size
        self.part_a = [list(r) for r in part_a]
        self.part_b: list[list[int]] = [[] for _ in part_a]
        self.mask_positions = list(mask_positions)

    def step(self, tokens: Sequence[int], block_position: int) -> Tensor:
        device = self.model.head_weight.device
        for row, t in zip(self.part_b, tokens, strict=True):
            row.append(t)
        assert all(len(r) == block_position for r in self.part_b)
        full = [a + b for a, b in zip(self.part_a, self.part_b, strict=True)]
        ids = _right_pad(full, device)  # [b, s]
        b, s = ids.shape
        positions = torch.zeros(b, 2, s, dtype=torch.long, device=device)
        for i, a in enumerate(self.part_a):
            sep, n = len(a), len(full[i])
            positions[i, 0, :sep] = torch.arange(sep)
            positions[i, 0, sep:n] = self.mask_positions[i]
            positions[i, 1, sep:n] = torch.arange(1, n - sep + 1)
        sep_t = torch.tensor([len(a) for a in self.part_a], dtype=torch.long, device=device)
        valid = torch.tensor([len(r) for r in full], dtype=torch.long, device=device)
        hidden = self.model(ids, positions, sep_t, valid)  # [b, s, h]
        last = hidden[torch.arange(b, device=device), valid - 1]  # [b, h]
        return self.model.logits(last)[:, : self.vocab_size].float()  # [b, V]

    def select(self, rows: Sequence[int]) -> None:
        self.part_a = [self.part_a[i] for i in rows]
        self.part_b = [list(self.part_b[i]) for i in rows]
        self.mask_positions = [self.mask_positions[i] for i in rows]
