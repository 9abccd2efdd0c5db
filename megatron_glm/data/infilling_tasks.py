"""The three task samplers of blank infilling: which spans of a window each row masks.

Each sampler returns the spans of its rows of a micro-batch (:class:`TaskBatch`), sorted by
(row, start); :mod:`megatron_glm.data.infilling_rows` lays them out. Tasks (one per row, drawn
with ``span_prob`` / ``sentence_prob`` / ``document_prob``; GLM's original draws one per
micro-batch, we draw per row so every batch carries every task):

* span (:class:`SpanTask`): lengths ~ Poisson(lambda) conditioned on ``1..max_span_length`` are
  drawn until they cover ``T = mask_ratio * L`` tokens (``L`` = window length). The span that
  crosses ``T`` is kept with probability ``(T - covered_before) / its_length``, which makes the
  expected masked count exactly ``T`` (GLM always keeps it and overshoots by ~2 tokens per row).
  At least one span is kept. With probability ``single_span_prob`` the row instead gets one span
  of Poisson length (GLM's ``single_span_prob`` semantics). Spans never contain an eos (eos is
  never masked, as in GLM, so a span never crosses a document boundary) and two spans are
  always separated by at least one unmasked token.
* sentence (:class:`SentenceTask`): the window is cut into units at ``window.sentence_starts``
  and around every eos; units (whole sentences, or the sentence fragments at the window edges,
  never containing eos) are taken in random order until they cover ``sentence_ratio * L`` with
  the same unbiased keep-last rule; at least one unit. Two chosen sentences may be adjacent (two
  ``[sMASK]`` in a row). A window with one sentence masks that sentence.
* document (:class:`DocumentTask`): one ``[gMASK]`` span = the suffix of ``round(r * L)`` tokens
  (clipped to 1..L), ``r ~ U(document_min_ratio, document_max_ratio)``. Like GLM's generation
  task on packed data, the suffix may contain eos (the model learns to end a document and start
  the next).

Static shape rule (:func:`span_budget`). A row is ``L + 2 n`` tokens long (each span gives one
mask in part A and one extra token, ``[sop]``/``[eop]``, in part B). With ``n_max`` the span
budget, ``window_length = S - 2 n_max``, so every row fits ``S``. ``n_max`` is the smallest
integer such that ``n_max >= E[n] + 4 sd[n] + 1`` for the span task on a full window, where by
renewal theory ``E[n] ~= T / mu + 1`` and ``Var[n] ~= T sigma^2 / mu^3`` (``mu``, ``sigma^2`` of
the truncated Poisson). At S=512 with the defaults this gives ``window_length = 446``,
``n_max = 33`` against ~22 spans per row. If a draw would still exceed ``n_max`` spans (a
4-sigma event for span rows; sentence rows only with sentences of ~2 tokens), the row stops
adding spans at ``n_max``: it masks less, it is never dropped and no span is ever truncated.

Span placement. Documents are the runs of non-eos tokens. Each span gets an anchor drawn
uniformly over the row's non-eos tokens; sorting anchors gives each span its document and its
order inside it (lengths are thereby in uniformly random order). Inside a document of ``s``
tokens holding spans of total "block" length ``B = sum(len + 1)``, the ``f = s + 1 - B`` free
tokens are spread by stars and bars: the ``i``-th span starts after ``floor(rel_i * (f + 1))``
free tokens plus the blocks before it (``rel_i`` = the anchor's relative position in the
document), which is GLM's ``sample_spans`` (sorted uniform places). A document admits its
spans in anchor order while their blocks fit; spans that do not fit (short documents) are
moved, in up to 4 vectorised rounds, to a document of their row chosen in proportion to its
remaining free tokens; a span that still fits nowhere is left out (the row masks less; at
mean document lengths >= 8 tokens the masked fraction stays 15%). A row with non-eos tokens
always gets at least one span: if no drawn span fits, one span as long as the longest document
allows is placed. A window made only of eos tokens gets no span: a valid row with loss_mask
all 0 (the loss must divide by ``max(sum(loss_mask), 1)``).

The hot path calls ufunc methods (np.add.accumulate) and ndarray methods (a.searchsorted,
a.repeat, a.nonzero) rather than the np.* wrappers, whose Python-level dispatch costs several
times the work on small arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from megatron_glm.config import ConfigError, ObjectiveConfig
from megatron_glm.data.infilling_arrays import (
    Flat,
    Runs,
    Spans,
    arange,
    concat_spans,
    group_first,
    order,
    runs_of,
    uniforms,
)

__all__ = [
    "DocumentTask",
    "DrawLayout",
    "SentenceTask",
    "SpanTask",
    "TaskBatch",
    "TaskSampler",
    "span_budget",
    "truncated_poisson",
]

_REFIT_ROUNDS = 4  # rounds moving spans out of full documents before leaving them out


def truncated_poisson(lam: float, max_len: int) -> tuple[np.ndarray, float, float]:
    """CDF over lengths ``1..max_len`` of Poisson(lam) conditioned on that range, mean, var.

    Returns ``(cdf [max_len], mean, variance)``; ``cdf[-1] == 1`` exactly so that
    ``searchsorted(cdf, u, 'right') + 1`` maps ``u in [0, 1)`` to a length in ``1..max_len``.
    """
    ks = np.arange(1, max_len + 1, dtype=np.float64)
    log_pmf = ks * math.log(lam) - lam - np.array([math.lgamma(k + 1) for k in ks])
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    cdf = np.cumsum(pmf)
    cdf[-1] = 1.0
    mean = float((ks * pmf).sum())
    var = float((ks * ks * pmf).sum() - mean * mean)
    return cdf, mean, var


def span_budget(cfg: ObjectiveConfig, seq_length: int) -> tuple[int, int]:
    """``(window_length, max_spans)`` for row length ``seq_length`` (module docstring rule)."""
    _, mu, var = truncated_poisson(cfg.poisson_lambda, cfg.max_span_length)
    for n_max in range(1, seq_length // 2 + 1):
        window = seq_length - 2 * n_max
        target = cfg.mask_ratio * window
        need = target / mu + 1.0 + 4.0 * math.sqrt(target * var / mu**3) + 1.0
        if n_max >= need:
            if window < 1:
                break
            return window, n_max
    raise ConfigError(
        "data.seq_length",
        f"{seq_length} is too short for blank infilling with mask_ratio={cfg.mask_ratio}, "
        f"poisson_lambda={cfg.poisson_lambda}: no room for a window and its span budget",
    )


@dataclass(frozen=True)
class DrawLayout:
    """Which of a row's random draws serves what (:mod:`megatron_glm.data.blank_infilling`,
    "Determinism"): draws ``[0, num_draws)`` are fixed per row; the rest are addressed by the
    row-local position they concern, so no count depends on the batch."""

    window_length: int
    max_spans: int
    num_lengths: int
    """Span lengths drawn per row: enough to always reach ``T`` (every length is >= 1)."""

    @classmethod
    def of(cls, cfg: ObjectiveConfig, window_length: int, max_spans: int) -> DrawLayout:
        return cls(window_length, max_spans, math.ceil(cfg.mask_ratio * window_length) + 1)

    @property
    def anchor0(self) -> int:
        """First anchor draw: after the task draw, 3 coins and the lengths."""
        return 4 + self.num_lengths

    @property
    def order0(self) -> int:
        """First part-B order key (one per span, after one anchor per span)."""
        return self.anchor0 + self.max_spans

    @property
    def num_draws(self) -> int:
        """``R``: draws fixed per row; sentence unit ``start`` uses draw ``R + start``."""
        return self.order0 + self.max_spans

    @property
    def refit0(self) -> int:
        """First draw moving spans out of full documents (after the sentence-unit draws)."""
        return self.num_draws + self.window_length


@dataclass
class TaskBatch:
    """What every sampler reads: the concatenated windows and the rows' random draws."""

    flat: Flat
    u: np.ndarray  # float64 [B, R] the fixed draws of each row
    keys: np.ndarray  # uint64 [B] each row's SplitMix64 key, for its further draws
    windows: Sequence[Any]  # the WindowLike inputs (sentence starts)


