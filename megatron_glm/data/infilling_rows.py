"""Row assembly of blank infilling: chosen spans -> ``part A | part B | padding`` rows.

A row (docs/design.md, "Batch contract") is ``S`` tokens long:

* part A is the window with every chosen span replaced by one mask token
  (``[MASK]`` span task, ``[sMASK]`` sentence task, ``[gMASK]`` document task);
* part B holds the spans in shuffled order, each as input ``[sop] x1..xn`` with targets
  ``x1..xn [eop]``; loss_mask is 1 exactly there;
* padding (``pad`` = eos) follows ``valid_len``; its targets are pad, loss 0, positions 0.

Part A targets equal part A tokens (inert: loss 0). Positions: part A position = index in the
corrupted text, block position 0; every token of a span in part B takes the position of its
mask token and block position ``1..len+1`` (1 at ``[sop]``).

Every row of a micro-batch is laid out at once: each part is gathered as one flat array whose
order is the row-major order of its slots in the ``[B, S]`` grid, then scattered into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_glm.data.infilling_arrays import Flat, Spans, arange, group_bounds, order

__all__ = ["RowAssembler", "SpecialIds"]


@dataclass(frozen=True)
class SpecialIds:
    """Token ids blank infilling writes; ``pad`` is eos (docs/design.md, "Tokenizer")."""

    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    pad: int
    eos: int

    @classmethod
    def from_tokenizer(cls, tok: Any) -> SpecialIds:
        """Read the ids from a ``GLMTokenizer`` (duck-typed: ``mask_id``, ``smask_id``, ...)."""
        return cls(
            mask=int(tok.mask_id),
            smask=int(tok.smask_id),
            gmask=int(tok.gmask_id),
            sop=int(tok.sop_id),
            eop=int(tok.eop_id),
            pad=int(tok.pad_id),
            eos=int(tok.eos_id),
        )


@dataclass
class _SpanGeometry:
    """Where each span and each row's parts land (int64 arrays)."""

    rank: np.ndarray  # [N] span number inside its row
    mask_pos: np.ndarray  # [N] position of its mask token in part A
    sep: np.ndarray  # [B] part A length
    valid: np.ndarray  # [B] part A + part B length: L + 2 n


