"""Greedy blank filling: the inference side of GLM's autoregressive blank infilling.

A text with one mask token (``[MASK]``, ``[sMASK]`` or ``[gMASK]``) becomes part A exactly as in
pretraining; part B starts with ``[sop]`` at the mask's position (block position 1) and is
extended one token at a time, each new token taking the mask's position and the next block
position, until ``[eop]`` or ``max_new_tokens``. ``sep`` is the length of part A, so part A is
bidirectional and part B causal, the same mask the model was trained with.

The model is re-run on the whole sequence at every step (no KV cache): this is for demos and
tests on small models; batched, cached decoding belongs to the generation issue.
"""

from __future__ import annotations

from typing import Protocol

import torch


class _Model(Protocol):
    def __call__(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        sep: torch.Tensor,
        valid_len: torch.Tensor,
    ) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class _Tokenizer(Protocol):
    mask_id: int
    smask_id: int
    gmask_id: int
    sop_id: int
    eop_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _mask_position(part_a: list[int], tok: _Tokenizer, text: str) -> int:
    """Index of the single mask token in part A; ValueError unless there is exactly one."""
    masks = {tok.mask_id, tok.smask_id, tok.gmask_id}
    found = [i for i, t in enumerate(part_a) if t in masks]
    if len(found) != 1:
        raise ValueError(
            f"text must hold exactly one [MASK]/[sMASK]/[gMASK], found {len(found)}: {text!r}"
        )
    return found[0]


@torch.no_grad()
def fill_blank(model: _Model, tok: _Tokenizer, text: str, *, max_new_tokens: int = 16) -> str:
    """Return the greedy completion of the single blank in ``text`` (without [sop]/[eop])."""
    part_a = tok.encode(text)
    mask_pos = _mask_position(part_a, tok, text)
    sep = len(part_a)
    tokens = [*part_a, tok.sop_id]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        n = len(tokens)
        positions = list(range(sep)) + [mask_pos] * (n - sep)
        blocks = [0] * sep + list(range(1, n - sep + 1))
        tokens_t = torch.tensor([tokens])  # [1, n]
        position_ids = torch.tensor([[positions, blocks]])  # [1, 2, n]
        hidden = model(tokens_t, position_ids, torch.tensor([sep]), torch.tensor([n]))
        logits = model.logits(hidden[:, -1])[..., : tok.vocab_size]  # padding rows never win
        next_id = int(logits.argmax(-1).item())
        if next_id == tok.eop_id:
            break
        generated.append(next_id)
        tokens.append(next_id)
    return tok.decode(generated)
