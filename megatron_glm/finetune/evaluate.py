"""Evaluation by generation and by likelihood: seq2seq predictions, zero-shot perplexity and
LAMBADA-style last-word accuracy (``tools/evaluate.py``; finetuning's seq2seq evaluation).

All three put the text the model conditions on in part A, bidirectionally, and what is
predicted in part B after ``[gMASK]``: GLM's document objective, the layout the model was
pretrained on (THUDM GLM's zero-shot ``LMDataset`` / ``LambadaDataset`` do the same). As
everywhere in this project, no ``[CLS]`` is put in front (our pretraining rows have none).

**Perplexity.** A text's tokens are scored left to right in windows of at most ``max_length``
positions. A window is ``context [gMASK] | [sop] t1 .. t(n-1)`` with targets ``t1 .. tn``:
part B is teacher-forced, each target's loss is the cross entropy of the model's logits at the
position before it (over the model's whole, padded vocabulary: the loss training reports, so
``exp`` of a run's validation loss and this perplexity measure the same thing). The first window
has no context (part A is ``[gMASK]`` alone, a 100% suffix, which the document objective
draws) and scores the first ``max_length - 1`` tokens; every later window scores the next
``stride`` tokens with the ``max_length - 1 - stride`` tokens before them as context (the
sliding window of THUDM's ``overlapping_eval``). Every token of every text is scored exactly
once; no end-of-text token is scored (the held-out texts are not cut where documents end).

**Last word.** A text is split at its last whitespace; the last word, with punctuation stripped
from both ends (LAMBADA's targets are bare words; a text whose last word is all punctuation,
or that has a single word, is skipped and counted), is what the model must generate after
``context [gMASK]``, greedily. The first whitespace-delimited word of the generation,
stripped the same way, must equal it (case-sensitive): generating the word's tokens and then
more letters (``cat`` -> ``cats``) is a miss, ``cat.`` a hit.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_glm.data.jsonl import BadLines, read_texts
from megatron_glm.data.tokenizer import Tokenizer
from megatron_glm.finetune.metrics import accuracy, perplexity
from megatron_glm.generation import GenerationConfig, fill_blanks, generate
from megatron_glm.generation.decoder import eval_mode
from megatron_glm.model.glm import GLMModel

logger = logging.getLogger(__name__)

MASK_TOKENS = ("[MASK]", "[sMASK]", "[gMASK]")
PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb"
"""Stripped from both ends of a last word and of the generated one (ASCII and typographic)."""


# ---------------------------------------------------------------------------------- seq2seq


def seq2seq_predictions(
    model: GLMModel,
    tok: Tokenizer,
    sources: Sequence[str],
    gen: GenerationConfig,
    *,
    mask: str = "[gMASK]",
    batch_size: int = 8,
) -> list[str]:
    """The generated target of each source: part A is ``source + mask`` (the mask right after
    the text, so its ids are ``encode(source) + [mask id]``, the layout seq2seq finetuning
    trains on), part B is decoded with ``gen``; each prediction is whitespace-stripped.

    ValueError naming the source's index for an empty source or one that already holds a mask
    token (its blank would be filled first and the prediction would be the wrong blank).
    """
    if mask not in MASK_TOKENS:
        raise ValueError(f"mask must be one of {', '.join(MASK_TOKENS)}, got {mask!r}")
    texts = []
    for i, source in enumerate(sources):
        if not source.strip():
            raise ValueError(f"source {i}: empty source")
        held = [m for m in MASK_TOKENS if m in source]
        if held:
            raise ValueError(
                f"source {i}: holds a mask token {held[0]} of its own: {source[:80]!r}"
            )
        texts.append(source + mask)
    results = fill_blanks(model, tok, texts, gen, batch_size=batch_size)
    return [r.fills[0].strip() for r in results]


# ------------------------------------------------------------------------------ perplexity


def read_held_out(path: str | Path, key: str = "text") -> list[str]:
    """Every text of a JSONL file (the string under ``key`` of each line), strictly: the first
    bad line (invalid JSON, missing key, empty text, ...) is an error naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    texts = list(read_texts(path, key, BadLines(strict=True)))
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


@dataclass(frozen=True)
class Window:
    """One scored window: ``context`` in part A before ``[gMASK]``, ``targets`` in part B."""

    text: int
    context: list[int]
    targets: list[int]


