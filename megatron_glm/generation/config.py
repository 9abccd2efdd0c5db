"""Decoding settings (:class:`GenerationConfig`) and the result of filling a text's blanks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick part-B tokens; validated on construction (ValueError naming the field).

    ``max_new_tokens`` bounds the tokens generated per blank (the closing [eop] not counted);
    ``min_new_tokens`` forbids the stop tokens before that many. Greedy unless ``do_sample``
    (temperature, then top-k, then top-p on the processed logits) or ``num_beams > 1`` (beam
    search, score = sum of log-probs / length ** ``length_penalty``). ``repetition_penalty``
    (CTRL's: a positive logit divided by it, a negative one multiplied) and
    ``no_repeat_ngram_size`` look at the tokens generated for the current blank only: part A
    is the context the fill should agree with, so copying a word from it is not punished.
    ``seed`` seeds one ``torch.Generator`` per row (never the global RNG), so a row's sample
    depends on the seed and the row's index, not on the batch it shares.
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1  # > 1 = beam search
    length_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, bool, str], ...] = (
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            (
                "min_new_tokens",
                0 <= self.min_new_tokens <= self.max_new_tokens,
                "between 0 and max_new_tokens",
            ),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, ">= 0 (0 = off)"),
            ("num_beams", self.num_beams >= 1, ">= 1"),
            ("seed", self.seed is None or self.seed >= 0, "None or >= 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(
                    f"GenerationConfig.{name} must be {rule}, got {getattr(self, name)!r}"
                )
        if self.num_beams > 1 and self.do_sample:
            raise ValueError(
                "GenerationConfig.do_sample with num_beams > 1 (beam sampling) is not supported: "
                "set num_beams=1 to sample or do_sample=False for beam search"
            )


@dataclass
class FillResult:
    """One text's blanks filled: the completed text, each fill in order, tokens generated."""

    text: str
    fills: list[str]
    new_tokens: int
