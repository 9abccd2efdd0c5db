"""Greedy blank filling feeds the model the pretraining layout: part A, [sop], 2D positions.

The scripted model below has no KV-cache path, so these tests run the uncached reference
decoder (``use_cache=False``), whose every call sees the whole sequence; the cached decoder is
checked against it in tests/unit/test_generation.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.generation.blank_fill import fill_blank


@dataclass
class FakeTokenizer:
    """Ids: 0-9 words, 10 [MASK], 11 [sMASK], 12 [gMASK], 13 sop, 14 eop; vocab 15 (padded 16)."""

    mask_id: int = 10
    smask_id: int = 11
    gmask_id: int = 12
    sop_id: int = 13
    eop_id: int = 14
    vocab_size: int = 15

    def encode(self, text: str) -> list[int]:
        return [10 if w == "[MASK]" else int(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


@dataclass
class ScriptedModel:
    """Emits a fixed script of ids (highest logit) and records every call's inputs."""

    script: list[int]
    calls: list[tuple[list[int], list[list[int]], int, int]] = field(default_factory=list)
    # what the decoder reads of a GLMModel besides calling it
    cfg: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(max_position_embeddings=64)
    )
    vocab_size: int = 16
    tp: int = 1
    training: bool = False
    head_weight: torch.Tensor = field(default_factory=lambda: torch.zeros(16, 4))

    def train(self, mode: bool = True) -> None:
        self.training = mode

    def eval(self) -> None:
        self.training = False

    def __call__(self, tokens, position_ids, sep, valid_len):  # type: ignore[no-untyped-def]
        self.calls.append((tokens[0].tolist(), position_ids[0].tolist(), int(sep), int(valid_len)))
        return torch.zeros(1, tokens.shape[1], 4)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(hidden.shape[0], 16)
        out[:, 15] = 100.0  # a padding row must never be chosen
        out[:, self.script[len(self.calls) - 1]] = 50.0
        return out


def test_layout_and_stop_at_eop() -> None:
    model = ScriptedModel(script=[7, 8, 14, 9])
    assert (
        fill_blank(model, FakeTokenizer(), "1 2 [MASK] 3", max_new_tokens=10, use_cache=False)
        == "7 8"
    )
    assert len(model.calls) == 3  # stopped at [eop]
    tokens, positions, sep, valid = model.calls[-1]
    assert tokens == [1, 2, 10, 3, 13, 7, 8]
    assert positions == [[0, 1, 2, 3, 2, 2, 2], [0, 0, 0, 0, 1, 2, 3]]
    assert (sep, valid) == (4, 7)


def test_max_new_tokens_bounds_generation() -> None:
    model = ScriptedModel(script=[5] * 10)
    assert (
        fill_blank(model, FakeTokenizer(), "[MASK] 1", max_new_tokens=3, use_cache=False) == "5 5 5"
    )


@pytest.mark.parametrize("text", ["1 2 3", "[MASK] 1 [MASK]"])
def test_needs_exactly_one_mask(text: str) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        fill_blank(ScriptedModel(script=[1]), FakeTokenizer(), text)


def test_space_before_a_mask_is_part_of_the_blank(tiny_tokenizer: GLMTokenizer) -> None:
    """``"a [MASK] b"`` gives the part A that ``"a[MASK] b"`` gives (the lone ``▁`` piece that
    encodes the space before the mask is dropped: pretraining's spans took it with them), while
    a newline before a mask stays."""
    from megatron_glm.generation.blank_fill import encode_blanks

    tok = tiny_tokenizer
    spaced = tok.encode("to a [MASK] to")
    assert len(spaced) == len(tok.encode("to a[MASK] to")) + 1
    assert encode_blanks(tok, "to a [MASK] to", 0) == tok.encode("to a[MASK] to")
    assert encode_blanks(tok, "x\n[MASK] y", 0) == tok.encode("x\n[MASK] y")
    two = encode_blanks(tok, "a [MASK] b [sMASK].", 0)
    assert two == tok.encode("a[MASK] b[sMASK].")
