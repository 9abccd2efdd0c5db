"""Finetuning task files and their rows as GLM micro-batches (the batch contract plus labels).

Task files are JSONL, one split per file (``train.jsonl``, ``validation.jsonl``, ``test.jsonl``):
classification rows ``{"text", "label", optional "text_b"}``, seq2seq rows ``{"source",
"target"}``. A bad row (not JSON, a missing or empty field, a label without a verbalizer) is
refused with ``file:line`` (:class:`~megatron_glm.data.jsonl.BadLineError`): a finetuning set is
small and curated, so nothing is skipped silently.

Cloze classification (GLM paper, PET patterns): a pattern such as ``"{text} It is [MASK]."``
becomes part A with one [MASK]. Single-token verbalizers are scored at the [MASK] position
(:func:`cloze_single_batch`); multi-token ones get one row per (example, candidate) whose part
B is ``[sop] w1 .. wn`` at the mask's position (:func:`cloze_multi_batch`), the candidate scored
by its tokens' log-probabilities. Seq2seq: part A is ``source [gMASK]``, part B ``[sop]
target`` with targets ``target [eop]`` (:func:`seq2seq_batch`).

Texts are cut from their end (``text`` and ``text_b`` before the pattern's own words, the
source before the target) so that every row fits ``seq_length``. Part A starts with the text
itself, no [CLS]: pretraining rows (``data.blank_infilling``) and blank filling
(``generation``) have none either, so the finetuned model sees the layout it was trained on and
``finetune.evaluate.seq2seq_predictions`` decodes exactly the training layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_glm.data.jsonl import BadLines, check_text, iter_chunks, parse_line
from megatron_glm.data.tokenizer import Tokenizer
from megatron_glm.training.batches import Batch

SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: int
    """Index of the label in the verbalizer order."""
    text_b: str | None = None


@dataclass(frozen=True)
class Seq2SeqExample:
    source: str
    target: str


Example = ClassificationExample | Seq2SeqExample


def _rows(path: Path) -> list[tuple[int, object]]:
    """``(line number, JSON value)`` of every line; a line that is not JSON raises file:line."""
    bad = BadLines(strict=True)
    out: list[tuple[int, object]] = []
    for chunk in iter_chunks([path], 1 << 20):
        for i, raw in enumerate(chunk.lines()):
            lineno = chunk.first_lineno + i
            try:
                out.append((lineno, parse_line(raw)))
            except UnicodeDecodeError as e:
                bad.add("invalid_utf8", chunk.path, lineno, f"byte {e.start}: {e.reason}")
            except (ValueError, RecursionError) as e:
                bad.add("invalid_json", chunk.path, lineno, str(e))
        if chunk.cut_short:
            bad.add_cut_short(chunk.cut_short)
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def _field(obj: object, key: str, where: tuple[str, int], bad: BadLines) -> str:
    checked = check_text(obj, key)
    if isinstance(checked, tuple):
        bad.add(checked[0], where[0], where[1], checked[1])
    assert isinstance(checked, str)  # BadLines(strict=True) raised otherwise
    return checked


def read_classification(path: Path, labels: Sequence[str]) -> list[ClassificationExample]:
    """Rows of a classification file; a label outside ``labels`` (the verbalizers') is refused."""
    bad, index = BadLines(strict=True), {label: i for i, label in enumerate(labels)}
    out = []
    for lineno, obj in _rows(path):
        where = (str(path), lineno)
        text = _field(obj, "text", where, bad)
        label = _field(obj, "label", where, bad)
        if label not in index:
            bad.add("missing_key", where[0], lineno, f"label {label!r} has no verbalizer")
        text_b = _field(obj, "text_b", where, bad) if "text_b" in obj else None  # type: ignore[operator]
        out.append(ClassificationExample(text, index[label], text_b))
    return out


def read_seq2seq(path: Path) -> list[Seq2SeqExample]:
    """Rows of a seq2seq file (both fields non-empty)."""
    bad = BadLines(strict=True)
    out = []
    for lineno, obj in _rows(path):
        where = (str(path), lineno)
        out.append(
            Seq2SeqExample(_field(obj, "source", where, bad), _field(obj, "target", where, bad))
        )
    return out


def split_path(task_dir: str | Path, split: str) -> Path:
    path = Path(task_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"finetune.task_dir: {path} does not exist")
    return path


# ----------------------------------------------------------------------------- patterns

_PIECE = re.compile(r"(\{text\}|\{text_b\}|\[MASK\])")


@dataclass(frozen=True)
class Pattern:
    """A PET pattern split into literal pieces, ``{text}``, ``{text_b}`` and one ``[MASK]``."""

    pieces: tuple[str, ...]

    @classmethod
    def parse(cls, pattern: str) -> Pattern:
        return cls(tuple(p for p in _PIECE.split(pattern) if p))

    def encode(
        self, tok: Tokenizer, ex: ClassificationExample, budget: int
    ) -> tuple[list[int], int]:
        """Part A ids: the pattern filled, and the index of its [MASK]; the
        texts are cut from their end (longest first) so that part A has at most ``budget``
        ids."""
        texts = {"{text}": tok.encode(ex.text), "{text_b}": tok.encode(ex.text_b or "")}
        fixed = sum(
            1 if p == "[MASK]" else len(tok.encode(p)) for p in self.pieces if p not in texts
        )
        room = budget - fixed
        if room < 2:
            raise ValueError(f"data.seq_length leaves no room for the texts of pattern {self}")
        used = [k for k in texts if k in self.pieces]
        while sum(len(texts[k]) for k in used) > room:
            longest = max(used, key=lambda k: len(texts[k]))
            texts[longest] = texts[longest][:-1]
        ids: list[int] = []
        mask_at = -1
        for p in self.pieces:
            if p == "[MASK]":
                mask_at = len(ids)
                ids.append(tok.mask_id)
            else:
                ids += texts[p] if p in texts else tok.encode(p)
        return ids, mask_at


def verbalizer_ids(tok: Tokenizer, verbalizers: Mapping[str, str]) -> list[list[int]]:
    """Token ids of each label's word or phrase, in the mapping's order."""
    out = []
    for label, word in verbalizers.items():
        ids = tok.encode(word)
        if not ids:
            raise ValueError(f"finetune.verbalizers.{label}: {word!r} encodes to no tokens")
        out.append(ids)
    return out


# ----------------------------------------------------------------------------- batches


def _empty(rows: int, seq: int, pad: int) -> Batch:
    return {
        "tokens": torch.full((rows, seq), pad, dtype=torch.long),
        "position_ids": torch.zeros(rows, 2, seq, dtype=torch.long),
        "sep": torch.zeros(rows, dtype=torch.long),
        "valid_len": torch.zeros(rows, dtype=torch.long),
    }


def _put_row(batch: Batch, r: int, part_a: list[int], part_b: list[int], mask_at: int) -> None:
    """Row ``r``: part A at positions 0.., part B at the mask's position, block positions
    1..len(part_b) (docs/design.md, "Batch contract")."""
    a, b = len(part_a), len(part_b)
    batch["tokens"][r, : a + b] = torch.tensor(part_a + part_b)
    batch["position_ids"][r, 0, :a] = torch.arange(a)
    batch["position_ids"][r, 0, a : a + b] = mask_at
    batch["position_ids"][r, 1, a : a + b] = torch.arange(1, b + 1)
    batch["sep"][r] = a
    batch["valid_len"][r] = a + b


def _with_labels(
    batch: Batch, examples: Sequence[ClassificationExample | None]
) -> list[ClassificationExample]:
    """Set ``label`` and ``loss_mask`` (``[b]``) of ``batch``; returns the examples with each
    ``None`` (micro-batch padding: ``loss_mask`` 0) replaced by an empty one to encode."""
    batch["label"] = torch.tensor([0 if ex is None else ex.label for ex in examples])
    batch["loss_mask"] = torch.tensor([float(ex is not None) for ex in examples])
    return [ClassificationExample("", 0) if ex is None else ex for ex in examples]


def cloze_single_batch(
    tok: Tokenizer,
    pattern: Pattern,
    examples: Sequence[ClassificationExample | None],
    seq_length: int,
) -> Batch:
    """Single-token verbalizers: one row per example (no part B); ``mask_pos`` is where the
    verbalizer tokens are scored. ``None`` pads the micro-batch (``loss_mask`` 0)."""
    batch = _empty(len(examples), seq_length, tok.pad_id)
    batch["mask_pos"] = torch.zeros(len(examples), dtype=torch.long)
    for r, ex in enumerate(_with_labels(batch, examples)):
        part_a, mask_at = pattern.encode(tok, ex, seq_length)
        _put_row(batch, r, part_a, [], mask_at)
        batch["mask_pos"][r] = mask_at
    return batch


def cloze_multi_batch(
    tok: Tokenizer,
    pattern: Pattern,
    candidates: Sequence[Sequence[int]],
    examples: Sequence[ClassificationExample | None],
    seq_length: int,
) -> Batch:
    """Multi-token verbalizers: rows ``e * C + c`` hold example ``e`` with candidate ``c`` in
    part B (``[sop] w1 .. wn``); ``targets``/``cand_mask`` mark where ``w1 .. wn`` are
    predicted. ``label``/``loss_mask`` are per example (``[b]``)."""
    c, longest = len(candidates), max(len(ids) for ids in candidates)
    batch = _empty(len(examples) * c, seq_length, tok.pad_id)
    batch["targets"] = torch.zeros(len(examples) * c, seq_length, dtype=torch.long)
    batch["cand_mask"] = torch.zeros(len(examples) * c, seq_length, dtype=torch.float32)
    for e, ex in enumerate(_with_labels(batch, examples)):
        part_a, mask_at = pattern.encode(tok, ex, seq_length - longest)
        for k, ids in enumerate(candidates):
            r, a = e * c + k, len(part_a)
            _put_row(batch, r, part_a, [tok.sop_id, *ids[:-1]], mask_at)
            batch["targets"][r, a : a + len(ids)] = torch.tensor(ids)
            batch["cand_mask"][r, a : a + len(ids)] = 1.0
    return batch


def seq2seq_batch(
    tok: Tokenizer,
    examples: Sequence[Seq2SeqExample | None],
    seq_length: int,
    *,
    mask_id: int,
    max_target_length: int,
) -> Batch:
    """``source [gMASK]`` + ``[sop] target``, targets ``target [eop]`` under
    ``loss_mask``; ``objective`` 0 (one objective)."""
    rows = len(examples)
    batch = _empty(rows, seq_length, tok.pad_id)
    batch["targets"] = torch.zeros(rows, seq_length, dtype=torch.long)
    batch["loss_mask"] = torch.zeros(rows, seq_length, dtype=torch.float32)
    batch["objective"] = torch.zeros(rows, dtype=torch.long)
    for r, ex in enumerate(examples):
        source, target = ("", "") if ex is None else (ex.source, ex.target)
        tgt = tok.encode(target)[:max_target_length]
        src_room = seq_length - (len(tgt) + 1) - 1
        if src_room < 1:
            raise ValueError("data.seq_length leaves no room for the source")
        part_a = [*tok.encode(source)[:src_room], mask_id]
        a = len(part_a)
        _put_row(batch, r, part_a, [tok.sop_id, *tgt], a - 1)
        batch["targets"][r, a : a + len(tgt) + 1] = torch.tensor([*tgt, tok.eop_id])
        if ex is not None:
            batch["loss_mask"][r, a : a + len(tgt) + 1] = 1.0
    return batch