def lm_windows(ids: Sequence[int], max_length: int, stride: int, text: int = 0) -> list[Window]:
    """The windows scoring ``ids`` (module docstring): ``len(context) + 1 + len(targets)``
    positions each, at most ``max_length``; every id a target exactly once."""
    if not 1 <= stride <= max_length - 1:
        raise ValueError(f"stride must be in [1, max_length - 1 = {max_length - 1}], got {stride}")
    ids = list(ids)
    windows = [Window(text, [], ids[: max_length - 1])] if ids else []
    keep = max_length - 1 - stride
    pos = len(windows[0].targets) if ids else 0
    while pos < len(ids):
        targets = ids[pos : pos + stride]
        windows.append(Window(text, ids[max(0, pos - keep) : pos], targets))
        pos += len(targets)
    return windows


@dataclass(frozen=True)
class LMRows:
    """A batch of windows as model inputs: right-padded ``[b, s]`` rows and their targets."""

    tokens: torch.Tensor  # int64 [b, s]
    position_ids: torch.Tensor  # int64 [b, 2, s]
    sep: torch.Tensor  # int64 [b]
    valid_len: torch.Tensor  # int64 [b]
    targets: torch.Tensor  # int64 [b, s], -100 where nothing is scored


def window_rows(windows: Sequence[Window], tok: Tokenizer, device: torch.device) -> LMRows:
    """``context [gMASK] [sop] t1 .. t(n-1)``, positions as in pretraining's part B (row 0: the
    mask's index, row 1: 1..n), targets ``t1 .. tn`` aligned with the positions before them."""
    width = max(len(w.context) + 1 + len(w.targets) for w in windows)
    b = len(windows)
    tokens = torch.full((b, width), tok.pad_id, dtype=torch.long)
    positions = torch.zeros(b, 2, width, dtype=torch.long)
    targets = torch.full((b, width), -100, dtype=torch.long)
    sep = torch.zeros(b, dtype=torch.long)
    valid = torch.zeros(b, dtype=torch.long)
    for i, w in enumerate(windows):
        a, n = len(w.context) + 1, len(w.targets)
        row = [*w.context, tok.gmask_id, tok.sop_id, *w.targets[:-1]]
        tokens[i, : a + n] = torch.tensor(row, dtype=torch.long)
        positions[i, 0, :a] = torch.arange(a)
        positions[i, 0, a : a + n] = a - 1
        positions[i, 1, a : a + n] = torch.arange(1, n + 1)
        targets[i, a : a + n] = torch.tensor(w.targets, dtype=torch.long)
        sep[i], valid[i] = a, a + n
    return LMRows(
        tokens.to(device),
        positions.to(device),
        sep.to(device),
        valid.to(device),
        targets.to(device),
    )


def window_loss(model: GLMModel, rows: LMRows) -> tuple[float, int]:
    """(sum of the targets' cross entropies, number of targets) of one batch of windows."""
    hidden = model(rows.tokens, rows.position_ids, rows.sep, rows.valid_len)  # [b, s, h]
    scored = rows.targets >= 0
    logits = model.logits(hidden[scored]).float()  # [n, vocab]
    loss = F.cross_entropy(logits, rows.targets[scored], reduction="sum")
    return float(loss.double().item()), int(scored.sum().item())


@dataclass(frozen=True)
class PerplexityResult:
    """Zero-shot language-model figures of a set of texts."""

    texts: int
    tokens: int
    sum_loss: float

    @property
    def loss(self) -> float:
        """Mean loss per token (nats)."""
        return self.sum_loss / self.tokens

    @property
    def perplexity(self) -> float:
        return perplexity(self.sum_loss, self.tokens)


def _check_length(model: GLMModel, max_length: int | None) -> int:
    limit = model.cfg.max_position_embeddings
    length = limit if max_length is None else max_length
    if not 2 <= length <= limit:
        raise ValueError(
            f"max_length must be in [2, {limit}] (the model's max_position_embeddings), "
            f"got {length}"
        )
    return length