class TaskSampler(Protocol):
    """A task: the spans it masks in ``rows`` of ``batch``, sorted by (row, start)."""

    def __call__(self, rows: np.ndarray, batch: TaskBatch) -> Spans: ...


def _keep_last_counts(lens: np.ndarray, target: np.ndarray, coin: np.ndarray) -> np.ndarray:
    """Per row of ``lens`` [n, K]: how many leading lengths to keep (unbiased keep-last rule).

    Lengths are taken in order until their sum reaches ``target``; the crossing one is kept with
    probability ``(target - covered_before) / its_length``, so the expected covered length is
    exactly ``target``. At least one. Needs ``sum(lens[i]) > target[i]`` (true by construction).
    """
    cum = np.add.accumulate(lens, axis=1)  # [n, K]
    k = np.add.reduce(cum < target[:, None], axis=1)  # first index with cum >= target
    rows = arange(lens.shape[0])
    before = np.where(k > 0, cum[rows, k - 1], 0)
    keep = coin * lens[rows, k] < target - before
    return np.maximum(k + keep, 1)


def _keep_last_mask(
    excl: np.ndarray, length: np.ndarray, target: np.ndarray, coin: np.ndarray, rank: np.ndarray
) -> np.ndarray:
    """The keep-last rule on items grouped by row in taking order (``excl``: covered before)."""
    taken = (excl < target) & ((excl + length < target) | (coin * length < target - excl))
    taken |= rank == 0
    return taken


