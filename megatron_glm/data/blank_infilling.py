"""GLM's autoregressive blank infilling: packed windows -> static-shape batch rows.

Each row gets one task (span, sentence or document, :data:`OBJECTIVES`); the task's sampler
(:mod:`megatron_glm.data.infilling_tasks`: the tasks, the static shape rule and span placement)
picks the spans to mask, and the row assembly (:mod:`megatron_glm.data.infilling_rows`: the
``part A | part B | padding`` layout of docs/design.md, "Batch contract") writes the row. This
module draws the tasks and the random numbers and ties the two together.

Vectorisation. :meth:`BlankInfilling.batch` builds a whole micro-batch with one pass of numpy
operations: the windows are concatenated with one eos between them (so no run crosses a row)
and every per-span and per-token step works on the concatenation with per-row offsets
(:mod:`megatron_glm.data.infilling_arrays`). Per-row numpy costs ~70 small operations whose
dispatch overhead dominates; batching amortises it (``tools/bench/bench_collator.py``).
:meth:`BlankInfilling.__call__` is a batch of one, and ``GLMPretrainDataset.__getitems__`` uses
:meth:`batch` for DataLoader batches.

Determinism: a row's random numbers are the SplitMix64 stream (a counter-based generator: draw
``j`` is ``mix(key + (j + 1) * golden)``) keyed by ``mix(mix(seed_key + (epoch << 40 | index)))``.
A row is therefore a pure function of (seed, epoch, sample index), its window and the forced
objective, whatever the batch it is built in, the worker count, rank or resume point: every
step uses row-local quantities only (global offsets are exact integer shifts). Draws ``[0, R)``
are fixed per row (task, coins, lengths, anchors, part-B order); sentence units use draw
``R + start``; moving spans out of full documents uses draws from ``R + window_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from megatron_glm.config import ObjectiveConfig
from megatron_glm.data.infilling_arrays import (
    Flat,
    Spans,
    concat_spans,
    mix,
    splitmix_int,
    uniforms,
)
from megatron_glm.data.infilling_rows import RowAssembler, SpecialIds
from megatron_glm.data.infilling_tasks import (
    DocumentTask,
    DrawLayout,
    SentenceTask,
    SpanTask,
    TaskBatch,
    TaskSampler,
    span_budget,
)
from megatron_glm.objectives import OBJECTIVES

__all__ = [
    "OBJECTIVES",
    "BlankInfilling",
    "RowBlock",
    "SpecialIds",
    "WindowLike",
    "format_row",
    "row_blocks",
    "row_to_json",
    "span_budget",
]


_INDEX_BITS = 40  # sample index bits of a row key; the epoch takes the bits above


class WindowLike(Protocol):
    """What blank infilling reads from a packed window (``data.packed_dataset.Window``)."""

    @property
    def tokens(self) -> np.ndarray: ...  # int64 [L]

    @property
    def sentence_starts(self) -> np.ndarray: ...  # int64 [K], sorted offsets

    @property
    def epoch(self) -> int: ...

    @property
    def index(self) -> int: ...


class BlankInfilling:
    """Turns packed windows into blank-infilling rows (see the module docstring).

    ``batch`` builds a micro-batch at once; calling the object builds one row. Stateless after
    construction (safe to share across threads and to copy into DataLoader workers).
    """

    def __init__(self, cfg: ObjectiveConfig, *, seq_length: int, ids: SpecialIds, seed: int):
        assert 0 <= seed < 2**64, f"seed {seed} outside [0, 2**64) (TrainConfig checks train.seed)"
        self.cfg = cfg
        self.seq_length = seq_length
        self.ids = ids
        self.seed = seed
        self.window_length, self.max_spans = span_budget(cfg, seq_length)
        draws = DrawLayout.of(cfg, self.window_length, self.max_spans)
        span = SpanTask(cfg, draws)
        self.span_mean = span.span_mean
        # One sampler per task code, in OBJECTIVES order.
        self._samplers: tuple[TaskSampler, ...] = (
            span,
            SentenceTask(cfg, draws, ids.eos),
            DocumentTask(cfg),
        )
        self._assemble = RowAssembler(seq_length, ids, draws.order0)
        self._draw_ids = np.arange(draws.num_draws, dtype=np.uint64)
        self._seed_key = np.uint64(splitmix_int(seed))
        self._task_cdf = np.add.accumulate([cfg.span_prob, cfg.sentence_prob, cfg.document_prob])

    # ------------------------------------------------------------------ entry points

    def __call__(self, window: WindowLike, objective: str | None = None) -> dict[str, Any]:
        """The row of one window (arrays ``[S]``, ``position_ids [2, S]``, int64 scalars)."""
        out = self.batch([window], [objective])
        row = {key: value[0] for key, value in out.items()}
        return row

    def batch(
        self, windows: Sequence[WindowLike], objectives: Sequence[str | None] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows of ``windows`` stacked: ``[B, S]``, ``position_ids [B, 2, S]``, scalars ``[B]``.

        ``objectives[i]`` forces the task of row ``i`` (None: drawn from the config).
        """
        if len(windows) == 0:
            raise ValueError("BlankInfilling.batch: no windows")
        flat = self._concatenate(windows)
        keys = self._row_keys(windows)  # uint64 [B]
        u = uniforms(keys[:, None], self._draw_ids[None, :])  # [B, R]
        code = self._tasks(u[:, 0], objectives)  # [B]
        tasks = TaskBatch(flat, u, keys, windows)
        parts = []
        for task, sampler in enumerate(self._samplers):
            rows = (code == task).nonzero()[0]
            if rows.shape[0]:
                parts.append(sampler(rows, tasks))
        spans = concat_spans(parts)
        # Each task's spans are sorted by (row, start) and a row has one task: a stable sort by
        # row sorts them all by (row, start).
        order = spans.row.argsort(kind="stable")
        spans = Spans(spans.row[order], spans.start[order], spans.length[order])
        return self._assemble(flat, spans, code, u)

    # ------------------------------------------------------------------ inputs

    def _concatenate(self, windows: Sequence[WindowLike]) -> Flat:
        tokens = [np.asarray(w.tokens, dtype=np.int64) for w in windows]
        length = np.array([t.shape[0] for t in tokens], dtype=np.int64)
        bad = ((length < 1) | (length > self.window_length)).nonzero()[0]
        if bad.shape[0]:
            w = windows[int(bad[0])]
            raise ValueError(
                f"window {w.index} (epoch {w.epoch}) has {int(length[bad[0]])} tokens; blank "
                f"infilling at seq_length={self.seq_length} needs 1..{self.window_length} "
                "(BlankInfilling.window_length)"
            )
        sep = np.array([self.ids.eos], dtype=np.int64)
        flat = np.concatenate([x for t in tokens for x in (t, sep)])
        offset = np.add.accumulate(length + 1) - (length + 1)
        eos_pos = (flat == self.ids.eos).nonzero()[0]
        return Flat(flat, offset, length, eos_pos)

    def _row_keys(self, windows: Sequence[WindowLike]) -> np.ndarray:
        epoch = [int(w.epoch) for w in windows]
        index = [int(w.index) for w in windows]
        for e, i in zip(epoch, index, strict=True):
            if not (0 <= i < 2**_INDEX_BITS and 0 <= e < 2 ** (64 - _INDEX_BITS)):
                raise ValueError(
                    f"window epoch={e}, index={i}: need 0 <= index < 2**{_INDEX_BITS} "
                    f"and 0 <= epoch < 2**{64 - _INDEX_BITS}"
                )
        x = np.array([(e << _INDEX_BITS) | i for e, i in zip(epoch, index, strict=True)], np.uint64)
        return mix(mix(x + self._seed_key))

    def _tasks(self, u0: np.ndarray, objectives: Sequence[str | None] | None) -> np.ndarray:
        """Task code per row: drawn from ``u0`` or forced by name."""
        code = np.minimum(self._task_cdf.searchsorted(u0, "right"), len(OBJECTIVES) - 1)
        if objectives is not None:
            if len(objectives) != code.shape[0]:
                raise ValueError(f"{len(objectives)} objectives for {code.shape[0]} windows")
            for i, name in enumerate(objectives):
                if name is None:
                    continue
                if name not in OBJECTIVES:
                    raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
                code[i] = OBJECTIVES.index(name)
        return code


