"""Blank filling: texts with [MASK]/[sMASK]/[gMASK] in, completed texts out (THUDM's way).

A text becomes part A exactly as in pretraining. Its blanks are filled in order: the first mask
token is decoded (part B at its position, see :mod:`megatron_glm.generation.decoder`), the fill
then replaces that mask in part A, and the next blank is decoded against the updated context,
and so on (THUDM GLM's ``generate_samples`` loop). A ``[gMASK]`` at the end of a text asks for a
long continuation; its generation also stops at ``<|endoftext|>``. Texts are decoded in batches
(sorted by length, to pad less); every round decodes the next blank of each text still holding
one.

:func:`fill_blank` (one text, one blank, greedy) is the original public API, now a thin wrapper
over :func:`fill_blanks`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from megatron_glm.generation.config import FillResult, GenerationConfig
from megatron_glm.generation.decoder import DecodeRow, decode_rows
from megatron_glm.model.glm import GLMModel

_MASK_LIKE = re.compile(r"\[[A-Za-z]*MASK[A-Za-z0-9_]*\]", re.IGNORECASE)
_KNOWN_MASKS = ("[MASK]", "[sMASK]", "[gMASK]")


class BlankTokenizer(Protocol):
    """What blank filling uses of a tokenizer (:class:`megatron_glm.data.tokenizer.Tokenizer`)."""

    vocab_size: int
    mask_id: int
    smask_id: int
    gmask_id: int
    sop_id: int
    eop_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _blanks(ids: Sequence[int], tok: BlankTokenizer) -> list[int]:
    masks = (tok.mask_id, tok.smask_id, tok.gmask_id)
    return [i for i, t in enumerate(ids) if t in masks]


def encode_blanks(tok: BlankTokenizer, text: str, row: int) -> list[int]:
    """Part A of ``text``; ValueError naming ``row`` without a mask or with an unknown one."""
    unknown = [m for m in _MASK_LIKE.findall(text) if m not in _KNOWN_MASKS]
    if unknown:
        raise ValueError(
            f"row {row}: unknown mask token {unknown[0]!r} (use [MASK], [sMASK] or [gMASK]): "
            f"{text[:80]!r}"
        )
    ids = tok.encode(text)
    if not _blanks(ids, tok):
        raise ValueError(f"row {row}: no [MASK], [sMASK] or [gMASK] to fill in {text[:80]!r}")
    return _without_boundary_before_masks(ids, tok)


def _without_boundary_before_masks(ids: list[int], tok: BlankTokenizer) -> list[int]:
    """Drop a lone word-boundary piece (one that decodes to ``""``, SentencePiece's ``▁``)
    right before a mask token.

    ``"a [MASK] b"`` encodes the space before the mask as its own piece, but in pretraining a
    masked span took its leading space with it (``▁word`` is one piece), so part A never held
    ``▁`` before a mask: keeping it shows the model a context it never saw, and the fill
    (which starts with its own ``▁``) would be decoded after a double space.
    """
    blanks = set(_blanks(ids, tok))
    drop = {
        i - 1 for i in blanks if i > 0 and i - 1 not in blanks and tok.decode([ids[i - 1]]) == ""
    }
    return [t for i, t in enumerate(ids) if i not in drop]


def _stop_ids(tok: BlankTokenizer, mask_token: int) -> frozenset[int]:
    return frozenset({tok.eop_id, tok.eos_id} if mask_token == tok.gmask_id else {tok.eop_id})


def _fill_batch(
    model: GLMModel,
    tok: BlankTokenizer,
    texts: dict[int, list[int]],
    config: GenerationConfig,
    use_cache: bool,
    first_row: int,
) -> dict[int, list[list[int]]]:
    """Fill every blank of ``texts`` (row -> part A ids, updated in place); row -> fills."""
    fills: dict[int, list[list[int]]] = {row: [] for row in texts}
    banned = (tok.mask_id, tok.smask_id, tok.gmask_id, tok.sop_id)
    while pending := [row for row, ids in texts.items() if _blanks(ids, tok)]:
        rows = []
        for row in pending:
            ids = texts[row]
            position = _blanks(ids, tok)[0]
            key = _pair(first_row + row, len(fills[row]))  # a sampling stream per (text, blank)
            rows.append(DecodeRow(ids, position, _stop_ids(tok, ids[position]), key=key))
        try:
            out = decode_rows(
                model,
                rows,
                config,
                sop_id=tok.sop_id,
                vocab_size=tok.vocab_size,
                banned=banned,
                use_cache=use_cache,
            )
        except ValueError as exc:
            raise ValueError(_name_row(str(exc), pending)) from exc
        for row, decoded, generated in zip(pending, rows, out, strict=True):
            p = decoded.mask_position
            texts[row] = [*texts[row][:p], *generated, *texts[row][p + 1 :]]
            fills[row].append(generated)
    return fills


def fill_blanks(
    model: GLMModel,
    tok: BlankTokenizer,
    texts: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 8,
    use_cache: bool = True,
    first_row: int = 0,
) -> list[FillResult]:
    """Fill every blank of every text, in order (module docstring); one result per text.

    ``first_row``: the index of ``texts[0]`` in the caller's whole input (a file read in
    chunks), so that a sampled fill depends on the seed and the text's index in the input, not
    on how the input was chunked.

    Under tp > 1 every TP rank calls this with the same inputs and gets the same result.
    ValueError naming the row index for a text without a mask, with an unknown mask token, or
    too long for the model's positions.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = {row: encode_blanks(tok, text, row) for row, text in enumerate(texts)}
    order = sorted(encoded, key=lambda row: len(encoded[row]))
    results: dict[int, FillResult] = {}
    for start in range(0, len(order), batch_size):
        chunk = {row: encoded[row] for row in order[start : start + batch_size]}
        fills = _fill_batch(model, tok, chunk, config, use_cache, first_row)
        for row, row_fills in fills.items():
            results[row] = FillResult(
                text=tok.decode(chunk[row]),
                fills=[tok.decode(f) for f in row_fills],
                new_tokens=sum(len(f) for f in row_fills),
            )
    return [results[row] for row in range(len(texts))]


def _pair(a: int, b: int) -> int:
    """Cantor's pairing: a distinct int for each (a, b) >= 0, however large."""
    return (a + b) * (a + b + 1) // 2 + b


def _name_row(message: str, rows: list[int]) -> str:
    """Rewrite the decoder's "row i" (index in its batch) to the text's index in ``texts``."""
    match = re.match(r"row (\d+): (.*)", message, re.DOTALL)
    if match is None:
        return message
    return f"row {rows[int(match.group(1))]}: {match.group(2)}"


def fill_blank(
    model: GLMModel,
    tok: BlankTokenizer,
    text: str,
    *,
    max_new_tokens: int = 16,
    use_cache: bool = True,
) -> str:
    """Return the greedy completion of the single blank in ``text`` (without [sop]/[eop])."""
    ids = tok.encode(text)
    found = len(_blanks(ids, tok))
    if found != 1:
        raise ValueError(
            f"text must hold exactly one [MASK]/[sMASK]/[gMASK], found {found}: {text!r}"
        )
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    return fill_blanks(model, tok, [text], config, use_cache=use_cache)[0].fills[0]