def _admit(
    run: np.ndarray, rel: np.ndarray, block: np.ndarray, used: np.ndarray, cap: np.ndarray
) -> np.ndarray:
    """Admit spans into runs in order of ``rel`` while their blocks fit ``cap``; ``used`` (per
    run) is updated in place. Returns the admitted mask, in the input order."""
    idx = order(run, rel)
    r, b = run[idx], block[idx]
    cb = np.add.accumulate(b)
    inside = cb - (cb - b)[group_first(r, cap.shape[0])]  # blocks up to and incl. this one
    ok_sorted = used[r] + inside <= cap[r]
    used += np.bincount(r[ok_sorted], weights=b[ok_sorted], minlength=cap.shape[0]).astype(np.int64)
    ok = np.empty(run.shape[0], dtype=bool)
    ok[idx] = ok_sorted
    return ok


# ----------------------------------------------------------------------------- span task


@dataclass
class _Placement:
    """Drawn span-task spans being fitted into the documents (runs) of their rows.

    ``run`` and ``rel`` change when a refit round moves a span; ``pending`` marks spans that fit
    nowhere yet, ``dropped`` those left out; ``used`` counts the block tokens each run holds.
    """

    row: np.ndarray  # int64 [N] row of each span
    length: np.ndarray  # int64 [N]
    draw: np.ndarray  # int64 [N] the span's number among its row's drawn lengths
    run: np.ndarray  # int64 [N] the run (document) it is placed in
    rel: np.ndarray  # float64 [N] in [0, 1): its relative position in that run
    pending: np.ndarray  # bool [N]
    dropped: np.ndarray  # bool [N]
    used: np.ndarray  # int64 [D] per run
    runs: Runs
    keys: np.ndarray  # uint64 [B]