# ---------------------------------------------------------------------- reading rows back


@dataclass(frozen=True)
class RowBlock:
    """One part-B block of a row: the span at part-A position ``mask_pos``."""

    mask_pos: int  # position of its mask token in part A
    offset: int  # where its [sop] sits in the row
    length: int  # span tokens (the block is length + 1 long)


def row_blocks(row: dict[str, Any]) -> list[RowBlock]:
    """The part-B blocks of a row, in part-B order (read from block positions == 1)."""
    sep, valid = int(row["sep"]), int(row["valid_len"])
    block_pos = np.asarray(row["position_ids"])[1, sep:valid]
    offsets = (block_pos == 1).nonzero()[0]
    ends = np.append(offsets[1:], valid - sep)
    return [
        RowBlock(int(np.asarray(row["position_ids"])[0, sep + o]), sep + int(o), int(e - o - 1))
        for o, e in zip(offsets, ends, strict=True)
    ]


def row_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready row: batch-contract keys as lists of ints, ``objective`` as its name."""
    return {
        "tokens": np.asarray(row["tokens"]).tolist(),
        "targets": np.asarray(row["targets"]).tolist(),
        "loss_mask": np.asarray(row["loss_mask"]).astype(np.int64).tolist(),
        "position_ids": np.asarray(row["position_ids"]).tolist(),
        "sep": int(row["sep"]),
        "valid_len": int(row["valid_len"]),
        "objective": OBJECTIVES[int(row["objective"])],
    }


def format_row(row: dict[str, Any], decode: Any, title: str = "") -> str:
    """Human-readable row: fields, part A text (masks visible) and each part-B span.

    ``decode`` maps a list of ids to text and should render special tokens (GLMTokenizer does).
    """
    tokens = np.asarray(row["tokens"])
    sep, valid = int(row["sep"]), int(row["valid_len"])
    blocks = row_blocks(row)
    masked = sum(b.length for b in blocks)
    window = sep - len(blocks) + masked
    lines = [
        f"{title}objective={OBJECTIVES[int(row['objective'])]} sep={sep} valid_len={valid} "
        f"seq_length={tokens.shape[0]} spans={len(blocks)} "
        f"masked={masked}/{window} ({100.0 * masked / max(window, 1):.1f}%)",
        f"  part A: {decode(tokens[:sep].tolist())!r}",
        "  part B (generation order):",
    ]
    for k, b in enumerate(blocks):
        body = tokens[b.offset + 1 : b.offset + 1 + b.length].tolist()
        lines.append(f"    {k:>3} @pos {b.mask_pos:<4} len {b.length:<3} {decode(body)!r}")
    return "\n".join(lines)