class RowAssembler:
    """Lays out the rows of a micro-batch from its windows and spans (module docstring).

    ``order0``: the first of each row's draws that order its spans in part B
    (:class:`megatron_glm.data.infilling_tasks.DrawLayout`).
    """

    def __init__(self, seq_length: int, ids: SpecialIds, order0: int) -> None:
        self.seq_length = seq_length
        self.ids = ids
        self.order0 = order0
        # Indexed by task code: span, sentence, document (blank_infilling.OBJECTIVES order).
        self._mask_of_task = np.array([ids.mask, ids.smask, ids.gmask], dtype=np.int64)
        self._cols = arange(seq_length)  # read-only column index

    def __call__(
        self, flat: Flat, spans: Spans, code: np.ndarray, u: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Part A, part B and padding of every row; spans sorted by (row, start)."""
        S, B = self.seq_length, code.shape[0]
        geo = _span_geometry(flat, spans, B)
        tok_a = self._part_a(flat, spans, code, geo)
        # Row-major slot indices of each part in the [B, S] grid: their order is exactly the
        # order of the concatenated parts.
        cols = self._cols[None, :]
        in_a = cols < geo.sep[:, None]  # [B, S]
        in_b = (cols < geo.valid[:, None]) ^ in_a  # sep <= j < valid
        slot_a = in_a.reshape(-1).nonzero()[0]
        tokens = np.full(B * S, self.ids.pad, dtype=np.int64)
        tokens[slot_a] = tok_a
        targets = tokens.copy()  # part A targets = part A tokens
        pos = np.zeros((B, 2, S), dtype=np.int64)
        pos[:, 0] = np.where(in_a, cols, 0)
        if spans.row.shape[0]:
            tok_b, tgt_b, pos_b, block_pos_b = self._part_b(flat, spans, geo, u)
            slot_b = in_b.reshape(-1).nonzero()[0]
            tokens[slot_b] = tok_b
            targets[slot_b] = tgt_b
            at = slot_b + (slot_b // S) * S  # (b, j) -> (b, 0, j) in the [B, 2, S] layout
            flat_pos = pos.reshape(-1)
            flat_pos[at] = pos_b
            flat_pos[at + S] = block_pos_b
        return {
            "tokens": tokens.reshape(B, S),
            "targets": targets.reshape(B, S),
            "loss_mask": in_b.astype(np.float32),
            "position_ids": pos,
            "sep": geo.sep,
            "valid_len": geo.valid,
            "objective": code.astype(np.int64),
        }

    def _part_a(self, flat: Flat, spans: Spans, code: np.ndarray, geo: _SpanGeometry) -> np.ndarray:
        """Part A of every row, concatenated: the windows minus span interiors and row
        separators, then each span's first token replaced by its mask. int64 [sum(sep)].

        (Index arrays from nonzero + take: numpy's boolean-mask indexing is several times
        slower here.)"""
        row, start, length = spans.row, spans.start, spans.length
        first_flat = flat.offset[row] + start  # [N] span starts in the concatenation
        delta = np.zeros(flat.tokens.shape[0] + 1, dtype=np.int64)
        delta[first_flat + 1] = 1
        delta[first_flat + length] -= 1  # ends never coincide with another span's start + 1
        inside = np.add.accumulate(delta[:-1])  # [F] 1 inside a span (after its first token)
        inside[flat.offset + flat.length] = 1  # separators
        tok_a = flat.tokens.take((inside == 0).nonzero()[0])  # [sum(sep)]
        off_a = np.add.accumulate(geo.sep) - geo.sep  # [B] row starts in tok_a
        tok_a[off_a[row] + geo.mask_pos] = self._mask_of_task[code[row]]
        return tok_a

    def _part_b(
        self, flat: Flat, spans: Spans, geo: _SpanGeometry, u: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Part B of every row, concatenated: row by row, each row's spans in random order;
        block = ``[sop] x1..xn``. Tokens, targets, positions, block positions (int64 [nb])."""
        row, start, length = spans.row, spans.start, spans.length
        idx = order(row, u[row, self.order0 + geo.rank])
        blen = length[idx] + 1
        bend = np.add.accumulate(blen)
        bstart = bend - blen
        total_b = int(bend[-1])
        sid = idx.repeat(blen)  # [nb] span of each part-B slot
        r = arange(total_b) - bstart.repeat(blen)  # [nb] offset inside the block
        # At r == len this reads the token after the span (at most the row's separator);
        # it is the [eop] slot, overwritten next.
        tgt_b = flat.tokens[flat.offset[row[sid]] + start[sid] + r]
        tgt_b[bend - 1] = self.ids.eop
        tok_b = np.empty_like(tgt_b)
        tok_b[1:] = tgt_b[:-1]
        tok_b[bstart] = self.ids.sop
        return tok_b, tgt_b, geo.mask_pos[sid], r + 1


def _span_geometry(flat: Flat, spans: Spans, num_rows: int) -> _SpanGeometry:
    """Each span's mask position in part A and each row's part lengths."""
    row, start, length = spans.row, spans.start, spans.length
    first, size = group_bounds(row, num_rows)
    rank = arange(row.shape[0]) - first  # span number inside its row
    shrink = length - 1  # tokens each span removes from part A
    cs = np.add.accumulate(shrink)
    removed = cs - shrink
    removed -= removed[first]  # removed before this span, inside its row
    mask_pos = start - removed  # [N] mask positions in part A
    row_removed = np.zeros(num_rows, dtype=np.int64)  # per-row total, via the row's last span
    last = first + size - 1
    row_removed[row[last]] = removed[last] + shrink[last]
    sep = flat.length - row_removed  # [B]
    valid = flat.length + 2 * np.bincount(row, minlength=num_rows)  # [B] L + 2 n
    return _SpanGeometry(rank, mask_pos, sep, valid)