class SpanTask:
    """Poisson-length spans covering ``mask_ratio`` of a row (module docstring)."""

    def __init__(self, cfg: ObjectiveConfig, draws: DrawLayout) -> None:
        self.cfg = cfg
        self.draws = draws
        self._cdf, self.span_mean, _ = truncated_poisson(cfg.poisson_lambda, cfg.max_span_length)

    def __call__(self, rows: np.ndarray, batch: TaskBatch) -> Spans:
        ur = batch.u[rows]  # [n, R]
        lens = self._cdf.searchsorted(ur[:, 4 : self.draws.anchor0], "right") + 1  # [n, K]
        runs = runs_of(batch.flat)
        p = self._anchor(rows, ur, lens, runs, batch)
        for rnd in range(_REFIT_ROUNDS):
            if np.count_nonzero(p.pending) == 0:
                break
            self._refit_round(rnd, p)
        spans = self._place(p, batch.flat)
        empty = (np.bincount(spans.row, minlength=batch.flat.length.shape[0])[rows] == 0) & (
            runs.mass[rows] > 0
        )
        if np.count_nonzero(empty):
            spans = self._one_span_rows(spans, rows[empty], lens[empty, 0], runs, batch)
        return spans

    def _anchor(
        self, rows: np.ndarray, ur: np.ndarray, lens: np.ndarray, runs: Runs, batch: TaskBatch
    ) -> _Placement:
        """Keep the rows' leading lengths up to the target, anchor each span at a uniform
        non-eos token of its row and admit what fits its document."""
        target = self.cfg.mask_ratio * batch.flat.length[rows]  # [n]
        count = _keep_last_counts(lens, target, ur[:, 2])
        np.minimum(count, self.draws.max_spans, out=count)
        count[ur[:, 1] < self.cfg.single_span_prob] = 1
        count[runs.mass[rows] == 0] = 0
        i, draw = (arange(lens.shape[1])[None, :] < count[:, None]).nonzero()
        row = rows[i]
        length = lens[i, draw]
        # Anchor: a uniform non-eos token of the row (integer part exact, batch-independent).
        local = ur[i, self.draws.anchor0 + draw] * runs.mass[row]
        run = runs.end_mass.searchsorted(runs.mass_off[row] + local.astype(np.int64), "right")
        rlen = runs.length[run]
        rel = (local - (runs.end_mass[run] - rlen - runs.mass_off[row])) / rlen  # [N] in [0, 1)
        cap = runs.length + 1  # a run of s tokens holds blocks (span + 1) of total s + 1
        used = np.zeros(cap.shape[0], dtype=np.int64)
        pending = ~_admit(run, rel, length + 1, used, cap)
        dropped = np.zeros(row.shape[0], dtype=bool)
        return _Placement(row, length, draw, run, rel, pending, dropped, used, runs, batch.keys)

    def _refit_round(self, rnd: int, p: _Placement) -> None:
        """Move pending spans (their document was full) to a run of their row with free
        tokens, chosen in proportion to them; updates ``p`` in place."""
        runs, max_spans = p.runs, self.draws.max_spans
        k = p.pending.nonzero()[0]
        rk = p.row[k]
        free = np.maximum(runs.length - p.used, 0)  # cap - used - 1
        wc = np.add.accumulate(free)
        first = runs.first[rk]
        lo = np.where(first > 0, wc[first - 1], 0)
        hi = wc[runs.stop[rk] - 1]
        full = hi <= lo
        p.dropped[k[full]] = True
        p.pending[k[full]] = False
        k, rk, lo, hi = k[~full], rk[~full], lo[~full], hi[~full]
        c0 = self.draws.refit0 + 2 * rnd * max_spans
        pick = (uniforms(p.keys[rk], p.draw[k] + c0) * (hi - lo)).astype(np.int64)
        new_run = wc.searchsorted(lo + pick, "right")
        new_rel = uniforms(p.keys[rk], p.draw[k] + c0 + max_spans)
        ok = _admit(new_run, new_rel, p.length[k] + 1, p.used, runs.length + 1)
        moved = k[ok]
        p.run[moved] = new_run[ok]
        p.rel[moved] = new_rel[ok]
        p.pending[moved] = False

    @staticmethod
    def _place(p: _Placement, flat: Flat) -> Spans:
        """Start of every admitted span: its run's free tokens spread by stars and bars."""
        keep = ~(p.dropped | p.pending)
        row, run, rel, length = p.row[keep], p.run[keep], p.rel[keep], p.length[keep]
        idx = order(run, rel)
        row, run, rel, length = row[idx], run[idx], rel[idx], length[idx]
        cap = p.runs.length + 1
        block = length + 1
        cb = np.add.accumulate(block)
        before = cb - block
        before -= before[group_first(run, cap.shape[0])]  # blocks before it inside its run
        slack = cap[run] - p.used[run]  # free tokens of the run, spread by stars and bars
        place = (rel * (slack + 1)).astype(np.int64)
        np.minimum(place, slack, out=place)
        return Spans(row, p.runs.start[run] + place + before - flat.offset[row], length)

    def _one_span_rows(
        self,
        spans: Spans,
        rows: np.ndarray,
        first_len: np.ndarray,
        runs: Runs,
        batch: TaskBatch,
    ) -> Spans:
        """Rows whose drawn spans all fit nowhere get one span as long as their longest
        document allows, at a uniform place in it (rare: only documents shorter than spans)."""
        parts = [spans]
        c0 = self.draws.refit0 + 2 * _REFIT_ROUNDS * self.draws.max_spans
        keys, offset = batch.keys, batch.flat.offset
        for b, want in zip(rows.tolist(), first_len.tolist(), strict=True):
            d = int(runs.first[b] + np.argmax(runs.length[runs.first[b] : runs.stop[b]]))
            n = min(int(want), int(runs.length[d]))
            u0 = float(uniforms(keys[b : b + 1], np.array([c0]))[0])
            start = int(runs.start[d]) + int(u0 * (int(runs.length[d]) - n + 1))
            start -= int(offset[b])
            parts.append(Spans(np.array([b]), np.array([start]), np.array([n])))
        return concat_spans(parts)