def _batches(items: Sequence[Window], size: int) -> Iterator[Sequence[Window]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def lm_perplexity(
    model: GLMModel,
    tok: Tokenizer,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity of ``texts`` (module docstring); ``max_length`` defaults to the model's
    positions, ``stride`` to half of it (each later window sees at least half a window of
    context)."""
    length = _check_length(model, max_length)
    step = max(1, length // 2) if stride is None else stride
    windows = [
        w for i, text in enumerate(texts) for w in lm_windows(tok.encode(text), length, step, i)
    ]
    if not windows:
        raise ValueError("perplexity: the texts hold no tokens")
    device = model.head_weight.device
    total, count = 0.0, 0
    with eval_mode(model):
        for chunk in _batches(windows, batch_size):
            loss, n = window_loss(model, window_rows(chunk, tok, device))
            total, count = total + loss, count + n
    logger.info("perplexity: %d texts, %d windows, %d tokens", len(texts), len(windows), count)
    return PerplexityResult(len(texts), count, total)


# ------------------------------------------------------------------------------- last word


def normalize_word(word: str) -> str:
    """``word`` with punctuation (:data:`PUNCTUATION`) stripped from both ends."""
    return word.strip(PUNCTUATION)


@dataclass(frozen=True)
class LastWordItem:
    """A text split for the last-word task: the context and the bare word to generate."""

    context: str
    word: str


def split_last_word(text: str) -> LastWordItem | None:
    """(everything before the last word, right-stripped; the last word, normalised), or None
    for a text of fewer than two words or whose last word is only punctuation."""
    stripped = text.rstrip()
    words = stripped.split()
    if len(words) < 2 or not normalize_word(words[-1]):
        return None
    context = stripped[: len(stripped) - len(words[-1])].rstrip()
    return LastWordItem(context, normalize_word(words[-1]))


def first_word(generated: str) -> str:
    """The first whitespace-delimited word of a generation, normalised ('' for none)."""
    words = generated.split()
    return normalize_word(words[0]) if words else ""


@dataclass(frozen=True)
class LastWordResult:
    """Last-word accuracy: per scored text the target and the generated first word."""

    texts: int
    targets: list[str]
    predictions: list[str]

    @property
    def scored(self) -> int:
        return len(self.targets)

    @property
    def skipped(self) -> int:
        """Texts with no last word to predict (one word, or punctuation only)."""
        return self.texts - self.scored

    @property
    def correct(self) -> int:
        return sum(p == t for p, t in zip(self.predictions, self.targets, strict=True))

    @property
    def accuracy(self) -> float:
        return accuracy(self.predictions, self.targets)


def _generate_words(
    model: GLMModel, tok: Tokenizer, items: Sequence[LastWordItem], length: int
) -> list[str]:
    """Greedy first words after ``context [gMASK]``; a context too long for ``length``
    positions keeps its last tokens (THUDM's left shift). The budget is the target's token
    count + 2: enough to show whether the model ends the word there or goes on with it."""
    budget = max(len(tok.encode(item.word)) for item in items) + 2
    if budget + 2 > length:
        raise ValueError(f"max_length {length} leaves no room for a last word of {budget} tokens")
    rows = []
    for item in items:
        ids = tok.encode(item.context)
        rows.append([*ids[max(0, len(ids) - (length - budget - 1)) :], tok.gmask_id])
    out = generate(
        model,
        rows,
        [len(r) - 1 for r in rows],
        GenerationConfig(max_new_tokens=budget),
        eos_ids=[tok.eop_id, tok.eos_id],
        sop_id=tok.sop_id,
        vocab_size=tok.vocab_size,
        banned_ids=(tok.mask_id, tok.smask_id, tok.gmask_id, tok.sop_id),
    )
    return [first_word(tok.decode(ids)) for ids in out]


def last_word_accuracy(
    model: GLMModel,
    tok: Tokenizer,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 8,
) -> LastWordResult:
    """LAMBADA-style accuracy of ``texts`` (module docstring); ValueError if none has a last
    word to predict."""
    length = _check_length(model, max_length)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = [item for item in map(split_last_word, texts) if item is not None]
    if not items:
        raise ValueError("last-word accuracy: no text has two words and a last word")
    predictions: list[str] = []
    for start in range(0, len(items), batch_size):
        predictions += _generate_words(model, tok, items[start : start + batch_size], length)
    if len(items) < len(texts):
        logger.info(
            "last word: %d of %d texts skipped (no last word)", len(texts) - len(items), len(texts)
        )
    return LastWordResult(len(texts), [item.word for item in items], predictions)