# ----------------------------------------------------------------------------- sentence task


class SentenceTask:
    """Whole sentence units (never containing eos) covering ~``sentence_ratio`` of a row."""

    def __init__(self, cfg: ObjectiveConfig, draws: DrawLayout, eos: int) -> None:
        self.cfg = cfg
        self.draws = draws
        self.eos = eos

    def __call__(self, rows: np.ndarray, batch: TaskBatch) -> Spans:
        flat = batch.flat
        ustart, ulen, urow = self._units(rows, batch)
        local = ustart - flat.offset[urow]
        key = uniforms(batch.keys[urow], local + self.draws.num_draws)  # random order in a row
        idx = order(urow, key)
        olen, orow = ulen[idx], urow[idx]
        cum = np.add.accumulate(olen)
        first = group_first(orow, flat.length.shape[0])
        excl = cum - olen
        excl -= excl[first]  # covered before this unit, inside its row
        rank = arange(idx.shape[0]) - first
        target = self.cfg.sentence_ratio * flat.length[orow]
        taken = _keep_last_mask(excl, olen, target, batch.u[orow, 2], rank)
        taken &= rank < self.draws.max_spans
        pick = np.sort(idx[taken])  # back to text order
        return Spans(urow[pick], local[pick], ulen[pick])

    def _units(
        self, rows: np.ndarray, batch: TaskBatch
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat start, length and row of every eos-free unit of ``rows``, in text order."""
        flat, windows = batch.flat, batch.windows
        starts = [np.asarray(windows[b].sentence_starts, dtype=np.int64) for b in rows.tolist()]
        for b, ss in zip(rows.tolist(), starts, strict=True):
            if ss.shape[0] and (ss[0] < 0 or ss[-1] >= flat.length[b]):
                raise ValueError(
                    f"window {windows[b].index}: sentence_starts must be sorted offsets in "
                    f"[0, {int(flat.length[b])}), got {int(ss[0])}..{int(ss[-1])}"
                )
        cuts = np.zeros(flat.tokens.shape[0] + 1, dtype=bool)  # [F+1] unit boundaries
        counts = np.array([ss.shape[0] for ss in starts], dtype=np.int64)
        cuts[np.concatenate(starts) + flat.offset[rows].repeat(counts)] = True
        cuts[flat.eos_pos] = True
        cuts[flat.eos_pos + 1] = True
        cuts[flat.offset] = True
        bounds = cuts.nonzero()[0]
        ustart, ulen = bounds[:-1], bounds[1:] - bounds[:-1]
        urow = flat.offset.searchsorted(ustart, "right") - 1
        chosen = np.zeros(flat.length.shape[0], dtype=bool)
        chosen[rows] = True
        real = (flat.tokens[ustart] != self.eos) & chosen[urow]  # eos units are length 1
        return ustart[real], ulen[real], urow[real]


# ----------------------------------------------------------------------------- document task


class DocumentTask:
    """One suffix span of round(r * L) tokens, r ~ U(min_ratio, max_ratio)."""

    def __init__(self, cfg: ObjectiveConfig) -> None:
        self.cfg = cfg

    def __call__(self, rows: np.ndarray, batch: TaskBatch) -> Spans:
        lo, hi = self.cfg.document_min_ratio, self.cfg.document_max_ratio
        length = batch.flat.length[rows]
        gen = np.rint((lo + (hi - lo) * batch.u[rows, 3]) * length).astype(np.int64)
        np.clip(gen, 1, length, out=gen)
        return Spans(rows, length - gen, gen)
